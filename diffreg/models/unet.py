"""A small ADM-style UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", appendix A;
the architecture of guided-diffusion's ``unet.py``): sinusoidal timestep embedding, residual blocks
with scale-shift norm, self-attention at chosen resolutions, class embedding with an extra null
class for classifier-free guidance."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffreg.models.options import UNET_BOUNDS, check_int, check_int_list, check_labels, warn_no_labels


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017; as in ADM).

    Args:
        t: ``[N]`` timesteps (int or float). dim: embedding width.

    Returns:
        float32 ``[N, dim]``: ``[cos(t f_k), sin(t f_k)]`` with ``f_k = max_period^(-k / (dim/2))``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, timestep embedding as scale and shift, GroupNorm-SiLU-dropout-conv, skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float, use_scale_shift_norm: bool):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_norm = nn.GroupNorm(_groups(out_channels), out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions, with a zero-initialized output projection."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        n, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x).reshape(n, c, -1))  # [N, 3C, L]
        q, k, v = qkv.reshape(n, 3, self.num_heads, c // self.num_heads, -1).permute(1, 0, 2, 4, 3)
        h = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, C/heads]
        h = h.permute(0, 1, 3, 2).reshape(n, c, -1)
        return x + self.proj_out(h).reshape(n, c, *spatial)


class Downsample(nn.Module):
    """3x3 convolution with stride 2: ``[N, C, H, W]`` -> ``[N, C, H/2, W/2]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution: ``[N, C, H, W]`` -> ``[N, C, 2H, 2W]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _EmbedSequential(nn.Sequential):
    def forward(self, x, emb):  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock, Downsample, Upsample)) else layer(x)
        return x


class UNet(nn.Module):
    """ADM-style UNet, called as ``model(x, t, y=None)``.

    Args:
        in_channels: C of the data. out_channels: network output channels (default
            ``in_channels``; twice that for a learned variance).
        image_size: H = W of the data; must be divisible by ``2 ** (len(channel_mult) - 1)``.
        model_channels: base width; level k has ``model_channels * channel_mult[k]`` channels.
        num_res_blocks: residual blocks per level. attention_resolutions: spatial sizes (pixels)
            at which self-attention is applied. num_heads: attention heads.
        num_classes: number of real classes for class conditioning (``None``: unconditional); the
            embedding has one more row, :attr:`null_class`, the "no label" of classifier-free
            guidance.
        dropout, use_scale_shift_norm: as in ADM.

    Every size option is bounded (:data:`diffreg.models.options.UNET_BOUNDS`); ``channel_mult`` and
    ``attention_resolutions`` must be lists of ints.

    Input: ``x`` float ``[N, in_channels, H, W]``, ``t`` int64 ``[N]`` (original-process
    timesteps), ``y`` int64 ``[N]`` class labels in ``[0, num_classes]`` (``None`` -> null class).
    Output: ``[N, out_channels, H, W]``. Called without ``y``, a conditional UNet warns once and
    uses the null class.

    Raises:
        ValueError: an option out of bounds or of the wrong type (naming it, its value and the
        bound); in ``forward``, a wrong input shape or a CPU label out of ``0..num_classes``.
        TypeError: labels that are not an integer tensor.
    """

    def __init__(
        self,
        in_channels: int = 1,
        model_channels: int = 64,
        out_channels: int | None = None,
        image_size: int = 8,
        num_res_blocks: int = 1,
        channel_mult: Sequence[int] = (1, 2),
        attention_resolutions: Sequence[int] = (4,),
        num_heads: int = 4,
        num_classes: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
    ):
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("model_channels", model_channels),
            ("image_size", image_size),
            ("num_res_blocks", num_res_blocks),
            ("num_heads", num_heads),
        ):
            check_int("UNet", name, value, UNET_BOUNDS[name])
        if out_channels is not None:
            check_int("UNet", "out_channels", out_channels, UNET_BOUNDS["out_channels"])
        if num_classes is not None:
            check_int("UNet", "num_classes", num_classes, UNET_BOUNDS["num_classes"])
        channel_mult = check_int_list(
            "UNet", "channel_mult", channel_mult, UNET_BOUNDS["channel_mult"], UNET_BOUNDS["levels"]
        )
        attention_resolutions = check_int_list(
            "UNet", "attention_resolutions", attention_resolutions, (1, UNET_BOUNDS["image_size"][1]), (0, 16)
        )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"UNet option dropout must be a number in [0, 1), got {dropout!r}")
        levels = len(channel_mult)
        if image_size % (2 ** (levels - 1)):
            raise ValueError(
                f"image_size {image_size} is not divisible by 2^{levels - 1} "
                f"(needed for {levels} levels of channel_mult)"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.image_size = image_size
        self.model_channels = model_channels
        self.num_classes = num_classes
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None

        ch = model_channels
        self.input_blocks = nn.ModuleList([_EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        resolution = image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, model_channels * mult, dropout, use_scale_shift_norm)]
                ch = model_channels * mult
                if resolution in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads))
                self.input_blocks.append(_EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(_EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                resolution //= 2
        self.middle_block = _EmbedSequential(
            ResBlock(ch, emb_dim, ch, dropout, use_scale_shift_norm),
            AttentionBlock(ch, num_heads),
            ResBlock(ch, emb_dim, ch, dropout, use_scale_shift_norm),
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [
                    ResBlock(ch + skip_channels.pop(), emb_dim, model_channels * mult, dropout, use_scale_shift_norm)
                ]
                ch = model_channels * mult
                if resolution in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    resolution *= 2
                self.output_blocks.append(_EmbedSequential(*layers))
        self.out = nn.Sequential(
            nn.GroupNorm(_groups(ch), ch), nn.SiLU(), _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        )
        self._levels = levels

    @property
    def null_class(self) -> int | None:
        """The label meaning "no class" (``num_classes``), or ``None`` if unconditional."""
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects x of shape [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[-1] % (2 ** (self._levels - 1)) or x.shape[-2] % (2 ** (self._levels - 1)):
            raise ValueError(f"UNet input size {tuple(x.shape[-2:])} must be divisible by {2 ** (self._levels - 1)}")
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if self.label_emb is not None:
            if y is None:
                warn_no_labels("UNet", self, self.num_classes or 0)
                y = torch.full((x.shape[0],), self.num_classes or 0, dtype=torch.long, device=x.device)
            check_labels("UNet", y, x.shape[0], self.num_classes or 0)
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise ValueError("this UNet is unconditional (num_classes=None) but got labels y")
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
