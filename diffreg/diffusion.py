"""The composed diffusion: schedule + parameterization + loss, with guided-diffusion's API.

Method and argument names follow OpenAI's guided-diffusion ``gaussian_diffusion.py`` so code
written against it reads the same; for the same inputs the numbers agree to float32 precision.
Sampling methods delegate to the registered samplers through :mod:`diffreg.sampling`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from diffreg import registry
from diffreg.config import DiffusionConfig
from diffreg.gaussian import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from diffreg.loss import Loss, TimestepSampler
from diffreg.parameterization import (
    ModelParameterization,
    Prediction,
    eps_from_xstart,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
)
from diffreg.process import DiscreteProcess
from diffreg.schedule import DiffusionTables, axpby, space_timesteps
from diffreg.validation import check_tensor

Model = Callable[..., torch.Tensor]


def _check_t(t: torch.Tensor, x: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Validate timesteps: an integer tensor of shape [N] matching x's batch, each in [0, T).

    The range is checked for CPU tensors only: on an accelerator it would cost a host-device
    synchronisation (there, an out-of-range index trips the device's own bounds check).
    """
    check_tensor(x, "x")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a tensor of timestep indices, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"t must hold integer timestep indices, got dtype {t.dtype}")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape [{x.shape[0]}] (one index per example), got {tuple(t.shape)}")
    if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_timesteps):
        bad = t[(t < 0) | (t >= num_timesteps)][0].item()
        raise ValueError(f"timestep {bad} is out of range; accepted: 0..{num_timesteps - 1}")
    return t.long()


class Diffusion:
    """A Gaussian diffusion process composed from named parts.

    Build with :meth:`from_config`; construct directly only to supply your own ``betas``.

    Args:
        betas: float64 array ``[T]`` in (0, 1].
        parameterization: a :class:`~diffreg.parameterization.ModelParameterization`.
        loss: a :class:`~diffreg.loss.Loss`.
        timestep_map: for a respaced diffusion, the original index of each kept timestep
            (ascending, int64 ``[T]``); the model is always called with these original indices.
        config: the :class:`~diffreg.DiffusionConfig` it was built from, if any.

    Attributes:
        num_timesteps: T of this (possibly respaced) process.
        tables: the :class:`~diffreg.schedule.DiffusionTables`; each table is also an attribute
            (``betas``, ``alphas_cumprod``, ``posterior_variance``, ...), float64 numpy ``[T]``.
    """

    def __init__(
        self,
        betas: np.ndarray,
        parameterization: ModelParameterization,
        loss: Loss,
        *,
        timestep_map: Sequence[int] | np.ndarray | None = None,
        config: DiffusionConfig | None = None,
    ):
        self.tables = DiffusionTables(betas)
        self.num_timesteps = self.tables.num_timesteps
        self.parameterization = parameterization
        self.loss = loss
        self.config = config
        if timestep_map is None:
            timestep_map = range(self.num_timesteps)
        self.timestep_map = np.asarray(list(timestep_map), dtype=np.int64)
        if self.timestep_map.shape != (self.num_timesteps,):
            raise ValueError("timestep_map must have one entry per timestep")
        self.timestep_map.setflags(write=False)
        self._identity_map = bool(np.array_equal(self.timestep_map, np.arange(self.num_timesteps)))
        self._respaced_cache: dict[tuple[int, ...], Diffusion] = {}
        self.__dict__.pop("_process", None)  # made on first use (respace copies the instance)
        self._timestep_map_on: dict[str, torch.Tensor] = {}

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: DiffusionConfig | Mapping[str, Any]) -> Diffusion:
        """Build from a :class:`~diffreg.DiffusionConfig` or a plain dict, resolving every name
        through the plugin registry.

        Raises:
            ConfigError: malformed configuration.
            UnknownComponentError: a name no plugin registered (lists the known names).
            ComponentOptionError: an option the component does not accept.
        """
        from diffreg.process import Process

        cfg = DiffusionConfig.coerce(config)
        schedule = registry.create("schedule", cfg.schedule.name, cfg.num_timesteps, **cfg.schedule.options)
        mean_type = registry.create("parameterization", cfg.parameterization.name, **cfg.parameterization.options)
        variance_type = registry.create("variance", cfg.variance.name, **cfg.variance.options)
        loss = registry.create("loss", cfg.loss.name, **cfg.loss.options)
        # built once here so that a bad option value fails now, not at the first training step
        density = registry.create(
            "timestep_sampler", cfg.timestep_sampler.name, cfg.num_timesteps, **cfg.timestep_sampler.options
        )
        parameterization = ModelParameterization(mean_type, variance_type)
        if isinstance(schedule, Process) and not schedule.discrete:  # rectified_flow, edm, vp
            from diffreg.continuous import ContinuousDiffusion

            built = ContinuousDiffusion(schedule, parameterization, loss, config=cfg)
            built.create_timestep_sampler()  # a density without continuous times fails now
            return built
        if getattr(density, "continuous_only", False):
            raise ValueError(
                f"timestep sampler {cfg.timestep_sampler.name!r} draws noise levels of a continuous process; "
                f"schedule {cfg.schedule.name!r} is discrete: use uniform, logit_normal or loss_second_moment"
            )
        return cls(schedule.betas, parameterization, loss, config=cfg)

    def create_timestep_sampler(self) -> TimestepSampler:
        """The configured training timestep sampler (default ``uniform``) over this process."""
        spec = self.config.timestep_sampler if self.config is not None else None
        name, options = (spec.name, spec.options) if spec is not None else ("uniform", {})
        return registry.create("timestep_sampler", name, self.num_timesteps, **options)

    def respace(self, spec: str | Sequence[int]) -> Diffusion:
        """A diffusion over a subset of timesteps (guided-diffusion's ``SpacedDiffusion``).

        ``spec`` is ``"ddimN"``, section counts such as ``"10,10,10"`` (see
        :func:`~diffreg.schedule.space_timesteps`), or a list of indices of *this* process to keep.
        New betas are ``1 - abar[k_i] / abar[k_{i-1}]`` so that the kept marginals are unchanged;
        ``timestep_map`` holds the kept original indices (ascending).

        Raises:
            ValueError: impossible spec, empty, out-of-range or duplicate indices.
        """
        if isinstance(spec, str):
            keep = space_timesteps(self.num_timesteps, spec)
        else:
            if not isinstance(spec, (list, tuple, range, np.ndarray)) or not all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in spec
            ):
                raise TypeError(
                    f"respace takes 'ddimN', section counts like '10,10,10', or a list of int indices; got {spec!r}"
                )
            keep = [int(i) for i in spec]
            if not keep:
                raise ValueError("respace needs at least one timestep to keep")
            if len(set(keep)) != len(keep):
                raise ValueError(f"respace indices contain duplicates: {sorted(keep)}")
            bad = [i for i in keep if not 0 <= i < self.num_timesteps]
            if bad:
                raise ValueError(f"respace index {bad[0]} out of range; accepted: 0..{self.num_timesteps - 1}")
            keep = sorted(keep)
        key = tuple(keep)
        cached = self._respaced_cache.get(key)
        if cached is not None:
            return cached
        acp = self.tables.alphas_cumprod
        kept = acp[keep]
        new_betas = 1.0 - kept / np.append(1.0, kept[:-1])
        # the same class, with whatever a subclass or the caller set on this instance (overridden
        # methods, extra attributes), and the Diffusion state of the respaced process
        spaced = copy.copy(self)
        Diffusion.__init__(
            spaced,
            new_betas,
            self.parameterization,
            self.loss,
            timestep_map=self.timestep_map[keep],
            config=self.config,
        )
        if len(self._respaced_cache) > 16:
            self._respaced_cache.clear()
        self._respaced_cache[key] = spaced
        return spaced

    def __getattr__(self, name: str) -> Any:
        # betas, alphas_cumprod, posterior_variance, ...: the float64 tables.
        if name in DiffusionTables.NAMES:
            return getattr(self.tables, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"Diffusion(num_timesteps={self.num_timesteps}, {self.parameterization!r}, loss={self.loss!r})"

    # -- the model ------------------------------------------------------------------------------

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The model's time input for timesteps ``t`` of this process (same shape): the original-
        process indices (int64); with ``config.rescale_timesteps``, those indices as float32 times
        ``1000 / T`` (T of the original process), as improved-/guided-diffusion's
        ``_scale_timesteps`` and ``_WrappedModel``."""
        original = t if self._identity_map else self.tables_map(t.device)[t]
        if self.config is not None and self.config.rescale_timesteps:
            return original.float() * (1000.0 / self.config.num_timesteps)
        return original

    def tables_map(self, device) -> torch.Tensor:
        """``timestep_map`` as an int64 tensor on ``device`` (made once per device)."""
        key = str(device)
        cached = self._timestep_map_on.get(key)
        if cached is None:
            cached = self._timestep_map_on[key] = torch.tensor(np.array(self.timestep_map)).to(device)
        return cached

    @property
    def process(self) -> DiscreteProcess:
        """This diffusion as noise levels (:class:`~diffreg.process.DiscreteProcess`): alpha =
        sqrt(abar_t), sigma = sqrt(1 - abar_t), fractional timesteps by log-SNR interpolation; the
        network gets ``timestep_map[t]`` (times 1000 / T_original with ``rescale_timesteps``)."""
        process = self.__dict__.get("_process")
        if process is None:
            rescale = bool(getattr(self.config, "rescale_timesteps", False))
            original = self.config.num_timesteps if self.config is not None else self.num_timesteps
            process = DiscreteProcess(
                self.tables.alphas_cumprod,
                self.timestep_map,
                time_scale=1000.0 / original if rescale else 1.0,
                interpolation=self.__dict__.get("level_interpolation", "log_snr"),
            )
            self.__dict__["_process"] = process
        return process

    def call_model(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """``model(x, model_timesteps(t), **model_kwargs)``, the one place the network is called
        (``t``: int64 ``[N]`` timesteps of this process; see :meth:`model_timesteps`), ``x`` scaled
        first by a parameterization that preconditions its input (EDM's c_in)."""
        mean_type = self.parameterization.mean_type
        if mean_type.scales_input:
            x = mean_type.scale_input(x, *self.alpha_sigma(t, x))
        return model(x, self.model_timesteps(t), **(model_kwargs or {}))

    def alpha_sigma(self, t: torch.Tensor | int, x: torch.Tensor):
        """(alpha, sigma) = (sqrt(abar_t), sqrt(1 - abar_t)) at timesteps ``t`` (see
        :meth:`~diffreg.schedule.DiffusionTables.alpha_sigma`): Python floats for an int ``t``,
        float64 tensors ``[N, 1, ...]`` for int64 ``[N]``."""
        return self.tables.alpha_sigma(t, x)

    # -- forward process ------------------------------------------------------------------------

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0) (Ho et al. 2020, eq. 4).

        Returns a tuple of tensors broadcastable to ``x_start``'s shape ``[N, ...]``.
        """
        t = _check_t(t, x_start, self.num_timesteps)
        g = self.tables.gather
        mean = g("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = g("alphas_cumprod", t, x_start)
        variance = (1.0 - variance).expand_as(x_start)
        log_variance = g("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, eq. 4).

        Args:
            x_start: ``[N, ...]`` clean data.
            t: int64 ``[N]`` timesteps of this process.
            noise: standard normal noise of ``x_start``'s shape (drawn if ``None``).

        Raises:
            ValueError: ``noise`` or ``t`` of the wrong shape.
        """
        t = _check_t(t, x_start, self.num_timesteps)
        if noise is None:
            noise = torch.randn_like(x_start)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x_start.shape)}")
        g = self.tables.gather
        return g("sqrt_alphas_cumprod", t, x_start) * x_start + g("sqrt_one_minus_alphas_cumprod", t, x_start) * noise

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020,
        eqs. 6-7). Returns ``(mean, variance, log_variance_clipped)``, each of ``x_t``'s shape.
        """
        t = _check_t(t, x_t, self.num_timesteps)
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ in shape")
        g = self.tables.gather
        mean = axpby(g("posterior_mean_coef1", t, x_t), x_start, g("posterior_mean_coef2", t, x_t), x_t)
        variance = g("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = g("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 from x_t and eps (Ho et al. 2020, eq. 4 solved for x_0); shapes ``[N, ...]``."""
        return predict_xstart_from_eps(self.tables, x_t, _check_t(t, x_t, self.num_timesteps), eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """eps from x_t and x_0 (Ho et al. 2020, eq. 4 solved for eps); shapes ``[N, ...]``."""
        return predict_eps_from_xstart(self.tables, x_t, _check_t(t, x_t, self.num_timesteps), pred_xstart)

    # -- reverse process ------------------------------------------------------------------------

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Apply the model to get p(x_{t-1} | x_t) and the prediction of x_0.

        Args:
            model: called as ``model(x, t_original, **model_kwargs)``.
            x: ``[N, C, ...]`` at timesteps ``t`` (int64 ``[N]``).
            clip_denoised: clip ``pred_xstart`` to [-1, 1].
            denoised_fn: applied to ``pred_xstart`` before clipping.

        Returns:
            dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` and ``pred_eps``
            (all of ``x``'s shape), as guided-diffusion's ``p_mean_variance``.

        Raises:
            ValueError: model output of the wrong shape (naming the expected channels).
        """
        t = _check_t(t, x, self.num_timesteps)
        output = self.call_model(model, x, t, model_kwargs)
        pred = self.prediction_from_output(output, x, t, clip_denoised, denoised_fn)
        log_variance = torch.as_tensor(pred.log_variance, dtype=x.dtype, device=x.device)
        variance = torch.exp(log_variance) if pred.variance is None else torch.as_tensor(pred.variance)
        mean, _, _ = self.q_posterior_mean_variance(pred.pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance.expand_as(x),
            "log_variance": log_variance.expand_as(x),
            "pred_xstart": pred.pred_xstart,
            "pred_eps": pred.pred_eps,
        }

    def prediction_from_output(
        self,
        output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor | int,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        process_xstart: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """Raw network output -> :class:`~diffreg.parameterization.Prediction` (pred_xstart, pred_eps,
        log_variance, variance). ``pred_eps`` is recomputed from the processed ``pred_xstart``
        when it was clipped or changed, as guided-diffusion's DDIM does."""
        p = self.parameterization
        mean_part, var_part = p.split(output, x)
        alpha, sigma = self.tables.alpha_sigma(t, x)
        pred_xstart, eps = p.mean_type.predict(mean_part, x, alpha, sigma)
        pred_eps: torch.Tensor | Callable[[], torch.Tensor] = eps
        if denoised_fn is not None or clip_denoised or process_xstart is not None:
            if denoised_fn is not None:
                pred_xstart = denoised_fn(pred_xstart)
            if process_xstart is not None:
                pred_xstart = process_xstart(pred_xstart)
            if clip_denoised:
                # in place when pred_xstart is a tensor of our own, never on the model's output
                fresh = pred_xstart is not mean_part and pred_xstart is not output
                pred_xstart = pred_xstart.clamp_(-1, 1) if fresh and denoised_fn is None else pred_xstart.clamp(-1, 1)
            processed = pred_xstart
            pred_eps = lambda: eps_from_xstart(x, processed, alpha, sigma)  # noqa: E731
        # the variance only when asked (DDIM and the ODE solvers never do)
        return Prediction(
            pred_xstart,
            pred_eps,
            variances=lambda: p.variance_type.variance(self.tables, var_part, x, t),
            alpha=alpha,
            sigma=sigma,
        )

    # -- training and likelihood ----------------------------------------------------------------

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Mapping[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-example training loss terms at timesteps ``t``.

        Args:
            x_start: ``[N, C, ...]`` clean data in [-1, 1]; t: int64 ``[N]``;
            noise: the eps used to make x_t (drawn if ``None``).

        Returns:
            dict of float tensors ``[N]``: ``loss``, and ``mse`` / ``vb`` (bits per dimension)
            where the configured :class:`~diffreg.loss.Loss` computes them.
        """
        t = _check_t(t, x_start, self.num_timesteps)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        return self.loss(self, model, x_start, x_t, t, noise, model_kwargs or {})

    def vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One term of the variational bound, in bits per dimension (Ho et al. 2020, eq. 5):
        KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the discretized decoder NLL at t = 0.

        Returns dict with ``output`` ``[N]`` (bits/dim) and ``pred_xstart``.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    # guided-diffusion's private name, kept for code ported from it
    _vb_terms_bpd = vb_terms_bpd

    def prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, ``[N]``; not trained, ~0 for a good
        schedule."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl = normal_kl(qt_mean, qt_log_variance, torch.zeros_like(qt_mean), torch.zeros_like(qt_mean))
        return mean_flat(kl) / math.log(2.0)

    _prior_bpd = prior_bpd

    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Mapping[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The full variational bound, in bits per dimension, with its per-t terms.

        Args:
            x_start: ``[N, C, ...]`` data in [-1, 1].
            noise: if given, the same eps (shape of ``x_start``) is used at every t, making the
                evaluation reproducible; otherwise fresh noise per t (as guided-diffusion).

        Returns:
            dict with ``total_bpd`` ``[N]``, ``prior_bpd`` ``[N]``, and ``[N, T]`` tensors ``vb``,
            ``xstart_mse`` and ``mse`` (eps MSE), as guided-diffusion's ``calc_bpd_loop``: column
            0 is t = T-1, the last column t = 0.
        """
        if noise is not None and noise.shape != x_start.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x_start.shape)}")
        batch = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for step in reversed(range(self.num_timesteps)):
            t = torch.full((batch,), step, dtype=torch.long, device=x_start.device)
            eps = torch.randn_like(x_start) if noise is None else noise
            x_t = self.q_sample(x_start, t, noise=eps)
            out = self.vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            pred_eps = self.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((pred_eps - eps) ** 2))
        vb_t = torch.stack(vb, dim=1)
        prior = self.prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior,
            "prior_bpd": prior,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }

    # -- sampling (see diffreg.sampling) --------------------------------------------------------

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
            UnknownComponentError: an unknown grid; ValueError / TypeError: a bad ``steps``.
        """
        from diffreg.sampling import resolve_grid

        if steps is None and grid is None:
            return self.process.integer_times()
        if grid is None:
            grid = getattr(sampler, "grid", None) or "trailing"
        grid_obj = resolve_grid(grid)
        if steps is None:
            explicit = getattr(grid_obj, "times_", None)
            explicit = explicit if explicit is not None else getattr(grid_obj, "sigmas", None)
            steps = len(explicit) if explicit is not None else self.num_timesteps
        return grid_obj(self.process, steps)

    def sample(
        self,
        model,
        shape,
        sampler: Any = "ddim",
        steps: int | None = 50,
        spacing: str | None = None,
        grid: Any = None,
        **options,
    ) -> torch.Tensor:
        """Sample with any registered sampler (a name, or a built :class:`~diffreg.Sampler`) over
        ``steps`` noise levels of ``grid`` (see :meth:`grid_times`; ``spacing`` is the older
        spelling of the three spacing grids ``leading``, ``trailing``, ``linspace``;
        ``steps=None``: every timestep).

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
        times = self.grid_times(steps, grid, sampler_obj)
        return sample_loop(self, model, shape, sampler=sampler_obj, times=times, **driver_options)
