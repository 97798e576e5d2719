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

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffreg import registry
from diffreg.process import Process
from diffreg.sampling.contract import Sampler
from diffreg.sampling.driver import resolve_sampler, sample_loop

from .search import MIN_GAP, family_levels, family_search, lam_to_times, pattern_search, times_to_lam

if TYPE_CHECKING:
    from diffreg.diffusion import Diffusion

#: grids the result is compared with (besides the sampler's own default grid)
BASELINE_GRIDS = ("karras", "exponential")
#: the most levels of a reference solve (each is a model call per draw)
MAX_REFERENCE_LEVELS = 10_000
#: samplers whose step sizes are not the grid's
NOT_GRID_DRIVEN = ("adaptive",)


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


def _sampler_name(sampler: str | Sampler) -> str:
    return sampler if isinstance(sampler, str) else type(sampler).__name__


def check_optimizable(sampler: str | Sampler, sampler_obj: Sampler) -> None:
    """Refuse samplers that have no single answer to approach or that ignore the grid.

    Raises:
        ValueError: a stochastic sampler (naming the option that makes it deterministic when there
            is one) or ``adaptive``.
    """
    name = _sampler_name(sampler)
    if name.split(":")[-1] in NOT_GRID_DRIVEN:
        raise ValueError(
            f"sampler {name!r} chooses its own step sizes by error control (rtol/atol), so there is no grid "
            "to optimize; pick a fixed-step deterministic sampler such as dpmpp_2m, unipc, deis, ipndm or heun"
        )
    if getattr(sampler_obj, "stochastic", False):
        hint = ""
        for option in ("eta", "s_churn", "restarts"):
            if hasattr(sampler_obj, option):
                hint = f" (or give {option}=0 to make it deterministic)"
                break
        raise ValueError(
            f"sampler {name!r} is stochastic: its samples have no single reference solution to fit a grid "
            f"to; optimize-steps takes deterministic samplers (ddim, euler, heun, dpmpp_2m, unipc, deis, "
            f"ipndm, dpm_solver_2s, ...){hint}"
        )


def check_process(process: Any) -> tuple[float, float]:
    """The finite log-SNR range ``(lo, hi)`` of ``process`` that a grid may span.

    Raises:
        ValueError: not a :class:`~diffreg.process.Process`, or no finite range of positive width.
    """
    if not isinstance(process, Process):
        raise ValueError(
            f"this checkpoint's diffusion has no noise-level process (got {type(process).__name__}); "
            "optimize-steps needs a diffreg Process (discrete VP tables or a continuous process)"
        )
    lo, hi = (float(v) for v in process.log_snr_range())
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"the process {process!r} has no finite log-SNR range to place levels in: [{lo}, {hi}]")
    return lo, hi


def default_reference() -> tuple[str, int, dict[str, Any]]:
    """The reference solver ``(name, levels, options)``: UniPC-3 with the second-order last step on
    200 levels, ``("unipc", 200, {"order": 3, "final_order": 2})``, when the solvers plugin is
    installed (on exact mixture denoisers 1e-6 to 2e-5 from the exact ODE solution: the first-order
    jump to the data of the default UniPC leaves a floor of 1.5e-4 to 8e-4 that more levels do not
    lower, and a grid fitted to it inherits it); else ``("ddim", 1000, {})`` (first order, so more
    levels)."""
    names = {c.name for c in registry.components("sampler")}
    return ("unipc", 200, {"order": 3, "final_order": 2}) if "unipc" in names else ("ddim", 1000, {})


def _reference_spec(reference) -> tuple[str, int, dict[str, Any]]:
    """``reference`` as ``(name, levels, options)``; ``(name, levels)`` has no options.

    Raises:
        ValueError: not a ``(name, levels[, options])`` sequence with levels an int in
            2..:data:`MAX_REFERENCE_LEVELS`; a stochastic or ``adaptive`` reference sampler.
    """
    if reference is None:
        return default_reference()
    ok = isinstance(reference, (tuple, list)) and len(reference) in (2, 3)
    ok = ok and isinstance(reference[0], str) and not isinstance(reference[1], bool)
    ok = ok and isinstance(reference[1], (int, np.integer))
    ok = ok and 2 <= reference[1] <= MAX_REFERENCE_LEVELS and (len(reference) == 2 or isinstance(reference[2], Mapping))
    if not ok:
        raise ValueError(
            f"reference must be (sampler name, levels in 2..{MAX_REFERENCE_LEVELS:,}[, options dict]), got {reference!r}"
        )
    name, levels, options = str(reference[0]), int(reference[1]), dict(reference[2]) if len(reference) == 3 else {}
    ref_obj = resolve_sampler(name, options)
    try:
        check_optimizable(name, ref_obj)
    except ValueError as exc:  # a random or self-stepping reference has no fixed solution to fit to
        raise ValueError(f"the reference sampler must be deterministic and follow its grid: {exc}") from None
    return name, levels, options


class _Objective:
    """Runs the sampler on a grid for a fixed set of draws and measures the distance to the
    reference; counts the calls."""

    def __init__(self, diffusion, model, sampler_obj, x_T, reference, model_kwargs, nfe_cap, batch_size, options):
        self.diffusion, self.model, self.sampler = diffusion, model, sampler_obj
        self.x_T, self.reference, self.model_kwargs = x_T, reference, model_kwargs
        self.nfe_cap, self.batch_size, self.options = nfe_cap, batch_size, options
        self.calls = 0

    def run(self, times: np.ndarray) -> tuple[torch.Tensor, int]:
        outs, nfe = [], 0
        for lo in range(0, self.x_T.shape[0], self.batch_size):
            x = self.x_T[lo : lo + self.batch_size]
            kwargs = {k: v[lo : lo + self.batch_size] for k, v in self.model_kwargs.items()}
            stats: dict[str, Any] = {}
            out = sample_loop(
                self.diffusion,
                self.model,
                tuple(x.shape),
                sampler=self.sampler,
                times=times,
                noise=x,
                model_kwargs=kwargs,
                stats=stats,
                **self.options,
            )
            outs.append(out)
            nfe = max(nfe, int(stats["nfe"]))
        self.calls += 1
        return torch.cat(outs), nfe

    def __call__(self, times: np.ndarray) -> tuple[float, int]:
        out, nfe = self.run(times)
        if nfe > self.nfe_cap:
            return math.inf, nfe
        err = float(((out.double() - self.reference.double()) ** 2).mean().sqrt())
        return (err if math.isfinite(err) else math.inf), nfe


def steps_for_nfe(
    diffusion: Diffusion, model: Any, sampler_obj: Sampler, nfe: int, shape, model_kwargs, options, name: str = ""
) -> int:
    """The most steps whose sampling call uses at most ``nfe`` model evaluations on the default
    grid (measured with one draw: Heun's last step costs 1, DPM-Solver-3 costs 3 per step, ...),
    at most the steps that grid has on the process (a discrete process's length).

    Raises:
        ValueError: ``nfe`` below what two steps cost (one step leaves no level to optimize).
    """
    from diffreg.sampling import resolve_grid

    per = max(1, int(getattr(sampler_obj, "nfe_per_step", 1)))
    process = diffusion.process
    most = resolve_grid(getattr(sampler_obj, "grid", None) or "trailing").max_steps(process)  # the default grid's
    if most is None:
        most = int(process.t_max) + 1 if process.discrete else 10_000
    probe_kwargs = {k: v[:1] for k, v in model_kwargs.items()}

    def used(steps: int) -> int:
        stats: dict[str, Any] = {}
        times = diffusion.grid_times(steps, None, sampler_obj)
        sample_loop(
            diffusion,
            model,
            (1, *shape),
            sampler=sampler_obj,
            times=times,
            noise=torch.zeros(1, *shape),
            model_kwargs=probe_kwargs,
            stats=stats,
            check_finite=False,
            **options,
        )
        return int(stats["nfe"])

    minimum = used(2)
    if nfe < minimum:
        raise ValueError(
            f"nfe {nfe} is below the minimum for sampler {name or type(sampler_obj).__name__!r}: {minimum} (two "
            f"steps; one step has no noise level to optimize); give nfe >= {minimum}"
        )
    steps = min(most, max(2, math.ceil(nfe / per)))
    while steps > 2 and used(steps) > nfe:
        steps -= 1
    while steps < most and used(steps + 1) <= nfe:
        steps += 1
    return steps


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
        + f"; starting from {start_name}"
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
    "OptimizedSteps",
    "check_optimizable",
    "check_process",
    "default_reference",
    "family_levels",
    "optimize_steps",
    "steps_for_nfe",
]
