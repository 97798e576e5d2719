"""check_sampler: a sampler against the exact probability-flow ODE solution and the data distribution.

The pieces: :mod:`~diffreg.testing.checks.sampler_bench` (where it runs: exact models on one
process), :mod:`~diffreg.testing.checks.convergence` (what is measured); here, what the sampler
declares, the checks of its outputs, and the passes over the processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffreg import registry
from diffreg.sampling import Sampler
from diffreg.testing.checks._common import _fail
from diffreg.testing.checks.convergence import (
    assumed_warmup,
    check_convergence,
    check_distribution,
    default_steps,
    ode_errors,
)
from diffreg.testing.checks.sampler_bench import SamplerBench
from diffreg.testing.mixture import GaussianMixture
from diffreg.testing.report import SamplerReport

#: The extra processes of ``other_processes``: (label, configuration, parameterization).
OTHER_PROCESSES: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("cosine T=1000", {"schedule": "cosine", "num_timesteps": 1000}, "eps"),
    ("linear T=100", {"schedule": "linear", "num_timesteps": 100}, "eps"),
    (
        "zero terminal SNR (v)",
        {"schedule": {"name": "linear", "rescale_zero_terminal_snr": True}, "num_timesteps": 1000},
        "v",
    ),
)


def _declared(instance: Any, metadata: Mapping[str, Any], key: str) -> Any:
    """``key`` from the instance or a class below :class:`Sampler`, else the registration metadata."""
    if key in vars(instance) or any(key in vars(cls) for cls in type(instance).__mro__ if cls not in (Sampler, object)):
        return getattr(instance, key)
    return metadata.get(key)


def _declarations(name: str, options: Mapping[str, Any], where: str, expected_order: float | None):
    """Build the sampler; return ``(instance, order, nfe_per_step, stochastic, warmup_steps)``
    as it declares them (AssertionError naming what is missing or wrong)."""
    try:
        component = registry.get("sampler", name)
        instance = registry.create("sampler", name, **options)
    except Exception as exc:
        raise AssertionError(f"{where}: building it raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(instance, Sampler):
        _fail(f"{where}: the factory returned {type(instance).__name__}, not a diffreg.Sampler")
    order = expected_order if expected_order is not None else _declared(instance, component.metadata, "order")
    nfe = _declared(instance, component.metadata, "nfe_per_step")
    if isinstance(order, bool) or not isinstance(order, (int, float)) or not order > 0:
        _fail(f"{where}: declares no valid `order` (a number > 0 as a class attribute or metadata), got {order!r}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        _fail(f"{where}: declares no valid `nfe_per_step` (an int >= 1), got {nfe!r}")
    stochastic = _declared(instance, component.metadata, "stochastic")
    if not isinstance(stochastic, bool):  # metadata such as "when eta > 0": the instance decides
        stochastic = getattr(instance, "stochastic", None)
    if not isinstance(stochastic, bool):
        _fail(f"{where}: declares no boolean `stochastic` (instance attribute or metadata), got {stochastic!r}")
    warmup = getattr(instance, "warmup_steps", None)
    if warmup is None:
        warmup = assumed_warmup(order)
    elif isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        _fail(f"{where}: declares `warmup_steps` = {warmup!r}; accepted: an int >= 0 (or None: not declared)")
    return instance, float(order), nfe, stochastic, int(warmup)


def _check_outputs(bench: SamplerBench, report: SamplerReport, steps: int, nfe: int) -> None:
    """Model calls, shape, dtype, device, finiteness, reproducibility, image vs flat shapes, and
    the same samples from every parameterization's exact model."""
    where, device = bench.where, bench.device
    calls: list[int] = []
    flat = bench.run((8, 2), steps, seed=1, calls=calls)
    report.model_calls = len(calls)
    if not 1 <= len(calls) <= steps * nfe:
        _fail(
            f"{where}: declares nfe_per_step={nfe} but called the model {len(calls)} times in {steps} steps "
            f"(at most {steps * nfe})"
        )
    if not isinstance(flat, torch.Tensor) or flat.shape != (8, 2):
        _fail(f"{where}: sampling shape [8, 2] returned {getattr(flat, 'shape', type(flat).__name__)}")
    if flat.dtype != torch.float32:
        _fail(f"{where}: the samples are {flat.dtype}, expected the driver's dtype float32")
    if flat.device != device:
        _fail(f"{where}: the samples are on {flat.device}, expected {device}")
    if not bool(torch.isfinite(flat).all()):
        _fail(f"{where}: the samples are not finite: {flat.tolist()}")
    if not torch.equal(flat, bench.run((8, 2), steps, seed=1)):
        _fail(f"{where}: not reproducible: the same noise and generator gave different samples")
    mix4 = GaussianMixture.example(4)
    image = bench.run((8, 1, 2, 2), steps, seed=2, mix=mix4)
    if image.shape != (8, 1, 2, 2) or image.dtype != torch.float32 or not bool(torch.isfinite(image).all()):
        _fail(f"{where}: sampling shape [8, 1, 2, 2] gave {image.dtype} {list(image.shape)} (or non-finite values)")
    flat4 = bench.run((8, 4), steps, seed=2, mix=mix4)
    if not torch.allclose(image.reshape(8, 4), flat4, rtol=0, atol=1e-5):
        _fail(f"{where}: samples of shape [8, 1, 2, 2] differ from the same samples drawn as [8, 4]")
    for mean_type in [m for m in bench.bases if m != bench.main]:
        other = bench.run((8, 2), steps, seed=1, mean_type=mean_type)
        err = float((other - flat).abs().max())
        if not err <= 1e-3:
            _fail(
                f"{where}: with the {mean_type} parameterization the samples differ from {bench.main}'s by {err:.3g} "
                "(the exact models agree, so a sampler must use the Prediction, not the raw model output)"
            )


def _check_other_processes(
    name: str,
    options: Mapping[str, Any],
    where: str,
    device: torch.device,
    instance: Any,
    report: SamplerReport,
    stochastic: bool,
    steps_list: list[int],
    max_error: float,
    distribution_steps: int,
    distribution_samples: int,
    swd_threshold: float,
) -> None:
    """The ``other_processes`` pass (see :func:`check_sampler`)."""
    for label, config, parameterization in OTHER_PROCESSES:
        try:
            _check_other_process(
                name, options, f"{where} on {label}", device, instance, report, label, config, parameterization,
                stochastic, steps_list, max_error, distribution_steps, distribution_samples, swd_threshold,
            )  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(
                f"{exc} (check_sampler(..., other_processes=False) checks only guided-diffusion's linear process)"
            ) from exc.__cause__


def _check_other_process(
    name, options, here, device, instance, report, label, config, parameterization,
    stochastic, steps_list, max_error, distribution_steps, distribution_samples, swd_threshold,
) -> None:  # fmt: skip
    """One process of the ``other_processes`` pass."""
    bench = SamplerBench(name, options, here, device, config, parameterization, compare=False)
    T = bench.diffusion.num_timesteps
    if stochastic:
        part = SamplerReport(report.name, report.order, report.nfe_per_step, True)
        check_distribution(bench, part, min(distribution_steps, T), distribution_samples, swd_threshold)
        report.other_processes[label] = float(part.swd or 0.0)
        return
    steps = max([s for s in steps_list if s <= T] or [T])
    _, final = ode_errors(bench, [steps], [bench.grid_times(steps, instance)], None)
    report.other_processes[label] = final[0]
    if not final[0] <= max_error:
        _fail(
            f"{here}: the error of its final samples to the exact probability-flow ODE solution is "
            f"{final[0]:.3g} at {steps} steps (> {max_error:g})"
        )


def check_sampler(
    name: str,
    /,
    *,
    expected_order: float | None = None,
    order_tolerance: float = 0.3,
    convergence_steps: Sequence[int] | None = None,
    max_error: float = 0.05,
    distribution_steps: int = 100,
    distribution_samples: int = 10000,
    swd_threshold: float = 0.045,
    device: str | torch.device = "cpu",
    process: str | Mapping[str, Any] | None = None,
    parameterization: str = "eps",
    grid: Any = None,
    other_processes: bool = True,
    **options: Any,
) -> SamplerReport:
    """Check a sampler (kind ``sampler``) with the exact model of a 2-D :class:`GaussianMixture`
    (:meth:`GaussianMixture.example`) on a linear T = 1000 process, trailing spacing, no clipping.

    - It is a :class:`~diffreg.Sampler` declaring ``order`` (> 0), ``nfe_per_step`` (int >= 1) and
      ``stochastic`` (bool), each on its class or instance (other than :class:`~diffreg.Sampler`'s
      defaults) or else as registration metadata (non-bool metadata such as DDIM's
      ``"when eta > 0"`` leaves ``stochastic`` to the instance: a sampler that is stochastic only
      for some options sets ``self.stochastic`` in ``__init__``, as DDIM's ``eta > 0``); it
      calls the model at most ``steps * nfe_per_step`` times. ``warmup_steps``, when declared,
      is an int >= 0.
    - Shapes ``[N, D]`` and ``[N, C, H, W]``: float32 samples of that shape on ``device``, finite;
      the image-shaped run equals the flat run reshaped; the same noise and generator give identical
      samples; the eps, x0 and v parameterizations give the same samples (to 1e-3).
    - Deterministic samplers, run in float64 from the same x_T (64 points): the state at
      ``stop_timestep`` (the smallest timestep > 0 that every grid of ``convergence_steps`` visits:
      99 for the default 10, 20, 40, 80) is compared with :func:`exact_ode_solution`; the RMS error
      must shrink with slope (least-squares fit of log error against log steps) >= declared order -
      ``order_tolerance``. The final samples are compared with the exact solution at sigma = 0:
      their error must shrink with slope >= min(order, 1) - ``order_tolerance`` and be below
      ``max_error`` at the most steps. (The last step, from t ~ T/N to data, is where sigma ~ sqrt(t)
      makes every sampler first order on a uniform grid of t, hence the intermediate stop for the
      order.) Calibration: DDIM measures slope 1.00 (final 0.94, final error 0.014 at 80 steps);
      second-order Heun (Karras et al. 2022, Algorithm 1) 2.12, DPM-Solver++(2M) 1.88, UniPC 2.28;
      DDIM with its x_t coefficient 1 % off -1.2; DDIM declaring order 2 fails at 1.00.
    - Stochastic samplers: ``distribution_samples`` samples after ``distribution_steps`` steps must
      lie within sliced Wasserstein distance ``swd_threshold`` (:func:`sliced_wasserstein`) of
      max(20000, 2 n) data samples. Calibration (10000 samples, 100 steps): DDPM and DDIM(eta=1)
      0.021 (0.021-0.026 over seeds; 0.035-0.037 at 50 steps); an independent data set of 10000:
      0.011 on average, 0.023 at most over 60 seeds; DDPM with its noise scaled by 1.5: 0.07-0.08,
      by 2: 0.16. (With 2000 samples the data-vs-data distance alone reaches 0.05: too noisy.)

    - ``process=``: another process instead of the linear T = 1000 one, as a ``schedule`` config
      (a name or ``{"name": ..., **options}``, e.g. ``"rectified_flow"`` or ``{"name": "edm"}``);
      the exact model then predicts in ``parameterization`` form (e.g. ``"flow"`` or ``"edm"``),
      the other parameterizations the process accepts must give the same samples, x_T is drawn
      with the process's ``prior_std``, and the levels are ``grid``'s (default ``trailing``).
      Where the grids of ``convergence_steps`` share no intermediate level (e.g. ``karras``), the
      declared order is checked on the final samples.

    Keyword arguments other than those listed are the sampler's options (for example ``eta``).

    Args:
        name: a registered sampler name (bare or ``plugin:name``).
        expected_order: overrides the declared order.
        convergence_steps: at least 2 step counts, each grid sharing a timestep > 0 with the others
            (multiples of the smallest do). Default: chosen from the declared warm-up (the
            sampler's ``warmup_steps``: lower-order steps at the start, as a multistep solver of
            order p takes p - 1; undeclared: p - 1 from order 2.5 on, else 0): 10, 20, 40, 80 for
            fewer than 2 warm-up steps; 40, 80, 160, 320 otherwise, where the warm-up steps would
            dominate the error at 10-80 steps. Calibration: DEIS (tAB3) measures 2.54 at 10-80 and
            2.87 at 40-320, DPM-Solver++(3M) 2.32 and 2.94, DPM-Solver-3 (single step, no warm-up)
            2.82 at 10-80.
        other_processes: with the default process, also run the sampler on three more (unless
            ``process`` is given): the cosine schedule (T = 1000, eps), the linear schedule at
            T = 100 (eps) and the linear schedule rescaled to zero terminal SNR (Lin et al. 2024;
            T = 1000, the v parameterization, since eps cannot give x0 where alpha = 0). There a
            deterministic sampler's final samples must lie within ``max_error`` of the exact ODE
            solution at the most steps of ``convergence_steps`` that the process has, and a
            stochastic one's within ``swd_threshold`` of the data; results in
            ``SamplerReport.other_processes``.
        device: where to sample (the exact model follows the data's device).

    Returns:
        A :class:`SamplerReport` with the measured numbers.

    Raises:
        AssertionError: naming the sampler and what failed (also when sampling raised).
        ValueError: ``convergence_steps`` without a shared timestep.
        ImportError: scipy (needed for the ODE reference) is not installed.
    """
    where = f"sampler {name!r}" + (f" with options {options}" if options else "")
    instance, order, nfe, stochastic, warmup = _declarations(name, options, where, expected_order)
    report = SamplerReport(str(name), order, int(nfe), bool(stochastic))
    device = torch.device(device)
    bench = SamplerBench(name, options, where, device, process, parameterization, grid)
    steps_list = sorted({int(s) for s in (convergence_steps or default_steps(order, warmup))})
    if len(steps_list) < 2:
        raise ValueError(f"convergence_steps needs at least 2 different step counts, got {convergence_steps}")
    _check_outputs(bench, report, steps_list[0], nfe)
    if stochastic:
        check_distribution(bench, report, distribution_steps, distribution_samples, swd_threshold)
    else:
        check_convergence(bench, instance, report, steps_list, order, order_tolerance, max_error)
    if other_processes and process is None:
        _check_other_processes(
            name, options, where, device, instance, report, stochastic, steps_list, max_error,
            distribution_steps, distribution_samples, swd_threshold,
        )  # fmt: skip
    return report
