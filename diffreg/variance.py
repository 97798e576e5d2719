"""The reverse-process variance (kind ``variance``): fixed from the tables or learned by the network."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from diffreg.schedule import DiffusionTables


class VarianceType(abc.ABC):
    """The reverse-process variance (kind ``variance``).

    ``learned`` types read ``model_var_values`` from the second half of the network output (which
    doubles the output channels); fixed types ignore it.
    """

    name: str = ""
    learned: bool = False

    @abc.abstractmethod
    def variance(
        self,
        tables: DiffusionTables,
        model_var_values: torch.Tensor | None,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(model_variance, model_log_variance)``: ``[N, 1, ...]`` for fixed types (they
        broadcast against ``x_t``; Python floats when ``t`` is an int), ``x_t``'s shape for learned
        ones."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FixedSmallVariance(VarianceType):
    """sigma_t^2 = beta_tilde_t, the posterior variance (Ho et al. 2020, section 3.2)."""

    name = "fixed_small"

    def variance(self, tables, model_var_values, x_t, t):
        return (
            tables.gather("posterior_variance", t, x_t),
            tables.gather("posterior_log_variance_clipped", t, x_t),
        )


class FixedLargeVariance(VarianceType):
    """sigma_t^2 = beta_t, with beta_tilde_1 at t = 0 so the decoder NLL stays finite.

    Same as guided-diffusion's ``ModelVarType.FIXED_LARGE``.
    """

    name = "fixed_large"

    def variance(self, tables, model_var_values, x_t, t):
        tables.derive("fixed_large_variance", _fixed_large_variance)
        tables.derive("fixed_large_log_variance", lambda tb: np.log(tb.fixed_large_variance))
        return (
            tables.gather("fixed_large_variance", t, x_t),
            tables.gather("fixed_large_log_variance", t, x_t),
        )


def _fixed_large_variance(tables) -> np.ndarray:
    first = tables.posterior_variance[1] if tables.num_timesteps > 1 else tables.betas[0]
    return np.append(first, tables.betas[1:])


class LearnedVariance(VarianceType):
    """The network outputs the log-variance directly (guided-diffusion's ``ModelVarType.LEARNED``)."""

    name = "learned"
    learned = True

    def variance(self, tables, model_var_values, x_t, t):
        return torch.exp(model_var_values), model_var_values


class LearnedRangeVariance(VarianceType):
    """The network outputs v in [-1, 1]; log sigma^2 interpolates log beta_tilde and log beta.

    log sigma^2 = frac log beta_t + (1 - frac) log beta_tilde_t with frac = (v + 1) / 2
    (Nichol & Dhariwal 2021, eq. 15), beta_tilde clipped at t = 0 as in guided-diffusion.
    """

    name = "learned_range"
    learned = True

    def variance(self, tables, model_var_values, x_t, t):
        min_log = tables.gather("posterior_log_variance_clipped", t, x_t)
        max_log = tables.gather("log_betas", t, x_t)
        frac = (model_var_values + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        return torch.exp(model_log_variance), model_log_variance
