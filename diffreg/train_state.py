"""The training state: what ``diffreg train --resume`` needs to continue exactly, in one
safetensors file (nothing pickled), and the checks that it fits the run that resumes from it.

Layout: ``model/<name>`` and ``ema/<name>`` (weights), ``phema/<i>/<name>`` (post-hoc EMA
averages, when kept), ``optim/<index>/<name>`` (AdamW's ``step``, ``exp_avg``, ``exp_avg_sq`` per
parameter), ``scaler/scale`` and ``scaler/growth_tracker`` (fp16), and per rank ``rng/torch``,
``timestep_sampler/<name>`` (rank 0) or ``rank<r>/...`` (rank r > 0 under torchrun).
Metadata: ``step``, ``ema_updates``, ``running_loss``, ``param_groups``, ``train_config``,
``world_size``, ``data_fingerprint``, ``data_epoch`` and ``data_offset`` (where the index stream
resumes: ``divmod(step * batch_size, N)``), ``data_size``, ``skipped_steps``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
from safetensors.torch import save_file

from diffreg.errors import CheckpointError
from diffreg.fileio import naming

if TYPE_CHECKING:  # pragma: no cover
    from diffreg.trainer import Trainer

# optimizer hyper-parameters that must match the configuration (the config governs, the file is checked)
_CHECKED_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


def data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """SHA-256 (hex) of the training data as the run sees it: shapes, the float32 examples and the
    int64 labels, so different data under the same path is noticed at resume."""
    digest = hashlib.sha256()
    for tensor, dtype in ((x, torch.float32), (y, torch.int64)):
        array = tensor.detach().to("cpu", dtype).contiguous().numpy()
        digest.update(repr(tuple(array.shape)).encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def rank_prefix(rank: int) -> str:
    """Where rank ``rank``'s RNG and timestep-sampler state live in the file."""
    return "" if rank == 0 else f"rank{rank}/"


def rank_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """This process's own state: torch's global RNG (model dropout), the timestep sampler. (The
    data order, flips, label dropout, timesteps and noise are functions of (seed, step, chunk).)"""
    state = {"rng/torch": torch.get_rng_state()}
    for key, value in trainer.timestep_sampler.state_dict().items():
        state[f"timestep_sampler/{key}"] = torch.as_tensor(value)
    return state


def gathered_rank_states(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """Every rank's :func:`rank_state`, on every rank (a collective: all ranks must call it)."""
    mine = rank_state(trainer)
    if trainer.world_size == 1:
        return [mine]
    import torch.distributed as dist

    device = trainer.device if dist.get_backend() == "nccl" else torch.device("cpu")
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(trainer.world_size)]
    for key in sorted(mine):
        local = mine[key].contiguous().to(device)
        parts = [torch.empty_like(local) for _ in range(trainer.world_size)]
        dist.all_gather(parts, local)
        for rank, part in enumerate(parts):
            states[rank][key] = part.cpu()
    return states


def write_state(trainer: Trainer, path: Path, ranks: list[dict[str, torch.Tensor]], shown: Path) -> None:
    """Write the training state to ``path`` (not atomically: the caller writes a temporary file);
    errors name ``shown`` (the real target) and the cause."""
    from diffreg import __version__

    tensors: dict[str, torch.Tensor] = {}
    for key, value in trainer.model.state_dict().items():
        tensors[f"model/{key}"] = value.detach().cpu().contiguous()
    for key, value in trainer.ema.model.state_dict().items():
        tensors[f"ema/{key}"] = value.detach().cpu().contiguous()
    if trainer.phema is not None:
        for key, value in trainer.phema.state_tensors().items():
            tensors[f"phema/{key}"] = value
    if trainer.scaler.is_enabled():
        scaler = trainer.scaler.state_dict()
        tensors["scaler/scale"] = torch.tensor([float(scaler["scale"])], dtype=torch.float64)
        tensors["scaler/growth_tracker"] = torch.tensor([int(scaler["_growth_tracker"])], dtype=torch.int64)
    optim = trainer.optimizer.state_dict()
    for index, state in optim["state"].items():
        for name, value in state.items():
            tensors[f"optim/{index}/{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    for rank, state in enumerate(ranks):
        for key, value in state.items():
            tensors[rank_prefix(rank) + key] = value.contiguous()
    metadata = {
        "diffreg.kind": "training_state",
        "diffreg.version": __version__,
        "diffreg.format_version": "1",
        "step": str(trainer.step),
        "ema_updates": str(trainer.ema.updates),
        "running_loss": json.dumps(trainer.running_loss),
        "param_groups": json.dumps(optim["param_groups"]),
        "train_config": trainer.cfg.to_json(),
        "world_size": str(trainer.world_size),
        "data_fingerprint": trainer.data_fingerprint(),
        "data_epoch": str(trainer.data_position()[0]),
        "data_offset": str(trainer.data_position()[1]),
        "data_size": str(trainer.data.size),
        "skipped_steps": str(trainer.skipped_steps),
    }
    with naming(shown):
        save_file(tensors, str(path), metadata=metadata)


def saved_step(path: str | os.PathLike[str]) -> int | None:
    """The step recorded in a training-state file's header (``None`` if it records none)."""
    from diffreg.checkpoint import read_metadata

    try:
        return int(read_metadata(path).get("step", ""))
    except ValueError:
        return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _check_tensors(kind: str, saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> list[str]:
    """Names, shapes, dtypes and finiteness of saved tensors against the ones of this run."""
    problems = []
    missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or extra:
        problems.append(
            f"{kind} tensors differ (missing: {', '.join(missing[:3]) or 'none'}; unexpected: "
            f"{', '.join(extra[:3]) or 'none'})"
        )
    for key in sorted(set(saved) & set(current)):
        s, c = saved[key], current[key]
        if tuple(s.shape) != tuple(c.shape) or s.dtype != c.dtype:
            problems.append(f"{kind} {key} is {s.dtype} {tuple(s.shape)}, this run has {c.dtype} {tuple(c.shape)}")
        elif s.is_floating_point() and not torch.isfinite(s).all():
            problems.append(f"{kind} {key} holds non-finite values")
    return problems


def load_state(trainer: Trainer, path: str | os.PathLike[str]) -> None:
    """Restore :func:`write_state` into ``trainer``, after checking that the file fits this run:
    the configuration (all but ``steps`` and ``save_every``), the data (fingerprint), the process
    count, the step and EMA count, AdamW's hyper-parameters (the configuration's are used), its
    per-parameter state (names, shapes, dtypes, finite, ``exp_avg_sq >= 0``, its step), the RNG
    states' sizes and the timestep sampler's state. Every difference is named in one error.

    Raises:
        FileNotFoundError: no state file. CheckpointError: not a training-state file, incomplete,
        damaged, or saved by a different run (naming what differs).
    """
    from safetensors.torch import load_file

    from diffreg.checkpoint import read_metadata
    from diffreg.train_config import TrainConfig

    shown = repr(str(path))
    meta = read_metadata(path)
    if meta.get("diffreg.kind") != "training_state":
        raise CheckpointError(f"{shown} is not a diffreg training-state file")
    if "train_config" not in meta:
        raise CheckpointError(f"{shown} has no training configuration; it cannot resume")
    try:
        saved_cfg = TrainConfig.from_json(meta["train_config"])
    except Exception as exc:
        raise CheckpointError(f"{shown} has a damaged training configuration: {exc}") from exc
    ignore = {"steps", "save_every", "data_workers"}
    differ = [
        f.name
        for f in attrs.fields(TrainConfig)
        if f.name not in ignore and getattr(saved_cfg, f.name) != getattr(trainer.cfg, f.name)
    ]
    if differ:
        raise CheckpointError(f"cannot resume from {shown}: the configuration differs in {', '.join(differ)}")
    cfg = trainer.cfg
    if cfg.lr_schedule == "cosine" and not cfg.lr_decay_steps and saved_cfg.steps != cfg.steps:
        raise CheckpointError(
            f"cannot resume from {shown}: its cosine schedule decays over steps = {saved_cfg.steps}, this run has "
            f"steps = {cfg.steps}; set lr_decay_steps = {saved_cfg.steps} to keep the schedule "
            f"(or {cfg.steps} to stretch it)"
        )
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{shown} is damaged and cannot resume: {type(exc).__name__}: {exc}") from exc
    prefix = rank_prefix(trainer.rank)
    needed = ["model/", "ema/", prefix + "rng/torch"]
    if trainer.phema is not None:
        needed.append("phema/")
    if trainer.scaler.is_enabled():
        needed += ["scaler/scale", "scaler/growth_tracker"]
    missing = [n for n in needed if not any(k.startswith(n) for k in tensors)]
    missing += [k for k in ("step", "ema_updates", "param_groups", "running_loss") if k not in meta]
    try:
        step = int(meta.get("step", "0"))
    except ValueError:
        step = -1
    try:  # fp16 steps skipped for overflow: AdamW took step - skipped_steps steps
        skipped_steps, bad_skipped = int(meta.get("skipped_steps", "0")), False
        if not 0 <= skipped_steps <= max(step, 0):
            raise ValueError
    except ValueError:
        skipped_steps, bad_skipped = 0, True
    optim_steps = step - skipped_steps
    if optim_steps > 0 and not any(k.startswith("optim/") for k in tensors):
        missing.insert(2, "optim/")
    if missing:
        raise CheckpointError(f"{shown} is incomplete: no {', '.join(missing)}; it cannot resume exactly")

    def section(name: str) -> dict[str, torch.Tensor]:
        return {k[len(name) :]: v for k, v in tensors.items() if k.startswith(name)}

    problems: list[str] = []
    # -- the run: processes and data
    world = meta.get("world_size", "1")
    if world != str(trainer.world_size):
        problems.append(f"it was saved by {world} process(es), this run has {trainer.world_size}")
    fingerprint = meta.get("data_fingerprint")
    position = [meta.get("data_epoch"), meta.get("data_offset"), meta.get("data_size")]
    if step >= 0 and None not in position:
        expected = [*map(str, divmod(step * trainer.cfg.batch_size, trainer.data.size)), str(trainer.data.size)]
        if position != expected:
            problems.append(
                f"its data position (epoch, offset, size) {tuple(position)} is not where step {step} of this run "
                f"reads {tuple(expected)}"
            )
    if bad_skipped:
        problems.append(f"skipped step count {meta.get('skipped_steps')!r} is not an integer in 0..{step}")
    if fingerprint is not None and fingerprint != trainer.data_fingerprint():
        where = trainer.cfg.data.options.get("path")
        problems.append(
            f"the data{f' at {where!r}' if where else ''} is not the data it was saved with (fingerprint "
            f"{fingerprint[:12]}…, now {trainer.data_fingerprint()[:12]}…)"
        )
    # -- counters
    try:
        ema_updates = int(meta["ema_updates"])
    except ValueError:
        ema_updates = -1
    if step < 0:
        problems.append(f"step {meta['step']!r} is not an integer >= 0")
    elif ema_updates != step:
        problems.append(f"EMA update count {meta['ema_updates']!r} differs from step {step}")
    try:
        running_loss = json.loads(meta["running_loss"])
        if running_loss is not None and not (isinstance(running_loss, (int, float)) and math.isfinite(running_loss)):
            raise ValueError
    except (ValueError, RecursionError):
        running_loss = None
        problems.append(f"running loss {meta['running_loss']!r} is not a finite number")
    # -- weights
    problems += _check_tensors("model", section("model/"), trainer.model.state_dict())
    problems += _check_tensors("EMA", section("ema/"), trainer.ema.model.state_dict())
    if trainer.phema is not None:
        problems += _check_tensors("post-hoc EMA", section("phema/"), trainer.phema.state_tensors())
    if trainer.scaler.is_enabled():
        scale = tensors["scaler/scale"]
        finite = scale.numel() == 1 and scale.is_floating_point() and math.isfinite(float(scale))
        if not (finite and float(scale) > 0):
            problems.append(f"loss scale {scale.tolist()!r} is not a finite number > 0")
    # -- optimizer: the configuration's hyper-parameters govern; the file must agree with them
    if step > 0:  # the learning rate of the last update the state holds
        for group in trainer.optimizer.param_groups:
            group["lr"] = trainer.cfg.lr_at(step - 1)
    current_groups = trainer.optimizer.state_dict()["param_groups"]
    try:
        groups = json.loads(meta["param_groups"])
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise ValueError("not a list of tables")
    except (ValueError, RecursionError) as exc:
        groups = current_groups
        problems.append(f"optimizer parameter groups are damaged ({exc})")
    if len(groups) != len(current_groups):
        problems.append(f"{len(groups)} optimizer parameter groups, this run has {len(current_groups)}")
    for saved_group, group in zip(groups, current_groups, strict=False):
        for key in _CHECKED_GROUP_KEYS:
            if key in group and not _same(saved_group.get(key), group[key]):
                problems.append(f"optimizer {key} is {saved_group.get(key)!r}, the configuration says {group[key]!r}")
        if saved_group.get("params") != group["params"]:
            problems.append("optimizer parameter indices differ")
    params = list(trainer.model.parameters())
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in section("optim/").items():
        index, _, name = key.partition("/")
        if not index.isdigit() or int(index) >= len(params) or name not in ("step", "exp_avg", "exp_avg_sq"):
            problems.append(f"unexpected optimizer entry optim/{key}")
            continue
        optim_state.setdefault(int(index), {})[name] = value
    if optim_steps > 0 and sorted(optim_state) != list(range(len(params))):
        problems.append(f"optimizer state covers {len(optim_state)} of {len(params)} parameters")
    for index, entry in sorted(optim_state.items()):
        param = params[index]
        if set(entry) != {"step", "exp_avg", "exp_avg_sq"}:
            problems.append(f"optimizer state of parameter {index} has {', '.join(sorted(entry))}")
            continue
        for name in ("exp_avg", "exp_avg_sq"):
            t = entry[name]
            if tuple(t.shape) != tuple(param.shape) or t.dtype != param.dtype:
                problems.append(
                    f"optimizer {name} of parameter {index} is {t.dtype} {tuple(t.shape)}, "
                    f"the parameter is {param.dtype} {tuple(param.shape)}"
                )
            elif not torch.isfinite(t).all() or (name == "exp_avg_sq" and (t < 0).any()):
                problems.append(f"optimizer {name} of parameter {index} holds non-finite or negative values")
        s = entry["step"]
        if s.numel() != 1 or not s.is_floating_point() or float(s) != optim_steps:
            taken = f"step is {step}" + (f" less {skipped_steps} skipped" if skipped_steps else "")
            problems.append(f"optimizer step of parameter {index} is {s.tolist()!r}, the state's {taken}")
    # -- this rank's RNG and timestep sampler
    own = rank_state(trainer)
    for key in ("rng/torch",):
        saved, current = tensors[prefix + key], own[key]
        if saved.dtype != current.dtype or tuple(saved.shape) != tuple(current.shape):
            problems.append(
                f"RNG state {prefix + key} is {saved.dtype} {tuple(saved.shape)}, "
                f"expected {current.dtype} {tuple(current.shape)}"
            )
    sampler_state = section(prefix + "timestep_sampler/")
    current_sampler = {k: v for k, v in own.items() if k.startswith("timestep_sampler/")}
    problems += _check_tensors(
        "timestep sampler", sampler_state, {k.removeprefix("timestep_sampler/"): v for k, v in current_sampler.items()}
    )
    if problems:
        raise CheckpointError(f"cannot resume from {shown}: " + "; ".join(problems))

    try:
        trainer.model.load_state_dict(section("model/"))
        trainer.ema.model.load_state_dict(section("ema/"))
        trainer.optimizer.load_state_dict({"state": optim_state, "param_groups": current_groups})
        torch.set_rng_state(tensors[prefix + "rng/torch"])
        if trainer.phema is not None:
            trainer.phema.load_state_tensors(section("phema/"))
        if trainer.scaler.is_enabled():
            trainer.scaler.load_state_dict(
                {**trainer.scaler.state_dict(), "scale": float(tensors["scaler/scale"]),
                 "_growth_tracker": int(tensors["scaler/growth_tracker"])}
            )
        trainer.timestep_sampler.load_state_dict({k: v.numpy() for k, v in sampler_state.items()})
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{shown} is damaged and cannot resume: {type(exc).__name__}: {exc}") from exc
    trainer.running_loss = running_loss
    trainer.step, trainer.ema.updates, trainer.skipped_steps = step, ema_updates, skipped_steps
