"""Checks shared by the built-in architectures: bounded size options and class labels.

Every size option is bounded so that a configuration (typed by a user or read from a hostile
checkpoint header) can neither hang the constructor (``num_res_blocks = 100000``) nor ask for more
memory than any real model of its kind; each error names the option, the value and the bound.
The bounds are generous: several times the largest published configuration of each kind
(ADM ImageNet 512: model_channels 256, channel_mult up to 4, num_res_blocks 2-3; Stable Diffusion:
model_channels 320, 4 levels).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

#: ``(low, high)`` accepted for each size option of :class:`~diffreg.models.UNet`.
UNET_BOUNDS: dict[str, tuple[int, int]] = {
    "in_channels": (1, 1024),
    "out_channels": (1, 2048),
    "model_channels": (1, 2048),
    "image_size": (1, 4096),
    "num_res_blocks": (1, 32),
    "num_heads": (1, 256),
    "num_heads_upsample": (1, 256),
    "num_head_channels": (1, 4096),
    "num_classes": (1, 100_000),
    "channel_mult": (1, 32),  # each entry
    "levels": (1, 8),  # len(channel_mult)
}

#: ``(low, high)`` accepted for each size option of :class:`~diffreg.models.MLPDenoiser`.
MLP_BOUNDS: dict[str, tuple[int, int]] = {
    "dim": (1, 65_536),
    "out_dim": (1, 131_072),
    "hidden": (1, 65_536),
    "depth": (1, 256),
    "num_classes": (1, 100_000),
}


def check_int(owner: str, name: str, value: Any, bounds: tuple[int, int]) -> int:
    """``value`` if it is an int (not a bool) in ``bounds`` (inclusive).

    Raises:
        ValueError: naming ``owner``'s option ``name``, the value and the accepted range.
    """
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{owner} option {name} must be an integer in {low}..{high:,}, got {value!r}")
    return value


def check_int_list(
    owner: str, name: str, value: Any, entry_bounds: tuple[int, int], length: tuple[int, int]
) -> tuple[int, ...]:
    """``value`` as a tuple if it is a list or tuple of ints within ``entry_bounds``, with a
    length within ``length`` (inclusive).

    Raises:
        ValueError: a string, a scalar, a wrong length or a bad entry, naming the value and what is
        accepted.
    """
    low, high = entry_bounds
    shortest, longest = length
    accepted = f"a list of {shortest}..{longest} integers, each in {low}..{high:,}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{owner} option {name} must be {accepted} such as [1, 2, 4], got {value!r}")
    if not shortest <= len(value) <= longest:
        raise ValueError(f"{owner} option {name} must be {accepted}; got {len(value)} entries: {list(value)!r}")
    for k, entry in enumerate(value):
        if isinstance(entry, bool) or not isinstance(entry, int) or not low <= entry <= high:
            raise ValueError(f"{owner} option {name} must be {accepted}; entry {k} is {entry!r}")
    return tuple(value)


def check_labels(owner: str, y: Any, batch: int, num_classes: int) -> None:
    """Class labels ``y`` for a conditional model: an integer tensor ``[batch]`` with values in
    ``0..num_classes`` (``num_classes`` itself is the null class of classifier-free guidance).

    Values are checked only for CPU tensors: on an accelerator the check would synchronize every
    model call (check labels once at the sampling entry there).

    Raises:
        TypeError: not an integer tensor. ValueError: a wrong shape, or a label out of range
        (naming the first one and the accepted range).
    """
    if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        what = f"a {y.dtype} tensor" if isinstance(y, torch.Tensor) else type(y).__name__
        raise TypeError(f"{owner} class labels y must be an integer tensor [N] such as torch.long, got {what}")
    if tuple(y.shape) != (batch,):
        raise ValueError(f"{owner} class labels y must have shape [{batch}] (one per sample), got {tuple(y.shape)}")
    if y.device.type == "cpu" and y.numel():
        bad = (y < 0) | (y > num_classes)
        if bool(bad.any()):
            first = int(y[bad][0])
            raise ValueError(
                f"{owner} class label {first} is out of range; accepted: 0..{num_classes - 1} "
                f"(and {num_classes}, the null class meaning 'no label')"
            )


def warn_no_labels(owner: str, model: torch.nn.Module, num_classes: int) -> None:
    """Warn once per model that a class-conditional model was called without labels, so it
    produces unconditional samples (the null class)."""
    if getattr(model, "_warned_no_labels", False):
        return
    object.__setattr__(model, "_warned_no_labels", True)
    warnings.warn(
        f"this {owner} is class-conditional (num_classes={num_classes}) but was called without class "
        f"labels y: it samples unconditionally (the null class {num_classes}); pass y (model_kwargs="
        "{'y': labels}) or, on the command line, --class-label",
        UserWarning,
        stacklevel=3,
    )
