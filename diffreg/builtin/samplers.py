"""Built-in samplers: ``ddpm`` (ancestral) and ``ddim``.

Each step reads coefficients precomputed once per loop as Python floats, so a step is a handful
of fused tensor operations and never reads a tensor value on the host.
"""

from __future__ import annotations

import numpy as np
import torch

from diffreg import hookimpl
from diffreg.parameterization import EpsPrediction, FixedSmallVariance
from diffreg.sampler import Sampler, check_eta, ddim_coefficients, exp
from diffreg.schedule import axpby


class DDPM(Sampler):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): x_{t-1} = mu(x_t, x0) + sigma_t z, with
    the posterior mean of eq. 7 and the parameterization's variance (learned variance honoured).
    On a respaced diffusion this is guided-diffusion's respaced ancestral sampler.

    With the posterior variance (``fixed_small``) this is DDIM with eta = 1 (Song et al. 2021,
    eq. 16), and an eps-predicting model steps on the scaled state like :class:`DDIM`.
    """

    order = 1
    nfe_per_step = 1
    stochastic = True

    def prepare(self, ctx):
        tables = ctx.diffusion.tables
        idx = np.asarray(ctx.timesteps)
        coef_xstart, coef_x = tables.posterior_mean_coef1[idx], tables.posterior_mean_coef2[idx]
        if isinstance(ctx.diffusion.parameterization.variance_type, FixedSmallVariance):
            # sqrt(posterior_variance): 0 at t = 0, where the last step adds no noise
            scaled = ScaledState.build(ctx, coef_x, np.sqrt(tables.posterior_variance[idx]))
            if scaled is not None:
                return scaled
        return list(zip(coef_xstart.tolist(), coef_x.tolist(), strict=True))

    def step(self, ctx, state, i, x):
        if isinstance(state, ScaledState):
            return state.step(ctx, i, x)
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

    An eps-predicting model steps on the scaled state (see :class:`ScaledState`); otherwise the
    step is x_{t-1} = k_xstart x0 + k_x x_t + sigma z on :meth:`~diffreg.sampler.SamplingContext.denoise`.

    Args:
        eta: 0 for the deterministic sampler (then no random numbers are drawn); 1 gives the DDPM
            posterior variance. Must be >= 0.
    """

    order = 1
    nfe_per_step = 1
    stochastic = False

    def __init__(self, eta: float = 0.0):
        self.eta = check_eta(eta)
        self.stochastic = self.eta > 0

    def prepare(self, ctx):
        tables = ctx.diffusion.tables
        idx = np.asarray(ctx.timesteps)
        abar = tables.alphas_cumprod[idx]
        c_xstart, c_eps, sigma = ddim_coefficients(abar, tables.alphas_cumprod_prev[idx], self.eta)
        # x_{t-1} = c_xstart x0 + c_eps (x_t - a x0) / s + sigma z = k_xstart x0 + k_x x_t + sigma z
        a, s = np.sqrt(abar), np.sqrt(1.0 - abar)
        k_xstart, k_x = c_xstart - c_eps * a / s, c_eps / s
        scaled = ScaledState.build(ctx, k_x, sigma)
        if scaled is not None:
            return scaled
        return list(zip(k_xstart.tolist(), k_x.tolist(), sigma.tolist(), strict=True))

    def step(self, ctx, state, i, x):
        if isinstance(state, ScaledState):
            return state.step(ctx, i, x)
        pred = ctx.denoise(x, i)
        k_xstart, k_x, sigma = state[i]
        x_prev = axpby(k_xstart, pred.pred_xstart, k_x, x)
        if sigma > 0.0:  # a Python float fixed by eta and the schedule, not a tensor value
            x_prev = x_prev.add_(ctx.noise(i, x), alpha=sigma)
        return x_prev, pred.pred_xstart


class ScaledState:
    """The first-order update x_{t-1} = k_xstart x0 + k_x x_t + std z, with clipped x0, stepped
    on the scaled state x~ = x / sqrt(abar_t) (Karras et al. 2022's x / s(t); x~ = x0 + sigma_t
    eps with sigma_t = sqrt(1 - abar_t) / sqrt(abar_t)) for an eps-predicting model.

    When k_xstart + k_x sqrt(abar_t) = sqrt(abar_{t-1}) (DDIM for every eta, and DDPM with the
    posterior variance: the marginals' scale is kept), the update divided by sqrt(abar_{t-1}) is a
    linear interpolation, and a step is four fused kernels:

        x0 = x~ - sigma_t eps;  clip x0;  x~_{t-1} = lerp(x0, x~_t, w) + std / sqrt(abar_{t-1}) z;
        x_{t-1} = sqrt(abar_{t-1}) x~_{t-1}  (the next model input),  w = k_x sqrt(abar_t) / sqrt(abar_{t-1}),

    against five for the same algebra on x (x0 takes two, the update two). Equal to the general
    path to float rounding (tested). x~ is carried from step to step only where nobody else sees
    the states (``sample_loop`` without a callback, ``ctx.reuse_buffers``), which also writes x0
    and x~ into scratch tensors; otherwise x~ is recomputed from the x handed in, so a state
    changed by whoever saw it steers the next step as in guided-diffusion's loops. The model's
    input is a new tensor at every step (models may keep references to their inputs).

    Per call: the coefficients (1 / sqrt(abar_t), sigma_t, w, sqrt(abar_{t-1}), noise scale) as
    Python floats, and the last state returned with its x~.
    """

    __slots__ = ("coefs", "out_tilde", "out_x0", "split", "x", "x_tilde", "x_version")

    def __init__(self, ctx, coefs: list[tuple[float, ...]]):
        self.coefs = coefs
        self.split = ctx.diffusion.parameterization.split
        self.out_tilde = ctx.buffer("scaled.x_tilde")  # None unless buffers are reused
        self.out_x0 = ctx.buffer("scaled.x0")
        self.x: torch.Tensor | None = None
        self.x_tilde: torch.Tensor | None = None
        self.x_version = -1

    @classmethod
    def build(cls, ctx, k_x: np.ndarray, noise_std: np.ndarray) -> ScaledState | None:
        """The scaled-state form of an update with x_t coefficients ``k_x`` and noise standard
        deviations ``noise_std`` (float64 ``[steps]``, in visiting order), or ``None`` where it
        does not apply: a model that does not predict eps, a ``denoised_fn``, dynamic
        thresholding or a ``cond_fn``, a Diffusion whose ``prediction_from_output`` is
        overridden (by its class or on the instance), a state narrower than float32 (x~ reaches
        1e4 |x| near t = T, beyond float16), or abar = 0 at a visited timestep."""
        from diffreg.diffusion import Diffusion

        tables = ctx.diffusion.tables
        idx = np.asarray(ctx.timesteps)
        abar = tables.alphas_cumprod[idx]
        mean_type = ctx.diffusion.parameterization.mean_type
        if not (
            isinstance(mean_type, EpsPrediction)
            and type(mean_type).predict is EpsPrediction.predict
            and type(ctx.diffusion).prediction_from_output is Diffusion.prediction_from_output
            and "prediction_from_output" not in vars(ctx.diffusion)
            and ctx.denoised_fn is None
            and ctx.process_xstart is None
            and ctx.cond_fn is None
            and ctx.dtype in (torch.float32, torch.float64)
            and bool(np.all(abar > 0))
        ):
            return None
        a, a_prev = np.sqrt(abar), np.sqrt(tables.alphas_cumprod_prev[idx])
        columns = (1.0 / a, np.sqrt(1.0 - abar) / a, k_x * a / a_prev, a_prev, noise_std / a_prev)
        return cls(ctx, list(zip(*(c.tolist() for c in columns), strict=True)))

    def step(self, ctx, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``i`` from ``x`` (the state's shape and dtype): ``(x_{t-1}, pred_xstart)``."""
        inv_a, sigma_t, w, a_prev, noise_scale = self.coefs[i]
        x_tilde = self.x_tilde
        if x_tilde is None or not self._carried(ctx, x):
            x_tilde = torch.mul(x, inv_a, out=self.out_tilde)
        eps = self.split(ctx.model_output(x, i), x)[0]
        pred_xstart = torch.add(x_tilde, eps, alpha=-sigma_t, out=self.out_x0)
        if ctx.clip_denoised:
            pred_xstart.clamp_(-1.0, 1.0)
        # x~_{t-1}, in place over x~_t when buffers are reused (out is then x_tilde itself)
        x_tilde = torch.lerp(pred_xstart, x_tilde, w, out=self.out_tilde)
        if noise_scale > 0.0:  # Python floats fixed by the schedule (and eta)
            x_tilde.add_(ctx.noise(i, x), alpha=noise_scale)
        x_prev = x_tilde if a_prev == 1.0 else torch.mul(x_tilde, a_prev)
        self.x, self.x_tilde = x_prev, x_tilde
        self.x_version = -1 if x_prev.is_inference() else x_prev._version
        return x_prev, pred_xstart

    def _carried(self, ctx, x: torch.Tensor) -> bool:
        """Whether x~ can be carried over: nobody but us saw the states, and ``x`` is the state we
        returned, unchanged (same object; same version unless it is an inference tensor)."""
        if not ctx.reuse_buffers or x is not self.x:
            return False
        return x.is_inference() or x._version == self.x_version


@hookimpl
def diffreg_register_samplers(register):
    register("ddpm", DDPM, order=1, nfe_per_step=1, stochastic=True, paper="Ho et al. 2020")
    register(
        "ddim", DDIM, order=1, nfe_per_step=1, stochastic=False, stochastic_when="eta > 0", paper="Song et al. 2021"
    )
