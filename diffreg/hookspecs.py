"""The plugin contract: the hooks through which every diffreg component is registered.

A plugin is a module (or any object) with functions marked ``@diffreg.hookimpl`` whose names are
the hooks below. It is found through the ``diffreg`` entry-point group::

    # pyproject.toml of a plugin distribution
    [project.entry-points.diffreg]
    my_plugin = "my_package.diffreg_plugin"

and the built-in components of ``diffreg/builtin/`` are registered through exactly these hooks.

Every hook receives one argument, ``register``, a callable::

    register(name: str, factory: Callable[..., Any], **metadata) -> None

``name`` is the component's bare name (lower-case letters, digits, ``_`` and ``-``); the registry
also knows it by its qualified name ``<plugin>:<name>``. ``factory`` is called with the component's
options (keyword arguments from a configuration) and returns the component; its signature is what
options are checked against. ``metadata`` is free-form JSON-able information shown by
``diffreg list`` (for samplers: ``order``, ``nfe_per_step``, ``stochastic``, ``paper``).

A hook must only call ``register``: it runs once per process, when the registry is first used. If it
raises, or registers one name twice, the whole plugin is skipped with a warning naming its
distribution (an error under ``DIFFREG_STRICT_PLUGINS=1``); the host keeps working.

All hooks: since diffreg 0.1.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT_NAME = "diffreg"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[..., None]

#: Component kinds and the hook that registers each one.
KIND_HOOKS: dict[str, str] = {
    "schedule": "diffreg_register_schedules",
    "parameterization": "diffreg_register_parameterizations",
    "variance": "diffreg_register_variances",
    "sampler": "diffreg_register_samplers",
    "loss": "diffreg_register_losses",
    "timestep_sampler": "diffreg_register_timestep_samplers",
    "model": "diffreg_register_models",
}


@hookspec
def diffreg_register_schedules(register: Register) -> None:
    """Register noise schedules (kind ``schedule``).

    The factory is called as ``factory(num_timesteps: int, **options)`` and returns a
    :class:`diffreg.NoiseSchedule`, whose ``betas`` is a float64 array of shape ``[num_timesteps]``
    with every value in ``(0, 1]``.

    Example::

        @hookimpl
        def diffreg_register_schedules(register):
            register("quadratic", QuadraticSchedule, paper="...")
    """


@hookspec
def diffreg_register_parameterizations(register: Register) -> None:
    """Register model mean types (kind ``parameterization``): what the network predicts.

    The factory is called with options and returns a :class:`diffreg.parameterization.MeanType`,
    which turns the raw network output into ``pred_xstart`` and ``pred_eps`` and gives the training
    target. Built-ins: ``eps``, ``x0``, ``v``.
    """


@hookspec
def diffreg_register_variances(register: Register) -> None:
    """Register reverse-process variance types (kind ``variance``).

    The factory is called with options and returns a :class:`diffreg.parameterization.VarianceType`.
    Types with ``learned = True`` double the network's output channels. Built-ins: ``fixed_small``,
    ``fixed_large``, ``learned``, ``learned_range``.
    """


@hookspec
def diffreg_register_samplers(register: Register) -> None:
    """Register samplers (kind ``sampler``).

    The factory is called with the sampler's options (for example ``eta``) and returns a
    :class:`diffreg.Sampler`. Declare ``order``, ``nfe_per_step`` and ``stochastic`` in the metadata
    (they are also class attributes of the sampler); conformance checks read them.
    """


@hookspec
def diffreg_register_losses(register: Register) -> None:
    """Register training losses (kind ``loss``).

    The factory is called with options and returns a :class:`diffreg.loss.Loss`, called by
    ``Diffusion.training_losses`` to produce per-example loss terms.
    """


@hookspec
def diffreg_register_timestep_samplers(register: Register) -> None:
    """Register training timestep samplers (kind ``timestep_sampler``).

    The factory is called as ``factory(num_timesteps: int, **options)`` and returns a
    :class:`diffreg.loss.TimestepSampler`.
    """


@hookspec
def diffreg_register_models(register: Register) -> None:
    """Register model architectures (kind ``model``).

    The factory is called with the architecture's options and returns a ``torch.nn.Module`` called
    as ``model(x, t, **model_kwargs)`` with ``x`` of shape ``[N, C, H, W]`` (or ``[N, D]``) and ``t``
    int64 timesteps of shape ``[N]`` (indices of the original training process). Options are stored
    in checkpoints, so they must be JSON values.
    """
