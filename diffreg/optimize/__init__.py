"""Step schedules optimized for one model, sampler and NFE (``diffreg optimize-steps``).

The search follows the idea of Sabour et al. 2024 ("Align Your Steps: Optimizing Sampling
Schedules in Diffusion Models", section 3.3: iterative refinement of one level at a time) with
the objective of Chen et al. 2024 / Xue et al. 2024 (optimal step sizes: the distance to a
many-step solution of the same model): for ``draws`` fixed starting points x_T it measures

    error(grid) = sqrt(mean over draws and elements of (x_0(grid) - x_0(reference))^2)

where ``x_0(grid)`` is the sampler's output on the candidate grid and ``x_0(reference)`` a
many-step solve of the same model from the same x_T (UniPC-3 with a second-order last step on
200 levels uniform in log-SNR by default). The first level is fixed at the process's noisiest time (``t_max``); the
other ``steps - 1`` levels are free in log-SNR between it and the least noisy level (``t_min``),
and the data level (sigma = 0) follows the last, as for every grid. The search has two
stages, both coordinate pattern searches that keep a move when the error drops: first the levels
are placed as a whole by the three parameters of :func:`family_levels` (a quarter of the budget,
from the ``exponential`` grid); then each free level in turn moves a fraction of the way towards
one neighbour, a level whose two moves both fail halving its fraction. The second stage starts
from the best of the first stage's result and the default (``trailing``), ``karras`` and
``exponential`` grids, so the search never ends worse than they are on the draws it fits.

Half of the draws are fitted; the other half (different x_T, the same labels) report the
held-out error of the result beside the baseline grids at the same NFE. Only deterministic
samplers have a single solution to approach: a stochastic sampler (``ddpm``, ``eta > 0``, ...) and
``adaptive`` (whose step sizes come from its error control, not from the grid) are refused.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffreg.sampling.contract import Sampler
from diffreg.sampling.driver import resolve_sampler

from .checks import (
    BASELINE_GRIDS,
    MAX_REFERENCE_LEVELS,
    NOT_GRID_DRIVEN,
    _Objective,
    _reference_spec,
    _sampler_name,
    check_optimizable,
    check_process,
    default_reference,
    steps_for_nfe,
)
from .search import MIN_GAP, family_levels, family_search, lam_to_times, pattern_search, times_to_lam

if TYPE_CHECKING:
    from diffreg.diffusion import Diffusion


@dataclass
class OptimizedSteps:
    """What :func:`optimize_steps` found.

    Attributes:
        sampler: the sampler's name; ``sampler_options`` its options.
        nfe: model evaluations of one sampling call on the optimized grid; ``steps`` its levels.
        times: the optimized grid, process times (floats, strictly decreasing, the first
            ``t_max``): ``Diffusion.sample(grid=times)`` or ``{"name": "explicit", "times": times}``.
        fit_error: the error on the fitted draws (see the module docstring).
        held_out: held-out error per grid: ``"optimized"``, the default grid (e.g. ``"trailing"``),
            ``"karras"``, ``"exponential"``, each at ``steps`` levels; ``baseline_nfe``: their NFE.
        fit_baselines: the baselines' errors on the fitted draws.
        reference: how the reference solution was computed; ``evaluations``: sampling calls on
            the fitted draws (the baseline grids' included); ``seconds``: wall time of the whole search.
    """

    sampler: str
    sampler_options: dict[str, Any]
    nfe: int
    steps: int
    times: list[float]
    fit_error: float
    held_out: dict[str, float]
    baseline_nfe: dict[str, int]
    fit_baselines: dict[str, float]
    draws: int
    seed: int
    reference: dict[str, Any]
    evaluations: int
    seconds: float
    default_grid: str = "trailing"
    history: list[float] = field(default_factory=list)

    def grid_spec(self) -> dict[str, Any]:
        """The grid as ``{"name": "explicit", "times": [...]}`` (a ``grid=`` value, or a checkpoint's
        ``sampling.grid``)."""
        return {"name": "explicit", "times": list(self.times)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the file ``diffreg optimize-steps --output`` writes)."""
        return {
            "grid": self.grid_spec(),
            "sampler": self.sampler if not self.sampler_options else {"name": self.sampler, **self.sampler_options},
            "steps": self.steps,
            "nfe": self.nfe,
            "fit_error": self.fit_error,
            "held_out_error": dict(self.held_out),
            "baseline_nfe": dict(self.baseline_nfe),
            "fit_error_baselines": dict(self.fit_baselines),
            "default_grid": self.default_grid,
            "draws": self.draws,
            "seed": self.seed,
            "reference": dict(self.reference),
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 2),
        }


def optimize_steps(
    diffusion: Diffusion,
    model: Any,
    shape: Sequence[int],
    *,
    sampler: str | Sampler = "dpmpp_2m",
    nfe: int = 10,
    draws: int = 256,
    seed: int = 0,
    num_classes: int | None = None,
    sampler_options: Mapping[str, Any] | None = None,
    reference: tuple[str, int] | None = None,
    max_evals: int | None = None,
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
    **driver_options: Any,
) -> OptimizedSteps:
    """Search the noise levels of ``sampler`` at ``nfe`` model evaluations for ``model`` (see the
    module docstring for the objective and the search).

    Args:
        diffusion: the process (its :class:`~diffreg.process.Process` places the levels).
        model: called as ``model(x, t, **model_kwargs)`` (a loaded checkpoint's network, or an
            exact denoiser such as :class:`diffreg.testing.ExactDenoiser`).
        shape: one sample's shape ``(C, ...)``.
        sampler: a deterministic registered sampler (name) or instance; ``sampler_options`` its options.
        nfe: model evaluations per sampling call (steps follow from the sampler's cost per step).
        draws: starting points x_T ~ N(0, I) drawn from ``seed`` (an even number >= 4): the first
            half is fitted, the second reports the held-out error.
        num_classes: for a class-conditional model, labels ``0, 1, ..., num_classes - 1`` are
            cycled over each half (``model_kwargs["y"]``).
        reference: ``(sampler name, levels)`` or ``(sampler name, levels, options)`` of the
            reference solve on the ``exponential`` grid (default :func:`default_reference`).
        max_evals: sampling calls the search may make on the fitted draws after the baseline
            grids (2-3 calls) are measured (default ``8 (steps - 1) + 8``).
        batch_size: draws per sampling call.
        progress: called with a one-line message at each stage.
        driver_options: options of :func:`diffreg.sampling.sample_loop` for every call
            (``clip_denoised``, ``guidance_scale``, ``dtype``, ``device``, ...).

    Returns:
        :class:`OptimizedSteps`.

    Raises:
        ValueError: ``nfe`` below the sampler's minimum, a stochastic or adaptive sampler, a bad
            ``draws``/``seed``/``nfe``, a process without a finite log-SNR range.
        UnknownComponentError / ComponentOptionError: an unknown sampler or option.
    """
    start = time.perf_counter()
    say = progress or (lambda message: None)
    for name, value, low in (("nfe", nfe, 1), ("draws", draws, 4), ("seed", seed, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if draws % 2:
        raise ValueError(f"draws must be even (half fitted, half held out), got {draws}")
    if seed >= 2**63:
        raise ValueError(f"seed must be below 2**63 (a torch generator's seed), got {seed}")
    if max_evals is not None and (
        isinstance(max_evals, bool) or not isinstance(max_evals, (int, np.integer)) or max_evals < 1
    ):
        raise ValueError(f"max_evals must be an int >= 1, got {max_evals!r}")
    sampler_options = dict(sampler_options or {})
    sampler_obj = resolve_sampler(sampler, sampler_options)
    check_optimizable(sampler, sampler_obj)
    ref_name, ref_levels, ref_options = _reference_spec(reference)  # before any work
    process = diffusion.process
    lo, hi = check_process(process)
    shape = tuple(int(s) for s in shape)
    dtype = driver_options.get("dtype", torch.float32)
    device = driver_options.get("device", None)
    gen = torch.Generator().manual_seed(int(seed))
    x_T = torch.randn(draws, *shape, generator=gen, dtype=torch.float64).to(dtype)
    if device is not None:
        x_T = x_T.to(device)
    model_kwargs: dict[str, torch.Tensor] = {}
    if num_classes:
        half = draws // 2
        labels = torch.cat([torch.arange(half) % num_classes] * 2)
        model_kwargs["y"] = labels.to(x_T.device)
    steps = steps_for_nfe(
        diffusion, model, sampler_obj, int(nfe), shape, model_kwargs, driver_options, _sampler_name(sampler)
    )

    say(f"reference: {ref_name} {ref_options or ''} on {ref_levels} exponential levels, {draws} draws")
    ref_times = diffusion.grid_times(ref_levels, "exponential")
    ref_obj = resolve_sampler(ref_name, ref_options)
    ref_run = _Objective(diffusion, model, ref_obj, x_T, x_T, model_kwargs, 10**9, batch_size, driver_options)
    ref_x, _ = ref_run.run(ref_times)

    half = draws // 2
    fit_kwargs = {k: v[:half] for k, v in model_kwargs.items()}
    held_kwargs = {k: v[half:] for k, v in model_kwargs.items()}
    fit = _Objective(
        diffusion, model, sampler_obj, x_T[:half], ref_x[:half], fit_kwargs, nfe, batch_size, driver_options
    )
    held = _Objective(
        diffusion, model, sampler_obj, x_T[half:], ref_x[half:], held_kwargs, 10**9, batch_size, driver_options
    )

    default_name = getattr(sampler_obj, "grid", None) or "trailing"
    default_label = default_name if isinstance(default_name, str) else "default"
    baselines = {default_label: diffusion.grid_times(steps, default_name)}
    for name in BASELINE_GRIDS:
        if name not in baselines:
            baselines[name] = diffusion.grid_times(steps, name)
    fit_baselines = {name: fit(times)[0] for name, times in baselines.items()}
    start_name = min(fit_baselines, key=lambda k: fit_baselines[k])
    say(
        f"{_sampler_name(sampler)}, at most {nfe} NFE: {steps} steps; fit error of the baselines: "
        + ", ".join(f"{k} {v:.4g}" for k, v in fit_baselines.items())
        + f"; best: {start_name}"
    )
    lam0 = times_to_lam(process, baselines[start_name], lo, hi)
    # a spacing grid may repeat a log-SNR after clipping: spread such levels apart
    for j in range(1, steps):
        lam0[j] = max(lam0[j], lam0[j - 1] + MIN_GAP) if j > 1 else max(lam0[j], lo + MIN_GAP)
    lam0 = np.minimum(lam0, hi)
    budget = int(max_evals) if max_evals is not None else 8 * (steps - 1) + 8
    history: list[float] = []
    objective = lambda lam: fit(lam_to_times(process, lam))[0]  # noqa: E731
    start_error = fit_baselines[start_name]
    if steps > 2 and budget >= 8:
        fam_lam, fam_error = family_search(objective, lo, hi, steps, budget // 4, history)
        say(f"levels placed as a whole: {fit.calls} sampling calls, fit error {fam_error:.4g}")
        if fam_error < start_error:
            lam0, start_error, start_name = fam_lam, fam_error, "family"
    family_calls = fit.calls - len(fit_baselines)
    lam, fit_error = pattern_search(objective, lam0, lo, hi, budget - family_calls, history)
    if fit_error > start_error:  # the start is the search's first point
        lam, fit_error = lam0, start_error
    times = lam_to_times(process, lam)
    if np.array_equal(lam, lam0) and start_name in baselines:  # unchanged: keep the baseline's exact times
        times = baselines[start_name]
    say(f"search: {fit.calls} sampling calls, fit error {min(fit_baselines.values()):.4g} -> {fit_error:.4g}")
    held_out, baseline_nfe = {}, {}
    err, used = held(times)
    held_out["optimized"] = err
    for name, btimes in baselines.items():
        held_out[name], baseline_nfe[name] = held(btimes)
    return OptimizedSteps(
        sampler=_sampler_name(sampler),
        sampler_options=sampler_options,
        nfe=used,
        steps=steps,
        times=[float(t) for t in times],
        fit_error=fit_error,
        held_out=held_out,
        baseline_nfe=baseline_nfe,
        fit_baselines=fit_baselines,
        draws=draws,
        seed=int(seed),
        reference={"sampler": ref_name, "options": ref_options, "levels": ref_levels, "grid": "exponential"},
        evaluations=fit.calls,
        seconds=time.perf_counter() - start,
        default_grid=default_label,
        history=history,
    )


__all__ = [
    "BASELINE_GRIDS",
    "MAX_REFERENCE_LEVELS",
    "NOT_GRID_DRIVEN",
    "OptimizedSteps",
    "check_optimizable",
    "check_process",
    "default_reference",
    "family_levels",
    "optimize_steps",
    "steps_for_nfe",
]
