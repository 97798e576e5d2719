"""The exact probability-flow ODE solution for Gaussian-mixture data."""

from __future__ import annotations

import math

import numpy as np
import torch

from diffreg.diffusion import Diffusion
from diffreg.testing._arrays import _flat
from diffreg.testing.denoiser import ExactDenoiser
from diffreg.testing.mixture import GaussianMixture


def exact_ode_solution(
    mixture: GaussianMixture,
    diffusion: Diffusion,
    x_T: torch.Tensor,
    t_start: float | None = None,
    *,
    t_end: float | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """The exact solution of the probability-flow ODE from ``x_T`` at timestep ``t_start`` to data
    (or to the state at timestep ``t_end``).

    The ODE is Song et al. 2021 ("Score-based generative modeling through SDEs", eq. 13); in the
    variance-exploding form d x_tilde / d sigma = eps_hat(x_tilde, sigma) (Karras et al. 2022, eq. 1
    with eq. 3, sigma(t) = t), with x_tilde = x_t / sqrt(a), sigma = sqrt((1 - a) / a). It is solved
    after the change of variables sigma = tan(theta), x_t = cos(theta) x_tilde (so
    x_t = cos(theta) x0 + sin(theta) eps), which turns it into

        d x_t / d theta = v_hat(x_t, theta) = cos(theta) eps_hat - sin(theta) x0_hat

    (Salimans & Ho 2022, section 4: the angular parameterization, whose velocity is v), from
    theta_start = arccos(sqrt(abar[t_start])) down to theta = 0, where x_t = x0 (or down to
    theta_end = arccos(sqrt(abar[t_end])), where the state is x_{t_end}). Both ends are regular:
    sigma = inf (zero terminal SNR, abar = 0) is simply theta = pi / 2, where v_hat = -E[x0], so no
    large-sigma cut-off or special first step is needed. Solved with
    ``scipy.integrate.solve_ivp(method="DOP853")``.

    Any process x = alpha x0 + sigma eps (rectified flow, EDM, continuous VP: a
    :class:`~diffreg.continuous.ContinuousDiffusion`) has the same ODE in its VE form (it depends
    on alpha and sigma only through sigma / alpha), so it is solved the same way on the scaled
    state x / r, r = sqrt(alpha^2 + sigma^2) = r (cos(theta) x0 + sin(theta) eps) with
    theta = atan2(sigma, alpha), and scaled back by the end level's r.

    Args:
        mixture: the data distribution (the exact denoiser is its posterior mean).
        diffusion: gives abar at ``t_start``; un-respaced (or respaced, if ``t_start`` is kept);
            or a continuous diffusion, whose process gives alpha and sigma at any time.
        x_T: ``[N, D]`` or ``[N, ...]`` with D values per example: the state at ``t_start``.
        t_start: an original timestep of ``diffusion`` (default: its last, as in sampling); a
            float time of a continuous process (default: its ``t_max``).
        t_end: a timestep (time) below ``t_start`` to stop at (default: none, integrate to
            sigma = 0 and return data).
        rtol, atol: solver tolerances, at most 1e-9.

    Returns:
        x0 (or x_{t_end}, in the same variance-preserving scale as ``x_T``), float64, ``x_T``'s
        shape (``[N, D]`` for ``[N, D]`` input), on ``x_T``'s device.

    Raises:
        ValueError: a shape mismatch, an unknown ``t_start`` or ``t_end``, ``t_end >= t_start``,
            tolerances above 1e-9.
        RuntimeError: the solver failed.
        ImportError: scipy is not installed.
    """
    from scipy.integrate import solve_ivp

    if not (0 < rtol <= 1e-9 and 0 < atol <= 1e-9):
        raise ValueError(f"rtol and atol must be in (0, 1e-9], got {rtol} and {atol}")
    flat = _flat(x_T, mixture.dim, "x_T").detach().to(device="cpu", dtype=torch.float64)
    n, dim = flat.shape
    process = diffusion.process
    continuous = not process.discrete
    if t_start is None:
        t_start = process.t_max if continuous else int(diffusion.timestep_map[-1])
    lookup = None if continuous else ExactDenoiser(mixture, diffusion)

    def angle(t: float) -> tuple[float, float]:
        """theta = atan2(sigma, alpha) and the scale r = sqrt(alpha^2 + sigma^2) at time t."""
        if continuous:
            a, b = (float(v[0]) for v in process.alpha_sigma(np.array([float(t)])))
        else:
            assert lookup is not None
            abar = float(diffusion.alphas_cumprod[int(lookup.index(torch.tensor([int(t)]))[0])])
            a, b = math.sqrt(abar), math.sqrt(max(1.0 - abar, 0.0))
        return math.atan2(b, a), math.hypot(a, b)

    theta_start, r_start = angle(t_start)
    theta_end, r_end = 0.0, 1.0
    if t_end is not None:
        if not t_end < t_start:
            raise ValueError(f"t_end must be below t_start, got t_end={t_end} and t_start={t_start}")
        theta_end, r_end = angle(t_end)
    flat = flat / r_start  # x = r (cos(theta) x0 + sin(theta) eps) for any process
    if theta_start == theta_end or n == 0:
        return (flat * r_end).reshape(x_T.shape).to(x_T.device)

    def velocity(theta: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(y).reshape(n, dim)
        c = torch.tensor([[math.cos(theta)]], dtype=torch.float64)
        s = torch.tensor([[math.sin(theta)]], dtype=torch.float64)
        x0, eps = mixture._posterior(x, c, s)
        return (c * eps - s * x0).reshape(-1).numpy()

    sol = solve_ivp(velocity, (theta_start, theta_end), flat.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"exact_ode_solution: the ODE solver failed: {sol.message}")
    out = torch.from_numpy(np.ascontiguousarray(sol.y[:, -1])).reshape(x_T.shape) * r_end
    return out.to(x_T.device)
