"""diffreg's benchmark suite, side by side with diffusers (a benchmark-only dependency).

    python benchmarks/run.py            # all four tables, writes benchmarks/results.json
    python benchmarks/run.py --quick    # fewer repeats (a smoke run)
    python benchmarks/run.py --tables 1,4

Tables:
1. per-step sampler cost, model excluded, for every registered sampler beside the matching
   diffusers scheduler (same shapes, interleaved runs, medians, ratio);
2. error against the exact probability-flow ODE solution per NFE on the Gaussian-mixture
   denoiser of ``diffreg.testing``, for every deterministic registered sampler beside diffusers'
   DDIM, DPM-Solver++ (2M), UniPC, DEIS and Euler (same schedule, trailing spacing);
3. training step cost (``training_losses`` + backward) beside a hand-written eps-MSE step on the
   same small model;
4. peak memory (max RSS of a fresh process) of sampling at 10, 100 and 1000 steps.

Speed and memory are measured as ratios against a peer in the same run; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import diffreg
from diffreg import registry

HERE = Path(__file__).resolve().parent

# diffreg sampler -> (diffusers scheduler class, constructor options, model evaluations per step)
DIFFUSERS_PEERS = {
    "ddim": ("DDIMScheduler", {}, 1),
    "ddpm": ("DDPMScheduler", {}, 1),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, 1),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, 1),
    "unipc": ("UniPCMultistepScheduler", {}, 1),
    "euler": ("EulerDiscreteScheduler", {}, 1),
    "heun": ("HeunDiscreteScheduler", {}, 2),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, 1),
}


def _median_interleaved(fns, repeats):
    """Median seconds of each function, run in turn ``repeats`` times. A function may return its
    own elapsed time (to leave set-up out of the measurement); otherwise the call is timed."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            inner = fn()
            times[k].append(inner if isinstance(inner, float) else time.perf_counter() - start)
    return [statistics.median(t) for t in times]


# -- table 1 ---------------------------------------------------------------------------------------


def _diffusers_loop(name, options, shape, steps, out, x_T):
    import diffusers

    gen = torch.Generator().manual_seed(0)
    cls = getattr(diffusers, name)
    takes_generator = "generator" in cls.step.__code__.co_varnames

    def run():
        # a fresh scheduler per run (they keep per-run state), built outside the timed loop
        scheduler = cls(num_train_timesteps=1000, beta_schedule="linear", **options)
        scheduler.set_timesteps(steps)
        kwargs = {"generator": gen} if takes_generator else {}
        start = time.perf_counter()
        x = x_T * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            scheduler.scale_model_input(x, t)
            x = scheduler.step(out, t, x, **kwargs).prev_sample
        return time.perf_counter() - start

    return run


#: samplers also measured without the driver's per-step finiteness record (diffusers keeps none):
#: the like-for-like cost of the step itself
LIKE_FOR_LIKE = ("ddim", "ddpm")


def table_sampler_step(repeats: int, rounds: int = 3, batch: int = 64, steps: int = 50, only=None) -> list[dict]:
    """Per-step cost of every registered sampler beside its diffusers scheduler. Each of
    ``rounds`` rounds measures every row (``repeats`` interleaved runs, medians); a row reports the
    median over rounds and the range of its per-round ratios, since one round on a shared machine
    can be off by 30%."""
    shape = (batch, 3, 32, 32)
    out = torch.randn(shape)
    x_T = torch.randn(shape)
    diffusion = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    gen = torch.Generator().manual_seed(0)
    cases = []  # (label, nfe per step, our run, diffusers peer or None)
    components = [c for c in registry.components("sampler") if only is None or c.name in only]
    plain = [(c, True) for c in components]
    like_for_like = [(c, False) for c in components if c.name in LIKE_FOR_LIKE]
    for component, check_finite in plain + like_for_like:

        def ours(name=component.qualified_name, check_finite=check_finite):
            diffusion.sample(
                lambda x, t, **k: out,
                shape,
                sampler=name,
                steps=steps,
                noise=x_T,
                generator=gen,
                check_finite=check_finite,
            )

        label = component.qualified_name + ("" if check_finite else " (check_finite=False)")
        cases.append((label, int(component.metadata.get("nfe_per_step", 1)), ours, DIFFUSERS_PEERS.get(component.name)))
    per_round: list[list[tuple[float, float | None]]] = [[] for _ in cases]
    for _ in range(rounds):
        for k, (_, _, ours, peer) in enumerate(cases):
            fns = [ours] + ([_diffusers_loop(peer[0], peer[1], shape, steps, out, x_T)] if peer else [])
            medians = _median_interleaved(fns, repeats)
            ours_us = medians[0] / steps * 1e6
            # diffusers' Heun takes two step() calls per timestep: compare per timestep
            peer_us = medians[1] / len(_peer_timesteps(peer, steps)) * peer[2] * 1e6 if peer else None
            per_round[k].append((ours_us, peer_us))
    rows = []
    for (label, nfe, _, peer), measured in zip(cases, per_round, strict=True):
        row = {"sampler": label, "nfe_per_step": nfe, "diffreg_us": statistics.median(m[0] for m in measured)}
        if peer is not None:
            ratios = [m[0] / m[1] for m in measured if m[1]]
            row.update(
                diffusers=peer[0],
                diffusers_us=statistics.median(m[1] for m in measured if m[1]),
                ratio=statistics.median(ratios),
                ratio_min=min(ratios),
                ratio_max=max(ratios),
            )
        rows.append(row)
    return rows


def _peer_timesteps(peer, steps):
    import diffusers

    scheduler = getattr(diffusers, peer[0])(num_train_timesteps=1000, beta_schedule="linear", **peer[1])
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def print_table_1(rows, batch=64):
    print(
        f"\n### 1. Sampler step cost, model excluded (batch {batch}x3x32x32 fp32, {torch.get_num_threads()} threads)\n"
    )
    print("| sampler | diffreg us/step | diffusers scheduler | diffusers us/step | ratio | ratio range |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "diffusers" in r:
            cells = [r["sampler"], f"{r['diffreg_us']:.0f}", r["diffusers"], f"{r['diffusers_us']:.0f}"]
            cells += [f"{r['ratio']:.2f}", f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f}"]
            print("| " + " | ".join(cells) + " |")
        else:
            print(f"| {r['sampler']} | {r['diffreg_us']:.0f} | — | — | — | — |")


# -- table 2 ---------------------------------------------------------------------------------------


def table_ode_error(nfes=(5, 10, 20, 50)) -> list[dict]:
    from benchmarks.ode_error import ode_error_rows

    return ode_error_rows(nfes)


def print_table_2(rows):
    if not rows:
        return
    nfes = sorted({int(k) for r in rows for k in r["error"]})
    print("\n### 2. Error to the exact probability-flow ODE solution (Gaussian mixture, linear T=1000, trailing)\n")
    print("| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---|" + "---|" * len(nfes))
    for r in rows:
        cells = [f"{r['error'][str(n)]:.2e}" if str(n) in r["error"] else "—" for n in nfes]
        print(f"| {r['sampler']} | " + " | ".join(cells) + " |")


# -- table 3 ---------------------------------------------------------------------------------------


def table_training_step(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    diffusion = diffreg.Diffusion.from_config({"schedule": "cosine", "num_timesteps": 1000, "loss": "mse"})
    model = registry.create("model", "unet", in_channels=1, image_size=8, model_channels=32, num_classes=10)
    x = torch.randn(128, 1, 8, 8)
    y = torch.randint(0, 10, (128,))
    t = torch.randint(0, 1000, (128,))
    noise = torch.randn_like(x)
    abar = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float32)

    def ours():
        model.zero_grad(set_to_none=True)
        diffusion.training_losses(model, x, t, model_kwargs={"y": y}, noise=noise)["loss"].mean().backward()

    def by_hand():  # the textbook eps-MSE step (Ho et al. 2020, Algorithm 1)
        model.zero_grad(set_to_none=True)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * noise
        ((model(x_t, t, y=y) - noise) ** 2).mean().backward()

    ours_s, hand_s = _median_interleaved([ours, by_hand], repeats)
    return [
        {
            "case": "UNet 0.3M, batch 128x1x8x8, eps-MSE",
            "diffreg_ms": ours_s * 1e3,
            "hand_ms": hand_s * 1e3,
            "ratio": ours_s / hand_s,
        }
    ]


def print_table_3(rows):
    print("\n### 3. Training step (training_losses + backward) beside a hand-written eps-MSE step\n")
    print("| case | diffreg ms | hand-written ms | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['diffreg_ms']:.1f} | {r['hand_ms']:.1f} | {r['ratio']:.2f} |")


# -- table 4 ---------------------------------------------------------------------------------------

_MEMORY_CHILD = """
import resource, sys, torch, diffreg
torch.set_num_threads(1)
steps, who = int(sys.argv[1]), sys.argv[2]
shape = (256, 3, 32, 32)
out, x = torch.randn(shape), torch.randn(shape)
if who == "diffusers DDIMScheduler":
    import diffusers
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(out, t, x).prev_sample
else:
    d = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    d.sample(lambda x, t, **k: out, shape, sampler=who, steps=steps, noise=x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def table_memory(step_counts=(10, 100, 1000), samplers=("ddim", "ddpm", "diffusers DDIMScheduler")) -> list[dict]:
    """Peak resident memory (MiB) of a fresh process that samples once; flat across step counts
    means nothing accumulates per step."""
    rows = []
    for sampler in samplers:
        row = {"sampler": sampler, "peak_mb": {}}
        for steps in step_counts:
            result = subprocess.run(
                [sys.executable, "-c", _MEMORY_CHILD, str(steps), sampler],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            row["peak_mb"][str(steps)] = int(result.stdout.strip().splitlines()[-1]) / 1024  # KiB -> MiB
        rows.append(row)
    return rows


def print_table_4(rows):
    counts = list(rows[0]["peak_mb"]) if rows else []
    print("\n### 4. Peak memory of one sampling call (max RSS of a fresh process, MiB; batch 256x3x32x32)\n")
    print("| sampler | " + " | ".join(f"{c} steps" for c in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for r in rows:
        print(f"| {r['sampler']} | " + " | ".join(f"{r['peak_mb'][c]:.0f}" for c in counts) + " |")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="diffreg benchmarks beside diffusers")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--tables", default="1,2,3,4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of table 1 (ratio = median over rounds)")
    parser.add_argument("--output", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 9
    rounds = 1 if args.quick else args.rounds
    tables = {int(t) for t in args.tables.split(",")}
    results: dict = {"diffreg": diffreg.__version__, "torch": torch.__version__, "threads": args.threads}
    try:
        import diffusers

        results["diffusers"] = diffusers.__version__
    except ImportError:
        sys.exit("the benchmarks compare against diffusers: pip install diffusers")
    if 1 in tables:
        # the loop's own cost at batch 1 (Python overhead) and at 64x3x32x32 (tensor work)
        results["sampler_step_batch1"] = table_sampler_step(repeats, rounds, batch=1, only=LIKE_FOR_LIKE)
        print_table_1(results["sampler_step_batch1"], batch=1)
        results["sampler_step"] = table_sampler_step(repeats, rounds)
        print_table_1(results["sampler_step"])
    if 2 in tables:
        results["ode_error"] = table_ode_error()
        print_table_2(results["ode_error"])
    if 3 in tables:
        results["training_step"] = table_training_step(repeats)
        print_table_3(results["training_step"])
    if 4 in tables:
        results["memory"] = table_memory()
        print_table_4(results["memory"])
    from diffreg.fileio import atomic_path

    with atomic_path(args.output) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.output}")
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
