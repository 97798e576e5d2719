"""Noise-level grids: which integer timesteps a solver visits.

All grids live in the VE noise level of a VP diffusion, sigma_ve(t) = sqrt((1 - abar_t) / abar_t)
(the noise-to-signal ratio; lambda_t = log(alpha_t / sigma_t) = -log sigma_ve(t)):

- ``karras``: Karras et al. 2022, eq. 5, with rho = 7:
  sigma_k = (sigma_max^(1/rho) + k / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
- ``exponential``: log sigma uniform between sigma_max and sigma_min.
- ``lambda_uniform``: lambda uniform (Lu et al. 2022, DPM-Solver, "logSNR" time steps). Because
  lambda = -log sigma_ve this is the same grid as ``exponential``; both names are kept because
  k-diffusion and DPM-Solver call it differently.

Our models take integer timesteps, so every continuous sigma is mapped to the timestep whose
sigma is nearest in log sigma, and the solver then uses that timestep's exact sigma (model input and
update always agree). Neighbouring grid points that map to the same timestep collapse into one, so
for a short process (small T) or many steps the grid can have fewer than ``steps`` points.

With a zero-terminal-SNR schedule (abar_{T-1} = 0, sigma_max = inf) the grid is laid over the finite
part [sigma(0), sigma(T-2)] and its largest point is replaced by T-1, so sampling always starts
from pure noise at the last timestep.
"""

from __future__ import annotations

import numpy as np

GRIDS = ("karras", "exponential", "lambda_uniform")
KARRAS_RHO = 7.0


def check_grid(sigmas: str | None) -> str | None:
    """Validate a ``sigmas=`` option: ``None`` or one of :data:`GRIDS`.

    Raises:
        ValueError: any other value (the message lists the accepted ones).
    """
    if sigmas is None or (isinstance(sigmas, str) and sigmas in GRIDS):
        return sigmas
    raise ValueError(f"unknown sigmas grid {sigmas!r}; accepted: None (the spacing), {', '.join(GRIDS)}")


def log_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """log sigma_ve(t) = 0.5 (log(1 - abar) - log(abar)), float64, +inf where abar = 0."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return 0.5 * (np.log1p(-abar) - np.log(abar))


def grid_log_sigmas(log_sigma_min: float, log_sigma_max: float, n: int, grid: str) -> np.ndarray:
    """``n`` log sigmas of ``grid``, from sigma_max down to sigma_min (both finite)."""
    if n == 1:
        return np.array([log_sigma_max])
    if grid == "karras":
        lo, hi = np.exp(log_sigma_min / KARRAS_RHO), np.exp(log_sigma_max / KARRAS_RHO)
        ramp = np.linspace(0.0, 1.0, n)
        return KARRAS_RHO * np.log(hi + ramp * (lo - hi))
    if grid in ("exponential", "lambda_uniform"):
        return np.linspace(log_sigma_max, log_sigma_min, n)
    raise ValueError(f"unknown sigmas grid {grid!r}; accepted: {', '.join(GRIDS)}")


def grid_timesteps(alphas_cumprod: np.ndarray, steps: int, grid: str) -> list[int]:
    """Ascending unique timesteps (indices into ``alphas_cumprod``) nearest to ``grid``'s sigmas.

    The largest is always T - 1. Duplicates collapse, so the list can be shorter than ``steps``.

    Raises:
        TypeError / ValueError: ``steps`` not an int in [1, T]; an unknown grid.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {steps!r}")
    log_sigma = log_sigmas(alphas_cumprod)
    T = len(log_sigma)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}] (the process length), got {steps}")
    finite = np.flatnonzero(np.isfinite(log_sigma))
    top = int(finite[-1])  # T - 1, or T - 2 at zero terminal SNR
    targets = grid_log_sigmas(float(log_sigma[0]), float(log_sigma[top]), steps, grid)
    # log sigma increases with t: nearest neighbour through the midpoints between timesteps
    mids = 0.5 * (log_sigma[1 : top + 1] + log_sigma[:top])
    ts = set(np.searchsorted(mids, targets).tolist())
    ts.discard(top)
    ts.add(T - 1)
    return sorted(int(t) for t in ts)
