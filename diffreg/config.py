"""Configuration by name: frozen attrs classes that round-trip through dicts, JSON and TOML.

A component is written as its name (``"cosine"``) or as a table with a ``name`` and options
(``{"name": "cosine", "max_beta": 0.999}``). Configurations hold names and options only; every
derived table is computed from them when a :class:`~diffreg.Diffusion` is built, so the two can
never disagree. Change a configuration with ``attrs.evolve``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from diffreg.config_text import MAX_NESTING, _json_value, parse_json, parse_toml, read_toml_file
from diffreg.errors import ConfigError, closest

#: Version of the configuration format written by this diffreg. Newer files are refused.
FORMAT_VERSION = 1
#: Largest number of diffusion timesteps T accepted (guided-diffusion trains with T <= 4000); the
#: float64 tables cost 8 bytes x 9 tables x T.
MAX_TIMESTEPS = 100_000


@attrs.frozen
class ComponentSpec:
    """A component chosen by name, with options: ``ComponentSpec("cosine", {"max_beta": 0.99})``.

    ``name`` may be bare or qualified (``plugin:name``); ``options`` are keyword arguments of the
    component's factory (JSON values).
    """

    name: str = attrs.field()
    options: dict[str, Any] = attrs.field(factory=dict, hash=False)

    @name.validator
    def _check_name(self, attribute, value):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"a component name must be a non-empty string, got {value!r}")

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "options", _json_value(dict(self.options), f"component {self.name!r}"))

    @classmethod
    def coerce(cls, value: Any, field: str = "component") -> ComponentSpec:
        """Accept a name, a ``{"name": ..., **options}`` mapping, or a ComponentSpec.

        Raises :class:`~diffreg.errors.ConfigError` for anything else.
        """
        if isinstance(value, ComponentSpec):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping):
            if "name" not in value:
                raise ConfigError(f"{field}: a table needs a 'name' key, got keys {sorted(value)}")
            options = {k: v for k, v in value.items() if k != "name"}
            if "options" in options and isinstance(options["options"], Mapping) and len(options) == 1:
                options = dict(options["options"])
            return cls(value["name"], options)
        raise ConfigError(f"{field}: expected a name or a table with 'name', got {type(value).__name__}: {value!r}")

    def to_dict(self) -> str | dict[str, Any]:
        """The name alone when there are no options, else ``{"name": ..., **options}``."""
        if not self.options:
            return self.name
        return {"name": self.name, **self.options}


def _spec(field: str, default: str):
    return attrs.field(
        default=ComponentSpec(default),
        converter=lambda v: ComponentSpec.coerce(v, field),
    )


def _check_num_timesteps(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_TIMESTEPS:
        raise ConfigError(f"num_timesteps must be an int in 2..{MAX_TIMESTEPS:,}, got {value!r}")


def _check_bool(instance, attribute, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be true or false, got {value!r}")


def _check_format_version(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"format_version must be an int >= 1, got {value!r}")
    if value > FORMAT_VERSION:
        raise ConfigError(
            f"configuration format_version {value} is newer than this diffreg understands "
            f"({FORMAT_VERSION}); upgrade diffreg"
        )


#: Configuration keys that belong elsewhere, with where (instead of the closest field's name:
#: ``sampler`` is closest to ``timestep_sampler``, which is not what someone writing it means).
MISPLACED_FIELDS = {
    "sampler": "the sampler is chosen when sampling: "
    "`diffreg sample --sampler NAME` (`diffreg list sampler`), or Diffusion.sample(sampler=NAME); "
    "timestep_sampler (in [diffusion]) is training's density of timesteps",
}


class _DictMixin:
    """to_dict / from_dict / JSON / TOML for the flat config classes below."""

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of JSON values (components as names or ``{"name": ..., **options}``)."""
        out: dict[str, Any] = {}
        for field in attrs.fields(type(self)):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            out[field.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build from a mapping; unknown keys and a newer ``format_version`` raise ConfigError."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
        known = [f.name for f in attrs.fields(cls)]  # type: ignore[arg-type]
        for key in data:
            if key not in known:
                if key in MISPLACED_FIELDS:  # a name whose closest field is not what was meant
                    raise ConfigError(f"{cls.__name__} has no field {key!r}; {MISPLACED_FIELDS[key]}")
                hint = closest(key, known)
                raise ConfigError(
                    f"{cls.__name__} has no field {key!r}; known: {', '.join(known)}"
                    + (f"; did you mean {hint!r}?" if hint else "")
                )
        version = data.get("format_version", FORMAT_VERSION)
        _check_format_version(None, None, version)
        required = [f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING and f.name not in data]  # type: ignore[arg-type]
        if required:
            raise ConfigError(f"{cls.__name__} is missing {', '.join(map(repr, required))}")
        return cls(**{k: _from_value(cls, k, v) for k, v in data.items()})

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as JSON text (``kwargs`` go to ``json.dumps``)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str):
        """Parse JSON text; invalid JSON or content raises ConfigError."""
        return cls.from_dict(parse_json(text))

    def to_toml(self) -> str:
        """TOML text. TOML has no null: an option set to ``None`` is left out when the component's
        default for it is ``None`` too (same meaning), else this raises ConfigError."""
        import tomli_w

        data = self.to_dict()
        kinds = getattr(type(self), "_kinds", {})
        for field, kind in kinds.items():
            spec = getattr(self, field)
            if isinstance(spec, ComponentSpec) and isinstance(data.get(field), dict):
                _check_none_options(kind, spec)
        return tomli_w.dumps(_drop_none(data))

    @classmethod
    def from_toml(cls, text: str):
        """Parse TOML text (with tomllib); invalid TOML or content raises ConfigError."""
        return cls.from_dict(parse_toml(text))

    @classmethod
    def from_toml_file(cls, path: str | os.PathLike[str]):
        """Read a TOML file (see :func:`read_toml_file`); errors name the file."""
        return cls.from_dict(read_toml_file(path))


def _drop_none(value: Any) -> Any:
    """TOML has no null: leave out keys whose value is None (their default is None too)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _check_none_options(kind: str, spec: ComponentSpec) -> None:
    import inspect

    from diffreg import registry

    nones = [k for k, v in spec.options.items() if v is None]
    if not nones:
        return
    try:
        params = registry.accepted_options(registry.get(kind, spec.name))
    except (KeyError, ValueError, TypeError):
        return
    for key in nones:
        param = params.get(key)
        if param is not None and param.default is not inspect.Parameter.empty and param.default is not None:
            raise ConfigError(
                f"{kind} {spec.name!r} option {key!r} is None, which TOML cannot store, and its default is "
                f"{param.default!r}; give a value or write the configuration as JSON"
            )


def _from_value(cls: type, key: str, value: Any) -> Any:
    nested = getattr(cls, "_nested", {})
    if key in nested and isinstance(value, Mapping):
        return nested[key].from_dict(value)
    return value


@attrs.frozen
class DiffusionConfig(_DictMixin):
    """Everything that defines a diffusion process, by name.

    Fields: ``schedule`` (default ``linear``), ``num_timesteps`` (T, default 1000),
    ``parameterization`` (mean type, default ``eps``), ``variance`` (default ``fixed_small``),
    ``loss`` (default ``mse``), ``timestep_sampler`` (default ``uniform``), ``rescale_timesteps``
    (default ``False``: the model is called with int64 timestep indices; ``True``: with the float
    ``t * 1000 / num_timesteps``, improved-diffusion's ``rescale_timesteps`` flag, so a model
    trained with it sees timesteps in [0, 1000) whatever T), ``format_version``.
    Each component field accepts a name or ``{"name": ..., **options}``.

    Example::

        DiffusionConfig.from_dict({"schedule": "cosine", "num_timesteps": 1000,
                                   "parameterization": "eps", "variance": "learned_range",
                                   "loss": "rescaled_mse"})

    Raises:
        ConfigError: for a malformed field, an unknown key or a newer format version. Names and
            options are checked against the registry when the diffusion is built
            (:meth:`validate`).
    """

    _kinds: ClassVar[dict[str, str]] = {
        "schedule": "schedule",
        "parameterization": "parameterization",
        "variance": "variance",
        "loss": "loss",
        "timestep_sampler": "timestep_sampler",
    }

    schedule: ComponentSpec = _spec("schedule", "linear")
    num_timesteps: int = attrs.field(default=1000, validator=_check_num_timesteps)
    parameterization: ComponentSpec = _spec("parameterization", "eps")
    variance: ComponentSpec = _spec("variance", "fixed_small")
    loss: ComponentSpec = _spec("loss", "mse")
    timestep_sampler: ComponentSpec = _spec("timestep_sampler", "uniform")
    rescale_timesteps: bool = attrs.field(default=False, validator=_check_bool)
    format_version: int = attrs.field(default=FORMAT_VERSION, validator=_check_format_version)

    @classmethod
    def coerce(cls, value: DiffusionConfig | Mapping[str, Any]) -> DiffusionConfig:
        """Accept a DiffusionConfig or a plain dict."""
        if isinstance(value, DiffusionConfig):
            return value
        return cls.from_dict(value)

    def validate(self, registry=None) -> DiffusionConfig:
        """Check every name resolves and every option fits its factory; return ``self``.

        Raises ``UnknownComponentError`` / ``ComponentOptionError`` naming the component.
        """
        from diffreg import registry as registry_module

        reg = registry or registry_module.default_registry()
        for kind, spec, positional in (
            ("schedule", self.schedule, 1),
            ("parameterization", self.parameterization, 0),
            ("variance", self.variance, 0),
            ("loss", self.loss, 0),
            ("timestep_sampler", self.timestep_sampler, 1),
        ):
            registry_module.check_options(reg.get(kind, spec.name), spec.options, positional)
        return self


def _coerce_diffusion(value: Any) -> DiffusionConfig:
    return DiffusionConfig.coerce(value)


# the checkpoint's configuration lives in diffreg.checkpoint_config (it builds on the classes above)
from diffreg.checkpoint_config import CheckpointConfig, SamplingConfig  # noqa: E402

__all__ = [
    "FORMAT_VERSION",
    "MAX_NESTING",
    "MAX_TIMESTEPS",
    "CheckpointConfig",
    "ComponentSpec",
    "DiffusionConfig",
    "SamplingConfig",
    "parse_json",
    "parse_toml",
    "read_toml_file",
]
