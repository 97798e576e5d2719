"""Training losses and timestep samplers: the interfaces and the standard implementations.

``Diffusion.training_losses`` noises ``x_start`` to ``x_t`` and hands the rest to a :class:`Loss`.
Built-ins (registered in :mod:`diffreg.builtin.losses`): ``mse``, ``rescaled_mse``, ``kl``,
``rescaled_kl``, as guided-diffusion's ``LossType``; timestep samplers ``uniform`` and
``loss_second_moment`` as its ``resample.py``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffreg.gaussian import mean_flat

if TYPE_CHECKING:
    from diffreg.diffusion import Diffusion


class Loss(abc.ABC):
    """A training objective (kind ``loss``).

    Called as ``loss(diffusion, model, x_start, x_t, t, noise, model_kwargs)`` with ``x_start``,
    ``x_t`` and ``noise`` of shape ``[N, C, ...]`` and int64 ``t`` of shape ``[N]``; returns a dict
    of per-example tensors ``[N]``, always with ``"loss"``.
    """

    @abc.abstractmethod
    def __call__(
        self,
        diffusion: Diffusion,
        model: Any,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        model_kwargs: Mapping[str, Any],
    ) -> dict[str, torch.Tensor]: ...


class MSELoss(Loss):
    """Regression of the mean channels onto the parameterization's target (Ho et al. 2020, eq. 14).

    With a learned variance, adds the variational-bound term computed on a detached mean, so the
    VB trains only the variance (the hybrid objective, Nichol & Dhariwal 2021, eq. 16).

    Args:
        rescaled: scale the VB term by ``T / 1000`` (guided-diffusion's ``RESCALED_MSE``).
        min_snr_gamma: if set, weight each example by min(SNR, gamma) on the x0 scale (Hang et al.
            2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 8), converted
            to the parameterization's target. Must be > 0.

    Output terms: ``loss``, ``mse`` and, with learned variance, ``vb`` (bits per dimension).
    """

    def __init__(self, rescaled: bool = False, min_snr_gamma: float | None = None):
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma!r}")
        self.rescaled = rescaled
        self.min_snr_gamma = min_snr_gamma

    def __call__(self, diffusion, model, x_start, x_t, t, noise, model_kwargs):
        parameterization = diffusion.parameterization
        model_output = diffusion.call_model(model, x_t, t, model_kwargs)
        mean_part, var_part = parameterization.split(model_output, x_t)
        terms: dict[str, torch.Tensor] = {}
        if var_part is not None:
            frozen = torch.cat([mean_part.detach(), var_part], dim=1)
            vb = diffusion.vb_terms_bpd(lambda *args, **kwargs: frozen, x_start, x_t, t, clip_denoised=False)["output"]
            terms["vb"] = vb * (diffusion.num_timesteps / 1000.0) if self.rescaled else vb
        target = parameterization.mean_type.target(x_start, noise, *diffusion.tables.alpha_sigma(t, x_start))
        mse = mean_flat((target - mean_part) ** 2)
        if self.min_snr_gamma is not None:
            # in float64 from the table: in bf16, abar rounds to 1 at small t and SNR would be inf
            abar = diffusion.tables.on("alphas_cumprod", t.device)[t]
            snr = abar / (1 - abar)
            weight = torch.clamp(snr, max=self.min_snr_gamma) * parameterization.mean_type.x0_mse_factor(snr)
            mse = mse * weight.to(mse.dtype)
        terms["mse"] = mse
        terms["loss"] = mse + terms["vb"] if "vb" in terms else mse
        return terms

    def __repr__(self) -> str:
        return f"MSELoss(rescaled={self.rescaled}, min_snr_gamma={self.min_snr_gamma})"


class KLLoss(Loss):
    """The variational bound itself: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or the decoder NLL at
    t = 0, in bits per dimension (Ho et al. 2020, eq. 5).

    Args:
        rescaled: multiply by ``T`` (guided-diffusion's ``RESCALED_KL``).

    Output terms: ``loss``.
    """

    def __init__(self, rescaled: bool = False):
        self.rescaled = rescaled

    def __call__(self, diffusion, model, x_start, x_t, t, noise, model_kwargs):
        loss = diffusion.vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
        if self.rescaled:
            loss = loss * diffusion.num_timesteps
        return {"loss": loss}

    def __repr__(self) -> str:
        return f"KLLoss(rescaled={self.rescaled})"


# -- timestep samplers -----------------------------------------------------------------------------


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
