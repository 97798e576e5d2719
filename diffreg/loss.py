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


def vb_term(
    diffusion: Diffusion,
    mean_part: torch.Tensor,
    var_part: torch.Tensor,
    x_start: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """The variational-bound term of the hybrid objective, training only the variance (public
    helper for loss plugins; Nichol & Dhariwal 2021, eq. 16 and Sec. 3.1, as guided-diffusion's
    ``training_losses`` with a learned variance).

    Computes :meth:`Diffusion.vb_terms_bpd` (KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
    the discretized decoder NLL at t = 0, in bits per dimension) for the network output
    ``cat([mean_part.detach(), var_part], dim=1)``: the mean is frozen, so the gradient reaches
    only ``var_part``. Unscaled: guided-diffusion's ``RESCALED_MSE`` multiplies it by ``T / 1000``
    (:class:`MSELoss` does so with ``rescaled=True``). The hybrid loss is then
    ``mse + vb_term(...)`` (per example).

    Args:
        diffusion: a discrete-time :class:`~diffreg.diffusion.Diffusion` with a learned variance.
        mean_part, var_part: the two halves of the raw network output, as returned by
            ``diffusion.parameterization.split(output, x_t)``; each ``x_t``'s shape ``[N, C, ...]``.
        x_start, x_t: clean data and its noised version, ``[N, C, ...]`` float.
        t: int64 timesteps ``[N]``.

    Returns:
        ``[N]`` tensor of bits per dimension (``x_t``'s dtype).

    Raises:
        ValueError: ``var_part`` is None (the variance is not learned: there is no VB term to
            train) or the halves' shapes differ from ``x_t``'s.
        Whatever ``Diffusion.vb_terms_bpd`` raises (a continuous process has no tables for it).
    """
    if var_part is None:
        raise ValueError(
            f"vb_term needs the variance half of the output; got var_part=None (variance "
            f"{diffusion.parameterization.variance_type.name!r} is not learned: use a learned variance)"
        )
    for label, part in (("mean_part", mean_part), ("var_part", var_part)):
        if tuple(part.shape) != tuple(x_t.shape):
            raise ValueError(f"vb_term: {label} has shape {tuple(part.shape)}; expected x_t's {tuple(x_t.shape)}")
    frozen = torch.cat([mean_part.detach(), var_part], dim=1)
    return diffusion.vb_terms_bpd(lambda *args, **kwargs: frozen, x_start, x_t, t, clip_denoised=False)["output"]


class MSELoss(Loss):
    """Regression of the mean channels onto the parameterization's target (Ho et al. 2020, eq. 14).

    With a learned variance, adds the variational-bound term computed on a detached mean, so the
    VB trains only the variance (the hybrid objective, Nichol & Dhariwal 2021, eq. 16), as
    :func:`vb_term`.

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
            vb = vb_term(diffusion, mean_part, var_part, x_start, x_t, t)
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


# the timestep samplers moved to diffreg.timestep_samplers; importable from here as before
from diffreg.timestep_samplers import (  # noqa: E402
    LogitNormalSampler,
    LogNormalSampler,
    LossSecondMomentSampler,
    ProcessTimeSampler,
    TimestepSampler,
    UniformSampler,
)

__all__ = [
    "EDMLoss",
    "FlowMatchingLoss",
    "KLLoss",
    "LogNormalSampler",
    "LogitNormalSampler",
    "Loss",
    "LossSecondMomentSampler",
    "MSELoss",
    "ProcessTimeSampler",
    "TimestepSampler",
    "UniformSampler",
    "vb_term",
]
