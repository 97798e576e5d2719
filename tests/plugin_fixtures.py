"""Test helpers: write real, installed-looking plugin distributions for ``diffreg`` entry points.

``plugin_dist`` (a pytest fixture) returns a :class:`PluginDistFactory`. Each call writes one
distribution into its own directory on ``sys.path``:

    <tmp>/site-N/<module>/__init__.py                  the plugin module (source given by the test)
    <tmp>/site-N/<dist>-<version>.dist-info/METADATA   Name / Version
    <tmp>/site-N/<dist>-<version>.dist-info/entry_points.txt
                                                       [diffreg]  <entry_point> = <module>

so ``importlib.metadata.entry_points(group="diffreg")`` finds it exactly as it finds a pip-installed
plugin. Every generated module touches ``<tmp>/site-N/<module>.imported`` when it is imported, so a
test can prove whether a plugin was imported at all (:meth:`PluginDist.was_imported`). On teardown
the generated modules are removed from ``sys.modules`` (``monkeypatch`` restores ``sys.path``).

Import into a test module with ``from plugin_fixtures import plugin_dist``.
"""

from __future__ import annotations

import importlib
import itertools
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Prepended to every generated plugin module: records that the module was imported.
_IMPORT_MARKER = (
    "import pathlib as _pathlib\n"
    "_pathlib.Path(__file__).parent.with_name(__name__ + '.imported').write_text('imported')\n"
)


def registering_source(
    *names: str,
    hook: str = "diffreg_register_samplers",
    base: str = "diffreg.builtin.samplers.DDIM",
    **metadata: object,
) -> str:
    """Source of a well-behaved plugin module that registers ``names`` through ``hook``.

    Each name gets its own class deriving from ``base`` (so the factories are distinct objects);
    ``metadata`` is passed to every ``register`` call.
    """
    module, _, cls = base.rpartition(".")
    lines = ["import diffreg", f"from {module} import {cls} as _Base", ""]
    for i, _ in enumerate(names):
        lines.append(f"class Component{i}(_Base):\n    pass\n")
    lines.append("@diffreg.hookimpl")
    lines.append(f"def {hook}(register):")
    meta = "".join(f", {k}={v!r}" for k, v in metadata.items())
    for i, name in enumerate(names):
        lines.append(f"    register({name!r}, Component{i}{meta})")
    if not names:
        lines.append("    pass")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PluginDist:
    """One written plugin distribution."""

    module: str
    entry_point: str
    distribution: str
    version: str
    site: Path

    def was_imported(self) -> bool:
        """Whether the plugin module has been executed (the import marker exists)."""
        return (self.site / f"{self.module}.imported").exists()


class PluginDistFactory:
    """Writes plugin distributions under ``root``; each one gets its own ``sys.path`` entry."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self._root = root
        self._monkeypatch = monkeypatch
        self._counter = itertools.count()
        self.modules: list[str] = []

    def __call__(
        self,
        module: str,
        source: str,
        *,
        distribution: str | None = None,
        version: str = "1.0.0",
        entry_point: str | None = None,
        more_entry_points: tuple[str, ...] = (),
        group: str = "diffreg",
        metadata: bytes | None = None,
        entry_points_text: bytes | None = None,
    ) -> PluginDist:
        """Write package ``module`` with ``source`` as its ``__init__.py``, and its dist-info.

        ``distribution`` defaults to ``<module>-dist``; ``entry_point`` (the name in the
        ``[diffreg]`` group) defaults to ``module``; ``more_entry_points`` are further names for the
        same module. ``group`` other than ``diffreg`` makes an unrelated distribution. ``metadata``
        and ``entry_points_text`` replace the generated files with these bytes (e.g. not UTF-8).
        """
        distribution = distribution or f"{module}-dist"
        entry_point = entry_point or module
        site = self._root / f"site-{next(self._counter)}"
        package = site / module
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(_IMPORT_MARKER + textwrap.dedent(source))
        dist_info = site / f"{re.sub(r'[-.]+', '_', distribution)}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_bytes(
            metadata or f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n".encode()
        )
        lines = "".join(f"{name} = {module}\n" for name in (entry_point, *more_entry_points))
        (dist_info / "entry_points.txt").write_bytes(entry_points_text or f"[{group}]\n{lines}".encode())
        self.modules.append(module)
        self._monkeypatch.syspath_prepend(str(site))  # also invalidates import caches
        importlib.invalidate_caches()
        return PluginDist(module, entry_point, distribution, version, site)

    def cleanup(self) -> None:
        for name in list(sys.modules):
            if any(name == m or name.startswith(m + ".") for m in self.modules):
                del sys.modules[name]


@pytest.fixture
def plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Factory: ``plugin_dist("myplug", source, distribution="myplug-dist", version="1.0")``."""
    factory = PluginDistFactory(tmp_path, monkeypatch)
    yield factory
    factory.cleanup()
