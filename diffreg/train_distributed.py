"""Training under torchrun: the process group, and the loss-aware timestep sampler kept identical
on every rank (guided-diffusion's ``LossAwareSampler.update_with_local_losses``)."""

from __future__ import annotations

import os

import torch

from diffreg.loss import TimestepSampler


def rank_device(device: torch.device) -> torch.device:
    """The device of this process: under torchrun (``WORLD_SIZE`` > 1) a ``cuda`` device without
    an index becomes ``cuda:LOCAL_RANK`` (one GPU per process, as torchrun launches them) and is
    made the current device; anything else is returned unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world size) of a torchrun launch (``WORLD_SIZE`` > 1), initialising the process
    group once: NCCL when this process works on ``device`` of type ``cuda`` (NCCL cannot reduce
    CPU tensors), gloo otherwise (default ``device``: CUDA if available); ``(0, 1)`` otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def finish_distributed() -> None:
    """Under torchrun: wait for every rank (rank 0 may still be writing), then close the process
    group, so no rank exits while another still talks to it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_padded(local: torch.Tensor, world: int, device: torch.device) -> list[torch.Tensor]:
    """Every rank's 1-D ``local`` (any length, same dtype), on every rank, in rank order: the
    lengths are gathered first and each tensor is padded to the longest, as guided-diffusion's
    ``update_with_local_losses`` does. A collective: every rank must call it."""
    import torch.distributed as dist

    local = local.reshape(-1).to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.numel()], device=device))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=local.dtype, device=device)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [part[: int(size)].cpu() for part, size in zip(parts, sizes, strict=True)]


def is_loss_aware(sampler: TimestepSampler) -> bool:
    """Whether ``sampler`` learns from the losses (overrides ``update_with_losses``)."""
    target = getattr(sampler, "density", sampler)
    return type(target).update_with_losses is not TimestepSampler.update_with_losses


def update_sampler(
    sampler: TimestepSampler, t: list[torch.Tensor], losses: list[torch.Tensor], *, world: int, device: torch.device
) -> None:
    """Feed one optimizer step's per-example ``(t, loss)`` of every micro-batch of every rank to
    ``sampler``, in the global chunk order (micro-batch ``a`` of rank ``r`` is chunk
    ``a * world + r``), on every rank, so every rank's sampler holds the same history and samples
    from the same distribution; with one process it is the micro-batches in order.

    ``t`` and ``losses``: this rank's micro-batches (int64 and float ``[micro]`` each).
    A collective under torchrun (every rank must call it); a no-op for samplers that ignore losses.
    """
    if not is_loss_aware(sampler):
        return
    local_t = torch.cat([x.reshape(-1) for x in t]).to(torch.float64)
    local_l = torch.cat([x.detach().reshape(-1) for x in losses]).to(torch.float64)
    if world == 1:
        sampler.update_with_losses(local_t.long(), local_l)
        return
    all_t = all_gather_padded(local_t, world, device)
    all_l = all_gather_padded(local_l, world, device)
    rounds = len(t)
    chunks_t, chunks_l = [], []
    for a in range(rounds):  # chunk order: a * world + r
        for r in range(world):
            m = all_t[r].numel() // rounds
            chunks_t.append(all_t[r][a * m : (a + 1) * m])
            chunks_l.append(all_l[r][a * m : (a + 1) * m])
    sampler.update_with_losses(torch.cat(chunks_t).long(), torch.cat(chunks_l))
