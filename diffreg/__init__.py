"""diffreg: diffusion models where every part of the recipe is a plugin chosen by name.

Public names: :class:`Diffusion`, :class:`DiffusionConfig`, :class:`CheckpointConfig`,
:class:`NoiseSchedule`, :class:`Sampler`, :func:`save_checkpoint`, :func:`load_checkpoint`,
:data:`hookimpl` (for plugins), :mod:`diffreg.registry`, and the errors of :mod:`diffreg.errors`.
"""

from diffreg.hookspecs import hookimpl

__version__ = "0.1.0"

from diffreg import registry
from diffreg.checkpoint import load_checkpoint, save_checkpoint
from diffreg.config import CheckpointConfig, ComponentSpec, DiffusionConfig
from diffreg.diffusion import Diffusion
from diffreg.errors import (
    AmbiguousComponentError,
    CheckpointError,
    ComponentOptionError,
    ConfigError,
    MissingProviderError,
    PluginError,
    PluginWarning,
    SamplingError,
    UnknownComponentError,
)
from diffreg.sampling import Sampler
from diffreg.schedule import NoiseSchedule

__all__ = [
    "AmbiguousComponentError",
    "CheckpointConfig",
    "CheckpointError",
    "ComponentOptionError",
    "ComponentSpec",
    "ConfigError",
    "Diffusion",
    "DiffusionConfig",
    "MissingProviderError",
    "NoiseSchedule",
    "PluginError",
    "PluginWarning",
    "Sampler",
    "SamplingError",
    "UnknownComponentError",
    "__version__",
    "hookimpl",
    "load_checkpoint",
    "registry",
    "save_checkpoint",
]
