"""Helpers shared by the samplers: option checks and first-order exponential-integrator steps."""

from __future__ import annotations

import math

import torch

from diffreg.process import NoiseLevel


def check_number(value, name: str, *, minimum: float | None = None, above: float | None = None, finite: bool = True) -> float:
    """``value`` as a float, or ValueError naming ``name``, the value and what is accepted."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        value = float(value)
        ok = (math.isfinite(value) or not finite) and not math.isnan(value)
        ok = ok and (minimum is None or value >= minimum) and (above is None or value > above)
    if not ok:
        bound = f" >= {minimum:g}" if minimum is not None else f" > {above:g}" if above is not None else ""
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number{bound}, got {value!r}")
    return float(value)


def check_int(value, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high], or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        accepted = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {accepted}, got {value!r}")
    return value


def check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(choices)}")
    return value


def ddim_step(x: torch.Tensor, d: torch.Tensor, here: NoiseLevel, there: NoiseLevel) -> torch.Tensor:
    """The first-order data-prediction step (DDIM, Song et al. 2021, eq. 12 with sigma_t = 0; =
    DPM-Solver++(1), Lu et al. 2022): x' = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) D, finite
    at alpha = 0 and at sigma' = 0."""
    ratio = there.sigma / here.sigma
    return (x * ratio).add_(d, alpha=there.alpha - here.alpha * ratio)


def lincomb(terms) -> torch.Tensor:
    """sum c_k t_k over ``(c_k, t_k)`` pairs (Python float coefficients), skipping zeros; the first
    coefficient must be nonzero or it still starts the sum."""
    terms = [(c, t) for c, t in terms if c != 0.0] or terms[:1]
    c0, t0 = terms[0]
    out = t0 * c0
    for c, t in terms[1:]:
        out.add_(t, alpha=c)
    return out
