"""The composed diffusion: schedule + parameterization + loss, with guided-diffusion's API.

Method and argument names follow OpenAI's guided-diffusion ``gaussian_diffusion.py`` so code
written against it reads the same; for the same inputs the numbers agree to float32 precision.
Sampling methods delegate to the registered samplers through :mod:`diffreg.sampling`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from diffreg import registry
from diffreg.config import DiffusionConfig
from diffreg.likelihood import LikelihoodMethods
from diffreg.loss import Loss, TimestepSampler
from diffreg.parameterization import (
    MeanAndVariance,
    Prediction,
    eps_from_xstart,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
)
from diffreg.process import DiscreteProcess
from diffreg.sampling_methods import SamplingMethods
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


class Diffusion(LikelihoodMethods, SamplingMethods):
    """A Gaussian diffusion process composed from named parts.

    Build with :meth:`from_config`; construct directly only to supply your own ``betas``.

    Args:
        betas: float64 array ``[T]`` in (0, 1].
        parameterization: a :class:`~diffreg.parameterization.MeanAndVariance`.
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
        parameterization: MeanAndVariance,
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
        parameterization = MeanAndVariance(mean_type, variance_type)
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
        original = t if self._identity_map else self.timestep_map_on(t.device)[t]
        if self.config is not None and self.config.rescale_timesteps:
            return original.float() * (1000.0 / self.config.num_timesteps)
        return original

    def timestep_map_on(self, device) -> torch.Tensor:
        """``timestep_map`` (this process's timestep -> the original process's timestep, length
        ``num_timesteps``) as an int64 tensor ``[num_timesteps]`` on ``device``, made once per
        device and cached. Old name: :meth:`tables_map` (an alias)."""
        key = str(device)
        cached = self._timestep_map_on.get(key)
        if cached is None:
            cached = self._timestep_map_on[key] = torch.tensor(np.array(self.timestep_map)).to(device)
        return cached

    #: Old name of :meth:`timestep_map_on` (it returns the timestep map, not a table); kept as an alias.
    tables_map = timestep_map_on

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

    # -- training -------------------------------------------------------------------------------

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
