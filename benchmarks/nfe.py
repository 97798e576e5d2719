"""Error per NFE with optimized steps (issue 18), beside diffusers' schedulers on every grid.

Part 1, exact denoisers: for each case (a Gaussian mixture of ``diffreg.testing`` whose exact
denoiser stands in for the model; linear or cosine schedule, T = 1000; eps or v output), 256
starting points x_T ~ N(0, I) at t = 999 (seed 0) are solved by

- every deterministic diffreg sampler (every registered one whose default is deterministic, but
  ``adaptive``, plus UniPC's bh1 variant) on the ``trailing``, ``karras`` and ``exponential``
  grids, and (the samplers of ``OPTIMIZED_EVERYWHERE``) on a grid from
  ``diffreg.optimize.optimize_steps`` (fitted on 512 *other* starting points, seed 1, against its
  default reference solve, 400 sampling calls: the exact solution and the measured starting points
  are never seen); ``final_order=2`` variants of dpmpp_2m and unipc are rows of their own;
- every deterministic diffusers scheduler on every grid it offers that starts at t = 999
  (``timestep_spacing`` trailing and linspace; ``use_karras_sigmas``, ``use_exponential_sigmas``,
  ``use_beta_sigmas``, ``use_lu_lambdas`` where accepted). ``leading`` spacing starts at a less
  noisy level (t = 900 at 10 steps) and so solves another problem; it is left out.

Error: RMS over the 256 samples of the Euclidean distance to ``exact_ode_solution`` (DOP853,
rtol = atol = 1e-10); NFE: model calls counted (a diffreg sampler's steps are the most whose
call fits in the NFE on the default grid; diffusers' Heun/KDPM2 spend 2 per step but 1 on the
last).

Part 2, the bundled digits model: SVM accuracy (as scripts/evaluate_bundled.py) and the Frechet
distance of the SVM's decision-function features (10-D, sklearn digits' 1797 images vs 500
samples, labels cycled), with ``dpmpp_2m`` on its default grid and on grids optimized for the
model at each NFE.

    python benchmarks/nfe.py [--quick] [--skip-digits] [--output benchmarks/nfe.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import diffreg
from diffreg import registry
from diffreg.optimize import optimize_steps, steps_for_nfe
from diffreg.testing import GaussianMixture, exact_ode_solution

HERE = Path(__file__).resolve().parent
#: option variants measured beside a sampler's defaults: label -> (name, options)
VARIANTS = {
    "dpmpp_2m": [("dpmpp_2m (final 2)", "dpmpp_2m", {"final_order": 2})],
    "unipc": [("unipc (final 2)", "unipc", {"final_order": 2}), ("unipc-3 (final 2)", "unipc", {"order": 3, "final_order": 2})],
}
NFES = (3, 5, 8, 10, 15, 20, 50)
GRIDS = ("trailing", "karras", "exponential")
DRAWS = 256

# diffusers: label -> (class, options); the grids are found from each class's arguments
DIFFUSERS = {
    "DDIM": ("DDIMScheduler", {"set_alpha_to_one": True, "clip_sample": False}),
    "DPM-Solver++ (2M)": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM-Solver++ (3M)": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "DPM-Solver (2M)": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min"},
    ),
    "DPM-Solver++ (2S)": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM-Solver++ (3S)": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "UniPC (bh2)": ("UniPCMultistepScheduler", {"solver_type": "bh2"}),
    "UniPC (bh1)": ("UniPCMultistepScheduler", {"solver_type": "bh1"}),
    "UniPC-3 (bh2)": ("UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 3}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "KDPM2": ("KDPM2DiscreteScheduler", {}),
    "PNDM (PLMS)": ("PNDMScheduler", {"skip_prk_steps": True}),
}
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


def cases(quick: bool) -> list[dict]:
    """The exact-denoiser problems."""
    narrow = GaussianMixture([0.5, 0.5], [[-0.8, 0.0], [0.8, 0.1]], [0.05, 0.05])
    all_cases = [
        {"name": "mixture-2d, linear, eps", "mixture": GaussianMixture.example(2), "schedule": "linear", "out": "eps"},
        {"name": "mixture-2d, cosine, v", "mixture": GaussianMixture.example(2), "schedule": "cosine", "out": "v"},
        {"name": "mixture-8d, linear, v", "mixture": GaussianMixture.example(8), "schedule": "linear", "out": "v"},
        {"name": "narrow-2d, cosine, eps", "mixture": narrow, "schedule": "cosine", "out": "eps"},
    ]
    return all_cases[:2] if quick else all_cases


def diffreg_samplers() -> list[tuple[str, str, dict]]:
    """(label, name, options) of every deterministic registered sampler (``adaptive`` aside)."""
    out = []
    for component in registry.components("sampler"):
        if component.name == "adaptive" or component.metadata.get("stochastic", False) is True:
            continue
        sampler = registry.create("sampler", component.name)
        if getattr(sampler, "stochastic", False):
            continue
        out.append((component.name, component.name, {}))
        if component.name == "unipc":
            out.append(("unipc (bh1)", "unipc", {"variant": "bh1"}))
        out.extend(VARIANTS.get(component.name, []))
    return out


def _rms(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((x.double() - exact) ** 2).sum(dim=1).mean().sqrt())


def _ours(diffusion, model, x_T, name, options, times):
    stats: dict = {}
    x = diffreg.sampling.sample_loop(
        diffusion,
        model,
        tuple(x_T.shape),
        sampler=registry.create("sampler", name, **options),
        times=times,
        noise=x_T,
        clip_denoised=False,
        dtype=torch.float64,
        stats=stats,
    )
    return x, int(stats["nfe"])


class _Counting:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t):
        self.calls += 1
        t = t.reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        t = t.long() if not t.is_floating_point() or bool((t == t.round()).all()) else t.double()
        return self.model(x, t)


def _theirs(diffusion, model, x_T, cls, options, steps):
    scheduler = cls(**options)
    scheduler.set_timesteps(steps)
    if round(float(scheduler.timesteps[0])) != diffusion.num_timesteps - 1:
        return None, 0  # starts elsewhere: another problem
    counted = _Counting(model)
    x = x_T.clone() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = counted(scheduler.scale_model_input(x, t), t.reshape(1))
        x = scheduler.step(out, t, x).prev_sample
    return x, counted.calls


def diffusers_grids(cls) -> list[tuple[str, dict]]:
    accepted = inspect.signature(cls.__init__).parameters
    grids = [("trailing", {"timestep_spacing": "trailing"})] if "timestep_spacing" in accepted else [("default", {})]
    if "timestep_spacing" in accepted:
        grids.append(("linspace", {"timestep_spacing": "linspace"}))
    for flag in SIGMA_FLAGS:
        if flag in accepted:
            grids.append((flag.replace("use_", "").replace("_sigmas", ""), {flag: True}))
    return grids


#: samplers whose optimized grid is fitted in every case (the first case fits every sampler's)
OPTIMIZED_EVERYWHERE = ("dpmpp_2m (final 2)", "unipc", "unipc (final 2)", "unipc-3 (final 2)", "deis", "ipndm")
#: the search's draws (half fitted, half held out by optimize_steps itself) and sampling calls
FIT_DRAWS, FIT_EVALS = 1024, 400


def exact_case(case: dict, nfes, log) -> dict:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()

    mixture = case["mixture"]
    diffusion = diffreg.Diffusion.from_config(
        {"schedule": case["schedule"], "num_timesteps": 1000, "parameterization": case["out"]}
    )
    model = mixture.denoiser(diffusion, case["out"])
    x_T = torch.randn(DRAWS, mixture.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = time.perf_counter()
    exact = exact_ode_solution(mixture, diffusion, x_T, diffusion.num_timesteps - 1)
    log(f"  exact solution {time.perf_counter() - start:.1f} s")
    rows = []
    for label, name, options in diffreg_samplers():
        sampler = registry.create("sampler", name, **options)
        optimize = label in OPTIMIZED_EVERYWHERE
        per_grid: dict[str, dict] = {g: {"error": {}, "nfe": {}} for g in (*GRIDS, "optimized")}
        t0 = time.perf_counter()
        for nfe in nfes:
            try:
                steps = steps_for_nfe(diffusion, model, sampler, nfe, (mixture.dim,), {}, {"clip_denoised": False})
            except ValueError:
                continue  # below this sampler's minimum NFE
            for grid in GRIDS:
                x, used = _ours(diffusion, model, x_T, name, options, diffusion.grid_times(steps, grid))
                per_grid[grid]["error"][str(nfe)] = _rms(x, exact)
                per_grid[grid]["nfe"][str(nfe)] = used
            if not optimize:
                continue
            result = optimize_steps(
                diffusion,
                model,
                (mixture.dim,),
                sampler=name,
                sampler_options=options,
                nfe=nfe,
                draws=FIT_DRAWS,
                seed=1,
                max_evals=FIT_EVALS,
                dtype=torch.float64,
                clip_denoised=False,
            )
            x, used = _ours(diffusion, model, x_T, name, options, np.asarray(result.times))
            per_grid["optimized"]["error"][str(nfe)] = _rms(x, exact)
            per_grid["optimized"]["nfe"][str(nfe)] = used
        for grid, cell in per_grid.items():
            if cell["error"]:
                rows.append({"sampler": f"{label}, {grid}", "source": "diffreg", **cell})
        log(f"  {label}: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    for label, (cls_name, options) in DIFFUSERS.items():
        cls = getattr(diffusers, cls_name)
        base = {
            "num_train_timesteps": 1000,
            "beta_schedule": "linear" if case["schedule"] == "linear" else "squaredcos_cap_v2",
            "prediction_type": "epsilon" if case["out"] == "eps" else "v_prediction",
            **options,
        }
        for grid, grid_options in diffusers_grids(cls):
            row = {"sampler": f"diffusers {label}, {grid}", "source": "diffusers", "error": {}, "nfe": {}}
            for nfe in nfes:
                # the most steps whose model calls fit in nfe (Heun, KDPM2: 2 per step, 1 on the last)
                steps = nfe
                while True:
                    try:
                        x, used = _theirs(diffusion, model, x_T, cls, {**base, **grid_options}, steps)
                    except Exception:  # a combination diffusers refuses (or fails on)
                        x, used = None, 0
                    if x is None or used <= nfe or steps == 1:
                        break
                    steps = max(1, min(steps - 1, (steps * (nfe + 1)) // used))
                if x is not None and used <= nfe and bool(torch.isfinite(x).all()):
                    row["error"][str(nfe)] = _rms(x, exact)
                    row["nfe"][str(nfe)] = used
            if row["error"]:
                rows.append(row)
    log(f"  diffusers: {time.perf_counter() - t0:.1f} s")
    return {"case": case["name"], "rows": rows}


def best(rows, source, nfe, grid=None):
    cand = [
        (r["error"][nfe], r["sampler"])
        for r in rows
        if r["source"] == source and nfe in r["error"] and (grid is None or r["sampler"].endswith(f", {grid}"))
    ]
    return min(cand) if cand else (math.inf, "")


# -- part 2: the bundled model ---------------------------------------------------------------------


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` and ``b`` ([N, D])
    (Heusel et al. 2017, eq. 6, on these features instead of Inception's)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def digits_part(nfes, n, log, optimize_nfes) -> dict:
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    from diffreg.sampling import per_sample_generators

    digits = load_digits()
    svm = SVC(gamma=0.001, decision_function_shape="ovr").fit(digits.data, digits.target)
    real = svm.decision_function(digits.data)
    model, diffusion, cfg = diffreg.load_checkpoint(None)
    labels = torch.arange(n) % 10
    options = cfg.sampling.driver_options()
    sampler = registry.create("sampler", "dpmpp_2m")

    def quality(times) -> dict:
        stats: dict = {}
        x = diffreg.sampling.sample_loop(
            diffusion,
            model,
            (n, 1, 8, 8),
            sampler=sampler,
            times=times,
            generator=per_sample_generators(0, n),
            model_kwargs={"y": labels},
            stats=stats,
            **options,
        )
        pixels = ((x.clamp(-1, 1) + 1) / 2 * 16).reshape(n, 64).numpy()
        return {
            "accuracy": float(np.mean(svm.predict(pixels) == labels.numpy())),
            "frechet": frechet_distance(real, svm.decision_function(pixels)),
            "nfe": int(stats["nfe"]),
        }

    out: dict = {"sampler": "dpmpp_2m", "samples": n, "default": {}, "optimized": {}, "search": {}}
    for nfe in nfes:
        t0 = time.perf_counter()
        out["default"][str(nfe)] = quality(diffusion.grid_times(nfe, "trailing"))
        log(f"  digits NFE {nfe} default: {out['default'][str(nfe)]} ({time.perf_counter() - t0:.0f} s)")
    for nfe in optimize_nfes:
        t0 = time.perf_counter()
        result = optimize_steps(
            diffusion,
            model,
            (1, 8, 8),
            sampler="dpmpp_2m",
            nfe=nfe,
            draws=128,
            seed=1,
            num_classes=10,
            max_evals=min(8 * (nfe - 1) + 8, 60),
            **options,
        )
        out["search"][str(nfe)] = {k: v for k, v in result.to_dict().items() if k not in ("grid",)}
        out["search"][str(nfe)]["times"] = result.times
        out["optimized"][str(nfe)] = quality(np.asarray(result.times))
        log(f"  digits NFE {nfe} optimized: {out['optimized'][str(nfe)]} ({time.perf_counter() - t0:.0f} s)")
    ref_times = diffusion.grid_times(100, "exponential")
    stats: dict = {}
    x = diffreg.sampling.sample_loop(
        diffusion,
        model,
        (n, 1, 8, 8),
        sampler=registry.create("sampler", "unipc"),
        times=ref_times,
        generator=per_sample_generators(0, n),
        model_kwargs={"y": labels},
        stats=stats,
        **options,
    )
    pixels = ((x.clamp(-1, 1) + 1) / 2 * 16).reshape(n, 64).numpy()
    out["reference_unipc_100"] = {
        "accuracy": float(np.mean(svm.predict(pixels) == labels.numpy())),
        "frechet": frechet_distance(real, svm.decision_function(pixels)),
        "nfe": int(stats["nfe"]),
    }
    out["real_digits_frechet_half_vs_half"] = frechet_distance(real[::2], real[1::2])
    return out


def print_tables(results) -> None:
    nfes = [str(n) for n in results["nfes"]]
    for case in results["exact"]:
        rows = case["rows"]
        print(f"\n#### {case['case']}: best error per NFE\n")
        print("| | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
        print("|---|" + "---|" * len(nfes))
        for label, source, grid in (
            ("best diffusers (scheduler, grid)", "diffusers", None),
            ("best diffreg, trailing", "diffreg", "trailing"),
            ("best diffreg, karras", "diffreg", "karras"),
            ("best diffreg, exponential", "diffreg", "exponential"),
            ("best diffreg, optimized", "diffreg", "optimized"),
        ):
            cells = []
            for n in nfes:
                err, who = best(rows, source, n, grid)
                cells.append(f"{err:.2e} ({who.replace('diffusers ', '')})" if math.isfinite(err) else "—")
            print(f"| {label} | " + " | ".join(cells) + " |")
        ratio = []
        for n in nfes:
            ours, theirs = best(rows, "diffreg", n)[0], best(rows, "diffusers", n)[0]
            ratio.append(f"{ours / theirs:.2f}" if math.isfinite(ours) and math.isfinite(theirs) else "—")
        print("| ratio best diffreg / best diffusers | " + " | ".join(ratio) + " |")
    if "digits" in results:
        d = results["digits"]
        print("\n#### bundled digits model, dpmpp_2m, 500 samples\n")
        print("| NFE | accuracy default | Frechet default | accuracy optimized | Frechet optimized |")
        print("|---|---|---|---|---|")
        for n in d["default"]:
            a, o = d["default"][n], d["optimized"].get(n)
            opt = f"{o['accuracy']:.3f} | {o['frechet']:.3f}" if o else "— | —"
            print(f"| {n} | {a['accuracy']:.3f} | {a['frechet']:.3f} | {opt} |")
        r = d["reference_unipc_100"]
        print(
            f"\nreference (unipc, 100 exponential levels): accuracy {r['accuracy']:.3f}, Frechet {r['frechet']:.3f}; "
            f"real digits half vs half: {d['real_digits_frechet_half_vs_half']:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="two cases, NFE 5/10/20, fewer digit samples")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--output", default=str(HERE / "nfe.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    warnings.filterwarnings("ignore")  # diffusers' deprecation and configuration notices
    nfes = (5, 10, 20) if args.quick else NFES
    start = time.perf_counter()
    results: dict = {"nfes": list(nfes), "exact": []}
    for case in cases(args.quick):
        log(case["name"])
        results["exact"].append(exact_case(case, nfes, log))
    if not args.skip_digits:
        log("digits")
        results["digits"] = digits_part(
            (5, 8, 10, 15, 20, 50) if not args.quick else (5, 10, 20), 200 if args.quick else 500, log, (5, 10)
        )
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["torch"] = torch.__version__
    try:
        import diffusers

        results["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print_tables(results)
    log(f"total {results['seconds']} s -> {args.output}")


if __name__ == "__main__":
    main()
