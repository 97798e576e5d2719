"""Exceptions and warnings raised by diffreg. Each message names what was given and what is accepted."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(name: str, candidates: Iterable[str], n: int = 1) -> str | None:
    """Return the candidate closest to ``name`` (difflib ratio >= 0.6, ignoring case), or ``None``.

    With ``n > 1``, a comma-separated string of up to ``n`` closest candidates (or ``None``).
    """
    by_lower: dict[str, str] = {}
    for candidate in candidates:
        by_lower.setdefault(candidate.lower(), candidate)
    matches = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.6)
    return ", ".join(by_lower[m] for m in matches) if matches else None


#: Unknown-name messages list every known name up to this many, then only the closest ones.
MAX_LISTED = 30


class UnknownComponentError(KeyError):
    """A component name that no loaded plugin registered.

    A ``KeyError`` subclass (so ``except KeyError`` keeps working) whose message names the kind, the
    known names and the closest match.
    """

    def __init__(self, kind: str, name: str, known: Iterable[str], message: str | None = None):
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        if message is None:
            hint = closest(name, self.known)
            if len(self.known) <= MAX_LISTED:
                message = f"unknown {kind} {name!r}; known: {', '.join(self.known) or '(none)'}"
                if hint is not None:
                    message += f"; did you mean {hint!r}?"
            else:  # do not print ten thousand names
                near = closest(name, self.known, n=5)
                message = f"unknown {kind} {name!r} ({len(self.known)} known; `diffreg list {kind}` shows them)"
                message += f"; closest: {near}" if near else ""
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would print repr(message)
        return self.message


class MissingProviderError(UnknownComponentError):
    """A component recorded (in a checkpoint) with the distribution that provided it, which is not
    installed or no longer provides it; the message says what to install."""

    def __init__(self, kind: str, name: str, provider: str, message: str):
        self.provider = provider
        super().__init__(kind, name, (), message=message)


class AmbiguousComponentError(KeyError):
    """A bare component name that several third-party plugins registered (and no built-in did)."""

    def __init__(self, kind: str, name: str, candidates: Iterable[str]):
        self.kind = kind
        self.name = name
        self.candidates = sorted(candidates)
        self.message = (
            f"{kind} name {name!r} is registered by several plugins; use a qualified name: {', '.join(self.candidates)}"
        )
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class ComponentOptionError(ValueError, TypeError):
    """An option that a component's factory does not accept (unknown, wrong type, out of range)."""


class ConfigError(ValueError):
    """A configuration that cannot be read or built (bad structure, newer format, bad value)."""


class PluginError(RuntimeError):
    """A plugin that could not be loaded, raised instead of a warning under DIFFREG_STRICT_PLUGINS=1."""


class PluginWarning(UserWarning):
    """A plugin was skipped; the message names its distribution and the reason."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: not safetensors, truncated, newer, or mismatched."""


class SamplingError(RuntimeError):
    """Sampling produced an invalid state (for example a non-finite model output at some step)."""
