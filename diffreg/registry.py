"""Plugin discovery and component lookup by name.

The registry is built on first use: the built-in plugins of :mod:`diffreg.builtin` first, then the
entry points of group ``diffreg`` sorted by distribution and entry-point name. Every plugin goes
through the same door (:func:`Registry.add_plugin`): it is imported, its hooks are validated against
:mod:`diffreg.hookspecs`, and its components are collected; a plugin that fails at any point is
skipped whole, with a :class:`~diffreg.errors.PluginWarning` naming its distribution and the reason,
and kept in :func:`failures`.

Environment (read when the registry is built, before any plugin is imported):

- ``DIFFREG_LOAD_PLUGINS``: comma-separated allow-list of third-party plugins (entry-point or
  distribution names); set but blank means "no third-party plugins".
- ``DIFFREG_DISABLE_PLUGINS``: comma-separated deny-list, same names.
- ``DIFFREG_STRICT_PLUGINS=1``: a failing plugin raises :class:`~diffreg.errors.PluginError`.

Names: ``plugin:name`` (plugin = entry-point or distribution name; ``diffreg`` for built-ins) always
resolves; a bare name resolves to the built-in first, then to the single plugin that has it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata as importlib_metadata
import inspect
import numbers
import os
import re
import threading
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import numpy as np
import pluggy

from diffreg import hookspecs
from diffreg.errors import (
    AmbiguousComponentError,
    ComponentOptionError,
    PluginError,
    PluginWarning,
    UnknownComponentError,
    closest,
)
from diffreg.hookspecs import KIND_HOOKS

ENTRY_POINT_GROUP = "diffreg"
BUILTIN_PLUGIN = "diffreg"
KINDS: tuple[str, ...] = tuple(KIND_HOOKS)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


@attrs.frozen
class Component:
    """One registered component: what :func:`get` returns.

    Attributes: ``kind`` (one of :data:`KINDS`), ``name`` (bare name), ``plugin`` (the plugin's
    name: its entry-point name, or ``"diffreg"`` for built-ins), ``factory``, ``distribution`` and
    ``version`` (the installed distribution it came from, or ``None`` for an ad-hoc plugin),
    ``metadata`` (as passed to ``register``).
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
    """A loaded plugin: its name, distribution, version, module and the components it registered."""

    name: str
    distribution: str | None
    version: str | None
    module: str
    components: tuple[Component, ...]


@attrs.frozen
class PluginFailure:
    """A plugin that was skipped, and why (``reason`` is one line meant for a person)."""

    name: str
    distribution: str | None
    version: str | None
    reason: str


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _env_list(env: Mapping[str, str], key: str) -> set[str] | None:
    if key not in env:
        return None
    return {_normalize(item.strip()) for item in env[key].split(",") if item.strip()}


class _SkipPlugin(Exception):
    """Internal: a plugin failed; the message is the reason."""


class Registry:
    """A set of plugins and the components they registered.

    ``Registry()`` discovers plugins lazily on first use; pass ``entry_points=False`` for one that
    holds only the built-ins (the testing fixture does). ``env`` defaults to ``os.environ``.
    """

    def __init__(self, *, entry_points: bool = True, env: Mapping[str, str] | None = None):
        self._use_entry_points = entry_points
        self._env = os.environ if env is None else env
        self._lock = threading.RLock()
        self._built = False
        self._building = False
        self._pm: pluggy.PluginManager
        self._plugins: dict[str, PluginInfo]
        self._failures: list[PluginFailure]
        self._components: dict[str, list[Component]]
        self._reset_state()

    # -- discovery ---------------------------------------------------------------------------

    @property
    def strict(self) -> bool:
        """Whether DIFFREG_STRICT_PLUGINS turns plugin failures into errors."""
        return self._env.get("DIFFREG_STRICT_PLUGINS", "").strip().lower() not in ("", "0", "false", "no", "off")

    def _ensure_built(self) -> None:
        if self._built:
            return
        with self._lock:
            if self._built:
                return
            from diffreg import __version__
            from diffreg.builtin import DEFAULT_PLUGINS

            self._building = True
            try:
                for module_name in DEFAULT_PLUGINS:
                    self._add(
                        functools.partial(importlib.import_module, module_name),
                        name=BUILTIN_PLUGIN,
                        distribution="diffreg",
                        version=__version__,
                        module="diffreg.builtin",
                    )
                if self._use_entry_points:
                    self._load_entry_points()
            except BaseException:
                # strict mode (or an interrupt): leave nothing half-built; the next use retries
                self._reset_state()
                raise
            finally:
                self._building = False
            self._built = True

    def _reset_state(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._plugins = {}
        self._failures = []
        self._components = {kind: [] for kind in KINDS}

    def _load_entry_points(self) -> None:
        allow = _env_list(self._env, "DIFFREG_LOAD_PLUGINS")
        deny = _env_list(self._env, "DIFFREG_DISABLE_PLUGINS") or set()
        seen: set[tuple[str, str]] = set()
        found = []
        for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
            if (ep.name, ep.value) in seen:
                continue
            seen.add((ep.name, ep.value))
            found.append((dist_name or "", ep.name, ep, dist_name, version))
        for _, ep_name, ep, dist_name, version in sorted(found, key=lambda item: item[:2]):
            keys = {_normalize(ep_name)} | ({_normalize(dist_name)} if dist_name else set())
            if keys & deny or (allow is not None and not keys & allow):
                continue  # never imported
            if _normalize(ep_name) == BUILTIN_PLUGIN:
                self._fail(
                    ep_name,
                    dist_name,
                    version,
                    f"the plugin name {BUILTIN_PLUGIN!r} is reserved for the built-ins; rename the entry point",
                )
                continue
            self._add(ep.load, name=ep_name, distribution=dist_name, version=version, module=ep.value)

    def add_plugin(
        self,
        plugin: object,
        name: str,
        *,
        distribution: str | None = None,
        version: str | None = None,
    ) -> PluginInfo | None:
        """Register an already-imported plugin object (a module, class or instance with hooks).

        Returns its :class:`PluginInfo`, or ``None`` when it was skipped (see :func:`failures`).
        Raises :class:`~diffreg.errors.PluginError` under strict mode, and ``ValueError`` when a
        plugin of that name is already loaded.
        """
        self._ensure_built()
        with self._lock:
            if name in self._plugins or _normalize(name) == BUILTIN_PLUGIN:
                raise ValueError(f"a plugin named {name!r} is already loaded (or the name is reserved)")
            module = getattr(plugin, "__name__", type(plugin).__name__)
            return self._add(lambda: plugin, name, distribution, version, module)

    def remove_plugin(self, name: str) -> None:
        """Unload plugin ``name`` and forget its components. Raises ``KeyError`` if not loaded."""
        with self._lock:
            info = self._plugins.pop(name)
            for component in info.components:
                self._components[component.kind].remove(component)
            obj = self._pm.get_plugin(name)
            if obj is not None:
                self._pm.unregister(obj)

    def _add(
        self,
        loader: Callable[[], object],
        name: str,
        distribution: str | None,
        version: str | None,
        module: str,
    ) -> PluginInfo | None:
        pm_name = name if name not in self._plugins else f"{name}#{len(self._pm.get_plugins())}"
        try:
            staged = self._collect(loader, pm_name, name, distribution, version)
        except _SkipPlugin as exc:
            self._fail(name, distribution, version, str(exc))
            return None
        previous = self._plugins.get(name)
        components = (previous.components if previous else ()) + tuple(staged)
        info = PluginInfo(name, distribution, version, module, components)
        self._plugins[name] = info
        for component in staged:
            self._components[component.kind].append(component)
        return info

    def _collect(
        self,
        loader: Callable[[], object],
        pm_name: str,
        name: str,
        distribution: str | None,
        version: str | None,
    ) -> list[Component]:
        try:
            obj = loader()
        except Exception as exc:
            raise _SkipPlugin(f"import failed: {type(exc).__name__}: {exc}") from exc
        _check_hook_names(obj)
        try:
            self._pm.register(obj, name=pm_name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise _SkipPlugin(f"invalid hook: {exc}") from exc
        staged: list[Component] = []
        already = {(c.kind, c.name) for c in (self._plugins[name].components if name in self._plugins else ())}
        try:
            unknown = [hc.name for hc in self._pm.get_hookcallers(obj) or [] if hc.spec is None]
            if unknown:
                raise _SkipPlugin(_unknown_hook_message(unknown[0]))

            for kind, hook_name in KIND_HOOKS.items():
                for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                    if impl.plugin is not obj:
                        continue
                    register = _make_register(kind, name, distribution, version, staged, already)
                    try:
                        impl.function(**{arg: register for arg in impl.argnames})
                    except _SkipPlugin:
                        raise
                    except Exception as exc:
                        raise _SkipPlugin(f"hook {hook_name} raised {type(exc).__name__}: {exc}") from exc
        except _SkipPlugin:
            self._pm.unregister(obj)
            raise
        return staged

    def _fail(self, name: str, distribution: str | None, version: str | None, reason: str) -> None:
        failure = PluginFailure(name, distribution, version, reason)
        self._failures.append(failure)
        where = f"{distribution} {version}" if distribution else "no distribution"
        message = f"diffreg skipped plugin {name!r} ({where}): {reason}"
        if self.strict:
            raise PluginError(message + " [DIFFREG_STRICT_PLUGINS is set]")
        warnings.warn(message, PluginWarning, stacklevel=4)

    # -- lookup ------------------------------------------------------------------------------

    def plugins(self) -> list[PluginInfo]:
        """Loaded plugins, built-ins first, in load order."""
        self._ensure_built()
        return list(self._plugins.values())

    def failures(self) -> list[PluginFailure]:
        """Plugins that were skipped, with the reason."""
        self._ensure_built()
        return list(self._failures)

    def components(self, kind: str | None = None) -> list[Component]:
        """All components of ``kind`` (or of every kind), in load order."""
        self._ensure_built()
        kinds = KINDS if kind is None else (_check_kind(kind),)
        return [c for k in kinds for c in self._components[k]]

    def names(self, kind: str) -> list[str]:
        """Sorted bare names of ``kind`` (a name several plugins registered appears once)."""
        return sorted({c.name for c in self.components(kind)})

    def get(self, kind: str, name: str) -> Component:
        """Resolve ``name`` (bare or ``plugin:name``) to a :class:`Component`.

        Raises :class:`~diffreg.errors.UnknownComponentError` (a ``KeyError``) for an unknown name
        and :class:`~diffreg.errors.AmbiguousComponentError` for a bare name that several
        third-party plugins registered; ``ValueError`` for an unknown kind.
        """
        if not isinstance(name, str):
            raise TypeError(f"{kind} name must be a string, got {type(name).__name__}: {name!r}")
        candidates = self.components(kind)
        if ":" in name:
            plugin, bare = name.split(":", 1)
            key = _normalize(plugin)
            for c in candidates:
                if c.name == bare and (
                    _normalize(c.plugin) == key or (c.distribution is not None and _normalize(c.distribution) == key)
                ):
                    return c
            raise UnknownComponentError(kind, name, [c.qualified_name for c in candidates])
        matches = [c for c in candidates if c.name == name]
        builtin = [c for c in matches if c.builtin]
        if builtin:
            return builtin[0]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise AmbiguousComponentError(kind, name, [c.qualified_name for c in matches])
        raise UnknownComponentError(kind, name, {c.name for c in candidates})

    def create(self, kind: str, name: str, /, *args: Any, **options: Any) -> Any:
        """Build component ``name`` of ``kind``: ``factory(*args, **options)``.

        Options are checked against the factory's signature first; an unknown option, a value of
        the wrong type, or a value the factory rejects raises
        :class:`~diffreg.errors.ComponentOptionError` naming the component and the option.
        """
        component = self.get(kind, name)
        check_options(component, options, n_positional=len(args))
        try:
            return component.factory(*args, **options)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, ComponentOptionError):
                raise
            raise ComponentOptionError(f"{kind} {component.name!r}: {exc}") from exc

    @contextlib.contextmanager
    def plugin(self, plugin: object, name: str = "test-plugin") -> Iterator[PluginInfo]:
        """Register ``plugin`` for the length of a ``with`` block (for plugin authors' tests).

        Raises :class:`~diffreg.errors.PluginError` if the plugin is rejected, whatever the mode.
        """
        info = self.add_plugin(plugin, name)
        if info is None:
            raise PluginError(f"plugin {name!r} was rejected: {self._failures[-1].reason}")
        try:
            yield info
        finally:
            self.remove_plugin(name)


def _check_kind(kind: str) -> str:
    if kind not in KIND_HOOKS:
        hint = closest(kind, KINDS)
        raise ValueError(
            f"unknown component kind {kind!r}; known: {', '.join(KINDS)}"
            + (f"; did you mean {hint!r}?" if hint else "")
        )
    return kind


def _unknown_hook_message(hook: str) -> str:
    hint = closest(hook, KIND_HOOKS.values())
    return f"implements unknown hook {hook!r}" + (f"; did you mean {hint!r}?" if hint else "")


def _check_hook_names(obj: object) -> None:
    """Reject plugins with a ``diffreg_*`` attribute that is not a known hook (a misspelling)."""
    if not isinstance(obj, types.ModuleType):
        return
    for attr in dir(obj):
        if attr.startswith("diffreg_") and attr not in KIND_HOOKS.values():
            if callable(getattr(obj, attr)):
                raise _SkipPlugin(_unknown_hook_message(attr))


def _make_register(
    kind: str,
    plugin: str,
    distribution: str | None,
    version: str | None,
    staged: list[Component],
    already: set[tuple[str, str]],
) -> Callable[..., None]:
    def register(name: str, factory: Callable[..., Any], **metadata: Any) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise _SkipPlugin(
                f"registered an invalid {kind} name {name!r} (accepted: lower-case letters, digits, '_', '-', '.')"
            )
        if not callable(factory):
            raise _SkipPlugin(f"registered {kind} {name!r} with a factory that is not callable")
        if any(c.kind == kind and c.name == name for c in staged) or (kind, name) in already:
            raise _SkipPlugin(f"registered {kind} {name!r} twice")
        staged.append(Component(kind, name, plugin, factory, distribution, version, metadata))

    return register


# -- option checking ------------------------------------------------------------------------------


def _signature_target(factory: Callable[..., Any]) -> Callable[..., Any]:
    return factory.__init__ if inspect.isclass(factory) else factory


def _cached(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Memoize ``fn(factory)`` per factory (signatures and type hints cost tens of microseconds,
    and every ``create`` needs them); unhashable factories are computed each time."""
    cache: dict[Any, Any] = {}

    def wrapper(factory):
        try:
            return cache[factory]
        except KeyError:
            result = cache[factory] = fn(factory)
            return result
        except TypeError:  # unhashable
            return fn(factory)

    return wrapper


@_cached
def _type_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(_signature_target(factory))
    except Exception:
        return {}


@_cached
def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):
        return None


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits a simple type hint (int, float, bool, str, Literal, unions, tuples)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is float:  # numpy's numbers too
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if hint in (bool, str):
        return isinstance(value, hint)
    if origin in (tuple, list, typing.Sequence) or hint in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        if origin is tuple and args:
            return len(args) == len(value) and all(map(_conforms, value, args))
        return not args or all(_conforms(v, args[0]) for v in value)
    return True  # not a hint we check


def _hint_text(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def accepted_options(component: Component) -> dict[str, inspect.Parameter]:
    """The keyword options ``component``'s factory accepts, by name."""
    signature = inspect.signature(component.factory)
    return {name: p for name, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_options(component: Component, options: Mapping[str, Any], n_positional: int = 0) -> None:
    """Check ``options`` against ``component``'s factory signature and simple type hints.

    Raises :class:`~diffreg.errors.ComponentOptionError` for an unknown option (listing the
    accepted ones) or a value whose type does not match the annotation.
    """
    signature = _signature(component.factory)
    if signature is None:
        return
    params = list(signature.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    fixed = set(positional[:n_positional])
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in fixed]
    label = f"{component.kind} {component.name!r}"
    hints = _type_hints(component.factory)
    for key, value in options.items():
        if key not in accepted:
            hint = closest(key, accepted)
            raise ComponentOptionError(
                f"{label} has no option {key!r}; accepted: {', '.join(accepted) or '(none)'}"
                + (f"; did you mean {hint!r}?" if hint else "")
            )
        if key in hints and not _conforms(value, hints[key]):
            raise ComponentOptionError(
                f"{label} option {key!r} must be {_hint_text(hints[key])}, got {type(value).__name__}: {value!r}"
            )


# -- the process-wide registry -------------------------------------------------------------------

_default: Registry | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The process-wide registry (built from the environment on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Registry()
    return _default


def reset() -> None:
    """Forget the process-wide registry; the next use rediscovers plugins (and rereads the env)."""
    global _default
    with _default_lock:
        _default = None


def names(kind: str) -> list[str]:
    """Sorted bare names of ``kind`` in the process-wide registry. See :meth:`Registry.names`."""
    return default_registry().names(kind)


def get(kind: str, name: str) -> Component:
    """Resolve a name in the process-wide registry. See :meth:`Registry.get`."""
    return default_registry().get(kind, name)


def create(kind: str, name: str, /, *args: Any, **options: Any) -> Any:
    """Build a component from the process-wide registry. See :meth:`Registry.create`."""
    return default_registry().create(kind, name, *args, **options)


def components(kind: str | None = None) -> list[Component]:
    """Components of the process-wide registry. See :meth:`Registry.components`."""
    return default_registry().components(kind)


def plugins() -> list[PluginInfo]:
    """Loaded plugins of the process-wide registry."""
    return default_registry().plugins()


def failures() -> list[PluginFailure]:
    """Skipped plugins of the process-wide registry, with reasons."""
    return default_registry().failures()


def plugin(obj: object, name: str = "test-plugin") -> contextlib.AbstractContextManager[PluginInfo]:
    """Register ``obj`` in the process-wide registry for a ``with`` block. See :meth:`Registry.plugin`."""
    return default_registry().plugin(obj, name)
