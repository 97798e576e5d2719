"""Built-in model architectures: ``unet`` (ADM-style) and ``mlp`` (for 2-D toy data)."""

from diffreg import hookimpl
from diffreg.models import MLPDenoiser, UNet


@hookimpl
def diffreg_register_models(register):
    register("unet", UNet, paper="Dhariwal & Nichol 2021")
    register("mlp", MLPDenoiser)
