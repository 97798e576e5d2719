"""The ``diffreg`` command: sample, train, ema, info, plugins, list."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from diffreg import __version__, registry
from diffreg.cli_support import (  # noqa: F401  (image_grid, scatter_image, to_uint8_images: public here too)
    MAX_GRID,
    PictureError,
    check_npz_name,
    image_grid,
    label_columns,
    parse_labels,
    picture_format,
    recorded_labels,
    run_picture,
    scatter_image,
    set_threads,
    to_uint8_images,
    write_run,
)
from diffreg.errors import (
    AmbiguousComponentError,
    CheckpointError,
    ComponentOptionError,
    ConfigError,
    PluginError,
    PluginWarning,
    SamplingError,
    UnknownComponentError,
)
from diffreg.sampling import resolve_sampler
from diffreg.validation import check_guidance_scale, resolve_device

MAX_SAMPLES = 10_000_000
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_USER_ERRORS = (
    UnknownComponentError,
    AmbiguousComponentError,
    ComponentOptionError,
    ConfigError,
    CheckpointError,
    PluginError,
    SamplingError,
    FileNotFoundError,
    FloatingPointError,
    ValueError,
    TypeError,
    ImportError,  # an optional dependency (diffusers) that is missing: the message says how to install it
)


def _user_errors(fn):
    """Turn exceptions into a one-line message and exit code 1 (``DIFFREG_DEBUG=1``: the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
            raise
        except (Exception, SystemExit, GeneratorExit) as exc:  # SystemExit/GeneratorExit: from a component's code
            if os.environ.get("DIFFREG_DEBUG"):
                raise
            raise _one_line(exc) from exc

    return wrapper


_OOM_MESSAGES = ("out of memory", "not enough memory", "can't allocate memory", "failed to allocate")


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), or a RuntimeError in which an allocator reports no memory
    (CPU: "DefaultCPUAllocator: not enough memory" / "can't allocate memory"; MPS)."""
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def _plugin_at_fault(exc: BaseException) -> tuple[str, str] | None:
    """``("plugin 'name' (dist version), at file:line", name)`` if the innermost frame of ``exc``'s traceback
    that belongs to a loaded third-party plugin's package exists (the plugin's code raised it, or
    called what raised it), else None."""
    try:
        plugins = {
            p.module.split(".")[0]: p
            for p in registry.plugins()
            if p.distribution not in (None, "diffreg") and not p.module.startswith("diffreg")
        }
    except Exception:  # pragma: no cover - the registry itself is broken: no attribution
        return None
    found = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        plugin = plugins.get(str(frame.f_globals.get("__name__", "")).split(".")[0])
        if plugin is not None:
            found = (
                f"plugin {plugin.name!r} ({plugin.distribution} {plugin.version}), at {frame.f_code.co_filename}:{lineno}",
                plugin.name,
            )
    return found


def _one_line(exc: BaseException) -> click.ClickException:
    """The library's user-facing errors as they are, OS errors in the OS's own words (permissions,
    full disk, names too long), running out of memory with the fix, a plugin's fault (an unexpected
    exception, ``sys.exit`` or ``GeneratorExit`` from its code) naming the plugin, anything else as
    unexpected."""
    if isinstance(exc, (SystemExit, GeneratorExit)):
        where = _plugin_at_fault(exc)
        last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        origin = where[0] if where else (f"code at {last[0].filename}:{last[0].lineno}" if last else "a component's code")
        what = f"SystemExit({exc.code!r})" if isinstance(exc, SystemExit) else "GeneratorExit"
        return click.ClickException(
            f"{origin} raised {what} before the command finished (what it did not write yet was not written); "
            "a component must raise an exception, not exit"
            + (f": report it to the plugin's authors, or leave it out with DIFFREG_DISABLE_PLUGINS={where[1]}" if where else "")
        )
    if _is_out_of_memory(exc):
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return click.ClickException(
            f"out of memory ({detail[:200]}); lower --batch-size (or use a smaller model or data size)"
        )
    if isinstance(exc, _USER_ERRORS):
        return click.ClickException(str(exc))
    if isinstance(exc, OSError):
        return click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
    where = _plugin_at_fault(exc)
    if where is not None:
        return click.ClickException(
            f"{where[0]}: {type(exc).__name__}: {exc} (a fault in that plugin: report it to its authors, or leave "
            f"it out with DIFFREG_DISABLE_PLUGINS={where[1]}; DIFFREG_DEBUG=1 shows the traceback)"
        )
    return click.ClickException(
        f"unexpected {type(exc).__name__}: {exc} (set DIFFREG_DEBUG=1 for the traceback, and please report it)"
    )


_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_python_formatwarning = warnings.formatwarning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """diffreg's own warnings (plugins, environment lists, options) as ``warning: <message>``, one
    line without the source path; other libraries' warnings as Python formats them."""
    if issubclass(category, PluginWarning) or str(filename).startswith(_PACKAGE_DIR):
        return f"warning: {message}\n"
    return _python_formatwarning(message, category, filename, lineno, line)


@click.group()
@click.version_option(__version__, prog_name="diffreg")
def main() -> None:
    """Diffusion models where every part is a plugin chosen by name."""
    previous = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    click.get_current_context().call_on_close(lambda: setattr(warnings, "formatwarning", previous))


# -- plugins and list -----------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_user_errors
def plugins(as_json: bool) -> None:
    """Loaded plugins (distribution, version, what each registered), then name collisions (a bare
    name several plugins registered), then the failed plugins."""
    loaded = registry.plugins()
    failed = registry.failures()
    collisions = registry.default_registry().collisions()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "plugins": [
                        {
                            "name": p.name,
                            "distribution": p.distribution,
                            "version": p.version,
                            "module": p.module,
                            "aliases": list(p.aliases),
                            "components": [
                                {"kind": c.kind, "name": c.name, "qualified_name": c.qualified_name}
                                for c in p.components
                            ],
                        }
                        for p in loaded
                    ],
                    "collisions": [
                        {"kind": kind, "name": name, "qualified_names": [c.qualified_name for c in cs]}
                        for (kind, name), cs in collisions.items()
                    ],
                    "failed": [
                        {"name": f.name, "distribution": f.distribution, "version": f.version, "reason": f.reason}
                        for f in failed
                    ],
                },
                indent=2,
            )
        )
        return
    for p in loaded:
        also = f"  also named: {', '.join(p.aliases)}" if p.aliases else ""
        click.echo(f"{p.name}  ({p.distribution or '?'} {p.version or ''}){also}".rstrip())
        by_kind: dict[str, list[str]] = {}
        for c in p.components:
            by_kind.setdefault(c.kind, []).append(c.name)
        for kind, names in by_kind.items():
            click.echo(f"  {kind:<17} {', '.join(names)}")
    if collisions:
        click.echo("\nname collisions (a bare name goes to the built-in, else is an error; use a qualified name):")
        for (kind, name), cs in collisions.items():
            click.echo(f"  {kind} {name!r}: {', '.join(c.qualified_name for c in cs)}")
    if failed:
        click.echo("\nfailed plugins:")
        for f in failed:
            click.echo(f"  {f.name}  ({f.distribution or '?'} {f.version or ''}): {f.reason}")


@main.command(name="list")
@click.argument("kind", required=False, type=click.Choice(registry.KINDS))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_user_errors
def list_components(kind: str | None, as_json: bool) -> None:
    """Registered components (of KIND, or all), by qualified name, with their source."""
    comps = registry.components(kind)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "kind": c.kind,
                        "name": c.name,
                        "qualified_name": c.qualified_name,
                        "distribution": c.distribution,
                        "version": c.version,
                        "metadata": {
                            k: v for k, v in c.metadata.items() if isinstance(v, (str, int, float, bool, type(None)))
                        },
                    }
                    for c in comps
                ],
                indent=2,
            )
        )
        return
    current = None
    for c in comps:
        if c.kind != current:
            current = c.kind
            click.echo(f"{c.kind}:")
        meta = ", ".join(f"{k}={v}" for k, v in c.metadata.items())
        click.echo(f"  {c.qualified_name:<32} {c.distribution or '?'} {c.version or ''}  {meta}".rstrip())


# -- info -------------------------------------------------------------------------------------------


@main.command()
@click.argument("checkpoint", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_user_errors
def info(checkpoint: Path | None, as_json: bool) -> None:
    """Configuration, parameter count and format of CHECKPOINT (default: the bundled digits model,
    as for `sample`); reads no weights. The data section shows `name` (the training config's
    `[data] name`) for what checkpoint files record as `dataset`."""
    from safetensors import safe_open

    from diffreg.checkpoint import bundled_checkpoint_path, read_config, read_metadata

    checkpoint = checkpoint or bundled_checkpoint_path()
    meta = read_metadata(checkpoint)
    cfg = read_config(checkpoint)
    with safe_open(str(checkpoint), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    params = sum(math.prod(s) for s in shapes.values())
    report = {
        "file": str(checkpoint),
        "bytes": checkpoint.stat().st_size,
        "format_version": int(meta.get("diffreg.format_version", "1")),
        "written_by": meta.get("diffreg.version"),
        "parameters": params,
        "tensors": len(shapes),
        "dtypes": dtypes,
        "config": _config_for_people(cfg.to_dict()),
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(
        f"{report['file']}: {params:,} parameters in {len(shapes)} tensors ({', '.join(dtypes)}), "
        f"{report['bytes'] / 1e6:.1f} MB"
    )
    click.echo(f"format {report['format_version']}, written by diffreg {report['written_by']}")
    click.echo(json.dumps(report["config"], indent=2))


def _config_for_people(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's configuration with ``data.dataset`` shown as ``data.name``, the key the
    training configuration (``[data] name``) uses for it."""
    data = config.get("data")
    if isinstance(data, dict) and "dataset" in data and "name" not in data:
        config = {**config, "data": {"name": data["dataset"], **{k: v for k, v in data.items() if k != "dataset"}}}
    return config


# -- sample -------------------------------------------------------------------------------------------


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
    """``KEY=VALUE`` pairs (a JSON value, else the plain string) as a dict; ``ValueError`` naming
    ``flag`` and the pair when one is malformed."""
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE")
        key, raw = pair.split("=", 1)
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
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
        from diffreg.sampling import resolve_grid

        resolve_grid(grid)  # an unknown name or option fails before the model is loaded
    return grid if grid is not None else own


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
    levels = recorded.grid_levels()
    recorded_steps = recorded.steps if recorded.steps is not None else levels
    if grid is None and recorded.grid is not None and (steps is None or levels is None or steps == levels):
        grid = recorded.grid.to_dict()
    elif grid is None and recorded.grid is not None:
        click.echo(
            f"note: --steps {steps} differs from the {levels} levels of the checkpoint's grid; using the default grid",
            err=True,
        )
        recorded_steps = None
    if steps is None:
        steps = recorded_steps if recorded_steps is not None else 50
    return sampler, sampler_obj, steps, grid


_threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    envvar="DIFFREG_THREADS",
    help="CPU threads for torch (env DIFFREG_THREADS). Default: OMP_NUM_THREADS if set, else the cores "
    "the load average leaves idle (at least 1). On a shared machine give --threads 1.",
)


@main.command()
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option(
    "--sampler",
    default=None,
    help="Any registered sampler (see `diffreg list sampler`). Default: the checkpoint's, else ddim.",
)
@click.option(
    "--steps",
    default=None,
    type=int,
    help="Sampling steps (1..T). Default: the checkpoint's (its optimized grid's length), else 50.",
)
@click.option(
    "--grid",
    "grid_spec",
    default=None,
    help="Noise levels to visit: a registered grid (trailing, leading, linspace, karras, exponential; "
    "`diffreg list grid`), JSON options like '{\"name\": \"karras\", \"rho\": 5}', or a JSON list of "
    "timesteps. Default: the sampler's own, else the checkpoint's (e.g. from `diffreg optimize-steps`), else "
    "trailing.",
)
@click.option(
    "--spacing",
    default=None,
    type=click.Choice(["leading", "trailing", "linspace"]),
    help="Older spelling of --grid for the three spacing grids.",
)
@click.option(
    "--eta",
    default=None,
    type=click.FloatRange(0.0, 1.0),
    help="DDIM stochasticity in 0..1 (0: deterministic, 1: as DDPM), for samplers that take eta.",
)
@click.option("--num-samples", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(0, 2**63 - 1),
    help="Sample k's noise depends only on (seed, k), not on the batch size (the samples agree to "
    "float rounding, about 1e-6).",
)
@click.option(
    "--class-label",
    default="all",
    show_default=True,
    help="'all' (cycle the classes; one picture column per class), 'none' (unconditional, recorded as "
    "label -1), an int, or a comma list such as 1,7 (cycled; one picture column per entry).",
)
@click.option(
    "--guidance-scale",
    default=None,
    type=float,
    help="Guidance scale w: eps = eps_uncond + w (eps_cond - eps_uncond), so 0 = unconditional, "
    "1 = conditional without guidance, > 1 = stronger (diffusers reads w <= 1 as 'no guidance', i.e. "
    "conditional). Default: the checkpoint's recommended value, else 1.",
)
@click.option(
    "--guidance",
    "guidance_name",
    default=None,
    metavar="NAME",
    help="Guidance method (cfg, cfg_rescale, interval, apg, cfg_zero_star, cfgpp, autoguidance; `diffreg list "
    "guidance`). Default: the checkpoint's, else cfg. See docs/guidance.md.",
)
@click.option(
    "--guidance-option",
    "guidance_option_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Option of the guidance method (JSON value), repeatable: phi=0.7, sigma_low=0.3, guide=weak.safetensors.",
)
@click.option(
    "--output",
    default="grid.png",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Picture of the samples, in the format its suffix names (.png, .jpg, .webp, ...); '' for none. "
    "A grid of the first --grid-max images, or a scatter plot of 2-D samples.",
)
@click.option(
    "--grid-max",
    default=100,
    show_default=True,
    type=click.IntRange(1, MAX_GRID),
    help="At most this many samples in the picture (the .npz holds them all).",
)
@click.option(
    "--npz",
    "npz_path",
    default="samples.npz",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Every sample, written before the picture: arr_0 uint8 NHWC images, arr_1 int64 labels (-1: none; "
    "no arr_1 for an unconditional checkpoint). '' for none.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option(
    "--dtype",
    "dtype_name",
    default="float32",
    show_default=True,
    type=click.Choice(list(DTYPES)),
    help="Model weights' dtype (the sampler state stays float32). float16 is for GPUs: on the CPU it is "
    "~20-35x slower than float32 (warned).",
)
@click.option(
    "--clip/--no-clip",
    default=None,
    help="Clip the predicted x_0 to [-1, 1] at every step. Default: the checkpoint's recorded choice "
    "(on for images in [-1, 1], off for 2-D toys and other data; on for checkpoints that record none).",
)
@click.option(
    "--dynamic-threshold",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=None,
    metavar="P",
    help="Dynamic thresholding at percentile P in (0, 1], e.g. 0.995 (Imagen). Default: the checkpoint's.",
)
@click.option("--option", "options", multiple=True, help="Extra sampler option KEY=VALUE (JSON value), repeatable.")
@_threads_option
@click.option("--progress/--no-progress", default=True, show_default=True, help="One progress bar for the run.")
@_user_errors
def sample(
    checkpoint,
    sampler,
    steps,
    grid_spec,
    spacing,
    eta,
    num_samples,
    batch_size,
    seed,
    class_label,
    guidance_scale,
    guidance_name,
    guidance_option_pairs,
    output,
    grid_max,
    npz_path,
    device,
    dtype_name,
    clip,
    dynamic_threshold,
    options,
    threads,
    progress,
) -> None:
    """Draw samples from CHECKPOINT (default: the bundled digits model; `flow-digits` names the
    bundled flow-matching one; a diffusers pipeline or UNet folder works too); write every sample
    to an .npz, then a picture of them."""
    from tqdm.auto import tqdm

    from diffreg.checkpoint import bundled_checkpoint_path, load_checkpoint, resolve_bundled
    from diffreg.sampling import per_sample_generators

    path = resolve_bundled(checkpoint) if checkpoint else bundled_checkpoint_path()
    resolve_device(device)
    outputs = _check_outputs(output, npz_path, {"the checkpoint": path})  # before any work: a bad path costs nothing
    picture_format(outputs[0])
    check_npz_name(outputs[1])
    if guidance_scale is not None:
        check_guidance_scale(guidance_scale, "--guidance-scale")
    if num_samples > MAX_SAMPLES:
        raise ValueError(f"--num-samples {num_samples} is more than one run holds in memory; at most {MAX_SAMPLES:,}")
    sampler_options = _parse_options(options)
    if eta is not None:
        sampler_options["eta"] = eta
    # unknown names and options fail now (the checkpoint's own sampler, if any, once it is read)
    sampler_obj = resolve_sampler(sampler or "ddim", sampler_options)
    grid = _grid_choice(grid_spec, spacing, sampler_obj)
    if dtype_name == "float16" and str(device).startswith("cpu"):
        click.echo(
            "warning: --dtype float16 on the CPU is ~20-35x slower than float32 (no fast float16 CPU kernels); "
            "use float32 (or bfloat16) on the CPU, float16 on a GPU",
            err=True,
        )
    used_threads = set_threads(threads)
    model, diffusion, cfg = load_checkpoint(path, device=device, dtype=DTYPES[dtype_name])
    shape = cfg.sample_shape
    if shape is None:
        raise CheckpointError(f"{str(path)!r} does not record its sample shape (data.shape)")
    defaults = cfg.sampling  # the checkpoint's sampler, steps and grid where the flags give none
    sampler, sampler_obj, steps, grid = _recorded_choice(defaults, sampler, sampler_obj, sampler_options, steps, grid)
    num_classes = cfg.num_classes if cfg.num_classes is not None else getattr(model, "num_classes", None)
    labels = parse_labels(class_label, num_classes, num_samples, getattr(model, "null_class", num_classes))
    unconditional = labels is None or class_label.strip().lower() == "none"
    clipping = cfg.sampling.driver_options()  # the checkpoint's defaults, then the flags
    if clip is not None:
        clipping["clip_denoised"] = clip
    if dynamic_threshold is not None:
        clipping["dynamic_threshold"] = dynamic_threshold
    explicit_scale = guidance_scale
    if guidance_scale is None:  # unconditional samples: no labels to guide towards
        guidance_scale = float(cfg.data.get("guidance_scale", 1.0)) if not unconditional else 1.0
    recorded_guidance = cfg.sampling.guidance_spec() if not unconditional else None
    guidance = _guidance_choice(guidance_name, guidance_option_pairs, recorded_guidance, guidance_scale)
    if unconditional and not (guidance is not None and guidance.separate_unconditional):
        why = "this checkpoint is unconditional" if labels is None else "--class-label none draws without labels"
        if guidance is not None:
            raise ValueError(f"--guidance {guidance_name} needs class labels: {why} (or --guidance autoguidance)")
        if explicit_scale is not None and explicit_scale not in (0.0, 1.0):
            raise ValueError(
                f"--guidance-scale {explicit_scale:g} does nothing here: {why}, and classifier-free guidance "
                "needs a class label to guide towards; give labels (--class-label all, 3, 1,7) or drop it"
            )
        guidance_scale = 1.0
    from diffreg.training import _distributed, finish_distributed

    rank, world = _distributed()  # under torchrun, each rank samples a contiguous share
    share = math.ceil(num_samples / world)
    first, last = min(rank * share, num_samples), min((rank + 1) * share, num_samples)
    steps_per_batch = len(diffusion.grid_times(steps, grid, sampler_obj))
    bar = tqdm(
        total=math.ceil((last - first) / batch_size) * steps_per_batch,
        desc=f"{num_samples} samples",
        unit="step",
        disable=not progress or rank != 0,
    )
    samples = []
    stats: dict[str, Any] = {}
    start = time.perf_counter()
    with bar:
        for lo in range(first, last, batch_size):
            n = min(batch_size, last - lo)
            kwargs = {"y": labels[lo : lo + n].to(device)} if labels is not None else {}
            x = diffusion.sample(
                model,
                (n, *shape),
                sampler=sampler_obj,  # --option values go to the sampler only, never to the driver
                steps=steps,
                grid=grid,
                # sample k depends on (seed, k) only; generators live on the device, so drawing the
                # noise of a step never copies from the host
                generator=per_sample_generators(seed, n, start=lo, device=device),
                model_kwargs=kwargs,
                guidance_scale=guidance_scale,
                guidance=guidance,
                device=device,
                callback=lambda *_: bar.update(),  # one bar for the whole run, not one per batch
                stats=stats,
                **clipping,
            )
            # images are kept as uint8 as they come (a quarter of the memory of float32)
            samples.append(to_uint8_images(x) if x.ndim == 4 else x.cpu().numpy())
    if samples:
        x = torch.from_numpy(np.concatenate(samples))
    else:  # a rank with no share (fewer samples than ranks)
        x = torch.zeros(0, *shape[1:], shape[0], dtype=torch.uint8) if len(shape) == 3 else torch.zeros(0, *shape)
    if world > 1:
        x = _gather_shares(x, share, num_samples, device)
        if rank != 0:
            finish_distributed()
            return
    elapsed = time.perf_counter() - start
    grid_name = grid if isinstance(grid, str) else json.dumps(grid) if grid is not None else "trailing"
    if isinstance(grid, dict) and grid.get("name") == "explicit" and len(grid_name) > 60:
        grid_name = f"explicit ({stats.get('steps', steps)} levels)"
    arrays = {"arr_0": x.numpy()}
    recorded = recorded_labels(class_label, labels)
    if recorded is not None:
        arrays["arr_1"] = recorded
    columns = label_columns(class_label, num_classes)
    try:
        written = write_run(outputs[1], arrays, outputs[0], lambda: run_picture(arrays["arr_0"], columns, grid_max))
    except PictureError as exc:
        raise click.ClickException(str(exc)) from exc
    capped = outputs[0] is not None and x.ndim == 4 and num_samples > grid_max
    shown = f" (the picture shows the first {grid_max})" if capped else ""
    cpu = f", {used_threads} CPU thread{'s' if used_threads > 1 else ''}" if str(device).startswith("cpu") else ""
    click.echo(
        f"{num_samples} samples with {sampler} ({stats.get('steps', steps)} steps, "
        f"{stats.get('nfe', '?')} NFE, grid {grid_name}, guidance {(repr(guidance) + ' ') if guidance else ''}"
        f"{guidance_scale:g}, {_clip_text(clipping)}) "
        f"in {elapsed:.1f} s{cpu} -> {', '.join(written) or 'nothing written'}{shown}"
    )
    finish_distributed()


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
    return text + (f", dynamic threshold {threshold:g}" if threshold is not None else "")


def _gather_shares(x: torch.Tensor, share: int, total: int, device: str) -> torch.Tensor:
    """All ranks' samples, in sample order, on every rank (shares padded to equal size)."""
    import torch.distributed as dist

    backend_device = device if dist.get_backend() == "nccl" else "cpu"
    padded = torch.zeros(share, *x.shape[1:], dtype=x.dtype)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded, device=backend_device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded.to(backend_device))
    return torch.cat([p.cpu() for p in parts])[:total]


def apply_settings(data: dict[str, Any], settings: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` overrides applied to a configuration dict (dots reach into tables; a component
    given by name becomes a table when an option is set on it).

    Raises ``ValueError`` for a malformed setting.
    """
    import copy

    data = copy.deepcopy(data)
    for key, value in _parse_options(settings, "--set").items():
        *path, last = key.split(".")
        node = data
        for part in path:
            child = node.get(part)
            if isinstance(child, str):  # "cosine" -> {"name": "cosine"}
                child = {"name": child}
            elif child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ValueError(f"--set {key}={value!r}: {part!r} is not a table")
            node[part] = child
            node = child
        node[last] = value
    return data


# -- optimize-steps ---------------------------------------------------------------------------------


@main.command(name="optimize-steps")
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option(
    "--sampler", default="dpmpp_2m", show_default=True, help="A deterministic registered sampler (not adaptive)."
)
@click.option("--nfe", required=True, type=click.IntRange(min=1), help="Model evaluations per sampling call.")
@click.option(
    "--draws",
    default=256,
    show_default=True,
    type=click.IntRange(min=4),
    help="Starting points x_T (even): half are fitted, half report the held-out error.",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1))
@click.option(
    "--reference-steps",
    default=None,
    type=click.IntRange(min=2),
    help="Levels of the reference solve (uniform in log-SNR). Default: 100 with unipc, 1000 with ddim.",
)
@click.option(
    "--max-evals",
    default=None,
    type=click.IntRange(min=1),
    help="Sampling calls the search may make. Default: 8 per free level + 8.",
)
@click.option(
    "--output",
    default="grid.json",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON with the grid, its held-out error beside the default, karras and exponential grids; '' for none.",
)
@click.option(
    "--save-to-checkpoint",
    "save_to",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a copy of CHECKPOINT whose sampling defaults are this sampler, its steps and the grid.",
)
@click.option("--option", "options", multiple=True, help="Sampler option KEY=VALUE (JSON value), repeatable.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@_threads_option
@_user_errors
def optimize_steps_command(
    checkpoint, sampler, nfe, draws, seed, reference_steps, max_evals, output, save_to, options, device, threads
) -> None:
    """Search the noise levels of SAMPLER at NFE model evaluations for CHECKPOINT (default: the
    bundled digits model): the grid closest to a many-step solve of the same model, fitted on half
    of DRAWS starting points and reported on the other half. See docs/samplers.md."""
    import attrs

    from diffreg.checkpoint import bundled_checkpoint_path, load_checkpoint, save_checkpoint
    from diffreg.fileio import atomic_write
    from diffreg.optimize import check_optimizable, default_reference, optimize_steps

    path = checkpoint or bundled_checkpoint_path()
    resolve_device(device)
    if draws % 2:
        raise ValueError(f"--draws {draws}: give an even number (half fitted, half held out)")
    from diffreg.fileio import check_writable, refuse_inputs_as_outputs

    outputs = {
        flag: None if value is None or str(value) in ("", ".") else Path(value)
        for flag, value in (("--output", output), ("--save-to-checkpoint", save_to))
    }
    refuse_inputs_as_outputs(outputs, {"the checkpoint": path})
    for written in outputs.values():
        if written is not None:
            check_writable(written)  # before any work: a bad path costs nothing
    out_path, save_path = outputs["--output"], outputs["--save-to-checkpoint"]
    sampler_options = _parse_options(options)
    check_optimizable(sampler, resolve_sampler(sampler, sampler_options))  # before loading anything
    ref_name, ref_default = default_reference()
    reference = (ref_name, reference_steps or ref_default)
    set_threads(threads)
    model, diffusion, cfg = load_checkpoint(path, device=device)
    shape = cfg.sample_shape
    if shape is None:
        raise CheckpointError(f"{str(path)!r} does not record its sample shape (data.shape)")
    num_classes = cfg.num_classes if cfg.num_classes is not None else getattr(model, "num_classes", None)
    guidance_scale = float(cfg.data.get("guidance_scale", 1.0)) if num_classes else None
    start = time.perf_counter()
    result = optimize_steps(
        diffusion,
        model,
        shape,
        sampler=sampler,
        nfe=nfe,
        draws=draws,
        seed=seed,
        num_classes=num_classes,
        sampler_options=sampler_options,
        reference=reference,
        max_evals=max_evals,
        device=device,
        guidance_scale=guidance_scale,
        guidance=cfg.sampling.guidance_spec() if num_classes and guidance_scale is not None else None,
        progress=lambda message: click.echo(f"[{time.perf_counter() - start:5.0f} s] {message}", err=True),
        **cfg.sampling.driver_options(),
    )
    click.echo(
        f"{result.sampler}, {result.nfe} NFE ({result.steps} steps); held-out error on {draws // 2} draws "
        f"(RMS to a {reference[0]} solve on {reference[1]} levels):"
    )
    for name, err in result.held_out.items():
        used = result.nfe if name == "optimized" else result.baseline_nfe[name]
        click.echo(f"  {name:<12} {err:.4g}  ({used} NFE)")
    click.echo("grid: " + json.dumps([round(t, 4) for t in result.times]))
    if out_path is not None:
        text = json.dumps(result.to_dict(), indent=2) + "\n"

        def write(tmp: Path) -> None:
            tmp.write_text(text)

        atomic_write(out_path, write)
        click.echo(f"wrote {out_path}")
    if save_path is not None:
        spec = result.sampler if not result.sampler_options else {"name": result.sampler, **result.sampler_options}
        sampling = attrs.evolve(cfg.sampling, grid=result.grid_spec(), sampler=spec, steps=result.steps)
        save_checkpoint(save_path, model, attrs.evolve(cfg, sampling=sampling))
        click.echo(
            f"wrote {save_path}: `diffreg sample {save_path}` uses {result.sampler} on this grid by default"
        )


# -- train --------------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A TOML training configuration (see configs/digits.toml).",
)
@click.option(
    "--output", default="model.safetensors", show_default=True, type=click.Path(dir_okay=False, path_type=Path)
)
@click.option("--steps", type=click.IntRange(min=1), help="Override the configuration's steps.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Override the configuration's batch_size.")
@click.option("--seed", type=int, help="Override the configuration's seed.")
@click.option(
    "--set",
    "settings",
    multiple=True,
    help="Override any field: KEY=VALUE with a JSON or plain value; dots reach into tables "
    "(--set lr=1e-3 --set diffusion.schedule=cosine --set data.path=imgs). Repeatable.",
)
@click.option("--save-every", type=click.IntRange(min=0), help="Override save_every: checkpoint + state every N steps.")
@click.option("--resume", is_flag=True, help="Continue exactly from the training state beside OUTPUT.")
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--store-dtype",
    default="float32",
    show_default=True,
    type=click.Choice(list(DTYPES)),
    help="dtype of the weights in the written checkpoint.",
)
@_threads_option
@click.option("--progress/--no-progress", default=True, show_default=True)
@_user_errors
def train(
    config_path, output, steps, batch_size, seed, settings, save_every, resume, device, store_dtype, threads, progress
) -> None:
    """Train a model and write its EMA weights, with its configuration, to OUTPUT (and the
    training state for --resume beside it)."""
    import attrs

    from diffreg.training import TrainConfig, check_outputs
    from diffreg.training import train as run_training

    cfg = TrainConfig.from_toml_file(config_path) if config_path else TrainConfig()
    if settings:
        cfg = TrainConfig.from_dict(apply_settings(cfg.to_dict(), settings))
    overrides = {"steps": steps, "batch_size": batch_size, "seed": seed, "save_every": save_every}
    cfg = attrs.evolve(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if os.environ.get("RANK", "0") == "0":  # before any work: outputs writable, not inputs, resumable
        check_outputs(cfg, output, resume=resume, inputs={"--config": config_path})
    set_threads(threads)
    start = time.perf_counter()
    path = run_training(
        cfg, output, device=device, progress=progress, checkpoint_dtype=DTYPES[store_dtype], resume=resume
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        click.echo(f"trained to step {cfg.steps} in {time.perf_counter() - start:.0f} s -> {path}")


# -- ema ----------------------------------------------------------------------------------------------


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--sigma-rel",
    required=True,
    type=float,
    help="Relative EMA length (std of the averaging profile over the training time; EDM2 uses 0.05-0.15).",
)
@click.option("--step", type=click.IntRange(min=1), help="Training step of the EMA (default: the last snapshot's).")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Checkpoint to write.")
@_user_errors
def ema(checkpoint, sigma_rel, step, output) -> None:
    """Reconstruct a post-hoc EMA of any length from the snapshots a run kept beside CHECKPOINT
    (<stem>.phema/, written with posthoc_ema_every > 0; Karras et al. 2024, EDM2) and write it as a
    checkpoint with CHECKPOINT's configuration."""
    from diffreg.checkpoint import load_checkpoint, read_config, save_checkpoint
    from diffreg.ema import reconstruct, snapshot_dir
    from diffreg.fileio import check_writable, refuse_inputs_as_outputs

    refuse_inputs_as_outputs({"--output": output}, {"CHECKPOINT": checkpoint})
    check_writable(output)
    state, info = reconstruct(snapshot_dir(checkpoint), sigma_rel, step)
    model, _, _ = load_checkpoint(checkpoint)
    model.load_state_dict(state)
    save_checkpoint(output, model, read_config(checkpoint))
    click.echo(
        f"EMA sigma_rel {sigma_rel:g} (gamma {info['gamma']:.3f}) at step {info['step']} from "
        f"{info['snapshots']} snapshot(s) -> {output}"
    )


# -- convert ------------------------------------------------------------------------------------------


@main.group()
def convert() -> None:
    """Import weights from other libraries, or export them (see docs/pretrained.md)."""


@convert.command("openai")
@click.argument("weights", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--flags",
    required=True,
    help="The model's flags from its README (MODEL_FLAGS and DIFFUSION_FLAGS), in one quoted string.",
)
@click.option(
    "--source",
    type=click.Choice(["guided-diffusion", "improved-diffusion"]),
    default=None,
    help="The library the model comes from (inferred when the flags decide; their defaults differ).",
)
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="diffreg checkpoint to write.")
@_user_errors
def convert_openai_command(weights: Path, flags: str, source: str | None, output: Path) -> None:
    """Convert an improved-/guided-diffusion UNet state dict (WEIGHTS: .pt read with
    weights_only=True, or .safetensors) into a self-describing diffreg checkpoint."""
    from diffreg.convert.openai import convert_openai

    path, notes = convert_openai(weights, flags, output, source=source)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {path}")


@convert.command("diffusers")
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@_user_errors
def convert_diffusers_command(checkpoint: Path, output: Path) -> None:
    """Write CHECKPOINT (a diffreg checkpoint of a diffusers UNet2DModel) as a diffusers
    DDPMPipeline folder that DDPMPipeline.from_pretrained loads."""
    from diffreg.convert.diffusers import export_diffusers

    click.echo(f"wrote {export_diffusers(checkpoint, output)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
