"""Training losses and timestep samplers: the interfaces and the standard implementations.

``Diffusion.training_losses`` noises ``x_start`` to ``x_t`` and hands the rest to a :class:`Loss`.
Built-ins (registered in :mod:`diffreg.builtin.losses`): ``mse``, ``rescaled_mse``, ``kl``,
``rescaled_kl``, as guided-diffusion's ``LossType``; timestep samplers ``uniform`` and
``loss_second_moment`` as its ``resample.py``.
"""

from __future__ import annotations

import abc
import math
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
        alpha, sigma = diffusion.alpha_sigma(t, x_start)
        target = parameterization.mean_type.target(x_start, noise, alpha, sigma)
        mse = mean_flat((target - mean_part) ** 2)
        if self.min_snr_gamma is not None:
            # in float64 from the table: in bf16, abar rounds to 1 at small t and SNR would be inf
            if t.is_floating_point():  # a continuous process: float64 alpha, sigma per example
                snr = (alpha**2 / sigma**2).reshape(-1)
            else:
                abar = diffusion.tables.on("alphas_cumprod", t.device)[t]
                snr = abar / (1 - abar)
            weight = torch.clamp(snr, max=self.min_snr_gamma) * parameterization.mean_type.x0_mse_factor(snr)
            mse = mse * weight.to(mse.dtype)
        terms["mse"] = mse
        terms["loss"] = mse + terms["vb"] if "vb" in terms else mse
        return terms

    def __repr__(self) -> str:
        return f"MSELoss(rescaled={self.rescaled}, min_snr_gamma={self.min_snr_gamma})"


class FlowMatchingLoss(Loss):
    """The conditional flow-matching loss (Lipman et al. 2023, eq. 23 with the optimal-transport
    path; Liu et al. 2023's rectified flow): ||u_theta(x_t, t) - (eps - x0)||^2 averaged over the
    data's dimensions, where u_theta is the network's velocity (the ``flow`` parameterization's
    output itself; for any other parameterization, pred_eps - pred_xstart of its prediction).

    Output terms: ``loss`` and ``mse`` (the same), ``[N]``.
    """

    def __call__(self, diffusion, model, x_start, x_t, t, noise, model_kwargs):
        parameterization = diffusion.parameterization
        mean_part, _ = parameterization.split(diffusion.call_model(model, x_t, t, model_kwargs), x_t)
        if parameterization.mean_type.name == "flow":
            velocity = mean_part
        else:
            x0, eps = parameterization.mean_type.predict(mean_part, x_t, *diffusion.alpha_sigma(t, x_t))
            velocity = eps - x0
        mse = mean_flat((velocity - (noise - x_start)) ** 2)
        return {"loss": mse, "mse": mse}

    def __repr__(self) -> str:
        return "FlowMatchingLoss()"


class EDMLoss(Loss):
    """EDM's loss (Karras et al. 2022, eq. 2 with Table 1's weighting): lambda(s) ||D(x_t) - x0||^2
    with lambda(s) = (s^2 + sd^2) / (s sd)^2, s = sigma / alpha the VE noise level and sd =
    ``sigma_data``; written (sigma^2 + alpha^2 sd^2) / (sigma sd)^2, finite at alpha = 0. With the
    ``edm`` parameterization (same sigma_data) it equals the plain MSE of its network output F on
    its target (lambda = 1 / c_out^2); with any other it is the same weighting of the x0 error.

    Args:
        sigma_data: finite > 0 (default 0.5).

    Output terms: ``loss`` and ``mse`` (the unweighted x0 error), ``[N]``.
    """

    def __init__(self, sigma_data: float = 0.5):
        if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not (
            math.isfinite(sigma_data) and sigma_data > 0
        ):
            raise ValueError(f"edm loss sigma_data must be a finite number > 0, got {sigma_data!r}")
        self.sigma_data = float(sigma_data)

    def __call__(self, diffusion, model, x_start, x_t, t, noise, model_kwargs):
        parameterization = diffusion.parameterization
        mean_part, _ = parameterization.split(diffusion.call_model(model, x_t, t, model_kwargs), x_t)
        alpha, sigma = diffusion.alpha_sigma(t, x_t)
        x0, _ = parameterization.mean_type.predict(mean_part, x_t, alpha, sigma)
        sd2 = self.sigma_data**2
        weight = ((sigma**2 + alpha**2 * sd2) / (sigma**2 * sd2)).reshape(-1)
        mse = mean_flat((x0 - x_start) ** 2)
        return {"loss": mse * weight.to(mse.dtype), "mse": mse}

    def __repr__(self) -> str:
        return f"EDMLoss(sigma_data={self.sigma_data})"


class KLLoss(Loss):
    """The variational bound itself: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or the decoder NLL at
    t = 0, in bits per dimension (Ho et al. 2020, eq. 5).

    Args:
        rescaled: multiply by ``T`` (guided-diffusion's ``RESCALED_KL``).

    Output terms: ``loss``.
    """

    #: needs guided-diffusion's tables (refused on a continuous process)
    needs_tables = True

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

    def __init__(self, num_timesteps: int, P_mean: float = -1.2, P_std: float = 1.2):  # noqa: N803
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
