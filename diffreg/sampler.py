"""The Sampler interface and the one sampling driver every sampler shares.

A sampler (kind ``sampler``) only says how to move from step ``i`` to step ``i + 1``
(:meth:`Sampler.step`); the driver (:func:`sample_loop_progressive`) owns everything else: the
initial noise, seeding (one generator, or one per sample), explicit per-step noise, classifier-free
and classifier guidance, clipping and dynamic thresholding, the model's dtype, the progress bar,
callbacks, and the non-finite check. Per-step work stays on the device: nothing in the loop reads a
tensor value on the host (the non-finite check is recorded on the device and read once at the end).
"""

from __future__ import annotations

import abc
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffreg import registry
from diffreg.errors import SamplingError
from diffreg.parameterization import Prediction, predict_eps_from_xstart, predict_xstart_from_eps
from diffreg.schedule import spaced_timesteps
from diffreg.validation import (
    check_finite_number,
    check_float_dtype,
    check_guidance_scale,
    check_tensor,
    resolve_device,
)

if TYPE_CHECKING:
    from diffreg.diffusion import Diffusion

Generator = torch.Generator | Sequence[torch.Generator] | None


class Sampler(abc.ABC):
    """Base class of samplers.

    Class attributes (also given as registration metadata): ``order`` (convergence order of the
    deterministic update), ``nfe_per_step`` (model evaluations per step), ``stochastic``.

    Subclasses implement :meth:`step`, and :meth:`prepare` to precompute per-step coefficients once
    per loop (as Python floats or device tensors, never per step).
    """

    order: int = 1
    nfe_per_step: int = 1
    stochastic: bool = False

    def select_timesteps(self, diffusion: Diffusion, steps: int, spacing: str) -> list[int]:
        """The timesteps (ascending indices of ``diffusion``) to visit for ``steps`` steps.

        The default is :func:`~diffreg.schedule.spaced_timesteps` (``leading``, ``trailing`` or
        ``linspace``); a sampler with its own noise-level grid (e.g. Karras sigmas) overrides it.
        The diffusion is then respaced to these timesteps and sampled from the last to the first.
        """
        return spaced_timesteps(diffusion.num_timesteps, steps, spacing)

    def prepare(self, ctx: SamplingContext) -> Any:
        """Per-call state (coefficients, history); called once before the first step."""
        return None

    @abc.abstractmethod
    def step(self, ctx: SamplingContext, state: Any, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance ``x`` (float32 ``[N, ...]`` at ``ctx.timesteps[i]``) by one step.

        Returns ``(x_next, pred_xstart)``, both of ``x``'s shape and dtype.
        """

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({options})"


def draw_noise(shape: Sequence[int], generator: Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device``.

    ``generator`` may be ``None`` (global RNG), one ``torch.Generator`` (drawn on its own device,
    then moved), or a list of ``shape[0]`` generators, one per sample: then sample ``k`` depends
    only on ``generator[k]``, not on the batch size or its position.

    Raises:
        ValueError: a list whose length is not the batch size.
    """
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}; give one per sample")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in gens]).to(
        device
    )


def per_sample_generators(
    seed: int, count: int, start: int = 0, device: str | torch.device = "cpu"
) -> list[torch.Generator]:
    """``count`` independent generators for samples ``start .. start + count - 1`` of a run seeded
    with ``seed``; sample ``k``'s generator depends only on ``(seed, k)``."""
    gens = []
    for k in range(start, start + count):
        state = np.random.SeedSequence([int(seed), k]).generate_state(1, dtype=np.uint64)[0]
        gens.append(torch.Generator(device=device).manual_seed(int(state) & ((1 << 63) - 1)))
    return gens


def dynamic_threshold(percentile: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", section 2.3): per sample,
    s = max(1, quantile(|x0|, percentile)); x0 <- clip(x0, -s, s) / s."""
    if not 0 < percentile <= 1:
        raise ValueError(f"dynamic_threshold percentile must be in (0, 1], got {percentile!r}")

    def apply(pred_xstart: torch.Tensor) -> torch.Tensor:
        flat = pred_xstart.reshape(pred_xstart.shape[0], -1).abs().float()
        s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0).to(pred_xstart.dtype)
        s = s.reshape((-1,) + (1,) * (pred_xstart.ndim - 1))
        return torch.maximum(torch.minimum(pred_xstart, s), -s) / s

    return apply


def _model_dtype(model: Any) -> torch.dtype | None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def _model_device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


class SamplingContext:
    """What one sampling call knows; what a :class:`Sampler`'s ``step`` uses.

    Attributes:
        diffusion: the (respaced) :class:`~diffreg.Diffusion` being sampled.
        timesteps: Python list of this diffusion's timestep indices, in visiting order
            (``T-1, ..., 0`` for sampling).
        num_steps: ``len(timesteps)``.
        shape, device, dtype: of the sampler's state (dtype float32 unless asked otherwise).

    Methods for samplers: :meth:`t` (the ``[N]`` int64 timesteps of step i), :meth:`denoise`
    (the model's :class:`~diffreg.parameterization.Prediction` at step i, with guidance and
    clipping applied), :meth:`noise` (the noise of step i), :meth:`condition_mean`.
    """

    def __init__(
        self,
        diffusion: Diffusion,
        model: Any,
        shape: Sequence[int],
        *,
        timesteps: Sequence[int],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        model_kwargs: Mapping[str, Any] | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dynamic_threshold_percentile: float | None = None,
        cond_fn: Callable[..., torch.Tensor] | None = None,
        guidance_scale: float | None = None,
        uncond_model_kwargs: Mapping[str, Any] | None = None,
        generator: Generator = None,
        step_noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
        check_finite: bool = True,
    ):
        self.diffusion = diffusion
        self.model = model
        self.shape = tuple(shape)
        self.timesteps = list(timesteps)
        self.num_steps = len(self.timesteps)
        self.device = device
        self.dtype = dtype
        self.model_kwargs = dict(model_kwargs or {})
        self.clip_denoised = clip_denoised
        self.denoised_fn = denoised_fn
        self.process_xstart = (
            dynamic_threshold(dynamic_threshold_percentile) if dynamic_threshold_percentile is not None else None
        )
        self.cond_fn = cond_fn
        self.generator = generator
        self.step_noise = step_noise
        self.model_dtype = _model_dtype(model)
        self.guidance_scale = None if guidance_scale is None or guidance_scale == 1.0 else float(guidance_scale)
        self.uncond_model_kwargs = None
        if self.guidance_scale is not None:
            self.uncond_model_kwargs = dict(
                uncond_model_kwargs if uncond_model_kwargs is not None else _null_class_kwargs(model, self.model_kwargs)
            )
        self.nfe = 0  # model evaluations so far (a classifier-free guided pass counts once)
        n = self.shape[0]
        # every step's timesteps in one [steps, N] tensor each, made once per loop (row i is step
        # i's, a contiguous view): of this process, and of the original one for the model
        steps = torch.tensor(self.timesteps, dtype=torch.long, device=device)
        self._t = steps[:, None].expand(self.num_steps, n).contiguous()
        original = torch.as_tensor(np.asarray(diffusion.timestep_map)[self.timesteps].copy(), device=device)
        self._t_model = list(original[:, None].expand(self.num_steps, n).contiguous().unbind(0))
        if self.guidance_scale is not None:  # conditional and unconditional inputs in one batch
            self._cfg_kwargs = _cat_kwargs(self.model_kwargs, self.uncond_model_kwargs or {})
            self._t_model_doubled = original[:, None].expand(self.num_steps, 2 * n).contiguous()
        # finiteness, recorded on the device and read once after the loop: the sum of each model
        # output (NaN/inf anywhere makes it non-finite; a NaN state feeds the next model call),
        # kept as 0-d device tensors beside their step index, and the sum of the final state
        self.check_finite = check_finite
        self._out_sums: list[torch.Tensor] = []
        self._out_steps: list[int] = []
        self._final_sum: torch.Tensor | None = None
        #: True when nobody but the sampler holds the states between steps (``sample_loop``
        #: without a callback): a sampler may then write each step's results into the scratch
        #: tensors of :meth:`buffer` (never into the caller's noise or the model's output)
        self.reuse_buffers = False
        self._buffers: dict[str, torch.Tensor] = {}

    # -- for samplers ---------------------------------------------------------------------------

    def t(self, i: int) -> torch.Tensor:
        """int64 ``[N]`` timesteps (of ``diffusion``) at step ``i``."""
        return self._t[i]

    def is_last(self, i: int) -> bool:
        """Whether step ``i`` is the final one (it goes to the data, t = 0)."""
        return i == self.num_steps - 1

    def buffer(self, name: str) -> torch.Tensor | None:
        """A scratch tensor of the state's shape, dtype and device, the same one for ``name`` at
        every step of this call, or ``None`` unless :attr:`reuse_buffers` (so a result can be
        written with ``out=ctx.buffer(name)``: ``out=None`` allocates a new tensor). Its contents
        are undefined when first handed out; on the CPU, scratch tensors are recycled across the
        calls of a thread (page faults on fresh memory otherwise cost more than a step's arithmetic)."""
        if not self.reuse_buffers:
            return None
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = _spare_buffers.take(self.shape, self.dtype, self.device)
        return buf

    def release_buffers(self, keep: torch.Tensor) -> None:
        """Hand this call's scratch tensors back for reuse, except ``keep`` (the result)."""
        for buf in self._buffers.values():
            if buf.untyped_storage().data_ptr() != keep.untyped_storage().data_ptr():
                _spare_buffers.give(buf)
        self._buffers.clear()

    def model_output(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Raw network output at step ``i``, with classifier-free guidance applied to the mean
        channels (Ho & Salimans 2022, eq. 6: uncond + w (cond - uncond); the variance channels,
        if learned, come from the conditional pass). One forward pass over the doubled batch.
        The output is recorded for the non-finite check (one reduction, kept on the device)."""
        self.nfe += 1
        x_in = x if self.model_dtype is None else x.to(self.model_dtype)
        if self.guidance_scale is None:
            out = _check_output(self.model(x_in, self._t_model[i], **self.model_kwargs))
        else:
            both = _check_output(self.model(torch.cat([x_in, x_in]), self._t_model_doubled[i], **self._cfg_kwargs))
            cond, uncond = both.to(x.dtype).chunk(2)
            cond_mean, cond_var = self.diffusion.parameterization.split(cond, x)
            uncond_mean, _ = self.diffusion.parameterization.split(uncond, x)
            guided = torch.lerp(uncond_mean, cond_mean, self.guidance_scale)
            out = guided if cond_var is None else torch.cat([guided, cond_var], dim=1)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if self.check_finite:
            # the model's own output: clipping would otherwise hide an inf prediction
            self._out_sums.append(_finiteness(out))
            self._out_steps.append(i)
        return out

    def denoise(self, x: torch.Tensor, i: int, *, condition_score: bool = True) -> Prediction:
        """The model's :class:`Prediction` at step ``i``: guidance, ``denoised_fn``, dynamic
        thresholding and clipping applied; with a ``cond_fn``, the score is conditioned
        (Dhariwal & Nichol 2021, Algorithm 2) unless ``condition_score=False``."""
        out = self.model_output(x, i)
        # a Python int: every example is at this timestep, so coefficients are Python floats
        pred = self.diffusion.prediction_from_output(
            out, x, self.timesteps[i], self.clip_denoised, self.denoised_fn, self.process_xstart
        )
        if self.cond_fn is not None and condition_score:
            pred = self._condition_score(pred, x, i)
        return pred

    def cond_gradient(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """``cond_fn(x, t_original, **model_kwargs)``: the classifier's grad log p(y | x_t)."""
        assert self.cond_fn is not None
        grad = self.cond_fn(x, self._t_model[i], **self.model_kwargs)
        if not isinstance(grad, torch.Tensor) or grad.shape != x.shape:
            got = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
            raise ValueError(f"cond_fn must return the gradient with x's shape {tuple(x.shape)}, got {got}")
        return grad.to(x.dtype)

    def _condition_score(self, pred: Prediction, x: torch.Tensor, i: int) -> Prediction:
        t = self.timesteps[i]
        tables = self.diffusion.tables
        alpha_bar = tables.gather("alphas_cumprod", t, x)
        eps = pred.pred_eps - (1 - alpha_bar) ** 0.5 * self.cond_gradient(x, i)
        return pred.replace(pred_xstart=predict_xstart_from_eps(tables, x, t, eps), pred_eps=eps)

    def condition_mean(self, mean: torch.Tensor, pred: Prediction, x: torch.Tensor, i: int) -> torch.Tensor:
        """mean + variance * grad log p(y | x_t) (Dhariwal & Nichol 2021, Algorithm 1); ``mean``
        unchanged without a ``cond_fn``."""
        if self.cond_fn is None:
            return mean
        variance = exp(pred.log_variance) if pred.variance is None else pred.variance
        return mean + variance * self.cond_gradient(x, i)

    def noise(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """The standard normal noise of step ``i``: ``step_noise[i]`` if given, else drawn from
        the generator(s)."""
        if self.step_noise is not None:
            return self.step_noise[i].to(device=like.device, dtype=like.dtype)
        return draw_noise(like.shape, self.generator, like.device, like.dtype)

    def record_state(self, i: int, x: torch.Tensor) -> None:
        """Record whether the final state is finite (called after every step; only the last one
        costs a reduction, kept on the device)."""
        if self.check_finite and i == self.num_steps - 1:
            self._final_sum = _finiteness(x)

    def raise_if_nonfinite(self) -> None:
        """Raise :class:`~diffreg.errors.SamplingError` naming the first step whose model output
        was not finite (one host read, after the loop)."""
        if not self.check_finite:
            return
        sums = self._out_sums + ([] if self._final_sum is None else [self._final_sum])
        if not sums:
            return
        bad = ~torch.isfinite(torch.stack(sums))
        if not bool(bad.any()):
            return
        k = int(torch.nonzero(bad)[0, 0])
        i = self._out_steps[k] if k < len(self._out_steps) else self.num_steps - 1
        t = int(self.diffusion.timestep_map[self.timesteps[i]])
        raise SamplingError(
            f"sampling became non-finite (NaN or inf) at step {i} of {self.num_steps} (timestep {t} "
            "of the original process): the model's output there (or values so large, beyond "
            "~1e38 / their count, that their sum overflows), or the state the previous step fed "
            "it; check the model's weights and dtype, and the schedule (abar = 0 needs v or x0 "
            "prediction)"
        )


def _finiteness(x: torch.Tensor) -> torch.Tensor:
    """A 0-d device tensor that is finite when every value of ``x`` is: its sum (fp32/fp64 as they
    are, asking for a dtype takes a slower kernel; half precision in fp32). A sum is the cheapest
    full reduction here (min/max measured ~15 us slower per step); it also overflows to inf for
    finite values beyond ~1e38 / numel, which no sane model output reaches."""
    return x.sum() if x.dtype in (torch.float32, torch.float64) else x.sum(dtype=torch.float32)


class _SpareBuffers(threading.local):
    """Scratch tensors that sampling calls of this thread handed back: at most ``limit`` of one
    (shape, dtype), on the CPU (CUDA's caching allocator already recycles device memory), of at
    most ``max_bytes`` each (for large states a page fault per 4 KiB is cheap beside the model,
    and holding them would keep memory after sampling), never inference tensors (they could not
    be written outside ``torch.inference_mode``)."""

    limit = 2
    max_bytes = 8 << 20

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.free: list[torch.Tensor] = []

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.free and self.key == (shape, dtype, device):
            return self.free.pop()
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, buf: torch.Tensor) -> None:
        if buf.device.type != "cpu" or buf.is_inference() or buf.nbytes > self.max_bytes:
            return
        key = (tuple(buf.shape), buf.dtype, buf.device)
        if key != self.key:
            self.key, self.free = key, []
        if len(self.free) < self.limit:
            self.free.append(buf)


_spare_buffers = _SpareBuffers()


def exp(value: torch.Tensor | float) -> torch.Tensor | float:
    """``exp`` of a tensor or of a Python float (fixed variances are floats inside loops)."""
    return torch.exp(value) if isinstance(value, torch.Tensor) else math.exp(value)


def _null_class_kwargs(model: Any, model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Unconditional kwargs for classifier-free guidance: ``y`` replaced by the model's null class."""
    null = getattr(model, "null_class", None)
    if "y" not in model_kwargs or null is None:
        raise ValueError(
            "classifier-free guidance needs an unconditional input: pass uncond_model_kwargs=, "
            "or a class-conditional model with a `null_class` attribute and model_kwargs={'y': ...}"
        )
    return {**model_kwargs, "y": torch.full_like(model_kwargs["y"], int(null))}


def _cat_kwargs(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key in set(cond) | set(uncond):
        a: Any = cond.get(key)
        b: Any = uncond.get(key)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            out[key] = torch.cat([a, b])
        elif a is b or a == b:
            out[key] = a
        else:
            raise ValueError(
                f"model_kwargs[{key!r}] differs between the conditional and unconditional inputs and is not a tensor"
            )
    return out


def resolve_sampler(sampler: str | Sampler, options: Mapping[str, Any]) -> Sampler:
    """A :class:`Sampler` from a registered name and its options (or an instance, unchanged).

    Raises UnknownComponentError / ComponentOptionError for an unknown name or option.
    """
    if isinstance(sampler, Sampler):
        if options:
            raise TypeError(f"unexpected options {sorted(options)} for an already-built sampler")
        return sampler
    return registry.create("sampler", sampler, **options)


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword options into the driver's (those :func:`sample_loop_progressive` takes) and
    the sampler's own (everything else, checked by the sampler's factory)."""
    driver = _DRIVER_OPTIONS
    return {k: v for k, v in options.items() if k in driver}, {k: v for k, v in options.items() if k not in driver}


def _driver_options() -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(sample_loop_progressive).parameters) - {
        "diffusion",
        "model",
        "shape",
        "sampler",
        "sampler_options",
    }


def _check_output(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor, got {type(out).__name__}")
    return out


def _check_generator(generator: Any, batch: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}; give one per sample")
        return
    raise TypeError(f"generator must be a torch.Generator or a list of one per sample, got {generator!r}")


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
    noise: torch.Tensor | None = None,
    generator: Generator = None,
    step_noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dynamic_threshold: float | None = None,
    cond_fn: Callable[..., torch.Tensor] | None = None,
    guidance_scale: float | None = None,
    uncond_model_kwargs: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    check_finite: bool = True,
    stats: dict[str, Any] | None = None,
    **sampler_options: Any,
) -> SamplingRun:
    """Run ``sampler`` over every timestep of ``diffusion`` (``T-1`` down to ``0``), yielding
    ``{"sample", "pred_xstart", "t", "i"}`` after each step (``t``: original-process index).

    Args:
        diffusion: the process to sample (respace it for fewer steps).
        model: called as ``model(x, t_original, **model_kwargs)``; may hold fp16/bf16 weights
            (inputs are cast to its dtype, outputs back to ``dtype``).
        shape: ``(N, C, ...)`` of the samples.
        sampler: a registered name or a :class:`Sampler`; ``sampler_options`` go to its factory.
        noise: x_T (``shape``); drawn from ``generator`` if ``None``.
        generator: a ``torch.Generator`` or one per sample (see :func:`draw_noise`).
        step_noise: explicit noise for every stochastic step, ``[num_steps, *shape]``.
        clip_denoised: clip pred_xstart to [-1, 1]. dynamic_threshold: a percentile in (0, 1].
        cond_fn: classifier guidance ``cond_fn(x, t, **model_kwargs) -> grad log p(y|x_t)``.
        guidance_scale: classifier-free guidance w (1 or ``None``: off). The unconditional input
            is ``uncond_model_kwargs``, or ``model_kwargs`` with ``y`` set to ``model.null_class``.
        progress: show a tqdm bar. callback: ``callback(i, t, x, pred_xstart)`` after each step.
        check_finite: raise :class:`~diffreg.errors.SamplingError` at the end, naming the first
            step whose state became non-finite.
        stats: a dict filled at the end with ``nfe`` (model evaluations), ``steps`` and
            ``timesteps`` (the original indices visited).

    Raises:
        ValueError / TypeError: bad shape, ``noise`` of the wrong shape, mismatched generators;
        UnknownComponentError / ComponentOptionError: unknown sampler or option.
    """
    shape = _check_shape(shape)
    sampler_obj = resolve_sampler(sampler, sampler_options)
    check_float_dtype(dtype, "dtype")
    if noise is not None:
        check_tensor(noise, "noise")
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
    device = resolve_device(
        device if device is not None else (noise.device if noise is not None else _model_device(model))
    )
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a dict of keyword arguments, got {type(model_kwargs).__name__}")
    if guidance_scale is not None:
        check_guidance_scale(guidance_scale)
    _check_generator(generator, shape[0])
    if step_noise is not None:
        for k, z in enumerate(step_noise):
            if check_tensor(z, f"step_noise[{k}]").shape != shape:
                raise ValueError(f"step_noise[{k}] has shape {tuple(z.shape)}, expected {shape}")
    for name, fn in (("cond_fn", cond_fn), ("denoised_fn", denoised_fn), ("callback", callback)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {fn!r}")
    ctx = SamplingContext(
        diffusion,
        model,
        shape,
        timesteps=range(diffusion.num_timesteps - 1, -1, -1),
        device=device,
        dtype=dtype,
        model_kwargs=model_kwargs,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        dynamic_threshold_percentile=dynamic_threshold,
        cond_fn=cond_fn,
        guidance_scale=guidance_scale,
        uncond_model_kwargs=uncond_model_kwargs,
        generator=generator,
        step_noise=step_noise,
        check_finite=check_finite,
    )
    if step_noise is not None and len(step_noise) != ctx.num_steps:
        raise ValueError(f"step_noise has {len(step_noise)} entries, expected one per step ({ctx.num_steps})")
    x = noise.to(device=device, dtype=dtype) if noise is not None else draw_noise(shape, generator, device, dtype)
    return SamplingRun(ctx, sampler_obj, x, progress, callback, stats)


class SamplingRun(Iterator[dict[str, Any]]):
    """One sampling call, as :func:`sample_loop_progressive` returns it: an iterator yielding
    ``{"sample", "pred_xstart", "t", "i", "nfe"}`` after each step (``sample`` and ``pred_xstart``
    new ``[N, C, ...]`` tensors of the state's dtype; ``t`` the original-process timestep), or
    run to the end at once by :meth:`run` (what :func:`sample_loop` does; then, without a
    callback, nobody but the sampler sees the intermediate states, and samplers may write them
    into scratch tensors). Iterating to the end raises :class:`~diffreg.errors.SamplingError` if
    the state became non-finite. The same contract as guided-diffusion's
    ``p_sample_loop_progressive`` generator (plus :meth:`close`)."""

    def __init__(self, ctx: SamplingContext, sampler: Sampler, x: torch.Tensor, progress: bool, callback, stats):
        self.ctx = ctx
        self.sampler = sampler
        self._x = x
        self._progress = progress
        self._callback = callback
        self._stats = stats
        self._steps: Iterator[dict[str, Any]] | None = None
        self._ran = False

    def __next__(self) -> dict[str, Any]:
        if self._steps is None:
            if self._ran:
                raise RuntimeError("this sampling run was already run to the end by run()")
            self._steps = self._iterate()
        return next(self._steps)

    def close(self) -> None:
        """Stop iterating early (as a generator's ``close``)."""
        if self._steps is not None:
            self._steps.close()  # type: ignore[attr-defined]

    def _range(self):
        n = self.ctx.num_steps
        return tqdm(range(n), desc=type(self.sampler).__name__, leave=False) if self._progress else range(n)

    def _iterate(self) -> Iterator[dict[str, Any]]:
        ctx, sampler, callback, x = self.ctx, self.sampler, self._callback, self._x
        state = sampler.prepare(ctx)
        for i in self._range():
            with torch.no_grad():
                x, pred_xstart = sampler.step(ctx, state, i, x)
                ctx.record_state(i, x)
            t = int(ctx.diffusion.timestep_map[ctx.timesteps[i]])
            if callback is not None:
                callback(i, t, x, pred_xstart)
            yield {"sample": x, "pred_xstart": pred_xstart, "t": t, "i": i, "nfe": ctx.nfe}
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
        self._ran = True
        ctx, sampler, callback, x = self.ctx, self.sampler, self._callback, self._x
        ctx.reuse_buffers = callback is None
        grad_enabled = torch.is_grad_enabled()
        state = sampler.prepare(ctx)
        step = sampler.step
        with torch.no_grad():
            for i in self._range():
                x, pred_xstart = step(ctx, state, i, x)
                if callback is not None:
                    with torch.set_grad_enabled(grad_enabled):
                        callback(i, int(ctx.diffusion.timestep_map[ctx.timesteps[i]]), x, pred_xstart)
            ctx.record_state(ctx.num_steps - 1, x)
        ctx.release_buffers(keep=x)
        self._finish()
        return x

    def _finish(self) -> None:
        ctx = self.ctx
        ctx.raise_if_nonfinite()
        if self._stats is not None:
            self._stats.update(
                nfe=ctx.nfe, steps=ctx.num_steps, timesteps=[int(ctx.diffusion.timestep_map[k]) for k in ctx.timesteps]
            )


def sample_loop(diffusion: Diffusion, model: Any, shape: Sequence[int], **options: Any) -> torch.Tensor:
    """Run :func:`sample_loop_progressive` to the end and return the final sample (``shape``).

    The intermediate states are not kept (without a ``callback``, samplers may write each step
    into buffers of their own), so this is the fastest way to sample.
    """
    return sample_loop_progressive(diffusion, model, shape, **options).run()


# -- single steps with per-example timesteps (guided-diffusion's API) ------------------------------


def ddim_coefficients(alphas_cumprod: np.ndarray, alphas_cumprod_prev: np.ndarray, eta: float):
    """DDIM update coefficients (Song et al. 2021, eq. 12 and eq. 16):

    x_prev = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev - sigma^2) * eps + sigma * z, with
    sigma = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev).

    Works elementwise on float64 arrays or floats; returns ``(c_xstart, c_eps, sigma)``.
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    abar_prev = np.asarray(alphas_cumprod_prev, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
    sigma = np.nan_to_num(sigma)
    c_eps = np.sqrt(np.clip(1 - abar_prev - sigma**2, 0.0, None))
    return np.sqrt(abar_prev), c_eps, sigma


def check_eta(eta: Any) -> float:
    """``eta`` as a float if it is a finite number >= 0 (0: deterministic DDIM, 1: the DDPM
    posterior variance; Song et al. 2021, eq. 16).

    Raises:
        TypeError: not a number. ValueError: negative, NaN, infinite or beyond a float's range.
    """
    try:
        return check_finite_number(eta, "eta", minimum=0.0)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc} (0: deterministic DDIM, 1: DDPM-like)") from None


def _masked_noise(t: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None, generator: Generator) -> torch.Tensor:
    """The noise of a single step with per-example ``t``: ``noise`` (drawn if None), zero where
    ``t == 0`` (the last step adds none)."""
    if noise is None:
        noise = draw_noise(x.shape, generator, x.device, x.dtype)
    elif noise.shape != x.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
    return (t != 0).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)) * noise


def _single_step_prediction(diffusion, model, x, t, clip_denoised, denoised_fn, model_kwargs):
    from diffreg.diffusion import _check_t

    t = _check_t(t, x, diffusion.num_timesteps)
    out = diffusion.call_model(model, x, t, model_kwargs)
    return t, diffusion.prediction_from_output(out, x, t, clip_denoised, denoised_fn)


def p_sample(
    diffusion,
    model,
    x,
    t,
    *,
    clip_denoised=True,
    denoised_fn=None,
    cond_fn=None,
    model_kwargs=None,
    noise=None,
    generator=None,
) -> dict[str, torch.Tensor]:
    """See :meth:`diffreg.Diffusion.p_sample`."""
    t, pred = _single_step_prediction(diffusion, model, x, t, clip_denoised, denoised_fn, model_kwargs)
    mean, _, _ = diffusion.q_posterior_mean_variance(pred.pred_xstart, x, t)
    if cond_fn is not None:
        grad = cond_fn(x, diffusion.model_timesteps(t), **(model_kwargs or {}))
        variance = torch.exp(pred.log_variance) if pred.variance is None else pred.variance
        mean = mean.float() + variance * grad.float()
    sample = mean + torch.exp(0.5 * pred.log_variance) * _masked_noise(t, x, noise, generator)
    return {"sample": sample, "pred_xstart": pred.pred_xstart}


def ddim_sample(
    diffusion,
    model,
    x,
    t,
    *,
    clip_denoised=True,
    denoised_fn=None,
    cond_fn=None,
    model_kwargs=None,
    eta=0.0,
    noise=None,
    generator=None,
) -> dict[str, torch.Tensor]:
    """See :meth:`diffreg.Diffusion.ddim_sample`."""
    eta = check_eta(eta)
    t, pred = _single_step_prediction(diffusion, model, x, t, clip_denoised, denoised_fn, model_kwargs)
    tables = diffusion.tables
    eps = pred.pred_eps
    pred_xstart = pred.pred_xstart
    if cond_fn is not None:
        alpha_bar = tables.gather("alphas_cumprod", t, x)
        grad = cond_fn(x, diffusion.model_timesteps(t), **(model_kwargs or {}))
        eps = eps - torch.sqrt(1 - alpha_bar) * grad
        pred_xstart = predict_xstart_from_eps(tables, x, t, eps)
    key = f"ddim_eta_{eta!r}"
    for j, part in enumerate(("c_xstart", "c_eps", "sigma")):
        tables.derive(
            f"{key}_{part}", lambda tb, j=j: ddim_coefficients(tb.alphas_cumprod, tb.alphas_cumprod_prev, eta)[j]
        )
    sample = tables.gather(f"{key}_c_xstart", t, x) * pred_xstart + tables.gather(f"{key}_c_eps", t, x) * eps
    if eta > 0:
        sample = sample + tables.gather(f"{key}_sigma", t, x) * _masked_noise(t, x, noise, generator)
    return {"sample": sample, "pred_xstart": pred_xstart}


def ddim_reverse_sample(
    diffusion, model, x, t, *, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0
) -> dict[str, torch.Tensor]:
    """See :meth:`diffreg.Diffusion.ddim_reverse_sample`."""
    if eta != 0.0:
        raise ValueError(f"DDIM inversion is deterministic: eta must be 0, got {eta!r}")
    t, pred = _single_step_prediction(diffusion, model, x, t, clip_denoised, denoised_fn, model_kwargs)
    tables = diffusion.tables
    eps = predict_eps_from_xstart(tables, x, t, pred.pred_xstart)
    alpha_bar_next = tables.gather("alphas_cumprod_next", t, x)
    sample = pred.pred_xstart * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
    return {"sample": sample, "pred_xstart": pred.pred_xstart}


def ddim_reverse_sample_loop(
    diffusion, model, x, *, clip_denoised=True, denoised_fn=None, model_kwargs=None, progress=False
) -> torch.Tensor:
    """Map data ``x`` (``[N, ...]``) to noise x_T by deterministic DDIM inversion over every
    timestep of ``diffusion`` (t = 0 .. T-1). Returns a tensor of ``x``'s shape."""
    n = x.shape[0]
    for step in tqdm(range(diffusion.num_timesteps), disable=not progress, leave=False):
        t = torch.full((n,), step, dtype=torch.long, device=x.device)
        with torch.no_grad():
            x = ddim_reverse_sample(
                diffusion, model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
            )["sample"]
    return x


#: The keyword options that belong to the sampling driver (the rest go to the sampler's factory).
_DRIVER_OPTIONS = _driver_options()
