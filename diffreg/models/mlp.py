"""A small MLP denoiser for low-dimensional data (2-D toys), called as ``model(x, t, y=None)``."""

from __future__ import annotations

import torch
from torch import nn

from diffreg.models.unet import timestep_embedding


class MLPDenoiser(nn.Module):
    """Residual MLP over ``[N, dim]`` data with a sinusoidal timestep embedding.

    Args:
        dim: data dimension D. out_dim: output width (default ``dim``; ``2 * dim`` for learned
            variance). hidden: width. depth: residual blocks. num_classes: optional class
            conditioning with a null class at index ``num_classes``.

    Input ``x`` float ``[N, dim]``, ``t`` int64 ``[N]``; output ``[N, out_dim]``.
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
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth), ("out_dim", out_dim or 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MLPDenoiser option {name} must be an integer >= 1, got {value!r}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"MLPDenoiser option num_classes must be >= 1 or None, got {num_classes}")
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
                y = torch.full((x.shape[0],), self.num_classes or 0, dtype=torch.long, device=x.device)
            emb = emb + self.label_emb(y)
        h = self.inp(x) + emb
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)
