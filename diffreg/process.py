"""A diffusion process as noise levels: x = alpha x0 + sigma eps at every level.

Samplers never read timestep tables: they see a process through :class:`NoiseLevel` points (the
signal scale ``alpha``, the noise scale ``sigma`` and the process's own time ``t``) and ask the
denoiser for a prediction at any of them. A :class:`Process` says

- which levels exist (its time ``t`` runs from ``t_min``, the least noisy, to ``t_max``),
- ``alpha`` and ``sigma`` as functions of ``t`` (:meth:`Process.alpha_sigma`), and the inverse
  from log-SNR (:meth:`Process.t_from_log_snr`), so a sampler can place a level anywhere,
- what the network receives as its time input (:meth:`Process.model_input`).

Terms (as in Kingma et al. 2021, "Variational Diffusion Models", and Lu et al. 2022, DPM-Solver):
log-SNR ``lambda = log(alpha / sigma)`` (``+inf`` at the data, ``-inf`` at pure noise); the
variance-exploding noise level ``sigma / alpha`` (Karras et al. 2022's sigma; k-diffusion's
``sigmas``) is :attr:`NoiseLevel.ve_sigma`.

:class:`DiscreteProcess` is guided-diffusion's discrete variance-preserving process (alpha_t =
sqrt(abar_t), sigma_t = sqrt(1 - abar_t) for integer t in [0, T-1], float64 tables); a fractional t
lies between two timesteps by linear interpolation of lambda (``interpolation="log_snr"``, as
k-diffusion's ``DiscreteSchedule`` interpolates log sigma), or snaps to the nearest timestep
(``"nearest"``, for networks that only accept integer timesteps).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class NoiseLevel:
    """One point of a process: x = alpha x0 + sigma eps.

    Attributes:
        t: the process's own time (a fractional timestep index for a discrete process; ``-1`` for
            the clean data level appended after a discrete process's last timestep).
        alpha: signal scale, float in [0, 1] for the built-in processes.
        sigma: noise scale, float >= 0 (0 only at the data).
    """

    t: float
    alpha: float
    sigma: float

    @property
    def log_snr(self) -> float:
        """lambda = log(alpha / sigma): ``+inf`` at sigma = 0, ``-inf`` at alpha = 0."""
        if self.sigma == 0.0:
            return math.inf
        if self.alpha == 0.0:
            return -math.inf
        return math.log(self.alpha) - math.log(self.sigma)

    @property
    def ve_sigma(self) -> float:
        """sigma / alpha, the variance-exploding noise level (``inf`` at alpha = 0)."""
        return math.inf if self.alpha == 0.0 else self.sigma / self.alpha

    @property
    def is_clean(self) -> bool:
        """Whether this is the data level (sigma = 0)."""
        return self.sigma == 0.0


class Process(abc.ABC):
    """Base class of processes: x_t = alpha(t) x0 + sigma(t) eps for t in [t_min, t_max].

    Subclasses implement :meth:`alpha_sigma`, :meth:`t_from_log_snr` and :meth:`model_input`.
    ``alpha`` must not increase and ``sigma / alpha`` must increase with t.
    """

    #: the least and the most noisy time of the process
    t_min: float = 0.0
    t_max: float = 1.0
    #: True when every level is an integer timestep (the network takes integer input)
    discrete: bool = False

    @abc.abstractmethod
    def alpha_sigma(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float64 ``(alpha, sigma)`` at times ``t`` (float64 array of any shape, in [t_min, t_max])."""

    @abc.abstractmethod
    def t_from_log_snr(self, log_snr: np.ndarray) -> np.ndarray:
        """The times (float64) whose log-SNR is ``log_snr``, clamped to [t_min, t_max]."""

    @abc.abstractmethod
    def model_input(self, t: float, batch: int, device: torch.device) -> torch.Tensor:
        """The network's time input for every example at time ``t``: a ``[batch]`` tensor on
        ``device`` (int64 where the process gives integer timesteps, float32 otherwise)."""

    def level(self, t: float) -> NoiseLevel:
        """The :class:`NoiseLevel` at time ``t``.

        Raises:
            ValueError: ``t`` outside [t_min, t_max] or not finite.
        """
        t = float(t)
        if not (self.t_min <= t <= self.t_max):
            raise ValueError(f"noise level time {t!r} is outside the process's range [{self.t_min}, {self.t_max}]")
        alpha, sigma = self.alpha_sigma(np.array([t]))
        return NoiseLevel(t, float(alpha[0]), float(sigma[0]))

    def level_at(self, *, log_snr: float | None = None, ve_sigma: float | None = None) -> NoiseLevel:
        """The level with the given log-SNR or variance-exploding sigma (one of them), clamped to
        the process's range: where a sampler places a point between grid levels."""
        if (log_snr is None) == (ve_sigma is None):
            raise TypeError("give exactly one of log_snr= and ve_sigma=")
        if ve_sigma is not None:
            log_snr = -math.log(ve_sigma) if ve_sigma > 0 else math.inf
        return self.level(float(self.t_from_log_snr(np.array([log_snr]))[0]))

    @property
    def clean(self) -> NoiseLevel:
        """The data level after the last step (alpha = 1, sigma = 0)."""
        return NoiseLevel(-1.0, 1.0, 0.0)

    def log_snr_range(self) -> tuple[float, float]:
        """(smallest finite log-SNR, largest): the span a continuous grid is laid over."""
        alpha, sigma = self.alpha_sigma(np.array([self.t_max, self.t_min], dtype=np.float64))
        lam = _log_snr(alpha, sigma)
        if not math.isfinite(lam[0]):  # pure noise at t_max (zero terminal SNR)
            lam[0] = self._finite_top_log_snr()
        return float(lam[0]), float(lam[1])

    def _finite_top_log_snr(self) -> float:
        raise ValueError(f"{type(self).__name__} has no finite log-SNR near t_max")


def _log_snr(alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma)


class DiscreteProcess(Process):
    """guided-diffusion's discrete variance-preserving process, as noise levels.

    Args:
        alphas_cumprod: float64 ``[T]`` (abar_t, decreasing; abar_{T-1} may be 0).
        timestep_map: the network's timestep for each of these (a respaced process keeps the
            original indices), int64 ``[T]``; default ``0..T-1``.
        time_scale: the network receives ``timestep_map[t] * time_scale`` (1 for guided-diffusion;
            improved-diffusion's ``rescale_timesteps`` is 1000 / T_original, given as a float).
        interpolation: ``"log_snr"`` (a fractional t lies between its two timesteps, linearly in
            lambda; in abar where the last one has abar = 0) or ``"nearest"`` (t is rounded).

    Raises:
        ValueError: an unknown ``interpolation``, or tables of different lengths.
    """

    discrete = True

    def __init__(
        self,
        alphas_cumprod: np.ndarray,
        timestep_map: Sequence[int] | np.ndarray | None = None,
        *,
        time_scale: float = 1.0,
        interpolation: str = "log_snr",
    ):
        if interpolation not in ("log_snr", "nearest"):
            raise ValueError(f"unknown interpolation {interpolation!r}; accepted: log_snr, nearest")
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.num_timesteps = len(self.alphas_cumprod)
        self.timestep_map = np.asarray(
            range(self.num_timesteps) if timestep_map is None else timestep_map, dtype=np.int64
        )
        if self.timestep_map.shape != self.alphas_cumprod.shape:
            raise ValueError("timestep_map must have one entry per timestep")
        self.time_scale = float(time_scale)
        self.interpolation = interpolation
        self.t_min, self.t_max = 0.0, float(self.num_timesteps - 1)
        self._alpha = np.sqrt(self.alphas_cumprod)
        self._sigma = np.sqrt(1.0 - self.alphas_cumprod)
        self._lam = _log_snr(self._alpha, self._sigma)

    def __repr__(self) -> str:
        return f"DiscreteProcess(T={self.num_timesteps}, interpolation={self.interpolation!r})"

    def alpha_sigma(self, t):
        t = np.asarray(t, dtype=np.float64)
        if self.interpolation == "nearest":
            t = np.round(t)
        lo = np.clip(np.floor(t).astype(np.int64), 0, self.num_timesteps - 1)
        hi = np.minimum(lo + 1, self.num_timesteps - 1)
        w = t - lo
        abar_lo, abar_hi = self.alphas_cumprod[lo], self.alphas_cumprod[hi]
        lam_lo, lam_hi = self._lam[lo], self._lam[hi]
        with np.errstate(invalid="ignore"):
            lam = (1.0 - w) * lam_lo + w * lam_hi
            abar_from_lam = 1.0 / (1.0 + np.exp(-2.0 * lam))  # sigmoid(2 lambda) = abar
        finite = np.isfinite(lam_lo) & np.isfinite(lam_hi)
        abar = np.where(finite, abar_from_lam, (1.0 - w) * abar_lo + w * abar_hi)
        abar = np.where(w == 0.0, abar_lo, abar)  # integer t: the table's own value, exactly
        return np.sqrt(abar), np.sqrt(1.0 - abar)

    def t_from_log_snr(self, log_snr):
        lam = np.asarray(log_snr, dtype=np.float64)
        table = self._lam  # decreasing in t; the last may be -inf
        finite = np.isfinite(table)
        top = int(np.flatnonzero(finite)[-1])
        # np.interp needs increasing x: reverse the finite part
        t = np.interp(lam, table[: top + 1][::-1], np.arange(top + 1, dtype=np.float64)[::-1])
        if top < self.num_timesteps - 1:  # abar = 0 at T-1: interpolate abar in the last interval
            with np.errstate(over="ignore"):  # lam = -inf or far below: exp -> inf, abar -> 0 (exact)
                abar = 1.0 / (1.0 + np.exp(-2.0 * np.clip(lam, -700, 700)))
            a_top = self.alphas_cumprod[top]
            beyond = lam < table[top]
            t = np.where(beyond, top + (a_top - abar) / a_top, t)
        t = np.where(lam == np.inf, 0.0, np.where(lam == -np.inf, self.t_max, t))
        if self.interpolation == "nearest":
            t = np.round(t)
        return np.clip(t, self.t_min, self.t_max)

    def _finite_top_log_snr(self) -> float:
        return float(self._lam[np.isfinite(self._lam)][-1])

    def model_input(self, t, batch, device):
        if self.interpolation == "nearest":
            t = float(round(t))
        if float(t).is_integer():
            value = int(self.timestep_map[int(t)])
            if self.time_scale == 1.0:
                return torch.full((batch,), value, dtype=torch.long, device=device)
            return torch.full((batch,), value * self.time_scale, dtype=torch.float32, device=device)
        lo = math.floor(t)
        w = t - lo
        mapped = (1.0 - w) * self.timestep_map[lo] + w * self.timestep_map[lo + 1]
        return torch.full((batch,), float(mapped) * self.time_scale, dtype=torch.float32, device=device)

    def integer_times(self) -> np.ndarray:
        """Every timestep, descending (T-1 .. 0): the levels of guided-diffusion's loops."""
        return np.arange(self.num_timesteps - 1, -1, -1, dtype=np.float64)
