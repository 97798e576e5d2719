"""Configuration by name: frozen attrs classes that round-trip through dicts, JSON and TOML.

A component is written as its name (``"cosine"``) or as a table with a ``name`` and options
(``{"name": "cosine", "max_beta": 0.999}``). Configurations hold names and options only; every
derived table is computed from them when a :class:`~diffreg.Diffusion` is built, so the two can
never disagree. Change a configuration with ``attrs.evolve``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs

from diffreg.errors import ConfigError, closest
from diffreg.validation import check_guidance_scale

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Version of the configuration format written by this diffreg. Newer files are refused.
FORMAT_VERSION = 1
#: Deepest nesting of lists and tables accepted in an option value (real options nest 1-2 levels;
#: a bound keeps hostile input from exhausting Python's recursion limit).
MAX_NESTING = 32
#: Largest number of diffusion timesteps T accepted (guided-diffusion trains with T <= 4000); the
#: float64 tables cost 8 bytes x 9 tables x T.
MAX_TIMESTEPS = 100_000


def _json_value(value: Any, where: str, depth: int = 0) -> Any:
    """Check that ``value`` is a JSON/TOML value (tuples become lists) nested at most
    :data:`MAX_NESTING` levels."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth >= MAX_NESTING:
        raise ConfigError(f"{where}: option values are nested more than {MAX_NESTING} levels deep")
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where, depth + 1) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, where, depth + 1) for k, v in value.items()}
    raise ConfigError(f"{where}: option values must be JSON values, got {type(value).__name__}")


def parse_json(text: str, what: str = "JSON configuration") -> Any:
    """``json.loads`` with one-line :class:`ConfigError` for invalid or too deeply nested text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid {what}: {exc}") from exc
    except RecursionError:
        raise ConfigError(
            f"invalid {what}: lists or tables nested too deeply (at most {MAX_NESTING} levels)"
        ) from None


def parse_toml(text: str, what: str = "TOML configuration") -> dict[str, Any]:
    """``tomllib.loads`` with one-line :class:`ConfigError` for invalid or too deeply nested text."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid {what}: {exc}") from exc
    except RecursionError:
        raise ConfigError(
            f"invalid {what}: arrays or tables nested too deeply (at most {MAX_NESTING} levels)"
        ) from None


def read_toml_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The TOML file ``path`` as a dict. TOML is UTF-8 by definition (TOML 1.0, "Spec").

    Raises:
        FileNotFoundError: no such file. ConfigError: not UTF-8 (naming the byte offset), invalid
        TOML, or nested too deeply; each naming the file.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"configuration {str(path)!r} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
            "TOML files must be UTF-8"
        ) from None
    return parse_toml(text, f"TOML in {str(path)!r}")


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_data(data: Any) -> None:
    """The ``data`` table of a checkpoint: ``shape`` (positive ints), ``num_classes`` (None or a
    positive int), ``guidance_scale`` (None or a finite number)."""

    if not isinstance(data, Mapping):
        raise ConfigError(f"checkpoint data must be a table, got {type(data).__name__}: {data!r}")
    shape = data.get("shape")
    if shape is not None and (
        not isinstance(shape, (list, tuple)) or not shape or not all(_is_int(s) and s >= 1 for s in shape)
    ):
        raise ConfigError(f"checkpoint data.shape must be a list of positive ints such as [1, 8, 8], got {shape!r}")
    n = data.get("num_classes")
    if n is not None and not (_is_int(n) and n >= 1):
        raise ConfigError(f"checkpoint data.num_classes must be a positive int or null, got {n!r}")
    w = data.get("guidance_scale")
    if w is not None:
        try:
            check_guidance_scale(w, "checkpoint data.guidance_scale")
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{exc} (or null)") from None


def _coerce_diffusion(value: Any) -> DiffusionConfig:
    return DiffusionConfig.coerce(value)


def _check_clip(instance, attribute, value):
    if not isinstance(value, bool):
        raise ConfigError(
            f"sampling.clip must be true (clip the predicted x_0 to [-1, 1], for data in that range) or "
            f"false (no clipping), got {value!r}"
        )


def _check_threshold(instance, attribute, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
        raise ConfigError(
            f"sampling.dynamic_threshold must be a percentile in (0, 1] such as 0.995, or null (off), got {value!r}"
        )


def _coerce_grid(value: Any) -> ComponentSpec | None:
    """``sampling.grid``: a name, a table with ``name``, or a list of process times (explicit)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ComponentSpec("explicit", {"times": list(value)})
    return ComponentSpec.coerce(value, "sampling.grid")


@attrs.frozen
class SamplingConfig(_DictMixin):
    """Sampling defaults a checkpoint recommends, chosen from its training data; the command line
    (``--clip/--no-clip``, ``--dynamic-threshold``) and keyword arguments override them.

    Fields:
        clip: clip the predicted x_0 to [-1, 1] at every step (guided-diffusion's
            ``clip_denoised``): right for images scaled to [-1, 1], wrong for data that reaches
            beyond (2-D toys reach +-1.5), which training records as ``False``. Checkpoints written
            before this field existed load with ``True``, the behaviour they were sampled with.
        dynamic_threshold: a percentile p in (0, 1] for dynamic thresholding (Saharia et al. 2022,
            "Imagen", section 2.3), or ``None`` (off).
        guidance: the guidance method for a class-conditional model (kind ``guidance``: a name
            or ``{"name": "cfg_rescale", "phi": 0.7}``), or ``None`` (``cfg``); its scale is
            ``data.guidance_scale``. See docs/guidance.md.
        grid: the default grid (kind ``grid``): a name, ``{"name": ..., **options}``, or a list of
            process times (stored as ``{"name": "explicit", "times": [...]}``, e.g. the result of
            ``diffreg optimize-steps``), or ``None`` (the sampler's own, else ``trailing``).
        sampler: the default sampler (a name or ``{"name": ..., **options}``), or ``None`` (``ddim``).
        steps: the default step count, an int >= 1, or ``None``; an explicit grid's length when
            the grid is explicit (a different value is refused).

    Use :meth:`driver_options` and :meth:`sample_options` to pass them to
    :meth:`diffreg.Diffusion.sample`.
    """

    clip: bool = attrs.field(default=True, validator=_check_clip)
    dynamic_threshold: float | None = attrs.field(default=None, validator=_check_threshold)
    guidance: ComponentSpec | None = attrs.field(
        default=None, converter=lambda v: None if v is None else ComponentSpec.coerce(v, "sampling.guidance")
    )
    grid: ComponentSpec | None = attrs.field(default=None, converter=lambda v: _coerce_grid(v))
    sampler: ComponentSpec | None = attrs.field(
        default=None, converter=lambda v: None if v is None else ComponentSpec.coerce(v, "sampling.sampler")
    )
    steps: int | None = attrs.field(default=None)

    @steps.validator
    def _check_steps(self, attribute, value):
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TIMESTEPS:
            raise ConfigError(f"sampling.steps must be an int in 1..{MAX_TIMESTEPS:,} or null, got {value!r}")
        levels = self.grid_levels()
        if levels is not None and levels != value:
            raise ConfigError(
                f"sampling.steps is {value} but the explicit sampling.grid has {levels} levels; give steps={levels} "
                "or leave it out"
            )

    def grid_levels(self) -> int | None:
        """The number of levels of an explicit ``grid`` (``times`` or ``sigmas``), else ``None``."""
        if self.grid is None or self.grid.name != "explicit":
            return None
        values = self.grid.options.get("times", self.grid.options.get("sigmas"))
        return len(values) if isinstance(values, list) else None

    @classmethod
    def coerce(cls, value: SamplingConfig | Mapping[str, Any] | None) -> SamplingConfig:
        """Accept a SamplingConfig, a plain dict or ``None`` (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, SamplingConfig):
            return value
        return cls.from_dict(value)

    def driver_options(self) -> dict[str, Any]:
        """Keyword options of :meth:`diffreg.Diffusion.sample`: ``clip_denoised`` and
        ``dynamic_threshold`` (the guidance goes with a scale: :meth:`guidance_spec`)."""
        return {"clip_denoised": self.clip, "dynamic_threshold": self.dynamic_threshold}

    def to_dict(self) -> dict[str, Any]:
        """As the other configs; ``guidance``, ``grid``, ``sampler`` and ``steps`` only when set
        (files stay as before otherwise)."""
        out = super().to_dict()
        for key in ("guidance", "grid", "sampler", "steps"):
            if out.get(key) is None:
                out.pop(key, None)
        return out

    def sample_options(self) -> dict[str, Any]:
        """The recorded sampler, its options, ``steps`` and ``grid`` as keyword arguments of
        :meth:`diffreg.Diffusion.sample` (only those recorded; an explicit grid brings its length
        as ``steps``): ``diffusion.sample(model, shape, **cfg.sampling.sample_options(),
        **cfg.sampling.driver_options())``."""
        out: dict[str, Any] = {}
        if self.sampler is not None:
            out["sampler"] = self.sampler.name
            out.update(self.sampler.options)
        steps = self.steps if self.steps is not None else self.grid_levels()
        if steps is not None:
            out["steps"] = steps
        if self.grid is not None:
            out["grid"] = self.grid.to_dict()
        return out

    def guidance_spec(self) -> dict[str, Any] | None:
        """The recommended guidance as ``guidance=`` of :meth:`diffreg.Diffusion.sample`
        (``{"name": ..., **options}``), or ``None``."""
        return None if self.guidance is None else {"name": self.guidance.name, **self.guidance.options}

    @classmethod
    def for_data(cls, x: Any) -> SamplingConfig:
        """The defaults for training data ``x`` (a tensor or array ``[N, ...]``): clip only images
        (``[N, C, H, W]``) that lie within [-1, 1]; vectors such as 2-D toys are never clipped."""
        import torch

        x = torch.as_tensor(x)
        if x.ndim == 4 and x.numel():
            lo, hi = float(x.min()), float(x.max())
            return cls(clip=bool(math.isfinite(lo) and math.isfinite(hi) and -1.0 <= lo and hi <= 1.0))
        return cls(clip=False)


@attrs.frozen
class CheckpointConfig(_DictMixin):
    """What a checkpoint carries besides its weights: the diffusion, the model, and the data.

    ``model`` is a :class:`ComponentSpec` of kind ``model`` whose options rebuild the network;
    ``data`` describes the samples: ``{"shape": [C, H, W], "num_classes": int | None,
    "dataset": str}`` (num_classes counts real classes; the null class for classifier-free
    guidance is extra); ``sampling`` holds the sampling defaults recommended for this data
    (:class:`SamplingConfig`: clipping, dynamic thresholding).
    """

    _nested: ClassVar[dict[str, type]] = {"diffusion": DiffusionConfig, "sampling": SamplingConfig}

    diffusion: DiffusionConfig = attrs.field(converter=_coerce_diffusion)
    model: ComponentSpec = attrs.field(converter=lambda v: ComponentSpec.coerce(v, "model"))
    data: dict[str, Any] = attrs.field(factory=dict, hash=False, validator=lambda i, a, v: _check_data(v))
    sampling: SamplingConfig = attrs.field(factory=SamplingConfig, converter=SamplingConfig.coerce)
    format_version: int = attrs.field(default=FORMAT_VERSION, validator=_check_format_version)

    @classmethod
    def coerce(cls, value: CheckpointConfig | Mapping[str, Any]) -> CheckpointConfig:
        """Accept a CheckpointConfig or a plain dict (ConfigError if malformed)."""
        if isinstance(value, CheckpointConfig):
            return value
        return cls.from_dict(value)

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        """One sample's shape ``(C, H, W)`` or ``(D,)``, or None if not recorded."""
        shape = self.data.get("shape")
        return tuple(int(s) for s in shape) if shape else None

    @property
    def num_classes(self) -> int | None:
        """Number of real classes, or None for an unconditional model."""
        n = self.data.get("num_classes")
        return int(n) if n is not None else None
