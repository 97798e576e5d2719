"""Training: a plain loop with AdamW, EMA and checkpoints, from a :class:`TrainConfig` (TOML).

``diffreg train --config configs/digits.toml`` is a thin wrapper around :func:`train`. One
optimizer step takes ``batch_size`` examples (global), ``grad_accum`` micro-batches per process;
data streams through :mod:`diffreg.data_loading`; precision fp32, bf16 autocast or fp16 with
dynamic loss scaling; learning-rate warm-up and schedule; EMA and optional post-hoc EMA
(:mod:`diffreg.ema`); the training state (:mod:`diffreg.train_state`) resumes exactly.

This module holds the loop, :func:`train`; the run it drives is :class:`~diffreg.trainer.Trainer`
(:mod:`diffreg.trainer`), the output paths and pre-flight checks are in :mod:`diffreg.train_outputs`.
Every name is importable from here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffreg.diffusion import Diffusion  # noqa: F401  (re-exported: the tests patch training.Diffusion)
from diffreg.ema import EMA
from diffreg.train_config import TrainConfig
from diffreg.train_distributed import finish_distributed, init_distributed
from diffreg.train_outputs import _not_a_file_note, check_outputs, keeps_files_beside, state_path
from diffreg.trainer import Trainer, build_model_spec

__all__ = [
    "EMA",
    "TrainConfig",
    "Trainer",
    "build_model_spec",
    "check_outputs",
    "finish_distributed",
    "keeps_files_beside",
    "state_path",
    "train",
]

_distributed = init_distributed  # the name cli.py imports


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

    With ``cfg.posthoc_ema_every``, post-hoc EMA snapshots are written every that many steps to
    ``<output stem>.phema/`` (:mod:`diffreg.ema`). An ``output`` that is not a regular file
    (``/dev/null``, a FIFO, ``/dev/stdout``) gets the checkpoint once, at the end, and no state
    beside it (warned; see :func:`check_outputs`).

    Returns the checkpoint path. Raises :class:`FloatingPointError` naming the step if the loss or
    the gradient norm becomes non-finite (fp32, bf16), or after ``max_skipped_steps``
    consecutive overflowing steps (fp16): the run stops; the last periodic checkpoint is kept.
    ``OSError`` naming the file if a save fails (the checkpoint and its state stay the previous pair).
    """
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes
        check_outputs(cfg, output, resume=resume)
    beside = keeps_files_beside(output)
    if not beside and int(os.environ.get("RANK", "0")) == 0:
        warnings.warn(_not_a_file_note(output), stacklevel=2)
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
    try:
        while trainer.step < cfg.steps:
            trainer.train_step()
            bar.update(1)
            if trainer.step % 20 == 0:
                postfix = {"loss": f"{trainer.running_loss:.4f}"}
                if cfg.fp16:
                    postfix["skipped"] = str(trainer.skipped_steps)
                bar.set_postfix(postfix)
            if log is not None and (trainer.step % 500 == 0 or trainer.step == cfg.steps):
                skipped = f" skipped {trainer.skipped_steps}" if cfg.fp16 else ""
                lr = cfg.lr_at(trainer.step - 1)
                log(f"step {trainer.step} loss {trainer.running_loss:.4f} lr {lr:.3g}{skipped}")
            if cfg.posthoc_ema_every and trainer.step % cfg.posthoc_ema_every == 0:
                trainer.save_snapshot(output)
            if beside and cfg.save_every and trainer.step % cfg.save_every == 0 and trainer.step < cfg.steps:
                trainer.save(output, checkpoint_dtype)
    finally:
        trainer.close()
        bar.close()
    path = trainer.save(output, checkpoint_dtype)
    finish_distributed()
    return path
