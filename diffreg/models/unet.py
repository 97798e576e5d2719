"""An ADM-style UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", appendix A;
the architecture of guided-diffusion's ``unet.py``): sinusoidal timestep embedding, residual blocks
with scale-shift norm, self-attention at chosen resolutions, class embedding with an extra null
class for classifier-free guidance."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

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
    """GroupNorm-SiLU-conv, timestep embedding as scale and shift (or added), GroupNorm-SiLU-dropout-conv,
    plus a skip connection; optionally resampling (guided-diffusion's ``ResBlock``, same submodule
    names: ``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``).

    ``up``/``down``: resample by 2 inside the block (nearest / average pooling), BigGAN style
    (``resblock_updown``; Brock et al. 2019, as ADM).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float,
        use_scale_shift_norm: bool,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        self.h_upd: nn.Module = Upsample(channels, False) if up else Downsample(channels, False) if down else nn.Identity()
        self.x_upd: nn.Module = Upsample(channels, False) if up else Downsample(channels, False) if down else nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            nn.GroupNorm(_groups(out_channels), out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[-1](self.h_upd(self.in_layers[:-1](x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions, with a zero-initialized output projection
    (guided-diffusion's ``AttentionBlock``: ``norm``, ``qkv``, ``proj_out``).

    ``use_new_attention_order``: the ``3C`` channels of ``qkv`` are ``[q | k | v]``, each split
    into heads (guided-diffusion's ``QKVAttention``); ``False``: they are split into heads first,
    each head holding ``[q | k | v]`` (``QKVAttentionLegacy``, the order of improved-diffusion and
    of guided-diffusion's released models).
    """

    def __init__(self, channels: int, num_heads: int, use_new_attention_order: bool = True):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.use_new_attention_order = use_new_attention_order
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        n, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x).reshape(n, c, -1))  # [N, 3C, L]
        if self.use_new_attention_order:
            qkv = qkv.reshape(n, 3, self.num_heads, c // self.num_heads, -1).permute(1, 0, 2, 4, 3)
        else:
            qkv = qkv.reshape(n, self.num_heads, 3, c // self.num_heads, -1).permute(2, 0, 1, 4, 3)
        q, k, v = qkv  # each [N, heads, L, C/heads]
        h = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, C/heads]
        h = h.permute(0, 1, 3, 2).reshape(n, c, -1)
        return x + self.proj_out(h).reshape(n, c, *spatial)


class Downsample(nn.Module):
    """Halve H and W: a 3x3 convolution with stride 2 (``use_conv``) or 2x2 average pooling;
    ``[N, C, H, W]`` -> ``[N, C, H/2, W/2]``. The submodule is ``op`` as in guided-diffusion."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.op: nn.Module = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x, emb=None):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution if ``use_conv``: ``[N, C, H, W]`` -> ``[N, C, 2H, 2W]``."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x, emb=None):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class _EmbedSequential(nn.Sequential):
    def forward(self, x, emb):  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock, Downsample, Upsample)) else layer(x)
        return x


def _check_fractional_mult(channel_mult, model_channels: int) -> tuple[float, ...]:
    low, high = UNET_BOUNDS["levels"]
    top = UNET_BOUNDS["channel_mult"][1]
    if not low <= len(channel_mult) <= high or any(
        isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= top or int(m * model_channels) < 1
        for m in channel_mult
    ):
        raise ValueError(
            f"UNet option channel_mult must be a list of {low}..{high} numbers in (0, {top}] with "
            f"int(model_channels * m) >= 1, got {list(channel_mult)!r}"
        )
    return tuple(channel_mult)


def _check_labels_without_null(y, batch: int, num_classes: int) -> None:
    check_labels("UNet", y, batch, num_classes)  # type, shape, and 0..num_classes
    if y.device.type == "cpu" and y.numel() and bool((y >= num_classes).any()):
        raise ValueError(
            f"UNet class label {int(y[y >= num_classes][0])} is out of range; accepted: 0..{num_classes - 1} "
            "(this model has no null class)"
        )


#: Renames from the key layout of diffreg 0.1's UNet to the current one (guided-diffusion's names).
_LEGACY_RENAMES = ((".out_layers.2.", ".out_layers.3."), (".out_norm.", ".out_layers.0."), (".skip.", ".skip_connection."))


class UNet(nn.Module):
    """ADM-style UNet, called as ``model(x, t, y=None)``; its parameters have the names and shapes
    of guided-diffusion's ``UNetModel`` (and improved-diffusion's), so their state dicts load key
    for key with the matching options.

    Args:
        in_channels: C of the data. out_channels: network output channels (default
            ``in_channels``; twice that for a learned variance).
        image_size: H = W of the data; must be divisible by ``2 ** (len(channel_mult) - 1)``.
        model_channels: base width; level k has ``int(model_channels * channel_mult[k])`` channels
            (multipliers may be fractions, e.g. guided-diffusion's 512 model starts at 0.5).
        num_res_blocks: residual blocks per level. attention_resolutions: spatial sizes (pixels)
            at which self-attention is applied (guided-diffusion's ``--attention_resolutions``
            flag; its ``UNetModel`` takes downsampling factors ``image_size // res`` instead).
        num_heads: attention heads; ``num_head_channels``: channels per head instead (heads =
            channels // num_head_channels), as guided-diffusion's ``num_head_channels``;
            ``num_heads_upsample``: heads in the decoder's attention (default ``num_heads``).
        use_new_attention_order: how ``qkv`` channels are split (see :class:`AttentionBlock`);
            OpenAI's released models use ``False``.
        num_classes: number of real classes for class conditioning (``None``: unconditional).
        null_class_embedding: with ``True`` the class embedding has one more row,
            :attr:`null_class`, the "no label" of classifier-free guidance; OpenAI's models have
            none (``False``): labels are then required.
        dropout, use_scale_shift_norm: as in ADM (Dhariwal & Nichol 2021, appendix A).
        resblock_updown: resample with residual blocks (BigGAN style) instead of a strided
            convolution / upsampling convolution.

    Every size option is bounded (:data:`diffreg.models.options.UNET_BOUNDS`); ``channel_mult``
    must be a list of ints, or include fractions (such as guided-diffusion's 0.5) with
    ``int(model_channels * m) >= 1``; ``attention_resolutions`` a list of ints.

    Input: ``x`` float ``[N, in_channels, H, W]``, ``t`` ``[N]`` original-process timesteps (int64,
    or float when the diffusion rescales them), ``y`` int64 ``[N]`` class labels in
    ``[0, num_classes]`` (``None`` -> null class). Output: ``[N, out_channels, H, W]``. Called
    without ``y``, a conditional UNet with a null class warns once and uses it; one without a null
    class raises.

    State dicts written by diffreg 0.1 (keys ``out_norm``, ``skip``, ``conv`` of downsampling)
    load too: :meth:`legacy_key_renames` maps them to the current names.

    Raises:
        ValueError: an option out of bounds or of the wrong type (naming it, its value and the
        bound); in ``forward``, a wrong input shape or a CPU label out of range.
        TypeError: labels that are not an integer tensor.
    """

    def __init__(
        self,
        in_channels: int = 1,
        model_channels: int = 64,
        out_channels: int | None = None,
        image_size: int = 8,
        num_res_blocks: int = 1,
        channel_mult: Sequence[float] = (1, 2),
        attention_resolutions: Sequence[int] = (4,),
        num_heads: int = 4,
        num_classes: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        num_head_channels: int | None = None,
        num_heads_upsample: int | None = None,
        resblock_updown: bool = False,
        use_new_attention_order: bool = True,
        null_class_embedding: bool = True,
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
        for name, value in (
            ("out_channels", out_channels),
            ("num_classes", num_classes),
            ("num_head_channels", num_head_channels),
            ("num_heads_upsample", num_heads_upsample),
        ):
            if value is not None:
                check_int("UNet", name, value, UNET_BOUNDS[name])
        for name, value in (
            ("use_scale_shift_norm", use_scale_shift_norm),
            ("resblock_updown", resblock_updown),
            ("use_new_attention_order", use_new_attention_order),
            ("null_class_embedding", null_class_embedding),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"UNet option {name} must be true or false, got {value!r}")
        if isinstance(channel_mult, (list, tuple)) and any(
            isinstance(m, float) and 0 < m < UNET_BOUNDS["channel_mult"][1] and not m.is_integer() for m in channel_mult
        ):
            channel_mult = _check_fractional_mult(channel_mult, model_channels)  # e.g. ADM 512's 0.5
        else:
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
        self.null_class_embedding = null_class_embedding
        emb_dim = model_channels * 4

        def attention(channels: int, heads: int) -> AttentionBlock:
            if num_head_channels is not None:
                if channels % num_head_channels:
                    raise ValueError(
                        f"attention: {channels} channels are not divisible by num_head_channels={num_head_channels}"
                    )
                heads = channels // num_head_channels
            return AttentionBlock(channels, heads, use_new_attention_order)

        def resblock(channels: int, out: int, **updown: bool) -> ResBlock:
            return ResBlock(channels, emb_dim, out, dropout, use_scale_shift_norm, **updown)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = (
            nn.Embedding(num_classes + int(null_class_embedding), emb_dim) if num_classes is not None else None
        )

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([_EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        resolution = image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if resolution in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(_EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(
                    _EmbedSequential(resblock(ch, ch, down=True) if resblock_updown else Downsample(ch))
                )
                skip_channels.append(ch)
                resolution //= 2
        self.middle_block = _EmbedSequential(resblock(ch, ch), attention(ch, num_heads), resblock(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if resolution in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample or num_heads))
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown else Upsample(ch))
                    resolution *= 2
                self.output_blocks.append(_EmbedSequential(*layers))
        self.out = nn.Sequential(
            nn.GroupNorm(_groups(ch), ch), nn.SiLU(), _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        )
        self._levels = levels
        self._register_load_state_dict_pre_hook(self._rename_legacy_keys)

    @property
    def null_class(self) -> int | None:
        """The label meaning "no class" (``num_classes``), or ``None`` if unconditional or the
        class embedding has no null row."""
        return self.num_classes if self.null_class_embedding else None

    @staticmethod
    def legacy_key_renames(keys: Iterable[str]) -> dict[str, str]:
        """For state-dict ``keys`` in diffreg 0.1's layout, ``{old: new}`` (empty if the keys are
        current). Used when loading, so checkpoints written before the rename keep working."""
        keys = list(keys)
        if not any(".out_norm." in k or ".skip." in k for k in keys):
            return {}
        renames = {}
        for key in keys:
            new = key
            for old, current in _LEGACY_RENAMES:
                new = new.replace(old, current)
            parts = new.split(".")  # a downsampling conv was input_blocks.<i>.0.conv.*
            if len(parts) == 5 and parts[0] == "input_blocks" and parts[2:4] == ["0", "conv"]:
                new = ".".join([*parts[:3], "op", parts[4]])
            if new != key:
                renames[key] = new
        return renames

    def _rename_legacy_keys(self, state_dict, prefix, *args):
        own = [k[len(prefix) :] for k in state_dict if k.startswith(prefix)]
        for old, new in self.legacy_key_renames(own).items():
            state_dict[prefix + new] = state_dict.pop(prefix + old)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects x of shape [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[-1] % (2 ** (self._levels - 1)) or x.shape[-2] % (2 ** (self._levels - 1)):
            raise ValueError(f"UNet input size {tuple(x.shape[-2:])} must be divisible by {2 ** (self._levels - 1)}")
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if self.label_emb is not None:
            if y is None:
                if self.null_class is None:
                    raise ValueError(
                        "this class-conditional UNet has no null class (null_class_embedding=False, as OpenAI's "
                        "models): pass labels y, and for classifier-free guidance a model trained with a null class"
                    )
                warn_no_labels("UNet", self, self.num_classes or 0)
                y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
            if self.null_class_embedding:
                check_labels("UNet", y, x.shape[0], self.num_classes or 0)
            else:
                _check_labels_without_null(y, x.shape[0], self.num_classes or 0)
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
