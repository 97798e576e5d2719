"""Training: a configuration (TOML) and a plain loop with AdamW, EMA and checkpoints.

``diffreg train --config configs/digits.toml`` is a thin wrapper around :func:`train`.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
from tqdm.auto import tqdm

from diffreg import registry
from diffreg.checkpoint import save_checkpoint
from diffreg.config import CheckpointConfig, ComponentSpec, DiffusionConfig, _coerce_diffusion, _DictMixin
from diffreg.data import load_dataset
from diffreg.diffusion import Diffusion
from diffreg.errors import ConfigError


def _positive(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{attribute.name} must be > 0, got {value!r}")


def _unit(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{attribute.name} must be in [0, 1), got {value!r}")


@attrs.frozen
class TrainConfig(_DictMixin):
    """A training run. Read from TOML with :meth:`from_toml`; every field has a default.

    Fields: ``diffusion`` (a :class:`~diffreg.DiffusionConfig` table), ``model`` (a component:
    name and options; ``in_channels``, ``out_channels``, ``image_size`` and ``num_classes`` are
    filled from the data and the variance type when absent), ``data`` (``{"name": "digits",
    ...options}``), ``class_conditional``, ``label_dropout`` (probability of the null label, for
    classifier-free guidance), ``steps``, ``batch_size``, ``lr``, ``weight_decay``, ``ema_decay``
    (with warm-up: the decay used at step k is min(ema_decay, (1 + k) / (10 + k))),
    ``grad_clip`` (max gradient norm, 0 = off), ``seed``, ``guidance_scale`` (the classifier-free
    guidance scale recommended for sampling, stored in the checkpoint as the CLI's default).
    """

    _nested: ClassVar[dict[str, type]] = {"diffusion": DiffusionConfig}

    diffusion: DiffusionConfig = attrs.field(factory=DiffusionConfig, converter=_coerce_diffusion)
    model: ComponentSpec = attrs.field(
        default=ComponentSpec("unet"), converter=lambda v: ComponentSpec.coerce(v, "model")
    )
    data: ComponentSpec = attrs.field(
        default=ComponentSpec("digits"), converter=lambda v: ComponentSpec.coerce(v, "data")
    )
    class_conditional: bool = True
    label_dropout: float = attrs.field(default=0.1, validator=_unit)
    steps: int = attrs.field(default=4000, validator=_positive)
    batch_size: int = attrs.field(default=128, validator=_positive)
    lr: float = attrs.field(default=5e-4, validator=_positive)
    weight_decay: float = 0.0
    ema_decay: float = attrs.field(default=0.999, validator=_unit)
    grad_clip: float = 1.0
    seed: int = 0
    guidance_scale: float | None = None
    format_version: int = 1


def build_model_spec(
    cfg: TrainConfig, diffusion: Diffusion, data: torch.Tensor, num_classes: int | None
) -> ComponentSpec:
    """The model's full options: the configured ones, plus what the data and the variance imply."""
    options = dict(cfg.model.options)
    channels = data.shape[1]
    component = registry.get("model", cfg.model.name)
    accepted = registry.accepted_options(component)
    implied: dict[str, Any] = {}
    if data.ndim == 4:
        implied.update(
            in_channels=channels,
            out_channels=diffusion.parameterization.output_channels(channels),
            image_size=data.shape[-1],
        )
    else:
        implied.update(dim=channels, out_dim=diffusion.parameterization.output_channels(channels))
    if cfg.class_conditional and num_classes is not None:
        implied["num_classes"] = num_classes
    for key, value in implied.items():
        if key in accepted:
            options.setdefault(key, value)
    return ComponentSpec(cfg.model.name, options)


class EMA:
    """Exponential moving average of a model's parameters, with warm-up (the decay at update k is
    min(decay, (1 + k) / (10 + k)), so early averages are not dominated by the initialization)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # type: ignore[arg-type]
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)


def train(
    cfg: TrainConfig,
    output: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    checkpoint_dtype: torch.dtype | None = None,
) -> Path:
    """Train a model as ``cfg`` says and write its EMA weights to ``output`` (a checkpoint).

    Returns the checkpoint path. Raises :class:`FloatingPointError` naming the step if the loss
    becomes non-finite (the run stops; nothing is written).
    """
    torch.manual_seed(cfg.seed)
    x_all, y_all, num_classes = load_dataset(cfg.data.name, **cfg.data.options)
    diffusion = Diffusion.from_config(cfg.diffusion)
    spec = build_model_spec(cfg, diffusion, x_all, num_classes)
    model = registry.create("model", spec.name, **spec.options).to(device)
    ema = EMA(model, cfg.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    timestep_sampler = diffusion.create_timestep_sampler()
    generator = torch.Generator().manual_seed(cfg.seed)
    conditional = cfg.class_conditional and num_classes is not None
    x_all, y_all = x_all.to(device), y_all.to(device)
    bar = tqdm(range(cfg.steps), desc="train", disable=not progress, dynamic_ncols=True)
    running = None
    model.train()
    for step in bar:
        idx = torch.randint(0, x_all.shape[0], (cfg.batch_size,), generator=generator).to(device)
        x_start = x_all[idx]
        kwargs = {}
        if conditional:
            y = y_all[idx]
            drop = torch.rand(cfg.batch_size, generator=generator).to(device) < cfg.label_dropout
            kwargs["y"] = torch.where(drop, torch.full_like(y, num_classes or 0), y)
        t, weights = timestep_sampler.sample(cfg.batch_size, device, generator=generator)
        noise = torch.randn(x_start.shape, generator=generator).to(device)
        losses = diffusion.training_losses(model, x_start, t, model_kwargs=kwargs, noise=noise)
        timestep_sampler.update_with_losses(t, losses["loss"])
        loss = (losses["loss"] * weights).mean()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step}; stopping (lower lr or check data)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        ema.update(model)
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 20 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
        if log is not None and (step % 500 == 0 or step == cfg.steps - 1):
            log(f"step {step} loss {running:.4f}")
    data_info: dict[str, Any] = {
        "dataset": cfg.data.name,
        "shape": list(x_all.shape[1:]),
        "num_classes": num_classes if conditional else None,
    }
    if cfg.guidance_scale is not None and conditional:
        data_info["guidance_scale"] = cfg.guidance_scale
    ckpt_cfg = CheckpointConfig(diffusion=cfg.diffusion, model=spec, data=data_info)
    return save_checkpoint(output, ema.model, ckpt_cfg, dtype=checkpoint_dtype)
