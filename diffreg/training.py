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
from diffreg.config import (
    CheckpointConfig,
    ComponentSpec,
    DiffusionConfig,
    SamplingConfig,
    _coerce_diffusion,
    _DictMixin,
)
from diffreg.data import load_dataset
from diffreg.diffusion import Diffusion
from diffreg.errors import ConfigError
from diffreg.validation import check_guidance_scale


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
    only), ``bf16`` (run the model under bfloat16 autocast).

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
            if key in ("num_classes", "in_channels", "dim") and key in options and options[key] != value:
                raise ConfigError(
                    f"model option {key}={options[key]!r} does not match the data ({key}={value!r}); leave it out"
                )
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
        """Move the average towards ``model``'s parameters (buffers are copied)."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # type: ignore[arg-type]
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)


def _load_data(spec: ComponentSpec):
    """Load the configured data; a bad option is a ConfigError naming the dataset and option."""
    import inspect

    from diffreg import data as data_module

    loaders: dict[str, Any] = {
        "digits": data_module.load_digits,
        "folder": data_module.load_image_folder,
        "npz": data_module.load_npz,
    }
    loader = loaders.get(spec.name, data_module.toy_2d)
    accepted = [p for p in inspect.signature(loader).parameters if p != "name"]
    unknown = [k for k in spec.options if k not in accepted]
    if spec.name in data_module.DATASETS and unknown:
        raise ConfigError(f"data {spec.name!r} has no option {unknown[0]!r}; accepted: {', '.join(accepted)}")
    try:
        x, y, num_classes = load_dataset(spec.name, **spec.options)
    except TypeError as exc:
        raise ConfigError(f"data {spec.name!r}: bad options {spec.options}: {exc}") from exc
    if x.shape[0] < 1:
        raise ConfigError(f"data {spec.name!r} has no examples")
    return x, y, num_classes


STATE_SUFFIX = ".state.safetensors"


def state_path(output: str | os.PathLike[str]) -> Path:
    """Where the training state of a run writing ``output`` lives: ``<output stem>.state.safetensors``."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".safetensors") + STATE_SUFFIX)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of a torchrun launch, initialising the process group once."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def finish_distributed() -> None:
    """Under torchrun: wait for every rank (rank 0 may still be writing), then close the process
    group, so no rank exits while another still talks to it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class Trainer:
    """One training run: data, diffusion, model, EMA, AdamW, timestep sampler and RNG state.

    Every source of randomness (data order, label dropout, timesteps, noise) comes from one
    ``torch.Generator`` seeded with ``seed + rank``, so a run resumed from its training state
    continues exactly as the uninterrupted run would (bitwise on the same machine).

    Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DistributedDataParallel
    (gloo on CPU, NCCL on GPU); each rank draws its own batches and only rank 0 writes files.
    """

    def __init__(self, cfg: TrainConfig, *, device: str | torch.device = "cpu"):
        self.cfg = cfg
        from diffreg.validation import resolve_device

        self.device = resolve_device(device)
        self.rank, self.world_size = _distributed()
        torch.manual_seed(cfg.seed + self.rank)
        x_all, y_all, num_classes = _load_data(cfg.data)
        self.num_classes = num_classes
        self.conditional = cfg.class_conditional and num_classes is not None
        self.diffusion = Diffusion.from_config(cfg.diffusion)
        self.model_spec = build_model_spec(cfg, self.diffusion, x_all, num_classes)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = registry.create("model", self.model_spec.name, **self.model_spec.options).to(self.device)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.timestep_sampler = self.diffusion.create_timestep_sampler()
        self.generator = torch.Generator().manual_seed(cfg.seed + self.rank)
        self.x_all, self.y_all = x_all.to(self.device), y_all.to(self.device)
        self.step = 0
        self.running_loss: float | None = None
        self._data_fingerprint: str | None = None
        self.network: torch.nn.Module = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.network = DistributedDataParallel(self.model)

    # -- one step ---------------------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimisation step; returns the loss. Raises FloatingPointError naming the step."""
        cfg, g, device = self.cfg, self.generator, self.device
        idx = torch.randint(0, self.x_all.shape[0], (cfg.batch_size,), generator=g).to(device)
        x_start = self.x_all[idx]
        kwargs = {}
        if self.conditional:
            y = self.y_all[idx]
            drop = torch.rand(cfg.batch_size, generator=g).to(device) < cfg.label_dropout
            kwargs["y"] = torch.where(drop, torch.full_like(y, self.num_classes or 0), y)
        t, weights = self.timestep_sampler.sample(cfg.batch_size, device, generator=g)
        noise = torch.randn(x_start.shape, generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            losses = self.diffusion.training_losses(self.network, x_start, t, model_kwargs=kwargs, noise=noise)
        self.timestep_sampler.update_with_losses(t, losses["loss"])
        loss = (losses["loss"].float() * weights).mean()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training loss became {value} at step {self.step}; stopping (lower lr, check the data "
                "or resume from the last checkpoint)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        self.running_loss = value if self.running_loss is None else 0.98 * self.running_loss + 0.02 * value
        return value

    # -- files ---------------------------------------------------------------------------------

    def checkpoint_config(self) -> CheckpointConfig:
        """What the model checkpoint will carry: diffusion, full model options, data."""
        data_info: dict[str, Any] = {
            "dataset": self.cfg.data.name,
            "shape": list(self.x_all.shape[1:]),
            "num_classes": self.num_classes if self.conditional else None,
        }
        if self.cfg.guidance_scale is not None and self.conditional:
            data_info["guidance_scale"] = self.cfg.guidance_scale
        return CheckpointConfig(
            diffusion=self.cfg.diffusion,
            model=self.model_spec,
            data=data_info,
            sampling=SamplingConfig.for_data(self.x_all),  # clip images in [-1, 1] only
        )

    def data_fingerprint(self) -> str:
        """:func:`diffreg.train_state.data_fingerprint` of this run's data (computed once)."""
        if self._data_fingerprint is None:
            from diffreg.train_state import data_fingerprint

            self._data_fingerprint = data_fingerprint(self.x_all, self.y_all)
        return self._data_fingerprint

    def save(self, output: str | os.PathLike[str], checkpoint_dtype: torch.dtype | None = None) -> Path:
        """Write the EMA model checkpoint to ``output`` and the training state beside it
        (:func:`state_path`) as a pair: both replaced, or (on any error, such as a full disk)
        neither. Every rank's RNG state is gathered; only rank 0 writes.

        Raises:
            OSError: naming the file that could not be written and the cause.
        """
        from diffreg.fileio import atomic_paths, naming
        from diffreg.train_state import gathered_rank_states, write_state

        ranks = gathered_rank_states(self)  # a collective: every rank takes part
        if self.rank == 0:
            state = state_path(output)
            with atomic_paths(output, state) as (tmp_model, tmp_state):
                with naming(output):
                    save_checkpoint(tmp_model, self.ema.model, self.checkpoint_config(), dtype=checkpoint_dtype)
                write_state(self, tmp_state, ranks, shown=state)
        return Path(output)

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Everything :meth:`load_state` needs to continue exactly (weights, EMA, optimizer, step,
        every rank's RNG and timestep-sampler state, a fingerprint of the data), atomically, in one
        safetensors file (nothing pickled; layout in :mod:`diffreg.train_state`). Under torchrun
        every rank must call it; rank 0 writes."""
        from diffreg.fileio import atomic_path
        from diffreg.train_state import gathered_rank_states, write_state

        ranks = gathered_rank_states(self)
        if self.rank == 0:
            with atomic_path(path) as tmp:
                write_state(self, tmp, ranks, shown=Path(path))

    def load_state(self, path: str | os.PathLike[str]) -> None:
        """Restore :meth:`save_state` after checking it fits this run (configuration except
        ``steps`` and ``save_every``, data fingerprint, process count, counters, optimizer and RNG
        state): :func:`diffreg.train_state.load_state`.

        Raises:
            FileNotFoundError: no state file. CheckpointError: not a training-state file, damaged,
            or saved by a different run (naming everything that differs).
        """
        from diffreg.train_state import load_state

        load_state(self, path)


def check_outputs(
    cfg: TrainConfig,
    output: str | os.PathLike[str],
    *,
    resume: bool = False,
    inputs: dict[str, str | os.PathLike[str] | None] | None = None,
) -> None:
    """What :func:`train` checks before any work: the checkpoint and its training state can be
    written (:func:`diffreg.fileio.check_writable`: an existing folder, not read-only, a name the
    file system takes, not a directory), neither is an input (``data.path``, or ``inputs`` such as
    the configuration file), and with ``resume`` the state exists and is behind ``cfg.steps``.

    Raises:
        ValueError: an output that is an input. OSError / FileNotFoundError: an output that cannot
        be written, or no state to resume. ConfigError: ``cfg.steps`` not beyond the saved step.
    """
    from diffreg.fileio import check_writable, refuse_inputs_as_outputs
    from diffreg.train_state import saved_step

    state = state_path(output)
    named_inputs = dict(inputs or {})
    if cfg.data.options.get("path") is not None:
        named_inputs["data.path"] = str(cfg.data.options["path"])
    refuse_inputs_as_outputs({"the output": output, "its training state": state}, named_inputs)
    check_writable(output)
    check_writable(state)
    if resume:
        if not state.exists():
            raise FileNotFoundError(f"--resume: the training state {str(state)!r} does not exist")
        step = saved_step(state)
        if step is not None and cfg.steps <= step:
            raise ConfigError(
                f"--resume: the training state {str(state)!r} is at step {step} and steps is {cfg.steps}: "
                f"nothing to train (give steps > {step})"
            )


def train(
    cfg: TrainConfig,
    output: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    checkpoint_dtype: torch.dtype | None = None,
    resume: bool = False,
) -> Path:
    """Train a model as ``cfg`` says and write its EMA weights to ``output`` (a checkpoint), with
    the training state beside it (``<output stem>.state.safetensors``) for ``resume``.

    Args:
        resume: continue from the training state beside ``output`` (exactly as if the run had not
            stopped); it is an error if there is none.

    Before any work the outputs are checked (:func:`check_outputs`: writable, not an input, and
    with ``resume`` a state behind ``cfg.steps``).

    Returns the checkpoint path. Raises :class:`FloatingPointError` naming the step if the loss
    becomes non-finite (the run stops; the last periodic checkpoint is kept); ``OSError`` naming
    the file if a save fails (the checkpoint and its state stay the previous pair).
    """
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes
        check_outputs(cfg, output, resume=resume)
    trainer = Trainer(cfg, device=device)
    if resume:
        trainer.load_state(state_path(output))
    bar = tqdm(
        total=cfg.steps,
        initial=trainer.step,
        desc="train",
        disable=not progress or trainer.rank != 0,
        dynamic_ncols=True,
    )
    trainer.model.train()
    while trainer.step < cfg.steps:
        trainer.train_step()
        bar.update(1)
        if trainer.step % 20 == 0:
            bar.set_postfix(loss=f"{trainer.running_loss:.4f}")
        if log is not None and (trainer.step % 500 == 0 or trainer.step == cfg.steps):
            log(f"step {trainer.step} loss {trainer.running_loss:.4f}")
        if cfg.save_every and trainer.step % cfg.save_every == 0 and trainer.step < cfg.steps:
            trainer.save(output, checkpoint_dtype)
    bar.close()
    path = trainer.save(output, checkpoint_dtype)
    finish_distributed()
    return path
