"""What one sampling call knows: the grid's noise levels and the denoiser at any level.

:meth:`SamplingContext.denoise` is the one door between a sampler and the network: it calls the
model at a :class:`~diffreg.process.NoiseLevel` (a grid level by index, or any level of the
process), applies the call's guidance (a :class:`~diffreg.sampling.guidance.Guidance`: classifier-free
guidance and its variants), ``denoised_fn``, dynamic thresholding, clipping and classifier guidance,
and returns the parameterization's :class:`~diffreg.parameterization.Prediction`
(pred_xstart, pred_eps, pred_v). Per-step work stays on the device: the finiteness record is a
0-d device tensor per model call, read once after the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffreg.errors import SamplingError
from diffreg.parameterization import Prediction, eps_from_xstart, xstart_from_eps
from diffreg.process import NoiseLevel, Process
from diffreg.sampling.guidance import Guidance, GuidanceCall, GuidedPrediction
from diffreg.sampling.levels import Levels
from diffreg.sampling.model_call import (  # noqa: F401  (dynamic_threshold, exp: public here too)
    cat_kwargs,
    check_output,
    dynamic_threshold,
    exp,
    finiteness,
    model_device,
    model_dtype,
    null_class_kwargs,
)
from diffreg.sampling.noise import NOISE_TYPES, BrownianTree, Generator, brownian_seeds, draw_noise
from diffreg.schedule import axpby

if TYPE_CHECKING:
    from diffreg.diffusion import Diffusion
    from diffreg.schedule import DiffusionTables


class SamplingContext:
    """What one sampling call knows; what a :class:`~diffreg.Sampler` uses.

    Attributes:
        diffusion: the :class:`~diffreg.Diffusion` being sampled; ``process``: its
            :class:`~diffreg.process.Process`.
        levels: the grid's :class:`Levels` (``num_steps + 1`` entries, the last the final level:
            the data, or the process's ``t_min`` level for ``final_level="t_min"``, whose sigma
            is not 0: samplers must not assume the last step reaches sigma = 0).
        final_level: ``"data"`` or ``"t_min"`` (see :func:`~diffreg.sampling.levels.final_level`).
        num_steps: model-evaluating steps of the grid.
        shape, device, dtype: of the sampler's state (dtype float32 unless asked otherwise).
        nfe: model evaluations so far (a guided pass counts once, whatever its batch).
        guidance: the call's :class:`~diffreg.sampling.guidance.Guidance` (``None``: unguided),
            ``guidance_call`` its per-call state; ``renoise_unconditional``: a Python bool, whether
            samplers renoise with the unconditional eps (CFG++; see :meth:`renoise`).

    Methods for samplers: :meth:`denoise` (the prediction at a grid level ``i`` or any
    :class:`~diffreg.process.NoiseLevel`), :meth:`level_at` (a level placed by log-SNR or VE sigma),
    :meth:`noise` (standard normal noise of step i), :meth:`condition_mean` (classifier guidance
    on a mean), :meth:`renoise` (the state to renoise from, CFG++), :meth:`is_last`.
    """

    def __init__(
        self,
        diffusion: Diffusion,
        model: Any,
        shape: Sequence[int],
        *,
        times: Sequence[float],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        model_kwargs: Mapping[str, Any] | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dynamic_threshold_percentile: float | None = None,
        cond_fn: Callable[..., torch.Tensor] | None = None,
        guidance_scale: float | None = None,
        uncond_model_kwargs: Mapping[str, Any] | None = None,
        guidance: Guidance | None = None,
        generator: Generator = None,
        step_noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
        noise_type: str = "gaussian",
        check_finite: bool = True,
        final_level: str = "data",
    ):
        self.diffusion = diffusion
        self.process: Process = diffusion.process
        self.model = model
        self.shape = tuple(shape)
        self.final_level = final_level
        self.levels = Levels.on_grid(self.process, times, final_level)
        self.num_steps = self.levels.num_steps
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
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"unknown noise_type {noise_type!r}; accepted: {', '.join(NOISE_TYPES)}")
        self.noise_type = noise_type
        self._tree: BrownianTree | None = None
        self.model_dtype = model_dtype(model)
        self.nfe = 0
        n = self.shape[0]
        # the guidance of the call: None when unguided (w = 1 of a method that is the conditional
        # model there: one plain pass, today's fast path)
        if guidance is None and guidance_scale is not None:
            from diffreg.builtin.guidance import CFG

            guidance = CFG()
        scale = None if guidance is None else guidance.check_scale(1.0 if guidance_scale is None else guidance_scale)
        if guidance is not None and scale == 1.0 and guidance.identity_at_one:
            guidance = None
        self.guidance = guidance
        self.guidance_scale = scale if guidance is not None else None
        self.guidance_call = GuidanceCall(scale, self.levels) if guidance is not None else None
        self.renoise_unconditional = bool(guidance is not None and guidance.renoise_unconditional)
        self.uncond_model_kwargs = None
        if guidance is not None and not guidance.separate_unconditional:
            # conditional and unconditional inputs in one doubled batch
            self.uncond_model_kwargs = dict(
                uncond_model_kwargs if uncond_model_kwargs is not None else null_class_kwargs(model, self.model_kwargs)
            )
            self._cfg_kwargs = cat_kwargs(self.model_kwargs, self.uncond_model_kwargs)
        # the network's time input at every grid level, made once per call (and for the doubled
        # batch); the final level too when it is not the data (final_level="t_min": a 2nd-order
        # sampler's corrector evaluates the model there, as index num_steps)
        model_levels = self.levels.t[:-1] if self.levels.sigma[-1] == 0.0 else self.levels.t
        self._model_t = [self.process.model_input(float(t), n, device) for t in model_levels]
        self._model_t2 = (
            [self.process.model_input(float(t), 2 * n, device) for t in model_levels]
            if self.uncond_model_kwargs is not None
            else None
        )
        # ... and as Python numbers (for callbacks and reports: read from a CPU copy, never the device)
        cpu = torch.device("cpu")
        self._model_t_host = [self.process.model_input(float(t), 1, cpu).tolist()[0] for t in self.levels.t[:-1]]
        self._step_tables: DiffusionTables | None = None
        mean_type = diffusion.parameterization.mean_type
        self._scale_input = mean_type.scale_input if mean_type.scales_input else None
        self.check_finite = check_finite
        self._out_sums: list[torch.Tensor] = []
        self._out_steps: list[int] = []
        self._final_sum: torch.Tensor | None = None
        self._step = 0  # the step being taken (for the finiteness report)
        if self.guidance is not None:
            self.guidance.start(self, self.guidance_call)

    # -- for samplers ---------------------------------------------------------------------------

    @property
    def timesteps(self) -> list[float]:
        """The grid's process times in visiting order (integers for integer levels)."""
        return [int(t) if float(t).is_integer() else float(t) for t in self.levels.t[:-1]]

    def is_last(self, i: int) -> bool:
        """Whether step ``i`` is the final one (it goes to the final level: the data, or ``t_min``)."""
        return i == self.num_steps - 1

    def level_at(self, *, log_snr: float | None = None, ve_sigma: float | None = None) -> NoiseLevel:
        """The process's level with this log-SNR or VE sigma (see :meth:`Process.level_at`)."""
        return self.process.level_at(log_snr=log_snr, ve_sigma=ve_sigma)

    def model_input_time(self, at: int | NoiseLevel, batch: int | None = None) -> torch.Tensor:
        """The network's time input ``[batch]`` (default: the call's batch N; 2N for the doubled
        batch of classifier-free guidance) at grid level ``at`` (an index) or any level."""
        n = self.shape[0]
        batch = n if batch is None else batch
        if isinstance(at, int):
            if batch == n:
                return self._model_t[at]
            if batch == 2 * n and self._model_t2 is not None:
                return self._model_t2[at]
            at = self.levels[at]
        return self.process.model_input(at.t, batch, self.device)

    def call_model(self, model: Any, x: torch.Tensor, at: int | NoiseLevel, kwargs: Mapping[str, Any]) -> torch.Tensor:
        """``model(x, t, **kwargs)`` at level ``at`` (``x`` of any batch, cast to the model's
        dtype; the output cast back to ``x``'s), recorded for the non-finite check (one reduction,
        on the device). Counts no NFE (see :meth:`denoise`).

        Raises:
            TypeError: the model returned something other than a tensor.
        """
        t_in = self.model_input_time(at, x.shape[0])
        dtype = self.model_dtype if model is self.model else model_dtype(model)
        x_in = x
        if self._scale_input is not None:  # a preconditioning's input scaling (EDM's c_in)
            level = self.levels[at] if isinstance(at, int) else at
            x_in = self._scale_input(x, level.alpha, level.sigma)
        x_in = x_in if dtype is None else x_in.to(dtype)
        out = check_output(model(x_in, t_in, **kwargs))
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if self.check_finite:
            self._out_sums.append(finiteness(out))
            self._out_steps.append(self._step)
        return out

    def model_output(self, x: torch.Tensor, at: int | NoiseLevel) -> torch.Tensor:
        """Raw network output of the conditional (unguided) pass at grid level ``at`` (an index)
        or any level: ``model(x, t, **model_kwargs)``; see :meth:`call_model`. Guidance is applied
        by :meth:`denoise`, on predictions."""
        self.nfe += 1
        return self.call_model(self.model, x, at, self.model_kwargs)

    def _guided(self, x: torch.Tensor, at: int | NoiseLevel, level: NoiseLevel):
        """(pred_xstart, pred_eps, var_part, renoise_eps) of the guidance at ``level``: the
        conditional and unconditional predictions (one doubled-batch pass, or the guidance's own
        unconditional) combined by :meth:`Guidance.combine`."""
        g, call = self.guidance, self.guidance_call
        assert g is not None and call is not None
        p = self.diffusion.parameterization
        alpha, sigma = level.alpha, level.sigma
        self.nfe += 1
        if g.separate_unconditional:
            mean_c, var_part = p.split(self.call_model(self.model, x, at, self.model_kwargs), x)
            cond = Prediction(*p.mean_type.predict(mean_c, x, alpha, sigma), 0.0, alpha=alpha, sigma=sigma)
            uncond = g.unconditional(self, x, at, level, call)
        else:
            x2 = torch.cat([x, x])
            mean2, var2 = p.split(self.call_model(self.model, x2, at, self._cfg_kwargs), x2)
            predicted = p.mean_type.predict(mean2, x2, alpha, sigma)
            x0_c, x0_u = predicted[0].chunk(2)
            eps_c, eps_u = predicted[1].chunk(2)
            var_part = None if var2 is None else var2.chunk(2)[0]
            cond = Prediction(x0_c, eps_c, 0.0, alpha=alpha, sigma=sigma)
            uncond = Prediction(x0_u, eps_u, 0.0, alpha=alpha, sigma=sigma)
        pred_xstart, pred_eps = g.combine(cond, uncond, x, level, call)
        return pred_xstart, pred_eps, var_part, (uncond.pred_eps if g.renoise_unconditional else None)

    def denoise(self, x: torch.Tensor, at: int | NoiseLevel, *, condition_score: bool = True) -> Prediction:
        """The :class:`~diffreg.parameterization.Prediction` at grid level ``at`` (index ``i`` in
        ``0 .. num_steps - 1``) or at any :class:`~diffreg.process.NoiseLevel` of the process:
        guidance, ``denoised_fn``, dynamic thresholding and clipping applied, pred_eps re-derived
        from the processed pred_xstart (as guided-diffusion's ``ddim_sample``). With a
        ``cond_fn`` the score is conditioned (Dhariwal & Nichol 2021, Algorithm 2) unless
        ``condition_score=False``. At the data level (sigma = 0) the prediction is x itself and
        the model is not called. The reverse-process variance (``log_variance``) is defined at
        grid levels only.
        """
        if isinstance(at, int):
            self._step = at
            level = self.levels[at]
        else:
            level = at
        if level.sigma == 0.0:
            x0 = x / level.alpha if level.alpha != 1.0 else x
            pred = Prediction(x0, torch.zeros_like(x), variances=_no_variance, alpha=level.alpha, sigma=0.0)
            return GuidedPrediction.of(pred, pred.pred_eps) if self.renoise_unconditional else pred
        p = self.diffusion.parameterization
        alpha, sigma = level.alpha, level.sigma
        renoise_eps = None
        guided = self.guidance is not None and self.guidance.active(level, self.guidance_call)
        if not guided:  # the fast path: one plain pass
            out = self.model_output(x, at)
            mean_part, var_part = p.split(out, x)
            pred_xstart, eps = p.mean_type.predict(mean_part, x, alpha, sigma)
            pred_eps: torch.Tensor | Callable[[], torch.Tensor] = eps
        else:
            out = mean_part = None
            pred_xstart, pred_eps, var_part, renoise_eps = self._guided(x, at, level)
        model_eps = None
        if self.denoised_fn is not None or self.clip_denoised or self.process_xstart is not None:
            model_eps = pred_eps  # the eps the (guided) model output implies, before x0 is changed
            if self.denoised_fn is not None:
                pred_xstart = self.denoised_fn(pred_xstart)
            if self.process_xstart is not None:
                pred_xstart = self.process_xstart(pred_xstart)
            if self.clip_denoised:
                # in place on a tensor of our own (never on the model's output, a denoised_fn's or a guidance's)
                fresh = out is not None and pred_xstart is not mean_part and pred_xstart is not out and self.denoised_fn is None
                pred_xstart = pred_xstart.clamp_(-1, 1) if fresh and self.process_xstart is None else pred_xstart.clamp(-1, 1)
            processed = pred_xstart
            pred_eps = lambda: eps_from_xstart(x, processed, alpha, sigma)  # noqa: E731
        if isinstance(at, int):
            j = self.num_steps - 1 - at

            def variances():
                return p.variance_type.variance(self.step_tables, var_part, x, j)
        else:
            variances = _no_variance
        pred = Prediction(pred_xstart, pred_eps, variances=variances, alpha=alpha, sigma=sigma, model_eps=model_eps)
        if self.cond_fn is not None and condition_score:
            eps = pred.pred_eps - sigma * self.cond_gradient(x, at)
            pred = pred.replace(pred_xstart=xstart_from_eps(x, eps, alpha, sigma), pred_eps=eps)
        if self.renoise_unconditional:
            pred = GuidedPrediction.of(pred, renoise_eps if renoise_eps is not None else pred.pred_eps)
        return pred

    def renoise(self, x: torch.Tensor, pred: Prediction) -> torch.Tensor:
        """The state a sampler renoises from: ``x`` itself, unless the call's guidance renoises with
        the unconditional eps (CFG++, Chung et al. 2024): then x^ = alpha x0 + sigma eps_u at
        ``pred``'s level, with which a first-order update k_x0 x0 + k_x x^ is exactly
        alpha' x0 + c eps_u (DDIM, Euler, DPM-Solver++(1), the posterior mean of DDPM). Python-level
        choice fixed for the call; no tensor is read on the host.
        """
        if not self.renoise_unconditional:
            return x
        eps_u = getattr(pred, "renoise_eps", None)
        if eps_u is None or pred.sigma == 0.0:
            return x
        return axpby(pred.alpha, pred.pred_xstart, pred.sigma, eps_u)

    @property
    def step_tables(self) -> DiffusionTables:
        """guided-diffusion's coefficient tables of the grid as a process of its own (what
        ``respace`` builds: betas_j = 1 - abar_j / abar_{j-1} over the grid's levels, ascending),
        from which the variance types read the reverse-process variance of each step.

        Raises:
            SamplingError: the grid is not a variance-preserving discrete process (the reverse
            variance of guided-diffusion is not defined there).
        """
        if self._step_tables is None:
            from diffreg.schedule import DiffusionTables

            lv = self.levels
            if not np.allclose(lv.alpha**2 + lv.sigma**2, 1.0, rtol=0, atol=1e-9):
                raise SamplingError(
                    f"the reverse-process variance (guided-diffusion's tables, used by ddpm) is defined on "
                    f"variance-preserving processes; {self.process!r} is not: use ddim with eta=1 (the same "
                    "posterior on any process) or euler_ancestral"
                )
            abar = (lv.alpha[:-1] ** 2)[::-1]
            try:
                self._step_tables = DiffusionTables(1.0 - abar / np.append(1.0, abar[:-1]))
            except ValueError as exc:
                raise SamplingError(
                    f"the reverse-process variance is defined for strictly decreasing levels of a "
                    f"variance-preserving process; this grid gives abar = {abar.tolist()[:8]}... ({exc})"
                ) from None
        return self._step_tables

    def cond_gradient(self, x: torch.Tensor, at: int | NoiseLevel) -> torch.Tensor:
        """``cond_fn(x, t_model, **model_kwargs)``: the classifier's grad log p(y | x_t).

        Raises:
            ValueError: a gradient of another shape than ``x``.
        """
        assert self.cond_fn is not None
        t_in = self.model_input_time(at, x.shape[0])
        grad = self.cond_fn(x, t_in, **self.model_kwargs)
        if not isinstance(grad, torch.Tensor) or grad.shape != x.shape:
            got = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
            raise ValueError(f"cond_fn must return the gradient with x's shape {tuple(x.shape)}, got {got}")
        return grad.to(x.dtype)

    def condition_mean(self, mean: torch.Tensor, pred: Prediction, x: torch.Tensor, i: int) -> torch.Tensor:
        """mean + variance * grad log p(y | x_t) (Dhariwal & Nichol 2021, Algorithm 1); ``mean``
        unchanged without a ``cond_fn``."""
        if self.cond_fn is None:
            return mean
        variance = exp(pred.log_variance) if pred.variance is None else pred.variance
        return mean + variance * self.cond_gradient(x, i)

    def noise(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise for step ``i``: ``step_noise[i]`` if given; with
        ``noise_type="brownian"`` the normalised increment (W(c') - W(c)) / sqrt(c' - c) of a
        Brownian path over the clock c = alpha^2 / (alpha^2 + sigma^2) (= abar on a VP process;
        SNR / (1 + SNR)) between levels i and i + 1, one path per sample seeded from its generator
        (:class:`~diffreg.sampling.noise.BrownianTree`); else drawn from the generator(s)."""
        if self.step_noise is not None:
            return self.step_noise[i].to(device=like.device, dtype=like.dtype)
        if self.noise_type == "brownian":
            lv = self.levels
            c = lv.alpha[i : i + 2] ** 2 / (lv.alpha[i : i + 2] ** 2 + lv.sigma[i : i + 2] ** 2)
            self.start_noise(like)
            assert self._tree is not None
            z = self._tree.increment(float(c[0]), float(c[1]))
            return z if len(self._tree.seeds) > 1 else z[0]
        return draw_noise(like.shape, self.generator, like.device, like.dtype)

    # -- for the driver ---------------------------------------------------------------------------

    def start_noise(self, like: torch.Tensor) -> None:
        """Seed the per-step noise that needs it (``noise_type="brownian"``: the tree's seeds,
        drawn from the generator(s) after x_T; the clock runs over [0, 1]) once, before the first
        step, so reading the seeds on the host (one read per call) happens outside the steps.
        ``like``: the state (its shape, device and dtype)."""
        if self.noise_type != "brownian" or self._tree is not None or self.step_noise is not None:
            return
        seeds = brownian_seeds(self.generator, like.shape[0])
        per_path = like.shape[1:] if len(seeds) > 1 else like.shape
        self._tree = BrownianTree(seeds, per_path, 0.0, 1.0, device=like.device, dtype=like.dtype)

    def model_time(self, i: int) -> int | float:
        """The network's time input of grid level ``i`` as a Python number (for callbacks): an
        int for integer timesteps, else a float; kept on the host, so reading it costs no
        device synchronisation."""
        return self._model_t_host[i]

    def record_state(self, x: torch.Tensor) -> None:
        """Record whether the final state is finite (one reduction, on the device)."""
        if self.check_finite:
            self._final_sum = finiteness(x)

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
        t = self.model_time(i)
        where = f"timestep {t} of the original process" if isinstance(t, int) else f"model time input {t:g}"
        raise SamplingError(
            f"sampling became non-finite (NaN or inf) at step {i} of {self.num_steps} ({where}): the "
            "model's output there (or values so large, beyond ~1e38 / "
            "their count, that their sum overflows), or the state the previous step fed it; check "
            "the model's weights and dtype, and the schedule (abar = 0 needs v or x0 prediction)"
        )


def _no_variance():
    raise SamplingError(
        "the reverse-process variance is defined at the grid's levels only (ask ctx.denoise(x, i) "
        "with the step index i)"
    )
