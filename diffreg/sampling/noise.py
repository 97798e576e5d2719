"""Noise and seeding: one generator, or one per sample so that sample k depends only on (seed, k)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

Generator = torch.Generator | Sequence[torch.Generator] | None


def draw_noise(shape: Sequence[int], generator: Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device``.

    ``generator`` may be ``None`` (global RNG), one ``torch.Generator`` (drawn on its own device,
    then moved), or a list of ``shape[0]`` generators, one per sample: then sample ``k`` depends
    only on ``generator[k]``, not on the batch size or its position.

    Raises:
        ValueError: a list whose length is not the batch size.
    """
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}; give one per sample")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in gens]).to(
        device
    )


def per_sample_generators(
    seed: int, count: int, start: int = 0, device: str | torch.device = "cpu"
) -> list[torch.Generator]:
    """``count`` independent generators for samples ``start .. start + count - 1`` of a run seeded
    with ``seed``; sample ``k``'s generator depends only on ``(seed, k)`` (numpy's SeedSequence)."""
    gens = []
    for k in range(start, start + count):
        state = np.random.SeedSequence([int(seed), k]).generate_state(1, dtype=np.uint64)[0]
        gens.append(torch.Generator(device=device).manual_seed(int(state) & ((1 << 63) - 1)))
    return gens


def check_generator(generator: Any, batch: int) -> None:
    """Raise TypeError / ValueError unless ``generator`` is None, a Generator, or one per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}; give one per sample")
        return
    raise TypeError(f"generator must be a torch.Generator or a list of one per sample, got {generator!r}")
