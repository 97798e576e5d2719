"""OpenAI checkpoints (improved-diffusion, guided-diffusion) -> self-describing diffreg checkpoints.

OpenAI's checkpoints are bare UNet state dicts; the architecture and the diffusion live in the
command-line flags printed in each model's README (``--image_size 256 --num_channels 256 ...``).
:func:`config_from_flags` maps those flags exactly as the two libraries' ``script_util.py`` do
(``create_model`` and ``create_gaussian_diffusion``), and :func:`convert_openai` writes the
weights, unchanged and under the same names, with that configuration.

The two libraries share most flags but not their defaults: improved-diffusion calls the model with
rescaled timesteps (``rescale_timesteps=True``) and has a 32-pixel channel layout; guided-diffusion
does neither. Where the flags alone cannot tell which library a model comes from and the
difference matters, the caller must say (``source``).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffreg.errors import ConfigError, closest

SOURCES = ("guided-diffusion", "improved-diffusion")

#: ``script_util.model_and_diffusion_defaults()`` of each library (NUM_CLASSES = 1000 and three
#: input channels are fixed there too).
_COMMON = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    attention_resolutions="16,8",
    dropout=0.0,
    learn_sigma=False,
    sigma_small=False,
    class_cond=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    use_checkpoint=False,
    use_scale_shift_norm=True,
    use_fp16=False,
)
DEFAULTS: dict[str, dict[str, Any]] = {
    "guided-diffusion": {
        **_COMMON,
        "num_head_channels": -1,
        "channel_mult": "",
        "resblock_updown": False,
        "use_new_attention_order": False,
        "rescale_timesteps": False,
        "rescale_learned_sigmas": False,
    },
    "improved-diffusion": {**_COMMON, "rescale_timesteps": True, "rescale_learned_sigmas": True},
}
#: Flags only guided-diffusion has: their presence says where the model comes from.
_GUIDED_ONLY = ("num_head_channels", "channel_mult", "resblock_updown", "use_new_attention_order")
#: Sampling, training and classifier flags that READMEs print beside the model's: no effect on
#: the weights or the diffusion, accepted and ignored.
IGNORED = frozenset(
    (
        "batch_size num_samples use_ddim clip_denoised model_path classifier_path classifier_scale "
        "data_dir schedule_sampler lr weight_decay lr_anneal_steps microbatch ema_rate log_interval "
        "save_interval resume_checkpoint fp16_scale_growth use_checkpoint classifier_use_fp16 "
        "classifier_width classifier_depth classifier_attention_resolutions classifier_use_scale_shift_norm "
        "classifier_resblock_updown classifier_pool iterations anneal_lr noised"
    ).split()
)
NUM_CLASSES = 1000
_CHANNEL_MULT = {
    "guided-diffusion": {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)},
    "improved-diffusion": {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)},
}


def _str2bool(name: str, value: str) -> bool:
    # script_util.str2bool
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise ConfigError(f"flag --{name}: boolean value expected (True/False), got {value!r}")


def parse_flags(flags: str | Mapping[str, Any]) -> dict[str, str]:
    """``"--image_size 64 --learn_sigma True"`` -> ``{"image_size": "64", "learn_sigma": "True"}``.

    Accepts ``--name value`` and ``--name=value``; a mapping is returned as strings. Raises
    :class:`~diffreg.errors.ConfigError` for a word that is not a flag or a flag without value.
    """
    if isinstance(flags, Mapping):
        return {str(k).lstrip("-"): str(v) for k, v in flags.items()}
    words = shlex.split(flags)
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) < 3:
            raise ConfigError(f"flags: expected --name value, got {word!r} in {flags!r}")
        if "=" in word:
            name, value = word[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(words) or words[i + 1].startswith("--"):
                raise ConfigError(f"flags: --{word[2:]} has no value")
            name, value = word[2:], words[i + 1]
            i += 2
        out[name] = value
    return out


def infer_source(flags: Mapping[str, str]) -> str | None:
    """Which library the flags are for, where the flags decide: guided-diffusion if a flag only it
    has is given; improved-diffusion at ``--image_size 32`` (guided-diffusion has no layout for
    it); guided-diffusion's reading if ``--rescale_timesteps`` is given (the libraries then build
    the same model and sampling process); else ``None``: the caller must say."""
    if any(name in flags for name in _GUIDED_ONLY):
        return "guided-diffusion"
    if flags.get("image_size") == "32":
        return "improved-diffusion"
    if "rescale_timesteps" in flags:
        return "guided-diffusion"
    return None


def resolve_flags(flags: str | Mapping[str, Any], source: str | None = None) -> tuple[dict[str, Any], str, list[str]]:
    """The full, typed flag set of ``source``'s ``model_and_diffusion_defaults`` updated by
    ``flags``; returns ``(values, source, notes)``.

    Raises:
        ConfigError: an unknown flag (with the closest known one), a bad value, an unknown
            ``source``, or flags that improved- and guided-diffusion would read differently with
            no ``source`` to decide.
    """
    given = parse_flags(flags)
    if source is not None and source not in SOURCES:
        hint = closest(source, list(SOURCES))
        raise ConfigError(
            f"unknown source {source!r}; accepted: {', '.join(SOURCES)}" + (f"; did you mean {hint!r}?" if hint else "")
        )
    if source is None:
        source = infer_source(given)
        if source is None:
            raise ConfigError(
                "these flags do not say whether the model comes from guided-diffusion or improved-diffusion, "
                "whose defaults differ (improved-diffusion calls the model with timesteps rescaled to "
                "[0, 1000): rescale_timesteps=True; at --image_size 32 it also has its own channel_mult); "
                "pass --source guided-diffusion or --source improved-diffusion"
            )
    defaults = DEFAULTS[source]
    values = dict(defaults)
    notes: list[str] = []
    for name, text in given.items():
        if name in IGNORED:
            notes.append(f"--{name} ignored (a sampling or training flag)")
            continue
        if name not in defaults:
            hint = closest(name, list(defaults))
            raise ConfigError(
                f"unknown {source} flag --{name}" + (f"; did you mean --{hint}?" if hint else "")
                + f"; known: {', '.join(sorted(defaults))}"
            )
        default = defaults[name]
        try:
            if isinstance(default, bool):
                values[name] = _str2bool(name, text)
            elif isinstance(default, int):
                values[name] = int(text)
            elif isinstance(default, float):
                values[name] = float(text)
            else:
                values[name] = text
        except ValueError:
            raise ConfigError(f"flag --{name}: expected {type(default).__name__}, got {text!r}") from None
    if values["timestep_respacing"]:
        notes.append(
            f"--timestep_respacing {values['timestep_respacing']} ignored: the checkpoint holds the full "
            f"{values['diffusion_steps']}-step process; choose the steps when sampling (--steps, or "
            "diffusion.respace(...) with the same string)"
        )
    if values["use_fp16"]:
        notes.append("--use_fp16 ignored: weights are stored as given; sample with --dtype float16 to run in half precision")
    return values, source, notes


def config_from_flags(flags: str | Mapping[str, Any], source: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """A diffreg checkpoint configuration (a dict for :class:`~diffreg.CheckpointConfig`) from
    OpenAI flags, as ``script_util.create_model`` / ``create_gaussian_diffusion`` build the model
    and diffusion. Returns ``(config, notes)``; raises ConfigError as :func:`resolve_flags`."""
    v, source, notes = resolve_flags(flags, source)
    size = v["image_size"]
    mult_flag = v.get("channel_mult", "")
    if mult_flag:
        try:
            channel_mult = [int(m) for m in mult_flag.split(",")]
        except ValueError:
            raise ConfigError(f"flag --channel_mult: expected integers such as 1,2,2, got {mult_flag!r}") from None
    elif size in _CHANNEL_MULT[source]:
        channel_mult = list(_CHANNEL_MULT[source][size])
    else:
        raise ConfigError(
            f"{source} has no default channel_mult for --image_size {size} (known sizes: "
            f"{', '.join(map(str, sorted(_CHANNEL_MULT[source])))}); add --channel_mult, e.g. '--channel_mult 1,2,2'"
        )
    try:
        attention = [int(r) for r in v["attention_resolutions"].split(",")]
    except ValueError:
        raise ConfigError(
            f"flag --attention_resolutions: expected pixel sizes such as 32,16,8, got {v['attention_resolutions']!r}"
        ) from None
    if v["noise_schedule"] not in ("linear", "cosine"):
        raise ConfigError(f"flag --noise_schedule: {v['noise_schedule']!r} is not one of linear, cosine")
    head_channels = v.get("num_head_channels", -1)
    heads_up = v["num_heads_upsample"]
    model = {
        "name": "unet",
        "in_channels": 3,
        "model_channels": v["num_channels"],
        "out_channels": 6 if v["learn_sigma"] else 3,
        "image_size": size,
        "num_res_blocks": v["num_res_blocks"],
        "channel_mult": channel_mult,
        # the flag holds pixel sizes, as our option; script_util turns them into image_size // res
        "attention_resolutions": attention,
        "num_heads": v["num_heads"],
        "num_head_channels": None if head_channels == -1 else head_channels,
        "num_heads_upsample": None if heads_up == -1 else heads_up,
        "num_classes": NUM_CLASSES if v["class_cond"] else None,
        "null_class_embedding": False,
        "dropout": v["dropout"],
        "use_scale_shift_norm": v["use_scale_shift_norm"],
        "resblock_updown": v.get("resblock_updown", False),
        "use_new_attention_order": v.get("use_new_attention_order", False),
    }
    if v["use_kl"]:
        loss = "rescaled_kl"
    elif v["rescale_learned_sigmas"]:
        loss = "rescaled_mse"
    else:
        loss = "mse"
    diffusion = {
        "schedule": v["noise_schedule"],  # get_named_beta_schedule: the same betas as ours
        "num_timesteps": v["diffusion_steps"],
        "parameterization": "x0" if v["predict_xstart"] else "eps",
        "variance": "learned_range" if v["learn_sigma"] else ("fixed_small" if v["sigma_small"] else "fixed_large"),
        "loss": loss,
        "rescale_timesteps": v["rescale_timesteps"],
    }
    data = {
        "shape": [3, size, size],
        "num_classes": NUM_CLASSES if v["class_cond"] else None,
        "dataset": f"converted from {source}",
    }
    return {"diffusion": diffusion, "model": model, "data": data}, notes


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A UNet state dict from a ``.pt`` / ``.pth`` file (read with ``torch.load(...,
    weights_only=True)``: never unpickles code) or a ``.safetensors`` file.

    Raises:
        FileNotFoundError: no such file. CheckpointError: unreadable, or not a flat dict of
        tensors (a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped; a
        ``module.`` prefix from DistributedDataParallel is dropped).
    """
    from diffreg.errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{str(path)!r} could not be read as a PyTorch state dict (torch.load with weights_only=True) "
            f"or safetensors file: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        ) from exc
    for wrapper in ("state_dict", "model", "ema"):
        if isinstance(state, Mapping) and set(state) == {wrapper}:
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a flat dict of tensors (a model's state_dict)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def convert_openai(
    weights: str | os.PathLike[str],
    flags: str | Mapping[str, Any],
    output: str | os.PathLike[str],
    *,
    source: str | None = None,
) -> tuple[Path, list[str]]:
    """Convert an improved-/guided-diffusion UNet state dict and its README flags into one diffreg
    checkpoint (:func:`diffreg.save_checkpoint`), tensors unchanged and under the same names.

    Args:
        weights: ``.pt`` / ``.pth`` (read with ``weights_only=True``) or ``.safetensors``.
        flags: the flags string (``MODEL_FLAGS`` and ``DIFFUSION_FLAGS`` of the model's README).
        output: the ``.safetensors`` file to write.
        source: ``"guided-diffusion"`` or ``"improved-diffusion"`` (inferred when the flags
            decide; required when the libraries would read them differently).

    Returns:
        ``(path written, notes)``: notes name the flags that were ignored.

    Raises:
        ConfigError: bad flags. CheckpointError: unreadable weights, or weights that do not fit the
        flags (names the tensors, and the flags that change them).
    """
    from diffreg import registry
    from diffreg.checkpoint import save_checkpoint
    from diffreg.errors import CheckpointError

    config, notes = config_from_flags(flags, source)
    state = read_state_dict(weights)
    options = {k: v for k, v in config["model"].items() if k != "name"}
    with torch.device("meta"):
        skeleton = registry.create("model", "unet", **options)
    problem = key_report(skeleton.state_dict(), state)
    if problem:
        raise CheckpointError(f"{str(weights)!r} does not fit the flags: {problem}")
    with torch.random.fork_rng(devices=[]):
        model = registry.create("model", "unet", **options)
    model.load_state_dict(state, strict=True)
    return save_checkpoint(output, model, config), notes


#: What each family of tensors says about the flags, for mismatch reports.
_HINTS = (
    ("label_emb.", "--class_cond"),
    ("out.2.", "--learn_sigma (6 output channels) or not (3)"),
    (".qkv.", "--attention_resolutions, --num_heads / --num_head_channels"),
    ("in_layers.", "--num_channels, --channel_mult, --num_res_blocks, --resblock_updown"),
    (".op.", "--resblock_updown False (a strided conv downsamples)"),
    ("emb_layers.", "--use_scale_shift_norm (doubles emb_layers)"),
)


def key_report(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    """``None`` if ``given`` has exactly ``expected``'s names and shapes, else one line naming
    missing / unexpected / misshaped tensors and the flags that change them."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    if not (missing or unexpected or misshaped):
        return None
    parts = []
    if missing:
        parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        parts.append(
            f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}"
        )
    for k in misshaped[:6]:
        parts.append(f"shape of {k}: file {tuple(given[k].shape)}, flags give {tuple(expected[k].shape)}")
    bad = missing + unexpected + misshaped
    hints = sorted({hint for key in bad for pattern, hint in _HINTS if pattern in key})
    if any(k.startswith(("conv_in.", "down_blocks.", "time_embedding.")) for k in given):
        hints.insert(0, "these look like diffusers UNet2DModel weights: load the diffusers folder directly")
    if hints:
        parts.append("flags that change these: " + "; ".join(hints))
    return "; ".join(parts)
