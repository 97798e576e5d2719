"""The measurements of :func:`~diffreg.testing.check_sampler`: convergence to the exact
probability-flow ODE solution (deterministic samplers) and distance to the data (stochastic ones)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffreg.schedule import spaced_timesteps
from diffreg.testing.checks._common import _fail
from diffreg.testing.checks.sampler_bench import SamplerBench
from diffreg.testing.distances import sliced_wasserstein
from diffreg.testing.ode import exact_ode_solution
from diffreg.testing.report import SamplerReport


def default_steps(order: float, warmup_steps: int) -> tuple[int, ...]:
    """The step counts of the convergence study: 10, 20, 40, 80, or 40, 80, 160, 320 for a sampler
    that takes two or more lower-order warm-up steps (at 10-80 steps they dominate its error)."""
    return (10, 20, 40, 80) if warmup_steps < 2 else (40, 80, 160, 320)


def assumed_warmup(order: float) -> int:
    """The warm-up of a sampler that declares none: a multistep solver of order p starts with
    p - 1 lower-order steps, counted from order 2.5 on (below, one warm-up step is negligible)."""
    return math.ceil(order) - 1 if order >= 2.5 else 0


def _slope(steps: Sequence[int], errors: Sequence[float]) -> float:
    """The convergence order: -d log(error) / d log(steps), by least squares."""
    return -float(np.polyfit(np.log(np.asarray(steps, dtype=np.float64)), np.log(np.asarray(errors)), 1)[0])


def study_grids(bench: SamplerBench, instance: Any, steps_list: list[int]) -> tuple[list[list[float]], float | None]:
    """The sampler's grids for each step count and the timestep where the order is measured: the
    smallest one > 0 that every grid visits (``None`` where they share none, e.g. karras grids:
    then only the final samples are compared).

    Raises:
        ValueError: default trailing grids that share no timestep (counts that are not multiples).
    """
    grids = [bench.grid_times(s, instance) for s in steps_list]
    shared = sorted(set.intersection(*(set(g) for g in grids)) - {0, round(bench.t_top, 9)})
    if (
        bench.default
        and not shared
        and all(
            g == spaced_timesteps(bench.diffusion.num_timesteps, s, "trailing")
            for g, s in zip(grids, steps_list, strict=True)
        )
    ):
        raise ValueError(
            f"the trailing grids of convergence_steps {steps_list} share no timestep other than the first; "
            "use multiples of the smallest count"
        )
    return grids, (shared[0] if shared else None)


def ode_errors(
    bench: SamplerBench, steps_list: list[int], grids: list[list[float]], stop: float | None, n: int = 64
) -> tuple[list[float], list[float]]:
    """RMS distances, per step count, of float64 runs from one x_T (``n`` points) to the exact
    probability-flow ODE solution: of the state at ``stop`` (empty without one) and of the final
    samples."""
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * bench.prior_std
    reference = exact_ode_solution(bench.mixture, bench.diffusion, x_T, t_start=bench.t_top)
    reference_stop = (
        exact_ode_solution(bench.mixture, bench.diffusion, x_T, t_start=bench.t_top, t_end=stop)
        if stop is not None
        else None
    )
    errors, final_errors = [], []
    for steps, grid in zip(steps_list, grids, strict=True):
        states: dict[float, torch.Tensor] = {}
        visit = grid[::-1]  # the state after step i is at visit[i + 1]

        def record(
            i: int,
            t: Any,
            x: torch.Tensor,
            pred_xstart: torch.Tensor,
            _visit: list[float] = visit,
            _states: dict[float, torch.Tensor] = states,
        ) -> None:
            if stop is not None and i + 1 < len(_visit) and _visit[i + 1] == stop:
                _states[stop] = x.detach().clone()

        out = bench.run((n, 2), steps, seed=3, dtype=torch.float64, callback=record)
        if out.dtype != torch.float64:
            _fail(f"{bench.where}: sampling in float64 returned {out.dtype}; a step must keep x's dtype")
        final_errors.append(float(((out.cpu() - reference) ** 2).mean().sqrt()))
        if stop is not None and reference_stop is not None:
            errors.append(float(((states[stop].cpu() - reference_stop) ** 2).mean().sqrt()))
    return errors, final_errors


def check_convergence(
    bench: SamplerBench,
    instance: Any,
    report: SamplerReport,
    steps_list: list[int],
    order: float,
    order_tolerance: float,
    max_error: float,
) -> None:
    """The deterministic part of :func:`~diffreg.testing.check_sampler`: fills ``report`` and
    fails unless the errors shrink at the declared order (at the shared stop level) and at
    min(order, 1) (final samples), and the final error at the most steps is below ``max_error``."""
    where = bench.where
    grids, stop = study_grids(bench, instance, steps_list)
    visited_steps = [len(g) for g in grids]
    errors, final_errors = ode_errors(bench, steps_list, grids, stop)
    report.steps, report.stop_timestep, report.errors, report.final_errors = visited_steps, stop, errors, final_errors
    for what, errs in ((f"the state at timestep {stop}", errors), ("the final samples", final_errors)):
        if not all(math.isfinite(e) and e > 0 for e in errs):
            _fail(f"{where}: error of {what} to the exact ODE solution is not finite and positive: {errs}")
    report.final_slope = _slope(visited_steps, final_errors)
    # no shared intermediate level (e.g. karras grids): the order is measured on the final samples
    report.slope = _slope(visited_steps, errors) if errors else (None if bench.default else report.final_slope)
    table = ", ".join(f"{s}: {e:.3g}" for s, e in zip(visited_steps, errors, strict=False))
    final_table = ", ".join(f"{s}: {e:.3g}" for s, e in zip(visited_steps, final_errors, strict=True))
    if report.slope is not None and not report.slope >= order - order_tolerance:
        measured_at = f"its state at timestep {stop}" if stop is not None else "its final samples"
        _fail(
            f"{where}: declares order {order:g}, but the error of {measured_at} to the exact probability-flow ODE "
            f"solution shrinks at order {report.slope:.2f} (< {order:g} - {order_tolerance:g}); RMS error by steps: "
            f"{table}"
        )
    if not report.final_slope >= min(order, 1.0) - order_tolerance:
        _fail(
            f"{where}: the error of its final samples to the exact probability-flow ODE solution shrinks at "
            f"order {report.final_slope:.2f} (< {min(order, 1.0):g} - {order_tolerance:g}); RMS error by "
            f"steps: {final_table}"
        )
    if not final_errors[-1] <= max_error:
        _fail(
            f"{where}: the error of its final samples to the exact probability-flow ODE solution is "
            f"{final_errors[-1]:.3g} at {steps_list[-1]} steps (> {max_error:g}); RMS error by steps: "
            f"{final_table}"
        )


def check_distribution(bench: SamplerBench, report: SamplerReport, steps: int, samples: int, threshold: float) -> None:
    """The stochastic part of :func:`~diffreg.testing.check_sampler`: ``samples`` samples after
    ``steps`` steps within sliced Wasserstein distance ``threshold`` of max(20000, 2 n) data
    samples (fills ``report.swd`` and ``report.swd_reference``)."""
    n = int(samples)
    drawn = bench.run((n, 2), steps, seed=4)
    data = bench.mixture.sample(max(20000, 2 * n), torch.Generator().manual_seed(5))
    report.swd = sliced_wasserstein(drawn, data)
    report.swd_reference = sliced_wasserstein(bench.mixture.sample(n, torch.Generator().manual_seed(6)), data)
    if not report.swd <= threshold:
        _fail(
            f"{bench.where}: the samples do not reproduce the data distribution: sliced Wasserstein distance "
            f"{report.swd:.3g} of {n} samples after {steps} steps to {data.shape[0]} data samples "
            f"(threshold {threshold:g}; an independent data set of {n}: {report.swd_reference:.3g})"
        )
