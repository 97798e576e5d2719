"""Component options: checking keyword options against a factory's signature and simple annotations.

Used by :meth:`diffreg.registry.Registry.create` before a factory is called, and by the configuration
code to list what a component accepts. The checker knows only the hints options use (``int``,
``float``, ``bool``, ``str``, ``Literal``, unions, tuples and lists of those); any other annotation is
accepted as is and left to the factory.
"""

from __future__ import annotations

import inspect
import numbers
import types
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from diffreg.errors import ComponentOptionError, closest

if TYPE_CHECKING:
    from diffreg.registry import Component


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
