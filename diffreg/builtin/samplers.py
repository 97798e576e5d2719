"""Built-in samplers: ``ddpm`` (ancestral) and ``ddim``.

Each step reads coefficients precomputed once per loop as Python floats, so a step is a handful
of fused tensor operations and never reads a tensor value on the host.
"""

from __future__ import annotations

import math

import numpy as np

from diffreg import hookimpl
from diffreg.sampler import Sampler, ddim_coefficients, exp
from diffreg.schedule import axpby


class DDPM(Sampler):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): x_{t-1} = mu(x_t, x0) + sigma_t z, with
    the posterior mean of eq. 7 and the parameterization's variance (learned variance honoured).
    On a respaced diffusion this is guided-diffusion's respaced ancestral sampler."""

    order = 1
    nfe_per_step = 1
    stochastic = True

    def prepare(self, ctx):
        tables = ctx.diffusion.tables
        idx = np.asarray(ctx.timesteps)
        return list(
            zip(tables.posterior_mean_coef1[idx].tolist(), tables.posterior_mean_coef2[idx].tolist(), strict=True)
        )

    def step(self, ctx, state, i, x):
        pred = ctx.denoise(x, i, condition_score=False)
        coef_xstart, coef_x = state[i]
        mean = axpby(coef_xstart, pred.pred_xstart, coef_x, x)
        mean = ctx.condition_mean(mean, pred, x, i)
        if ctx.timesteps[i] == 0:  # the last step adds no noise
            return mean, pred.pred_xstart
        std = exp(0.5 * pred.log_variance)
        noise = ctx.noise(i, x)
        if isinstance(std, float):
            return mean.add_(noise, alpha=std), pred.pred_xstart
        return mean + std * noise, pred.pred_xstart


class DDIM(Sampler):
    """Denoising diffusion implicit models (Song et al. 2021, eq. 12): x_{t-1} = sqrt(abar_{t-1})
    x0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z, sigma from eq. 16 scaled by ``eta``.

    The step is computed from x0 and x_t, with eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)
    folded into the coefficients (two fused operations).

    Args:
        eta: 0 for the deterministic sampler (then no random numbers are drawn); 1 gives the DDPM
            posterior variance. Must be >= 0.
    """

    order = 1
    nfe_per_step = 1
    stochastic = False

    def __init__(self, eta: float = 0.0):
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        self.eta = float(eta)
        self.stochastic = self.eta > 0

    def prepare(self, ctx):
        tables = ctx.diffusion.tables
        idx = np.asarray(ctx.timesteps)
        c_xstart, c_eps, sigma = ddim_coefficients(
            tables.alphas_cumprod[idx], tables.alphas_cumprod_prev[idx], self.eta
        )
        # x_{t-1} = c_xstart x0 + c_eps (x_t - a x0) / s + sigma z = k_xstart x0 + k_x x_t + sigma z
        a, s = tables.sqrt_alphas_cumprod[idx], tables.sqrt_one_minus_alphas_cumprod[idx]
        k_xstart, k_x = c_xstart - c_eps * a / s, c_eps / s
        return list(zip(k_xstart.tolist(), k_x.tolist(), sigma.tolist(), strict=True))

    def step(self, ctx, state, i, x):
        pred = ctx.denoise(x, i)
        k_xstart, k_x, sigma = state[i]
        x_prev = axpby(k_xstart, pred.pred_xstart, k_x, x)
        if sigma > 0.0:  # a Python float fixed by eta and the schedule, not a tensor value
            x_prev = x_prev.add_(ctx.noise(i, x), alpha=sigma)
        return x_prev, pred.pred_xstart


@hookimpl
def diffreg_register_samplers(register):
    register("ddpm", DDPM, order=1, nfe_per_step=1, stochastic=True, paper="Ho et al. 2020")
    register(
        "ddim", DDIM, order=1, nfe_per_step=1, stochastic=False, stochastic_when="eta > 0", paper="Song et al. 2021"
    )
