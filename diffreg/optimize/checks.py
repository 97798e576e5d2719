"""What :func:`diffreg.optimize.optimize_steps` checks and measures before and during its search:
which samplers and processes can be optimized, the reference solve, how many steps an NFE buys, and
the objective (a sampling run on fixed draws, its RMS distance to the reference)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffreg import registry
from diffreg.process import Process
from diffreg.sampling.contract import Sampler
from diffreg.sampling.driver import resolve_sampler, sample_loop

if TYPE_CHECKING:
    from diffreg.diffusion import Diffusion

#: grids the result is compared with (besides the sampler's own default grid)
BASELINE_GRIDS = ("karras", "exponential")
#: the most levels of a reference solve (each is a model call per draw)
MAX_REFERENCE_LEVELS = 10_000
#: samplers whose step sizes are not the grid's
NOT_GRID_DRIVEN = ("adaptive",)


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
        accepted = f"(sampler name, levels in 2..{MAX_REFERENCE_LEVELS:,}[, options dict])"
        raise ValueError(f"reference must be {accepted}, got {reference!r}")
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


__all__ = [
    "BASELINE_GRIDS",
    "MAX_REFERENCE_LEVELS",
    "NOT_GRID_DRIVEN",
    "check_optimizable",
    "check_process",
    "default_reference",
    "steps_for_nfe",
]
