"""Timestep samplers and level densities for training (kind ``timestep_sampler``).

A :class:`TimestepSampler` draws training timesteps with importance weights that keep the
objective unbiased: ``uniform`` and ``loss_second_moment`` as guided-diffusion's ``resample.py``;
``logit_normal`` (Esser et al. 2024) and ``log_normal`` (Karras et al. 2022) for continuous
processes.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


class TimestepSampler(abc.ABC):
    """A distribution over training timesteps, with importance weights that keep the objective
    unbiased (kind ``timestep_sampler``; guided-diffusion's ``ScheduleSampler``).

    The factory is called as ``factory(num_timesteps, **options)``.
    """

    def __init__(self, num_timesteps: int):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)

    @abc.abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalized float64 weights ``[T]`` of each timestep."""

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` timesteps.

        Returns:
            ``(t, weights)``: int64 ``[batch_size]`` timesteps and float32 ``[batch_size]``
            importance weights ``1 / (T p(t))`` on ``device``.
        """
        w = self.weights()
        p = torch.as_tensor(w / np.sum(w), dtype=torch.float64)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (len(p) * p[t])
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def update_with_losses(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Tell the sampler the per-example losses of a step (no-op unless loss-aware)."""

    def state_dict(self) -> dict[str, Any]:
        """State to save with a training run (empty unless the sampler keeps history)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class UniformSampler(TimestepSampler):
    """Every timestep equally likely; weights are all 1."""

    def weights(self) -> np.ndarray:
        return np.ones(self.num_timesteps, dtype=np.float64)

    def sample(self, batch_size, device="cpu", generator=None):
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator)
        return t.to(device), torch.ones(batch_size, device=device)

    def sample_times(self, process, batch_size, generator=None):
        """Times of a continuous ``process`` uniform in [t_min, t_max] (float64 ``[batch_size]``, CPU)."""
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return process.t_min + u * (process.t_max - process.t_min)


class LossSecondMomentSampler(TimestepSampler):
    """Importance sampling p(t) proportional to sqrt(E[L_t^2]) over the last losses of each t
    (Nichol & Dhariwal 2021, eq. 18; guided-diffusion's ``LossSecondMomentResampler``).

    Uniform until every t has ``history_per_term`` losses; then mixed with ``uniform_prob`` of the
    uniform distribution.
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        if history_per_term < 1:
            raise ValueError(f"history_per_term must be >= 1, got {history_per_term}")
        if not 0 <= uniform_prob <= 1:
            raise ValueError(f"uniform_prob must be in [0, 1], got {uniform_prob}")
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([num_timesteps], dtype=np.int64)

    def warmed_up(self) -> bool:
        """Whether every timestep has a full loss history (until then: uniform)."""
        return bool((self._loss_counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones([self.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        if not np.sum(weights) > 0:  # every recent loss 0 (or NaN): no information, stay uniform
            return np.ones([self.num_timesteps], dtype=np.float64)
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_losses(self, t, losses):
        for t_i, loss in zip(t.tolist(), losses.detach().float().tolist(), strict=True):
            if self._loss_counts[t_i] == self.history_per_term:
                self._loss_history[t_i, :-1] = self._loss_history[t_i, 1:]
                self._loss_history[t_i, -1] = loss
            else:
                self._loss_history[t_i, self._loss_counts[t_i]] = loss
                self._loss_counts[t_i] += 1

    def state_dict(self):
        return {"loss_history": self._loss_history.copy(), "loss_counts": self._loss_counts.copy()}

    def load_state_dict(self, state):
        self._loss_history = np.array(state["loss_history"], dtype=np.float64)
        self._loss_counts = np.array(state["loss_counts"], dtype=np.int64)


class LogitNormalSampler(TimestepSampler):
    """SD3's logit-normal time density (Esser et al. 2024, "Scaling Rectified Flow Transformers",
    eq. 19): u = sigmoid(m + s n), n ~ N(0, 1), so that training concentrates on intermediate
    times. It changes the objective's weighting on purpose: the returned weights are all 1.

    On a continuous process the time is t = u t_max (clamped to [t_min, t_max]; for
    ``rectified_flow`` the flow time itself, before the sampling shift); on a discrete process the
    timestep is floor(u T).

    Args:
        num_timesteps: T of a discrete process (unused on a continuous one).
        mean, std: m and s (defaults 0 and 1, SD3's choice); std finite > 0.
    """

    def __init__(self, num_timesteps: int, mean: float = 0.0, std: float = 1.0):
        super().__init__(num_timesteps)
        self.mean = _finite(mean, "logit_normal mean")
        self.std = _finite(std, "logit_normal std", positive=True)

    def _u(self, batch_size, generator):
        return torch.sigmoid(self.mean + self.std * torch.randn(batch_size, generator=generator, dtype=torch.float64))

    def weights(self):
        edges = np.linspace(0.0, 1.0, self.num_timesteps + 1)
        with np.errstate(divide="ignore"):
            z = (np.log(edges) - np.log1p(-edges) - self.mean) / self.std
        cdf = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
        return np.diff(cdf)

    def sample(self, batch_size, device="cpu", generator=None):
        t = (self._u(batch_size, generator) * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)
        return t.to(device), torch.ones(batch_size, device=device)

    def sample_times(self, process, batch_size, generator=None):
        """float64 ``[batch_size]`` times of ``process`` (CPU)."""
        return (self._u(batch_size, generator) * process.t_max).clamp_(process.t_min, process.t_max)


class LogNormalSampler(TimestepSampler):
    """EDM's training noise levels (Karras et al. 2022, Table 1): ln s ~ N(P_mean, P_std^2) for
    the VE noise level s = sigma / alpha, mapped to the process's time by its log-SNR
    (lambda = -ln s) and clamped to [t_min, t_max]. Weights are all 1 (the density is part of
    EDM's objective). Continuous processes only: a discrete one is refused when the Diffusion is
    built.

    Args:
        num_timesteps: unused.
        P_mean, P_std: defaults -1.2 and 1.2 (EDM); P_std finite > 0.
    """

    continuous_only = True

    def __init__(self, num_timesteps: int, P_mean: float = -1.2, P_std: float = 1.2):
        super().__init__(num_timesteps)
        self.P_mean = _finite(P_mean, "log_normal P_mean")
        self.P_std = _finite(P_std, "log_normal P_std", positive=True)

    def weights(self):
        raise ValueError("log_normal draws noise levels of a continuous process; it has no per-timestep weights")

    def sample(self, batch_size, device="cpu", generator=None):
        raise ValueError(
            "log_normal draws noise levels of a continuous process (schedule rectified_flow, edm or vp); "
            "use uniform or logit_normal on a discrete schedule"
        )

    def sample_times(self, process, batch_size, generator=None):
        """float64 ``[batch_size]`` times of ``process`` (CPU)."""
        log_s = self.P_mean + self.P_std * torch.randn(batch_size, generator=generator, dtype=torch.float64)
        return torch.from_numpy(process.t_from_log_snr(-log_s.numpy()))


def _finite(value: Any, what: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")
    return float(value)


class ProcessTimeSampler(TimestepSampler):
    """A density's continuous form bound to a continuous process: what
    ``Diffusion.create_timestep_sampler`` returns there. :meth:`sample` gives float times
    and all-ones weights.

    Args:
        density: a sampler with ``sample_times(process, batch_size, generator)``.
        process: the :class:`~diffreg.processes.ContinuousProcess`.
    """

    def __init__(self, density: TimestepSampler, process: Any):
        self.density = density
        self.process = process
        self.num_timesteps = density.num_timesteps

    def weights(self):
        raise ValueError(f"{self.process!r} is continuous: its times have no per-timestep weights")

    def sample(self, batch_size, device="cpu", generator=None):
        """``(t, weights)``: float64 times ``[batch_size]`` (float32 on MPS) on ``device``, drawn on
        the CPU from ``generator``, and float32 ones."""
        t = self.density.sample_times(self.process, batch_size, generator=generator)
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        return t.to(device=device, dtype=dtype), torch.ones(batch_size, device=device)

    def state_dict(self):
        return self.density.state_dict()

    def load_state_dict(self, state):
        self.density.load_state_dict(state)

    def __repr__(self) -> str:
        return f"ProcessTimeSampler({type(self.density).__name__}, {self.process!r})"
