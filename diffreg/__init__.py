"""diffreg: diffusion models where every part of the recipe is a plugin chosen by name.

Public names: :class:`Diffusion`, :class:`DiffusionConfig`, :class:`CheckpointConfig`,
:class:`NoiseSchedule`, :class:`Sampler`, :func:`save_checkpoint`, :func:`load_checkpoint`,
:data:`hookimpl` (for plugins), :mod:`diffreg.registry`, and the errors of :mod:`diffreg.errors`.
"""

from diffreg.hookspecs import hookimpl

__version__ = "0.1.0"

from diffreg import registry  # noqa: E402
from diffreg.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from diffreg.config import CheckpointConfig, ComponentSpec, DiffusionConfig  # noqa: E402
from diffreg.diffusion import Diffusion  # noqa: E402
from diffreg.errors import (  # noqa: E402
    AmbiguousComponentError,
    CheckpointError,
    ComponentOptionError,
    ConfigError,
    PluginError,
    PluginWarning,
    SamplingError,
    UnknownComponentError,
)
from diffreg.sampler import Sampler  # noqa: E402
from diffreg.schedule import NoiseSchedule  # noqa: E402

__all__ = [
    "AmbiguousComponentError",
    "CheckpointConfig",
    "CheckpointError",
    "ComponentOptionError",
    "ComponentSpec",
    "ConfigError",
    "Diffusion",
    "DiffusionConfig",
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
