"""check_sampler: a sampler against the exact probability-flow ODE solution and the data distribution."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffreg import registry
from diffreg.diffusion import Diffusion
from diffreg.sampling import Sampler
from diffreg.schedule import spaced_timesteps
from diffreg.testing.checks._common import _diffusion, _fail, _linear_betas
from diffreg.testing.distances import sliced_wasserstein
from diffreg.testing.mixture import GaussianMixture
from diffreg.testing.ode import exact_ode_solution


def _declared(instance: Any, metadata: Mapping[str, Any], key: str) -> Any:
    """``key`` from the instance or a class below :class:`Sampler`, else the registration metadata."""
    if key in vars(instance) or any(key in vars(cls) for cls in type(instance).__mro__ if cls not in (Sampler, object)):
        return getattr(instance, key)
    return metadata.get(key)


@dataclass
class SamplerReport:
    """What :func:`check_sampler` measured.

    Attributes:
        name: the sampler; order, nfe_per_step, stochastic: as declared.
        steps: step counts of the convergence study (deterministic samplers).
        stop_timestep: the timestep every one of those grids visits, where ``errors`` is measured.
        errors: RMS distance of the state at ``stop_timestep`` to :func:`exact_ode_solution`
            (``t_end=stop_timestep``), per step count (float64 runs).
        slope: the fitted convergence order of ``errors``, -d log(error) / d log(steps).
        final_errors, final_slope: the same for the final samples against the exact solution at
            sigma = 0.
        model_calls: model evaluations in a run of ``steps[0]`` steps (at most
            ``steps[0] * nfe_per_step``).
        swd: sliced Wasserstein distance of the samples to the data (stochastic samplers), and
            ``swd_reference``: the same distance for an independent data set of the same size.
    """

    name: str
    order: float
    nfe_per_step: int
    stochastic: bool
    steps: list[int] = field(default_factory=list)
    stop_timestep: int | None = None
    errors: list[float] = field(default_factory=list)
    slope: float | None = None
    final_errors: list[float] = field(default_factory=list)
    final_slope: float | None = None
    model_calls: int | None = None
    swd: float | None = None
    swd_reference: float | None = None


def _slope(steps: Sequence[int], errors: Sequence[float]) -> float:
    return -float(np.polyfit(np.log(np.asarray(steps, dtype=np.float64)), np.log(np.asarray(errors)), 1)[0])


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
    **options: Any,
) -> SamplerReport:
    """Check a sampler (kind ``sampler``) with the exact model of a 2-D :class:`GaussianMixture`
    (:meth:`GaussianMixture.example`) on a linear T = 1000 process, trailing spacing, no clipping.

    - It is a :class:`~diffreg.Sampler` declaring ``order`` (> 0), ``nfe_per_step`` (int >= 1) and
      ``stochastic`` (bool), each on its class or instance (other than :class:`~diffreg.Sampler`'s
      defaults) or else as registration metadata (non-bool metadata such as DDIM's
      ``"when eta > 0"`` leaves ``stochastic`` to the instance); it calls the model at most
      ``steps * nfe_per_step`` times.
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
            (multiples of the smallest do). Default: chosen from the declared order: 10, 20, 40, 80
            below order 2.5; 40, 80, 160, 320 from order 2.5 on, where the lower-order warm-up
            steps of a multistep solver (its first steps, one order less each) would otherwise
            dominate the error at 10-80 steps. Calibration: DEIS (tAB3) measures 2.54 at 10-80 and
            2.87 at 40-320, DPM-Solver++(3M) 2.32 and 2.94, DPM-Solver-3 (single step) 2.82 at 10-80.
        device: where to sample (the exact model follows the data's device).

    Returns:
        A :class:`SamplerReport` with the measured numbers.

    Raises:
        AssertionError: naming the sampler and what failed (also when sampling raised).
        ValueError: ``convergence_steps`` without a shared timestep.
        ImportError: scipy (needed for the ODE reference) is not installed.
    """
    where = f"sampler {name!r}" + (f" with options {options}" if options else "")
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
    report = SamplerReport(str(name), float(order), int(nfe), bool(stochastic))
    device = torch.device(device)
    T = 1000
    if process is None:
        betas = _linear_betas(T)
        bases = {m: _diffusion(betas, m) for m in ("eps", "x0", "v")}
        main = "eps"
    else:
        bases = {}
        for m in dict.fromkeys((parameterization, "eps", "x0", "v", "flow", "edm")):
            try:
                bases[m] = Diffusion.from_config({"schedule": process, "parameterization": m})
            except ValueError:
                if m == parameterization:
                    raise
        main = parameterization
    the_process = bases[main].process
    t_top = the_process.t_max
    prior_std = float(getattr(the_process, "prior_std", 1.0))
    grid_kw: dict[str, Any] = {"spacing": "trailing"} if process is None and grid is None else {"grid": grid}
    mixture = GaussianMixture.example(2)

    def run(
        mean_type: str,
        shape: Sequence[int],
        steps: int,
        seed: int,
        dtype: torch.dtype = torch.float32,
        mix: GaussianMixture = mixture,
        callback: Callable[..., None] | None = None,
        calls: list[int] | None = None,
    ) -> torch.Tensor:
        base = bases[mean_type]
        gen = torch.Generator().manual_seed(seed)
        noise = (torch.randn(tuple(shape), generator=gen, dtype=dtype) * prior_std).to(device)
        exact = mix.denoiser(base, mean_type)

        def model(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if calls is not None:
                calls.append(int(t[0]))
            return exact(x, t, **kwargs)

        try:
            return base.sample(
                model,
                tuple(shape),
                sampler=name,
                steps=steps,
                noise=noise,
                generator=gen,
                clip_denoised=False,
                dtype=dtype,
                callback=callback,
                **grid_kw,
                **options,
            )
        except Exception as exc:
            raise AssertionError(
                f"{where}: sampling {list(shape)} ({mean_type} parameterization, {steps} steps, {dtype}) raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    if convergence_steps is None:
        convergence_steps = (10, 20, 40, 80) if order < 2.5 else (40, 80, 160, 320)
    steps_list = sorted({int(s) for s in convergence_steps})
    if len(steps_list) < 2:
        raise ValueError(f"convergence_steps needs at least 2 different step counts, got {convergence_steps}")
    # the sampler's own grids (a sampler with a sigma grid chooses its timesteps)
    grids = [
        sorted(round(v, 9) for v in bases[main].grid_times(s, grid, instance).tolist()) for s in steps_list
    ]
    shared = sorted(set.intersection(*(set(g) for g in grids)) - {0, round(t_top, 9)})
    if (
        process is None
        and not shared
        and all(g == spaced_timesteps(T, s, "trailing") for g, s in zip(grids, steps_list, strict=True))
    ):
        raise ValueError(
            f"the trailing grids of convergence_steps {steps_list} share no timestep other than the first; "
            "use multiples of the smallest count"
        )
    # where the grids share no intermediate timestep (their own sigma grids), only the final
    # samples are compared
    stop = shared[0] if shared else None
    visited_steps = [len(g) for g in grids]

    steps0 = steps_list[0]
    calls: list[int] = []
    flat = run(main, (8, 2), steps0, seed=1, calls=calls)
    report.model_calls = len(calls)
    if not 1 <= len(calls) <= steps0 * nfe:
        _fail(
            f"{where}: declares nfe_per_step={nfe} but called the model {len(calls)} times in {steps0} steps "
            f"(at most {steps0 * nfe})"
        )
    if not isinstance(flat, torch.Tensor) or flat.shape != (8, 2):
        _fail(f"{where}: sampling shape [8, 2] returned {getattr(flat, 'shape', type(flat).__name__)}")
    if flat.dtype != torch.float32:
        _fail(f"{where}: the samples are {flat.dtype}, expected the driver's dtype float32")
    if flat.device != device:
        _fail(f"{where}: the samples are on {flat.device}, expected {device}")
    if not bool(torch.isfinite(flat).all()):
        _fail(f"{where}: the samples are not finite: {flat.tolist()}")
    if not torch.equal(flat, run(main, (8, 2), steps0, seed=1)):
        _fail(f"{where}: not reproducible: the same noise and generator gave different samples")
    mix4 = GaussianMixture.example(4)
    image = run(main, (8, 1, 2, 2), steps0, seed=2, mix=mix4)
    if image.shape != (8, 1, 2, 2) or image.dtype != torch.float32 or not bool(torch.isfinite(image).all()):
        _fail(f"{where}: sampling shape [8, 1, 2, 2] gave {image.dtype} {list(image.shape)} (or non-finite values)")
    flat4 = run(main, (8, 4), steps0, seed=2, mix=mix4)
    if not torch.allclose(image.reshape(8, 4), flat4, rtol=0, atol=1e-5):
        _fail(f"{where}: samples of shape [8, 1, 2, 2] differ from the same samples drawn as [8, 4]")
    for mean_type in [m for m in bases if m != main]:
        other = run(mean_type, (8, 2), steps0, seed=1)
        err = float((other - flat).abs().max())
        if not err <= 1e-3:
            _fail(
                f"{where}: with the {mean_type} parameterization the samples differ from {main}'s by {err:.3g} "
                "(the exact models agree, so a sampler must use the Prediction, not the raw model output)"
            )

    if not stochastic:
        n = 64
        x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * prior_std
        reference = exact_ode_solution(mixture, bases[main], x_T, t_start=t_top)
        reference_stop = (
            exact_ode_solution(mixture, bases[main], x_T, t_start=t_top, t_end=stop) if stop is not None else None
        )
        errors, final_errors = [], []
        for steps, grid in zip(steps_list, grids, strict=True):
            states: dict[int, torch.Tensor] = {}
            visit = grid[::-1]  # the state after step i is at visit[i + 1]

            def record(
                i: int,
                t: int,
                x: torch.Tensor,
                pred_xstart: torch.Tensor,
                _visit: list[int] = visit,
                _states: dict[int, torch.Tensor] = states,
            ) -> None:
                if i + 1 < len(_visit) and _visit[i + 1] == stop:
                    _states[stop] = x.detach().clone()

            out = run(main, (n, 2), steps, seed=3, dtype=torch.float64, callback=record)
            if out.dtype != torch.float64:
                _fail(f"{where}: sampling in float64 returned {out.dtype}; a step must keep x's dtype")
            final_errors.append(float(((out.cpu() - reference) ** 2).mean().sqrt()))
            if stop is not None and reference_stop is not None:
                errors.append(float(((states[stop].cpu() - reference_stop) ** 2).mean().sqrt()))
        report.steps, report.stop_timestep, report.errors, report.final_errors = (
            visited_steps,
            stop,
            errors,
            final_errors,
        )
        for what, errs in ((f"the state at timestep {stop}", errors), ("the final samples", final_errors)):
            if not all(math.isfinite(e) and e > 0 for e in errs):
                _fail(f"{where}: error of {what} to the exact ODE solution is not finite and positive: {errs}")
        report.final_slope = _slope(visited_steps, final_errors)
        # no shared intermediate level (e.g. karras grids): the order is measured on the final samples
        report.slope = _slope(visited_steps, errors) if errors else (report.final_slope if process is not None else None)
        table = ", ".join(f"{s}: {e:.3g}" for s, e in zip(visited_steps, errors, strict=False))
        final_table = ", ".join(f"{s}: {e:.3g}" for s, e in zip(visited_steps, final_errors, strict=True))
        if report.slope is not None and not report.slope >= order - order_tolerance:
            _fail(
                f"{where}: declares order {order:g}, but the error of "
                f"{'its state at timestep ' + str(stop) if stop is not None else 'its final samples'} to the exact "
                f"probability-flow ODE solution shrinks at order {report.slope:.2f} (< {order:g} - "
                f"{order_tolerance:g}); RMS error by steps: {table}"
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
    else:
        n = int(distribution_samples)
        samples = run(main, (n, 2), distribution_steps, seed=4)
        data = mixture.sample(max(20000, 2 * n), torch.Generator().manual_seed(5))
        report.swd = sliced_wasserstein(samples, data)
        report.swd_reference = sliced_wasserstein(mixture.sample(n, torch.Generator().manual_seed(6)), data)
        if not report.swd <= swd_threshold:
            _fail(
                f"{where}: the samples do not reproduce the data distribution: sliced Wasserstein distance "
                f"{report.swd:.3g} of {n} samples after {distribution_steps} steps to {data.shape[0]} data samples "
                f"(threshold {swd_threshold:g}; an independent data set of {n}: {report.swd_reference:.3g})"
            )
    return report
