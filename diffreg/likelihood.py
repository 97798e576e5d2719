"""The variational bound in bits per dimension: guided-diffusion's likelihood methods of a Diffusion.

:class:`LikelihoodMethods` is a base class of :class:`~diffreg.Diffusion` (the methods read its
tables, ``q_posterior_mean_variance`` and ``p_mean_variance``): ``vb_terms_bpd`` (one term,
Ho et al. 2020, eq. 5), ``prior_bpd`` and ``calc_bpd_loop`` (the whole bound with its per-t terms),
with guided-diffusion's names and column order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from diffreg.gaussian import discretized_gaussian_log_likelihood, mean_flat, normal_kl

Model = Callable[..., torch.Tensor]


class LikelihoodMethods:
    """The likelihood half of :class:`~diffreg.Diffusion` (see the module docstring)."""

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
