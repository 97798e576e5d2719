"""Gaussian likelihood terms used by the variational bound (Ho et al. 2020, eq. 5; Nichol &
Dhariwal 2021, section 3.1), with guided-diffusion's ``losses.py`` formulas."""

from __future__ import annotations

import math

import torch


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: ``[N, ...]`` -> ``[N]``."""
    return tensor.mean(dim=tuple(range(1, tensor.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    Arguments broadcast against each other; the result has the broadcast shape.
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast approximation of the standard normal CDF (the tanh form used by guided-diffusion)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood, in nats, of 8-bit data ``x`` in [-1, 1] under N(means, exp(log_scales)^2)
    discretized into 256 bins of width 2/255, edge bins open (Ho et al. 2020, eq. 13).

    Args:
        x: data scaled to [-1, 1], shape ``[N, ...]``.
        means, log_scales: broadcastable to ``x``; ``log_scales`` is log of the standard deviation.

    Returns:
        A tensor of ``x``'s shape (log-probabilities, <= 0).
    """
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )
