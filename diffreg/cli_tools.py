"""``diffreg train``, ``ema``, ``optimize-steps`` and ``convert``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click

from diffreg.cli import (
    DTYPES,
    _user_errors,
    main,
)
from diffreg.cli_choices import _parse_options, _threads_option
from diffreg.cli_support import (
    set_threads,
)
from diffreg.errors import (
    CheckpointError,
)
from diffreg.fileio import shown as shown_path
from diffreg.named_grids import default_grid_name
from diffreg.sampling import resolve_sampler
from diffreg.validation import resolve_device


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
    type=click.IntRange(2, 10_000),
    help="Levels of the reference solve (uniform in log-SNR), 2..10,000. Default: 200 with unipc (order 3), "
    "1000 with ddim.",
)
@click.option(
    "--max-evals",
    default=None,
    type=click.IntRange(min=1),
    help="Sampling calls the search may make on the fitted draws, after the 2-3 baseline grids are measured "
    "(the report's count includes those). Default: 8 per free level + 8.",
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
    help="Write a copy of CHECKPOINT with the grid stored under --name (its named grids kept) and made the "
    "default (this sampler, its steps, the grid). OUT must not be CHECKPOINT; to keep several named grids, give an "
    "earlier run's OUT as CHECKPOINT and write a new OUT.",
)
@click.option(
    "--name",
    "grid_name",
    default=None,
    help="Name of the stored grid, for `diffreg sample --grid NAME` (letters, digits, _ . -; not a grid kind "
    "such as trailing). Default: SAMPLER-NFE, e.g. unipc-8 (sampler options do not enter it).",
)
@click.option("--replace", is_flag=True, help="Replace a named grid of the same name in CHECKPOINT (else refused).")
@click.option("--option", "options", multiple=True, help="Sampler option KEY=VALUE (JSON value), repeatable.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@_threads_option
@_user_errors
def optimize_steps_command(
    checkpoint,
    sampler,
    nfe,
    draws,
    seed,
    reference_steps,
    max_evals,
    output,
    save_to,
    grid_name,
    replace,
    options,
    device,
    threads,
) -> None:
    """Search the noise levels of SAMPLER at NFE model evaluations for CHECKPOINT (default: the
    bundled digits model): the grid closest to a many-step solve of the same model, fitted on half
    of DRAWS starting points and reported on the other half. See docs/samplers.md."""
    import attrs

    from diffreg.checkpoint import (
        bundled_checkpoint_path,
        load_checkpoint,
        resolve_bundled,
        save_checkpoint,
        stored_float_dtype,
    )
    from diffreg.fileio import atomic_write
    from diffreg.optimize import check_optimizable, default_reference, optimize_steps

    path = resolve_bundled(checkpoint) if checkpoint else bundled_checkpoint_path()  # flow-digits: the asset
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
    if save_path is not None:  # the name is checked before the search, which takes minutes
        grid_name = _check_new_grid_name(path, grid_name or default_grid_name(sampler, nfe), replace)
    elif grid_name is not None or replace:
        raise ValueError(
            f"--{'name' if grid_name is not None else 'replace'} names the grid --save-to-checkpoint "
            "stores; give --save-to-checkpoint OUT too"
        )
    ref_name, ref_default, ref_options = default_reference()
    reference = (ref_name, reference_steps or ref_default, ref_options)
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
    rival = min((k for k in result.held_out if k != "optimized"), key=lambda k: result.held_out[k])
    if result.held_out["optimized"] >= result.held_out[rival]:
        click.echo(
            f"note: on the held-out draws the optimized grid ({result.held_out['optimized']:.4g}) is no better than "
            f"{rival} ({result.held_out[rival]:.4g}); more --draws or --max-evals usually help",
            err=True,
        )
    shown = [float(f"{t:.6g}") for t in result.times]
    if len(shown) > 24:  # the whole grid is in --output / the checkpoint
        head, tail = json.dumps(shown[:8])[:-1], json.dumps(shown[-4:])[1:]
        click.echo(f"grid ({len(shown)} levels): {head}, ..., {tail}")
    else:
        click.echo("grid: " + json.dumps(shown))
    if out_path is not None:
        text = json.dumps(result.to_dict(), indent=2) + "\n"

        def write(tmp: Path) -> None:
            tmp.write_text(text)

        atomic_write(out_path, write)
        click.echo(f"wrote {shown_path(out_path)}")
    if save_path is not None:
        spec = result.sampler if not result.sampler_options else {"name": result.sampler, **result.sampler_options}
        preset = {
            "sampler": spec,
            "grid": result.grid_spec(),
            "steps": result.steps,
            "nfe": result.nfe,
            "held_out_error": result.held_out["optimized"],
            "reference": {**result.reference, "held_out_draws": result.draws // 2, "seed": result.seed},
        }
        sampling = cfg.sampling.with_named_grid(grid_name, preset)  # and the default, as before
        # the weights as stored (the bundled model's float16 stays float16: the file does not double)
        save_checkpoint(save_path, model, attrs.evolve(cfg, sampling=sampling), dtype=stored_float_dtype(path))
        others = sorted(set(sampling.grids) - {grid_name})
        click.echo(
            f"wrote {shown_path(save_path)}: `diffreg sample {shown_path(save_path)}` uses {result.sampler} on this "
            "grid by default, "
            f"`--grid {grid_name}` by name" + (f" (other named grids: {', '.join(others)})" if others else "")
        )


def _check_new_grid_name(checkpoint: Path, name: str, replace: bool) -> str:
    """``name`` if ``diffreg optimize-steps`` may store a grid under it in a copy of ``checkpoint``:
    a valid name (:func:`diffreg.named_grids.check_grid_name`), not already one of its named grids
    unless ``replace``.

    Raises:
        ValueError: naming the flag, the name and what to do.
    """
    from diffreg.checkpoint import read_config
    from diffreg.errors import ConfigError
    from diffreg.named_grids import check_grid_name

    try:
        check_grid_name(name, "--name")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    existing = read_config(checkpoint).sampling.grids
    if name in existing and not replace:
        raise ValueError(
            f"--name {name}: {str(checkpoint)!r} already has a named grid {name!r} (sampler "
            f"{existing[name].sampler.name}, {existing[name].steps} steps); give another --name, or --replace"
        )
    return name


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
        click.echo(f"trained to step {cfg.steps} in {time.perf_counter() - start:.0f} s -> {shown_path(path)}")


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
        f"{info['snapshots']} snapshot(s) -> {shown_path(output)}"
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
@click.option(
    "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="diffreg checkpoint to write."
)
@_user_errors
def convert_openai_command(weights: Path, flags: str, source: str | None, output: Path) -> None:
    """Convert an improved-/guided-diffusion UNet state dict (WEIGHTS: .pt read with
    weights_only=True, or .safetensors) into a self-describing diffreg checkpoint."""
    from diffreg.convert.openai import convert_openai

    path, notes = convert_openai(weights, flags, output, source=source)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {shown_path(path)}")


@convert.command("diffusers")
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@_user_errors
def convert_diffusers_command(checkpoint: Path, output: Path) -> None:
    """Write CHECKPOINT (a diffreg checkpoint of a diffusers UNet2DModel) as a diffusers
    DDPMPipeline folder that DDPMPipeline.from_pretrained loads (the reverse: from-diffusers)."""
    from diffreg.convert.diffusers import export_diffusers

    click.echo(f"wrote {shown_path(export_diffusers(checkpoint, output))}")


@convert.command("from-diffusers")
@click.argument("folder", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="diffreg checkpoint to write."
)
@_user_errors
def convert_from_diffusers_command(folder: Path, output: Path) -> None:
    """Convert a diffusers pipeline or UNet folder (FOLDER) into one self-describing diffreg
    checkpoint: the model, diffusion and sampling defaults that loading the folder gives."""
    from diffreg.convert.diffusers import import_diffusers

    path, notes = import_diffusers(folder, output)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {shown_path(path)}")
