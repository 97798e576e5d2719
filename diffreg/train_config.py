"""The training configuration (TOML): :class:`TrainConfig`, read by ``diffreg train --config``."""

from __future__ import annotations

import math
from typing import ClassVar

import attrs

from diffreg.config import ComponentSpec, DiffusionConfig, _coerce_diffusion, _DictMixin
from diffreg.errors import ConfigError
from diffreg.validation import check_guidance_scale

LR_SCHEDULES = ("constant", "cosine")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(instance, attribute, value):
    if not _number(value) or not value > 0:
        raise ConfigError(f"{attribute.name} must be a finite number > 0, got {value!r}")


def _non_negative(instance, attribute, value):
    if not _number(value) or value < 0:
        raise ConfigError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


def _positive_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{attribute.name} must be an integer >= 1, got {value!r}")


def _non_negative_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{attribute.name} must be an integer >= 0, got {value!r}")


def _int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{attribute.name} must be an integer, got {value!r}")


def _bool(instance, attribute, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be true or false, got {value!r}")


def _unit(instance, attribute, value):
    if not _number(value) or not 0 <= value < 1:
        raise ConfigError(f"{attribute.name} must be in [0, 1), got {value!r}")


def _lr_schedule(instance, attribute, value):
    if value not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {value!r}")


def _sigma_rels(value):
    from diffreg.ema import sigma_rel_to_gamma

    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"posthoc_ema_sigma_rels must be a non-empty list of numbers, got {value!r}")
    for v in value:
        try:
            sigma_rel_to_gamma(v)
        except ValueError as exc:
            raise ConfigError(f"posthoc_ema_sigma_rels: {exc}") from None
    return tuple(float(v) for v in value)


def _optional_guidance_scale(instance, attribute, value):
    if value is not None:
        try:
            check_guidance_scale(value, attribute.name)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{exc} (or absent)") from None


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
    guidance scale recommended for sampling, stored in the checkpoint as the CLI's default),
    ``save_every`` (write the checkpoint and the training state every N steps; 0 = at the end
    only), ``bf16`` (run the model under bfloat16 autocast), ``fp16`` (float16 autocast with
    dynamic loss scaling, ``torch.amp.GradScaler``: a step whose gradients overflow is skipped and
    counted; ``max_skipped_steps`` consecutive skips stop the run).

    Batches: ``batch_size`` is the global batch of one optimizer step, split over the processes
    (under torchrun) and ``grad_accum`` micro-batches each (guided-diffusion's ``microbatch``;
    EDM2's ``batch_gpu``): it must be divisible by ``world_size * grad_accum``. ``data_workers``
    ``DataLoader`` processes read streamed data (image folders, npz); it does not change results.

    Learning rate: ``lr_warmup`` steps of linear warm-up (update k, 0-based, uses
    ``lr (k + 1) / lr_warmup``), then ``lr_schedule`` ``constant`` or ``cosine`` (from ``lr`` down
    to ``lr_min`` at step ``lr_decay_steps``, default ``steps``; constant ``lr_min`` after).

    Post-hoc EMA (EDM2): with ``posthoc_ema_every`` > 0, power-function averages of relative
    lengths ``posthoc_ema_sigma_rels`` are kept and written every that many steps beside the
    checkpoint (:mod:`diffreg.ema`); ``diffreg ema`` reconstructs any length from them.

    Data: ``digits`` (``image_size``), ``moons`` / ``swiss_roll`` / ``gaussian_mixture`` (2-D, for
    the ``mlp`` model), ``folder`` (``path``: a folder of images, one sub-folder per class or
    flat; ``image_size``, ``channels``), ``npz`` (``path``: ``arr_0`` images NHWC uint8 or floats
    in [-1, 1], optional ``arr_1`` labels).
    """

    _nested: ClassVar[dict[str, type]] = {"diffusion": DiffusionConfig}

    diffusion: DiffusionConfig = attrs.field(factory=DiffusionConfig, converter=_coerce_diffusion)
    model: ComponentSpec = attrs.field(
        default=ComponentSpec("unet"), converter=lambda v: ComponentSpec.coerce(v, "model")
    )
    data: ComponentSpec = attrs.field(
        default=ComponentSpec("digits"), converter=lambda v: ComponentSpec.coerce(v, "data")
    )
    class_conditional: bool = attrs.field(default=True, validator=_bool)
    label_dropout: float = attrs.field(default=0.1, validator=_unit)
    steps: int = attrs.field(default=4000, validator=_positive_int)
    batch_size: int = attrs.field(default=128, validator=_positive_int)
    lr: float = attrs.field(default=5e-4, validator=_positive)
    weight_decay: float = attrs.field(default=0.0, validator=_non_negative)
    ema_decay: float = attrs.field(default=0.999, validator=_unit)
    grad_clip: float = attrs.field(default=1.0, validator=_non_negative)
    seed: int = attrs.field(default=0, validator=_int)
    guidance_scale: float | None = attrs.field(default=None, validator=_optional_guidance_scale)
    save_every: int = attrs.field(default=0, validator=_non_negative_int)
    bf16: bool = attrs.field(default=False, validator=_bool)
    fp16: bool = attrs.field(default=False, validator=_bool)
    max_skipped_steps: int = attrs.field(default=20, validator=_positive_int)
    grad_accum: int = attrs.field(default=1, validator=_positive_int)
    lr_schedule: str = attrs.field(default="constant", validator=_lr_schedule)
    lr_warmup: int = attrs.field(default=0, validator=_non_negative_int)
    lr_min: float = attrs.field(default=0.0, validator=_non_negative)
    lr_decay_steps: int = attrs.field(default=0, validator=_non_negative_int)
    posthoc_ema_every: int = attrs.field(default=0, validator=_non_negative_int)
    posthoc_ema_sigma_rels: tuple[float, ...] = attrs.field(default=(0.05, 0.10), converter=_sigma_rels)
    data_workers: int = attrs.field(default=2, validator=_non_negative_int)
    format_version: int = 1

    def __attrs_post_init__(self):
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are both true; choose one (fp16 adds dynamic loss scaling)")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum} "
                "(batch_size is the global batch of one optimizer step)"
            )
        if self.lr_min > self.lr:
            raise ConfigError(f"lr_min {self.lr_min!r} is above lr {self.lr!r}")

    def lr_at(self, k: int) -> float:
        """The learning rate of update ``k`` (0-based): linear warm-up, then the schedule.

        cosine: lr_min + (lr - lr_min) (1 + cos(pi u)) / 2, u = (k - lr_warmup) / (D - lr_warmup)
        clamped to [0, 1], D = ``lr_decay_steps`` or ``steps`` (Loshchilov & Hutter 2017, SGDR
        eq. 5 without restarts)."""
        if k < self.lr_warmup:
            return self.lr * (k + 1) / self.lr_warmup
        if self.lr_schedule == "constant":
            return self.lr
        horizon = self.lr_decay_steps or self.steps
        u = min(1.0, max(0.0, (k - self.lr_warmup) / max(1, horizon - self.lr_warmup)))
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * u))


