"""Single-step solvers that evaluate the denoiser between grid levels: DPM-Solver-2/3 (Lu et al.
2022) and an adaptive-step DPM-Solver-12 with error control (Lu et al. 2022, section 4.2).

Notation: a step goes from level s (alpha_s, sigma_s, lambda_s = log(alpha_s / sigma_s)) to level
t, h = lambda_t - lambda_s. Intermediate levels lie at lambda_s + r h (``ctx.level_at(log_snr=)``,
a fractional time of a discrete process). ``m`` are the model outputs in the chosen form: the
data prediction D (``algorithm_type="dpmsolver++"``, Lu et al. 2022b, "DPM-Solver++") or the
noise prediction eps (``"dpmsolver"``, Lu et al. 2022a, "DPM-Solver").
"""

from __future__ import annotations

import math

import torch

from diffreg.process import NoiseLevel

from .common import check_choice, check_int, check_number, ddim_step, lincomb
from .samplers import GridSampler

ALGORITHMS = ("dpmsolver++", "dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")


def singlestep_update(
    x: torch.Tensor, s: NoiseLevel, t: NoiseLevel, ms: list[torch.Tensor], rs: list[float], data: bool, heun: bool
) -> torch.Tensor:
    """One DPM-Solver update of order ``len(ms)`` (1..3) from ``x`` at ``s`` to ``t``, with model
    outputs ``ms`` at lambda_s + r h for ``r`` in ``[0] + rs`` (Lu et al. 2022a, eqs. 3.7-3.9 and
    Algorithms 1-2, noise prediction; Lu et al. 2022b, eqs. 8-10 and Algorithm 1, data
    prediction; the "midpoint" and "heun" (phi-function) forms of the second- and third-order
    terms as in diffusers' DPMSolverSinglestepScheduler).

    With phi1 = expm1(-h), data prediction (D):
        x_t = (sigma_t/sigma_s) x - alpha_t phi1 D0                                    (order 1)
            - 0.5 alpha_t phi1 D1            [midpoint]  |  + alpha_t (phi1/h + 1) D1 [heun]   (order 2)
    D1 = (m_r - m_0) / r. Order 3 ("midpoint", Lu et al. Algorithm 2's last stage) uses only the
    last intermediate point: + alpha_t (phi1/h + 1) (m_r2 - m_0) / r2; "heun" adds the second
    difference: + alpha_t (phi1/h + 1) D1 - alpha_t ((phi1 + h)/h^2 - 1/2) D2 with D1, D2 the first
    and second divided differences of m at 0, r1, r2 (scaled by h, h^2). The noise-prediction
    forms replace (sigma, alpha, -h) by (alpha, sigma, h) and flip the sign of the correction terms.
    """
    h = t.log_snr - s.log_snr
    if data:
        c_x, base, phi1, hh = t.sigma / s.sigma, t.alpha, math.expm1(-h), -h
    else:
        c_x, base, phi1, hh = t.alpha / s.alpha, t.sigma, math.expm1(h), h
    terms = [(c_x, x), (-base * phi1, ms[0])]
    phi2 = phi1 / hh - 1.0  # (e^hh - 1)/hh - 1 = hh phi_2(hh)
    if len(ms) == 2:
        (r,) = rs
        c1 = 0.5 * phi1 if not heun else phi2
        c1 = -base * c1 / r
        terms += [(c1, ms[1]), (-c1, ms[0])]
    elif len(ms) == 3:
        r1, r2 = rs
        if not heun:
            c = -base * phi2 / r2
            terms += [(c, ms[2]), (-c, ms[0])]
        else:
            phi3 = (phi1 - hh) / hh**2 - 0.5  # (e^hh - 1 - hh)/hh^2 - 1/2
            # D1 = (r2 d_1 - r1 d_2)/(r2 - r1), D2 = 2 (d_2 - d_1)/(r2 - r1), d_k = (m_k - m_0)/r_k
            w1 = -base * (phi2 * r2 / (r2 - r1) - phi3 * 2.0 / (r2 - r1)) / r1
            w2 = -base * (-phi2 * r1 / (r2 - r1) + phi3 * 2.0 / (r2 - r1)) / r2
            terms += [(w1, ms[1]), (w2, ms[2]), (-(w1 + w2), ms[0])]
    return lincomb(terms)


class DPMSolverSinglestep(GridSampler):
    """Single-step DPM-Solver of order 2 or 3 (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for
    Diffusion Probabilistic Model Sampling in Around 10 Steps", Algorithm 1 (DPM-Solver-2) and
    Algorithm 2 (DPM-Solver-3), eqs. 3.7-3.9; the data-prediction form DPM-Solver++(2S), Lu et al.
    2022b, Algorithm 1). Each step from grid level s to t evaluates the model at s and at the
    intermediate levels lambda_s + r_k h (r = 1/2 for order 2; 1/3, 2/3 for order 3), each stage an
    update of one order less from s (:func:`singlestep_update`), the last the full-order update to
    t: ``order`` model calls per step. Steps from lambda = -inf (zero terminal SNR) and the last
    step (to the data, lambda = inf) are first order (1 call), as diffusers' ``lower_order_final``
    with ``final_sigmas_type="zero"``.

    Args:
        order: 2 or 3. algorithm_type: ``"dpmsolver++"`` (data prediction, default) or
            ``"dpmsolver"`` (noise prediction). solver_type: ``"midpoint"`` (default; with order 2
            and r = 1/2 exactly Algorithm 1) or ``"heun"`` (the phi-function form; diffusers'
            names). r1 (order 2), r1 < r2 (order 3): intermediate fractions of each step in
            log-SNR, in (0, 1).

    Raises:
        ValueError: an option outside those accepted (naming it).
    """

    stochastic = False

    def __init__(
        self,
        order: int = 2,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        r1: float | None = None,
        r2: float | None = None,
        sigmas: str | None = None,
    ):
        super().__init__(sigmas)
        self.order = check_int(order, "order", 2, 3)
        self.nfe_per_step = self.order
        self.algorithm_type = check_choice(algorithm_type, "algorithm_type", ALGORITHMS)
        self.solver_type = check_choice(solver_type, "solver_type", SOLVER_TYPES)
        defaults = (0.5,) if order == 2 else (1 / 3, 2 / 3)
        given = (r1,) if order == 2 else (r1, r2)
        if order == 2 and r2 is not None:
            raise ValueError("r2 is an option of the order-3 solver (dpm_solver_3s)")
        rs = [defaults[k] if v is None else check_number(v, f"r{k + 1}", above=0.0) for k, v in enumerate(given)]
        if not all(0.0 < r < 1.0 for r in rs) or (len(rs) == 2 and not rs[0] < rs[1]):
            raise ValueError(f"intermediate fractions must satisfy 0 < r1 < r2 < 1, got {rs}")
        self.rs = rs

    def _output(self, pred):
        return pred.pred_xstart if self.algorithm_type == "dpmsolver++" else pred.pred_eps

    def steps(self, ctx, x):
        lv = ctx.levels
        data, heun = self.algorithm_type == "dpmsolver++", self.solver_type == "heun"
        for i in range(ctx.num_steps):
            s, t = lv[i], lv[i + 1]
            pred = ctx.denoise(x, i)
            if t.is_clean or not math.isfinite(s.log_snr):
                x = ddim_step(x, pred.pred_xstart, s, t)
                yield x, pred.pred_xstart
                continue
            h = t.log_snr - s.log_snr
            ms = [self._output(pred)]
            for k, r in enumerate(self.rs):
                mid = ctx.level_at(log_snr=s.log_snr + r * h)
                # the stage's own fractions, relative to its step s -> mid
                u = singlestep_update(x, s, mid, ms, [q / r for q in self.rs[:k]], data, heun)
                ms.append(self._output(ctx.denoise(u, mid)))
            x = singlestep_update(x, s, t, ms, self.rs, data, heun)
            yield x, pred.pred_xstart


class DPMSolver2S(DPMSolverSinglestep):
    """DPM-Solver-2, single step (Lu et al. 2022, "DPM-Solver", Algorithm 1; data-prediction form
    DPM-Solver++(2S), Lu et al. 2022b, Algorithm 1): :class:`DPMSolverSinglestep` with order 2.
    Options: algorithm_type, solver_type, r1 (default 1/2)."""

    order = 2
    nfe_per_step = 2

    def __init__(self, algorithm_type="dpmsolver++", solver_type="midpoint", r1=None, sigmas=None):
        super().__init__(2, algorithm_type, solver_type, r1, None, sigmas)


class DPMSolver3S(DPMSolverSinglestep):
    """DPM-Solver-3, single step (Lu et al. 2022, "DPM-Solver", Algorithm 2): :class:`DPMSolverSinglestep`
    with order 3. Options: algorithm_type, solver_type, r1, r2 (defaults 1/3, 2/3)."""

    order = 3
    nfe_per_step = 3

    def __init__(self, algorithm_type="dpmsolver++", solver_type="midpoint", r1=None, r2=None, sigmas=None):
        super().__init__(3, algorithm_type, solver_type, r1, r2, sigmas)


class Adaptive(GridSampler):
    """Adaptive step size with error control: DPM-Solver-12 (Lu et al. 2022, "DPM-Solver", section
    4.2 and Algorithm 4 with k = 2, in the data-prediction form). Each substep from lambda_s by h
    computes the first-order x_1 (DPM-Solver++(1), reusing D(s)) and the second-order x_2
    (DPM-Solver++(2S), r = 1/2: one more model call), the error
    E = max over samples of RMS((x_2 - x_1) / max(atol, rtol max(|x_1|, |x_s|))), accepts x_2 when
    E <= 1, and sets h <- min(theta h E^(-1/2), what is left), theta = 0.9 (Lu et al., eq. 4.4).

    How ``steps`` is read: the grid's levels are output points (the driver yields at each; the
    callback and ``progressive`` see them); between two of them the solver takes as many substeps
    as the tolerance needs, so the number of model calls is set by ``rtol``/``atol``, not by
    ``steps`` (read it from ``stats["nfe"]``/``ctx.nfe``). ``steps=1`` leaves all control to the
    tolerance. The last interval ends at the process's least noisy level (t_min) by substeps and
    then jumps to the data with one first-order step (1 call); a first level at lambda = -inf (zero
    terminal SNR) is left by one first-order step. The error test reads one number on the host per
    substep (step-size control cannot avoid it), and the step sizes are shared by the batch, so a
    sample depends on the batch it is drawn with (unlike the fixed-step samplers).

    Args:
        rtol, atol: tolerances (defaults 0.05 and 0.0078, Lu et al.'s for data in [-1, 1]).
        theta: safety factor in (0, 1] (0.9). max_substeps: substeps allowed per grid interval,
            >= 1 (default 200; then the sampler declares ``nfe_per_step = 2 max_substeps + 1``).

    Raises:
        ValueError: a tolerance <= 0, theta outside (0, 1], max_substeps < 1.
    """

    order = 2
    nfe_per_step = 401
    stochastic = False
    host_reads_per_step = True  # step-size control reads the error norm on the host, once per substep

    def __init__(
        self, rtol: float = 0.05, atol: float = 0.0078, theta: float = 0.9, max_substeps: int = 200, sigmas=None
    ):
        super().__init__(sigmas)
        self.rtol = check_number(rtol, "rtol", above=0.0)
        self.atol = check_number(atol, "atol", above=0.0)
        for name, value in (("rtol", self.rtol), ("atol", self.atol)):
            if value > 1e3:  # the error norm is formed in the state's dtype (float32 overflows near 3e38)
                raise ValueError(f"{name} must be in (0, 1000], got {value!r}")
        self.theta = check_number(theta, "theta", above=0.0)
        if self.theta > 1:
            raise ValueError(f"theta must be in (0, 1], got {theta!r}")
        self.max_substeps = check_int(max_substeps, "max_substeps", 1)
        self.nfe_per_step = 2 * self.max_substeps + 1

    def _error(self, x_hi, x_lo, x_prev) -> float:
        scale = torch.maximum(x_lo.abs(), x_prev.abs()).mul_(self.rtol).clamp_(min=self.atol)
        err = ((x_hi - x_lo) / scale).square_().reshape(x_hi.shape[0], -1).mean(1).sqrt()
        return float(err.max())  # one host read per substep: step-size control needs it

    def steps(self, ctx, x):
        lv = ctx.levels
        lam_end = ctx.process.log_snr_range()[1]
        h = None
        for i in range(ctx.num_steps):
            s, t = lv[i], lv[i + 1]
            pred0 = None
            if not math.isfinite(s.log_snr):
                pred0 = ctx.denoise(x, i)
                x = ddim_step(x, pred0.pred_xstart, s, t)
                yield x, pred0.pred_xstart
                continue
            target = t if not t.is_clean else ctx.level_at(log_snr=max(lam_end, s.log_snr))
            lam_t = target.log_snr
            here, first = s, True
            h = lam_t - s.log_snr if h is None else min(h, lam_t - s.log_snr)
            taken = 0
            while here.log_snr < lam_t and taken < self.max_substeps:
                d = ctx.denoise(x, i if first else here).pred_xstart
                if pred0 is None:
                    pred0 = d
                first = False
                while True:
                    taken += 1
                    last = taken >= self.max_substeps or h >= lam_t - here.log_snr
                    h_now = lam_t - here.log_snr if last else h
                    there = target if last else ctx.level_at(log_snr=here.log_snr + h_now)
                    mid = ctx.level_at(log_snr=here.log_snr + 0.5 * h_now)
                    x_lo = ddim_step(x, d, here, there)
                    d_mid = ctx.denoise(ddim_step(x, d, here, mid), mid).pred_xstart
                    x_hi = singlestep_update(x, here, there, [d, d_mid], [0.5], True, False)
                    err = self._error(x_hi, x_lo, x)
                    ok = err <= 1.0 or taken >= self.max_substeps
                    h = h_now * min(5.0, self.theta * max(err, 1e-10) ** -0.5)
                    if ok:
                        x, here = x_hi, there
                        break
            if t.is_clean:
                d = ctx.denoise(x, here if here is not s else i).pred_xstart
                pred0 = d if pred0 is None else pred0
                x = ddim_step(x, d, here, t)
            yield x, pred0
