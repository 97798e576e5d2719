"""Continuous processes: rectified flow, EDM (variance exploding) and continuous-time VP.

Each is a :class:`~diffreg.process.Process` (x = alpha(t) x0 + sigma(t) eps at any real t) and is
chosen by name through the ``schedule`` kind, like the discrete schedules::

    Diffusion.from_config({"schedule": "rectified_flow", "parameterization": "flow"})
    Diffusion.from_config({"schedule": {"name": "edm", "sigma_max": 80}, "parameterization": "edm"})

so a factory of kind ``schedule`` returns either a :class:`~diffreg.NoiseSchedule` with a betas
table (a discrete process) or a :class:`ContinuousProcess` (which is one too, for the registry, but
has no betas: ``num_timesteps`` is accepted and ignored). Every continuous process's data level is
``t = 0`` (:attr:`ContinuousProcess.clean`); ``t_min`` > 0 is the least noisy level a grid visits
(and the floor of training times), ``t_max`` the noisiest.

=================  ==========================================  ================================
name               alpha(t), sigma(t)                          network time input (default)
=================  ==========================================  ================================
``rectified_flow`` 1 - s, s with s = shift t / (1 + (shift-1) t)  s * t_scale (t_scale = 1)
``edm``            1, t (t = sigma in [0.002, 80])             log(sigma) / 4 (EDM's c_noise)
``vp``             VP linear or cosine in t in [1e-3, 1]        t * t_scale (t_scale = 1)
=================  ==========================================  ================================

Sources: rectified flow (Liu et al. 2023; Lipman et al. 2023's conditional OT path), SD3's shift
(Esser et al. 2024, "Scaling Rectified Flow Transformers", eq. 23, and diffusers'
``FlowMatchEulerDiscreteScheduler``); EDM (Karras et al. 2022, Table 1); continuous VP (Song et
al. 2021, "Score-Based Generative Modeling through SDEs", eq. 33, beta in [0.1, 20]; the cosine
schedule of Nichol & Dhariwal 2021 in continuous time, with DPM-Solver's ``NoiseScheduleVP``
end time 0.9946).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from diffreg.process import NoiseLevel, Process, _log_snr
from diffreg.schedule import NoiseSchedule
from diffreg.validation import check_finite_number


def _xp(t: Any):
    """numpy or torch, whichever ``t`` belongs to (the formulas are written once for both)."""
    return torch if isinstance(t, torch.Tensor) else np


class ContinuousProcess(Process, NoiseSchedule):
    """Base class of continuous processes (a :class:`~diffreg.process.Process` at every real
    ``t`` in ``[t_min, t_max]``, the data at ``t = 0``).

    Subclasses implement ``_alpha_sigma(t, xp)`` once for numpy arrays and torch tensors (``xp``
    is the module), :meth:`t_from_log_snr`, ``model_time(sigma_or_t)`` (the network's time input
    as a function of t, array in, array out) and :meth:`t_from_model_time` (its inverse).

    Attributes:
        name: the registered name (used in error messages).
        prior_std: standard deviation of x at ``t_max`` that sampling starts from
            (x_T = prior_std z): 1 for flow and VP, ``sigma_max`` for EDM.
    """

    name = "continuous"
    discrete = False
    prior_std = 1.0

    def __init__(self, num_timesteps: int | None = None):
        # NoiseSchedule.__init__ is not called: there is no betas table
        self.num_timesteps = None

    # -- NoiseSchedule's table API, refused by name ---------------------------------------------

    def compute_betas(self, num_timesteps):
        raise self.no_tables("betas")

    @property
    def betas(self):
        """A continuous process has no betas: raises ValueError."""
        raise self.no_tables("betas")

    def no_tables(self, what: str) -> ValueError:
        """The error for a discrete-only operation ``what`` on this process."""
        return ValueError(
            f"{what} needs a discrete process with timestep tables; {self!r} is a continuous "
            "process (use Diffusion.sample / training_losses / q_sample with float t instead)"
        )

    # -- alpha, sigma --------------------------------------------------------------------------

    def _alpha_sigma(self, t, xp):
        raise NotImplementedError

    def alpha_sigma(self, t):
        """float64 ``(alpha, sigma)`` at times ``t`` (numpy float64 array, any shape); ``t = 0``
        is the data (alpha = 1, sigma = 0)."""
        return self._alpha_sigma(np.asarray(t, dtype=np.float64), np)

    def alpha_sigma_tensor(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` at a float tensor of times ``t`` (any shape), computed in float64 on
        ``t``'s device (float32 on MPS), same shape as ``t``."""
        dtype = torch.float32 if t.device.type == "mps" else torch.float64
        return self._alpha_sigma(t.to(dtype), torch)

    @property
    def clean(self) -> NoiseLevel:
        """The data level, ``t = 0`` (alpha = 1, sigma = 0)."""
        return NoiseLevel(0.0, 1.0, 0.0)

    def model_time(self, t):
        """The network's time input at times ``t`` (numpy array or tensor, same type and shape)."""
        raise NotImplementedError

    def t_from_model_time(self, values: np.ndarray) -> np.ndarray:
        """The times whose network time input is ``values`` (float64 numpy): the inverse of
        :meth:`model_time`."""
        raise NotImplementedError

    def model_input(self, t, batch, device):
        value = float(self.model_time(np.array([float(t)]))[0])
        return torch.full((batch,), value, dtype=torch.float32, device=device)

    def check_times(self, t: torch.Tensor) -> None:
        """Raise ValueError naming the first time of ``t`` (float tensor, CPU checked only)
        outside ``[0, t_max]``."""
        if t.device.type == "cpu" and t.numel():
            bad = ~((t >= 0) & (t <= self.t_max))
            if bool(bad.any()):
                raise ValueError(f"time {float(t[bad][0])!r} is outside {self!r}'s range [0, {self.t_max}]")

    def _finite_top_log_snr(self) -> float:
        # alpha = 0 at t_max (pure noise): the log-SNR grids start their warp at the level that
        # mirrors t_min
        alpha, sigma = self.alpha_sigma(np.array([self.t_max - self.t_min]))
        return float(_log_snr(alpha, sigma)[0])

    def __repr__(self) -> str:
        # the options that differ from their defaults, by the factory's own names
        import inspect

        shown = []
        for key, param in inspect.signature(type(self).__init__).parameters.items():
            if param.kind is param.KEYWORD_ONLY:
                value = getattr(self, {"model_input": "model_input_kind"}.get(key, key), param.default)
                if value != param.default:
                    shown.append(f"{key}={value!r}")
        return f"{self.name}({', '.join(shown)})"


def _range(t_min: float, t_max: float, low: float, high: float, what: str) -> tuple[float, float]:
    t_min = check_finite_number(t_min, f"{what} t_min")
    t_max = check_finite_number(t_max, f"{what} t_max")
    if not low < t_min < t_max <= high:
        raise ValueError(f"{what}: need {low} < t_min < t_max <= {high}, got t_min={t_min!r}, t_max={t_max!r}")
    return t_min, t_max


class RectifiedFlow(ContinuousProcess):
    """Rectified flow / conditional optimal-transport path: x_t = (1 - s) x0 + s eps with the
    shifted time s = shift t / (1 + (shift - 1) t) (SD3, Esser et al. 2024, eq. 23; shift = 1:
    s = t, Liu et al. 2023, Lipman et al. 2023). The network gets ``s * t_scale`` (SD3-style
    models take t_scale = 1000).

    Args:
        num_timesteps: ignored (a continuous process).
        shift: SD3's time shift, a finite number > 0 (default 1: none; SD3 uses 3).
        resolution, base_resolution: the resolution-dependent shift of SD3 (section 5.3.2):
            with ``resolution`` given, the shift is multiplied by resolution / base_resolution
            (= sqrt(m / n) for m, n pixels; shifts compose by multiplying, since each multiplies
            the odds s / (1 - s)).
        t_scale: multiplier of the network's time input, finite > 0 (default 1).
        t_min: the least noisy level grids visit, in (0, 1) (default 1e-3: diffusers'
            ``FlowMatchEulerDiscreteScheduler`` sigma_min with 1000 training steps).

    Raises:
        ValueError / TypeError: an option out of range (naming it).
    """

    name = "rectified_flow"

    def __init__(
        self,
        num_timesteps: int | None = None,
        *,
        shift: float = 1.0,
        resolution: int | None = None,
        base_resolution: int = 256,
        t_scale: float = 1.0,
        t_min: float = 1e-3,
    ):
        super().__init__(num_timesteps)
        self.shift = check_finite_number(shift, "rectified_flow shift", minimum=1e-6)
        if resolution is not None:
            for what, v in (("resolution", resolution), ("base_resolution", base_resolution)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"rectified_flow {what} must be a positive int, got {v!r}")
        self.resolution = resolution
        self.base_resolution = base_resolution
        self.t_scale = check_finite_number(t_scale, "rectified_flow t_scale", minimum=1e-12)
        self.t_min, self.t_max = _range(t_min, 1.0, 0.0, 1.0, "rectified_flow")
        self._shift = self.shift * (resolution / base_resolution if resolution is not None else 1.0)

    @property
    def effective_shift(self) -> float:
        """``shift`` times the resolution factor."""
        return self._shift

    def shifted(self, t):
        """s(t) = shift t / (1 + (shift - 1) t): the flow's noise level at time t."""
        if self._shift == 1.0:
            return t
        return self._shift * t / (1.0 + (self._shift - 1.0) * t)

    def _unshift(self, s):
        if self._shift == 1.0:
            return s
        return s / (self._shift - (self._shift - 1.0) * s)

    def _alpha_sigma(self, t, xp):
        s = self.shifted(t)
        return 1.0 - s, s

    def t_from_log_snr(self, log_snr):
        lam = np.asarray(log_snr, dtype=np.float64)
        s = 1.0 / (1.0 + np.exp(np.clip(lam, -700, 700)))  # lambda = log((1 - s) / s)
        return np.clip(self._unshift(s), self.t_min, self.t_max)

    def model_time(self, t):
        return self.shifted(t) * self.t_scale

    def t_from_model_time(self, values):
        return self._unshift(np.asarray(values, dtype=np.float64) / self.t_scale)


class EDM(ContinuousProcess):
    """The variance-exploding process of Karras et al. 2022 ("Elucidating the Design Space",
    Table 1): alpha = 1, sigma = t, t in [sigma_min, sigma_max]; sampling starts from
    x = sigma_max z.

    Args:
        num_timesteps: ignored.
        sigma_min, sigma_max: the range, 0 < sigma_min < sigma_max (default 0.002, 80).
        model_input: the network's time input: ``"c_noise"`` (log(sigma) / 4, EDM's Table 1,
            the default) or ``"sigma"`` (sigma itself).

    Raises:
        ValueError / TypeError: an option out of range or an unknown ``model_input``.
    """

    name = "edm"

    def __init__(
        self,
        num_timesteps: int | None = None,
        *,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        model_input: str = "c_noise",
    ):
        super().__init__(num_timesteps)
        self.t_min, self.t_max = _range(sigma_min, sigma_max, 0.0, math.inf, "edm (sigma_min, sigma_max)")
        self.sigma_min, self.sigma_max = self.t_min, self.t_max
        if model_input not in ("c_noise", "sigma"):
            raise ValueError(f"edm model_input must be 'c_noise' (log(sigma) / 4) or 'sigma', got {model_input!r}")
        self.model_input_kind = model_input
        self.prior_std = self.sigma_max

    def _alpha_sigma(self, t, xp):
        return (xp.ones_like(t) if xp is torch else np.ones_like(t)), t * 1.0

    def t_from_log_snr(self, log_snr):
        lam = np.asarray(log_snr, dtype=np.float64)
        return np.clip(np.exp(-np.clip(lam, -700, 700)), self.t_min, self.t_max)

    def model_time(self, t):
        if self.model_input_kind == "sigma":
            return t * 1.0
        return _xp(t).log(t) / 4.0

    def t_from_model_time(self, values):
        values = np.asarray(values, dtype=np.float64)
        return values if self.model_input_kind == "sigma" else np.exp(4.0 * values)


class ContinuousVP(ContinuousProcess):
    """Variance-preserving process in continuous time, alpha^2 + sigma^2 = 1:

    - ``kind="linear"``: log alpha(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2 (Song et
      al. 2021, "Score-Based Generative Modeling through SDEs", eq. 33; the continuous limit of
      Ho et al. 2020's linear betas with beta_min = 0.1, beta_max = 20);
    - ``kind="cosine"``: alpha(t) = cos(pi/2 (t + s) / (1 + s)) / cos(pi/2 s / (1 + s)) (Nichol &
      Dhariwal 2021, eq. 17 in continuous time; t_max 0.9946 as DPM-Solver's ``NoiseScheduleVP``).

    Args:
        num_timesteps: ignored.
        kind: ``"linear"`` or ``"cosine"``.
        beta_min, beta_max: of the linear kind (0 <= beta_min < beta_max).
        s: the cosine offset (>= 0, default 0.008).
        t_min, t_max: the level range (default 1e-3 and 1, or 0.9946 for cosine).
        t_scale: multiplier of the network's time input t (default 1; 1000 for networks trained
            on DDPM timesteps, as score_sde's continuous models use 999).

    Raises:
        ValueError / TypeError: an unknown kind or an option out of range.
    """

    name = "vp"

    def __init__(
        self,
        num_timesteps: int | None = None,
        *,
        kind: str = "linear",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        s: float = 0.008,
        t_min: float = 1e-3,
        t_max: float | None = None,
        t_scale: float = 1.0,
    ):
        super().__init__(num_timesteps)
        if kind not in ("linear", "cosine"):
            raise ValueError(f"vp kind must be 'linear' or 'cosine', got {kind!r}")
        self.kind = kind
        self.beta_min = check_finite_number(beta_min, "vp beta_min", minimum=0.0)
        self.beta_max = check_finite_number(beta_max, "vp beta_max", minimum=0.0)
        if kind == "linear" and not self.beta_min < self.beta_max:
            raise ValueError(f"vp: need beta_min < beta_max, got {beta_min!r} and {beta_max!r}")
        self.s = check_finite_number(s, "vp s", minimum=0.0)
        self.t_min, self.t_max = _range(t_min, (0.9946 if kind == "cosine" else 1.0) if t_max is None else t_max, 0.0, 1.0, "vp")
        self.t_scale = check_finite_number(t_scale, "vp t_scale", minimum=1e-12)
        self._cos0 = math.cos(math.pi / 2 * self.s / (1 + self.s))

    def _log_alpha(self, t, xp):
        if self.kind == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return xp.log(xp.cos(math.pi / 2 * (t + self.s) / (1 + self.s))) - math.log(self._cos0)

    def _alpha_sigma(self, t, xp):
        log_alpha = self._log_alpha(t, xp)
        alpha = xp.exp(log_alpha)
        # sigma = sqrt(1 - alpha^2) = sqrt(-expm1(2 log alpha)), exact near t = 0
        return alpha, xp.sqrt(-xp.expm1(2.0 * log_alpha))

    def t_from_log_snr(self, log_snr):
        lam = np.clip(np.asarray(log_snr, dtype=np.float64), -700, 700)
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lam)  # alpha^2 = sigmoid(2 lambda)
        if self.kind == "linear":  # DPM-Solver's inverse_lambda: solve the quadratic for t
            db = self.beta_max - self.beta_min
            t = 4.0 * -log_alpha / (self.beta_min + np.sqrt(self.beta_min**2 + 4.0 * db * -log_alpha))
        else:
            t = 2.0 * (1 + self.s) / math.pi * np.arccos(np.exp(log_alpha + math.log(self._cos0))) - self.s
        return np.clip(t, self.t_min, self.t_max)

    def model_time(self, t):
        return t * self.t_scale

    def t_from_model_time(self, values):
        return np.asarray(values, dtype=np.float64) / self.t_scale


__all__ = ["EDM", "ContinuousProcess", "ContinuousVP", "RectifiedFlow"]
