"""diffusers' ``UNet2DModel`` as a diffreg model (registered as ``diffusers_unet2d``).

The network is diffusers' own class, built from its ``config.json``, so its outputs are exactly
diffusers'; this module only adapts the call to diffreg's ``model(x, t, y=None)``. diffusers is
imported when such a model is built, never before: it stays an optional dependency
(``pip install diffreg[diffusers]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

INSTALL_HINT = "install it with: pip install 'diffreg[diffusers]'"
#: Bounds on a UNet2DModel config.json, checked before diffusers builds anything: a hostile config
#: must not hang the loader (``layers_per_block = 1e6``) or allocate from its numbers alone (a
#: ``num_class_embeds = 1e10`` embedding); real models are far inside them.
MAX_CONFIG_INT = 1 << 20
MAX_LAYERS_PER_BLOCK = 64
MAX_LIST_LENGTH = 32


def check_unet_config(config: Mapping[str, Any]) -> None:
    """Refuse a UNet2DModel config whose integers exceed :data:`MAX_CONFIG_INT` (channels, classes,
    sizes), whose ``layers_per_block`` exceeds :data:`MAX_LAYERS_PER_BLOCK`, or whose lists are
    longer than :data:`MAX_LIST_LENGTH` (block types, channels per block).

    Raises:
        ValueError: naming the key, the value and the bound.
    """
    for key, value in config.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)) and len(value) > MAX_LIST_LENGTH:
            raise ValueError(f"diffusers_unet2d: config {key} has {len(value)} entries; at most {MAX_LIST_LENGTH}")
        bound = MAX_LAYERS_PER_BLOCK if key == "layers_per_block" else MAX_CONFIG_INT
        for v in values:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > bound:
                raise ValueError(f"diffusers_unet2d: config {key} = {value!r} is out of bounds (at most {bound:,})")


def require_diffusers(what: str) -> Any:
    """Import and return the ``diffusers`` module, or raise ImportError saying what needs it and
    how to install it."""
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError(f"{what} needs the optional package 'diffusers' ({exc}); {INSTALL_HINT}") from None
    return diffusers


class DiffusersUNet2D(nn.Module):
    """diffusers' ``UNet2DModel`` (Ho et al. 2020's UNet as diffusers implements it), called as
    ``model(x, t, y=None)``.

    Args:
        config: the UNet's ``config.json`` (``_class_name`` and other ``_``-keys are ignored).
        diffusers_version: the diffusers version that wrote the config (recorded, informational).

    Input: ``x`` float ``[N, in_channels, H, W]``; ``t`` ``[N]`` timesteps (diffusers' scheduler
    passes the training-process index, as diffreg does); ``y`` int64 ``[N]`` class labels when the
    config has ``num_class_embeds`` (there is no null class). Output: ``[N, out_channels, H, W]``.
    The diffusers module is ``self.unet``; state-dict keys are diffusers' with a ``unet.`` prefix.

    Raises:
        ImportError: diffusers is not installed (with the command that installs it).
        ValueError: ``config`` is not a UNet2DModel configuration, is out of the bounds of
        :func:`check_unet_config`, or diffusers cannot build it.
    """

    def __init__(self, config: Mapping[str, Any], diffusers_version: str | None = None):
        super().__init__()
        if not isinstance(config, Mapping):
            raise ValueError(f"diffusers_unet2d: config must be the UNet's config.json as a table, got {config!r}")
        name = config.get("_class_name", "UNet2DModel")
        if name != "UNet2DModel":
            raise ValueError(f"diffusers_unet2d holds a UNet2DModel, not a {name}")
        diffusers = require_diffusers("a diffusers UNet2DModel")
        self.config = {k: v for k, v in config.items() if not k.startswith("_")}
        self.diffusers_version = diffusers_version
        check_unet_config(self.config)
        try:
            self.unet = diffusers.UNet2DModel.from_config(self.config)
        except (ValueError, TypeError):
            raise
        except Exception as exc:  # diffusers' own checks are partial: IndexError, ZeroDivisionError, ...
            raise ValueError(
                f"diffusers_unet2d: diffusers cannot build a UNet2DModel from this config ({type(exc).__name__}: {exc})"
            ) from None
        size = self.unet.config.sample_size
        self.in_channels = self.unet.config.in_channels
        self.image_size = size if isinstance(size, int) else tuple(size)
        self.num_classes = self.unet.config.num_class_embeds

    @property
    def null_class(self) -> None:
        """diffusers' class embedding has no "no label" row: ``None``."""
        return None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes is not None and y is None:
            raise ValueError("this diffusers UNet2DModel is class-conditional: pass labels y")
        if self.num_classes is None and y is not None:
            raise ValueError("this diffusers UNet2DModel is unconditional but got labels y")
        return self.unet(x, t, class_labels=y, return_dict=False)[0]
