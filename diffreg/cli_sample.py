"""``diffreg sample``: draw samples from a checkpoint; write the npz and a picture."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from diffreg.cli import (
    DTYPES,
    MAX_SAMPLES,
    _user_errors,
    main,
)
from diffreg.cli_choices import (
    GridName,
    _check_outputs,
    _clip_text,
    _gather_shares,
    _grid_choice,
    _guidance_choice,
    _named_choice,
    _parse_options,
    _recorded_choice,
    _threads_option,
)
from diffreg.cli_support import (
    MAX_GRID,
    PictureError,
    check_npz_name,
    label_columns,
    parse_labels,
    picture_format,
    recorded_labels,
    run_picture,
    set_threads,
    to_uint8_images,
    write_run,
)
from diffreg.errors import CheckpointError, ComponentOptionError
from diffreg.fileio import shown as shown_path
from diffreg.sampling import resolve_sampler
from diffreg.validation import check_guidance_scale, resolve_device


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
    "`diffreg list grid`), a named grid of the checkpoint (`diffreg info` lists them; from `diffreg "
    "optimize-steps`: its times, and its sampler unless --sampler is given), JSON options like "
    '\'{"name": "karras", "rho": 5}\', or a JSON list of timesteps. Default: the sampler\'s own, else the '
    "checkpoint's default grid, else trailing.",
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
@click.option(
    "--final-level",
    type=click.Choice(["data", "t_min"]),
    default=None,
    help="Where the last step goes: data (sigma = 0) or t_min, the process's least noisy level, whose "
    "state is the sample (diffusers' set_alpha_to_one=False). Default: the checkpoint's (data unless recorded).",
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
    final_level,
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
    from diffreg.train_distributed import rank_device

    device = rank_device(resolve_device(device))  # under torchrun: cuda -> cuda:LOCAL_RANK
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
    try:
        sampler_obj = resolve_sampler(sampler or "ddim", sampler_options)
    except ComponentOptionError:
        if sampler is not None:
            raise
        sampler_obj = None  # --option without --sampler: the checkpoint's sampler's, checked once it is read
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
    named = str(grid) if isinstance(grid, GridName) else None  # --grid NAME: a named grid of the checkpoint
    if named is not None:
        sampler, sampler_obj, steps, grid = _named_choice(defaults, named, sampler, sampler_options, steps)
    else:
        sampler, sampler_obj, steps, grid = _recorded_choice(
            defaults, sampler, sampler_obj, sampler_options, steps, grid
        )
    num_classes = cfg.num_classes if cfg.num_classes is not None else getattr(model, "num_classes", None)
    labels = parse_labels(class_label, num_classes, num_samples, getattr(model, "null_class", num_classes))
    unconditional = labels is None or class_label.strip().lower() == "none"
    clipping = cfg.sampling.driver_options()  # the checkpoint's defaults, then the flags
    if clip is not None:
        clipping["clip_denoised"] = clip
    if dynamic_threshold is not None:
        clipping["dynamic_threshold"] = dynamic_threshold
    if final_level is not None:
        clipping["final_level"] = final_level
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

    rank, world = _distributed(device)  # under torchrun, each rank samples a contiguous share
    share = math.ceil(num_samples / world)
    first, last = min(rank * share, num_samples), min((rank + 1) * share, num_samples)
    from diffreg.sampling.levels import Levels

    steps_per_batch = Levels.on_grid(
        diffusion.process, diffusion.grid_times(steps, grid, sampler_obj), clipping.get("final_level", "data")
    ).num_steps
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
                # sample k depends on (seed, k) only, on any device: the generators are the CPU's
                # (the same numbers on a GPU as on the CPU), each step's noise copied to the device
                # through pinned memory without waiting for it
                generator=per_sample_generators(seed, n, start=lo),
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
    if named is None and isinstance(grid, dict):  # the checkpoint's default grid may have a name too
        named = next((k for k, g in cfg.sampling.grids.items() if g.grid.to_dict() == grid), None)
    if named is not None:
        grid_name = f"{named} (explicit, {stats.get('steps', steps)} levels)"
    if unconditional and not (guidance is not None and guidance.separate_unconditional):
        guidance_text = "unconditional"  # no labels: nothing is guided
    else:
        guidance_text = f"guidance {(repr(guidance) + ' ') if guidance else ''}{guidance_scale:g}"
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
        f"{stats.get('nfe', '?')} NFE, grid {grid_name}, {guidance_text}, {_clip_text(clipping)}) "
        f"in {elapsed:.1f} s{cpu} -> {', '.join(map(shown_path, written)) or 'nothing written'}{shown}"
    )
    finish_distributed()
