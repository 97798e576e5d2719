"""Per-step cost of the samplers themselves (model excluded), beside diffusers' schedulers.

The model is a function returning a precomputed output, so what is timed is the sampler: its
update, the driver's guidance/clipping/bookkeeping, and the noise draw. Runs are interleaved
(ours, theirs, ours, ...) and medians are reported with their ratio.

    python benchmarks/sampler_step.py [--batch 64] [--steps 50] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import diffreg


def _ours(sampler: str, shape, steps: int, clip: bool, eta: float | None):
    diffusion = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    out = torch.randn(shape)
    x_T = torch.randn(shape)
    gen = torch.Generator().manual_seed(0)
    options = {} if eta is None else {"eta": eta}

    def run():
        diffusion.sample(
            lambda x, t, **k: out,
            shape,
            sampler=sampler,
            steps=steps,
            spacing="leading",
            noise=x_T,
            generator=gen,
            clip_denoised=clip,
            **options,
        )

    return run


def _theirs(name: str, shape, steps: int, clip: bool):
    import diffusers

    cls = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}[name]
    scheduler = cls(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip)
    scheduler.set_timesteps(steps)
    out = torch.randn(shape)
    x_T = torch.randn(shape)
    gen = torch.Generator().manual_seed(0)

    def run():
        x = x_T
        for t in scheduler.timesteps:
            kwargs = {"generator": gen} if name == "ddpm" else {}
            x = scheduler.step(out, t, x, **kwargs).prev_sample

    return run


def _time(fn, steps):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / steps * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (args.batch, 3, 32, 32)
    cases = [
        ("ddim eta=0, clip", _ours("ddim", shape, args.steps, True, 0.0), _theirs("ddim", shape, args.steps, True)),
        (
            "ddim eta=0, no clip",
            _ours("ddim", shape, args.steps, False, 0.0),
            _theirs("ddim", shape, args.steps, False),
        ),
        ("ddpm, clip", _ours("ddpm", shape, args.steps, True, None), _theirs("ddpm", shape, args.steps, True)),
    ]
    rows = []
    for label, ours, theirs in cases:
        ours(), theirs()  # warm-up
        a, b = [], []
        for _ in range(args.repeats):
            a.append(_time(ours, args.steps))
            b.append(_time(theirs, args.steps))
        ma, mb = statistics.median(a), statistics.median(b)
        rows.append({"case": label, "diffreg_us": ma, "diffusers_us": mb, "ratio": ma / mb})
    print(f"| case (batch {shape}, {args.threads} threads) | diffreg us/step | diffusers us/step | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['diffreg_us']:.0f} | {r['diffusers_us']:.0f} | {r['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
