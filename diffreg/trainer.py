"""The :class:`Trainer`: one training run's state (data, diffusion, model, EMA, optimizer, RNG)
and its optimizer step, checkpoint and training-state files; :func:`diffreg.training.train` drives it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diffreg import registry
from diffreg.checkpoint import save_checkpoint
from diffreg.config import CheckpointConfig, ComponentSpec, SamplingConfig
from diffreg.data_loading import IndexStream, RankBatches, load_training_data, seed_for
from diffreg.diffusion import Diffusion
from diffreg.ema import EMA, PowerEMA, snapshot_dir, write_snapshot
from diffreg.errors import ConfigError
from diffreg.train_config import TrainConfig
from diffreg.train_distributed import init_distributed, rank_device, update_sampler
from diffreg.train_outputs import keeps_files_beside, state_path

__all__ = ["Trainer", "build_model_spec"]


def build_model_spec(cfg: TrainConfig, diffusion: Diffusion, data: Any, num_classes: int | None) -> ComponentSpec:
    """The model's full options: the configured ones, plus what the data and the variance imply.
    ``data``: the examples' shape ``[C, H, W]`` / ``[D]`` (a tuple) or a tensor ``[N, ...]``."""
    shape = tuple(data.shape[1:]) if hasattr(data, "shape") else tuple(data)
    options = dict(cfg.model.options)
    channels = shape[0]
    component = registry.get("model", cfg.model.name)
    accepted = registry.accepted_options(component)
    implied: dict[str, Any] = {}
    if len(shape) == 3:
        implied.update(
            in_channels=channels,
            out_channels=diffusion.parameterization.output_channels(channels),
            image_size=shape[-1],
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


class Trainer:
    """One training run: data, diffusion, model, EMA (and post-hoc EMA), AdamW, learning-rate
    schedule, loss scaler, timestep sampler and RNG state.

    Randomness is a function of the run, not of the process count: the data order is
    :class:`~diffreg.data_loading.IndexStream` (seeded ``(seed, epoch)``); label dropout, flips,
    timesteps and noise of micro-batch chunk ``c`` of step ``s`` come from generators seeded
    ``(seed, s, c)`` (chunk ``a * world + rank`` for accumulation round ``a``). So a resumed run
    continues exactly (bitwise on the same machine), and 2 processes equal 1 process with
    ``grad_accum = 2`` at the same global batch (up to the order of floating-point sums). Model
    dropout draws from torch's global RNG (saved per rank).

    Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DistributedDataParallel
    (gloo on CPU, NCCL on GPU) and only rank 0 writes files.
    """

    def __init__(self, cfg: TrainConfig, *, device: str | torch.device = "cpu"):
        from diffreg.validation import resolve_device

        self.cfg = cfg
        self.device = rank_device(resolve_device(device))  # under torchrun: cuda -> cuda:LOCAL_RANK
        self.rank, self.world_size = init_distributed(self.device)
        if cfg.batch_size % (self.world_size * cfg.grad_accum):
            raise ConfigError(
                f"batch_size {cfg.batch_size} (the global batch) is not divisible by {self.world_size} process(es) "
                f"x grad_accum {cfg.grad_accum}"
            )
        self.micro = cfg.batch_size // (self.world_size * cfg.grad_accum)
        torch.manual_seed(cfg.seed + self.rank)
        self.data = load_training_data(cfg.data, workers=cfg.data_workers)
        self.hflip = bool(cfg.data.options.get("hflip", False))
        self.num_classes = self.data.num_classes
        self.conditional = cfg.class_conditional and self.num_classes is not None
        self.diffusion = Diffusion.from_config(cfg.diffusion)
        self.model_spec = build_model_spec(cfg, self.diffusion, self.data.example_shape, self.num_classes)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = registry.create("model", self.model_spec.name, **self.model_spec.options).to(self.device)
        torch.manual_seed(cfg.seed + self.rank)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.phema = PowerEMA(self.model, cfg.posthoc_ema_sigma_rels) if cfg.posthoc_ema_every else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr_at(0), weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.fp16)
        self.timestep_sampler = self.diffusion.create_timestep_sampler()
        self.stream = IndexStream(self.data.size, cfg.seed)
        if self.data.x is not None:
            self.data.x, self.data.y = self.data.x.to(self.device), self.data.y.to(self.device)
        self.step = 0
        self.skipped_steps = 0  # fp16 steps skipped for non-finite gradients (all of the run)
        self.consecutive_skipped = 0
        self.running_loss: float | None = None
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.network: torch.nn.Module = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            on_cuda = self.device.type == "cuda"
            self.network = DistributedDataParallel(self.model, device_ids=[self.device] if on_cuda else None)

    # -- data ----------------------------------------------------------------------------------

    @property
    def x_all(self) -> torch.Tensor | None:
        """The examples when held in memory (``None`` when streamed)."""
        return self.data.x

    def data_position(self) -> tuple[int, int]:
        """``(epoch, offset)`` of the next example the run reads (global position step * batch_size)."""
        return divmod(self.step * self.cfg.batch_size, self.data.size)

    def _next_micro(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:  # from the current step: built lazily, so load_state sets it first
            order = RankBatches(
                self.stream, batch_size=self.cfg.batch_size, micro=self.micro, grad_accum=self.cfg.grad_accum,
                world=self.world_size, rank=self.rank, start_step=self.step,
            )
            self._batches = self.data.batches(order, self.device)
        return next(self._batches)

    def close(self) -> None:
        """Stop the data loader's workers."""
        self._batches = None

    def micro_inputs(self, x: torch.Tensor, y: torch.Tensor, chunk: int):
        """The random inputs of micro-batch ``chunk`` of this step: ``(x_start, model_kwargs, t,
        weights, noise)``, drawn from generators seeded ``(seed, step, chunk)`` (CPU for flips,
        label dropout and timesteps; the device's for the noise)."""
        seed = seed_for(self.cfg.seed, self.step, chunk)
        g = torch.Generator().manual_seed(seed)
        n = x.shape[0]
        if self.hflip:
            flip = (torch.rand(n, generator=g) < 0.5).to(x.device).view(n, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        kwargs = {}
        if self.conditional:
            drop = torch.rand(n, generator=g).to(x.device) < self.cfg.label_dropout
            kwargs["y"] = torch.where(drop, torch.full_like(y, self.num_classes or 0), y)
        t, weights = self.timestep_sampler.sample(n, self.device, generator=g)
        device_g = g if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(seed)
        noise = torch.randn(x.shape, generator=device_g, device=self.device)
        return x, kwargs, t, weights, noise

    # -- one step ---------------------------------------------------------------------------------

    def micro_loss(self, x_start, kwargs, t, weights, noise) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, per-example losses)`` of one micro-batch: the importance-weighted mean divided by
        ``grad_accum`` (so k micro-batches sum to the mean over the k-times larger batch)."""
        dtype = torch.float16 if self.cfg.fp16 else torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.cfg.bf16 or self.cfg.fp16):
            losses = self.diffusion.training_losses(self.network, x_start, t, model_kwargs=kwargs, noise=noise)
        per_example = losses["loss"].float()
        return (per_example * weights).mean() / self.cfg.grad_accum, per_example

    def train_step(self, micro: list[tuple] | None = None) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the loss (this rank's).

        ``micro``: the micro-batches' ``(x_start, model_kwargs, t, weights, noise)`` to use instead
        of the data stream (for tests and custom loops).

        Raises FloatingPointError naming the step: a non-finite loss or gradient norm (fp32, bf16),
        or ``max_skipped_steps`` consecutive steps skipped for overflow (fp16).
        """
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        ts, ls = [], []
        for a in range(cfg.grad_accum):
            if micro is not None:
                inputs = micro[a]
            else:
                inputs = self.micro_inputs(*self._next_micro(), chunk=a * self.world_size + self.rank)
            sync = a == cfg.grad_accum - 1 or self.world_size == 1
            with self.network.no_sync() if not sync else contextlib.nullcontext():  # type: ignore[operator]
                loss, per_example = self.micro_loss(*inputs)
                self.scaler.scale(loss).backward()
            total += loss.detach()
            ts.append(inputs[2])
            ls.append(per_example)
        update_sampler(self.timestep_sampler, ts, ls, world=self.world_size, device=self.device)
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if cfg.fp16:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
            self.skipped_steps += skipped
            self.consecutive_skipped = self.consecutive_skipped + 1 if skipped else 0
            if self.consecutive_skipped >= cfg.max_skipped_steps:
                raise FloatingPointError(
                    f"fp16: {self.consecutive_skipped} consecutive steps skipped for non-finite gradients up to step "
                    f"{self.step} (loss scale now {self.scaler.get_scale():g}); the run diverged: lower lr, use bf16, "
                    "or resume from the last checkpoint"
                )
            value = float(total)
        else:
            value, norm_value = torch.stack([total.float(), norm.float()]).tolist()
            if not (math.isfinite(value) and math.isfinite(norm_value)):
                what = f"training loss became {value}"
                if math.isfinite(value):
                    what = f"gradient norm became {norm_value}"
                raise FloatingPointError(
                    f"{what} at step {self.step}; stopping (lower lr, check the data or resume from the last "
                    "checkpoint)"
                )
            self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        if self.phema is not None:
            self.phema.update(self.model, self.step)
        if math.isfinite(value):
            self.running_loss = value if self.running_loss is None else 0.98 * self.running_loss + 0.02 * value
        return value

    # -- files ---------------------------------------------------------------------------------

    def checkpoint_config(self) -> CheckpointConfig:
        """What the model checkpoint will carry: diffusion, full model options, data."""
        data_info: dict[str, Any] = {
            "dataset": self.cfg.data.name,
            "shape": list(self.data.example_shape),
            "num_classes": self.num_classes if self.conditional else None,
        }
        if self.cfg.guidance_scale is not None and self.conditional:
            data_info["guidance_scale"] = self.cfg.guidance_scale
        return CheckpointConfig(
            diffusion=self.cfg.diffusion,
            model=self.model_spec,
            data=data_info,
            sampling=SamplingConfig(clip=self.data.clip_by_default()),  # clip images in [-1, 1] only
        )

    def data_fingerprint(self) -> str:
        """The data's fingerprint (:meth:`diffreg.data_loading.TrainingData.fingerprint`)."""
        return self.data.fingerprint()

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
            if not keeps_files_beside(output):  # /dev/null, a FIFO: the checkpoint only
                with atomic_paths(output) as (tmp_model,), naming(output):
                    save_checkpoint(tmp_model, self.ema.model, self.checkpoint_config(), dtype=checkpoint_dtype)
                return Path(output)
            state = state_path(output)
            with atomic_paths(output, state) as (tmp_model, tmp_state):
                with naming(output):
                    save_checkpoint(tmp_model, self.ema.model, self.checkpoint_config(), dtype=checkpoint_dtype)
                write_state(self, tmp_state, ranks, shown=state)
        return Path(output)

    def save_snapshot(self, output: str | os.PathLike[str]) -> Path | None:
        """Write the post-hoc EMA averages at this step beside ``output`` (rank 0;
        :func:`diffreg.ema.write_snapshot`)."""
        if self.phema is None or self.rank != 0:
            return None
        return write_snapshot(snapshot_dir(output), self.phema, self.step)

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
        ``steps``, ``save_every`` and ``data_workers``, data fingerprint, process count, counters,
        optimizer, loss scaler and RNG state): :func:`diffreg.train_state.load_state`.

        Raises:
            FileNotFoundError: no state file. CheckpointError: not a training-state file, damaged,
            or saved by a different run (naming everything that differs).
        """
        from diffreg.train_state import load_state

        load_state(self, path)
        self._batches = None
