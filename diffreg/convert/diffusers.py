"""diffusers folders <-> diffreg.

A diffusers pipeline folder (``model_index.json``, ``unet/config.json`` +
``diffusion_pytorch_model.safetensors``, ``scheduler/scheduler_config.json``) or a bare UNet folder
loads as ``(model, diffusion, config)``: the network is diffusers' own ``UNet2DModel``
(:class:`~diffreg.convert.diffusers_model.DiffusersUNet2D`), and the scheduler's configuration is
translated into a diffreg diffusion:

- betas: computed by diffusers' own scheduler class from the config (``linear``,
  ``scaled_linear``, ``squaredcos_cap_v2``, ``sigmoid``, ``trained_betas``,
  ``rescale_betas_zero_snr``), in float32 as diffusers does, and stored as an ``explicit``
  schedule whose alpha-bars are diffusers' float32 ``alphas_cumprod``. diffusers' ``linear`` is *not* guided-diffusion's: it does not scale the betas by
  ``1000 / T``, so it is never mapped to diffreg's ``linear``;
- ``prediction_type`` epsilon / sample / v_prediction -> parameterization ``eps`` / ``x0`` / ``v``;
- ``variance_type`` fixed_small(_log) -> ``fixed_small``, fixed_large(_log) -> ``fixed_large``,
  learned_range -> ``learned_range`` (``learned`` is refused: diffusers reads that output as a
  variance, diffreg's ``learned`` as a log-variance);
- ``clip_sample`` / ``thresholding`` -> the checkpoint's sampling defaults;
- ``set_alpha_to_one=False`` (DDIM, PNDM: the last step goes to alpha-bar[0], not to the data)
  -> the sampling default ``final_level="t_min"``, which every diffreg sampler honours;
- ``rescale_betas_zero_snr``: the alpha-bars are the scheduler class's own, so they are exactly
  what that class samples with: 0 at the last timestep for DDPM and DDIM, 2**-24 for the classes
  that replace it (Euler, Euler ancestral, DPM-Solver multistep, UniPC);
- ``timestep_spacing``, ``steps_offset``: recorded with the source config; diffreg's ``leading``
  spacing has no offset, so a config with one gets a warning naming the difference.

:func:`export_diffusers` writes the reverse: a folder that ``DDPMPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from diffreg.convert.diffusers_model import require_diffusers
from diffreg.errors import CheckpointError, ConfigError

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
PICKLE_WEIGHTS = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
#: Schedulers of the discrete variance-preserving process (the one diffreg models); their configs
#: share the fields translated here. Others (score-SDE VE, consistency, flow matching) are refused.
VP_SCHEDULERS = frozenset(
    (
        "DDPMScheduler DDIMScheduler DDIMInverseScheduler PNDMScheduler DPMSolverMultistepScheduler "
        "DPMSolverSinglestepScheduler EulerDiscreteScheduler EulerAncestralDiscreteScheduler "
        "HeunDiscreteScheduler LMSDiscreteScheduler UniPCMultistepScheduler DEISMultistepScheduler "
        "KDPM2DiscreteScheduler KDPM2AncestralDiscreteScheduler DDPMParallelScheduler DDIMParallelScheduler"
    ).split()
)
#: Largest config.json / scheduler_config.json read (real ones are a few kB; trained_betas of
#: T = 100,000 about 2 MB).
MAX_JSON_BYTES = 16 << 20
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCE_TYPES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}


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


def _check_scheduler_sizes(scheduler: Mapping[str, Any]) -> None:
    """``num_train_timesteps`` and ``trained_betas`` within diffreg's bound on T, before diffusers
    allocates tables of that length (``num_train_timesteps = 1e9`` would cost tens of GB)."""
    from diffreg.config import MAX_TIMESTEPS

    steps = scheduler.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= MAX_TIMESTEPS:
        raise ConfigError(f"scheduler num_train_timesteps must be an int in 2..{MAX_TIMESTEPS:,}, got {steps!r}")
    betas = scheduler.get("trained_betas")
    if betas is not None and (
        not isinstance(betas, list)
        or not 2 <= len(betas) <= MAX_TIMESTEPS
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
    ):
        raise ConfigError(
            f"scheduler trained_betas must be a list of 2..{MAX_TIMESTEPS:,} numbers, got "
            f"{type(betas).__name__} {str(betas)[:60]}"
        )


def translate_scheduler(scheduler: Mapping[str, Any], out_channels: int, in_channels: int):
    """A diffusers scheduler config -> ``(diffusion dict, sampling dict, notes)``.

    The scheduler's own class (from ``_class_name``) fills in its defaults and computes the betas,
    so they are exactly diffusers'. ``notes`` name what diffreg's samplers do differently.

    Raises:
        ImportError: diffusers missing. ConfigError: a scheduler or option diffreg cannot express
        (names it and says why).
    """
    diffusers = require_diffusers("a diffusers scheduler config")
    name = scheduler.get("_class_name", "DDPMScheduler")
    if name not in VP_SCHEDULERS or not hasattr(diffusers, name):
        raise ConfigError(
            f"scheduler {name!r} is not one of the discrete-time DDPM-family schedulers diffreg translates "
            f"({', '.join(sorted(VP_SCHEDULERS))})"
        )
    _check_scheduler_sizes(scheduler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = getattr(diffusers, name).from_config(dict(scheduler))
    except Exception as exc:  # diffusers checks little: NotImplementedError, RuntimeError, OverflowError, ...
        raise ConfigError(
            f"diffusers' {name} cannot be built from this scheduler config ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})"
        ) from None
    cfg = dict(built.config)
    notes: list[str] = []
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type {prediction!r} is not one of {', '.join(PREDICTION_TYPES)}")
    variance_type = cfg.get("variance_type") or "fixed_small"
    if variance_type == "learned":
        raise ConfigError(
            "variance_type 'learned' is not translated: diffusers' DDPMScheduler uses that output as the "
            "variance itself, diffreg's 'learned' as its log (Nichol & Dhariwal 2021); use learned_range models"
        )
    if variance_type not in VARIANCE_TYPES:
        raise ConfigError(f"variance_type {variance_type!r} is not one of {', '.join([*VARIANCE_TYPES, 'learned'])}")
    learned = variance_type == "learned_range"
    if out_channels != (2 if learned else 1) * in_channels:
        raise ConfigError(
            f"the UNet has {out_channels} output channels for {in_channels} input channels, which does not fit "
            f"variance_type {variance_type!r} ({'twice' if learned else 'as many as'} the input's)"
        )
    # betas whose float64 cumulative product is diffusers' float32 alphas_cumprod: the steps then
    # use diffusers' alpha-bars exactly (the betas differ from its float32 betas by rounding only)
    abar = built.alphas_cumprod.to(torch.float64)
    betas = (1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])).tolist()
    diffusion = {
        "schedule": {"name": "explicit", "betas": betas},
        "num_timesteps": len(betas),
        "parameterization": PREDICTION_TYPES[prediction],
        "variance": VARIANCE_TYPES[variance_type],
        "loss": "mse",
    }
    clip = bool(cfg.get("clip_sample", False))
    dynamic = None
    if cfg.get("thresholding"):
        if float(cfg.get("sample_max_value", 1.0)) <= 1.0:
            clip = True  # s is capped at sample_max_value <= 1: thresholding is clipping to [-1, 1]
        else:
            dynamic = float(cfg.get("dynamic_thresholding_ratio", 0.995))
            notes.append(
                f"thresholding: diffreg's dynamic threshold does not cap s at sample_max_value="
                f"{cfg['sample_max_value']} as diffusers does"
            )
            clip = False
    elif clip and float(cfg.get("clip_sample_range", 1.0)) != 1.0:
        notes.append(f"clip_sample_range={cfg['clip_sample_range']}: diffreg clips x_0 to [-1, 1]")
    if cfg.get("steps_offset"):
        notes.append(
            f"steps_offset={cfg['steps_offset']}: diffusers' leading spacing is shifted by it; sample with "
            f"the grid {{\"name\": \"leading\", \"offset\": {cfg['steps_offset']}}} to match"
        )
    sampling: dict[str, Any] = {"clip": clip, "dynamic_threshold": dynamic}
    if cfg.get("set_alpha_to_one") is False:  # DDIM/PNDM: the last step goes to alpha_bar[0]
        sampling["final_level"] = "t_min"
    return diffusion, sampling, notes


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


def _scheduler_for(cfg) -> dict[str, Any]:
    """A DDPMScheduler config equivalent to ``cfg``'s diffusion and sampling defaults."""
    d = cfg.diffusion
    if d.rescale_timesteps:
        raise ConfigError("rescale_timesteps=True has no diffusers equivalent (its UNet2DModel takes t as given)")
    if d.variance.name not in ("fixed_small", "fixed_large", "learned_range") or d.variance.options:
        raise ConfigError(f"variance {d.variance.name!r} has no diffusers DDPMScheduler equivalent")
    mean = {v: k for k, v in PREDICTION_TYPES.items()}
    if d.parameterization.name not in mean or d.parameterization.options:
        raise ConfigError(f"parameterization {d.parameterization.name!r} has no diffusers equivalent")
    from diffreg.diffusion import Diffusion

    betas = Diffusion.from_config(d).betas
    sampling = getattr(cfg, "sampling", None)
    clip = sampling.clip if sampling is not None else bool(cfg.data.get("sampling", {}).get("clip", True))
    dynamic = sampling.dynamic_threshold if sampling is not None else cfg.data.get("sampling", {}).get("dynamic_threshold")
    extra = {"set_alpha_to_one": False} if getattr(sampling, "final_level", "data") == "t_min" else {}
    return {
        **extra,
        "num_train_timesteps": len(betas),
        "trained_betas": [float(b) for b in betas],
        "variance_type": d.variance.name,
        "prediction_type": mean[d.parameterization.name],
        "clip_sample": bool(clip) and dynamic is None,
        "thresholding": dynamic is not None,
        "dynamic_thresholding_ratio": 0.995 if dynamic is None else float(dynamic),
        "sample_max_value": 1e9 if dynamic is not None else 1.0,
    }


def export_diffusers(checkpoint: str | os.PathLike[str], output: str | os.PathLike[str]) -> Path:
    """Write a diffreg checkpoint of a diffusers ``UNet2DModel`` as a diffusers ``DDPMPipeline``
    folder (``model_index.json``, ``unet/``, ``scheduler/``) that
    ``DDPMPipeline.from_pretrained(output)`` loads; betas are written as ``trained_betas``, and
    ``final_level="t_min"`` as ``set_alpha_to_one: false`` (used by a DDIM or PNDM scheduler built
    from this config, and by diffreg when the folder is loaded back; ``DDPMScheduler`` ignores it).

    The folder is written beside ``output`` and renamed into place, so a failure leaves nothing.

    Raises:
        FileExistsError: ``output`` exists and is not an empty folder. ConfigError: a model or a
        diffusion diffusers has no equivalent for (diffreg's ADM-style ``unet``, rescaled timesteps,
        a ``learned`` variance, ...). ImportError: diffusers missing.
    """
    from diffreg.checkpoint import load_checkpoint

    out = Path(output)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{str(out)!r} already exists; give a new folder for the diffusers pipeline")
    model, _, cfg = load_checkpoint(checkpoint)
    if cfg.model.name != "diffusers_unet2d":
        raise ConfigError(
            f"{str(checkpoint)!r} holds a {cfg.model.name!r} model, which diffusers has no class for "
            "(diffreg's 'unet' is guided-diffusion's ADM architecture: its blocks, attention and class "
            "embedding differ from diffusers' UNet2DModel); only models loaded from diffusers can be exported"
        )
    diffusers = require_diffusers("exporting to diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_alpha_to_one is kept in the config for DDIM/PNDM, unused by DDPM
        scheduler = diffusers.DDPMScheduler.from_config(_scheduler_for(cfg))
    pipeline = diffusers.DDPMPipeline(unet=model.unet, scheduler=scheduler)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
