"""The plugin contract: every hook, what it passes, what each factory must return. Read this file.

A plugin is a module (or any object) with functions marked ``@diffreg.hookimpl`` and named after
the hooks below. An installed plugin is found through the ``diffreg`` entry-point group::

    # pyproject.toml of a plugin distribution
    [project.entry-points.diffreg]
    my_plugin = "my_package.diffreg_plugin"

The built-in components of ``diffreg/builtin/`` are registered through exactly these hooks.

**Every hook** receives one argument, ``register``, a callable::

    register(name: str, factory: Callable[..., Product], **metadata) -> None

- ``name``: the component's bare name (lower-case letters, digits, ``_``, ``-``, ``.``); the
  registry also knows it as ``<plugin>:<name>`` and ``<distribution>:<name>``.
- ``factory``: called with the component's options (keyword arguments from a configuration) and
  returns the component, which must be an instance of the kind's ``product`` (checked when it is
  created: a wrong type is a :class:`~diffreg.errors.PluginError` naming the plugin). Its signature
  is what options are checked against, so give options defaults and annotations.
- ``metadata``: free-form JSON-able information shown by ``diffreg list`` (``paper=...``). For a
  kind with ``class_metadata`` (samplers: ``order``, ``nfe_per_step``, ``stochastic``) those keys
  are read from the factory's class attributes; do not repeat them (a different value is an error).

A hook must only call ``register``. Hooks run once per process, when the registry is first used;
they must not use the registry themselves (it is not complete yet: that is an error). If a hook
raises (anything, ``SystemExit`` included), or registers one name twice, the whole plugin is skipped
with a warning naming its distribution (an error under ``DIFFREG_STRICT_PLUGINS=1``).

**Adding a kind** is one row of :data:`COMPONENT_KINDS`: the hook ``diffreg_register_<plural>`` is
made from it (with the row's text as its documentation), and the registry, ``diffreg list`` and the
product check follow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

import pluggy

PROJECT_NAME = "diffreg"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[..., None]


class Kind(NamedTuple):
    """One component kind: its ``name``, the ``hook`` that registers it, the ``product`` class every
    factory must return (``"module:Class"``, imported when first needed), the diffreg version that
    added it (``since``), class attributes read as metadata, and the hook's documentation."""

    name: str
    hook: str
    product: str
    since: str
    doc: str
    class_metadata: tuple[str, ...] = ()

    def product_type(self) -> type:
        """The class the factories of this kind must return (imported on first use)."""
        module, _, attr = self.product.partition(":")
        return getattr(importlib.import_module(module), attr)


#: Every component kind, in the order ``diffreg list`` shows them.
COMPONENT_KINDS: tuple[Kind, ...] = (
    Kind("schedule", "diffreg_register_schedules", "diffreg.schedule:NoiseSchedule", "0.1", """
    Noise schedules: ``factory(num_timesteps: int, **options)`` returns a :class:`diffreg.NoiseSchedule`
    whose ``betas`` is a float64 array of shape ``[num_timesteps]`` with every value in ``(0, 1]``
    (subclass it and implement ``compute_betas``), or a continuous process, a
    :class:`diffreg.processes.ContinuousProcess` (alpha and sigma at any real t, no betas;
    ``num_timesteps`` is ignored): built-ins ``rectified_flow``, ``edm``, ``vp``.

    Example::

        @diffreg.hookimpl
        def diffreg_register_schedules(register):
            register("quadratic", QuadraticSchedule, paper="...")
    """),
    Kind("parameterization", "diffreg_register_parameterizations", "diffreg.parameterization:Parameterization", "0.1", """
    What the network predicts: ``factory(**options)`` returns a
    :class:`diffreg.parameterization.Parameterization` (old name ``MeanType``, an alias), which
    turns the mean channels of the raw output into ``pred_xstart`` and ``pred_eps`` and gives the
    training target. A diffusion pairs it with a variance type in a
    :class:`diffreg.parameterization.MeanAndVariance` (``diffusion.parameterization``). Built-ins:
    ``eps``, ``x0``, ``v``, ``flow``, ``edm``.

    Example::

        @diffreg.hookimpl
        def diffreg_register_parameterizations(register):
            register("eps", EpsPrediction, paper="Ho et al. 2020")
    """),
    Kind("variance", "diffreg_register_variances", "diffreg.parameterization:VarianceType", "0.1", """
    Reverse-process variances: ``factory(**options)`` returns a
    :class:`diffreg.parameterization.VarianceType`; a type with ``learned = True`` doubles the
    network's output channels. Built-ins: ``fixed_small``, ``fixed_large``, ``learned``,
    ``learned_range``.

    Example::

        @diffreg.hookimpl
        def diffreg_register_variances(register):
            register("fixed_small", FixedSmallVariance)
    """, ("learned",)),
    Kind("sampler", "diffreg_register_samplers", "diffreg:Sampler", "0.1", """
    Samplers: ``factory(**options)`` (for example ``eta``) returns a :class:`diffreg.Sampler`, whose
    class attributes ``order``, ``nfe_per_step`` and ``stochastic`` are its declared properties
    (read from the class; the conformance kit checks them).

    Example::

        @diffreg.hookimpl
        def diffreg_register_samplers(register):
            register("plain_ddim", PlainDDIM, paper="Song et al. 2021")
    """, ("order", "nfe_per_step", "stochastic")),
    Kind("loss", "diffreg_register_losses", "collections.abc:Callable", "0.1", """
    Training losses: ``factory(**options)`` returns a :class:`diffreg.loss.Loss` (or any callable
    with its ``__call__`` signature; only callability is checked at creation), called by
    ``Diffusion.training_losses`` to produce per-example loss terms.

    Example::

        @diffreg.hookimpl
        def diffreg_register_losses(register):
            register("pseudo_huber", PseudoHuberLoss, paper="Song & Dhariwal 2023")
    """),
    Kind("timestep_sampler", "diffreg_register_timestep_samplers", "diffreg.loss:TimestepSampler", "0.1", """
    Training timestep samplers: ``factory(num_timesteps: int, **options)`` returns a
    :class:`diffreg.loss.TimestepSampler`.

    Example::

        @diffreg.hookimpl
        def diffreg_register_timestep_samplers(register):
            register("uniform", UniformSampler)
    """),
    Kind("model", "diffreg_register_models", "torch.nn:Module", "0.1", """
    Architectures: ``factory(**options)`` returns a ``torch.nn.Module`` called as
    ``model(x, t, **model_kwargs)`` with ``x`` of shape ``[N, C, H, W]`` (or ``[N, D]``) and ``t``
    of shape ``[N]``: int64 timesteps of the original training process, or float32 for a level
    between two timesteps (``Process.model_input``). Options are
    stored in checkpoints, so they must be JSON values.

    Example::

        @diffreg.hookimpl
        def diffreg_register_models(register):
            register("mlp", MLPDenoiser)
    """),
    Kind("grid", "diffreg_register_grids", "diffreg.sampling.grid:Grid", "0.2", """
    Noise-level grids, which levels a sampler visits: ``factory(**options)`` (for example ``rho``)
    returns a :class:`diffreg.sampling.Grid`; ``grid(process, steps)`` gives ``steps`` strictly
    decreasing times of the :class:`diffreg.process.Process` (subclass it and implement ``times``).
    Built-ins: ``leading``, ``trailing``, ``linspace``, ``karras``, ``exponential``
    (= ``lambda_uniform``), ``explicit``.

    Example::

        class UniformTime(diffreg.sampling.Grid):
            def times(self, process, steps):
                return numpy.linspace(process.t_max, process.t_min, steps)

        @diffreg.hookimpl
        def diffreg_register_grids(register):
            register("uniform_time", UniformTime)
    """),
    Kind("guidance", "diffreg_register_guidances", "diffreg.sampling.guidance:Guidance", "0.2", """
    Guidance methods (classifier-free guidance and its variants): ``factory(**options)`` (for example
    ``phi``) returns a :class:`diffreg.sampling.guidance.Guidance`, whose ``combine(cond, uncond, x,
    level, call)`` turns the conditional and unconditional predictions at a noise level into the
    guided ``(pred_xstart, pred_eps)``; scale w: 0 unconditional, 1 conditional. Built-ins: ``cfg``,
    ``cfg_rescale``, ``interval``, ``apg``, ``cfg_zero_star``, ``cfgpp``, ``autoguidance``.

    Example::

        class Unconditional(diffreg.sampling.guidance.Guidance):
            def combine(self, cond, uncond, x, level, call):
                return uncond.pred_xstart, uncond.pred_eps

        @diffreg.hookimpl
        def diffreg_register_guidances(register):
            register("unconditional", Unconditional)
    """),
)

#: kind name -> :class:`Kind`.
KINDS: dict[str, Kind] = {kind.name: kind for kind in COMPONENT_KINDS}
#: kind name -> hook name.
KIND_HOOKS: dict[str, str] = {kind.name: kind.hook for kind in COMPONENT_KINDS}


def _make_hookspec(kind: Kind) -> Callable[[Register], None]:
    def spec(register: Register) -> None:
        pass

    spec.__name__ = spec.__qualname__ = kind.hook
    spec.__doc__ = f"Register components of kind ``{kind.name}`` (since diffreg {kind.since}).\n{kind.doc}"
    return hookspec(spec)


for _kind in COMPONENT_KINDS:
    globals()[_kind.hook] = _make_hookspec(_kind)
del _kind

