"""The ``diffreg`` command: sample, train, info, plugins, list."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from diffreg import __version__, registry
from diffreg.errors import (
    AmbiguousComponentError,
    CheckpointError,
    ComponentOptionError,
    ConfigError,
    PluginError,
    SamplingError,
    UnknownComponentError,
)
from diffreg.fileio import atomic_paths
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
        except Exception as exc:
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


def _one_line(exc: Exception) -> click.ClickException:
    """The library's user-facing errors as they are, OS errors in the OS's own words (permissions,
    full disk, names too long), running out of memory with the fix, anything else as unexpected."""
    if _is_out_of_memory(exc):
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return click.ClickException(
            f"out of memory ({detail[:200]}); lower --batch-size (or use a smaller model or data size)"
        )
    if isinstance(exc, _USER_ERRORS):
        return click.ClickException(str(exc))
    if isinstance(exc, OSError):
        return click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
    return click.ClickException(
        f"unexpected {type(exc).__name__}: {exc} (set DIFFREG_DEBUG=1 for the traceback, and please report it)"
    )


@click.group()
@click.version_option(__version__, prog_name="diffreg")
def main() -> None:
    """Diffusion models where every part is a plugin chosen by name."""


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
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_user_errors
def info(checkpoint: Path, as_json: bool) -> None:
    """Configuration, parameter count and format of a checkpoint (reads no weights)."""
    from safetensors import safe_open

    from diffreg.checkpoint import read_config, read_metadata

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
        "config": cfg.to_dict(),
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


# -- sample -------------------------------------------------------------------------------------------


def parse_labels(spec: str, num_classes: int | None, count: int) -> torch.Tensor | None:
    """``all`` (cycle 0..K-1), ``none`` (unconditional), an int, or a comma list (cycled).

    Raises ``ValueError`` naming a label outside ``[0, num_classes)``.
    """
    spec = spec.strip().lower()
    if num_classes is None:
        if spec not in ("all", "none"):
            raise ValueError(f"--class-label {spec!r}: this checkpoint is unconditional (it has no classes)")
        return None
    if spec == "none":
        return torch.full((count,), num_classes, dtype=torch.long)
    if spec == "all":
        return torch.arange(count, dtype=torch.long) % num_classes
    try:
        values = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"--class-label {spec!r}: expected 'all', 'none', an int or a comma list of ints such as '1,3,5'"
        ) from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if not values or bad:
        raise ValueError(f"--class-label {spec!r}: labels must be in 0..{num_classes - 1} for this checkpoint")
    return torch.tensor(values, dtype=torch.long).repeat(math.ceil(count / len(values)))[:count]


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` floats in [-1, 1] -> uint8 ``[N, H, W, C]`` (the layout of guided-diffusion's
    evaluator)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, ncols: int, cell: int = 32, pad: int = 2):
    """A Pillow image tiling uint8 NHWC ``images`` in rows of ``ncols``, each upscaled (nearest)
    to ``cell`` pixels."""
    from PIL import Image

    n, h, w, c = images.shape
    scale = max(1, cell // max(h, w))
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    grid = Image.new("L" if c == 1 else "RGB", (ncols * (w * scale + pad) + pad, nrows * (h * scale + pad) + pad), 0)
    for k in range(n):
        arr = images[k, :, :, 0] if c == 1 else images[k, :, :, :3]
        tile = Image.fromarray(arr).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        r, col = divmod(k, ncols)
        grid.paste(tile, (pad + col * (w * scale + pad), pad + r * (h * scale + pad)))
    return grid


def scatter_image(points: np.ndarray, size: int = 512):
    """A Pillow scatter plot of ``[N, 2]`` points (for 2-D toy models)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    lim = max(1.5, float(np.abs(points).max()) * 1.05) if len(points) else 1.5
    for x, y in points:
        px, py = (x / lim + 1) / 2 * size, (1 - (y / lim + 1) / 2) * size
        draw.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=(30, 80, 200))
    return img


def _check_outputs(output: Path | None, npz: Path | None) -> tuple[Path | None, Path | None]:
    """The output paths to write (``''`` skips one), checked before sampling: an existing folder
    that can be written, not a directory, and not the same file twice.

    Raises ``ValueError`` naming the path.
    """
    import os

    paths: list[Path | None] = []
    for flag, value in (("--output", output), ("--npz", npz)):
        if value is None or str(value) in ("", "."):
            paths.append(None)
            continue
        path = Path(value)
        folder = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise ValueError(f"{flag} {str(path)!r} is a directory; give a file name")
        if not folder.is_dir():
            raise ValueError(f"{flag} {str(path)!r}: folder {str(folder)!r} does not exist")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"{flag} {str(path)!r}: folder {str(folder)!r} is not writable")
        if len(path.name) > 200:
            raise ValueError(f"{flag}: the file name is too long ({len(path.name)} characters)")
        paths.append(path)
    if paths[0] is not None and paths[1] is not None and paths[0].resolve() == paths[1].resolve():
        raise ValueError(f"--output and --npz are the same file {str(paths[0])!r}")
    return paths[0], paths[1]


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--option {pair!r}: expected KEY=VALUE")
        key, raw = pair.split("=", 1)
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
        except RecursionError:
            raise ValueError(f"{key.strip()}=...: the value is nested too deeply (at most 32 levels)") from None
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
                raise ValueError(f"--grid {grid_spec!r}: not valid JSON ({exc.msg})") from None
        else:
            grid = text
        if spacing is not None:
            raise ValueError(f"--grid {grid_spec!r} and --spacing {spacing!r} (its older spelling) both given; give one")
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


@main.command()
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option(
    "--sampler", default="ddim", show_default=True, help="Any registered sampler (see `diffreg list sampler`)."
)
@click.option("--steps", default=50, show_default=True, type=int, help="Sampling steps (1..T).")
@click.option(
    "--grid",
    "grid_spec",
    default=None,
    help="Noise levels to visit: a registered grid (trailing, leading, linspace, karras, exponential; "
    "`diffreg list grid`), JSON options like '{\"name\": \"karras\", \"rho\": 5}', or a JSON list of "
    "timesteps. Default: the sampler's own, else trailing.",
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
    help="Sample k depends only on (seed, k), not on the batch size.",
)
@click.option(
    "--class-label",
    default="all",
    show_default=True,
    help="'all' (cycle the classes), 'none', an int, or a comma list.",
)
@click.option(
    "--guidance-scale",
    default=None,
    type=float,
    help="Guidance scale w (0: unconditional, 1: conditional, above 1: guided). Default: the checkpoint's "
    "recommended value, else 1.",
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
    help="PNG grid of the samples.",
)
@click.option(
    "--npz",
    "npz_path",
    default="samples.npz",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="arr_0: uint8 NHWC images, arr_1: labels ('' to skip).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option(
    "--dtype",
    "dtype_name",
    default="float32",
    show_default=True,
    type=click.Choice(list(DTYPES)),
    help="Model weights' dtype (the sampler state stays float32).",
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
@click.option("--progress/--no-progress", default=True, show_default=True)
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
    npz_path,
    device,
    dtype_name,
    clip,
    dynamic_threshold,
    options,
    progress,
) -> None:
    """Draw samples from CHECKPOINT (default: the bundled digits model; a diffusers pipeline or
    UNet folder works too); write a PNG grid and an .npz."""
    from diffreg.checkpoint import bundled_checkpoint_path, load_checkpoint
    from diffreg.sampling import per_sample_generators

    path = checkpoint or bundled_checkpoint_path()
    resolve_device(device)
    outputs = _check_outputs(output, npz_path)  # before any work, so a bad path costs nothing
    if guidance_scale is not None:
        check_guidance_scale(guidance_scale, "--guidance-scale")
    if num_samples > MAX_SAMPLES:
        raise ValueError(f"--num-samples {num_samples} is more than one run holds in memory; at most {MAX_SAMPLES:,}")
    sampler_options = _parse_options(options)
    if eta is not None:
        sampler_options["eta"] = eta
    sampler_obj = resolve_sampler(sampler, sampler_options)  # unknown names and options fail now
    grid = _grid_choice(grid_spec, spacing, sampler_obj)
    model, diffusion, cfg = load_checkpoint(path, device=device, dtype=DTYPES[dtype_name])
    shape = cfg.sample_shape
    if shape is None:
        raise CheckpointError(f"{str(path)!r} does not record its sample shape (data.shape)")
    num_classes = cfg.num_classes if cfg.num_classes is not None else getattr(model, "num_classes", None)
    labels = parse_labels(class_label, num_classes, num_samples)
    clipping = cfg.sampling.driver_options()  # the checkpoint's defaults, then the flags
    if clip is not None:
        clipping["clip_denoised"] = clip
    if dynamic_threshold is not None:
        clipping["dynamic_threshold"] = dynamic_threshold
    if guidance_scale is None:
        guidance_scale = float(cfg.data.get("guidance_scale", 1.0)) if labels is not None else 1.0
    if guidance_scale != 1.0 and labels is None:
        raise ValueError("--guidance-scale needs a class-conditional checkpoint")
    guidance = _guidance_choice(
        guidance_name, guidance_option_pairs, cfg.sampling.guidance_spec() if labels is not None else None, guidance_scale
    )
    if guidance is not None and labels is None and not guidance.separate_unconditional:
        raise ValueError(f"--guidance {guidance_name} needs a class-conditional checkpoint (or --guidance autoguidance)")
    from diffreg.training import _distributed, finish_distributed

    rank, world = _distributed()  # under torchrun, each rank samples a contiguous share
    share = math.ceil(num_samples / world)
    first, last = min(rank * share, num_samples), min((rank + 1) * share, num_samples)
    samples = []
    stats: dict[str, Any] = {}
    start = time.perf_counter()
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
            progress=progress and rank == 0,
            stats=stats,
            **clipping,
        )
        samples.append(x.cpu())
    x = torch.cat(samples) if samples else torch.zeros(0, *shape)
    if world > 1:
        x = _gather_shares(x, share, num_samples, device)
        if rank != 0:
            finish_distributed()
            return
    elapsed = time.perf_counter() - start
    grid_name = grid if isinstance(grid, str) else json.dumps(grid) if grid is not None else "trailing"
    label_array = (labels if labels is not None else torch.zeros(num_samples, dtype=torch.long)).numpy()
    if x.ndim == 4:
        images = to_uint8_images(x)
        ncols = (
            (cfg.num_classes or 1)
            if (labels is not None and class_label.strip().lower() == "all")
            else math.ceil(math.sqrt(num_samples))
        )
        picture = image_grid(images, ncols)
        arrays = {"arr_0": images, "arr_1": label_array}
    else:
        picture = scatter_image(x.numpy())
        arrays = {"arr_0": x.numpy(), "arr_1": label_array}
    # the grid and the arrays together or not at all: both replaced only after both were written
    targets = [p for p in outputs if p is not None]
    with atomic_paths(*targets) as temps:
        tmp_for = dict(zip(targets, temps, strict=True))
        if outputs[0] is not None:
            picture.save(tmp_for[outputs[0]], format="PNG")
        if outputs[1] is not None:
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)  # type: ignore[arg-type]
            tmp_for[outputs[1]].write_bytes(buffer.getvalue())
    written = ", ".join(str(p) for p in outputs if p is not None) or "nothing written"
    click.echo(
        f"{num_samples} samples with {sampler} ({stats.get('steps', steps)} steps, "
        f"{stats.get('nfe', '?')} NFE, grid {grid_name}, guidance {(repr(guidance) + ' ') if guidance else ''}"
        f"{guidance_scale:g}, {_clip_text(clipping)}) "
        f"in {elapsed:.1f} s -> {written}"
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

    try:
        options = _parse_options(pairs)
    except ValueError as exc:
        raise ValueError(str(exc).replace("--option", "--guidance-option")) from None
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
    for key, value in _parse_options(settings).items():
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
@click.option("--progress/--no-progress", default=True, show_default=True)
@_user_errors
def train(
    config_path, output, steps, batch_size, seed, settings, save_every, resume, device, store_dtype, progress
) -> None:
    """Train a model and write its EMA weights, with its configuration, to OUTPUT (and the
    training state for --resume beside it)."""
    import attrs

    from diffreg.training import TrainConfig
    from diffreg.training import train as run_training

    cfg = TrainConfig.from_toml_file(config_path) if config_path else TrainConfig()
    if settings:
        cfg = TrainConfig.from_dict(apply_settings(cfg.to_dict(), settings))
    overrides = {"steps": steps, "batch_size": batch_size, "seed": seed, "save_every": save_every}
    cfg = attrs.evolve(cfg, **{k: v for k, v in overrides.items() if v is not None})
    start = time.perf_counter()
    path = run_training(
        cfg, output, device=device, progress=progress, checkpoint_dtype=DTYPES[store_dtype], resume=resume
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        click.echo(f"trained to step {cfg.steps} in {time.perf_counter() - start:.0f} s -> {path}")


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
