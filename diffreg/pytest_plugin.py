"""Opt-in pytest fixtures for testing diffreg plugins.

Not loaded automatically (diffreg registers no ``pytest11`` entry point). Enable it in your
project's root ``conftest.py``::

    pytest_plugins = ["diffreg.pytest_plugin"]

or on the command line with ``pytest -p diffreg.pytest_plugin``. Fixtures:

- ``diffreg_registry``: a fresh :class:`diffreg.registry.Registry` holding only the built-ins
  (``entry_points=False``): no installed plugin, no environment variable, can interfere.
- ``register_plugin``: ``register_plugin(obj, name="test-plugin")`` registers a plugin object (a
  module or an object with ``@diffreg.hookimpl`` hooks) in the process-wide registry for the rest of
  the test (through :func:`diffreg.registry.plugin`) and returns its
  :class:`~diffreg.registry.PluginInfo`; it is removed when the test ends, pass or fail.
- ``gaussian_mixture``: a small 2-D :class:`diffreg.testing.GaussianMixture`
  (:meth:`~diffreg.testing.GaussianMixture.example`), with an exact denoiser for any diffusion.

The functions behind the fixtures (:func:`builtin_registry`, :class:`PluginRegistrar`) can be used
without pytest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from diffreg import registry
from diffreg.testing import GaussianMixture

__all__ = ["PluginRegistrar", "builtin_registry", "diffreg_registry", "gaussian_mixture", "register_plugin"]


def builtin_registry() -> registry.Registry:
    """A new :class:`~diffreg.registry.Registry` with the built-in plugins only (no entry points).

    It is independent of the process-wide registry: components created from it, and plugins added
    to it with :meth:`~diffreg.registry.Registry.add_plugin` or
    :meth:`~diffreg.registry.Registry.plugin`, are not seen by ``diffreg.registry.create``.
    """
    return registry.Registry(entry_points=False)


class PluginRegistrar:
    """Registers plugins in the process-wide registry until :meth:`close`.

    Call as ``registrar(obj, name="test-plugin")``: enters :func:`diffreg.registry.plugin` for
    ``obj`` and returns its :class:`~diffreg.registry.PluginInfo`. :meth:`close` removes every plugin
    it registered, the last one first. Also a context manager.

    Raises (on call):
        diffreg.PluginError: the plugin was rejected (bad hook, duplicate name, a hook that raised).
        ValueError: a plugin of that name is already loaded.
    """

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()

    def __call__(self, plugin: object, name: str = "test-plugin") -> registry.PluginInfo:
        return self._stack.enter_context(registry.plugin(plugin, name))

    def close(self) -> None:
        """Unregister every plugin registered through this object (idempotent)."""
        self._stack.close()

    def __enter__(self) -> PluginRegistrar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def diffreg_registry() -> registry.Registry:
    """A fresh registry holding only diffreg's built-in components (see :func:`builtin_registry`)."""
    return builtin_registry()


@pytest.fixture
def register_plugin() -> Iterator[PluginRegistrar]:
    """``register_plugin(obj, name="test-plugin") -> PluginInfo``: register ``obj`` in the
    process-wide registry for this test only (see :class:`PluginRegistrar`)."""
    with PluginRegistrar() as registrar:
        yield registrar


@pytest.fixture
def gaussian_mixture() -> GaussianMixture:
    """A 3-component 2-D :class:`~diffreg.testing.GaussianMixture` (float64 parameters)."""
    return GaussianMixture.example(2)
