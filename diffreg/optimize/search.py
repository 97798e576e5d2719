"""The searches of :func:`diffreg.optimize.optimize_steps` over a grid's levels, in log-SNR.

A grid of ``steps`` levels is an increasing array ``lam`` of log-SNRs (float64): ``lam[0]`` the
process's noisiest level (fixed), ``lam[1:]`` free in ``(lo, hi]``, at least :data:`MIN_GAP` apart.
Two coordinate pattern searches (derivative-free: the objective is a sampling run) move them:
:func:`family_search` places the levels as a whole through the three parameters of
:func:`family_levels`; :func:`pattern_search` refines one level at a time (Sabour et al. 2024,
"Align Your Steps", section 3.3: iterative refinement).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from diffreg.process import Process

MIN_GAP = 1e-3  # smallest log-SNR gap between two levels


def lam_to_times(process: Process, lam: np.ndarray) -> np.ndarray:
    """Process times (float64) of the log-SNRs ``lam``; the first is exactly ``t_max``."""
    times = np.asarray(process.t_from_log_snr(np.asarray(lam, dtype=np.float64)), dtype=np.float64)
    times[0] = process.t_max
    # the least noisy level exactly (not t_min + 5e-16 from the interpolation's rounding)
    near = np.abs(times - process.t_min) <= 1e-12 * max(1.0, abs(process.t_max))
    times[near] = process.t_min
    return times


def times_to_lam(process: Process, times: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Log-SNRs of ``times`` clipped into [lo, hi]; the first is exactly ``lo``."""
    alpha, sigma = process.alpha_sigma(np.asarray(times, dtype=np.float64))
    with np.errstate(divide="ignore"):
        lam = np.log(np.asarray(alpha, dtype=np.float64)) - np.log(np.asarray(sigma, dtype=np.float64))
    lam = np.clip(lam, lo, hi)
    lam[0] = lo
    return lam


def pattern_search(
    objective: Callable[[np.ndarray], float],
    lam: np.ndarray,
    lo: float,
    hi: float,
    max_evals: int,
    history: list[float],
) -> tuple[np.ndarray, float]:
    """Coordinate pattern search over ``lam[1:]`` (log-SNR, increasing, within [lo, hi]): each
    level in turn (sweeps alternate direction) moves ``fraction`` of the way towards one neighbour,
    first in the direction that last helped; a level whose two moves both fail halves its
    fraction (from 1/2; it stops below 1/64).

    Returns:
        ``(lam, error)``: the best levels found and their objective value, after at most
        ``max_evals`` calls of ``objective``; the start is the first call, so never worse than it.
    """
    best = objective(lam)
    history.append(best)
    n = len(lam)
    fraction = np.full(n, 0.5)
    direction = np.ones(n)
    evals = 1
    sweep = 0
    while evals < max_evals and fraction[1:].max() > 1.0 / 64:
        order = range(1, n) if sweep % 2 == 0 else range(n - 1, 0, -1)
        for j in order:
            if evals >= max_evals:
                break
            if fraction[j] <= 1.0 / 64:
                continue
            moved = False
            for sign in (direction[j], -direction[j]):
                lower = lam[j - 1] if j > 1 else lo
                upper = lam[j + 1] if j + 1 < n else hi
                cand = lam.copy()
                if sign > 0:
                    cand[j] = lam[j] + fraction[j] * (upper - lam[j])
                else:
                    cand[j] = lam[j] - fraction[j] * (lam[j] - lower)
                top = hi if j + 1 == n else upper - MIN_GAP
                cand[j] = float(np.clip(cand[j], lower + MIN_GAP, top))
                if cand[j] == lam[j]:
                    continue
                err = objective(cand)
                evals += 1
                if err < best:
                    lam, best, moved = cand, err, True
                    direction[j] = sign
                    history.append(best)
                    break
                if evals >= max_evals:
                    break
            if not moved:
                fraction[j] *= 0.5
        sweep += 1
    return lam, best


def family_levels(lo: float, hi: float, steps: int, params: Sequence[float]) -> np.ndarray:
    """Log-SNRs of a ``steps``-level grid of the three-parameter family the search starts in:
    the first level at ``lo`` (the noisiest), the free levels j = 1 .. steps - 1 at

        lambda_j = a + (b - a) u_j^p,   u_j = (j - 1) / (steps - 2),   params = (a, b, log p),

    clipped into (lo, hi]. ``(a, b, 0)`` with a = the second level of the ``exponential`` grid and
    b = hi is that grid; a > that value skips the levels where the data is still all noise, b < hi
    stops short of the least noisy level, p > 1 packs levels towards the noisy end.

    Raises:
        ValueError: ``steps`` not an int >= 2; ``lo``/``hi`` not finite with ``lo < hi``, or too
            close for ``steps`` levels :data:`MIN_GAP` apart; ``params`` not three finite numbers.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise ValueError(f"steps must be an int >= 2 (the first level and at least one free one), got {steps!r}")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"the log-SNR range must be finite with lo < hi, got lo={lo!r}, hi={hi!r}")
    if (hi - lo) <= (steps - 1) * MIN_GAP:
        raise ValueError(
            f"{steps} levels do not fit {MIN_GAP} apart in the log-SNR range [{lo}, {hi}]; give fewer steps"
        )
    try:
        a, b, log_p = (float(v) for v in params)
    except (TypeError, ValueError):
        raise ValueError(f"params must be three numbers (a, b, log p), got {params!r}") from None
    if not all(math.isfinite(v) for v in (a, b, log_p)):
        raise ValueError(f"params must be finite, got {params!r}")
    n_free = steps - 1
    u = np.linspace(0.0, 1.0, n_free) if n_free > 1 else np.zeros(1)
    lam = np.empty(steps)
    lam[0] = lo
    lam[1:] = a + (b - a) * u ** math.exp(log_p)
    for j in range(1, steps):  # strictly increasing, at least MIN_GAP apart, the last <= hi
        lam[j] = min(max(lam[j], lam[j - 1] + MIN_GAP), hi - (steps - 1 - j) * MIN_GAP)
    return lam


def family_search(
    objective: Callable[[np.ndarray], float], lo: float, hi: float, steps: int, max_evals: int, history: list[float]
) -> tuple[np.ndarray, float]:
    """Coordinate pattern search over :func:`family_levels`' three parameters, from the
    ``exponential`` grid: a few dozen evaluations place the levels as a whole (skip the pure-noise
    end, stop short of the data, pack them), which the one-level-at-a-time refinement that
    follows cannot do (its levels never pass each other). Each parameter in turn moves by its
    span either way; a sweep without a kept move halves the spans.

    Returns:
        ``(lam, error)`` as :func:`pattern_search`, after at most ``max_evals`` calls; ``error``
        is ``inf`` only if every candidate failed (over the NFE budget or not finite).
    """
    width = hi - lo
    a0 = lo + width / (steps - 1) if steps > 2 else lo + width / 2
    params = np.array([a0, hi, 0.0])
    span = np.array([width / 4, width / 8, 0.5])
    bounds = [(lo + MIN_GAP, hi - MIN_GAP), (lo + 2 * MIN_GAP, hi), (math.log(0.2), math.log(5.0))]
    cost = lambda p: objective(family_levels(lo, hi, steps, p)) if p[0] < p[1] else math.inf  # noqa: E731
    best = cost(params)
    history.append(best)
    evals = 1
    while evals < max_evals and (span > np.array([width, width, 1.0]) / 256).any():
        improved = False
        for k in range(3):
            for sign in (1.0, -1.0):
                if evals >= max_evals:
                    break
                cand = params.copy()
                cand[k] = float(np.clip(cand[k] + sign * span[k], *bounds[k]))
                if cand[k] == params[k]:
                    continue
                err = cost(cand)
                evals += 1
                if err < best:
                    params, best, improved = cand, err, True
                    history.append(best)
                    break
        if not improved:
            span = span / 2
    return family_levels(lo, hi, steps, params), best


__all__ = ["MIN_GAP", "family_levels", "family_search", "lam_to_times", "pattern_search", "times_to_lam"]
