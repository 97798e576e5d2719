"""What the conformance checks share: failing with a message, the linear reference process."""

from __future__ import annotations

from typing import NoReturn

import numpy as np

from diffreg import registry
from diffreg.diffusion import Diffusion
from diffreg.loss import Loss
from diffreg.parameterization import MeanAndVariance, Parameterization


def _fail(message: str) -> NoReturn:
    raise AssertionError(message)


def _linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    return np.asarray(registry.create("schedule", "diffreg:linear", num_timesteps).betas)


def _diffusion(
    betas: np.ndarray, mean_type: str | Parameterization = "eps", variance: str = "fixed_small", loss: str | Loss = "mse"
) -> Diffusion:
    mt = registry.create("parameterization", f"diffreg:{mean_type}") if isinstance(mean_type, str) else mean_type
    vt = registry.create("variance", f"diffreg:{variance}")
    ls = registry.create("loss", f"diffreg:{loss}") if isinstance(loss, str) else loss
    return Diffusion(betas, MeanAndVariance(mt, vt), ls)
