"""Weights from other libraries: OpenAI's improved-/guided-diffusion checkpoints and diffusers
folders, to and from diffreg.

- :func:`convert_openai`: an OpenAI UNet state dict + its README flags -> a diffreg checkpoint.
- :func:`load_diffusers`: a diffusers pipeline or UNet folder -> ``(model, diffusion, config)``
  (needs the optional ``diffusers`` package: ``pip install diffreg[diffusers]``).
- :func:`export_diffusers`: a diffreg checkpoint of a diffusers model -> a folder that diffusers'
  ``DDPMPipeline.from_pretrained`` loads.
- :func:`detect_layout`: which of these a file or folder is, for error messages.
"""

from diffreg.convert.diffusers import diffusers_config, export_diffusers, load_diffusers
from diffreg.convert.layout import detect_layout
from diffreg.convert.openai import config_from_flags, convert_openai

__all__ = [
    "config_from_flags",
    "convert_openai",
    "detect_layout",
    "diffusers_config",
    "export_diffusers",
    "load_diffusers",
]
