"""``diffreg info``: what a checkpoint holds and what it loads as, without reading its weights:
a diffreg checkpoint, or a diffusers pipeline or UNet folder (as ``diffreg sample`` loads it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from diffreg.cli import _user_errors, main
from diffreg.fileio import shown

#: Lists longer than this are shortened in the text report (an explicit schedule's 1000 betas).
_LONG_LIST = 8


@main.command()
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_user_errors
def info(checkpoint: Path | None, as_json: bool) -> None:
    """Configuration, parameter count and format of CHECKPOINT (default: the bundled digits model,
    as for `sample`; a diffusers pipeline or UNet folder is described as `sample` loads it: needs
    diffreg[diffusers]); reads no weights. The data section shows `name` (the training config's
    `[data] name`) for what checkpoint files record as `dataset`."""
    from diffreg.checkpoint import bundled_checkpoint_path, resolve_bundled
    from diffreg.convert.layout import DIFFREG, DIFFUSERS_MODEL, DIFFUSERS_PIPELINE, detect_layout, load_foreign

    checkpoint = Path(resolve_bundled(checkpoint)) if checkpoint else bundled_checkpoint_path()
    layout = detect_layout(checkpoint)
    if layout in (DIFFUSERS_PIPELINE, DIFFUSERS_MODEL):
        report = _diffusers_report(checkpoint, layout)
    else:
        if (layout is not None and layout != DIFFREG) or checkpoint.is_dir():
            load_foreign(checkpoint)  # raises as `sample` does: names what it is and what imports it
        report = _checkpoint_report(checkpoint)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    dtypes = ", ".join(report["dtypes"]) or "dtypes not read"
    click.echo(
        f"{shown(report['file'])}: {report['parameters']:,} parameters in {report['tensors']} tensors ({dtypes}), "
        f"{report['bytes'] / 1e6:.1f} MB"
        if report["parameters"] is not None
        else f"{shown(report['file'])}: {shown(report['weights'])} is a pickle file (not read: shapes unknown), "
        f"{report['bytes'] / 1e6:.1f} MB"
    )
    if report["layout"] == "diffreg checkpoint":
        click.echo(f"format {report['format_version']}, written by diffreg {report['written_by']}")
    else:
        click.echo(f"{report['layout']}, written by {report['written_by']}; weights {shown(report['weights'])}")
    click.echo(f"loads as: {_loads_as(report['config'])}")
    for field, entry in report["providers"].items():
        if isinstance(entry, dict) and entry.get("provider"):
            click.echo(f"  {field}: {entry.get('name')} from {entry['provider']} {entry.get('version') or ''}".rstrip())
    for message in report["missing"]:
        click.echo(f"missing: {message}")
    if report["named_grids"]:
        click.echo("named grids (diffreg sample --grid NAME):")
        for g in report["named_grids"]:
            err = f", held-out error {g['held_out_error']:.4g}" if g.get("held_out_error") is not None else ""
            nfe = g["nfe"] if g["nfe"] is not None else "?"
            default = " (the default)" if g["default"] else ""
            click.echo(f"  {g['name']:<20} {g['sampler']}, {g['steps']} steps, {nfe} NFE{err}{default}")
    for note in report.get("notes", []):
        click.echo(f"note: {note}")
    click.echo(json.dumps(_shortened(report["config"]), indent=2))


def _checkpoint_report(checkpoint: Path) -> dict[str, Any]:
    """The report of a diffreg checkpoint file (its header only)."""
    from safetensors import safe_open

    from diffreg import provenance
    from diffreg.checkpoint import read_config, read_metadata

    meta = read_metadata(checkpoint)
    cfg = read_config(checkpoint)
    with safe_open(str(checkpoint), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    return {
        "file": str(checkpoint),
        "layout": "diffreg checkpoint",
        "bytes": checkpoint.stat().st_size,
        "format_version": int(meta.get("diffreg.format_version", "1")),
        "written_by": meta.get("diffreg.version"),
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "tensors": len(shapes),
        "dtypes": dtypes,
        "config": _config_for_people(cfg.to_dict()),
        "providers": provenance.recorded_providers(meta.get(provenance.HEADER_KEY)),
        "missing": provenance.missing(cfg, meta.get(provenance.HEADER_KEY), str(checkpoint)),
        "named_grids": _named_grids_report(cfg.sampling),
    }


def _diffusers_report(folder: Path, layout: str) -> dict[str, Any]:
    """The report of a diffusers pipeline or UNet folder: the configuration it loads as
    (:func:`diffreg.convert.diffusers.diffusers_config`, the translation ``sample`` uses), the
    weights file's header, and the translation's notes.

    Raises:
        CheckpointError, ConfigError, ImportError (diffusers missing): as ``sample`` would.
    """
    from diffreg import provenance
    from diffreg.config import CheckpointConfig
    from diffreg.convert.diffusers import _weight_shapes, diffusers_config

    config, weights, notes = diffusers_config(folder)
    cfg = CheckpointConfig.from_dict(config)
    header = _weight_shapes(weights)  # None for pickle weights (never unpickled here)
    dtypes: list[str] = []
    if header is not None:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    version = config["model"].get("diffusers_version")
    return {
        "file": str(folder),
        "layout": layout,
        "weights": str(weights),
        "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        "format_version": None,
        "written_by": f"diffusers {version}" if version else "diffusers",
        "parameters": sum(math.prod(t.shape) for t in header.values()) if header is not None else None,
        "tensors": len(header) if header is not None else None,
        "dtypes": dtypes,
        "config": _config_for_people(cfg.to_dict()),
        "providers": {},
        "missing": provenance.missing(cfg, None, str(folder)),
        "named_grids": _named_grids_report(cfg.sampling),
        "notes": notes,
    }


def _named_grids_report(sampling: Any) -> list[dict[str, Any]]:
    """The checkpoint's named grids (``sampling.grids``) for ``diffreg info``: name, sampler (its
    name, or JSON with options), steps, NFE, held-out error (``None`` when not recorded), and
    whether it is the checkpoint's default grid and sampler."""
    out = []
    for name, preset in sorted(sampling.grids.items()):
        spec = preset.sampler.to_dict()
        out.append(
            {
                "name": name,
                "sampler": spec if isinstance(spec, str) else json.dumps(spec),
                "steps": preset.steps,
                "nfe": preset.nfe,
                "held_out_error": preset.held_out_error,
                "default": (preset.grid, preset.sampler) == (sampling.grid, sampling.sampler),
            }
        )
    return out


def _loads_as(config: dict[str, Any]) -> str:
    """One line: the model, process, schedule, parameterization, variance, steps, shape and classes."""
    diffusion, data = config.get("diffusion", {}), config.get("data", {})
    model = config.get("model", {})
    schedule = diffusion.get("schedule")
    schedule_name = schedule.get("name") if isinstance(schedule, dict) else schedule
    parts = [f"model {model.get('name') if isinstance(model, dict) else model}"]
    for key, label in (("process", "process"), ("parameterization", "parameterization"), ("variance", "variance")):
        value = diffusion.get(key)
        if value is not None:
            parts.append(f"{label} {value.get('name') if isinstance(value, dict) else value}")
    if schedule_name is not None:
        parts.append(f"schedule {schedule_name}")
    if diffusion.get("num_timesteps") is not None:
        parts.append(f"T = {diffusion['num_timesteps']}")
    if data.get("shape") is not None:
        parts.append(f"sample shape {data['shape']}")
    classes = data.get("num_classes")
    parts.append(f"{classes} classes" if classes else "unconditional")
    return ", ".join(parts)


def _shortened(value: Any) -> Any:
    """``value`` with every list of more than :data:`_LONG_LIST` numbers shortened to its first
    three and last values and its length (a text report stays readable; --json keeps them all)."""
    if isinstance(value, dict):
        return {k: _shortened(v) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) > _LONG_LIST and all(isinstance(v, (int, float)) for v in value):
            return f"[{', '.join(f'{v:.6g}' for v in value[:3])}, ..., {value[-1]:.6g}] ({len(value)} values)"
        return [_shortened(v) for v in value]
    return value


def _config_for_people(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's configuration with ``data.dataset`` shown as ``data.name``, the key the
    training configuration (``[data] name``) uses for it."""
    data = config.get("data")
    if isinstance(data, dict) and "dataset" in data and "name" not in data:
        config = {**config, "data": {"name": data["dataset"], **{k: v for k, v in data.items() if k != "dataset"}}}
    return config


__all__ = ["info"]
