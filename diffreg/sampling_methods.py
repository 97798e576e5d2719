"""guided-diffusion's sampling methods of a Diffusion, delegating to :mod:`diffreg.sampling`.

:class:`SamplingMethods` is a base class of :class:`~diffreg.Diffusion`: the single steps
(``p_sample``, ``ddim_sample``, ``ddim_reverse_sample``), the loops over every timestep
(``p_sample_loop``, ``ddim_sample_loop`` and their ``_progressive`` forms,
``ddim_reverse_sample_loop``), and ``sample`` / ``grid_times`` for any registered sampler and grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class _DefaultSteps(int):
    """``Diffusion.sample``'s default ``steps`` (50), told apart from an explicit ``steps=50``."""

    def __repr__(self) -> str:
        return "50"


DEFAULT_STEPS = _DefaultSteps(50)


class SamplingMethods:
    """The sampling half of :class:`~diffreg.Diffusion` (see the module docstring)."""

    def p_sample(self, model, x, t, **options) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (Ho et al. 2020, Algorithm 2).

        Options (guided-diffusion's names): ``clip_denoised=True``, ``denoised_fn=None``,
        ``cond_fn=None``, ``model_kwargs=None``, ``noise=None`` (the step's z, drawn if None),
        ``generator=None``. ``t`` is int64 ``[N]``; no noise is added where ``t == 0``.
        ``cond_fn(x, t, **model_kwargs)`` shifts the mean by variance * gradient (Dhariwal &
        Nichol 2021, Algorithm 1). Returns dict with ``sample`` and ``pred_xstart`` (``x``'s shape).
        """
        from diffreg.sampling import single_step

        return single_step.p_sample(self, model, x, t, **options)

    def ddim_sample(self, model, x, t, **options) -> dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12).

        Options: as :meth:`p_sample`, plus ``eta=0.0`` (stochasticity in [0, 1], eq. 16).
        ``cond_fn`` conditions the score (Dhariwal & Nichol 2021, Algorithm 2). Returns dict with
        ``sample`` and ``pred_xstart``.
        """
        from diffreg.sampling import single_step

        return single_step.ddim_sample(self, model, x, t, **options)

    def ddim_reverse_sample(self, model, x, t, **options) -> dict[str, torch.Tensor]:
        """One deterministic DDIM inversion step x_t -> x_{t+1} (Song et al. 2021, eq. 13 run
        forward). Options: ``clip_denoised=True``, ``denoised_fn=None``, ``model_kwargs=None``,
        ``eta=0.0`` (only 0 is defined). Returns dict with ``sample`` and ``pred_xstart``.
        """
        from diffreg.sampling import single_step

        return single_step.ddim_reverse_sample(self, model, x, t, **options)

    def p_sample_loop(self, model, shape, noise=None, **options) -> torch.Tensor:
        """Ancestral sampling over every timestep of this process (guided-diffusion's
        ``p_sample_loop``); ``noise`` is x_T. Options as :func:`diffreg.sampling.sample_loop`."""
        from diffreg.sampling import sample_loop

        return sample_loop(self, model, shape, sampler="ddpm", noise=noise, **options)

    def p_sample_loop_progressive(self, model, shape, noise=None, **options):
        """Like :meth:`p_sample_loop` but yields a dict (``sample``, ``pred_xstart``, ``t``, ``i``)
        after every step."""
        from diffreg.sampling import sample_loop_progressive

        return sample_loop_progressive(self, model, shape, sampler="ddpm", noise=noise, **options)

    def ddim_sample_loop(self, model, shape, noise=None, eta=0.0, **options) -> torch.Tensor:
        """DDIM sampling over every timestep of this process (respace first for fewer steps)."""
        from diffreg.sampling import sample_loop

        return sample_loop(self, model, shape, sampler="ddim", noise=noise, eta=eta, **options)

    def ddim_sample_loop_progressive(self, model, shape, noise=None, eta=0.0, **options):
        """Like :meth:`ddim_sample_loop`, yielding a dict after every step."""
        from diffreg.sampling import sample_loop_progressive

        return sample_loop_progressive(self, model, shape, sampler="ddim", noise=noise, eta=eta, **options)

    def ddim_reverse_sample_loop(self, model, x, **options) -> torch.Tensor:
        """Deterministic DDIM inversion of data ``x`` to noise x_T over every timestep of this
        process (respace first for fewer steps)."""
        from diffreg.sampling import single_step

        return single_step.ddim_reverse_sample_loop(self, model, x, **options)

    def grid_times(self, steps: int | None = None, grid: Any = None, sampler: Any = None) -> np.ndarray:
        """The process times a sampling call visits: every timestep for ``steps=None``, else
        ``steps`` levels of ``grid`` (a registered name such as ``trailing`` or ``karras``, a dict
        with ``name`` and options, a list of times, or a :class:`~diffreg.sampling.Grid`; default:
        the sampler's own ``grid``, else ``trailing``). float64, strictly decreasing.

        Raises:
            UnknownComponentError: an unknown grid; ValueError / TypeError: a bad ``steps``, or
            ``steps=None`` without an explicit grid on a continuous process (it has no "every
            timestep").
        """
        from diffreg.sampling import resolve_grid

        if steps is None and grid is None and self.process.discrete:
            return self.process.integer_times()
        if grid is None:
            grid = getattr(sampler, "grid", None) or "trailing"
        grid_obj = resolve_grid(grid)
        if steps is None:
            explicit = grid_obj.fixed_steps()
            if explicit is None and not self.process.discrete:
                raise ValueError(
                    f"{self.process!r} is continuous: give steps= (there is no 'every timestep'), or an explicit grid"
                )
            steps = explicit if explicit is not None else self.num_timesteps
        return grid_obj(self.process, steps)

    def sample(
        self,
        model,
        shape,
        sampler: Any = "ddim",
        steps: int | None = DEFAULT_STEPS,
        spacing: str | None = None,
        grid: Any = None,
        **options,
    ) -> torch.Tensor:
        """Sample with any registered sampler (a name, or a built :class:`~diffreg.Sampler`) over
        ``steps`` noise levels of ``grid`` (see :meth:`grid_times`; ``spacing`` is the older
        spelling of the three spacing grids ``leading``, ``trailing``, ``linspace``;
        ``steps=None``: every timestep). An explicit grid (a list of times) without ``steps``
        has its own length; other grids default to 50 steps.

        ``options`` are the driver's (``noise``, ``generator``, ``model_kwargs``,
        ``guidance_scale``, ``progress``, ...; see :func:`diffreg.sampling.sample_loop`) and the
        sampler's own (e.g. ``eta``). Returns float32 samples of ``shape``.

        Raises:
            ValueError: ``steps`` outside [1, T], an unknown spacing, both ``spacing`` and
            ``grid``; UnknownComponentError for an unknown sampler or grid; ComponentOptionError
            for an option neither accepts.
        """
        from diffreg.sampling import resolve_sampler, sample_loop, split_options

        if spacing is not None:
            if grid is not None:
                raise ValueError(f"give grid= or spacing= (its older spelling), not both: {grid!r} and {spacing!r}")
            if spacing not in ("leading", "trailing", "linspace"):
                raise ValueError(f"unknown spacing {spacing!r}; accepted: leading, trailing, linspace")
            grid = spacing
        driver_options, sampler_options = split_options(options)
        sampler_obj = resolve_sampler(sampler, sampler_options)
        if steps is DEFAULT_STEPS:  # not given: an explicit grid's own length, else 50
            from diffreg.sampling.grid import explicit_length

            steps = None if grid is not None and explicit_length(grid) is not None else int(steps)
        times = self.grid_times(steps, grid, sampler_obj)
        return sample_loop(self, model, shape, sampler=sampler_obj, times=times, **driver_options)
