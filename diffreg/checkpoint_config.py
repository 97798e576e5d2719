"""What a checkpoint's configuration holds besides the diffusion: :class:`CheckpointConfig` (the
model, the data) and :class:`SamplingConfig` (the sampling defaults it recommends).

Both are importable from :mod:`diffreg.config` as before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from diffreg.config import (
    FORMAT_VERSION,
    MAX_TIMESTEPS,
    ComponentSpec,
    DiffusionConfig,
    _check_format_version,
    _coerce_diffusion,
    _DictMixin,
)
from diffreg.errors import ConfigError, UnknownComponentError
from diffreg.named_grids import NamedGrid, coerce_named_grids
from diffreg.validation import check_guidance_scale

#: Most values in one sample (``data.shape``'s product): 64 Mi, a 3 x 4096 x 4096 image fits. A
#: header's shape drives the sampler's allocations, so a hostile one must not ask for terabytes.
MAX_SAMPLE_VALUES = 1 << 26


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
    if shape is not None and (len(shape) > 8 or math.prod(shape) > MAX_SAMPLE_VALUES):
        raise ConfigError(
            f"checkpoint data.shape {list(shape)[:9]!r} is too large: at most 8 dimensions and "
            f"{MAX_SAMPLE_VALUES:,} values per sample"
        )
    n = data.get("num_classes")
    if n is not None and not (_is_int(n) and n >= 1):
        raise ConfigError(f"checkpoint data.num_classes must be a positive int or null, got {n!r}")
    w = data.get("guidance_scale")
    if w is not None:
        try:
            check_guidance_scale(w, "checkpoint data.guidance_scale")
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{exc} (or null)") from None


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
        final_level: ``"data"`` (default: the last step goes to sigma = 0) or ``"t_min"`` (it goes
            to the process's least noisy level, whose state is the sample: diffusers' DDIM/PNDM
            ``set_alpha_to_one=False``, recorded when such a folder is loaded); see
            :func:`diffreg.sampling.levels.final_level`. Written only when ``"t_min"``.
        grids: named grids, name -> :class:`~diffreg.named_grids.NamedGrid` (a sampler and the
            explicit times fitted for it, as ``diffreg optimize-steps --save-to-checkpoint`` stores
            them); ``diffreg sample --grid NAME`` and ``sample_options(grid=NAME)`` use one. Names
            match ``[A-Za-z0-9][A-Za-z0-9_.-]*`` (at most 64 characters) and are not registered grid
            kinds (``trailing``, ...). Empty by default, and then not written (files stay as before).

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
    grids: dict[str, NamedGrid] = attrs.field(factory=dict, converter=coerce_named_grids, hash=False)
    final_level: str = attrs.field(default="data")

    @final_level.validator
    def _check_final_level(self, attribute, value):
        from diffreg.sampling.levels import FINAL_LEVELS

        if value not in FINAL_LEVELS:
            raise ConfigError(
                f"sampling.final_level must be one of {', '.join(repr(f) for f in FINAL_LEVELS)}, got {value!r}"
            )

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
        ``dynamic_threshold``, and ``final_level`` when it is ``"t_min"`` (the guidance goes with
        a scale: :meth:`guidance_spec`)."""
        out: dict[str, Any] = {"clip_denoised": self.clip, "dynamic_threshold": self.dynamic_threshold}
        if self.final_level != "data":
            out["final_level"] = self.final_level
        return out

    def to_dict(self) -> dict[str, Any]:
        """As the other configs; ``guidance``, ``grid``, ``sampler``, ``steps`` and ``grids`` only
        when set (files stay as before otherwise)."""
        out = super().to_dict()
        out["grids"] = {name: preset.to_dict() for name, preset in self.grids.items()}
        for key in ("guidance", "grid", "sampler", "steps", "grids"):
            if out.get(key) is None or out.get(key) == {}:
                out.pop(key, None)
        if out.get("final_level") == "data":
            out.pop("final_level")
        return out

    def named_grid(self, name: str) -> NamedGrid:
        """The named grid ``name`` (see ``grids``).

        Raises:
            UnknownComponentError: (a ``KeyError``) no such named grid, listing those there are.
        """
        if name in self.grids:
            return self.grids[name]
        names = sorted(self.grids)
        raise UnknownComponentError(
            "named grid",
            name,
            names,
            f"no named grid {name!r} in this checkpoint; its named grids: " + (", ".join(names) or "(none)"),
        )

    def with_named_grid(
        self, name: str, preset: NamedGrid | Mapping[str, Any], *, default: bool = True
    ) -> SamplingConfig:
        """A copy with ``preset`` stored as ``grids[name]`` (replacing one of that name), and, with
        ``default``, its sampler, steps and grid made the defaults too.

        Raises:
            ConfigError: a bad name or preset.
        """
        grids = coerce_named_grids({**self.grids, name: preset})
        new = grids[name]
        if not default:
            return attrs.evolve(self, grids=grids)
        return attrs.evolve(self, grids=grids, grid=new.grid, sampler=new.sampler, steps=new.steps)

    def sample_options(self, grid: str | None = None) -> dict[str, Any]:
        """The recorded sampler, its options, ``steps`` and ``grid`` as keyword arguments of
        :meth:`diffreg.Diffusion.sample` (only those recorded; an explicit grid brings its length
        as ``steps``): ``diffusion.sample(model, shape, **cfg.sampling.sample_options(),
        **cfg.sampling.driver_options())``. With ``grid=NAME``, those of the named grid
        (:meth:`named_grid`: its sampler with its options, its steps and times) instead.

        Raises:
            UnknownComponentError: ``grid`` names no named grid of this configuration.
        """
        if grid is not None:
            return self.named_grid(grid).sample_options()
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
