"""Named grids of a checkpoint: ``sampling.grids`` maps a name (``unipc-8``) to a preset, the
sampler and the explicit noise levels fitted for it (the result of ``diffreg optimize-steps``), so a
checkpoint keeps one grid per sampler and NFE and ``diffreg sample --grid unipc-8`` uses one by name.

A preset as stored in a checkpoint's configuration (JSON)::

    {"sampler": "unipc" | {"name": "unipc", **options},
     "grid": {"name": "explicit", "times": [999.0, ...]},
     "steps": 8, "nfe": 8,
     "held_out_error": 0.012, "reference": {...}}        # the last two optional
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from typing import Any

import attrs

from diffreg.config import MAX_TIMESTEPS, ComponentSpec
from diffreg.errors import ConfigError

#: What a grid name may be: a letter or digit, then letters, digits, ``_``, ``.``, ``-``.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: Longest grid name.
MAX_NAME_LENGTH = 64
#: Most named grids in one checkpoint (a hostile header must not hold millions).
MAX_NAMED_GRIDS = 256


def check_grid_name(name: Any, field: str = "sampling.grids") -> str:
    """``name`` if it can name a grid of a checkpoint: a string matching :data:`NAME_PATTERN` of at
    most :data:`MAX_NAME_LENGTH` characters that is not a registered grid kind (``trailing``,
    ``karras``, ...: ``--grid trailing`` must keep meaning the kind).

    Raises:
        ConfigError: naming ``field``, the value and what is accepted.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"{field}: grid name {name!r} is not accepted; a name is 1-{MAX_NAME_LENGTH} characters: a letter or "
            "digit, then letters, digits, '_', '.' or '-' (such as 'unipc-8')"
        )
    from diffreg import registry

    kinds = registry.names("grid")
    if name in kinds:
        raise ConfigError(
            f"{field}: grid name {name!r} is a registered grid kind ({', '.join(kinds)}; `diffreg list grid`); "
            "choose another name (such as 'unipc-8')"
        )
    return name


def default_grid_name(sampler: str, nfe: int) -> str:
    """The name ``diffreg optimize-steps`` stores a grid under unless told: ``f"{sampler}-{nfe}"``
    (``unipc-8``) with the sampler's bare name (a ``plugin:`` prefix dropped); sampler options do
    not enter it, so two option sets at one NFE need ``--name``."""
    bare = sampler.rsplit(":", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{bare}-{nfe}")[:MAX_NAME_LENGTH]


def _check_times(times: Any, field: str) -> list[float]:
    """Explicit times as the ``explicit`` grid takes them: a non-empty list of finite numbers,
    strictly decreasing, at most :data:`~diffreg.config.MAX_TIMESTEPS` levels."""
    if not isinstance(times, (list, tuple)) or not times:
        raise ConfigError(f"{field} must be a non-empty list of process times (strictly decreasing), got {times!r}")
    if len(times) > MAX_TIMESTEPS:
        raise ConfigError(f"{field} has {len(times):,} levels; at most {MAX_TIMESTEPS:,}")
    for t in times:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ConfigError(f"{field} must hold finite numbers, got {t!r} in {list(times)[:8]!r}")
    if any(b >= a for a, b in itertools.pairwise(times)):
        raise ConfigError(f"{field} must be strictly decreasing, got {list(times)[:16]!r}")
    return [float(t) for t in times]


def _coerce_grid_spec(value: Any) -> ComponentSpec:
    if isinstance(value, (list, tuple)):
        return ComponentSpec("explicit", {"times": list(value)})
    return ComponentSpec.coerce(value, "grid")


@attrs.frozen
class NamedGrid:
    """One named grid of a checkpoint: the noise levels fitted for one sampler.

    Fields:
        sampler: the sampler it was fitted for (:class:`~diffreg.config.ComponentSpec` of kind
            ``sampler``: a name or ``{"name": ..., **options}``).
        grid: ``{"name": "explicit", "times": [...]}``: process times, strictly decreasing, finite
            (a bare list is accepted and stored so).
        steps: the grid's levels (default: its length; another value is refused).
        nfe: model evaluations of one sampling call with ``sampler`` on ``grid`` (an int >= 1), or
            ``None`` (not recorded).
        held_out_error: the optimizer's held-out error of this grid (RMS to its reference solve on
            draws it was not fitted to), or ``None``.
        reference: how that error was measured (``diffreg.optimize.OptimizedSteps.reference`` with
            ``draws`` and ``seed``), or ``None``.

    The path of a field in error messages is ``sampling.grids['NAME'].FIELD``.
    """

    sampler: ComponentSpec = attrs.field(converter=lambda v: ComponentSpec.coerce(v, "named grid sampler"))
    grid: ComponentSpec = attrs.field(converter=_coerce_grid_spec)
    steps: int | None = attrs.field(default=None)
    nfe: int | None = attrs.field(default=None)
    held_out_error: float | None = attrs.field(default=None)
    reference: dict[str, Any] | None = attrs.field(default=None, hash=False)

    def check(self, field: str) -> NamedGrid:
        """This preset if valid, else ConfigError naming ``field`` (``sampling.grids['unipc-8']``)."""
        if self.grid.name != "explicit" or set(self.grid.options) != {"times"}:
            raise ConfigError(
                f"{field}.grid must be {{'name': 'explicit', 'times': [...]}} (or a list of times), "
                f"got {self.grid.to_dict()!r}"
            )
        times = _check_times(self.grid.options["times"], f"{field}.grid.times")
        for key in ("steps", "nfe"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{field}.{key} must be a positive int, got {value!r}")
        if self.steps is not None and self.steps != len(times):
            raise ConfigError(
                f"{field}.steps is {self.steps} but its grid has {len(times)} levels; give steps={len(times)} or leave "
                "it out"
            )
        err = self.held_out_error
        if err is not None and (isinstance(err, bool) or not isinstance(err, (int, float)) or not err >= 0):
            raise ConfigError(f"{field}.held_out_error must be a number >= 0 or null, got {err!r}")
        if self.reference is not None and not isinstance(self.reference, Mapping):
            raise ConfigError(f"{field}.reference must be a table or null, got {self.reference!r}")
        return self

    def __attrs_post_init__(self) -> None:
        if self.steps is None and isinstance(self.grid.options.get("times"), list):
            object.__setattr__(self, "steps", len(self.grid.options["times"]))

    @property
    def times(self) -> list[float]:
        """The grid's process times."""
        return list(self.grid.options["times"])

    @classmethod
    def coerce(cls, value: Any, field: str) -> NamedGrid:
        """A NamedGrid from itself or a mapping with the fields above, checked.

        Raises:
            ConfigError: a missing or unknown key or an invalid value, naming ``field``.
        """
        if isinstance(value, NamedGrid):
            return value.check(field)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{field} must be a table with sampler and grid, got {type(value).__name__}: {value!r}")
        known = [f.name for f in attrs.fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ConfigError(f"{field} has no field {unknown[0]!r}; known: {', '.join(known)}")
        missing = [k for k in ("sampler", "grid") if k not in value]
        if missing:
            raise ConfigError(f"{field} is missing {', '.join(map(repr, missing))}")
        try:
            preset = cls(**value)
        except ConfigError as exc:
            raise ConfigError(f"{field}: {exc}") from None
        return preset.check(field)

    def to_dict(self) -> dict[str, Any]:
        """JSON values; ``nfe``, ``held_out_error`` and ``reference`` only when recorded."""
        out: dict[str, Any] = {"sampler": self.sampler.to_dict(), "grid": self.grid.to_dict(), "steps": self.steps}
        for key in ("nfe", "held_out_error", "reference"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def sample_options(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`diffreg.Diffusion.sample`: ``sampler`` (the name), its
        options, ``steps`` and ``grid``."""
        return {"sampler": self.sampler.name, **self.sampler.options, "steps": self.steps, "grid": self.grid.to_dict()}


def coerce_named_grids(value: Any) -> dict[str, NamedGrid]:
    """``sampling.grids``: ``None`` or a mapping name -> preset, each name checked with
    :func:`check_grid_name` and each preset with :meth:`NamedGrid.coerce`.

    Raises:
        ConfigError: naming the field and the value.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"sampling.grids must be a table name -> preset, got {type(value).__name__}: {value!r}")
    if len(value) > MAX_NAMED_GRIDS:
        raise ConfigError(f"sampling.grids holds {len(value):,} grids; at most {MAX_NAMED_GRIDS}")
    return {
        check_grid_name(name): NamedGrid.coerce(preset, f"sampling.grids[{name!r}]") for name, preset in value.items()
    }


__all__ = ["MAX_NAMED_GRIDS", "MAX_NAME_LENGTH", "NAME_PATTERN", "NamedGrid", "check_grid_name", "default_grid_name"]
