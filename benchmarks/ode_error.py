"""Table 2: error to the exact probability-flow ODE solution per NFE.

Data: the 2-D Gaussian mixture of ``diffreg.testing`` (its exact denoiser stands in for a model);
schedule: linear, T = 1000; spacing: trailing (diffreg's default, and ``timestep_spacing="trailing"``
for diffusers); 256 starting points x_T ~ N(0, I) at t = 999. Error: RMS over samples of the
Euclidean distance to ``diffreg.testing.exact_ode_solution`` (DOP853, rtol = atol = 1e-10).

    python benchmarks/ode_error.py
"""

from __future__ import annotations

import math

import torch

import diffreg
from diffreg import registry
from diffreg.testing import GaussianMixture, exact_ode_solution

DIFFUSERS_SOLVERS = {
    "DDIM": ("DDIMScheduler", {"set_alpha_to_one": True, "clip_sample": False}),
    "DPM-Solver++ (2M)": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    # diffusers' own non-uniform grids, for a like-for-like look at diffreg's sigma grids
    "DPM-Solver++ (2M), Lu lambdas": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_lu_lambdas": True},
    ),
    "DPM-Solver++ (2M), Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "UniPC, Karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
}
GRIDS = ("karras", "lambda_uniform")


def _setup(n: int = 256, seed: int = 0):
    mixture = GaussianMixture.example(dim=2)
    diffusion = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = exact_ode_solution(mixture, diffusion, x_T, diffusion.num_timesteps - 1)
    return mixture, diffusion, x_T, exact


def _rms(x, exact) -> float:
    return float(((x.double() - exact) ** 2).sum(dim=1).mean().sqrt())


def _steps_for(nfe: int, nfe_per_step: int) -> int:
    # Heun-type samplers spend nfe_per_step per step except the last (Karras et al. 2022, Alg. 1)
    return max(1, math.ceil((nfe + nfe_per_step - 1) / nfe_per_step)) if nfe_per_step > 1 else nfe


def _ours(diffusion, model, x_T, sampler, steps, **options):
    stats: dict = {}
    x = diffusion.sample(
        model,
        x_T.shape,
        sampler=sampler,
        steps=steps,
        spacing="trailing",
        noise=x_T.float(),
        clip_denoised=False,
        stats=stats,
        **options,
    )
    return x, stats["nfe"]


def _theirs(diffusion, model, x_T, cls_name, options, nfe):
    import diffusers

    scheduler = getattr(diffusers, cls_name)(
        num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="trailing", **options
    )
    scheduler.set_timesteps(nfe)
    x = x_T.float() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        eps = model(model_in, torch.full((x.shape[0],), int(t), dtype=torch.long))
        x = scheduler.step(eps, t, x).prev_sample
    return x


def ode_error_rows(nfes=(5, 10, 20, 50)) -> list[dict]:
    mixture, diffusion, x_T, exact = _setup()
    model = mixture.denoiser(diffusion, "eps")
    rows = []
    for component in registry.components("sampler"):
        stochastic = component.metadata.get("stochastic", False)
        if stochastic is True:
            continue  # an SDE sampler has no single ODE solution to compare with
        per_step = int(component.metadata.get("nfe_per_step", 1))
        grids = [None] + ([g for g in GRIDS] if "sigmas" in registry.accepted_options(component) else [])
        for grid in grids:
            options = {"sigmas": grid} if grid else {}
            row = {
                "sampler": component.qualified_name + (f" ({grid})" if grid else ""),
                "source": "diffreg",
                "error": {},
            }
            for nfe in nfes:
                x, used = _ours(diffusion, model, x_T, component.qualified_name, _steps_for(nfe, per_step), **options)
                row["error"][str(nfe)] = _rms(x, exact)
                row.setdefault("nfe_used", {})[str(nfe)] = used
            rows.append(row)
    for label, (cls_name, options) in DIFFUSERS_SOLVERS.items():
        row = {"sampler": f"diffusers {label}", "source": "diffusers", "error": {}}
        for nfe in nfes:
            row["error"][str(nfe)] = _rms(_theirs(diffusion, model, x_T, cls_name, options, nfe), exact)
        rows.append(row)
    return rows


def best_by_source(rows) -> dict:
    """For each NFE: the best diffreg error and the best diffusers error."""
    out = {}
    for nfe in rows[0]["error"]:
        ours = min(r["error"][nfe] for r in rows if r["source"] == "diffreg")
        theirs = min(r["error"][nfe] for r in rows if r["source"] == "diffusers")
        out[nfe] = {"diffreg": ours, "diffusers": theirs}
    return out


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.run import print_table_2

    rows = ode_error_rows()
    print_table_2(rows)
    for nfe, best in best_by_source(rows).items():
        print(f"NFE {nfe}: best diffreg {best['diffreg']:.2e}, best diffusers {best['diffusers']:.2e}")
