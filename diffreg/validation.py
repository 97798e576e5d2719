"""Checks of user input shared by the library and the command line. Each raises a ``ValueError``
or ``TypeError`` that names the offending value and what is accepted."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch


def resolve_device(device: Any) -> torch.device:
    """A usable ``torch.device`` from ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a device.

    Raises:
        ValueError: an unknown device string, or a device this machine does not have (CUDA not
            available, an index past the GPU count, MPS not built).
    """
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) and device.strip():
        try:
            dev = torch.device(device.strip())
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; accepted: cpu, cuda, cuda:N, mps") from None
    else:
        raise ValueError(f"device must be a name such as 'cpu' or 'cuda:0', got {device!r}")
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {device!r}: MPS is not available on this machine; use 'cpu'")
        return dev
    raise ValueError(f"device {device!r} is not supported; accepted: cpu, cuda, cuda:N, mps")


def check_float_dtype(dtype: Any, what: str = "dtype") -> torch.dtype:
    """A floating-point ``torch.dtype`` (float16, bfloat16, float32, float64).

    Raises:
        TypeError: anything else (a string, an integer or complex dtype).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"{what} must be a floating-point torch.dtype (torch.float32, torch.float16, torch.bfloat16, "
            f"torch.float64), got {dtype!r}"
        )
    return dtype


def check_tensor(x: Any, what: str, *, floating: bool = True) -> torch.Tensor:
    """``x`` itself if it is a tensor (of a floating dtype when ``floating``).

    Raises:
        TypeError: not a tensor, or not floating point.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.dtype.is_floating_point:
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_finite_number(value: Any, what: str, *, minimum: float | None = None) -> float:
    """``value`` as a float if it is a finite real number (Python or numpy; >= ``minimum`` when
    given).

    Raises:
        ValueError / TypeError: non-numbers, NaN, infinities, values below ``minimum``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        text = repr(value)
        got = f"{text[:20]}... ({len(text)} digits)"
        raise ValueError(f"{what} is out of range (beyond a float's), got {got}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value!r}")
    return number


#: classifier-free guidance scales accepted (Ho & Salimans 2022, eq. 6 as uncond + w (cond - uncond))
GUIDANCE_RANGE = (0.0, 1e4)


def check_guidance_scale(value: Any, what: str = "guidance_scale") -> float:
    """``value`` as a float if it is a classifier-free guidance scale w in [0, 10000]: 0 is the
    unconditional model, 1 the conditional one, above 1 guided (typically 1..20). A negative w
    would steer away from the condition, almost always a typo, so it is refused.

    Raises:
        TypeError: not a number. ValueError: NaN, infinite or out of range (naming the range).
    """
    w = check_finite_number(value, what)
    low, high = GUIDANCE_RANGE
    if not low <= w <= high:
        raise ValueError(
            f"{what} {value!r} is out of range; accepted: 0..10000 (0: unconditional, 1: conditional, "
            "above 1: guided, typically 1..20)"
        )
    return w
