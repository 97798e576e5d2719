"""A :class:`~diffreg.Diffusion` over a continuous process (rectified flow, EDM, continuous VP).

``Diffusion.from_config`` builds a :class:`ContinuousDiffusion` when the ``schedule`` names a
continuous process (:mod:`diffreg.processes`). It samples with every registered sampler and grid
(``sample``), trains (``training_losses`` with float times ``t`` from the configured level
density) and noises data (``q_sample`` with float ``t``). guided-diffusion's table API
(``q_posterior_mean_variance``, ``p_sample``, ``p_mean_variance``, ``calc_bpd_loop``, ``respace``,
the coefficient tables) needs a discrete process: it raises ValueError naming the process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffreg import registry
from diffreg.config import DiffusionConfig
from diffreg.diffusion import Diffusion
from diffreg.loss import Loss, ProcessTimeSampler, TimestepSampler
from diffreg.parameterization import MeanAndVariance, Prediction, eps_from_xstart
from diffreg.processes import ContinuousProcess
from diffreg.schedule import DiffusionTables
from diffreg.validation import check_tensor

#: Diffusion methods that need guided-diffusion's timestep tables.
TABLE_METHODS = (
    "respace",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "predict_xstart_from_eps",
    "predict_eps_from_xstart",
    "p_mean_variance",
    "vb_terms_bpd",
    "_vb_terms_bpd",
    "prior_bpd",
    "_prior_bpd",
    "calc_bpd_loop",
    "p_sample",
    "ddim_sample",
    "ddim_reverse_sample",
    "p_sample_loop",
    "p_sample_loop_progressive",
    "ddim_sample_loop",
    "ddim_sample_loop_progressive",
    "ddim_reverse_sample_loop",
    "tables_map",
    "timestep_map_on",
)


def check_compatible(process: ContinuousProcess, parameterization: MeanAndVariance, loss: Any) -> None:
    """Refuse, with the reason, combinations that cannot work on a continuous process.

    Raises:
        ValueError: a learned variance, a loss that needs the timestep tables (``kl``), or a mean
            type whose :meth:`~diffreg.parameterization.Parameterization.check_process` refuses it.
    """
    if parameterization.learned_variance:
        raise ValueError(
            f"variance {parameterization.variance_type.name!r} is learned through guided-diffusion's discrete "
            f"variational bound (Nichol & Dhariwal 2021), which needs timestep tables; {process!r} is a "
            "continuous process: use variance 'fixed_small' (unused by its samplers)"
        )
    if getattr(loss, "needs_tables", False):
        raise ValueError(
            f"loss {loss!r} is the discrete variational bound and needs timestep tables; {process!r} is a "
            "continuous process: use mse, flow_matching or edm"
        )
    parameterization.mean_type.check_process(process)


class ContinuousDiffusion(Diffusion):
    """A diffusion whose process is continuous (see the module docstring).

    Args:
        process: a :class:`~diffreg.processes.ContinuousProcess`.
        parameterization, loss, config: as :class:`~diffreg.Diffusion`.

    Attributes:
        num_timesteps: ``None`` (there is no timestep table).

    Raises:
        ValueError: an incompatible parameterization or loss (:func:`check_compatible`).
    """

    def __init__(
        self,
        process: ContinuousProcess,
        parameterization: MeanAndVariance,
        loss: Loss,
        *,
        config: DiffusionConfig | None = None,
    ):
        check_compatible(process, parameterization, loss)
        self.parameterization = parameterization
        self.loss = loss
        self.config = config
        self.num_timesteps = None
        self.__dict__["_process"] = process

    @classmethod
    def from_parts(cls, process, parameterization, loss, config) -> ContinuousDiffusion:
        """Build (used by ``Diffusion.from_config``)."""
        return cls(process, parameterization, loss, config=config)

    def __getattr__(self, name: str) -> Any:
        if name in DiffusionTables.NAMES or name in ("tables", "timestep_map"):
            raise self.__dict__["_process"].no_tables(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"ContinuousDiffusion({self.process!r}, {self.parameterization!r}, loss={self.loss!r})"

    @property
    def process(self) -> ContinuousProcess:
        """The :class:`~diffreg.processes.ContinuousProcess`."""
        return self.__dict__["_process"]

    # -- times ----------------------------------------------------------------------------------

    def _check_t(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be a float tensor of process times, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(
                f"t must hold float times of {self.process!r} (in [0, {self.process.t_max}]), got dtype {t.dtype}"
            )
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape [{x.shape[0]}] (one time per example), got {tuple(t.shape)}")
        self.process.check_times(t)
        return t

    def alpha_sigma(self, t: torch.Tensor | float, x: torch.Tensor):
        """(alpha, sigma) at times ``t``: Python floats for a float ``t``; float64 tensors
        ``[N, 1, ...]`` (broadcastable to ``x``) for a float tensor ``[N]``."""
        if isinstance(t, (int, float)):
            level = self.process.level(t) if t != 0 else self.process.clean
            return level.alpha, level.sigma
        alpha, sigma = self.process.alpha_sigma_tensor(t)
        shape = t.shape + (1,) * (x.ndim - t.ndim)
        return alpha.reshape(shape), sigma.reshape(shape)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input at process times ``t`` (float32 ``[N]``)."""
        return self.process.model_time(t.double() if t.device.type != "mps" else t).to(torch.float32)

    def call_model(self, model, x, t, model_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
        """``model(x_in, time_input, **model_kwargs)`` at process times ``t`` (float ``[N]``), with
        the parameterization's input scaling (EDM's c_in) applied to ``x``."""
        mean_type = self.parameterization.mean_type
        if mean_type.scales_input:
            x = mean_type.scale_input(x, *self.alpha_sigma(t, x))
        return model(x, self.model_timesteps(t), **(model_kwargs or {}))

    def create_timestep_sampler(self) -> TimestepSampler:
        """The configured level density (default ``uniform``) bound to this process: its
        ``sample`` gives float times.

        Raises:
            ValueError: a density that draws integer timesteps only (naming the accepted ones).
        """
        spec = self.config.timestep_sampler if self.config is not None else None
        name, options = (spec.name, spec.options) if spec is not None else ("uniform", {})
        num = self.config.num_timesteps if self.config is not None else 1000
        density = registry.create("timestep_sampler", name, num, **options)
        if not callable(getattr(density, "sample_times", None)):
            raise ValueError(
                f"timestep sampler {name!r} draws integer timesteps of a discrete process; {self.process!r} is "
                "continuous: use uniform, logit_normal or log_normal"
            )
        return ProcessTimeSampler(density, self.process)

    # -- forward process and training ----------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = alpha(t) x_start + sigma(t) noise at float times ``t`` ``[N]`` (noise drawn if
        ``None``); ``x_start``'s shape and dtype.

        Raises:
            TypeError / ValueError: integer or out-of-range ``t``, ``noise`` of the wrong shape.
        """
        t = self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x_start.shape)}")
        alpha, sigma = self.alpha_sigma(t, x_start)
        return (alpha * x_start + sigma * noise).to(x_start.dtype)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict[str, torch.Tensor]:
        """Per-example loss terms at float times ``t`` ``[N]`` (see ``Diffusion.training_losses``)."""
        t = self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        return self.loss(self, model, x_start, x_t, t, noise, model_kwargs or {})

    def prediction_from_output(self, output, x, t, clip_denoised=True, denoised_fn=None, process_xstart=None):
        """Raw network output at time ``t`` (a float or float ``[N]``) -> a
        :class:`~diffreg.parameterization.Prediction` (no reverse-process variance)."""
        p = self.parameterization
        mean_part, _ = p.split(output, x)
        alpha, sigma = self.alpha_sigma(t, x)
        pred_xstart, eps = p.mean_type.predict(mean_part, x, alpha, sigma)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if process_xstart is not None:
            pred_xstart = process_xstart(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        if denoised_fn is not None or process_xstart is not None or clip_denoised:
            eps = eps_from_xstart(x, pred_xstart, alpha, sigma)

        def no_variance():
            raise self.process.no_tables("the reverse-process variance")

        return Prediction(pred_xstart, eps, variances=no_variance, alpha=alpha, sigma=sigma)


def _refuse(name: str):
    def method(self, *args: Any, **kwargs: Any) -> Any:
        raise self.process.no_tables(name)

    method.__name__ = name
    method.__doc__ = f"guided-diffusion's ``{name}`` needs timestep tables: raises ValueError on a continuous process."
    return method


for _name in TABLE_METHODS:
    setattr(ContinuousDiffusion, _name, _refuse(_name))
del _name

__all__ = ["ContinuousDiffusion", "check_compatible"]
