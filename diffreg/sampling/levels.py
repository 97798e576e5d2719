"""The levels of one sampling call (kind-independent): where each step starts and ends."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffreg.process import NoiseLevel, Process


@dataclass(frozen=True)
class Levels:
    """The levels of one sampling call, in visiting order: ``num_steps + 1`` entries, step ``i``
    going from entry ``i`` to entry ``i + 1``; the last is the final level: the data (sigma = 0),
    or the process's least noisy level ``t_min`` for ``final_level="t_min"`` (see :func:`final_level`).

    Attributes (float64 numpy arrays): ``t`` (process times), ``alpha``, ``sigma``, ``log_snr``
    (lambda = log(alpha / sigma), ``+inf`` at the data level, ``-inf`` at pure noise).
    """

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray

    @property
    def log_snr(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.alpha) - np.log(self.sigma)

    @property
    def num_steps(self) -> int:
        return len(self.t) - 1

    def __getitem__(self, i: int) -> NoiseLevel:
        return NoiseLevel(float(self.t[i]), float(self.alpha[i]), float(self.sigma[i]))

    @classmethod
    def on_grid(cls, process: Process, times: Sequence[float], final: str = "data") -> Levels:
        """The levels at ``times`` of ``process`` followed by the final level ``final`` (see
        :func:`final_level`). With ``final="t_min"`` and a grid that already ends at ``t_min``
        (``leading`` or ``linspace`` spacing, every timestep) that last grid level is the final
        level: no zero-length step is taken to it, so the call makes ``len(times) - 1`` steps.
        (diffusers' DDIM with ``set_alpha_to_one=False`` evaluates the model there once more and
        steps from alpha-bar[0] to alpha-bar[0]: x' = alpha x0 + sigma eps, which is x again when
        eps is re-derived from x0, diffreg's default.)

        Raises:
            ValueError: ``final`` not ``"data"`` or ``"t_min"``; one level at ``t_min`` with
                ``final="t_min"`` (no step left); ``times`` not a non-empty 1-D sequence of finite numbers within
                [t_min, t_max], or levels whose noise does not strictly fall (log-SNR strictly
                increasing): a repeated, reversed or numerically equal level (naming the first one)
                would divide by a zero step size or solve a different problem silently.
        """
        try:
            times = np.asarray(times, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"times must be a sequence of numbers (process times), got {times!r}") from None
        if times.ndim != 1 or times.size == 0:
            raise ValueError(f"times must be a non-empty 1-D sequence of process times, got shape {times.shape}")
        outside = ~np.isfinite(times) | (times < process.t_min) | (times > process.t_max)
        if outside.any():
            k = int(np.argmax(outside))
            raise ValueError(
                f"times[{k}] = {float(times[k])!r} is outside the process's range [{process.t_min}, {process.t_max}]"
            )
        alpha, sigma = process.alpha_sigma(times)
        with np.errstate(divide="ignore"):
            lam = np.log(np.asarray(alpha, dtype=np.float64)) - np.log(np.asarray(sigma, dtype=np.float64))
        if times.size > 1 and not np.all(np.diff(lam) > 0):
            k = int(np.argmax(~(np.diff(lam) > 0))) + 1
            raise ValueError(
                f"times must strictly decrease in noise (each level less noisy than the one before), but "
                f"times[{k}] = {float(times[k])!r} follows times[{k - 1}] = {float(times[k - 1])!r} "
                f"(log-SNR {lam[k - 1]:.6g} -> {lam[k]:.6g})"
            )
        end = final_level(process, final)
        if not end.is_clean and lam[-1] >= end.log_snr:  # the grid ends at t_min: that is the final level
            if times.size == 1:
                raise ValueError(
                    f"a grid of one level at t_min = {float(times[0])!r} leaves no step to take with "
                    "final_level='t_min'; give more steps (or a grid that starts above t_min)"
                )
            return cls(times, np.asarray(alpha, dtype=np.float64), np.asarray(sigma, dtype=np.float64))
        return cls(np.append(times, end.t), np.append(alpha, end.alpha), np.append(sigma, end.sigma))


#: The accepted values of the sampling option ``final_level``.
FINAL_LEVELS = ("data", "t_min")


def final_level(process: Process, final: str = "data") -> NoiseLevel:
    """The level a sampling call ends at: ``"data"`` (default): the data, alpha = 1, sigma = 0
    (:attr:`Process.clean`); ``"t_min"``: the process's least noisy level (alpha-bar_0 of a discrete
    process), whose state is returned as the sample without a final denoising step (diffusers'
    DDIM/PNDM ``set_alpha_to_one=False``: the last step goes to alpha-bar[0]; score-SDE's samplers
    ending at t = eps without denoising).

    Raises:
        ValueError: ``final`` not one of :data:`FINAL_LEVELS`.
    """
    if final == "data":
        return process.clean
    if final == "t_min":
        return process.level(process.t_min)
    raise ValueError(f"final_level must be one of {', '.join(repr(f) for f in FINAL_LEVELS)}, got {final!r}")
