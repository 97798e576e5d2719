"""The samplers. Notation (VP diffusion, step i from timestep t to the next, less noisy, t'):

    alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t), lambda = log(alpha / sigma), h = lambda' - lambda,
    VE form: x~ = x / alpha, s = sigma / alpha (= exp(-lambda)), D = pred_xstart (the denoiser).

Every update is written as a linear combination of x and denoiser outputs whose coefficients are
Python floats computed once per call in ``prepare`` (in float64, from finite forms such as
exp(-h) = alpha sigma' / (sigma alpha')), so ``step`` is a few fused tensor operations, never reads a
tensor on the host, and stays finite at zero terminal SNR (abar = 0 at the first step: alpha = 0,
s = inf, lambda = -inf) and at the last step (sigma' = 0, lambda' = +inf).

Multistep history lives in the per-call state returned by ``prepare``, never on the sampler.
"""

from __future__ import annotations

import math

import numpy as np

from diffreg.sampling import Sampler
from diffreg.schedule import axpby

from .levels import final_extrapolation, levels

#: the older spelling ``sigmas=`` of a sampler's grid (now diffreg's ``grid`` kind)
SIGMA_GRIDS = ("karras", "exponential", "lambda_uniform")


def check_final_order(value) -> int:
    """``final_order`` (1 or 2) of the data-prediction multistep solvers, or ValueError naming it."""
    if isinstance(value, bool) or value not in (1, 2):
        raise ValueError(f"final_order must be 1 (first-order last step) or 2 (extrapolated to sigma = 0), got {value!r}")
    return int(value)


class GridSampler(Sampler):
    """Base class: the ``sigmas`` option, the older spelling of ``Diffusion.sample(grid=...)``.

    Args:
        sigmas: ``None`` (the caller's grid, default ``trailing``), ``"karras"``,
            ``"exponential"`` or ``"lambda_uniform"`` (diffreg's grids of those names: any
            number of steps, levels between integer timesteps where they fall there).

    Raises:
        ValueError: another ``sigmas`` value (naming the accepted ones).
    """

    def __init__(self, sigmas: str | None = None):
        if not (sigmas is None or (isinstance(sigmas, str) and sigmas in SIGMA_GRIDS)):
            raise ValueError(f"unknown sigmas grid {sigmas!r}; accepted: None (the caller's grid), {', '.join(SIGMA_GRIDS)}")
        self.sigmas = sigmas
        self.grid = sigmas


def first_order(lv, i: int) -> tuple[float, float]:
    """DDIM / Euler / DPM-Solver++(1) coefficients of x and D: x' = (sigma'/sigma) x + alpha' (1 - e^-h) D."""
    return float(lv.sigma_next[i] / lv.sigma[i]), float(lv.alpha_next[i] * (1.0 - lv.expmh[i]))


class Euler(GridSampler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design
    Space of Diffusion-Based Generative Models", Algorithm 1 without the 2nd-order correction).

    In VE form dx~/ds = (x~ - D(x~, s)) / s, one step: x~' = x~ + (s' - s) (x~ - D) / s. Back in VP
    form this is x' = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) D: exactly deterministic
    DDIM (Song et al. 2021, eq. 12 with sigma_t = 0), and finite at s = inf (x' = sigma' x + alpha' D).
    """

    order = 1
    nfe_per_step = 1
    stochastic = False
    supports_unconditional_renoise = True  # CFG++: x replaced by ctx.renoise(x, pred)

    def prepare(self, ctx):
        lv = levels(ctx)
        return [first_order(lv, i) for i in range(lv.num_steps)]

    def step(self, ctx, state, i, x):
        p = ctx.denoise(x, i)
        d = p.pred_xstart
        c_x, c_d = state[i]
        return axpby(c_x, ctx.renoise(x, p), c_d, d), d


class Heun(GridSampler):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, "Elucidating the
    Design Space of Diffusion-Based Generative Models", Algorithm 1; Algorithm 2 with S_churn = 0).

    In VE form, with d(x~, s) = (x~ - D(x~, s)) / s:
        x~_e = x~ + (s' - s) d(x~, s)                                   (Euler predictor)
        x~'  = x~ + (s' - s) (d(x~, s) + d(x~_e, s')) / 2                (trapezoidal corrector)
    The second evaluation is at the next step's (integer) timestep, so a step costs 2 NFE.

    A step whose noise level falls by more than ``max_ratio`` (s / s' > max_ratio) is an Euler
    step (1 NFE). That includes Algorithm 1's last step (s' = 0) and a first step at s = inf (zero
    terminal SNR), where the trapezoidal weight of a slope is infinite. For finite ratios: the
    data-dependent part of the slope varies like 1/s, and for a 1/s integrand the trapezoidal rule
    is less accurate than Euler's once s / s' > ~5.5 (its error grows like s / s', Euler's like
    log(s / s')); the time-uniform steps of discrete schedules have such ratios at the ends (the
    cosine schedule's last step has s_{T-1} / s_{T-2} = 31.6; trailing spacing's first step from
    T-1 can exceed 1000), where the corrector would amplify the model's error. ``max_ratio=inf`` is
    Algorithm 1 exactly (diffusers' HeunDiscreteScheduler).

    Args:
        max_ratio: largest s / s' that gets the 2nd-order correction, > 1 (default 5).
    """

    order = 2
    nfe_per_step = 2
    stochastic = False
    supports_unconditional_renoise = True  # CFG++: x replaced by ctx.renoise(x, pred)

    def __init__(self, max_ratio: float = 5.0, sigmas: str | None = None):
        super().__init__(sigmas)
        if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not max_ratio > 1:
            raise ValueError(f"max_ratio must be a number > 1 (inf: always correct), got {max_ratio!r}")
        self.max_ratio = float(max_ratio)

    def prepare(self, ctx):
        lv = levels(ctx)
        state = []
        for i in range(lv.num_steps):
            a, s, a2, s2 = (float(v[i]) for v in (lv.alpha, lv.sigma, lv.alpha_next, lv.sigma_next))
            euler = first_order(lv, i)
            if s2 == 0.0 or a == 0.0 or float(lv.expmh[i]) * self.max_ratio < 1.0:  # e^-h = s' / s
                state.append((euler, None))
                continue
            # x' = a2 x~' with x~ = x / a, x~_e = x_e / a2; expanded into x, D, x_e, D_e:
            corr = (a2 / (2 * a) + s2 / (2 * s), a2 / 2 - a * s2 / (2 * s), 0.5 - a2 * s / (2 * a * s2))
            state.append((euler, (*corr, a2 * a2 * s / (2 * a * s2) - a2 / 2)))
        return state

    def step(self, ctx, state, i, x):
        euler, corr = state[i]
        p = ctx.denoise(x, i)
        d, x = p.pred_xstart, ctx.renoise(x, p)  # x^ = alpha D + sigma eps_uncond under CFG++
        x_e = axpby(euler[0], x, euler[1], d)
        if corr is None:  # fixed by the schedule in prepare, not by a tensor value
            return x_e, d
        p_e = ctx.denoise(x_e, i + 1)
        d_e, x_e = p_e.pred_xstart, ctx.renoise(x_e, p_e)
        c_x, c_d, c_xe, c_de = corr
        return axpby(c_x, x, c_d, d).add_(axpby(c_xe, x_e, c_de, d_e)), d


class EulerAncestral(GridSampler):
    """Euler ancestral sampling (the ancestral step of Song et al. 2021, "Score-Based Generative
    Modeling through SDEs", in the Euler form of Karras et al. 2022; as popularised by k-diffusion).

    In VE form, split the step to s' into a deterministic Euler step down to s_down and fresh noise
    of std s_up with s_down^2 + s_up^2 = s'^2, where s_up = min(s', eta s' sqrt(1 - s'^2 / s^2)):
        x~' = x~ + (s_down - s) (x~ - D) / s + s_up z.
    With eta = 1 this is the DDPM posterior q(x_t' | x_t, x_0 = D) (= DDIM with eta = 1); eta = 0 is
    Euler. In VP form x' = (alpha' s_down / sigma) x + alpha' (1 - s_down alpha / sigma) D + alpha' s_up z,
    finite at s = inf (s'/s = 0). The last step (s' = 0) adds no noise.

    Args:
        eta: scale of the ancestral noise, >= 0 (default 1).
    """

    order = 1
    nfe_per_step = 1
    stochastic = True
    supports_unconditional_renoise = True  # CFG++: x replaced by ctx.renoise(x, pred)

    def __init__(self, eta: float = 1.0, sigmas: str | None = None):
        super().__init__(sigmas)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        self.eta = float(eta)
        self.stochastic = self.eta > 0

    def prepare(self, ctx):
        lv = levels(ctx)
        ratio = lv.expmh  # s' / s = e^-h
        up = np.minimum(1.0, self.eta * np.sqrt(1.0 - ratio**2))  # s_up / s'
        down = np.sqrt(1.0 - up**2)  # s_down / s'
        c_x = lv.sigma_next / lv.sigma * down  # alpha' s_down / sigma with s' = sigma'/alpha'
        c_d = lv.alpha_next - lv.alpha * lv.sigma_next / lv.sigma * down
        c_z = lv.sigma_next * up
        return list(zip(c_x.tolist(), c_d.tolist(), c_z.tolist(), strict=True))

    def step(self, ctx, state, i, x):
        p = ctx.denoise(x, i)
        d = p.pred_xstart
        c_x, c_d, c_z = state[i]
        x_next = axpby(c_x, ctx.renoise(x, p), c_d, d)
        if c_z > 0.0:
            x_next = x_next.add_(ctx.noise(i, x), alpha=c_z)
        return x_next, d


class DPMSolverPP2M(GridSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models", Algorithm 2): the data-prediction exponential integrator

        x' = (sigma'/sigma) x - alpha' (e^-h - 1) D~,   D~ = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},

    with h = lambda' - lambda, r = h_{i-1} / h_i. The first step and the last (lambda' = inf) are
    first order (D~ = D_i), as is a step whose previous h is infinite (zero terminal SNR: then
    1/(2r) = 0). At lambda = -inf the first update is x' = sigma' x + alpha' D (e^-h = 0).

    Args:
        final_order: 1 (default: the last step is x' = D, as the paper and diffusers'
            ``lower_order_final``) or 2 (the last step extrapolates D to sigma = 0 through the
            last two levels, :func:`~diffreg_solvers.levels.final_extrapolation`; removes the
            first-order error floor of the final jump).

    Raises:
        ValueError: another ``final_order``.
    """

    order = 2
    nfe_per_step = 1
    stochastic = False
    supports_unconditional_renoise = True  # CFG++: x replaced by ctx.renoise(x, pred)

    def __init__(self, final_order: int = 1, sigmas: str | None = None):
        super().__init__(sigmas)
        self.final_order = check_final_order(final_order)

    def prepare(self, ctx):
        lv = levels(ctx)
        n = lv.num_steps
        coeffs = []
        for i in range(n):
            c_x, c_d = first_order(lv, i)
            q = 0.0  # 1 / (2r) = h_i / (2 h_{i-1})
            if 0 < i < n - 1 and math.isfinite(lv.h[i - 1]):
                q = float(lv.h[i] / (2.0 * lv.h[i - 1]))
            elif i == n - 1 and self.final_order == 2:
                q = final_extrapolation(lv) / c_d if c_d else 0.0  # c_d = alpha' = 1 at sigma' = 0
            coeffs.append((c_x, c_d * (1.0 + q), -c_d * q))
        return {"coeffs": coeffs, "prev": None}

    def step(self, ctx, state, i, x):
        p = ctx.denoise(x, i)
        d = p.pred_xstart
        c_x, c_d, c_prev = state["coeffs"][i]
        x_next = axpby(c_x, ctx.renoise(x, p), c_d, d)
        if c_prev != 0.0:
            x_next = x_next.add_(state["prev"], alpha=c_prev)
        state["prev"] = d
        return x_next, d


class DPMSolverPP2MSDE(GridSampler):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++": SDE-DPM-Solver++, in the multistep
    second-order form popularised by k-diffusion). The data-prediction reverse SDE solved with an
    exponential integrator, with the noise injected at rate eta:

        x' = (sigma'/sigma) e^(-eta h) x + alpha' (1 - e^-(1+eta) h) D_i
             + c2 (D_i - D_{i-1}) + sigma' sqrt(1 - e^(-2 eta h)) z,

    exact for the data term linear in lambda: c2 = alpha' (h - (1 - e^-(1+eta)h) / (1 + eta)) / h_{i-1}
    (``solver_type="heun"``), or its midpoint approximation c2 = alpha' (1 - e^-(1+eta) h) h / (2 h_{i-1})
    (``"midpoint"``, the default, as in k-diffusion and diffusers). eta = 1 makes the first-order
    step the DDPM posterior; eta = 0 gives DPM-Solver++(2M). The first and last steps are first
    order; the last adds no noise (sigma' = 0).

    Args:
        eta: noise rate, >= 0 (default 1). solver_type: ``"midpoint"`` or ``"heun"``.
    """

    order = 2
    nfe_per_step = 1
    stochastic = True
    supports_unconditional_renoise = True  # CFG++: x replaced by ctx.renoise(x, pred)

    def __init__(self, eta: float = 1.0, solver_type: str = "midpoint", sigmas: str | None = None):
        super().__init__(sigmas)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"unknown solver_type {solver_type!r}; accepted: midpoint, heun")
        self.eta = float(eta)
        self.solver_type = solver_type
        self.stochastic = self.eta > 0

    def prepare(self, ctx):
        lv = levels(ctx)
        n, eta = lv.num_steps, self.eta
        e = lv.expmh  # e^-h in [0, 1); 0.0 ** 0.0 == 1 gives the eta = 0 limits
        c_x = lv.sigma_next / lv.sigma * e**eta
        w = 1.0 - e ** (1.0 + eta)  # 1 - e^-(1+eta) h
        c_d = lv.alpha_next * w
        c_z = lv.sigma_next * np.sqrt(1.0 - e ** (2.0 * eta))
        coeffs = []
        for i in range(n):
            c2 = 0.0
            if 0 < i < n - 1 and math.isfinite(lv.h[i - 1]):
                if self.solver_type == "midpoint":
                    c2 = float(c_d[i] * lv.h[i] / (2.0 * lv.h[i - 1]))
                else:
                    c2 = float(lv.alpha_next[i] * (lv.h[i] - w[i] / (1.0 + eta)) / lv.h[i - 1])
            coeffs.append((float(c_x[i]), float(c_d[i]) + c2, -c2, float(c_z[i])))
        return {"coeffs": coeffs, "prev": None}

    def step(self, ctx, state, i, x):
        p = ctx.denoise(x, i)
        d = p.pred_xstart
        c_x, c_d, c_prev, c_z = state["coeffs"][i]
        x_next = axpby(c_x, ctx.renoise(x, p), c_d, d)
        if c_prev != 0.0:
            x_next = x_next.add_(state["prev"], alpha=c_prev)
        if c_z > 0.0:
            x_next = x_next.add_(ctx.noise(i, x), alpha=c_z)
        state["prev"] = d
        return x_next, d


def unipc_weights(h: float, rs: list[float], variant: str = "bh2") -> list[float]:
    """UniPC (data prediction) weights w_m of (D_m - D_s) for points at lambda_s + r_m h: the
    correction is sum_m w_m (D_m - D_s) / alpha', with

        w_m = B(h) a_m / r_m,  sum_m a_m r_m^(k-1) = k! h phi_{k+1}(-h) / B(h), k = 1..K,
        B(h) = 1 - e^-h (``variant="bh2"``) or B(h) = h (``"bh1"``; Zhao et al. 2023, section 3.3),

    phi_1(z) = (e^z - 1)/z, phi_{k+1}(z) = (phi_k(z) - 1/k!)/z: matching the Taylor expansion of
    alpha' int_0^h e^-(h-u) D(lambda_s + u) du term by term (Zhao et al. 2023, UniP / UniC with
    R_p(h) a_p = phi_p(h) / B(h)). With a single point the solved a_1 = 1/2 + O(h) is replaced by
    1/2, as in the paper's reference implementation (and diffusers).
    """
    big_b = -math.expm1(-h) if variant == "bh2" else h
    if len(rs) == 1:
        return [big_b * 0.5 / rs[0]]
    phi, fact, rhs = math.expm1(-h) / -h, 1.0, []
    for k in range(1, len(rs) + 1):
        fact *= k  # k!
        phi = (phi - 1.0 / fact) / -h  # phi_{k+1}(-h)
        rhs.append(fact * h * phi / big_b)
    a = np.linalg.solve(np.vander(np.asarray(rs), increasing=True).T, np.asarray(rhs))
    return [big_b * float(am) / r for am, r in zip(a, rs, strict=True)]


class UniPC(GridSampler):
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
    of Diffusion Models", UniP-p and UniC-p with B(h) = expm1(h), data prediction).

    Predictor UniP-p from x_i with D_i and the p-1 previous D's, h = lambda_{i+1} - lambda_i,
    r_m = (lambda_{i-m} - lambda_i) / h:
        x~_{i+1} = (sigma'/sigma) x_i + alpha' (1 - e^-h) D_i + alpha' sum_m w_m (D_{i-m} - D_i)
    Corrector UniC-p, once D_{i+1} = D(x~_{i+1}) is known (that same evaluation is then reused by the
    next predictor, so a step costs 1 NFE): the same formula from the same x_i with one more point,
    D_{i+1} at r = 1, which raises the order by one. Weights: :func:`unipc_weights`.

    The order is lowered at the start (warm-up), at the last step (lambda' = inf: first order, as
    diffusers' ``lower_order_final``) and next to lambda = -inf (zero terminal SNR), whose weight is 0
    in the limit r -> -inf. The final sample is not corrected (that would cost one more NFE).

    Args:
        order: predictor order p in 1..3 (default 2).
        variant: ``"bh2"`` (B(h) = 1 - e^-h, default) or ``"bh1"`` (B(h) = h, which the paper
            recommends for unconditional sampling; diffusers' ``solver_type``). With ``bh1`` the
            step out of lambda = -inf (zero terminal SNR, h = inf) is not corrected (its weight
            B(h) a is infinite there).
        final_order: 1 (default: the last step is first order, as diffusers) or 2 (the last
            step extrapolates D to sigma = 0 through the last two levels,
            :func:`~diffreg_solvers.levels.final_extrapolation`: no error floor from the final jump).
    """

    order = 2
    nfe_per_step = 1
    stochastic = False

    def __init__(self, order: int = 2, variant: str = "bh2", final_order: int = 1, sigmas: str | None = None):
        super().__init__(sigmas)
        self.final_order = check_final_order(final_order)
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"unknown UniPC variant {variant!r}; accepted: bh1, bh2")
        self.order = order
        self.variant = variant

    def _update(self, lv, i: int, p: int, corrector: bool):
        """(c_x, c_D_i, [c_D_{i-1}, ...], c_new) of the step from i with p points (+ D_{i+1})."""
        c_x, c_d = first_order(lv, i)
        rs = [float((lv.lam[i - m] - lv.lam[i]) / lv.h[i]) for m in range(1, p)] + ([1.0] if corrector else [])
        if self.variant == "bh1" and not math.isfinite(lv.h[i]):
            rs = []  # B(h) = h is infinite out of lambda = -inf: no correction
        w = [float(lv.alpha_next[i]) * wm for wm in unipc_weights(float(lv.h[i]), rs, self.variant)] if rs else []
        c_d -= sum(w)
        return c_x, c_d, w[: p - 1], (w[-1] if corrector and w else 0.0)

    def prepare(self, ctx):
        lv = levels(ctx)
        n = lv.num_steps
        orders = []
        for i in range(n):
            p = min(self.order, i + 1, n - i)
            while p > 1 and not np.isfinite(lv.lam[i - p + 1]):
                p -= 1
            orders.append(p)
        predictor = [self._update(lv, i, orders[i], False) for i in range(n)]
        b = final_extrapolation(lv) if self.final_order == 2 else 0.0
        if b:  # the last step (p = 1, c_x = 0): D(0) = (1 + b) D_{n-1} - b D_{n-2}
            c_x, c_d, _, _ = predictor[-1]
            predictor[-1] = (c_x, c_d + b, [-b], 0.0)
        corrector = [None] + [self._update(lv, i - 1, orders[i - 1], True) for i in range(1, n)]
        return {"predictor": predictor, "corrector": corrector, "x": None, "hist": []}

    def step(self, ctx, state, i, x):
        d = ctx.denoise(x, i).pred_xstart
        hist = state["hist"]  # D_{i-1}, D_{i-2}, ... (most recent first)
        corr = state["corrector"][i]
        if corr is not None:  # correct x_i from x_{i-1} using D_i at the predicted x_i
            c_x, c_base, c_old, c_new = corr
            x = axpby(c_x, state["x"], c_base, hist[0]).add_(d, alpha=c_new)
            for c, d_old in zip(c_old, hist[1:], strict=False):
                x = x.add_(d_old, alpha=c)
        hist.insert(0, d)
        del hist[max(self.order, self.final_order) :]
        state["x"] = x
        c_x, c_d, c_prev, _ = state["predictor"][i]
        x_next = axpby(c_x, x, c_d, d)
        for c, d_old in zip(c_prev, hist[1:], strict=False):
            x_next = x_next.add_(d_old, alpha=c)
        return x_next, d
