"""Built-in samplers: ``ddpm`` (ancestral) and ``ddim``.

Each step reads coefficients precomputed once per loop as Python floats, so a step is a handful
of fused tensor operations and never reads a tensor value on the host.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffreg import hookimpl
from diffreg.parameterization import EpsPrediction
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
    x0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z, sigma from eq. 16 scaled by ``eta``; eps is
    recomputed from the processed (clipped) x0, as guided-diffusion's ``ddim_sample`` does.

    For an eps-predicting model without ``denoised_fn``, dynamic thresholding or ``cond_fn`` (the
    usual case) the step runs on the scaled state x~ = x / sqrt(abar_t) (Karras et al. 2022's
    x / s(t); x~ = x0 + sigma_t eps with sigma_t = sqrt(1 - abar_t) / sqrt(abar_t)), where
    the update is x0 = x~ - sigma_t eps, clip, x~_{t-1} = lerp(x0, x~_t, w) + (sigma / sqrt(abar_{t-1})) z
    with w = sqrt(1 - abar_{t-1} - sigma^2) / (sqrt(abar_{t-1}) sigma_t): three fused kernels
    and the model input x = sqrt(abar) x~. The same algebra as the general path (x_{t-1} =
    k_xstart x0 + k_x x_t), to float rounding. Otherwise the step goes through
    :meth:`~diffreg.sampler.SamplingContext.denoise`.

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
        abar, abar_prev = tables.alphas_cumprod[idx], tables.alphas_cumprod_prev[idx]
        c_xstart, c_eps, sigma = ddim_coefficients(abar, abar_prev, self.eta)
        a, s = np.sqrt(abar), np.sqrt(1.0 - abar)
        if _scaled_state_applies(ctx, abar):
            sigma_t = s / a  # noise-to-signal ratio of x~ = x / sqrt(abar_t)
            w = c_eps / (c_xstart * sigma_t)  # c_xstart = sqrt(abar_prev) > 0
            columns = (1.0 / a, sigma_t, w, c_xstart, sigma / c_xstart)
            return _ScaledState(list(zip(*(c.tolist() for c in columns), strict=True)))
        # x_{t-1} = c_xstart x0 + c_eps (x_t - a x0) / s + sigma z = k_xstart x0 + k_x x_t + sigma z
        k_xstart, k_x = c_xstart - c_eps * a / s, c_eps / s
        return list(zip(k_xstart.tolist(), k_x.tolist(), sigma.tolist(), strict=True))

    def step(self, ctx, state, i, x):
        if isinstance(state, _ScaledState):
            return state.step(ctx, i, x)
        pred = ctx.denoise(x, i)
        k_xstart, k_x, sigma = state[i]
        x_prev = axpby(k_xstart, pred.pred_xstart, k_x, x)
        if sigma > 0.0:  # a Python float fixed by eta and the schedule, not a tensor value
            x_prev = x_prev.add_(ctx.noise(i, x), alpha=sigma)
        return x_prev, pred.pred_xstart


def _scaled_state_applies(ctx, alphas_cumprod) -> bool:
    """Whether DDIM may step on x / sqrt(abar): an eps-predicting model whose x0 is only clipped
    (nothing else transforms it), and abar > 0 at every visited timestep."""
    mean_type = ctx.diffusion.parameterization.mean_type
    return (
        isinstance(mean_type, EpsPrediction)
        and type(mean_type).predict is EpsPrediction.predict
        and ctx.denoised_fn is None
        and ctx.process_xstart is None
        and ctx.cond_fn is None
        and bool(np.all(alphas_cumprod > 0))
    )


class _ScaledState:
    """Per-call state of DDIM's scaled-state step (see :class:`DDIM`): per-step coefficients
    (1 / sqrt(abar_t), sigma_t, w, sqrt(abar_{t-1}), noise scale) as Python floats, and the last
    state returned with its x~ (reused while that tensor is unchanged: same object, same version)."""

    __slots__ = ("coefs", "x", "x_tilde", "x_version")

    def __init__(self, coefs):
        self.coefs = coefs
        self.x: torch.Tensor | None = None
        self.x_tilde: torch.Tensor | None = None
        self.x_version = -1

    def step(self, ctx, i, x):
        inv_a, sigma_t, w, a_prev, noise_scale = self.coefs[i]
        x_tilde = self.x_tilde
        if x_tilde is None or not self._unchanged(ctx, x):  # the first step, or x changed in place
            x_tilde = torch.mul(x, inv_a, out=ctx.buffer("ddim.x_tilde", x))
        eps = ctx.diffusion.parameterization.split(ctx.model_output(x, i, check_finite=False), x)[0]
        pred_xstart = torch.add(x_tilde, eps, alpha=-sigma_t, out=ctx.buffer("ddim.x0", x))
        # x~ is finite (else an earlier step was), so x0 is non-finite exactly where eps is; it
        # is checked before clipping (which would turn inf into 1), while it is still in cache
        ctx.record_finite(i, pred_xstart)
        if ctx.clip_denoised:
            pred_xstart.clamp_(-1.0, 1.0)
        # x~_{t-1}, in place over x~_t when buffers are reused (out is then x_tilde itself)
        x_tilde = torch.lerp(pred_xstart, x_tilde, w, out=ctx.buffer("ddim.x_tilde", x))
        if noise_scale > 0.0:  # Python floats fixed by eta and the schedule
            x_tilde.add_(ctx.noise(i, x), alpha=noise_scale)
        # the model input of the next step; with reused buffers it takes pred_xstart's place
        # (nobody reads pred_xstart then), so a step touches three state-sized tensors, not four
        x_prev = x_tilde if a_prev == 1.0 else torch.mul(x_tilde, a_prev, out=ctx.buffer("ddim.x0", x))
        self.x, self.x_tilde = x_prev, x_tilde
        self.x_version = -1 if x_prev.is_inference() else x_prev._version
        return x_prev, pred_xstart

    def _unchanged(self, ctx, x) -> bool:
        """Whether ``x`` is the state we returned, unchanged since (inference tensors keep no
        version counter: then only when nobody else saw it)."""
        if self.x is None or x is not self.x:
            return False
        if x.is_inference():
            return ctx.reuse_buffers
        return x._version == self.x_version


@hookimpl
def diffreg_register_samplers(register):
    register("ddpm", DDPM, order=1, nfe_per_step=1, stochastic=True, paper="Ho et al. 2020")
    register(
        "ddim", DDIM, order=1, nfe_per_step=1, stochastic=False, stochastic_when="eta > 0", paper="Song et al. 2021"
    )
