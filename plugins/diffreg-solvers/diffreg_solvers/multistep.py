"""Multistep solvers reusing earlier model outputs: DPM-Solver++(3M) SDE, DEIS (tAB) and iPNDM.

Step i goes from grid level i to i + 1 of ``ctx.levels``; lambda = log(alpha / sigma), h_i =
lambda_{i+1} - lambda_i, VE sigma rho = sigma / alpha = exp(-lambda). History (earlier outputs and
their levels) lives in the generator, so one sampler instance can run several loops at once.
Steps next to lambda = -inf (zero terminal SNR) or to the data (lambda = +inf) use fewer points.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.polynomial import Polynomial

from .common import check_int, check_number, ddim_step, lincomb
from .samplers import GridSampler


class DPMSolverPP3MSDE(GridSampler):
    """DPM-Solver++(3M) SDE (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models", section 5 / Appendix: SDE-DPM-Solver++ with the third-order
    multistep correction, in the form of k-diffusion's ``sample_dpmpp_3m_sde``). With
    H = (1 + eta) h:

        x' = (sigma'/sigma) e^(-eta h) x + alpha' (1 - e^-H) D_i + alpha' phi2 D1 - alpha' phi3 D2
             + sigma' sqrt(1 - e^(-2 eta h)) z,
        phi2 = 1 - (1 - e^-H)/H,  phi3 = phi2/H - 1/2,

    D1 = d0 + (d0 - d1) r0/(r0 + r1), D2 = (d0 - d1)/(r0 + r1), d0 = (D_i - D_{i-1})/r0,
    d1 = (D_{i-1} - D_{i-2})/r1, r_k = h_{i-1-k}/h_i. eta = 0 is DPM-Solver++(3M) (the ODE solver,
    as diffusers' DPMSolverMultistepScheduler with solver_order=3). The first step is first order,
    the second second order (warm-up), the last (to the data) first order without noise.

    Args:
        eta: noise rate >= 0 (default 1: the first-order step is the DDPM posterior).
        s_noise: noise scale >= 0 (default 1).

    Raises:
        ValueError: eta or s_noise negative or not finite.
    """

    order = 3
    nfe_per_step = 1
    stochastic = True

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, sigmas: str | None = None):
        super().__init__(sigmas)
        self.eta = check_number(eta, "eta", minimum=0.0)
        self.s_noise = check_number(s_noise, "s_noise", minimum=0.0)
        self.stochastic = self.eta > 0 and self.s_noise > 0

    def steps(self, ctx, x):
        lv = ctx.levels
        lam = lv.log_snr
        n = ctx.num_steps
        hist: list = []  # (D, h) of earlier steps, most recent first
        for i in range(n):
            s, t = lv[i], lv[i + 1]
            d = ctx.denoise(x, i).pred_xstart
            if t.is_clean:
                x = ddim_step(x, d, s, t)
                yield x, d
                continue
            h = float(lam[i + 1] - lam[i])
            e = math.exp(-h) if math.isfinite(h) else 0.0
            big_h = (1.0 + self.eta) * h
            w = -math.expm1(-big_h) if math.isfinite(big_h) else 1.0
            terms = [(t.sigma / s.sigma * e**self.eta if s.sigma else 0.0, x), (t.alpha * w, d)]
            if math.isfinite(h) and hist and math.isfinite(hist[0][1]):
                phi2 = 1.0 - w / big_h if big_h else 0.0
                r0 = hist[0][1] / h
                if len(hist) >= 2 and math.isfinite(hist[1][1]):
                    r1 = hist[1][1] / h
                    phi3 = phi2 / big_h - 0.5
                    # d0 = (D - D1)/r0, d1 = (D1 - D2)/r1; coefficient of each D in phi2 D1 - phi3 D2
                    a0 = phi2 * (1 + r0 / (r0 + r1)) - phi3 / (r0 + r1)  # multiplies d0
                    a1 = -phi2 * r0 / (r0 + r1) + phi3 / (r0 + r1)  # multiplies d1
                    c_d, c_1, c_2 = a0 / r0, -a0 / r0 + a1 / r1, -a1 / r1
                    terms += [(t.alpha * c_d, d), (t.alpha * c_1, hist[0][0]), (t.alpha * c_2, hist[1][0])]
                else:
                    terms += [(t.alpha * phi2 / r0, d), (-t.alpha * phi2 / r0, hist[0][0])]
            x_next = lincomb(terms)
            if self.stochastic:
                c_z = t.sigma * math.sqrt(-math.expm1(-2.0 * self.eta * h)) * self.s_noise
                x_next = x_next.add_(ctx.noise(i, x), alpha=c_z)
            hist = [(d, h)] + hist[:1]
            x = x_next
            yield x, d


def _exp_poly_integral(poly: Polynomial, a: float, b: float) -> float:
    """int_a^b e^u p(u) du = [e^u (p - p' + p'' - ...)]_a^b; ``a`` or ``b`` may be -inf (then 0)."""

    def antiderivative(u: float) -> float:
        if u == -math.inf:
            return 0.0
        total, q, sign = 0.0, poly, 1.0
        for _ in range(poly.degree() + 1):
            total += sign * q(u)
            q, sign = q.deriv(), -sign
        return math.exp(u) * total

    return antiderivative(b) - antiderivative(a)


def deis_coefficients(log_rhos: list[float], log_rho_next: float) -> list[float]:
    """DEIS tAB weights (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
    Integrator", eq. 14 with the Lagrange extrapolation of eq. 15, in the log-rho time of
    diffusers' ``DEISMultistepScheduler``): with eps interpolated by the Lagrange polynomial in
    u = log rho through the points ``log_rhos`` (current first), x~' = x~ + sum_j c_j eps_j with
    c_j = int_{rho}^{rho'} l_j(log r) dr = int_u^{u'} e^v l_j(v) dv. ``log_rho_next`` may be -inf
    (the data)."""
    return [
        _exp_poly_integral(lagrange_basis(log_rhos, j), log_rhos[0], log_rho_next) for j in range(len(log_rhos))
    ]


def lagrange_basis(nodes, j: int) -> Polynomial:
    """The Lagrange basis polynomial l_j through ``nodes`` (1 at nodes[j], 0 at the others)."""
    basis = Polynomial([1.0])
    for m, node in enumerate(nodes):
        if m != j:
            basis = basis * Polynomial([-node, 1.0]) / (nodes[j] - node)
    return basis


class DEIS(GridSampler):
    """DEIS multistep, the time-quadratic-free tAB variant (Zhang & Chen 2023, "Fast Sampling of
    Diffusion Models with Exponential Integrator", ICLR, section 4, eqs. 14-15): in VE form
    x~ = x / alpha, rho = sigma / alpha, the probability-flow ODE is dx~/drho = eps(x~, rho), and
    one step integrates the Lagrange polynomial through the last ``order`` eps outputs (in
    u = log rho) exactly (:func:`deis_coefficients`):

        x' = alpha' (x / alpha + sum_j c_j eps_j).

    Order 1 is DDIM. Warm-up: step i uses min(order, i + 1) points; the last step (to the data) is
    first order and, below 15 steps, the one before at most second order (diffusers'
    ``lower_order_final``); a first level at
    alpha = 0 (zero terminal SNR) is left by the data-prediction DDIM step and its eps is not
    reused.

    Args:
        order: 1, 2 or 3 (default 3).

    Raises:
        ValueError: another order.
    """

    order = 3
    nfe_per_step = 1
    stochastic = False

    def __init__(self, order: int = 3, sigmas: str | None = None):
        super().__init__(sigmas)
        self.order = check_int(order, "order", 1, 3)

    def steps(self, ctx, x):
        lv = ctx.levels
        n = ctx.num_steps
        with np.errstate(divide="ignore"):
            log_rho = np.log(lv.sigma) - np.log(lv.alpha)  # +inf at alpha = 0, -inf at the data
        hist: list = []  # (eps, log rho), most recent first
        for i in range(n):
            s, t = lv[i], lv[i + 1]
            pred = ctx.denoise(x, i)
            if s.alpha == 0.0:
                x = ddim_step(x, pred.pred_xstart, s, t)
                yield x, pred.pred_xstart
                continue
            p = min(self.order, len(hist) + 1, 1 if i == n - 1 else 2 if i == n - 2 and n < 15 else 3)
            points = [(pred.pred_eps, float(log_rho[i]))] + hist[: p - 1]
            c = deis_coefficients([u for _, u in points], float(log_rho[i + 1]))
            x_next = lincomb([(t.alpha / s.alpha, x)] + [(t.alpha * cj, e) for cj, (e, _) in zip(c, points, strict=True)])
            hist = points[: self.order]
            x = x_next
            yield x, pred.pred_xstart


#: Adams-Bashforth weights for equal steps (most recent first), orders 1-4
ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


class IPNDM(GridSampler):
    """Improved pseudo numerical methods (iPNDM; Zhang & Chen 2023, "Fast Sampling of Diffusion
    Models with Exponential Integrator", Appendix: iPNDM, the PNDM of Liu et al. 2022 with the
    lower-order Adams-Bashforth warm-up instead of Runge-Kutta; k-diffusion's ``sample_ipndm``).
    In VE form, with the slope d_i = (x~_i - D_i) / rho_i = eps_i:

        x~' = x~ + (rho' - rho) sum_k b_k d_{i-k},

    b the Adams-Bashforth weights of order min(max_order, i + 1) for equal steps (``variable``:
    False, as the paper) or the variable-step Adams-Bashforth weights of the actual rho steps
    (``variable=True``, as k-diffusion's ``sample_ipndm_v``; declared order 3, 2 with
    ``variable=False``, whose equal-step weights lose an order on the unequal rho steps of a
    grid). A first level at alpha = 0 is left by the data-prediction DDIM step.

    Args:
        max_order: 1..4 (default 4). variable: bool (default True; see above).

    Raises:
        ValueError: another max_order; a non-bool ``variable``.
    """

    order = 3
    nfe_per_step = 1
    stochastic = False

    def __init__(self, max_order: int = 4, variable: bool = True, sigmas: str | None = None):
        super().__init__(sigmas)
        self.max_order = check_int(max_order, "max_order", 1, 4)
        if not isinstance(variable, bool):
            raise ValueError(f"variable must be True or False, got {variable!r}")
        self.variable = variable
        # equal-step weights on unequal steps: measured order 2.1 at 40-320 trailing steps
        self.order = min(self.max_order, 3 if variable else 2)

    def steps(self, ctx, x):
        lv = ctx.levels
        with np.errstate(divide="ignore"):
            rho = lv.sigma / lv.alpha
        hist: list = []  # (slope, rho), most recent first
        for i in range(ctx.num_steps):
            s, t = lv[i], lv[i + 1]
            pred = ctx.denoise(x, i)
            if s.alpha == 0.0:
                x = ddim_step(x, pred.pred_xstart, s, t)
                yield x, pred.pred_xstart
                continue
            points = [(pred.pred_eps, float(rho[i]))] + hist[: self.max_order - 1]
            if self.variable:
                # integrate the Lagrange polynomial through the slopes in rho over [rho, rho']
                nodes = [r for _, r in points]
                weights = []
                for j in range(len(nodes)):
                    anti = lagrange_basis(nodes, j).integ()
                    weights.append(float(anti(rho[i + 1]) - anti(rho[i])))
            else:
                weights = [(rho[i + 1] - rho[i]) * b for b in ADAMS_BASHFORTH[len(points) - 1]]
            x_next = lincomb([(t.alpha / s.alpha, x)] + [(t.alpha * w, e) for w, (e, _) in zip(weights, points, strict=True)])
            hist = points
            x = x_next
            yield x, pred.pred_xstart

