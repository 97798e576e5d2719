"""Distances between sample sets."""

from __future__ import annotations

import torch


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, projections: int = 128, generator: torch.Generator | None = None
) -> float:
    """The sliced 2-Wasserstein distance between two empirical distributions:
    SW_2(a, b) = sqrt(mean_theta W_2^2(theta . a, theta . b)) over ``projections`` directions theta
    uniform on the unit sphere, with the 1-D W_2 computed exactly from sorted projections
    (Rabin et al. 2011, "Wasserstein barycenter and its application to texture mixing";
    Bonneel et al. 2015, "Sliced and Radon Wasserstein barycenters of measures").

    Args:
        a: ``[n, ...]`` samples; b: ``[m, ...]`` samples with the same values per example (n and m
            may differ: then the quantile functions are compared on the merged grid of levels).
        projections: number of random directions (>= 1).
        generator: a CPU ``torch.Generator`` for the directions (default: a fixed seed, 0).

    Returns:
        A Python float >= 0 (computed in float64), in the units of the data.

    Raises:
        ValueError: empty inputs, mismatched dimensions, ``projections < 1``.
    """
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    if a.ndim < 1 or b.ndim < 1 or a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"need non-empty sample sets, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    xa = a.detach().reshape(a.shape[0], -1).to(device="cpu", dtype=torch.float64)
    xb = b.detach().reshape(b.shape[0], -1).to(device="cpu", dtype=torch.float64)
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(f"samples differ in dimension: {tuple(a.shape)} vs {tuple(b.shape)}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    directions = torch.randn(projections, xa.shape[1], generator=gen, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    pa = (xa @ directions.T).sort(dim=0).values  # [n, P]
    pb = (xb @ directions.T).sort(dim=0).values  # [m, P]
    return float(_sorted_w2(pa, pb).mean().sqrt())


def _sorted_w2(pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
    """W_2^2 per column between 1-D empirical distributions given sorted samples ``[n, P]``,
    ``[m, P]``: the integral over u in (0, 1) of (F_a^-1(u) - F_b^-1(u))^2, exact for step quantile
    functions."""
    n, m = pa.shape[0], pb.shape[0]
    if m % n == 0:
        return ((pa.repeat_interleave(m // n, dim=0) - pb) ** 2).mean(dim=0)
    if n % m == 0:
        return ((pa - pb.repeat_interleave(n // m, dim=0)) ** 2).mean(dim=0)
    levels = (
        torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n, torch.arange(1, m + 1, dtype=torch.float64) / m])
        .sort()
        .values
    )
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mid = levels - widths / 2
    ia = torch.clamp((mid * n).floor().long(), max=n - 1)
    ib = torch.clamp((mid * m).floor().long(), max=m - 1)
    return (widths[:, None] * (pa[ia] - pb[ib]) ** 2).sum(dim=0)
