"""A diffusers scheduler config -> a diffreg diffusion and sampling defaults (:func:`translate_scheduler`).

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
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from diffreg.convert.diffusers_model import require_diffusers
from diffreg.errors import ConfigError

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
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCE_TYPES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}



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
