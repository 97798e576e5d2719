"""What the conformance checks measured: :class:`SamplerReport`."""

from __future__ import annotations

from dataclasses import dataclass, field


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
        other_processes: per extra process (``check_sampler(other_processes=True)``), the final
            error to the exact ODE solution (deterministic) or the sliced Wasserstein distance
            (stochastic).
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
    other_processes: dict[str, float] = field(default_factory=dict)
