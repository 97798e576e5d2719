"""Noise and seeding: one generator, or one per sample so that sample k depends only on (seed, k);
and Brownian-tree noise (``noise_type="brownian"``), with which the per-step noise of a
stochastic sampler is the increment of one Brownian path per sample, so the same seed gives the
same sample at 20 or 40 steps up to the discretisation error."""

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
        return _to_device(torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype), device)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}; give one per sample")
    z = torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in gens])
    return _to_device(z, device)


def _to_device(z: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``z`` on ``device``; noise drawn on the CPU for a CUDA state goes through pinned memory
    with a non-blocking copy, so the host never waits for the device's queued work."""
    device = torch.device(device)
    if z.device.type == "cpu" and device.type == "cuda":
        return z.pin_memory().to(device, non_blocking=True)
    return z.to(device)


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


#: the kinds of per-step noise a sampling call can draw (``noise_type=``)
NOISE_TYPES = ("gaussian", "brownian")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(h: np.ndarray, value) -> np.ndarray:
    """splitmix64's finaliser of ``h ^ value`` (uint64 arrays, wrapping arithmetic): a
    counter-based hash, so every draw depends only on its (seed, node, element) key."""
    with np.errstate(over="ignore"):
        h = (h ^ np.uint64(value) if np.isscalar(value) else h ^ value) + _GOLDEN
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def _normals(keys: np.ndarray, count: int) -> np.ndarray:
    """``count`` standard normals per key (float64 ``[len(keys), count]``): Box-Muller on two
    hashed uniforms per element."""
    j = np.arange(count, dtype=np.uint64)[None, :] * np.uint64(2)
    scale = 2.0**-53
    u1 = ((_mix(keys[:, None], j) >> np.uint64(11)).astype(np.float64) + 0.5) * scale
    u2 = (_mix(keys[:, None], j + np.uint64(1)) >> np.uint64(11)).astype(np.float64) * scale
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


class BrownianTree:
    """Brownian motion W on ``[lo, hi]`` (W(lo) = 0), one independent path per seed, queried at any
    time in any order with the same answer: the values at dyadic points come from Brownian bridges
    (Lévy's construction; as torchsde's ``BrownianTree`` that k-diffusion's
    ``BrownianTreeNoiseSampler`` uses), each bridge's normal draw a counter-based hash of (seed, node, element) (splitmix64 and
    Box-Muller, vectorised over samples), so no state is kept beyond a cache of the last path. Below ``depth`` bisections a point is drawn
    from the bridge of its leaf interval.

    Args:
        seeds: one int per path (per sample); ``shape``: the shape of one path's value; ``lo`` <
            ``hi`` the time range; ``depth``: bisection levels (default 30: leaves 1e-9 of the range).

    Raises:
        ValueError: ``lo >= hi`` or an empty ``seeds``.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], lo: float, hi: float, *, depth: int = 30,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if not lo < hi or not seeds:
            raise ValueError(f"a Brownian tree needs lo < hi and at least one seed, got [{lo}, {hi}] and {len(seeds)} seeds")
        self.seeds = [int(s) for s in seeds]
        self.shape = tuple(shape)
        self.lo, self.hi, self.depth = float(lo), float(hi), int(depth)
        self.device, self.dtype = torch.device(device), dtype
        self._keys = np.asarray(self.seeds, dtype=np.uint64)
        self._count = int(np.prod(self.shape, dtype=np.int64))
        self._path: dict[tuple[int, int], torch.Tensor] = {}
        self.root = self._normal(-1, 0) * np.sqrt(self.hi - self.lo)

    def _normal(self, depth: int, index: int) -> torch.Tensor:
        keys = _mix(_mix(self._keys, depth & 0xFFFFFFFF), int(index) & 0xFFFFFFFFFFFFFFFF)
        z = _normals(keys, self._count).reshape((len(self.seeds), *self.shape))
        return torch.from_numpy(z)

    def value(self, t: float) -> torch.Tensor:
        """W(t), float64 ``[len(seeds), *shape]`` on the CPU; ``t`` is clamped to [lo, hi]."""
        t = min(max(float(t), self.lo), self.hi)
        a, b, w_a, w_b = self.lo, self.hi, torch.zeros_like(self.root), self.root
        index = 0
        path = {}
        for depth in range(self.depth):
            if t == a:
                return w_a
            if t == b:
                return w_b
            mid = 0.5 * (a + b)
            key = (depth, index)
            w_mid = self._path.get(key)
            if w_mid is None:
                w_mid = 0.5 * (w_a + w_b) + np.sqrt((b - a) / 4.0) * self._normal(depth, index)
            path[key] = w_mid
            if t < mid:
                b, w_b, index = mid, w_mid, 2 * index
            else:
                a, w_a, index = mid, w_mid, 2 * index + 1
        self._path = path
        u = (t - a) / (b - a)
        leaf = self._normal(self.depth + 1 + index, int(np.float64(t).view(np.int64)))
        return w_a + u * (w_b - w_a) + np.sqrt((t - a) * (b - t) / (b - a)) * leaf

    def increment(self, s: float, t: float) -> torch.Tensor:
        """(W(t) - W(s)) / sqrt(|t - s|): standard normal, ``[len(seeds), *shape]`` in the tree's
        dtype and device (for a single seed, that leading 1 is kept)."""
        z = (self.value(t) - self.value(s)) / np.sqrt(abs(t - s))
        return _to_device(z.to(self.dtype), self.device)  # computed on the host, copied without waiting


def brownian_seeds(generator: Generator, batch: int) -> list[int]:
    """The seeds of a Brownian tree for a batch: one per sample drawn from each per-sample
    generator (sample k depends only on generator k), else one drawn from the single generator
    (or the global RNG) for the whole batch."""
    if isinstance(generator, (list, tuple)):
        return [_seed(g) for g in generator]
    return [_seed(generator)]


def _seed(generator: torch.Generator | None) -> int:
    """One int in [0, 2**62) drawn from ``generator`` (on its own device; the global CPU RNG for
    ``None``). Read on the host: one read per sampling call, before the first step."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
