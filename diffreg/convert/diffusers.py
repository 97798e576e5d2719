"""diffusers folders <-> diffreg.

A diffusers pipeline folder (``model_index.json``, ``unet/config.json`` +
``diffusion_pytorch_model.safetensors``, ``scheduler/scheduler_config.json``) or a bare UNet folder
loads as ``(model, diffusion, config)``: the network is diffusers' own ``UNet2DModel``
(:class:`~diffreg.convert.diffusers_model.DiffusersUNet2D`), and the scheduler's configuration is
translated into a diffreg diffusion (what maps to what:
:mod:`diffreg.convert.diffusers_scheduler`).

This module reads a folder (:func:`load_diffusers`, :func:`diffusers_config`,
:func:`import_diffusers`); :func:`export_diffusers` (:mod:`diffreg.convert.diffusers_export`)
writes the reverse: a folder that ``DDPMPipeline.from_pretrained`` loads. Every name of both is
importable from here.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch

from diffreg.convert.diffusers_export import export_diffusers
from diffreg.convert.diffusers_scheduler import (
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    VP_SCHEDULERS,
    translate_scheduler,
)
from diffreg.errors import CheckpointError

__all__ = [
    "MAX_JSON_BYTES",
    "PICKLE_WEIGHTS",
    "PREDICTION_TYPES",
    "VARIANCE_TYPES",
    "VP_SCHEDULERS",
    "WEIGHT_NAMES",
    "diffusers_config",
    "export_diffusers",
    "find_components",
    "import_diffusers",
    "load_diffusers",
    "translate_scheduler",
]

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
PICKLE_WEIGHTS = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
#: Largest config.json / scheduler_config.json read (real ones are a few kB; trained_betas of
#: T = 100,000 about 2 MB).
MAX_JSON_BYTES = 16 << 20


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise CheckpointError(f"{str(path)!r} is larger than {MAX_JSON_BYTES:,} bytes: not a diffusers config")
        data = json.loads(raw.decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable JSON file: {exc}") from exc
    except RecursionError:
        raise CheckpointError(f"{str(path)!r}: its JSON lists or objects are nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a JSON object")
    return data


def find_components(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any] | None]:
    """``(unet folder, scheduler config or None)`` of a pipeline folder (``model_index.json``)
    or a UNet folder (``config.json``; a ``scheduler/`` folder beside it is used if present).

    Raises:
        CheckpointError: neither layout, or a pipeline without a ``unet`` component.
    """
    root = Path(path)
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json")
        if "unet" not in index or not (root / "unet" / "config.json").is_file():
            parts = sorted(k for k in index if not k.startswith("_"))
            raise CheckpointError(
                f"{str(root)!r} is a diffusers {index.get('_class_name', 'pipeline')} folder without a unet "
                f"component (it has: {', '.join(parts)}); diffreg loads pipelines built on a UNet2DModel"
            )
        unet_dir = root / "unet"
        scheduler_file = root / "scheduler" / "scheduler_config.json"
    elif (root / "config.json").is_file():
        unet_dir = root
        scheduler_file = root.parent / "scheduler" / "scheduler_config.json"
        if not scheduler_file.is_file():
            scheduler_file = root / "scheduler_config.json"
    else:
        raise CheckpointError(
            f"{str(root)!r} is a folder but not a diffusers pipeline (model_index.json) or model "
            "(config.json) folder; diffreg checkpoints are single .safetensors files"
        )
    scheduler = _read_json(scheduler_file) if scheduler_file.is_file() else None
    return unet_dir, scheduler


def _weights_file(unet_dir: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (unet_dir / name).is_file():
            return unet_dir / name
    for name in PICKLE_WEIGHTS:
        if (unet_dir / name).is_file():
            return unet_dir / name
    raise CheckpointError(
        f"{str(unet_dir)!r} has a config.json but no weights ({', '.join(WEIGHT_NAMES + PICKLE_WEIGHTS)})"
    )


def diffusers_config(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Path, list[str]]:
    """The diffreg configuration (a dict for :class:`~diffreg.CheckpointConfig`) of a diffusers
    folder, its weights file, and notes (see :func:`translate_scheduler`).

    Raises:
        CheckpointError: not a UNet2DModel folder, no weights. ConfigError: an untranslatable
        scheduler. ImportError: diffusers missing.
    """
    from diffreg.config import CheckpointConfig

    unet_dir, scheduler = find_components(path)
    unet_config = _read_json(unet_dir / "config.json")
    kind = unet_config.get("_class_name")
    if kind != "UNet2DModel":
        raise CheckpointError(
            f"{str(unet_dir)!r} holds a diffusers {kind or 'model'}; diffreg loads UNet2DModel "
            "(pixel-space, unconditional or class-conditional) models"
        )
    notes: list[str] = []
    if scheduler is None:
        scheduler = {"_class_name": "DDPMScheduler"}
        notes.append("no scheduler/scheduler_config.json: diffusers' DDPMScheduler defaults assumed")
    in_ch, out_ch = unet_config.get("in_channels", 3), unet_config.get("out_channels", 3)
    size = unet_config.get("sample_size") or 32
    sizes = size if isinstance(size, list) else [size]
    for key, values in (("in_channels", [in_ch]), ("out_channels", [out_ch]), ("sample_size", sizes)):
        if len(values) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise CheckpointError(
                f"{str(unet_dir / 'config.json')!r}: {key} must be a positive int"
                f"{' or [height, width]' if key == 'sample_size' else ''}, got {unet_config.get(key)!r}"
            )
    diffusion, sampling, more = translate_scheduler(scheduler, out_ch, in_ch)
    notes += more
    h, w = (sizes[0], sizes[0]) if len(sizes) == 1 else sizes
    num_classes = unet_config.get("num_class_embeds")
    model = {
        "name": "diffusers_unet2d",
        "config": {k: v for k, v in unet_config.items() if not k.startswith("_")},
        "diffusers_version": unet_config.get("_diffusers_version"),
    }
    data: dict[str, Any] = {
        "shape": [in_ch, h, w],
        "num_classes": num_classes,
        "dataset": f"diffusers folder {Path(path).name}",
        "source": {"library": "diffusers", "scheduler": dict(scheduler)},
    }
    config: dict[str, Any] = {"diffusion": diffusion, "model": model, "data": data}
    if "sampling" in {f.name for f in attrs.fields(CheckpointConfig)}:
        config["sampling"] = sampling
    else:
        config["data"]["sampling"] = sampling
    return config, _weights_file(unet_dir), notes


def _weight_shapes(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors a ``.safetensors`` weights file declares, as ``meta`` tensors of their shapes
    (the header only: nothing is read); ``None`` for other files or an unreadable header (the
    regular reader then reports)."""
    if path.suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception:
        return None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from diffreg.convert.openai import read_state_dict

    return read_state_dict(path)


def load_diffusers(path: str | os.PathLike[str], device=None, dtype: torch.dtype | None = None):
    """Load a diffusers pipeline or UNet folder as :class:`~diffreg.checkpoint.LoadedCheckpoint`
    ``(model, diffusion, config)``, ready for every diffreg sampler; the translation notes (see
    :func:`translate_scheduler`) are issued as warnings.

    Args:
        path: the folder. device: default CPU. dtype: floating dtype of the weights (default float32).

    Raises:
        CheckpointError, ConfigError, ImportError: see :func:`diffusers_config`; CheckpointError
        also for weights that do not fit the UNet's config.
    """
    from diffreg import registry
    from diffreg.checkpoint import LoadedCheckpoint
    from diffreg.config import CheckpointConfig
    from diffreg.diffusion import Diffusion
    from diffreg.validation import check_float_dtype, resolve_device

    target_dtype = torch.float32 if dtype is None else check_float_dtype(dtype, "dtype")
    target_device = resolve_device(device if device is not None else "cpu")
    config, weights, notes = diffusers_config(path)
    for note in notes:
        warnings.warn(f"{path}: {note}", stacklevel=2)
    cfg = CheckpointConfig.from_dict(config)
    diffusion = Diffusion.from_config(cfg.diffusion)
    from diffreg.convert.openai import key_report

    # shapes first: the network on the meta device (no memory) against the weights' header, so a
    # config.json whose sizes do not fit its weights allocates nothing
    with torch.device("meta"):
        skeleton = registry.create("model", cfg.model.name, **cfg.model.options)
    header = _weight_shapes(weights)
    if header is not None:
        problem = key_report(skeleton.state_dict(), {f"unet.{k}": v for k, v in header.items()})
        if problem:
            raise CheckpointError(f"{str(weights)!r} does not fit {str(weights.parent / 'config.json')!r}: {problem}")
    with torch.random.fork_rng(devices=[]):
        model = registry.create("model", cfg.model.name, **cfg.model.options)
    state = {f"unet.{k}": v for k, v in _read_weights(weights).items()}
    expected = model.state_dict()
    problem = key_report(expected, state)
    if problem:
        raise CheckpointError(f"{str(weights)!r} does not fit {str(weights.parent / 'config.json')!r}: {problem}")
    model.load_state_dict({k: v.to(target_dtype) if v.is_floating_point() else v for k, v in state.items()})
    model.to(device=target_device, dtype=target_dtype)
    model.eval()
    return LoadedCheckpoint(model, diffusion, cfg)


def import_diffusers(folder: str | os.PathLike[str], output: str | os.PathLike[str]) -> tuple[Path, list[str]]:
    """Write a diffusers pipeline or UNet folder as one self-describing diffreg checkpoint: what
    :func:`load_diffusers` builds (float32 weights, the translated diffusion and sampling defaults),
    saved by :func:`diffreg.save_checkpoint` (atomically: a failure leaves no partial file).

    Returns:
        ``(the path written, the translation notes)`` (see :func:`translate_scheduler`).

    Raises:
        CheckpointError: ``folder`` is not a folder, or not a diffusers pipeline / UNet2DModel
        folder. ValueError: ``output`` is ``folder`` itself or a file the conversion reads.
        ConfigError, ImportError: see :func:`diffusers_config`.
    """
    from diffreg.checkpoint import save_checkpoint

    root, out = Path(folder), Path(output)
    if not root.is_dir():
        raise CheckpointError(
            f"{str(root)!r} is not a folder; give a diffusers pipeline folder (model_index.json) or UNet "
            "folder (config.json + diffusion_pytorch_model.safetensors)"
        )
    unet_dir, _ = find_components(root)
    read = {root / "model_index.json", unet_dir / "config.json", root / "scheduler" / "scheduler_config.json"}
    read |= {unet_dir / name for name in WEIGHT_NAMES + PICKLE_WEIGHTS}
    target = out.resolve()
    if target == root.resolve() or target in {p.resolve() for p in read}:
        raise ValueError(f"--output {str(out)!r} is the diffusers folder or one of its files; give a new .safetensors file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _, cfg = load_diffusers(root)
    notes = [str(w.message) for w in caught]
    return save_checkpoint(out, model, cfg), notes
