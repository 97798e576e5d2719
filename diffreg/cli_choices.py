"""What ``diffreg sample`` makes of its flags and the checkpoint's recorded defaults: outputs,
sampler options, grid, guidance, clipping; and the gathering of samples across ranks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch

from diffreg.sampling import resolve_sampler
from diffreg.sampling.grid import explicit_length


def _check_outputs(
    output: Path | None, npz: Path | None, inputs: dict[str, Path | None]
) -> tuple[Path | None, Path | None]:
    """The output paths to write (``''`` or ``'.'`` skips one), checked before sampling: at least
    one; each writable (:func:`diffreg.fileio.check_writable`: not a directory, an existing folder,
    a name the file system takes, not a read-only file); not the same file twice; not one of the
    ``inputs`` (such as the checkpoint).

    Raises ``ValueError`` or ``OSError`` naming the flag and the path.
    """
    from diffreg.fileio import check_writable, refuse_inputs_as_outputs

    paths: dict[str, Path | None] = {}
    for flag, value in (("--output", output), ("--npz", npz)):
        paths[flag] = None if value is None or str(value) in ("", ".") else Path(value)
    if all(p is None for p in paths.values()):
        raise ValueError("--output and --npz are both empty: nothing to write (give at least one file)")
    refuse_inputs_as_outputs(paths, inputs)
    for flag, path in paths.items():
        if path is not None:
            try:
                check_writable(path)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"{flag} {exc}") from None
            except OSError as exc:
                raise OSError(exc.errno, f"{flag} {exc.strerror or exc}") from None
    return paths["--output"], paths["--npz"]


def _parse_options(pairs: tuple[str, ...], flag: str = "--option") -> dict[str, Any]:
    """``KEY=VALUE`` pairs (a JSON value, else the plain string) as a dict; ``inf``, ``+inf``,
    ``-inf`` and ``infinity`` (any case) are floats, as JSON's ``Infinity`` (e.g. ``max_ratio=inf``).
    ``ValueError`` naming ``flag`` and the pair when one is malformed."""
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE")
        key, raw = pair.split("=", 1)
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            text = raw.strip().lower().lstrip("+")
            infinite = text in ("inf", "infinity") or text in ("-inf", "-infinity")
            options[key.strip()] = float(raw.strip().lower().replace("infinity", "inf")) if infinite else raw
        except RecursionError:
            raise ValueError(f"{flag} {key.strip()}=...: the value is nested too deeply (at most 32 levels)") from None
    return options


def _grid_choice(grid_spec: str | None, spacing: str | None, sampler_obj: Any) -> Any:
    """The grid of ``diffreg sample``: ``--grid`` (a name, or JSON options / a JSON list of
    times), ``--spacing`` (its older spelling), or the sampler's own (``--option sigmas=...``).

    Raises:
        ValueError: more than one of them chooses the grid (naming both), or unparsable JSON.
    """
    grid: Any = None
    if grid_spec is not None:
        text = grid_spec.strip()
        if text.startswith(("{", "[")):
            try:
                grid = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--grid {grid_spec[:80]!r}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise ValueError(f"--grid {grid_spec[:40]!r}...: lists or tables nested too deeply") from None
        else:
            grid = text
        if spacing is not None:
            raise ValueError(
                f"--grid {grid_spec!r} and --spacing {spacing!r} (its older spelling) both given; give one"
            )
    elif spacing is not None:
        grid = spacing
    own = getattr(sampler_obj, "grid", None)
    if grid is not None and own is not None:
        given = f"--grid {grid_spec!r}" if grid_spec is not None else f"--spacing {spacing!r}"
        raise ValueError(f"{given} and the sampler option sigmas={own!r} both choose the grid; give one")
    if grid is not None:
        from diffreg.errors import UnknownComponentError
        from diffreg.named_grids import NAME_PATTERN
        from diffreg.sampling import resolve_grid

        try:
            resolve_grid(grid)  # an unknown name or option fails before the model is loaded ...
        except UnknownComponentError:
            if not (isinstance(grid, str) and grid_spec is not None and NAME_PATTERN.fullmatch(grid)):
                raise
            return GridName(grid)  # ... unless it names a grid of the checkpoint (_named_choice)
    return grid if grid is not None else own


def _spec_text(spec: Any) -> str:
    """A component spec for a message: its name, or its JSON table when it has options."""
    value = spec.to_dict()
    return value if isinstance(value, str) else json.dumps(value)


class GridName(str):
    """``--grid NAME`` where NAME is no registered grid: perhaps one of the checkpoint's named
    grids, decided once the checkpoint is read (:func:`_named_choice`)."""


def _named_choice(
    recorded: Any, name: str, sampler: str | None, options: dict, steps: int | None
) -> tuple[str, Any, int, Any]:
    """``diffreg sample``'s sampler, steps and grid for ``--grid NAME``, a named grid of the
    checkpoint (``recorded.grids``, see :class:`~diffreg.named_grids.NamedGrid`): its times; its
    sampler (with its options, under ``--option``'s) when no ``--sampler`` is given, else
    ``--sampler`` with a note on stderr that the grid was fitted for another; its steps.

    Returns:
        ``(sampler name, sampler object, steps, grid)``.

    Raises:
        UnknownComponentError: NAME is neither a registered grid nor a named grid of the checkpoint
            (the registered ones and the checkpoint's named ones listed).
        ValueError: ``--steps`` other than the named grid's levels.
    """
    from diffreg.config import ComponentSpec
    from diffreg.errors import UnknownComponentError
    from diffreg.sampling import resolve_grid

    if name not in recorded.grids:
        try:
            resolve_grid(str(name))
        except UnknownComponentError as exc:
            from diffreg.errors import closest

            names = sorted(recorded.grids)
            message = (
                str(exc).split("; did you mean")[0] + f"; this checkpoint's named grids: {', '.join(names) or '(none)'}"
            )
            hint = closest(name, [*exc.known, *names])
            raise UnknownComponentError(
                "grid", name, exc.known, message + (f"; did you mean {hint!r}?" if hint else "")
            ) from None
        raise AssertionError(f"grid {name!r} resolves now")  # pragma: no cover (registered since)
    preset = recorded.grids[name]
    if steps is not None and steps != preset.steps:
        raise ValueError(
            f"--steps {steps} and --grid {name} ({preset.steps} levels) disagree; leave --steps out or give "
            f"--steps {preset.steps}"
        )
    fitted = preset.sampler
    if sampler is None:
        sampler, options = fitted.name, {**fitted.options, **options}
    if (sampler, options) != (fitted.name, fitted.options):
        click.echo(
            f"note: grid {name!r} was fitted for sampler {_spec_text(fitted)}; sampling it with "
            f"{_spec_text(ComponentSpec(sampler, options))}",
            err=True,
        )
    sampler_obj = resolve_sampler(sampler, options)
    if getattr(sampler_obj, "grid", None) is not None:
        raise ValueError(
            f"--grid {name} and the sampler option sigmas={sampler_obj.grid!r} both choose the grid; give one"
        )
    return sampler, sampler_obj, preset.steps, preset.grid.to_dict()


def _recorded_choice(
    recorded: Any, sampler: str | None, sampler_obj: Any, options: dict, steps: int | None, grid: Any
) -> tuple[str, Any, int, Any]:
    """``diffreg sample``'s sampler, steps and grid once the checkpoint's sampling defaults
    (``recorded``, a :class:`~diffreg.config.SamplingConfig`) are known: the flags win; with no
    ``--sampler`` the recorded sampler (its options under ``--option``'s); with no grid chosen
    (``--grid``, ``--spacing``, ``sigmas=``) the recorded grid, unless ``--steps`` asks for another
    length than it has; then the recorded steps, else 50.

    Returns:
        ``(sampler name, sampler object, steps, grid)``.
    """
    if sampler is None:
        if recorded.sampler is not None:
            sampler = recorded.sampler.name
            sampler_obj = resolve_sampler(sampler, {**recorded.sampler.options, **options})
            grid = grid if grid is not None else getattr(sampler_obj, "grid", None)
        else:
            sampler = "ddim"
            if sampler_obj is None:  # --option's were not ddim's: this names them and what ddim accepts
                sampler_obj = resolve_sampler(sampler, options)
    levels = recorded.grid_levels()
    recorded_steps = recorded.steps if recorded.steps is not None else levels
    if grid is None and recorded.grid is not None and (steps is None or levels is None or steps == levels):
        grid = recorded.grid.to_dict()
        fitted = recorded.sampler
        if levels is not None and fitted is not None and sampler not in (fitted.name, None):
            click.echo(
                f"note: the checkpoint's grid was fitted for sampler {_spec_text(fitted)}; sampling it with {sampler}",
                err=True,
            )
    elif grid is None and recorded.grid is not None:
        click.echo(
            f"note: --steps {steps} differs from the {levels} levels of the checkpoint's grid; using the default grid",
            err=True,
        )
        recorded_steps = None
    if steps is None:
        given = explicit_length(grid) if grid is not None else None  # --grid '[999, 500, 20]': its length
        steps = given if given is not None else recorded_steps if recorded_steps is not None else 50
    return sampler, sampler_obj, steps, grid


def _guidance_choice(name: str | None, pairs: tuple[str, ...], default: dict[str, Any] | None, scale: float) -> Any:
    """The ``guidance=`` of ``diffreg sample``: ``--guidance`` with its ``--guidance-option``s, else
    the checkpoint's recorded guidance (its options overridden by ``--guidance-option``), else
    ``None`` (cfg). Unknown names and options fail here, before any sampling.

    Raises:
        ValueError: a malformed KEY=VALUE; UnknownComponentError / ComponentOptionError.
    """
    from diffreg.sampling.guidance import resolve_guidance

    options = _parse_options(pairs, "--guidance-option")
    if name is not None:
        spec = {"name": name, **options}
    elif default is not None:
        spec = {**default, **options}
    elif options:
        raise ValueError(f"--guidance-option {', '.join(pairs)} given without --guidance NAME")
    else:
        return None
    guidance = resolve_guidance(spec)
    assert guidance is not None
    guidance.check_scale(scale)
    return guidance


def _clip_text(clipping: dict[str, Any]) -> str:
    threshold = clipping.get("dynamic_threshold")
    text = "clip to [-1, 1]" if clipping.get("clip_denoised") else "no clipping"
    text += f", dynamic threshold {threshold:g}" if threshold is not None else ""
    return text + (", ending at t_min" if clipping.get("final_level") == "t_min" else "")


def _gather_shares(x: torch.Tensor, share: int, total: int, device: str) -> torch.Tensor:
    """All ranks' samples, in sample order, on every rank (shares padded to equal size)."""
    import torch.distributed as dist

    backend_device = device if dist.get_backend() == "nccl" else "cpu"
    padded = torch.zeros(share, *x.shape[1:], dtype=x.dtype)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded, device=backend_device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded.to(backend_device))
    return torch.cat([p.cpu() for p in parts])[:total]


_threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    envvar="DIFFREG_THREADS",
    help="CPU threads for torch (env DIFFREG_THREADS). Default: OMP_NUM_THREADS if set, else the cores "
    "the load average leaves idle (at least 1). On a shared machine give --threads 1.",
)
