"""Built-in samplers: ``ddpm`` (ancestral) and ``ddim``, over the denoiser at any noise level.

Notation: a step goes from level (alpha, sigma) to the next, less noisy level (alpha', sigma');
x = alpha x0 + sigma eps. Both update rules are written once, here (:func:`ddpm_update`,
:func:`ddim_coefficients`), and guided-diffusion's single-step API (``p_sample``, ``ddim_sample``)
calls the same functions with per-example coefficients.
"""

from __future__ import annotations

import numpy as np
import torch

from diffreg import hookimpl
from diffreg.sampling.context import exp
from diffreg.sampling.contract import Sampler
from diffreg.schedule import axpby
from diffreg.validation import check_finite_number


def _nonnegative(v):
    """max(v, 0) for numpy arrays, floats or tensors (rounding below 0 of a difference that is >= 0)."""
    return v.clamp(min=0.0) if isinstance(v, torch.Tensor) else np.maximum(v, 0.0)


def posterior_coefficients(alpha, sigma, alpha_next, sigma_next):
    """Mean coefficients and variance of q(x' | x, x0) for x' at the next level (Ho et al. 2020,
    eqs. 6-7; for any alpha, sigma: Kingma et al. 2021, eq. 28): with a = alpha / alpha',
    s2 = sigma^2 - a^2 sigma'^2,

        mean = (alpha' s2 / sigma^2) x0 + (a sigma'^2 / sigma^2) x,   var = s2 sigma'^2 / sigma^2.

    float64 arrays, floats or float64 tensors in, ``(coef_x0, coef_x, variance)`` out; for a discrete VP process
    these are guided-diffusion's ``posterior_mean_coef1/2`` and ``posterior_variance``.
    """
    a = alpha / alpha_next
    s2 = _nonnegative(sigma**2 - a**2 * sigma_next**2)
    return alpha_next * s2 / sigma**2, a * sigma_next**2 / sigma**2, s2 * sigma_next**2 / sigma**2


def ddpm_update(x, pred_xstart, coef_x0, coef_x, std, noise):
    """x' = coef_x0 x0 + coef_x x + std z: one ancestral step (Ho et al. 2020, Algorithm 2).
    Coefficients are Python floats or tensors broadcastable to ``x``; ``noise`` may be ``None``
    where ``std`` is 0."""
    mean = axpby(coef_x0, pred_xstart, coef_x, x)
    return mean if noise is None else mean + std * noise


def ddim_coefficients(alpha, sigma, alpha_next, sigma_next, eta):
    """DDIM (Song et al. 2021, eq. 12 with eq. 16's sigma scaled by ``eta``), on x0 and x:

        x' = alpha' x0 + sqrt(sigma'^2 - c^2) eps + c z,  eps = (x - alpha x0) / sigma
           = k_x0 x0 + k_x x + c z,

    c = eta (sigma' / sigma) sqrt(sigma^2 - (alpha / alpha')^2 sigma'^2) (= eq. 16 for a
    variance-preserving process). float64 arrays, floats or tensors in; ``(k_x0, k_x, c)`` out.
    """
    _, _, var = posterior_coefficients(alpha, sigma, alpha_next, sigma_next)
    c = eta * var**0.5
    c_eps = _nonnegative(sigma_next**2 - c**2) ** 0.5
    return alpha_next - c_eps * alpha / sigma, c_eps / sigma, c


def check_eta(eta) -> float:
    """``eta`` as a float in [0, 1] (0: deterministic DDIM, 1: the DDPM posterior variance; Song
    et al. 2021, eq. 16).

    Raises:
        TypeError: not a number. ValueError: outside [0, 1], NaN or infinite (above 1 the eps
        coefficient sqrt(sigma'^2 - c^2) would be clipped to 0: not a DDIM step any more).
    """
    try:
        value = check_finite_number(eta, "eta", minimum=0.0)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc} (accepted: 0..1; 0: deterministic DDIM, 1: DDPM-like)") from None
    if value > 1.0:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")
    return value


class DDPM(Sampler):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): x' = mu(x, x0) + sigma_t z with the
    posterior mean of eq. 7 and the parameterization's variance (learned variance honoured); on a
    respaced grid, guided-diffusion's respaced ``p_sample_loop``. The last step adds no noise.
    Under CFG++ the posterior mean is taken from x^ = alpha x0 + sigma eps_uncond
    (:meth:`~diffreg.sampling.SamplingContext.renoise`): alpha' x0 + sqrt(sigma'^2 - var) eps_uncond."""

    order = 1
    nfe_per_step = 1
    stochastic = True
    supports_unconditional_renoise = True

    def steps(self, ctx, x):
        lv = ctx.levels
        coef_x0, coef_x, _ = posterior_coefficients(lv.alpha[:-1], lv.sigma[:-1], lv.alpha[1:], lv.sigma[1:])
        for i in range(ctx.num_steps):
            pred = ctx.denoise(x, i, condition_score=False)
            last = ctx.is_last(i)
            mean = ddpm_update(ctx.renoise(x, pred), pred.pred_xstart, float(coef_x0[i]), float(coef_x[i]), 0.0, None)
            mean = ctx.condition_mean(mean, pred, x, i)
            if not last:
                std = exp(0.5 * pred.log_variance)  # a float for fixed variances: one fused add
                noise = ctx.noise(i, x)
                mean = mean.add_(noise, alpha=std) if isinstance(std, float) else mean + std * noise
            x = mean
            yield x, pred.pred_xstart


class DDIM(Sampler):
    """Denoising diffusion implicit models (Song et al. 2021, eq. 12; see
    :func:`ddim_coefficients`): eps is re-derived from the processed (clipped) x0, as
    guided-diffusion's ``ddim_sample`` does.

    Under a guidance that renoises with the unconditional eps (CFG++, Chung et al. 2024,
    Algorithm 1) the step is written in (x0, eps) form, x' = alpha' x0_guided +
    sqrt(sigma'^2 - c^2) eps_uncond + c z, instead of the k-form that eliminates eps.

    Args:
        eta: in [0, 1]; 0 for the deterministic sampler (then no random numbers are drawn), 1 for
            the DDPM posterior variance.
        use_clipped_model_output: ``True`` (default, guided-diffusion): eps re-derived from the
            clipped x0, which keeps guided sampling consistent; ``False``: the model's own eps
            with the clipped x0 (x' = alpha' x0 + c_eps eps_model + c z), what diffusers'
            ``DDIMPipeline`` does by default, to reproduce its samples.
    """

    order = 1
    nfe_per_step = 1
    stochastic = False
    supports_unconditional_renoise = True

    def __init__(self, eta: float = 0.0, use_clipped_model_output: bool = True):
        self.eta = check_eta(eta)
        self.stochastic = self.eta > 0
        if not isinstance(use_clipped_model_output, bool):
            raise TypeError(f"use_clipped_model_output must be True or False, got {use_clipped_model_output!r}")
        self.use_clipped_model_output = use_clipped_model_output

    def steps(self, ctx, x):
        lv = ctx.levels
        k_x0, k_x, c = ddim_coefficients(lv.alpha[:-1], lv.sigma[:-1], lv.alpha[1:], lv.sigma[1:], self.eta)
        if ctx.renoise_unconditional or not self.use_clipped_model_output:
            c_eps = _nonnegative(lv.sigma[1:] ** 2 - c**2) ** 0.5
        for i in range(ctx.num_steps):
            if ctx.renoise_unconditional:  # CFG++: x' = alpha' x0 + c_eps eps_uncond (+ c z)
                pred = ctx.denoise(x, i)
                x0 = pred.pred_xstart
                x = axpby(float(lv.alpha[i + 1]), x0, float(c_eps[i]), pred.renoise_eps)
            elif not self.use_clipped_model_output:  # x' = alpha' x0 + c_eps eps_model (diffusers)
                pred = ctx.denoise(x, i)
                x0 = pred.pred_xstart
                x = axpby(float(lv.alpha[i + 1]), x0, float(c_eps[i]), pred.model_eps)
            else:
                x0 = ctx.denoise(x, i).pred_xstart
                x = axpby(float(k_x0[i]), x0, float(k_x[i]), x)
            if c[i] > 0.0:  # a float fixed by eta and the levels, not a tensor value
                x = x.add_(ctx.noise(i, x), alpha=float(c[i]))
            yield x, x0


@hookimpl
def diffreg_register_samplers(register):
    # order, nfe_per_step and stochastic are read from the classes
    register("ddpm", DDPM, paper="Ho et al. 2020")
    register("ddim", DDIM, stochastic_when="eta > 0", paper="Song et al. 2021")


__all__ = ["DDIM", "DDPM", "check_eta", "ddim_coefficients", "ddpm_update", "posterior_coefficients"]
