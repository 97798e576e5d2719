"""Built-in model architectures: ``unet`` (ADM-style), ``mlp`` (for 2-D toy data) and
``diffusers_unet2d`` (diffusers' UNet2DModel; needs the optional diffusers package when built)."""

from diffreg import hookimpl
from diffreg.convert.diffusers_model import DiffusersUNet2D
from diffreg.models import MLPDenoiser, UNet


@hookimpl
def diffreg_register_models(register):
    register("unet", UNet, paper="Dhariwal & Nichol 2021")
    register("mlp", MLPDenoiser)
    register("diffusers_unet2d", DiffusersUNet2D, paper="Ho et al. 2020 (diffusers' implementation)")
