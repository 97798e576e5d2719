"""The levels of one sampling call (kind-independent): where each step starts and ends."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffreg.process import NoiseLevel, Process


@dataclass(frozen=True)
class Levels:
    """The levels of one sampling call, in visiting order: ``num_steps + 1`` entries, step ``i``
    going from entry ``i`` to entry ``i + 1``; the last is the data level (sigma = 0).

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
    def on_grid(cls, process: Process, times: Sequence[float]) -> Levels:
        """The levels at ``times`` of ``process`` followed by its data level.

        Raises:
            ValueError: ``times`` not a non-empty 1-D sequence of finite numbers within
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
        clean = process.clean
        return cls(
            np.append(times, clean.t), np.append(alpha, clean.alpha), np.append(sigma, clean.sigma)
        )
