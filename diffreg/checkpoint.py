"""Checkpoints: one ``.safetensors`` file that carries its own configuration.

The header metadata holds (as strings, the only type safetensors metadata allows):

- ``diffreg.kind``: ``"model"`` (a training-state file says ``"training_state"``);
- ``diffreg.format_version``: the checkpoint format (this diffreg writes :data:`FORMAT_VERSION`);
- ``diffreg.version``: the diffreg that wrote it;
- ``diffreg.config``: the :class:`~diffreg.config.CheckpointConfig` as JSON (diffusion, model,
  data), so loading needs no flags;
- ``diffreg.providers``: the distribution and version that provided each component
  (:mod:`diffreg.provenance`); loading resolves each name to that provider first.

Nothing is ever unpickled.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffreg import provenance, registry
from diffreg.config import CheckpointConfig, parse_json
from diffreg.diffusion import Diffusion
from diffreg.errors import CheckpointError, ConfigError
from diffreg.fileio import atomic_path
from diffreg.models.unet import UNet
from diffreg.validation import check_float_dtype, resolve_device

#: Checkpoint format written by this diffreg: 2 added the ``sampling`` defaults to the config.
FORMAT_VERSION = 2
#: safetensors dtypes loaded as floating-point weights.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
BUNDLED_DIGITS = "digits.safetensors"
#: Checkpoints shipped in ``diffreg/assets``, by name: ``load_checkpoint("flow-digits")``,
#: ``diffreg sample flow-digits`` (a file of that name in the working directory wins).
BUNDLED = {"digits": BUNDLED_DIGITS, "flow-digits": "flow_digits.safetensors"}


class LoadedCheckpoint(NamedTuple):
    """What :func:`load_checkpoint` returns: ``model, diffusion, config = load_checkpoint(path)``."""

    model: torch.nn.Module
    diffusion: Diffusion
    config: CheckpointConfig


def bundled_checkpoint_path(name: str = "digits") -> Path:
    """Path of a model shipped inside the package: ``"digits"`` (guided-diffusion style, the
    default) or ``"flow-digits"`` (rectified flow). Raises ValueError for another name."""
    if name not in BUNDLED:
        raise ValueError(f"no bundled model {name!r}; bundled: {', '.join(BUNDLED)}")
    return Path(str(resources.files("diffreg") / "assets" / BUNDLED[name]))


def resolve_bundled(path: Any) -> Any:
    """A bundled model's name (:data:`BUNDLED`) -> its path, unless a file of that name exists;
    anything else unchanged."""
    if isinstance(path, (str, os.PathLike)) and str(path) in BUNDLED and not Path(path).exists():
        return bundled_checkpoint_path(str(path))
    return path


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, EMA wrappers
        model = model.module
    return model


def save_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    config: CheckpointConfig | dict[str, Any],
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model``'s weights and ``config`` to one ``.safetensors`` file, atomically.

    Args:
        path: the file to write (replaced atomically if it exists).
        model: the network (a DDP wrapper is unwrapped).
        config: a :class:`~diffreg.CheckpointConfig` or a dict with ``diffusion``, ``model``
            (``{"name": ..., **options}``) and optionally ``data``.
        dtype: store floating-point tensors in this dtype (e.g. ``torch.float16`` to halve the
            file); loading casts back to the requested dtype.

    Returns:
        The path written.

    Raises:
        ConfigError: an invalid configuration. FileNotFoundError: the folder does not exist.
    """
    if dtype is not None:
        check_float_dtype(dtype, "dtype")
    cfg = CheckpointConfig.coerce(config)
    cfg.diffusion.validate()
    _check_classes(cfg, path)
    with torch.device("meta"):  # shapes only: no memory, and the caller's RNG is left alone
        reference = registry.create("model", cfg.model.name, **cfg.model.options)
    given = _unwrap(model).state_dict()
    problem = _mismatch_report(
        reference,
        {k: tuple(v.shape) for k, v in given.items()},
        cfg,
        {k: v.is_floating_point() for k, v in given.items()},
    )
    if problem:
        raise ConfigError(f"the model does not match the configuration it would be saved with: {problem}")
    state = {}
    for key, tensor in _unwrap(model).state_dict().items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous().cpu()
    from diffreg import __version__

    metadata = {
        "diffreg.kind": "model",
        "diffreg.format_version": str(FORMAT_VERSION),
        "diffreg.version": __version__,
        "diffreg.config": cfg.to_json(),
        provenance.HEADER_KEY: provenance.record(cfg),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)


def stored_float_dtype(path: str | os.PathLike[str]) -> torch.dtype | None:
    """The one floating-point dtype a checkpoint file stores its weights in (``torch.float16`` for the
    bundled model), or ``None`` when it mixes several or holds none: what a re-save should keep.

    Raises:
        CheckpointError / OSError: as :func:`read_metadata` for a file that is not a readable checkpoint.
    """
    by_name = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    with safe_open(str(path), framework="pt") as f:
        found = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    floats = found & set(by_name)
    return by_name[floats.pop()] if len(floats) == 1 else None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The header metadata of a safetensors file, without reading its tensors.

    Raises:
        FileNotFoundError: no such file. CheckpointError: not a safetensors file, or truncated.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a regular file (a directory?)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
            "diffreg checkpoints are .safetensors files written by save_checkpoint"
        ) from exc


def read_config(path: str | os.PathLike[str]) -> CheckpointConfig:
    """The :class:`~diffreg.CheckpointConfig` stored in a checkpoint.

    Raises:
        CheckpointError: not a diffreg model checkpoint, a training-state file, a newer format.
    """
    meta = read_metadata(path)
    kind = meta.get("diffreg.kind")
    if kind == "training_state":
        raise CheckpointError(
            f"{str(path)!r} is a training-state file (optimizer, EMA and RNG state for --resume), "
            "not a model checkpoint; pass the model checkpoint written beside it"
        )
    if kind not in (None, "model"):
        raise CheckpointError(f"{str(path)!r} is a diffreg {kind!r} file, not a model checkpoint")
    if "diffreg.config" not in meta:
        raise CheckpointError(
            f"{str(path)!r} is a safetensors file without a diffreg configuration in its metadata; "
            "it was not written by diffreg.save_checkpoint"
        )
    raw_version = meta.get("diffreg.format_version", "1")
    try:
        version = int(raw_version)
    except ValueError:
        version = 0
    if version < 1 or raw_version.strip() != str(version):
        raise CheckpointError(
            f"{str(path)!r}: bad checkpoint format version {raw_version!r}; accepted: 1..{FORMAT_VERSION}"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format {version}, newer than this diffreg "
            f"understands ({FORMAT_VERSION}); written by diffreg {meta.get('diffreg.version', '?')}: upgrade diffreg"
        )
    try:
        return CheckpointConfig.from_dict(parse_json(meta["diffreg.config"], "JSON configuration"))
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r}: its stored configuration is invalid: {exc}") from exc


def _check_classes(cfg: CheckpointConfig, path: Any) -> None:
    """The data table must agree with the model's options: the class count (the null class is
    the one after the last) and, for image models, the sample shape [C, H, W]."""
    options = cfg.model.options
    model_classes = options.get("num_classes")
    if cfg.num_classes is not None and model_classes is not None and cfg.num_classes != model_classes:
        raise CheckpointError(
            f"{str(path)!r}: data.num_classes = {cfg.num_classes} but the model has num_classes = {model_classes}"
        )
    shape = cfg.sample_shape
    dim = options.get("dim")
    if shape is not None and cfg.model.name in ("mlp", "diffreg:mlp") and isinstance(dim, int) and shape != (dim,):
        raise CheckpointError(f"{str(path)!r}: data.shape = {list(shape)} but the model takes vectors of dim {dim}")
    if shape is not None and len(shape) == 3 and "in_channels" in options and "image_size" in options:
        expected = (options["in_channels"], options["image_size"], options["image_size"])
        if shape != expected:
            raise CheckpointError(f"{str(path)!r}: data.shape = {list(shape)} but the model takes {list(expected)}")


def _mismatch_report(
    model: torch.nn.Module,
    tensors: dict[str, tuple[int, ...]],
    cfg: CheckpointConfig,
    floating: dict[str, bool] | None = None,
) -> str | None:
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(tensors) if expected[k] != tensors[k])
    wrong_kind = sorted(
        k for k in set(expected) & set(floating or {}) if (floating or {})[k] != state[k].is_floating_point()
    )
    if not (missing or unexpected or misshaped or wrong_kind):
        return None
    lines = []
    if wrong_kind:
        lines.append(
            f"tensors stored with a non-floating dtype where the model has weights: {', '.join(wrong_kind[:8])}"
        )
    if missing:
        lines.append(f"missing tensors ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        lines.append(
            f"unexpected tensors ({len(unexpected)}): "
            f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    for k in misshaped[:8]:
        lines.append(f"shape of {k}: file {tensors[k]}, model {expected[k]}")
    from diffreg.convert.layout import foreign_keys_hint

    hint = foreign_keys_hint(tensors, cfg.model.name)
    if hint:
        lines.append(hint)
    options = ", ".join(f"{k}={v!r}" for k, v in cfg.model.options.items())
    lines.append(
        f"the model was built as {cfg.model.name!r} with {options or 'default options'} and variance "
        f"{cfg.diffusion.variance.name!r}; options that change these tensors include "
        "model_channels, channel_mult, num_res_blocks, attention_resolutions, num_classes, "
        "in_channels and out_channels (doubled by a learned variance)"
    )
    return "; ".join(lines)


def _build_on_meta(cfg: CheckpointConfig, path: Any) -> torch.nn.Module | None:
    """The network of ``cfg`` on the ``meta`` device: shapes only, no memory, no RNG draws.

    Returns ``None`` when a third-party model cannot be built on ``meta`` (it then gets only the
    check after a real build). Raises CheckpointError for options the model refuses.
    """
    try:
        with torch.device("meta"):
            return registry.create("model", cfg.model.name, **cfg.model.options)
    except (ValueError, TypeError) as exc:  # ComponentOptionError, out-of-bounds sizes
        raise CheckpointError(f"{str(path)!r}: its stored model options are invalid: {exc}") from exc
    except Exception:  # pragma: no cover - a plugin whose __init__ needs real tensors
        return None


def _dtype_report(model: torch.nn.Module, dtypes: dict[str, str]) -> str | None:
    """Tensors whose stored dtype the model cannot take: a floating weight must be stored as
    F16, BF16, F32 or F64 (float8 is refused by name); an integer buffer as an integer."""
    float8, other = [], []
    for key, tensor in model.state_dict().items():
        stored = dtypes.get(key)
        if stored is None or (stored in FLOAT_DTYPES) == tensor.is_floating_point():
            continue
        (float8 if stored.startswith("F8") else other).append(f"{key} is {stored}")
    if not (float8 or other):
        return None
    parts = []
    if other:
        parts.append(
            f"tensors stored with a non-floating dtype where the model has weights, or the reverse ({len(other)}): "
            f"{', '.join(other[:8])}{' ...' if len(other) > 8 else ''}"
        )
    if float8:
        parts.append(
            f"float8 tensors ({len(float8)}): {', '.join(float8[:8])}{' ...' if len(float8) > 8 else ''}; "
            "diffreg does not load float8 weights: convert them to float16 or float32 first"
        )
    return "; ".join(parts) + f"; accepted for weights: {', '.join(FLOAT_DTYPES)}"


def load_checkpoint(
    path: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedCheckpoint:
    """Load a checkpoint: the model (in eval mode), its diffusion and its configuration.

    Nothing is built from the header alone: the network is first built on the ``meta`` device
    (shapes only, no memory) and its tensor names, shapes and dtypes are compared with those the
    file's header declares; only a file whose tensors fit is then built for real and read. Every
    size option of the built-in components is bounded (see :class:`~diffreg.models.UNet`,
    :class:`~diffreg.models.MLPDenoiser`, :data:`diffreg.config.MAX_TIMESTEPS`), so a hostile header
    can neither exhaust memory nor hang the loader.

    Args:
        path: a ``.safetensors`` file from :func:`save_checkpoint`, or a diffusers pipeline or
            UNet2DModel folder (see :mod:`diffreg.convert.diffusers`; needs ``diffreg[diffusers]``);
            ``None`` loads the bundled digits model. OpenAI weights and other foreign files are
            refused with the command that imports them.
        device: where to put the model (default CPU). dtype: floating dtype of the weights
            (default float32; fp16/bf16 work with every sampler, whose state stays fp32).

    Returns:
        :class:`LoadedCheckpoint` ``(model, diffusion, config)``; ``config.sampling`` holds the
        checkpoint's sampling defaults (clipping, dynamic thresholding, guidance, and the default sampler, steps
        and grid, e.g. one from ``diffreg optimize-steps``; files written before they
        were recorded get ``clip=True``).

    Raises:
        FileNotFoundError: no such file. CheckpointError: not safetensors, truncated, a format
        version that is not a positive int or is newer than this diffreg, a training-state file,
        out-of-bounds options, tensors in an unsupported dtype (float8), or tensors that do not fit
        the stored configuration (all mismatches reported together, naming the options that would
        explain them).
    """
    target_dtype = torch.float32 if dtype is None else check_float_dtype(dtype, "dtype")
    target_device = resolve_device(device if device is not None else "cpu")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint path must be a str or a path, got {type(path).__name__}")
    from diffreg.convert.layout import load_foreign  # diffusers folders load; other foreign files are named

    path = resolve_bundled(path)

    foreign = load_foreign(path, device, dtype)
    if foreign is not None:
        return foreign
    path = bundled_checkpoint_path() if path is None else Path(path)
    cfg = read_config(path)
    cfg = provenance.resolve(cfg, read_metadata(path).get(provenance.HEADER_KEY), str(path))
    _check_classes(cfg, path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: str(f.get_slice(k).get_dtype()) for k in keys}
    except Exception as exc:
        raise CheckpointError(
            f"{str(path)!r} could not be read (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc
    renames = UNet.legacy_key_renames(keys) if cfg.model.name == "unet" else {}  # diffreg 0.1's names
    shapes = {renames.get(k, k): v for k, v in shapes.items()}
    dtypes = {renames.get(k, k): v for k, v in dtypes.items()}
    skeleton = _build_on_meta(cfg, path)  # the header is checked against shapes before any allocation
    if skeleton is not None:
        _check_tensors(skeleton, shapes, dtypes, cfg, path)
    diffusion = Diffusion.from_config(cfg.diffusion)
    with torch.random.fork_rng(devices=[]):  # building the network must not move the caller's RNG
        model = registry.create("model", cfg.model.name, **cfg.model.options)
    if skeleton is None:
        _check_tensors(model, shapes, dtypes, cfg, path)
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in keys}
    except Exception as exc:
        raise CheckpointError(
            f"{str(path)!r} could not be read (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc
    state = {k: v.to(target_dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    model.to(device=target_device, dtype=target_dtype)
    model.eval()
    return LoadedCheckpoint(model, diffusion, cfg)


def _check_tensors(
    model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], cfg: CheckpointConfig, path: Any
) -> None:
    problem = _dtype_report(model, dtypes) or _mismatch_report(
        model, shapes, cfg, {k: d in FLOAT_DTYPES for k, d in dtypes.items()}
    )
    if problem:
        raise CheckpointError(f"{str(path)!r} does not fit its configuration: {problem}")
