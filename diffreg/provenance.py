"""Which installed distribution provided each component of a checkpoint, and resolving to it again.

A checkpoint stores its components by bare name (``"edm"``). Bare names are resolved built-in
first, then to the single plugin that has the name, so a later install (a second plugin with
``edm``, a future built-in ``edm``) could change what an old file loads, and an uninstalled plugin
would give only "unknown schedule". :func:`record` writes, for every component, the distribution and
version that provided it (the ``diffreg.providers`` header entry, JSON); :func:`resolve` reads it
back and makes each name resolve to that provider first, or raises
:class:`~diffreg.errors.MissingProviderError` naming the file, the component and what to install.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import attrs

from diffreg import registry
from diffreg.errors import AmbiguousComponentError, CheckpointError, MissingProviderError, UnknownComponentError

if TYPE_CHECKING:
    from diffreg.config import CheckpointConfig, ComponentSpec

HEADER_KEY = "diffreg.providers"


def _fields(cfg: CheckpointConfig) -> dict[str, tuple[str, ComponentSpec]]:
    """``"diffusion.schedule" -> (kind, spec)`` for every component of ``cfg``, and ``"model"``."""
    found = {f"diffusion.{field}": (kind, getattr(cfg.diffusion, field)) for field, kind in cfg.diffusion._kinds.items()}
    found["model"] = ("model", cfg.model)
    return found


def record(cfg: CheckpointConfig) -> str:
    """JSON ``{field: {"name", "provider", "version"}}`` for every component of ``cfg`` that came from
    an installed distribution (the built-ins' provider is ``diffreg``).

    Raises what :func:`diffreg.registry.get` raises for a name that does not resolve.
    """
    out = {}
    for field, (kind, spec) in _fields(cfg).items():
        component = registry.get(kind, spec.name)
        if component.distribution is not None:
            out[field] = {"name": component.name, "provider": component.distribution, "version": component.version}
    return json.dumps(out, sort_keys=True)


def recorded_providers(recorded: str | None) -> dict[str, dict[str, str | None]]:
    """The :data:`HEADER_KEY` entry as ``{field: {name, provider, version}}`` (empty when absent or
    not what :func:`record` writes: :func:`resolve` is where a damaged entry is an error)."""
    try:
        entries = json.loads(recorded) if recorded else {}
    except (ValueError, RecursionError):
        return {}
    return entries if isinstance(entries, dict) else {}


def missing(cfg: CheckpointConfig, recorded: str | None, where: str) -> list[str]:
    """One message per component whose recorded provider is not installed (each ends with the
    ``pip install`` to run); empty when everything the checkpoint needs is there."""
    messages = []
    for field, (kind, spec) in _fields(cfg).items():
        entry = recorded_providers(recorded).get(field)
        if not isinstance(entry, dict) or not entry.get("provider") or entry.get("name") != spec.name.rpartition(":")[2]:
            continue
        try:
            registry.locate(kind, entry["name"], entry["provider"], entry.get("version"))
        except MissingProviderError as exc:
            messages.append(f"{where}: {field}: {exc}")
    return messages


def resolve(cfg: CheckpointConfig, recorded: str | None, where: str) -> CheckpointConfig:
    """``cfg`` with each component name resolving to the provider :func:`record` stored.

    A name whose bare form already resolves to the recorded provider is left as is; otherwise it
    becomes ``<provider>:<name>``. Files without the record load as before.

    Raises:
        MissingProviderError: a recorded provider is not installed, failed to load, or no longer
            registers the name; the message starts with ``where`` and the field, and ends with the
            ``pip install`` to run.
        CheckpointError: the record is not what :func:`record` writes.
    """
    if recorded is None:
        return cfg
    try:
        entries = json.loads(recorded)
        if not isinstance(entries, dict) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), (str, type(None))) for k in ("name", "provider", "version"))
            for e in entries.values()
        ):
            raise ValueError("expected {field: {name, provider, version}}")
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: its {HEADER_KEY} entry is invalid: {exc}") from None
    changes: dict[str, str] = {}
    for field, (kind, spec) in _fields(cfg).items():
        entry = entries.get(field)
        if not entry or not entry.get("provider") or entry.get("name") != spec.name.rpartition(":")[2]:
            continue
        try:
            wanted = registry.locate(kind, entry["name"], entry["provider"], entry.get("version"))
        except MissingProviderError as exc:
            raise MissingProviderError(kind, exc.name, exc.provider, f"{where}: {field}: {exc}") from None
        try:
            current = registry.get(kind, spec.name)
        except (UnknownComponentError, AmbiguousComponentError):
            current = None
        if current != wanted:
            changes[field] = f"{wanted.distribution}:{wanted.name}"
    if not changes:
        return cfg
    diffusion = attrs.evolve(
        cfg.diffusion,
        **{f: attrs.evolve(getattr(cfg.diffusion, f), name=changes[f"diffusion.{f}"]) for f in cfg.diffusion._kinds if f"diffusion.{f}" in changes},
    )
    model = attrs.evolve(cfg.model, name=changes["model"]) if "model" in changes else cfg.model
    return attrs.evolve(cfg, diffusion=diffusion, model=model)
