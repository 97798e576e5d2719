"""Recognise what a file or folder is, so that loading it either works (diffusers folders) or says
which layout it saw and the command that imports it (OpenAI weights, stray files)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from diffreg.errors import CheckpointError

DIFFREG = "diffreg checkpoint"
DIFFUSERS_PIPELINE = "diffusers pipeline folder"
DIFFUSERS_MODEL = "diffusers model folder"
DIFFUSERS_WEIGHTS = "diffusers UNet2DModel weights"
OPENAI_WEIGHTS = "OpenAI improved-/guided-diffusion UNet weights"
PYTORCH_FILE = "PyTorch pickle file"
CONVERT_OPENAI = (
    "diffreg convert openai {path} --flags \"<the MODEL_FLAGS and DIFFUSION_FLAGS from the model's README>\" "
    "--output model.safetensors"
)


def key_layout(keys: Iterable[str]) -> str | None:
    """The foreign layout a set of state-dict names belongs to: :data:`DIFFUSERS_WEIGHTS`,
    :data:`OPENAI_WEIGHTS` or ``None`` (diffreg's own, or unknown)."""
    keys = set(keys)
    if {"conv_in.weight", "conv_norm_out.weight"} <= keys or any(k.startswith("down_blocks.") for k in keys):
        return DIFFUSERS_WEIGHTS
    if "input_blocks.0.0.weight" in keys and "time_embed.0.weight" in keys:
        return OPENAI_WEIGHTS
    return None


def detect_layout(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is: :data:`DIFFREG`, :data:`DIFFUSERS_PIPELINE`, :data:`DIFFUSERS_MODEL`,
    :data:`DIFFUSERS_WEIGHTS`, :data:`OPENAI_WEIGHTS`, :data:`PYTORCH_FILE`, or ``None``
    (missing, unreadable or unknown). Reads only folder listings, JSON configs and safetensors
    headers; never a pickle."""
    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return DIFFUSERS_PIPELINE
        if (p / "config.json").is_file():
            return DIFFUSERS_MODEL
        return None
    if not p.is_file():
        return None
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        return PYTORCH_FILE
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
    except Exception:
        return None
    if "diffreg.config" in meta or "diffreg.kind" in meta:
        return DIFFREG
    return key_layout(keys)


def foreign_layout_message(path: str | os.PathLike[str], layout: str) -> str:
    """One line: what ``path`` is and the command that imports it."""
    p = str(path)
    if layout == OPENAI_WEIGHTS:
        return f"{p!r} holds {layout} without a diffreg configuration; import it with: " + CONVERT_OPENAI.format(
            path=p
        )
    if layout == DIFFUSERS_WEIGHTS:
        folder = Path(p).parent
        return (
            f"{p!r} holds {layout}; load the folder that holds it with its config.json "
            f"(diffreg sample {str(folder)!r}, or diffreg.load_checkpoint({str(folder)!r}))"
        )
    if layout == PYTORCH_FILE:
        return (
            f"{p!r} is a {layout}, not a readable safetensors file (diffreg never unpickles files); if it is an OpenAI "
            "improved-/guided-diffusion UNet state dict, import it with: " + CONVERT_OPENAI.format(path=p)
        )
    return f"{p!r} is a {layout}"


def load_foreign(path, device=None, dtype=None):
    """For :func:`diffreg.load_checkpoint`: load a diffusers folder, raise a
    :class:`~diffreg.errors.CheckpointError` naming the layout and the import command for other
    foreign files, and return ``None`` for anything else (a diffreg checkpoint, or something the
    regular loader reports on)."""
    if path is None:
        return None
    layout = detect_layout(path)
    if layout in (DIFFUSERS_PIPELINE, DIFFUSERS_MODEL):
        from diffreg.convert.diffusers import load_diffusers

        return load_diffusers(path, device=device, dtype=dtype)
    if layout in (OPENAI_WEIGHTS, DIFFUSERS_WEIGHTS, PYTORCH_FILE):
        raise CheckpointError(foreign_layout_message(path, layout))
    if Path(path).is_dir():
        listing = sorted(q.name for q in Path(path).iterdir())[:8]
        raise CheckpointError(
            f"{str(path)!r} is a folder (not a regular file), and not a diffusers pipeline (model_index.json) or "
            "model (config.json) folder "
            f"(it holds: {', '.join(listing) or 'nothing'}); diffreg checkpoints are single .safetensors files"
        )
    return None


def foreign_keys_hint(keys: Iterable[str], model_name: str) -> str | None:
    """For key-mismatch reports of a ``model_name`` model: a sentence if ``keys`` are a foreign
    layout's (OpenAI's names are those of diffreg's ``unet``: no hint for it)."""
    layout = key_layout(keys)
    if layout == OPENAI_WEIGHTS and model_name != "unet":
        return (
            f"the tensors look like {layout}: configure them with `diffreg convert openai` and the model's README "
            "flags (they set num_head_channels, resblock_updown, attention order, the class embedding, ...)"
        )
    if layout == DIFFUSERS_WEIGHTS and model_name != "diffusers_unet2d":
        return f"the tensors look like {layout}: load the diffusers folder itself (diffreg sample FOLDER)"
    return None


__all__ = [
    "DIFFREG",
    "DIFFUSERS_MODEL",
    "DIFFUSERS_PIPELINE",
    "DIFFUSERS_WEIGHTS",
    "OPENAI_WEIGHTS",
    "PYTORCH_FILE",
    "detect_layout",
    "foreign_keys_hint",
    "foreign_layout_message",
    "key_layout",
    "load_foreign",
]
