"""Built-in noise schedules: ``linear``, ``cosine``, ``scaled_linear``, ``sigmoid``, ``explicit``
(discrete, guided-diffusion's tables), and the continuous processes ``rectified_flow``, ``edm``
and ``vp`` (:mod:`diffreg.processes`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffreg import hookimpl
from diffreg.processes import EDM, ContinuousVP, RectifiedFlow
from diffreg.schedule import NoiseSchedule, betas_for_alpha_bar, cosine_alpha_bar


class _BetaRangeSchedule(NoiseSchedule):
    """A schedule between ``beta_start`` and ``beta_end`` (0 < beta_start <= beta_end <= 1)."""

    default_range = (1e-4, 0.02)

    def __init__(
        self,
        num_timesteps: int,
        *,
        beta_start: float | None = None,
        beta_end: float | None = None,
        rescale_zero_terminal_snr: bool = False,
    ):
        self.beta_start = self.default_range[0] if beta_start is None else beta_start
        self.beta_end = self.default_range[1] if beta_end is None else beta_end
        if not 0 < self.beta_start <= self.beta_end <= 1:
            raise ValueError(f"need 0 < beta_start <= beta_end <= 1, got {self.beta_start} and {self.beta_end}")
        self.check(num_timesteps)
        super().__init__(num_timesteps, rescale_zero_terminal_snr=rescale_zero_terminal_snr)

    def check(self, num_timesteps: int) -> None:
        """Extra validation before the betas are computed."""


class LinearSchedule(_BetaRangeSchedule):
    """Betas linear from ``beta_start * 1000 / T`` to ``beta_end * 1000 / T`` (Ho et al. 2020,
    section 4; guided-diffusion's scaling so any T matches T = 1000). Defaults 1e-4 and 0.02."""

    def check(self, num_timesteps):
        if isinstance(num_timesteps, int) and num_timesteps >= 2 and 1000 / num_timesteps * self.beta_end >= 1:
            raise ValueError(
                f"linear schedule with num_timesteps={num_timesteps}: the last beta would be "
                f"{1000 / num_timesteps * self.beta_end:.3g} >= 1 (betas are scaled by 1000 / T); "
                "use more timesteps or the cosine schedule"
            )

    def compute_betas(self, num_timesteps):
        scale = 1000 / num_timesteps
        return np.linspace(scale * self.beta_start, scale * self.beta_end, num_timesteps, dtype=np.float64)


class CosineSchedule(NoiseSchedule):
    """alpha_bar(t) = cos(((t + s) / (1 + s)) pi / 2)^2, betas clipped at ``max_beta`` (Nichol &
    Dhariwal 2021, eq. 17)."""

    def __init__(
        self, num_timesteps: int, *, s: float = 0.008, max_beta: float = 0.999, rescale_zero_terminal_snr: bool = False
    ):
        if not 0 < max_beta <= 1:
            raise ValueError(f"max_beta must be in (0, 1], got {max_beta}")
        if not s >= 0:
            raise ValueError(f"s must be >= 0, got {s}")
        self.s, self.max_beta = s, max_beta
        super().__init__(num_timesteps, rescale_zero_terminal_snr=rescale_zero_terminal_snr)

    def compute_betas(self, num_timesteps):
        return betas_for_alpha_bar(num_timesteps, lambda t: cosine_alpha_bar(t, self.s), self.max_beta)


class ScaledLinearSchedule(_BetaRangeSchedule):
    """sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end) (latent diffusion, Rombach et al.
    2022; diffusers' ``scaled_linear``). Defaults 0.00085 and 0.012."""

    default_range = (0.00085, 0.012)

    def compute_betas(self, num_timesteps):
        return np.linspace(self.beta_start**0.5, self.beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


class SigmoidSchedule(_BetaRangeSchedule):
    """Betas = sigmoid(linspace(-6, 6)) scaled to [beta_start, beta_end] (as in diffusers' and
    GeoDiff's ``sigmoid`` schedule). Defaults 1e-4 and 0.02."""

    def compute_betas(self, num_timesteps):
        x = np.linspace(-6, 6, num_timesteps, dtype=np.float64)
        return 1 / (1 + np.exp(-x)) * (self.beta_end - self.beta_start) + self.beta_start


class ExplicitSchedule(NoiseSchedule):
    """The given ``betas`` (a list of T floats in (0, 1])."""

    def __init__(self, num_timesteps: int, *, betas: Sequence[float], rescale_zero_terminal_snr: bool = False):
        if len(betas) != num_timesteps:
            raise ValueError(f"explicit schedule: got {len(betas)} betas for num_timesteps={num_timesteps}")
        self._given = np.asarray(betas, dtype=np.float64)
        super().__init__(num_timesteps, rescale_zero_terminal_snr=rescale_zero_terminal_snr)

    def compute_betas(self, num_timesteps):
        return self._given


@hookimpl
def diffreg_register_schedules(register):
    register("linear", LinearSchedule, paper="Ho et al. 2020")
    register("cosine", CosineSchedule, paper="Nichol & Dhariwal 2021")
    register("scaled_linear", ScaledLinearSchedule, paper="Rombach et al. 2022")
    register("sigmoid", SigmoidSchedule, paper="Xu et al. 2022 (GeoDiff)")
    register("explicit", ExplicitSchedule)
    register("rectified_flow", RectifiedFlow, paper="Liu et al. 2023; Esser et al. 2024 (SD3 shift)", continuous=True)
    register("edm", EDM, paper="Karras et al. 2022, Table 1", continuous=True)
    register("vp", ContinuousVP, paper="Song et al. 2021 (VP SDE); Nichol & Dhariwal 2021 (cosine)", continuous=True)
