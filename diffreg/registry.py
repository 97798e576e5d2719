"""Plugin discovery and component lookup by name, on top of pluggy.

The registry is built on first use: the built-in plugins of :mod:`diffreg.builtin` first, then the
entry points of group ``diffreg`` sorted by distribution and entry-point name. pluggy validates each
plugin's hooks against :mod:`diffreg.hookspecs` (argument names, unknown hooks); the registry calls
one plugin's hooks at a time, so a plugin that fails at any point (anything it raises, ``SystemExit``
included) is skipped whole, with a :class:`~diffreg.errors.PluginWarning` naming its distribution
and the reason, and kept in :func:`failures`. A Ctrl-C while a plugin loads still stops the program.

Environment (read when the registry is built, before any plugin is imported):

- ``DIFFREG_LOAD_PLUGINS``: comma-separated allow-list of third-party plugins (entry-point or
  distribution names, shell-style patterns: ``*`` is every plugin); set but blank: none.
- ``DIFFREG_DISABLE_PLUGINS``: comma-separated deny-list, same names. A name in either list that
  matches no installed plugin is warned about.
- ``DIFFREG_STRICT_PLUGINS=1``: a failing plugin raises :class:`~diffreg.errors.PluginError`.
- ``DIFFREG_DEBUG=1``: print each plugin's name to stderr before it is imported.

Names: ``plugin:name`` (plugin = entry-point or distribution name; ``diffreg`` for built-ins) always
resolves; a bare name resolves to the built-in first, then to the single plugin that has it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import pluggy

from diffreg import hookspecs
from diffreg.errors import (
    AmbiguousComponentError,
    ComponentOptionError,
    MissingProviderError,
    PluginError,
    PluginWarning,
    UnknownComponentError,
    closest,
)
from diffreg.options import accepted_options, check_options
from diffreg.plugin_loading import (
    BUILTIN_PLUGIN,
    PLUGIN_NAME_RE,
    Component,
    PluginFailure,
    PluginInfo,
    SkipPlugin,
    check_hook_functions,
    discover,
    loading_plugin,
    make_register,
    normalize,
    run_plugin_code,
    select,
    unknown_hook_message,
    watch_interrupts,
)

__all__ = ["Component", "PluginFailure", "PluginInfo", "Registry", "accepted_options", "check_options"]

KINDS: tuple[str, ...] = tuple(hookspecs.KINDS)


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
        self._reset_state()

    @property
    def strict(self) -> bool:
        """Whether DIFFREG_STRICT_PLUGINS turns plugin failures into errors."""
        return self._env.get("DIFFREG_STRICT_PLUGINS", "").strip().lower() not in ("", "0", "false", "no", "off")

    def _reset_state(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._plugins: dict[str, PluginInfo] = {}
        self._owners: dict[str, str] = {}  # normalized plugin name or alias -> plugin name
        self._pm_names: dict[str, str] = {}  # pluggy's name -> plugin name
        self._failures: list[PluginFailure] = []
        self._components: dict[str, list[Component]] = {kind: [] for kind in hookspecs.KINDS}

    def _debug(self, message: str) -> None:
        if self._env.get("DIFFREG_DEBUG"):
            print(f"diffreg: {message}", file=sys.stderr, flush=True)

    # -- discovery ---------------------------------------------------------------------------

    def _ensure_built(self) -> None:
        if self._built:
            return
        loading = loading_plugin()
        if loading is not None:
            raise PluginError(
                f"plugin {loading!r} used the diffreg registry while plugins were loading; a plugin may "
                "only call `register` in its hooks (look components up later, when they are used)"
            )
        with self._lock:
            if self._built:
                return
            from diffreg import __version__
            from diffreg.builtin import DEFAULT_PLUGINS

            try:
                for module in DEFAULT_PLUGINS:
                    loader = lambda module=module: importlib.import_module(module)  # noqa: E731
                    self._load(loader, BUILTIN_PLUGIN, "diffreg", __version__, "diffreg.builtin", module)
                if self._use_entry_points:
                    self._load_entry_points()
            except BaseException:  # strict mode, or a Ctrl-C: nothing half-built; the next use retries
                self._reset_state()
                raise
            self._built = True

    def _load_entry_points(self) -> None:
        entries, unmatched = select(discover(self._debug), self._env)
        for entry in entries:
            if BUILTIN_PLUGIN in (normalize(entry.name), normalize(entry.distribution)):
                reason = f"the name {BUILTIN_PLUGIN!r} is reserved for the built-ins; rename the entry point or distribution"
            elif not PLUGIN_NAME_RE.fullmatch(entry.name):
                reason = f"invalid entry-point name {entry.name!r} (accepted: letters, digits, '_', '-', '.')"
            elif normalize(entry.name) in self._owners:
                taken = self._plugins[self._owners[normalize(entry.name)]]
                reason = f"the name {entry.name!r} is already taken by {taken.distribution} {taken.version}; rename one entry point"
            else:
                self._debug(f"importing plugin {entry.name!r} ({entry.distribution} {entry.version}, {entry.value})")
                self._load(entry.load, entry.name, entry.distribution, entry.version, entry.value)
                continue
            self._fail(entry.name, entry.distribution, entry.version, reason, ran_code=False)
        for message in unmatched:
            warnings.warn(message, PluginWarning, stacklevel=2)

    def _load(self, loader, name, distribution, version, module, pm_name=None) -> PluginInfo | None:
        """Import a plugin and collect its components; on any failure skip it whole."""
        with watch_interrupts() as interrupts:
            try:
                obj = run_plugin_code(loader, interrupts, name, "import failed:")
                existing = self._pm.get_name(obj)
                if existing is not None and name != BUILTIN_PLUGIN:  # one module, two names
                    return self._alias(self._pm_names[existing], name)
                staged = self._collect(obj, pm_name or name, name, distribution, version, interrupts)
            except SkipPlugin as exc:
                self._fail(name, distribution, version, str(exc), ran_code=True)
                return None
        previous = self._plugins.get(name)
        components = (previous.components if previous else ()) + tuple(staged)
        self._plugins[name] = info = PluginInfo(name, distribution, version, module, components)
        self._owners[normalize(name)] = name
        self._pm_names[pm_name or name] = name
        for component in staged:
            self._components[component.kind].append(component)
        return info

    def _collect(self, obj, pm_name, name, distribution, version, interrupts) -> list[Component]:
        """Register ``obj`` with pluggy (which checks its hooks), then call its hooks one by one."""
        check_hook_functions(self._pm, obj)
        try:
            self._pm.register(obj, name=pm_name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise SkipPlugin(f"invalid hook: {exc}") from exc
        staged: list[Component] = []
        try:
            try:
                self._pm.check_pending()
            except pluggy.PluginValidationError as exc:
                unknown = [hc.name for hc in self._pm.get_hookcallers(obj) or [] if hc.spec is None]
                raise SkipPlugin(unknown_hook_message(unknown[0]) if unknown else str(exc)) from exc
            taken = {(c.kind, c.name) for c in (self._plugins[name].components if name in self._plugins else ())}
            for kind in hookspecs.COMPONENT_KINDS:
                for impl in getattr(self._pm.hook, kind.hook).get_hookimpls():
                    if impl.plugin is obj:
                        add = lambda n, f, meta, k=kind.name: staged.append(  # noqa: E731
                            Component(k, n, name, f, distribution, version, meta)
                        )
                        register = make_register(kind, taken, add)
                        call = lambda impl=impl, r=register: impl.function(**dict.fromkeys(impl.argnames, r))  # noqa: E731
                        run_plugin_code(call, interrupts, name, f"hook {kind.hook} raised")
        except SkipPlugin:
            self._pm.unregister(obj)
            raise
        return staged

    def _alias(self, owner: str, alias: str) -> PluginInfo:
        info = self._plugins[owner]
        self._plugins[owner] = info = attrs.evolve(info, aliases=(*info.aliases, alias))
        self._owners[normalize(alias)] = owner
        return info

    def _fail(self, name, distribution, version, reason: str, *, ran_code: bool) -> None:
        self._failures.append(PluginFailure(name, distribution, version, reason))
        where = f"{distribution} {version}" if distribution else "no distribution"
        message = f"diffreg skipped plugin {name!r} ({where}): {reason}"
        if ran_code:
            message += (
                "; its code ran before it failed, and skipping it cannot undo what that code changed"
                f" (DIFFREG_DISABLE_PLUGINS={name} keeps it from being imported)"
            )
        if self.strict:
            raise PluginError(message + " [DIFFREG_STRICT_PLUGINS is set]")
        warnings.warn(message, PluginWarning, stacklevel=2)

    def add_plugin(
        self, plugin: object, name: str, *, distribution: str | None = None, version: str | None = None
    ) -> PluginInfo | None:
        """Register an already-imported plugin object (a module, class or instance with hooks).

        Returns its :class:`PluginInfo`, or ``None`` when it was skipped (see :func:`failures`). An
        object that is already loaded (an installed plugin, ``pip install -e`` included) is not
        registered twice: ``name`` becomes one more name for it. Raises
        :class:`~diffreg.errors.PluginError` under strict mode, and ``ValueError`` for a name that
        is taken, reserved, or not a plugin name.
        """
        if not isinstance(name, str) or not PLUGIN_NAME_RE.fullmatch(name):
            raise ValueError(f"invalid plugin name {name!r} (accepted: letters, digits, '_', '-', '.')")
        self._ensure_built()
        with self._lock:
            existing = self._pm.get_name(plugin)
            owner = self._pm_names[existing] if existing is not None else None
            if owner is not None and self._owners.get(normalize(name)) == owner:
                return self._plugins[owner]  # already loaded under this name: nothing to do
            if normalize(name) in self._owners or normalize(name) == BUILTIN_PLUGIN:
                raise ValueError(f"a plugin named {name!r} is already loaded (or the name is reserved)")
            if owner is not None:
                return self._alias(owner, name)
            module = getattr(plugin, "__name__", type(plugin).__name__)
            return self._load(lambda: plugin, name, distribution, version, module)

    def remove_plugin(self, name: str) -> None:
        """Unload plugin ``name`` (or drop the alias ``name``). Raises ``KeyError`` if not loaded."""
        with self._lock:
            owner = self._owners.pop(normalize(name))
            info = self._plugins[owner]
            if owner != name:
                self._plugins[owner] = attrs.evolve(info, aliases=tuple(a for a in info.aliases if a != name))
                return
            del self._plugins[name]
            for alias in info.aliases:
                self._owners.pop(normalize(alias), None)
            for component in info.components:
                self._components[component.kind].remove(component)
            self._pm.unregister(name=name)
            self._pm_names.pop(name, None)

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
        kinds = tuple(hookspecs.KINDS) if kind is None else (_check_kind(kind),)
        return [c for k in kinds for c in self._components[k]]

    def names(self, kind: str) -> list[str]:
        """Sorted bare names of ``kind`` (a name several plugins registered appears once)."""
        return sorted({c.name for c in self.components(kind)})

    def collisions(self) -> dict[tuple[str, str], list[Component]]:
        """Bare names that several plugins registered: ``(kind, name) -> components``."""
        found: dict[tuple[str, str], list[Component]] = {}
        for c in self.components():
            found.setdefault((c.kind, c.name), []).append(c)
        return {key: cs for key, cs in found.items() if len(cs) > 1}

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
            key = normalize(plugin)
            owner = self._owners.get(key)
            for c in candidates:
                if c.name == bare and (c.plugin == owner or (c.distribution and normalize(c.distribution) == key)):
                    return c
            raise UnknownComponentError(kind, name, [c.qualified_name for c in candidates])
        matches = [c for c in candidates if c.name == name]
        if any(c.builtin for c in matches):
            return next(c for c in matches if c.builtin)
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise AmbiguousComponentError(kind, name, [c.qualified_name for c in matches])
        raise UnknownComponentError(kind, name, {c.name for c in candidates})

    def locate(self, kind: str, name: str, provider: str | None = None, version: str | None = None) -> Component:
        """Resolve ``name`` preferring the distribution ``provider`` (e.g. the one a checkpoint
        recorded); without a provider, the same as :meth:`get`.

        Raises :class:`~diffreg.errors.MissingProviderError` (an ``UnknownComponentError``) when
        ``provider`` is not installed, failed to load, or no longer registers ``name``: the message
        says what to install.
        """
        if provider is None:
            return self.get(kind, name)
        key = normalize(provider)
        for c in self.components(kind):
            if c.name == name and c.distribution is not None and normalize(c.distribution) == key:
                return c
        wanted = f"{provider} {version}" if version else provider
        pin = f"'{provider}=={version}'" if version else provider
        message = f"{kind} {name!r} was provided by {wanted!r}"
        installed = [p for p in self._plugins.values() if p.distribution and normalize(p.distribution) == key]
        failed = [f for f in self._failures if f.distribution and normalize(f.distribution) == key]
        if installed:
            have = installed[0]
            message += f"; the installed {have.distribution} {have.version} does not register it; pip install {pin}"
        elif failed:
            message += f", which is installed but failed to load: {failed[0].reason}"
        else:
            message += f", which is not installed (or is disabled); pip install {pin}"
        raise MissingProviderError(kind, name, provider, message)

    def create(self, kind: str, name: str, /, *args: Any, **options: Any) -> Any:
        """Build component ``name`` of ``kind``: ``factory(*args, **options)``.

        Options are checked against the factory's signature first; an unknown option, a value of
        the wrong type, or a value the factory rejects raises
        :class:`~diffreg.errors.ComponentOptionError` naming the component and the option. A
        factory whose product is not the kind's product class (:mod:`diffreg.hookspecs`) raises
        :class:`~diffreg.errors.PluginError`.
        """
        component = self.get(kind, name)
        check_options(component, options, n_positional=len(args))
        try:
            product = component.factory(*args, **options)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, ComponentOptionError):
                raise
            raise ComponentOptionError(f"{kind} {component.name!r}: {exc}") from exc
        expected = hookspecs.KINDS[kind].product_type()
        if not isinstance(product, expected):
            source = f"{component.distribution} {component.version}" if component.distribution else "no distribution"
            raise PluginError(
                f"{kind} {component.qualified_name!r} ({source}) made a {type(product).__module__}."
                f"{type(product).__qualname__}, not a {expected.__module__}.{expected.__qualname__}"
                " (see diffreg.hookspecs)"
            )
        return product

    @contextlib.contextmanager
    def plugin(self, plugin: object, name: str = "test-plugin") -> Iterator[PluginInfo]:
        """Register ``plugin`` for the length of a ``with`` block (for plugin authors' tests).

        An installed plugin (``pip install -e`` included) is not registered twice: inside the block
        it also answers to ``name``. Raises :class:`~diffreg.errors.PluginError` if the plugin is
        rejected, whatever the mode.
        """
        self._ensure_built()
        known = normalize(name) in self._owners
        info = self.add_plugin(plugin, name)
        if info is None:
            raise PluginError(f"plugin {name!r} was rejected: {self._failures[-1].reason}")
        try:
            yield info
        finally:
            if not known:
                self.remove_plugin(name)


def _check_kind(kind: str) -> str:
    if kind not in hookspecs.KINDS:
        hint = closest(kind, hookspecs.KINDS)
        raise ValueError(
            f"unknown component kind {kind!r}; known: {', '.join(hookspecs.KINDS)}" + (f"; did you mean {hint!r}?" if hint else "")
        )
    return kind


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


def _on_default(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` of :class:`Registry`, called on the process-wide registry (same docstring)."""

    @functools.wraps(method)
    def function(*args: Any, **kwargs: Any) -> Any:
        return method(default_registry(), *args, **kwargs)

    function.__doc__ = f"On the process-wide registry: {method.__doc__}"
    return function


names = _on_default(Registry.names)
get = _on_default(Registry.get)
locate = _on_default(Registry.locate)
create = _on_default(Registry.create)
components = _on_default(Registry.components)
plugins = _on_default(Registry.plugins)
failures = _on_default(Registry.failures)
plugin = _on_default(Registry.plugin)
