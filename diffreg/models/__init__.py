"""Reference architectures, registered as plugins of kind ``model`` by :mod:`diffreg.builtin.models`."""

from diffreg.models.mlp import MLPDenoiser
from diffreg.models.unet import UNet

__all__ = ["MLPDenoiser", "UNet"]
