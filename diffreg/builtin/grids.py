"""Built-in grids (kind ``grid``): ``leading``, ``trailing``, ``linspace`` (integer timesteps of a
discrete process, diffusers' three ``timestep_spacing`` rules), ``karras`` (Karras et al. 2022,
eq. 5), ``exponential`` (uniform in log-SNR; Lu et al. 2022's "logSNR" steps, also registered as
``lambda_uniform``) and ``explicit`` (given times or VE sigmas)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from diffreg import hookimpl
from diffreg.process import Process
from diffreg.sampling.grid import Grid
from diffreg.schedule import spaced_timesteps
from diffreg.validation import check_finite_number


class Spacing(Grid):
    """Evenly spaced timesteps (diffusers' ``timestep_spacing``; see
    :func:`~diffreg.schedule.spaced_timesteps`): on a discrete process, integer timesteps of its
    tables. On a continuous process (data at ``clean.t``, levels in [t_min, t_max]), evenly in t:
    ``trailing`` t_max - k (t_max - t_clean) / steps for k = 0..steps-1 (the uniform Euler grid
    of flow matching: 1, 1 - 1/N, ..., 1/N); ``linspace`` from t_max to t_min inclusive
    (diffusers' ``FlowMatchEulerDiscreteScheduler`` grid for t_min = 1/1000); ``leading``
    t_min + k (t_max - t_min) / steps, descending."""

    def __init__(self, spacing: str, offset: int = 0):
        self.spacing = spacing
        self.offset = offset

    def max_steps(self, process):
        if process.discrete:
            return int(process.t_max) + 1
        if self.spacing == "trailing":  # the last level (t_max - t_clean) / steps must stay >= t_min
            t_clean = process.clean.t
            return max(1, int((process.t_max - t_clean) / (process.t_min - t_clean) * (1 + 1e-12)))
        return None

    def times(self, process, steps):
        if process.discrete:
            T = int(process.t_max) + 1
            ts = np.asarray(spaced_timesteps(T, steps, self.spacing)[::-1], dtype=np.float64) + self.offset
            if ts[0] > T - 1:
                raise ValueError(
                    f"leading spacing with offset={self.offset} passes the last timestep {T - 1} at steps={steps}"
                )
            return ts
        if self.spacing == "linspace":
            return np.linspace(process.t_max, process.t_min, steps) if steps > 1 else np.array([process.t_max])
        if self.spacing == "leading":
            return (process.t_min + np.arange(steps, dtype=np.float64) * ((process.t_max - process.t_min) / steps))[::-1]
        t = np.linspace(process.t_max, process.clean.t, steps + 1)[:-1]
        return np.maximum(t, process.t_min)  # rounding at the most steps


class _LogSnrGrid(Grid):
    """A grid laid in log-SNR between the process's least and most noisy finite levels; at zero
    terminal SNR (pure noise at ``t_max``) the first level is ``t_max`` itself, so sampling starts
    from pure noise."""

    def log_snrs(self, lam_min: float, lam_max: float, steps: int) -> np.ndarray:
        raise NotImplementedError

    def times(self, process, steps):
        lam_min, lam_max = process.log_snr_range()
        if steps == 1:
            return np.array([process.t_max])
        t = process.t_from_log_snr(self.log_snrs(lam_min, lam_max, steps))
        t[0] = process.t_max
        return t


class Karras(_LogSnrGrid):
    """Karras et al. 2022 ("Elucidating the Design Space", eq. 5): VE sigmas
    sigma_k = (sigma_max^(1/rho) + k / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

    Args:
        rho: the warp, a finite number > 0 (default 7).
    """

    def __init__(self, rho: float = 7.0):
        self.rho = check_finite_number(rho, "rho", minimum=1e-3)

    def log_snrs(self, lam_min, lam_max, steps):
        # VE sigma = exp(-lambda)
        hi, lo = math.exp(-lam_min / self.rho), math.exp(-lam_max / self.rho)
        ramp = np.linspace(0.0, 1.0, steps)
        return -self.rho * np.log(hi + ramp * (lo - hi))


class Exponential(_LogSnrGrid):
    """Uniform in log-SNR (= uniform in log VE sigma): k-diffusion's ``get_sigmas_exponential``,
    DPM-Solver's ``logSNR`` time steps (Lu et al. 2022)."""

    def log_snrs(self, lam_min, lam_max, steps):
        return np.linspace(lam_min, lam_max, steps)


class Explicit(Grid):
    """Given levels: ``times`` of the process (e.g. timesteps, strictly decreasing), or ``sigmas``
    (VE sigmas sigma / alpha, strictly decreasing, > 0, mapped to times by log-SNR; ``inf`` is pure
    noise on a zero-terminal-SNR process); the step count must match.

    Raises:
        ValueError: neither or both given; an entry that is not a real number (naming its index);
            not strictly decreasing; a sigma <= 0 or outside the process's VE sigma range (more
            than 0.1% beyond it: nearer ones are moved onto it); a length other than ``steps``.
    """

    def __init__(self, times: Sequence[float] | None = None, sigmas: Sequence[float] | None = None):
        if (times is None) == (sigmas is None):
            raise ValueError("the explicit grid takes exactly one of times= and sigmas=")
        values = times if times is not None else sigmas
        what = "times" if times is not None else "sigmas"
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple, np.ndarray)):
            raise TypeError(f"explicit grid {what} must be a list of numbers, got {values!r}")
        checked = []
        for k, v in enumerate(values):
            if sigmas is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and v == math.inf:
                checked.append(math.inf)  # pure noise (zero terminal SNR)
                continue
            try:
                checked.append(check_finite_number(v, f"explicit grid {what}[{k}]"))
            except TypeError as exc:
                raise ValueError(str(exc)) from None
        arr = np.asarray(checked, dtype=np.float64)
        if arr.size == 0 or (arr.size > 1 and not np.all(np.diff(arr) < 0)):
            raise ValueError(f"explicit grid {what} must be non-empty and strictly decreasing, got {arr.tolist()}")
        if sigmas is not None and arr[-1] <= 0:
            raise ValueError(
                f"explicit grid sigmas must be > 0 (VE sigma = sigma / alpha; 0 is the data, which every grid "
                f"reaches after its last level), got {float(arr[-1])!r}"
            )
        self.times_ = None if times is None else arr
        self.sigmas = None if sigmas is None else arr

    def _sigma_times(self, process) -> np.ndarray:
        """The process times of the VE sigmas, which must lie within the process's noise levels
        (up to a relative 1e-3, for sigmas rounded when copied; those are moved onto the range)."""
        lo, hi = process.log_snr_range()
        noisiest_is_pure = float(process.alpha_sigma(np.array([process.t_max]))[0][0]) == 0.0
        smallest, largest = math.exp(-hi), (math.inf if noisiest_is_pure else math.exp(-lo))
        for k, sigma in enumerate(self.sigmas.tolist()):
            if not smallest * (1 - 1e-3) <= sigma <= largest * (1 + 1e-3):
                raise ValueError(
                    f"explicit grid sigmas[{k}] = {sigma!r} is outside the process's VE sigma range "
                    f"[{smallest:.6g}, {largest:.6g}]"
                )
        with np.errstate(divide="ignore"):
            lam = np.clip(-np.log(self.sigmas), -np.inf, hi)
        lam = np.where(np.isfinite(lam), np.maximum(lam, lo), lam)
        times = np.asarray(process.t_from_log_snr(lam), dtype=np.float64)
        return np.clip(times, process.t_min, process.t_max)

    def fixed_steps(self) -> int:
        return len(self.times_ if self.times_ is not None else self.sigmas)

    def times(self, process, steps):
        arr = self.times_ if self.times_ is not None else self._sigma_times(process)
        if len(arr) != steps:
            raise ValueError(f"the explicit grid has {len(arr)} levels; steps={steps} asked (give steps={len(arr)})")
        return arr

    def __repr__(self) -> str:
        given = self.times_ if self.times_ is not None else self.sigmas
        return f"Explicit({'times' if self.times_ is not None else 'sigmas'}={given.tolist()})"


def leading(offset: int = 0) -> Spacing:
    """``0, r, 2r, ...`` with r = T // steps (DDIM paper; diffusers' default), plus ``offset``
    (diffusers' ``steps_offset``, e.g. 1 for Stable Diffusion's schedulers).

    Raises:
        ValueError: ``offset`` not an int in [0, 1000].
    """
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= 1000:
        raise ValueError(f"offset must be an int in 0..1000, got {offset!r}")
    return Spacing("leading", offset)


def trailing() -> Spacing:
    """``round(T - k T / steps) - 1``: starts at T - 1 (Lin et al. 2024, Table 2)."""
    return Spacing("trailing")


def linspace() -> Spacing:
    """``round(linspace(0, T - 1, steps))``."""
    return Spacing("linspace")


@hookimpl
def diffreg_register_grids(register):
    register("leading", leading, paper="Song et al. 2021 (DDIM); diffusers timestep_spacing='leading'")
    register("trailing", trailing, paper="Lin et al. 2024, Table 2")
    register("linspace", linspace, paper="diffusers timestep_spacing='linspace'")
    register("karras", Karras, paper="Karras et al. 2022, eq. 5")
    register("exponential", Exponential, paper="Lu et al. 2022 (DPM-Solver), logSNR steps")
    register("lambda_uniform", Exponential, paper="alias of exponential")
    register("explicit", Explicit)


__all__ = ["Explicit", "Exponential", "Karras", "Process", "Spacing"]
