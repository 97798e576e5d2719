"""Built-in guidance methods (kind ``guidance``), each the formula of its paper in diffreg's scale
convention (w = 0 unconditional, 1 conditional; see :mod:`diffreg.sampling.guidance`).

Notation: at a level (alpha, sigma), x = alpha x0 + sigma eps; ``c`` and ``u`` are the conditional
and unconditional predictions; all reductions are per sample over every non-batch dimension.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffreg import hookimpl
from diffreg.parameterization import Prediction, eps_from_xstart
from diffreg.sampling.guidance import Guidance, lerp
from diffreg.validation import check_finite_number


def _dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _from_x0(x: torch.Tensor, x0: torch.Tensor, level) -> tuple[torch.Tensor, Any]:
    """(x0, lazy eps) with eps = (x - alpha x0) / sigma (the pair stays on x = alpha x0 + sigma eps)."""
    return x0, lambda: eps_from_xstart(x, x0, level.alpha, level.sigma)


def _number(value: Any, name: str, low: float, high: float, text: str) -> float:
    v = check_finite_number(value, name)
    if not low <= v <= high:
        raise ValueError(f"{name} must be in {text}, got {value!r}")
    return v


class CFG(Guidance):
    """Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6,
    written as uncond + w (cond - uncond)): x0 = u_x0 + w (c_x0 - u_x0) and the same for eps (a
    linear combination, so the same for any parameterization: eps, x0 or v). One forward pass over
    the doubled batch (conditional and null-condition inputs). Learned variance channels come from
    the conditional pass."""

    name = "cfg"

    def combine(self, cond, uncond, x, level, call):
        w = call.scale
        return lerp(uncond.pred_xstart, cond.pred_xstart, w), lambda: lerp(uncond.pred_eps, cond.pred_eps, w)


class CFGRescale(CFG):
    """Rescaled classifier-free guidance (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", section 3.4, eqs. 15-16 and Algorithm 2):

        g = u + w (c - u),  g_rescaled = g std(c) / std(g),  result = phi g_rescaled + (1 - phi) g,

    with std the per-sample standard deviation (unbiased, as the paper's ``torch.std``) over every
    non-batch dimension, applied in ``space``: ``"v"`` (the paper's: its model predicts
    v = alpha eps - sigma x0, Salimans & Ho 2022), ``"eps"`` (as diffusers' ``guidance_rescale``)
    or ``"x0"``. The pair (x0, eps) is rebuilt on x = alpha x0 + sigma eps.

    Args:
        phi: in [0, 1] (0: plain CFG; the paper uses 0.7).
        space: ``"v"``, ``"eps"`` or ``"x0"``.

    Raises:
        ValueError: phi outside [0, 1], an unknown space.
    """

    name = "cfg_rescale"

    def __init__(self, phi: float = 0.7, space: str = "v"):
        self.phi = _number(phi, "phi", 0.0, 1.0, "[0, 1] (0: plain CFG, 0.7: the paper's)")
        if space not in ("v", "eps", "x0"):
            raise ValueError(f"unknown space {space!r} for cfg_rescale; accepted: v, eps, x0")
        self.space = space

    def _rescale(self, c: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        dims = _dims(g)
        factor = c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True)
        return g * (self.phi * factor + (1.0 - self.phi))

    def combine(self, cond, uncond, x, level, call):
        w, a, s = call.scale, level.alpha, level.sigma
        if self.space == "x0":
            return _from_x0(x, self._rescale(cond.pred_xstart, lerp(uncond.pred_xstart, cond.pred_xstart, w)), level)
        if self.space == "eps":
            eps = self._rescale(cond.pred_eps, lerp(uncond.pred_eps, cond.pred_eps, w))
            return (x - s * eps) / a, eps
        v = self._rescale(cond.pred_v, lerp(uncond.pred_v, cond.pred_v, w))
        norm = a * a + s * s  # x0 = (alpha x - sigma v) / (alpha^2 + sigma^2), eps = (sigma x + alpha v) / ...
        return (a * x - s * v) / norm, (s * x + a * v) / norm


class Interval(CFG):
    """Guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited
    Interval Improves Sample and Distribution Quality in Diffusion Models", eq. 3): CFG at levels
    whose VE noise level sigma/alpha (the EDM sigma of Karras et al. 2022) lies in
    (``sigma_low``, ``sigma_high``], the conditional model alone elsewhere: there the context makes
    ONE conditional pass (batch N, not 2N). Given in VE sigma, the interval is the same for every
    sampler, grid and step count.

    Args:
        sigma_low: >= 0 (default 0.28, the paper's EDM2 ImageNet-512 choice).
        sigma_high: > sigma_low, ``inf`` allowed (default 5.42, the paper's).

    Raises:
        ValueError: a negative, NaN or reversed interval.
    """

    name = "interval"

    def __init__(self, sigma_low: float = 0.28, sigma_high: float = 5.42):
        lo = check_finite_number(sigma_low, "sigma_low", minimum=0.0)
        if isinstance(sigma_high, (int, float)) and not isinstance(sigma_high, bool) and sigma_high == math.inf:
            hi = math.inf
        else:
            hi = check_finite_number(sigma_high, "sigma_high", minimum=0.0)
        if not lo < hi:
            raise ValueError(
                f"the guidance interval (sigma_low, sigma_high] = ({sigma_low!r}, {sigma_high!r}] is empty; "
                "accepted: 0 <= sigma_low < sigma_high (VE sigma = sigma/alpha; inf allowed for sigma_high)"
            )
        self.sigma_low, self.sigma_high = lo, hi

    def active(self, level, call):
        return self.sigma_low < level.ve_sigma <= self.sigma_high


def _project(v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v0 parallel to v1, v0 orthogonal to v1), per sample (Sadat et al. 2024, Algorithm 1)."""
    dims = _dims(v0)
    unit = torch.nn.functional.normalize(v1.flatten(1), dim=1).reshape(v1.shape)
    parallel = (v0 * unit).sum(dim=dims, keepdim=True) * unit
    return parallel, v0 - parallel


class APG(Guidance):
    """Adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of
    High Guidance Scales in Diffusion Models", Algorithm 1), on the x0 predictions:

        D = c - u;  D <- D + beta D_prev-average (momentum, running average kept per call);
        D <- D min(1, r / ||D||) (norm threshold r, off at 0);
        D = D_par + D_orth (parallel / orthogonal to c);  x0 = c + (w - 1) (D_orth + eta D_par).

    The running average is updated at every guided model evaluation of the call (twice per step
    for a 2-evaluation sampler). w = 1 is the conditional model.

    Args:
        eta: weight of the parallel component, >= 0 (default 0, the paper's choice).
        momentum: beta in (-1, 1) (default -0.5, the paper's "reverse momentum"; 0: off).
        norm_threshold: r >= 0 (0: off; the paper's are data-dependent, e.g. 15 for SD latents).

    Raises:
        ValueError: an option out of range.
    """

    name = "apg"

    def __init__(self, eta: float = 0.0, momentum: float = -0.5, norm_threshold: float = 0.0):
        self.eta = check_finite_number(eta, "eta", minimum=0.0)
        m = check_finite_number(momentum, "momentum")
        if not -1.0 < m < 1.0:
            raise ValueError(f"momentum must be in (-1, 1) (the paper's -0.5; 0: off), got {momentum!r}")
        self.momentum = m
        self.norm_threshold = check_finite_number(norm_threshold, "norm_threshold", minimum=0.0)

    def combine(self, cond, uncond, x, level, call):
        c = cond.pred_xstart
        diff = c - uncond.pred_xstart
        if self.momentum != 0.0:
            prev = call.state.get("running_average")
            diff = diff if prev is None else diff + self.momentum * prev
            call.state["running_average"] = diff
        if self.norm_threshold > 0.0:
            norm = torch.linalg.vector_norm(diff.flatten(1), dim=1).reshape((-1,) + (1,) * (diff.ndim - 1))
            diff = diff * torch.clamp(self.norm_threshold / norm, max=1.0)
        parallel, orthogonal = _project(diff, c)
        update = orthogonal if self.eta == 0.0 else orthogonal + self.eta * parallel
        return _from_x0(x, c + (call.scale - 1.0) * update, level)


class CFGZeroStar(Guidance):
    """CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching
    Models", eqs. 8-10 and Algorithm 1), on the rectified-flow velocity v = eps - x0 of the level
    (exactly the paper's velocity for a flow-matching process, alpha = 1 - t, sigma = t; for any
    other process the same after the change of variables x / (alpha + sigma)):

        s* = <v_c, v_u> / ||v_u||^2 (per sample),   v = s* v_u + w (v_c - s* v_u),

    and zero-init: at the first ``zero_init_steps`` levels of the grid (and any level at least as
    noisy as the last of them) v = 0, i.e. x0 = eps = x / (alpha + sigma): the state does not move.

    Args:
        zero_init_steps: grid levels zeroed, >= 0 (default 1, the paper's; 0: off).

    w = 1 is the conditional model only without zero-init.
    """

    name = "cfg_zero_star"

    def __init__(self, zero_init_steps: int = 1):
        if isinstance(zero_init_steps, bool) or not isinstance(zero_init_steps, (int, np.integer)) or zero_init_steps < 0:
            raise ValueError(f"zero_init_steps must be an int >= 0 (0: off, 1: the paper's), got {zero_init_steps!r}")
        self.zero_init_steps = int(zero_init_steps)

    @property
    def identity_at_one(self) -> bool:  # type: ignore[override]
        return self.zero_init_steps == 0

    def combine(self, cond, uncond, x, level, call):
        a, s = level.alpha, level.sigma
        x_rf = x / (a + s)
        k = min(self.zero_init_steps, len(call.levels.t) - 1) if self.zero_init_steps else 0
        if k > 0 and level.log_snr <= float(call.levels.log_snr[k - 1]):
            return x_rf, x_rf
        v_c = cond.pred_eps - cond.pred_xstart
        v_u = uncond.pred_eps - uncond.pred_xstart
        dims = _dims(v_c)
        s_star = (v_c * v_u).sum(dim=dims, keepdim=True) / ((v_u * v_u).sum(dim=dims, keepdim=True) + 1e-8)
        v = torch.lerp(s_star * v_u, v_c, call.scale)
        t_rf = s / (a + s)  # x_rf = (1 - t) x0 + t eps, v = eps - x0
        return x_rf - t_rf * v, x_rf + (1.0 - t_rf) * v


class CFGPlusPlus(CFG):
    """CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for
    Diffusion Models", Algorithm 1 for DDIM): the guided x0 = u_x0 + lambda (c_x0 - u_x0), but the
    sampler renoises with the UNCONDITIONAL eps: x' = alpha' x0_guided + sigma' eps_u (DDIM), the
    same door for every sampler that declares ``supports_unconditional_renoise``.

    The scale is the paper's lambda, accepted in [0, 1] (0: unconditional; 1 is NOT the conditional
    model: its x0 renoised with the unconditional eps; the paper's lambda in 0.2..0.8 matches CFG
    scales of about 2..12).
    """

    name = "cfgpp"
    identity_at_one = False
    renoise_unconditional = True
    scale_range = (0.0, 1.0, "0..1 (CFG++'s lambda: 0 unconditional; typical 0.2..0.8)")


class AutoGuidance(CFG):
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself",
    eq. 2): D = D_guide + w (D_main - D_guide), where the guide is a weaker model (smaller, or
    trained shorter) given the SAME condition; no null class is needed.

    Args:
        guide: a checkpoint path (``.safetensors`` written by diffreg, loaded once, on the CPU, then
            moved to the call's device and dtype) or a model ``guide(x, t, **model_kwargs)``.
        guide_diffusion: the guide's :class:`~diffreg.Diffusion` for a model given directly
            (default: the sampled diffusion's); its parameterization reads the guide's output.

    Raises (at creation): CheckpointError / ValueError for a file that does not load. Raises (when
    sampling): ValueError for a guide whose sample shape, output shape or noise schedule differs
    from the sampled model's.
    """

    name = "autoguidance"
    separate_unconditional = True

    def __init__(self, guide: Any = None, guide_diffusion: Any = None):
        if guide is None:
            raise ValueError("autoguidance needs guide= (a checkpoint path or a model)")
        self._shape = None
        if isinstance(guide, (str, Path)):
            from diffreg.checkpoint import load_checkpoint

            loaded = load_checkpoint(guide)
            self._model, self._diffusion = loaded.model, loaded.diffusion
            self._shape = loaded.config.sample_shape
            self.guide = str(guide)
        elif callable(guide):
            self._model, self._diffusion, self.guide = guide, guide_diffusion, type(guide).__name__
        else:
            raise TypeError(f"guide must be a checkpoint path or a model, got {guide!r}")

    def start(self, ctx, call):
        if self._shape is not None and tuple(self._shape) != tuple(ctx.shape[1:]):
            raise ValueError(
                f"the guide model {self.guide!r} makes samples of shape {tuple(self._shape)}, the sampled "
                f"model {tuple(ctx.shape[1:])}; autoguidance needs a guide of the same shape"
            )
        diffusion = self._diffusion if self._diffusion is not None else ctx.diffusion
        times = call.levels.t[:-1]
        if diffusion is not ctx.diffusion and not np.allclose(
            np.stack(diffusion.process.alpha_sigma(times)), np.stack(ctx.process.alpha_sigma(times)), rtol=1e-6, atol=1e-9
        ):
            raise ValueError(
                f"the guide model {self.guide!r} has another noise schedule than the sampled model; "
                "autoguidance needs both on the same process"
            )
        model = self._model
        if isinstance(model, torch.nn.Module):
            model = model.to(device=ctx.device, dtype=ctx.model_dtype or torch.float32)
        call.state["guide"] = (model, diffusion)

    def unconditional(self, ctx, x, at, level, call):
        model, diffusion = call.state["guide"]
        out = ctx.call_model(model, x, at, ctx.model_kwargs)
        try:
            mean, _ = diffusion.parameterization.split(out, x)
        except ValueError as exc:
            raise ValueError(f"the guide model {self.guide!r} gave an output of another shape than the sampled model's: {exc}") from None
        x0, eps = diffusion.parameterization.mean_type.predict(mean, x, level.alpha, level.sigma)
        return Prediction(x0, eps, 0.0, alpha=level.alpha, sigma=level.sigma)


@hookimpl
def diffreg_register_guidances(register):
    register("cfg", CFG, paper="Ho & Salimans 2022")
    register("cfg_rescale", CFGRescale, paper="Lin et al. 2024")
    register("interval", Interval, paper="Kynkäänniemi et al. 2024")
    register("apg", APG, paper="Sadat et al. 2024")
    register("cfg_zero_star", CFGZeroStar, paper="Fan et al. 2025")
    register("cfgpp", CFGPlusPlus, paper="Chung et al. 2024")
    register("autoguidance", AutoGuidance, paper="Karras et al. 2024")


__all__ = ["APG", "CFG", "AutoGuidance", "CFGPlusPlus", "CFGRescale", "CFGZeroStar", "Interval"]
