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
        """The levels at ``times`` of ``process`` followed by its data level."""
        times = np.asarray(times, dtype=np.float64)
        alpha, sigma = process.alpha_sigma(times)
        clean = process.clean
        return cls(
            np.append(times, clean.t), np.append(alpha, clean.alpha), np.append(sigma, clean.sigma)
        )
