"""A small MLP denoiser for low-dimensional data (2-D toys), called as ``model(x, t, y=None)``."""

from __future__ import annotations

import torch
from torch import nn

from diffreg.models.options import MLP_BOUNDS, check_int, check_labels, warn_no_labels
from diffreg.models.unet import timestep_embedding


class MLPDenoiser(nn.Module):
    """Residual MLP over ``[N, dim]`` data with a sinusoidal timestep embedding.

    Args:
        dim: data dimension D. out_dim: output width (default ``dim``; ``2 * dim`` for learned
            variance). hidden: width. depth: residual blocks. num_classes: optional class
            conditioning with a null class at index ``num_classes``.

    Input ``x`` float ``[N, dim]``, ``t`` int64 ``[N]``, ``y`` int64 ``[N]`` in ``0..num_classes``
    (``None``: the null class, with a warning once); output ``[N, out_dim]``.

    Raises:
        ValueError: a size option outside :data:`diffreg.models.options.MLP_BOUNDS` (naming it, its
        value and the bound); in ``forward``, a wrong shape or a CPU label out of range.
    """

    def __init__(
        self,
        dim: int = 2,
        out_dim: int | None = None,
        hidden: int = 128,
        depth: int = 3,
        num_classes: int | None = None,
    ):
        super().__init__()
        for name, value in (
            ("dim", dim),
            ("hidden", hidden),
            ("depth", depth),
            ("out_dim", out_dim),
            ("num_classes", num_classes),
        ):
            if value is not None or name in ("dim", "hidden", "depth"):
                check_int("MLPDenoiser", name, value, MLP_BOUNDS[name])
        self.dim = dim
        self.hidden = hidden
        self.num_classes = num_classes
        self.inp = nn.Linear(dim, hidden)
        self.emb = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_emb = nn.Embedding(num_classes + 1, hidden) if num_classes is not None else None
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
            )
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, out_dim or dim))

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLPDenoiser expects x of shape [N, {self.dim}], got {tuple(x.shape)}")
        emb = self.emb(timestep_embedding(t, self.hidden).to(x.dtype))
        if self.label_emb is not None:
            if y is None:
                warn_no_labels("MLPDenoiser", self, self.num_classes or 0)
                y = torch.full((x.shape[0],), self.num_classes or 0, dtype=torch.long, device=x.device)
            check_labels("MLPDenoiser", y, x.shape[0], self.num_classes or 0)
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise ValueError("this MLPDenoiser is unconditional (num_classes=None) but got labels y")
        h = self.inp(x) + emb
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)
