"""Heun's method with churn (Karras et al. 2022, Algorithm 2) and Restart sampling (Xu et al.
2023), in the variance-exploding form x~ = x / alpha, s = sigma / alpha (VE sigma), where the
probability-flow ODE is dx~/ds = (x~ - D(x~, s)) / s."""

from __future__ import annotations

import math

import numpy as np

from diffreg.process import NoiseLevel

from .common import check_int, check_number, ddim_step
from .samplers import GridSampler


def heun_step(ctx, x, here: NoiseLevel, there: NoiseLevel, at_here, at_there, d=None, max_ratio: float = math.inf):
    """One step of Karras et al. 2022, Algorithm 1 (lines 4-8) from ``here`` to ``there`` on the
    VP state x; Euler where ``there`` is the data, ``here`` is at alpha = 0, or the VE sigma falls
    by more than ``max_ratio`` (s / s' > max_ratio: see the ``heun`` sampler). ``at_here`` /
    ``at_there``: what ``ctx.denoise`` receives for each level (a grid index or the level).
    Returns (x', D(here))."""
    if d is None:
        d = ctx.denoise(x, at_here).pred_xstart
    x_e = ddim_step(x, d, here, there)
    if there.is_clean or here.alpha == 0.0:
        return x_e, d
    s, s2 = here.ve_sigma, there.ve_sigma
    if s > max_ratio * s2:  # levels are Python floats: no tensor is read
        return x_e, d
    d2 = ctx.denoise(x_e, at_there).pred_xstart
    # x~' = x~ + (s2 - s)/2 ((x~ - D)/s + (x~_e - D2)/s2), back in VP form (times alpha')
    a, a2 = here.alpha, there.alpha
    x_t, xe_t = x / a, x_e / a2
    slope = (x_t - d) / s + (xe_t - d2) / s2
    return (x_t + (0.5 * (s2 - s)) * slope) * a2, d


class HeunChurn(GridSampler):
    """Heun's 2nd-order method with churn (Karras et al. 2022, "Elucidating the Design Space of
    Diffusion-Based Generative Models", Algorithm 2). Before step i, where s_tmin <= s_i <= s_tmax,
    the noise level is raised to s_hat = s_i (1 + gamma), gamma = min(s_churn / N, sqrt(2) - 1), by
    x~_hat = x~_i + sqrt(s_hat^2 - s_i^2) s_noise z (the model is then evaluated at s_hat, a level
    on no grid: ``ctx.level_at``); then a Heun step from s_hat to s_{i+1} (Euler to the data).
    s_churn = 0 is the ``heun`` sampler (Algorithm 1; deterministic, order 2).

    A step whose VE sigma falls by more than ``max_ratio`` (s_hat / s' > max_ratio) is an Euler
    step, as in the ``heun`` sampler: there the trapezoidal corrector amplifies the model's error
    (on the grids that start at a discrete schedule's noisiest level, s = 157 on the linear
    schedule and 20,000 on the cosine one, Algorithm 2 as written returned samples 100 to 27,000
    away from the exact ODE solution at 3-10 steps, on data of scale 1; docs/benchmarks.md).
    ``max_ratio=inf`` is Algorithm 2 exactly.

    Args:
        s_churn: >= 0 (default 0). s_tmin, s_tmax: the VE-sigma range where churn applies
            (default 0, inf). s_noise: noise scale (default 1; Karras et al. use 1.003-1.007).
        max_ratio: largest s / s' that gets the 2nd-order correction, > 1 (default 5; inf:
            always correct).

    Raises:
        ValueError: a negative or NaN option, s_tmin > s_tmax, max_ratio <= 1.
    """

    order = 2
    nfe_per_step = 2
    stochastic = False

    def __init__(
        self,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: float = 1.0,
        max_ratio: float = 5.0,
        sigmas: str | None = None,
    ):
        super().__init__(sigmas)
        self.max_ratio = check_number(max_ratio, "max_ratio", above=1.0, finite=False)
        self.s_churn = check_number(s_churn, "s_churn", minimum=0.0)
        self.s_tmin = check_number(s_tmin, "s_tmin", minimum=0.0)
        self.s_tmax = check_number(s_tmax, "s_tmax", minimum=0.0, finite=False)
        self.s_noise = check_number(s_noise, "s_noise", minimum=0.0)
        if self.s_tmin > self.s_tmax:
            raise ValueError(f"s_tmin must be <= s_tmax, got {s_tmin!r} > {s_tmax!r}")
        self.stochastic = self.s_churn > 0 and self.s_noise > 0

    def steps(self, ctx, x):
        lv = ctx.levels
        n = ctx.num_steps
        gamma = min(self.s_churn / n, math.sqrt(2.0) - 1.0)
        for i in range(n):
            here, there = lv[i], lv[i + 1]
            s = here.ve_sigma
            at_here = i
            if gamma > 0 and math.isfinite(s) and self.s_tmin <= s <= self.s_tmax:
                level = ctx.level_at(ve_sigma=s * (1.0 + gamma))
                if level.ve_sigma > s:
                    # x~_hat = x~ + sqrt(s_hat^2 - s^2) z, in VP form at the new level
                    x_t = x / here.alpha
                    x_t = x_t.add_(ctx.noise(i, x), alpha=math.sqrt(level.ve_sigma**2 - s**2) * self.s_noise)
                    x, here, at_here = x_t * level.alpha, level, level
            x, d = heun_step(ctx, x, here, there, at_here, i + 1, max_ratio=self.max_ratio)
            yield x, d


class Restart(GridSampler):
    """Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes",
    NeurIPS, Algorithm 1): the probability-flow ODE (Heun, Karras et al. 2022, Algorithm 1) on the
    grid, and once it reaches the first grid level with VE sigma s_min' <= ``restart_min`` (and
    below ``restart_max``), K = ``restarts`` times: jump forward to s_max = ``restart_max`` by
    x~ <- x~ + sqrt(s_max^2 - s_min'^2) z (the forward process's exact transition), and solve the ODE
    back to s_min' with ``restart_steps`` Heun steps on a Karras (rho = 7) grid. The restart
    noise is fresh from the call's generator at every jump (``ctx.noise`` of that step for the
    first, then further draws).

    The restart loop runs inside the step that arrives at s_min', so that step makes up to
    2 + 2 K ``restart_steps`` model calls (declared as ``nfe_per_step``).

    Args:
        restart_min, restart_max: the restart interval in VE sigma (defaults 0.06 and 0.30, the
            paper's for EDM CIFAR-10 with data in [-1, 1]), 0 < min < max.
        restarts: K >= 0 (default 2; 0: plain Heun). restart_steps: >= 1 (default 3).
        max_ratio: on the grid, a step whose VE sigma falls by more than this is an Euler step, as
            in the ``heun`` sampler (default 5; inf: Heun everywhere, as the paper). The restart
            steps, on a Karras grid inside [restart_min, restart_max], are always Heun steps.

    Raises:
        ValueError: an option outside those ranges.
    """

    order = 2
    nfe_per_step = 14  # with the default options
    stochastic = True

    def __init__(
        self,
        restart_min: float = 0.06,
        restart_max: float = 0.30,
        restarts: int = 2,
        restart_steps: int = 3,
        max_ratio: float = 5.0,
        sigmas: str | None = None,
    ):
        super().__init__(sigmas)
        self.max_ratio = check_number(max_ratio, "max_ratio", above=1.0, finite=False)
        self.restart_min = check_number(restart_min, "restart_min", above=0.0)
        self.restart_max = check_number(restart_max, "restart_max", above=0.0)
        if not self.restart_min < self.restart_max:
            raise ValueError(f"restart_min must be below restart_max, got {restart_min!r} >= {restart_max!r}")
        self.restarts = check_int(restarts, "restarts", 0)
        self.restart_steps = check_int(restart_steps, "restart_steps", 1)
        self.nfe_per_step = 2 + 2 * self.restarts * self.restart_steps
        self.stochastic = self.restarts > 0

    def steps(self, ctx, x):
        from diffreg.sampling.noise import draw_noise

        lv = ctx.levels
        ve = lv.sigma / np.where(lv.alpha > 0, lv.alpha, np.nan)
        ok = [k for k in range(1, ctx.num_steps) if 0 < ve[k] <= self.restart_min]
        stop = ok[0] if ok and self.restarts else None
        for i in range(ctx.num_steps):
            here, there = lv[i], lv[i + 1]
            x, d = heun_step(ctx, x, here, there, i, i + 1, max_ratio=self.max_ratio)
            if i + 1 == stop:
                s_lo = there.ve_sigma
                top = ctx.level_at(ve_sigma=self.restart_max)
                rho = 7.0
                ramp = np.linspace(0.0, 1.0, self.restart_steps + 1)
                ves = (top.ve_sigma ** (1 / rho) + ramp * (s_lo ** (1 / rho) - top.ve_sigma ** (1 / rho))) ** rho
                path = [top] + [ctx.level_at(ve_sigma=float(v)) for v in ves[1:-1]] + [there]
                for k in range(self.restarts):
                    z = ctx.noise(i, x) if k == 0 else draw_noise(x.shape, ctx.generator, x.device, x.dtype)
                    x_t = (x / there.alpha).add_(z, alpha=math.sqrt(max(top.ve_sigma**2 - s_lo**2, 0.0)))
                    x = x_t * top.alpha
                    for a, b in zip(path[:-1], path[1:], strict=True):
                        x, _ = heun_step(ctx, x, a, b, a, b)
            yield x, d
