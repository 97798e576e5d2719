"""The per-step prediction every sampler consumes (:class:`Prediction`), made from raw network output."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffreg.schedule import axpby

Scale = float | torch.Tensor


def _c(value: Scale, like: torch.Tensor) -> Scale:
    """A coefficient in ``like``'s dtype: Python floats as they are, float64 tensors cast."""
    return value.to(like.dtype) if isinstance(value, torch.Tensor) else value



class Prediction:
    """The per-step prediction every sampler consumes, made from raw network output.

    ``pred_xstart`` and ``pred_eps`` have ``x_t``'s shape ``[N, C, ...]`` and dtype; ``pred_eps``
    may be given as a zero-argument function, computed on first access (samplers that need only
    x0 then skip it). ``pred_v`` (Salimans & Ho 2022: alpha eps - sigma x0) is a view computed
    from both when ``alpha`` and ``sigma`` (the level's scales) are known. ``log_variance`` (and
    ``variance``, when already computed) is the reverse-process variance of a grid step:
    ``[N, 1, ...]`` for fixed types (a Python float inside sampling loops), ``x_t``'s shape for
    learned ones. It may instead be given as ``variances``, a zero-argument function returning
    ``(variance, log_variance)``, computed on first access (deterministic samplers never pay for it).

    Raises:
        TypeError: neither ``log_variance`` nor ``variances`` given.
    """

    __slots__ = (
        "_log_variance",
        "_model_eps",
        "_pred_eps",
        "_variance",
        "_variances",
        "alpha",
        "pred_xstart",
        "sigma",
    )

    def __init__(
        self,
        pred_xstart: torch.Tensor,
        pred_eps: torch.Tensor | Callable[[], torch.Tensor],
        log_variance: torch.Tensor | float | None = None,
        variance: torch.Tensor | float | None = None,
        *,
        variances: Callable[[], tuple[Any, Any]] | None = None,
        alpha: Any = None,
        sigma: Any = None,
        model_eps: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    ):
        if log_variance is None and variances is None:
            raise TypeError("Prediction needs log_variance or variances")
        self.pred_xstart = pred_xstart
        self._pred_eps = pred_eps
        self._log_variance = log_variance
        self._variance = variance
        self._variances = variances
        self.alpha = alpha
        self.sigma = sigma
        self._model_eps = model_eps

    @property
    def model_eps(self) -> torch.Tensor:
        """eps as the model's output implies it, before clipping, thresholding or ``denoised_fn``
        changed x0 (diffusers' ``use_clipped_model_output=False``); ``pred_eps`` where nothing did."""
        if self._model_eps is None:
            return self.pred_eps
        if callable(self._model_eps):
            self._model_eps = self._model_eps()
        return self._model_eps

    @property
    def pred_eps(self) -> torch.Tensor:
        """The predicted noise (computed on first access when given as a function)."""
        if callable(self._pred_eps):
            self._pred_eps = self._pred_eps()
        return self._pred_eps

    @property
    def pred_v(self) -> torch.Tensor:
        """v = alpha eps - sigma x0 (Salimans & Ho 2022, eq. 10).

        Raises:
            ValueError: the level's scales are unknown (a Prediction built without them).
        """
        if self.alpha is None or self.sigma is None:
            raise ValueError("pred_v needs the level's alpha and sigma")
        x0 = self.pred_xstart
        return axpby(_c(self.alpha, x0), self.pred_eps, _c(-self.sigma, x0), x0)

    def _resolve_variances(self) -> None:
        if self._variances is not None:
            self._variance, self._log_variance = self._variances()
            self._variances = None

    @property
    def log_variance(self) -> torch.Tensor | float:
        """The reverse-process log-variance (computed on first access when given lazily)."""
        self._resolve_variances()
        assert self._log_variance is not None
        return self._log_variance

    @property
    def variance(self) -> torch.Tensor | float | None:
        """The reverse-process variance, or ``None`` where only its log is known."""
        self._resolve_variances()
        return self._variance

    def replace(self, **changes) -> Prediction:
        """A copy with some fields changed (``pred_xstart``, ``pred_eps``, ``log_variance``, ``variance``)."""
        fields: dict[str, Any] = {
            "pred_xstart": self.pred_xstart,
            "pred_eps": self._pred_eps,
            "log_variance": self._log_variance,
            "variance": self._variance,
            "variances": self._variances,
            "alpha": self.alpha,
            "sigma": self.sigma,
            "model_eps": self._model_eps,
        }
        fields.update(changes)
        return Prediction(**fields)
