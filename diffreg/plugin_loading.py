"""Finding plugins and running their code without letting them break the host.

Used by :class:`diffreg.registry.Registry`: :func:`discover` lists the entry points of group
``diffreg`` (an installed distribution whose files are not UTF-8 cannot break it), :func:`select`
applies ``DIFFREG_LOAD_PLUGINS`` / ``DIFFREG_DISABLE_PLUGINS`` before anything is imported,
:func:`run_plugin_code` turns whatever plugin code raises (``SystemExit`` included) into
:class:`SkipPlugin` except a real Ctrl-C, and :func:`make_register` is the ``register`` callable
the hooks receive, which validates names, factories and class metadata. The records the
registry keeps (:class:`Component`, :class:`PluginInfo`, :class:`PluginFailure`) live here too.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.metadata as importlib_metadata
import re
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import attrs
import pluggy

from diffreg import hookspecs
from diffreg.errors import closest

ENTRY_POINT_GROUP = "diffreg"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.\-]*")  # component names (fullmatch)
PLUGIN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")  # plugin names (fullmatch)
_loading = threading.local()  # .plugin: the plugin whose code this thread is running

BUILTIN_PLUGIN = "diffreg"


@attrs.frozen
class Component:
    """One registered component: what :func:`diffreg.registry.get` returns.

    Attributes: ``kind`` (one of :data:`diffreg.registry.KINDS`), ``name`` (bare name), ``plugin``
    (the plugin's name: its entry-point name, or ``"diffreg"`` for built-ins), ``factory``,
    ``distribution`` and ``version`` (the installed distribution it came from, or ``None`` for an
    ad-hoc plugin), ``metadata`` (as passed to ``register``, plus the kind's class attributes).
    """

    kind: str
    name: str
    plugin: str
    factory: Callable[..., Any] = attrs.field(eq=False)
    distribution: str | None = None
    version: str | None = None
    metadata: Mapping[str, Any] = attrs.field(factory=dict, eq=False)

    @property
    def qualified_name(self) -> str:
        """``<plugin>:<name>``, which always resolves to this component."""
        return f"{self.plugin}:{self.name}"

    @property
    def builtin(self) -> bool:
        """Whether this component comes with diffreg itself."""
        return self.plugin == BUILTIN_PLUGIN


@attrs.frozen
class PluginInfo:
    """A loaded plugin: its name, distribution, version, module, the components it registered, and
    its other names (``aliases``: a second entry point to the same module, a test's name for it)."""

    name: str
    distribution: str | None
    version: str | None
    module: str
    components: tuple[Component, ...]
    aliases: tuple[str, ...] = ()


@attrs.frozen
class PluginFailure:
    """A plugin that was skipped, and why (``reason`` is one line meant for a person)."""

    name: str
    distribution: str | None
    version: str | None
    reason: str


class Entry(NamedTuple):
    """One entry point of group ``diffreg``: ``name = value`` in ``distribution`` ``version``."""

    name: str
    value: str
    distribution: str
    version: str | None
    load: Callable[[], object]


class SkipPlugin(Exception):
    """A plugin failed; the message (one line) is the reason."""


def normalize(name: str) -> str:
    """A plugin or distribution name compared ignoring case and runs of ``-``, ``_``, ``.``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def loading_plugin() -> str | None:
    """The plugin whose code this thread is running (importing it or calling its hooks), or None."""
    return getattr(_loading, "plugin", None)


def _identity(dist: importlib_metadata.Distribution) -> tuple[str, str | None]:
    """A distribution's name and version; from its folder name when its METADATA is unreadable."""
    try:
        name, version = dist.metadata["Name"], dist.version
        if name:
            return name, version
    except Exception:  # e.g. METADATA that is not UTF-8: never let another package break diffreg
        pass
    folder = getattr(getattr(dist, "_path", None), "name", "")
    match = re.fullmatch(r"([^-]+)(?:-([^-]+))?(?:-[^-]+)*\.(?:dist|egg)-info", folder)
    return (match[1], match[2]) if match else (folder or "?", None)


def discover(debug: Callable[[str], None]) -> list[Entry]:
    """Entry points of group ``diffreg``, sorted by distribution then name. A distribution shadowed
    by an earlier one of the same name on ``sys.path`` is left out (as importlib does); one whose
    entry points cannot be read is skipped (said under ``DIFFREG_DEBUG``)."""
    entries, seen = [], set()
    for dist in importlib_metadata.distributions():
        try:
            eps = [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
        except Exception as exc:
            debug(f"cannot read the entry points of {getattr(dist, '_path', dist)}: {exc}")
            continue
        name, version = _identity(dist) if eps else ("", None)
        if eps and normalize(name) not in seen:
            seen.add(normalize(name))
            entries += [Entry(ep.name, ep.value, name, version, ep.load) for ep in eps]
    return sorted(entries, key=lambda e: (normalize(e.distribution), e.name))


def select(entries: list[Entry], env: Mapping[str, str]) -> tuple[list[Entry], list[str]]:
    """The entries the allow/deny lists let through, and one message per list item matching none.

    Items are entry-point or distribution names, compared with :func:`normalize`, and may be shell
    patterns (``*`` is every plugin). An allow-list that is set but blank lets none through.
    """

    def items(key: str) -> list[str] | None:
        return None if key not in env else [normalize(i.strip()) for i in env[key].split(",") if i.strip()]

    def hits(keys: set[str], patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(k, p) for k in keys for p in patterns)

    allow, deny = items("DIFFREG_LOAD_PLUGINS"), items("DIFFREG_DISABLE_PLUGINS") or []
    chosen = [
        e
        for e in entries
        if not hits({normalize(e.name), normalize(e.distribution)}, deny)
        and (allow is None or hits({normalize(e.name), normalize(e.distribution)}, allow))
    ]
    keys = {normalize(k) for e in entries for k in (e.name, e.distribution)}
    known = ", ".join(sorted({f"{e.name} ({e.distribution})" for e in entries})) or "none"
    unmatched = []
    for var, patterns in (("DIFFREG_LOAD_PLUGINS", allow or []), ("DIFFREG_DISABLE_PLUGINS", deny)):
        for pattern in (p for p in patterns if not hits(keys, [p])):
            hint = closest(pattern, keys)
            unmatched.append(
                f"{var} names {pattern!r}, which matches no installed plugin (installed: {known})"
                + (f"; did you mean {hint!r}?" if hint else "")
            )
    return chosen, unmatched


@contextlib.contextmanager
def watch_interrupts() -> Iterator[dict[str, bool]]:
    """Tell a real Ctrl-C (SIGINT, seen here) from a ``KeyboardInterrupt`` a plugin raises itself."""
    seen = {"sigint": False}
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None

    def handler(signum, frame):
        seen["sigint"] = True
        if previous != signal.SIG_IGN:
            (previous if callable(previous) else signal.default_int_handler)(signum, frame)

    installed = False
    if previous is not None:  # None: not the main thread, or a handler set outside Python
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGINT, handler)
            installed = True
    try:
        yield seen
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous)


def run_plugin_code(fn: Callable[[], Any], interrupts: dict[str, bool], plugin: str, what: str) -> Any:
    """``fn()``, run as plugin ``plugin``'s code: anything it raises (``SystemExit``,
    ``GeneratorExit``, its own ``KeyboardInterrupt``) becomes :class:`SkipPlugin` with ``what`` and
    the exception; a real Ctrl-C (seen by :func:`watch_interrupts`) propagates."""
    outer, _loading.plugin = loading_plugin(), plugin
    try:
        return fn()
    except SkipPlugin:
        raise
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) and interrupts["sigint"]:
            raise
        raise SkipPlugin(f"{what} {type(exc).__name__}: {exc}") from exc
    finally:
        _loading.plugin = outer


def unknown_hook_message(hook: str) -> str:
    """The reason for a hook name diffreg does not know, with the closest known one."""
    hint = closest(hook, hookspecs.KIND_HOOKS.values())
    return f"implements unknown hook {hook!r}" + (f"; did you mean {hint!r}?" if hint else "")


def check_hook_functions(pm: pluggy.PluginManager, obj: object) -> None:
    """Reject a ``diffreg_*`` function that pluggy would silently ignore: one not marked
    ``@diffreg.hookimpl`` (known hook name or misspelled)."""
    for attr in dir(obj):
        if not attr.startswith("diffreg_") or pm.parse_hookimpl_opts(obj, attr) is not None:
            continue
        try:
            value = getattr(obj, attr)
        except Exception:
            continue
        if callable(value) and not isinstance(value, type):
            if attr in hookspecs.KIND_HOOKS.values():
                raise SkipPlugin(f"function {attr!r} is not marked @diffreg.hookimpl, so it would never be called")
            raise SkipPlugin(unknown_hook_message(attr))


def class_metadata(kind: hookspecs.Kind, factory: Any) -> dict[str, Any]:
    """The kind's metadata keys that ``factory``'s class defines (not those of the product base)."""
    if not kind.class_metadata or not isinstance(factory, type):
        return {}
    own = [cls for cls in factory.__mro__ if cls not in kind.product_type().__mro__]
    return {key: getattr(factory, key) for key in kind.class_metadata if any(key in vars(cls) for cls in own)}


def make_register(
    kind: hookspecs.Kind, taken: set[tuple[str, str]], add: Callable[[str, Callable[..., Any], dict[str, Any]], None]
) -> Callable[..., None]:
    """The ``register(name, factory, **metadata)`` a hook of ``kind`` receives: it checks the name
    (a valid, new name), the factory (callable) and metadata against the class, then calls
    ``add(name, factory, metadata)``; anything wrong raises :class:`SkipPlugin`."""

    def register(name: str, factory: Callable[..., Any], **metadata: Any) -> None:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise SkipPlugin(
                f"registered an invalid {kind.name} name {name!r} (accepted: lower-case letters, digits, '_', '-', '.')"
            )
        if not callable(factory):
            raise SkipPlugin(f"registered {kind.name} {name!r} with a factory that is not callable")
        if (kind.name, name) in taken:
            raise SkipPlugin(f"registered {kind.name} {name!r} twice")
        declared = class_metadata(kind, factory)
        for key, value in metadata.items():
            if key in declared and declared[key] != value:
                raise SkipPlugin(
                    f"registered {kind.name} {name!r} with {key}={value!r}, but its class says {declared[key]!r}"
                    " (leave it out: it is read from the class)"
                )
        taken.add((kind.name, name))
        add(name, factory, {**declared, **metadata})

    return register
