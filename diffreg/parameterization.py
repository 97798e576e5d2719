"""What the network predicts: a parameterization (eps, x0, v, flow, edm) times a variance type.

A :class:`Parameterization` (the product of the ``parameterization`` plugin kind) turns the mean
part of the raw network output into ``pred_xstart`` and ``pred_eps`` and gives the training target;
a :class:`VarianceType` gives the reverse-process variance, either from the tables (fixed) or from
extra output channels (learned). :class:`MeanAndVariance` composes the two and splits the network
output; a :class:`~diffreg.diffusion.Diffusion` holds one as ``diffusion.parameterization`` (its
``mean_type`` attribute is the :class:`Parameterization`).

Old names, kept as aliases (same class objects): ``MeanType = Parameterization`` and
``ModelParameterization = MeanAndVariance``.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import numpy as np
import torch

from diffreg.prediction import Prediction, Scale, _c
from diffreg.schedule import axpby
from diffreg.variance import (
    FixedLargeVariance,
    FixedSmallVariance,
    LearnedRangeVariance,
    LearnedVariance,
    VarianceType,
)

__all__ = [
    "EDMPreconditioning",
    "EpsPrediction",
    "FixedLargeVariance",
    "FixedSmallVariance",
    "FlowPrediction",
    "LearnedRangeVariance",
    "LearnedVariance",
    "MeanAndVariance",
    "MeanType",
    "ModelParameterization",
    "Parameterization",
    "Prediction",
    "VPrediction",
    "VarianceType",
    "XStartPrediction",
    "eps_from_xstart",
    "xstart_from_eps",
]


def _ratio(a: Scale, b: Scale) -> Scale:
    """``a / b`` for Python floats or tensors, ``+-inf`` (not ZeroDivisionError) where b = 0."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a / b
    if b == 0.0:
        return math.copysign(math.inf, a) if a != 0.0 else math.nan
    return a / b


class Parameterization(abc.ABC):
    """What the network's mean channels predict: the product of the ``parameterization`` kind.

    Also importable under its old name ``MeanType`` (an alias: the same class).

    Every method works at any noise level of any process, given by its signal and noise scales
    ``alpha`` and ``sigma`` (x_t = alpha x0 + sigma eps): Python floats when every example is at
    one level (sampling), or float64 tensors ``[N, 1, ...]`` broadcastable to ``x_t`` (training,
    guided-diffusion's per-example ``t``). Coefficients are formed in float64 and then cast to
    ``x_t``'s dtype, so results equal guided-diffusion's float64 tables cast per timestep.
    """

    name: str = ""
    #: whether :meth:`scale_input` is not the identity (the default path never calls it)
    scales_input: bool = False

    def scale_input(self, x_t: torch.Tensor, alpha: Scale, sigma: Scale) -> torch.Tensor:
        """The network's input at a level (alpha, sigma): ``x_t`` itself unless a preconditioning
        scales it (EDM's c_in, :class:`EDMPreconditioning`). Called by
        ``SamplingContext.model_output`` and ``Diffusion.call_model`` only where
        :attr:`scales_input` is True; ``x_t``'s shape and dtype in and out."""
        return x_t

    def check_process(self, process: Any) -> None:
        """Raise ValueError, with the reason, if this mean type cannot work on ``process`` (a
        :class:`~diffreg.process.Process`); called when a Diffusion is built. Default: any."""

    @abc.abstractmethod
    def predict(
        self, output: torch.Tensor, x_t: torch.Tensor, alpha: Scale, sigma: Scale
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(pred_xstart, pred_eps)`` (``x_t``'s shape and dtype) from the mean channels
        ``output`` (``x_t``'s shape)."""

    @abc.abstractmethod
    def target(self, x_start: torch.Tensor, noise: torch.Tensor, alpha: Scale, sigma: Scale) -> torch.Tensor:
        """The regression target of the mean channels for x_t = alpha x_start + sigma noise
        (``x_start``'s shape)."""

    def x0_mse_factor(self, snr: torch.Tensor) -> torch.Tensor:
        """Ratio of the x0 squared error to this target's squared error, at signal-to-noise
        ratio ``snr = alpha^2 / sigma^2``; used to express per-t weights on the x0 scale."""
        raise NotImplementedError(f"{type(self).__name__} does not define x0_mse_factor")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def xstart_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha: Scale, sigma: Scale) -> torch.Tensor:
    """x0 = x_t / alpha - (sigma / alpha) eps (Ho et al. 2020, eq. 4 solved for x0; guided-diffusion's
    ``_predict_xstart_from_eps`` with sqrt(1/abar) = 1/alpha, sqrt(1/abar - 1) = sigma/alpha)."""
    return axpby(_c(_ratio(1.0, alpha), x_t), x_t, _c(-_ratio(sigma, alpha), x_t), eps)


def eps_from_xstart(x_t: torch.Tensor, pred_xstart: torch.Tensor, alpha: Scale, sigma: Scale) -> torch.Tensor:
    """eps = (x_t - alpha x0) / sigma (Ho et al. 2020, eq. 4 solved for eps).

    Algebraically guided-diffusion's ``(sqrt(1/abar) x_t - x0) / sqrt(1/abar - 1)``, written so it
    stays finite at alpha = 0 (zero terminal SNR), where that form is inf / inf.
    """
    return axpby(_c(_ratio(1.0, sigma), x_t), x_t, _c(-_ratio(alpha, sigma), x_t), pred_xstart)


def predict_xstart_from_eps(tables, x_t, t, eps):
    """:func:`xstart_from_eps` at timesteps ``t`` of ``tables`` (int64 ``[N]`` or a Python int)."""
    return xstart_from_eps(x_t, eps, *tables.alpha_sigma(t, x_t))


def predict_eps_from_xstart(tables, x_t, t, pred_xstart):
    """:func:`eps_from_xstart` at timesteps ``t`` of ``tables`` (int64 ``[N]`` or a Python int)."""
    return eps_from_xstart(x_t, pred_xstart, *tables.alpha_sigma(t, x_t))


class EpsPrediction(Parameterization):
    """The network predicts the noise eps (Ho et al. 2020, eq. 11)."""

    name = "eps"

    def predict(self, output, x_t, alpha, sigma):
        return xstart_from_eps(x_t, output, alpha, sigma), output

    def target(self, x_start, noise, alpha, sigma):
        return noise

    def x0_mse_factor(self, snr):
        return 1.0 / snr

    def check_process(self, process):
        if not getattr(process, "discrete", False) and float(process.alpha_sigma(np.array([process.t_max]))[0][0]) == 0.0:
            raise ValueError(
                f"parameterization 'eps' cannot recover x0 = (x - sigma eps) / alpha where alpha = 0, which "
                f"{process!r} reaches at t_max (pure noise): use 'flow', 'x0' or 'edm' there"
            )


class XStartPrediction(Parameterization):
    """The network predicts x_start directly (guided-diffusion's ``ModelMeanType.START_X``)."""

    name = "x0"

    def predict(self, output, x_t, alpha, sigma):
        return output, eps_from_xstart(x_t, output, alpha, sigma)

    def target(self, x_start, noise, alpha, sigma):
        return x_start

    def x0_mse_factor(self, snr):
        return torch.ones_like(snr)


class VPrediction(Parameterization):
    """The network predicts v = alpha eps - sigma x0 (Salimans & Ho 2022, eq. 10, for a
    variance-preserving process: alpha^2 + sigma^2 = 1).

    Then x0 = alpha x_t - sigma v and eps = alpha v + sigma x_t, which stay finite at alpha = 0
    (zero terminal SNR).
    """

    name = "v"

    def predict(self, output, x_t, alpha, sigma):
        a, s = _c(alpha, x_t), _c(sigma, x_t)
        return axpby(a, x_t, -s, output), axpby(a, output, s, x_t)

    def target(self, x_start, noise, alpha, sigma):
        return _c(alpha, x_start) * noise - _c(sigma, x_start) * x_start

    def x0_mse_factor(self, snr):
        return 1.0 / (snr + 1.0)

    def check_process(self, process):
        if not getattr(process, "discrete", False):
            t = np.linspace(process.t_min, process.t_max, 7)
            alpha, sigma = process.alpha_sigma(t)
            if not np.allclose(alpha**2 + sigma**2, 1.0, rtol=0, atol=1e-9):
                raise ValueError(
                    f"parameterization 'v' (Salimans & Ho 2022: x0 = alpha x - sigma v) needs a "
                    f"variance-preserving process (alpha^2 + sigma^2 = 1); {process!r} is not: use "
                    "'flow' or 'edm' there"
                )


class FlowPrediction(Parameterization):
    """The network predicts the velocity u = eps - x0 (flow matching / rectified flow: Lipman et
    al. 2023, Liu et al. 2023; dx/dt of x_t = (1 - t) x0 + t eps; SD3, Flux).

    At any level x = alpha x0 + sigma eps: x0 = (x - sigma u) / (alpha + sigma) and eps = u + x0
    (exact for every process where alpha + sigma > 0, e.g. flow, VP, EDM).
    """

    name = "flow"

    def predict(self, output, x_t, alpha, sigma):
        x0 = axpby(_c(_ratio(1.0, alpha + sigma), x_t), x_t, _c(-_ratio(sigma, alpha + sigma), x_t), output)
        return x0, output + x0

    def target(self, x_start, noise, alpha, sigma):
        return noise - x_start

    def x0_mse_factor(self, snr):
        # x0 error = sigma / (alpha + sigma) u error = u error / (sqrt(snr) + 1)
        return 1.0 / (snr.sqrt() + 1.0) ** 2


class EDMPreconditioning(Parameterization):
    """EDM's preconditioning (Karras et al. 2022, "Elucidating the Design Space", Table 1 and
    eq. 7): D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x; c_noise(s)) in the VE form x = x0 + s eps,

        c_skip = sd^2 / (s^2 + sd^2),  c_out = s sd / sqrt(s^2 + sd^2),  c_in = 1 / sqrt(s^2 + sd^2)

    with sd = ``sigma_data``. On any process x = alpha x0 + sigma eps (s = sigma / alpha, the VE
    state x / alpha) this reads, with den = sqrt(sigma^2 + alpha^2 sd^2) (finite at alpha = 0):

        network input  x / den                  (:meth:`scale_input`; = c_in x / alpha)
        x0 = (alpha sd^2 / den^2) x + (sigma sd / den) F
        target of F = (sigma x0 - alpha sd^2 eps) / (sd den)

    c_noise, the network's time input, belongs to the process (the ``edm`` process gives
    log(sigma) / 4 by default). With the MSE loss on this target the weighting is EDM's
    lambda(s) = 1 / c_out^2 (eq. 8 with Table 1).

    Args:
        sigma_data: the data's standard deviation, finite > 0 (default 0.5).
    """

    name = "edm"
    scales_input = True

    def __init__(self, sigma_data: float = 0.5):
        if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not (
            math.isfinite(sigma_data) and sigma_data > 0
        ):
            raise ValueError(f"edm sigma_data must be a finite number > 0, got {sigma_data!r}")
        self.sigma_data = float(sigma_data)

    def _den(self, alpha, sigma):
        return (sigma**2 + alpha**2 * self.sigma_data**2) ** 0.5

    def scale_input(self, x_t, alpha, sigma):
        return x_t * _c(_ratio(1.0, self._den(alpha, sigma)), x_t)

    def predict(self, output, x_t, alpha, sigma):
        den = self._den(alpha, sigma)
        sd = self.sigma_data
        c_skip = _ratio(alpha * sd**2, den**2)
        c_out = _ratio(sigma * sd, den)
        x0 = axpby(_c(c_skip, x_t), x_t, _c(c_out, x_t), output)
        return x0, eps_from_xstart(x_t, x0, alpha, sigma)

    def target(self, x_start, noise, alpha, sigma):
        den = self._den(alpha, sigma)
        sd = self.sigma_data
        return axpby(_c(_ratio(sigma, sd * den), x_start), x_start, _c(-_ratio(alpha * sd, den), x_start), noise)

    def x0_mse_factor(self, snr):
        # c_out^2 = sigma^2 sd^2 / (sigma^2 + alpha^2 sd^2) = sd^2 / (1 + snr sd^2)
        return self.sigma_data**2 / (1.0 + snr * self.sigma_data**2)

    def __repr__(self) -> str:
        return f"EDMPreconditioning(sigma_data={self.sigma_data})"


class MeanAndVariance:
    """A parameterization of the mean and a variance type: how raw network output becomes a
    :class:`Prediction`. This is what ``Diffusion.parameterization`` holds.

    Also importable under its old name ``ModelParameterization`` (an alias: the same class).

    Args:
        mean_type: a :class:`Parameterization` (``eps``, ``x0``, ``v``, ``flow``, ``edm``, or a
            plugin's).
        variance_type: a :class:`VarianceType`.
    """

    def __init__(self, mean_type: Parameterization, variance_type: VarianceType):
        self.mean_type = mean_type
        self.variance_type = variance_type

    @property
    def learned_variance(self) -> bool:
        """Whether the network outputs the variance (doubling its output channels)."""
        return self.variance_type.learned

    def output_channels(self, in_channels: int) -> int:
        """Channels the network must output for data with ``in_channels`` channels."""
        return in_channels * (2 if self.learned_variance else 1)

    def split(self, model_output: torch.Tensor, x_t: torch.Tensor):
        """Split raw output ``[N, C or 2C, ...]`` into (mean part, variance part or ``None``).

        Raises:
            ValueError: when the output's shape is not what this parameterization expects for
                ``x_t`` (naming the expected channels and why).
        """
        if not self.variance_type.learned and model_output.shape == x_t.shape:
            return model_output, None
        c = x_t.shape[1]
        expected = self.output_channels(c)
        if (
            model_output.ndim != x_t.ndim
            or model_output.shape[0] != x_t.shape[0]
            or model_output.shape[1] != expected
            or model_output.shape[2:] != x_t.shape[2:]
        ):
            why = (
                f"{c} for the mean and {c} for the {self.variance_type.name} variance"
                if self.learned_variance
                else f"the data's channels; variance {self.variance_type.name!r} is not learned"
            )
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)} for input "
                f"{tuple(x_t.shape)}; expected {expected} channels ({why}), same batch and "
                "spatial size"
            )
        if self.learned_variance:
            mean_part, var_part = torch.split(model_output, c, dim=1)
            return mean_part, var_part
        return model_output, None

    def __repr__(self) -> str:
        return f"MeanAndVariance({self.mean_type!r}, {self.variance_type!r})"


#: Old name of :class:`Parameterization` (kept so existing imports and subclasses keep working).
MeanType = Parameterization

#: Old name of :class:`MeanAndVariance` (kept so existing imports keep working).
ModelParameterization = MeanAndVariance
