"""A diffreg checkpoint of a diffusers UNet2DModel -> a diffusers ``DDPMPipeline`` folder
(:func:`export_diffusers`): the reverse of :func:`diffreg.convert.diffusers.load_diffusers`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from diffreg.convert.diffusers_model import require_diffusers
from diffreg.convert.diffusers_scheduler import PREDICTION_TYPES
from diffreg.errors import ConfigError


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
