"""Shared input helpers of the testing kit: float64 conversion and per-example reshaping."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _as_float64(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float64)
    try:
        return torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"GaussianMixture {name} must be numbers, got {value!r}") from exc


def _flat(x: torch.Tensor, dim: int, what: str) -> torch.Tensor:
    """``x`` ``[N, ...]`` as ``[N, dim]`` (ValueError naming ``what`` when the sizes disagree)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(x).__name__}")
    if x.ndim < 1 or (x.ndim == 1 and dim != 1):
        raise ValueError(f"{what} must have shape [N, ...] with {dim} values per example, got {tuple(x.shape)}")
    n = x.shape[0]
    per = int(np.prod(x.shape[1:])) if x.ndim > 1 else 1
    if per != dim:
        raise ValueError(
            f"{what} has shape {tuple(x.shape)}: {per} values per example, but the mixture is {dim}-dimensional"
        )
    return x.reshape(n, dim)


def _per_example(value: float | torch.Tensor, n: int, device: torch.device, what: str) -> torch.Tensor:
    """A float or a ``[N]`` tensor as a float64 ``[N, 1]`` column on ``device``."""
    v = torch.as_tensor(value, dtype=torch.float64, device=device)
    if v.ndim == 0:
        v = v.expand(n)
    if v.shape != (n,):
        raise ValueError(f"{what} must be a number or have shape [{n}], got {tuple(v.shape)}")
    return v.to(device=device, dtype=torch.float64).reshape(n, 1)
