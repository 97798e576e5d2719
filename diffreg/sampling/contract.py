"""The sampler contract (kind ``sampler``).

A sampler is a short generator over the :class:`~diffreg.sampling.SamplingContext`: for each step
``i`` it asks the denoiser for a prediction at any noise level and yields the next state. It never
reads timestep tables; the grid's levels (``ctx.levels``: ``alpha``, ``sigma``, ``log_snr`` and
``t``, float64, ``num_steps + 1`` entries, the last the data level with sigma = 0) say where it is.
Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without the
correction; = deterministic DDIM) is the whole example::

    class Euler(diffreg.Sampler):
        order, nfe_per_step, stochastic = 1, 1, False

        def steps(self, ctx, x):
            lv = ctx.levels
            for i in range(ctx.num_steps):
                x0 = ctx.denoise(x, i).pred_xstart  # or ctx.denoise(x, ctx.level_at(log_snr=...))
                ratio = lv.sigma[i + 1] / lv.sigma[i]
                x = ratio * x + (lv.alpha[i + 1] - ratio * lv.alpha[i]) * x0
                yield x, x0
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffreg.sampling.context import SamplingContext


class Sampler(abc.ABC):  # noqa: B024 (either steps() or step() is implemented)
    """Base class of samplers.

    Class attributes (read by the registry and the conformance kit; an instance may override
    them from its options): ``order`` (convergence order of the deterministic update),
    ``nfe_per_step`` (model evaluations per step, at most), ``stochastic`` (whether it draws noise;
    a sampler that is stochastic only for some options sets ``self.stochastic`` in ``__init__``,
    as DDIM does with ``self.stochastic = eta > 0``), ``warmup_steps`` (how many of its first steps
    run at a lower order, as a multistep solver of order p takes p - 1 while its history fills;
    ``None``: not declared, and :func:`diffreg.testing.check_sampler` assumes p - 1 from order
    2.5 on; it picks finer step counts for 2 or more).
    ``grid``: the grid this sampler uses when the caller names none (``None``: the caller's
    default, ``trailing``). ``supports_unconditional_renoise``: the sampler renoises from
    ``ctx.renoise(x, pred)`` (or uses ``pred.renoise_eps``) when ``ctx.renoise_unconditional``
    is set, so CFG++-style guidance (Chung et al. 2024) works with it; others are refused for
    such guidance. ``host_reads_per_step``: the sampler reads tensor values on the host inside
    its steps (adaptive step-size control reads its error estimate); every other sampler keeps
    per-step work on the device (no ``.item()``, ``.cpu()`` or branching on tensor values), which
    the test suite checks for every registered sampler that does not declare this.

    Implement :meth:`steps` (the generator form, preferred), or :meth:`prepare` and :meth:`step`
    (the step form: per-call state from ``prepare``, then one call per step).
    """

    order: int = 1
    nfe_per_step: int = 1
    stochastic: bool = False
    warmup_steps: int | None = None
    grid: Any = None
    supports_unconditional_renoise: bool = False
    host_reads_per_step: bool = False

    def steps(self, ctx: SamplingContext, x: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Run the sampler from ``x`` (float ``[N, ...]`` at ``ctx.levels`` level 0), yielding
        ``(x_next, pred_xstart)`` after each of the ``ctx.num_steps`` steps (``x``'s shape and
        dtype). The default drives :meth:`prepare` and :meth:`step`."""
        state = self.prepare(ctx)
        for i in range(ctx.num_steps):
            x, pred_xstart = self.step(ctx, state, i, x)
            yield x, pred_xstart

    def prepare(self, ctx: SamplingContext) -> Any:
        """Per-call state of the step form (coefficients, history); called once before step 0."""
        return None

    def step(self, ctx: SamplingContext, state: Any, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step form: advance ``x`` from level ``i`` to level ``i + 1``; ``(x_next, pred_xstart)``.

        Raises:
            NotImplementedError: the sampler implements neither :meth:`steps` nor this.
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither steps() nor step()")

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({options})"
