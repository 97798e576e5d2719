"""The one sampling driver: checks the call, draws x_T, runs a sampler's steps over a grid, and
owns progress, callbacks, statistics and the non-finite report."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffreg import registry
from diffreg.errors import SamplingError
from diffreg.sampling.context import SamplingContext, model_device
from diffreg.sampling.contract import Sampler
from diffreg.sampling.guidance import Guidance, resolve_guidance
from diffreg.sampling.noise import Generator, check_generator, draw_noise
from diffreg.validation import check_float_dtype, check_guidance_scale, check_tensor, resolve_device

if TYPE_CHECKING:
    from diffreg.diffusion import Diffusion


def resolve_sampler(sampler: str | Sampler, options: Mapping[str, Any]) -> Sampler:
    """A :class:`Sampler` from a registered name and its options (or an instance, unchanged).

    Raises:
        UnknownComponentError / ComponentOptionError: an unknown name or option; TypeError:
        options given with an already-built sampler.
    """
    if isinstance(sampler, Sampler):
        if options:
            raise TypeError(f"unexpected options {sorted(options)} for an already-built sampler")
        return sampler
    return registry.create("sampler", sampler, **options)


def renoising_samplers() -> list[str]:
    """Registered samplers that honour CFG++'s renoising with the unconditional eps (class
    attribute ``supports_unconditional_renoise = True``)."""
    names = []
    for component in registry.components("sampler"):
        factory = component.factory
        if getattr(factory, "supports_unconditional_renoise", False):
            names.append(component.name)
    return sorted(set(names))


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword options into the driver's (those :func:`sample_loop_progressive` takes) and
    the sampler's own (everything else, checked by the sampler's factory)."""
    return (
        {k: v for k, v in options.items() if k in DRIVER_OPTIONS},
        {k: v for k, v in options.items() if k not in DRIVER_OPTIONS},
    )


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    if (
        isinstance(shape, (str, bytes))
        or not isinstance(shape, (tuple, list, torch.Size))
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape)
    ):
        raise TypeError(f"shape must be a tuple of ints (N, C, ...), got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (N, C, ...) with every size >= 1, got {shape}")
    return shape


def sample_loop_progressive(
    diffusion: Diffusion,
    model: Any,
    shape: Sequence[int],
    *,
    sampler: str | Sampler = "ddim",
    times: Sequence[float] | None = None,
    noise: torch.Tensor | None = None,
    generator: Generator = None,
    step_noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
    noise_type: str = "gaussian",
    model_kwargs: Mapping[str, Any] | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dynamic_threshold: float | None = None,
    cond_fn: Callable[..., torch.Tensor] | None = None,
    guidance_scale: float | None = None,
    uncond_model_kwargs: Mapping[str, Any] | None = None,
    guidance: str | Mapping[str, Any] | Guidance | None = None,
    guidance_options: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    callback: Callable[[int, Any, torch.Tensor, torch.Tensor], None] | None = None,
    check_finite: bool = True,
    stats: dict[str, Any] | None = None,
    final_level: str = "data",
    **sampler_options: Any,
) -> SamplingRun:
    """Run ``sampler`` over the levels ``times`` of ``diffusion``'s process (default: every
    timestep, ``T-1`` down to ``0``, as guided-diffusion's loops), yielding
    ``{"sample", "pred_xstart", "t", "i", "nfe"}`` after each step (``t``: the network's time input
    at the step's level: the original timestep, an int, for integer levels).

    Args:
        diffusion: the process to sample.
        model: called as ``model(x, t, **model_kwargs)``; may hold fp16/bf16 weights (inputs are
            cast to its dtype, outputs back to ``dtype``).
        shape: ``(N, C, ...)`` of the samples.
        sampler: a registered name or a :class:`Sampler`; ``sampler_options`` go to its factory.
        times: the grid: strictly decreasing process times (see :mod:`diffreg.sampling.grid`).
        noise: x_T (``shape``); drawn from ``generator`` if ``None``.
        generator: a ``torch.Generator`` or one per sample (see :func:`draw_noise`).
        step_noise: explicit noise for every stochastic step, ``[num_steps, *shape]``.
        noise_type: ``"gaussian"`` (independent draws per step) or ``"brownian"`` (increments of
            one Brownian path per sample: the same seed gives the same sample at any step count,
            up to the discretisation error; see :meth:`SamplingContext.noise`).
        clip_denoised: clip pred_xstart to [-1, 1]. dynamic_threshold: a percentile in (0, 1].
        cond_fn: classifier guidance ``cond_fn(x, t, **model_kwargs) -> grad log p(y|x_t)``.
        guidance_scale: the guidance scale w (0: unconditional, 1: conditional, above 1: guided;
            ``None``: unguided). The unconditional input is ``uncond_model_kwargs``, or
            ``model_kwargs`` with ``y`` set to ``model.null_class``.
        guidance: the guidance method (kind ``guidance``; default ``cfg``, Ho & Salimans 2022): a
            registered name (``"cfg_rescale"``), ``{"name": ..., **options}`` or a
            :class:`~diffreg.sampling.guidance.Guidance`; ``guidance_options`` are its options
            (``{"phi": 0.7}``). A method given by name needs ``guidance_scale``. See docs/guidance.md.
        progress: show a tqdm bar. callback: ``callback(i, t, x, pred_xstart)`` after each step.
        check_finite: raise :class:`~diffreg.errors.SamplingError` at the end, naming the first
            step whose state became non-finite.
        stats: a dict filled at the end with ``nfe`` (model evaluations), ``steps`` and
            ``timesteps`` (the network's time inputs visited).
        final_level: where the last step goes: ``"data"`` (default; sigma = 0) or ``"t_min"``, the
            process's least noisy level, whose state is returned (diffusers' DDIM/PNDM with
            ``set_alpha_to_one=False``: the last step goes to alpha-bar[0]); any sampler, any grid
            (see :func:`~diffreg.sampling.levels.final_level`).

    Raises:
        ValueError / TypeError: bad shape, ``noise`` of the wrong shape, mismatched generators,
        bad times, a guidance method without ``guidance_scale`` or with a scale it does not accept,
        CFG++ with a sampler that does not renoise with the unconditional eps;
        UnknownComponentError / ComponentOptionError: unknown sampler, guidance or option.
    """
    shape = _check_shape(shape)
    sampler_obj = resolve_sampler(sampler, sampler_options)
    check_float_dtype(dtype, "dtype")
    if noise is not None:
        check_tensor(noise, "noise")
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
    device = resolve_device(
        device if device is not None else (noise.device if noise is not None else model_device(model))
    )
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a dict of keyword arguments, got {type(model_kwargs).__name__}")
    guidance_obj = resolve_guidance(guidance, guidance_options)
    if guidance_obj is None and guidance_scale is not None:
        check_guidance_scale(guidance_scale)
    if guidance_obj is not None:
        if guidance_scale is None:
            raise ValueError(
                f"guidance {guidance_obj!r} needs guidance_scale= (0: unconditional, 1: conditional, above 1: guided)"
            )
        guidance_obj.check_scale(guidance_scale)
        if guidance_obj.renoise_unconditional and not getattr(sampler_obj, "supports_unconditional_renoise", False):
            raise ValueError(
                f"guidance {guidance_obj!r} renoises with the unconditional eps (CFG++), which sampler "
                f"{type(sampler_obj).__name__} does not support (it has no supports_unconditional_renoise = True); "
                f"samplers that do: {', '.join(renoising_samplers()) or 'none'}"
            )
    check_generator(generator, shape[0])
    if step_noise is not None:
        for k, z in enumerate(step_noise):
            if check_tensor(z, f"step_noise[{k}]").shape != shape:
                raise ValueError(f"step_noise[{k}] has shape {tuple(z.shape)}, expected {shape}")
    for name, fn in (("cond_fn", cond_fn), ("denoised_fn", denoised_fn), ("callback", callback)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {fn!r}")
    process = diffusion.process
    if times is None:
        times = process.integer_times()
    ctx = SamplingContext(
        diffusion,
        model,
        shape,
        times=times,
        device=device,
        dtype=dtype,
        model_kwargs=model_kwargs,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        dynamic_threshold_percentile=dynamic_threshold,
        cond_fn=cond_fn,
        guidance_scale=guidance_scale,
        uncond_model_kwargs=uncond_model_kwargs,
        guidance=guidance_obj,
        generator=generator,
        step_noise=step_noise,
        noise_type=noise_type,
        check_finite=check_finite,
        final_level=final_level,
    )
    if step_noise is not None and len(step_noise) != ctx.num_steps:
        raise ValueError(f"step_noise has {len(step_noise)} entries, expected one per step ({ctx.num_steps})")
    x = noise.to(device=device, dtype=dtype) if noise is not None else draw_noise(shape, generator, device, dtype)
    if noise is None and getattr(process, "prior_std", 1.0) != 1.0:  # x_T = sigma_max z (VE processes)
        x = x.mul_(process.prior_std)
    if sampler_obj.stochastic:
        ctx.start_noise(x)  # Brownian seeds are read after x_T, before the steps
    return SamplingRun(ctx, sampler_obj, x, progress, callback, stats)


class SamplingRun(Iterator[dict[str, Any]]):
    """One sampling call, as :func:`sample_loop_progressive` returns it: an iterator yielding
    ``{"sample", "pred_xstart", "t", "i", "nfe"}`` after each step (``sample`` and ``pred_xstart``
    ``[N, C, ...]`` tensors of the state's dtype; ``t`` the network's time input), or run to the
    end at once by :meth:`run`. Iterating to the end raises
    :class:`~diffreg.errors.SamplingError` if the state became non-finite. The same contract as
    guided-diffusion's ``p_sample_loop_progressive`` generator (plus :meth:`close`)."""

    def __init__(self, ctx: SamplingContext, sampler: Sampler, x: torch.Tensor, progress: bool, callback, stats):
        self.ctx = ctx
        self.sampler = sampler
        self._x = x
        self._progress = progress
        self._callback = callback
        self._stats = stats
        self._steps: Iterator[dict[str, Any]] | None = None
        self._ran = False
        self._by_run = self._in_run = False

    def __next__(self) -> dict[str, Any]:
        if self._by_run and not self._in_run:
            raise RuntimeError("this sampling run was already run to the end by run()")
        if self._steps is None:
            if self._ran:
                raise RuntimeError("this sampling run was already run to the end by run()")
            self._ran = True
            self._steps = self._iterate()
        return next(self._steps)

    def close(self) -> None:
        """Stop iterating early (as a generator's ``close``)."""
        if self._steps is not None:
            self._steps.close()  # type: ignore[attr-defined]

    def _iterate(self) -> Iterator[dict[str, Any]]:
        ctx, callback = self.ctx, self._callback
        steps = self.sampler.steps(ctx, self._x)
        bar = tqdm(total=ctx.num_steps, desc=type(self.sampler).__name__, leave=False) if self._progress else None
        x = self._x
        try:
            for i in range(ctx.num_steps):
                with torch.no_grad():  # the sampler's code runs inside next()
                    try:
                        x, pred_xstart = next(steps)
                    except StopIteration:
                        raise SamplingError(
                            f"sampler {type(self.sampler).__name__} stopped after {i} of {ctx.num_steps} steps"
                        ) from None
                t = ctx.model_time(i)
                if callback is not None:
                    callback(i, t, x, pred_xstart)
                if bar is not None:
                    bar.update()
                yield {"sample": x, "pred_xstart": pred_xstart, "t": t, "i": i, "nfe": ctx.nfe}
        finally:
            steps.close()
            if bar is not None:
                bar.close()
        with torch.no_grad():
            ctx.record_state(x)
        self._finish()

    def run(self) -> torch.Tensor:
        """Run every step and return the final sample (``[N, C, ...]`` of the call's ``shape``,
        in the state's dtype, on its device): what :func:`sample_loop` returns.

        Raises:
            SamplingError: the state became non-finite (naming the step). RuntimeError: this run
            was already iterated or run.
        """
        if self._steps is not None or self._ran:
            raise RuntimeError("this sampling run was already iterated")
        self._by_run = self._in_run = True
        out = self._x
        try:
            for out_step in self:
                out = out_step["sample"]
        finally:
            self._in_run = False
        return out

    def _finish(self) -> None:
        ctx = self.ctx
        ctx.raise_if_nonfinite()
        if self._stats is not None:
            self._stats.update(
                nfe=ctx.nfe, steps=ctx.num_steps, timesteps=[ctx.model_time(i) for i in range(ctx.num_steps)]
            )


def sample_loop(diffusion: Diffusion, model: Any, shape: Sequence[int], **options: Any) -> torch.Tensor:
    """Run :func:`sample_loop_progressive` to the end and return the final sample (``shape``)."""
    return sample_loop_progressive(diffusion, model, shape, **options).run()


#: The keyword options that belong to the sampling driver (the rest go to the sampler's factory).
DRIVER_OPTIONS = frozenset(inspect.signature(sample_loop_progressive).parameters) - {
    "diffusion",
    "model",
    "shape",
    "sampler",
    "sampler_options",
}
