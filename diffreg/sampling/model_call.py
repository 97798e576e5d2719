"""Calling the network: its dtype and device, the unconditional inputs of classifier-free
guidance, dynamic thresholding, and the on-device finiteness record of its outputs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch


def dynamic_threshold(percentile: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", section 2.3): per sample,
    s = max(1, quantile(|x0|, percentile)); x0 <- clip(x0, -s, s) / s.

    Raises:
        ValueError: ``percentile`` outside (0, 1].
    """
    if not 0 < percentile <= 1:
        raise ValueError(f"dynamic_threshold percentile must be in (0, 1], got {percentile!r}")

    def apply(pred_xstart: torch.Tensor) -> torch.Tensor:
        flat = pred_xstart.reshape(pred_xstart.shape[0], -1).abs().float()
        s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0).to(pred_xstart.dtype)
        s = s.reshape((-1,) + (1,) * (pred_xstart.ndim - 1))
        return torch.maximum(torch.minimum(pred_xstart, s), -s) / s

    return apply


def model_dtype(model: Any) -> torch.dtype | None:
    """The dtype of a module's first floating-point parameter (``None`` for other callables)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def model_device(model: Any) -> torch.device:
    """The device of a module's first parameter (the CPU for other callables)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def finiteness(x: torch.Tensor) -> torch.Tensor:
    """A 0-d device tensor that is finite when every value of ``x`` is: its sum (one reduction;
    it also overflows to inf for finite values beyond ~1e38 / numel, which no sane output reaches)."""
    return x.sum() if x.dtype in (torch.float32, torch.float64) else x.sum(dtype=torch.float32)


def exp(value: torch.Tensor | float) -> torch.Tensor | float:
    """``exp`` of a tensor or of a Python float (fixed variances are floats inside loops)."""
    return torch.exp(value) if isinstance(value, torch.Tensor) else math.exp(value)


def null_class_kwargs(model: Any, model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Unconditional kwargs for classifier-free guidance: ``y`` replaced by the model's null class.

    Raises:
        ValueError: no ``y`` in ``model_kwargs``, or a model without ``null_class``.
    """
    null = getattr(model, "null_class", None)
    if "y" not in model_kwargs or null is None:
        raise ValueError(
            "classifier-free guidance needs an unconditional input: pass uncond_model_kwargs=, "
            "or a class-conditional model with a `null_class` attribute and model_kwargs={'y': ...}"
        )
    return {**model_kwargs, "y": torch.full_like(model_kwargs["y"], int(null))}


def cat_kwargs(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    """Conditional and unconditional keyword arguments as one doubled batch.

    Raises:
        ValueError: a non-tensor argument that differs between the two.
    """
    out = {}
    for key in set(cond) | set(uncond):
        a: Any = cond.get(key)
        b: Any = uncond.get(key)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            out[key] = torch.cat([a, b])
        elif a is b or a == b:
            out[key] = a
        else:
            raise ValueError(
                f"model_kwargs[{key!r}] differs between the conditional and unconditional inputs and is not a tensor"
            )
    return out


def check_output(out: Any) -> torch.Tensor:
    """``out`` if it is a tensor. Raises TypeError naming what the model returned otherwise."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor, got {type(out).__name__}")
    return out
