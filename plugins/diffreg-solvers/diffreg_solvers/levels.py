"""Per-step noise levels of one sampling call, in float64, computed once in ``prepare``.

Step ``i`` moves from grid level ``i`` (alpha, sigma) to the next one (alpha_next, sigma_next)
of ``ctx.levels``; after the last step sigma_next = 0 and alpha_next = 1 (the clean sample). With
x = alpha x0 + sigma eps, lambda = log(alpha / sigma), and
h = lambda_next - lambda the step size in log-SNR/2 time:

- ``expmh`` = exp(-h) = alpha sigma_next / (sigma alpha_next): always finite and in [0, 1), also
  where h is infinite (lambda = -inf at zero terminal SNR; lambda_next = +inf at the last step),
  so every first-order coefficient is written with it.
- ``h`` itself is +inf at those two ends; multistep corrections, which need finite h, fall back to
  lower order there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Levels:
    alpha: np.ndarray
    sigma: np.ndarray
    alpha_next: np.ndarray
    sigma_next: np.ndarray
    lam: np.ndarray
    h: np.ndarray
    expmh: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.alpha)


def levels(ctx) -> Levels:
    """The :class:`Levels` of ``ctx`` (a :class:`diffreg.sampling.SamplingContext`), visiting order."""
    lv = ctx.levels
    alpha, sigma = lv.alpha[:-1], lv.sigma[:-1]
    alpha_next, sigma_next = lv.alpha[1:], lv.sigma[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.log(alpha) - np.log(sigma)
        lam_next = np.log(alpha_next) - np.log(sigma_next)
        h = lam_next - lam
    expmh = alpha * sigma_next / (sigma * alpha_next)
    return Levels(alpha, sigma, alpha_next, sigma_next, lam, h, expmh)
