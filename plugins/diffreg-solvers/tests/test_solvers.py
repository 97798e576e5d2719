"""Tests of diffreg-solvers, installed as a third party would (``pip install -e plugins/diffreg-solvers``).

Most checks use 1-D Gaussian data x0 ~ N(MU, S^2), for which the denoiser is exact and the
probability-flow ODE has a closed-form solution (VE form, s = sigma / alpha):

    x~(s) = MU + (x~(s_T) - MU) sqrt(S^2 + s^2) / sqrt(S^2 + s_T^2).
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import math
import warnings

import diffreg_solvers
import numpy as np
import pytest
import torch

import diffreg
from diffreg import registry
from diffreg.errors import ComponentOptionError
from diffreg.sampling import sample_loop, sample_loop_progressive
from diffreg.schedule import spaced_timesteps

MU, S = 0.5, 0.3
SAMPLERS = ["euler", "heun", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]  # test_fast_solvers.py: the rest
DETERMINISTIC = ["euler", "heun", "dpmpp_2m", "unipc"]
STOCHASTIC = ["euler_ancestral", "dpmpp_2m_sde"]
MEAN_TYPES = ["eps", "x0", "v"]
ZTSNR = {"name": "linear", "rescale_zero_terminal_snr": True}


class GaussianDenoiser:
    """The exact model output for x0 ~ N(MU, S^2) per dimension: E[x0 | x_t] = MU + sqrt(a) S^2 /
    (a S^2 + 1 - a) (x_t - sqrt(a) MU), a = abar_t; written as eps, x0 or v. Records the timesteps."""

    def __init__(self, diffusion, mean_type: str = "eps"):
        self.abar = torch.tensor(diffusion.tables.alphas_cumprod, dtype=torch.float64)
        self.process = diffusion.process
        self.mean_type = mean_type
        self.calls: list[float] = []

    def __call__(self, x, t, **kwargs):
        self.calls.append(t[0].item())
        if t.is_floating_point():  # a level between timesteps: the process's interpolation
            abar = torch.from_numpy(self.process.alpha_sigma(t.double().numpy())[0] ** 2)
        else:
            abar = self.abar[t]
        a = abar.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x0 = MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)
        if self.mean_type == "x0":
            return x0
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if self.mean_type == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0


@functools.lru_cache
def diffusion(mean_type: str = "eps", ztsnr: bool = False, num_timesteps: int = 1000) -> diffreg.Diffusion:
    schedule = ZTSNR if ztsnr else "linear" if num_timesteps >= 100 else "cosine"
    return diffreg.Diffusion.from_config(
        {"schedule": schedule, "num_timesteps": num_timesteps, "parameterization": mean_type}
    )


def x_T(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sample(name, steps, noise, *, mean_type="eps", ztsnr=False, d=None, dtype=torch.float64, **options):
    d = diffusion(mean_type, ztsnr) if d is None else d
    model = GaussianDenoiser(d, mean_type)
    out = d.sample(
        model, noise.shape, sampler=name, steps=steps, noise=noise, dtype=dtype, clip_denoised=False, **options
    )
    return out, model


def ode_solution(d: diffreg.Diffusion, noise: torch.Tensor) -> torch.Tensor:
    """x0 = MU + (x_T / alpha_T - MU) S / sqrt(S^2 + s_T^2): the PF-ODE end point from timestep T-1."""
    abar = d.tables.alphas_cumprod[-1]
    s_T = math.sqrt((1 - abar) / abar)
    return MU + (noise / math.sqrt(abar) - MU) * S / math.sqrt(S**2 + s_T**2)


def discrete_solution(d: diffreg.Diffusion, noise: torch.Tensor) -> torch.Tensor:
    """What an exact solver returns when its last step is from timestep 0: the PF-ODE solution at
    s_0 = s(t=0), then the denoiser D(x, 0) (every sampler's update to sigma = 0 is x = D). Converging
    to this rather than to ode_solution removes the fixed first-order error of that last step."""
    abar_T, abar_0 = d.tables.alphas_cumprod[-1], d.tables.alphas_cumprod[0]
    s_T, s_0 = math.sqrt((1 - abar_T) / abar_T), math.sqrt((1 - abar_0) / abar_0)
    return MU + (noise / math.sqrt(abar_T) - MU) * S**2 / math.sqrt(S**2 + s_0**2) / math.sqrt(S**2 + s_T**2)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# -- registration ---------------------------------------------------------------------------------


def test_registered_through_the_entry_point():
    eps = importlib.metadata.entry_points(group="diffreg")
    assert any(ep.name == "solvers" and ep.value == "diffreg_solvers" for ep in eps)
    component = registry.get("sampler", "dpmpp_2m")
    assert component.distribution == "diffreg-solvers"
    assert component.version == "0.1.0"
    assert registry.get("sampler", "diffreg-solvers:dpmpp_2m").factory is component.factory
    assert registry.get("sampler", "solvers:unipc").factory is diffreg_solvers.UniPC


@pytest.mark.parametrize("name", SAMPLERS)
def test_metadata_matches_class_attributes(name):
    component = registry.get("sampler", name)
    cls = component.factory
    assert component.metadata["order"] == cls.order
    assert component.metadata["nfe_per_step"] == cls.nfe_per_step
    assert component.metadata["stochastic"] is cls.stochastic is (name in STOCHASTIC)
    assert component.metadata["paper"] and "et al." in cls.__doc__  # paper and equation in the docstring


@pytest.mark.parametrize("name", SAMPLERS)
def test_diffreg_conformance_kit(name):
    """diffreg.testing.check_sampler: 2-D Gaussian mixture, trailing spacing, declared order,
    NFE bound, parameterizations, reproducibility, distribution of the stochastic samples.
    (It assumes trailing grids, so it is run with the default sigmas=None.)"""
    pytest.importorskip("scipy")
    testing = pytest.importorskip("diffreg.testing")
    report = testing.check_sampler(name)
    assert report.stochastic is (name in STOCHASTIC)


# -- every parameterization, zero terminal SNR ----------------------------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_result_for_eps_x0_and_v(name):
    noise = x_T(16).float()
    outs = {}
    for mean_type in MEAN_TYPES:
        gen = torch.Generator().manual_seed(3)
        outs[mean_type], _ = sample(name, 8, noise, mean_type=mean_type, dtype=torch.float32, generator=gen)
        assert torch.isfinite(outs[mean_type]).all()
    assert max_error(outs["x0"], outs["eps"]) < 1e-4
    assert max_error(outs["v"], outs["eps"]) < 1e-4


@pytest.mark.parametrize("name", SAMPLERS)
def test_zero_terminal_snr_is_finite(name):
    """abar_{T-1} = 0: alpha = 0, s = inf, lambda = -inf at the first step. The exact PF-ODE end
    point from pure noise x_T is then MU + S x_T; deterministic solvers converge to it."""
    d = diffusion("v", True)
    assert d.tables.alphas_cumprod[-1] == 0.0
    noise = x_T(32)
    for grid in (None, "karras", "lambda_uniform"):
        options = {} if grid is None else {"sigmas": grid}
        errors = []
        for steps in (1, 2, 10, 50):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no numpy divide/invalid warnings either
                out, _ = sample(name, steps, noise, mean_type="v", ztsnr=True, generator=torch.Generator(), **options)
            assert torch.isfinite(out).all(), (grid, steps)
            errors.append(max_error(out, MU + S * noise))
        if name in DETERMINISTIC:
            assert errors[-1] < 0.25 * errors[1], (grid, errors)


# -- convergence (deterministic) ------------------------------------------------------------------


@functools.lru_cache
def karras_errors(name: str) -> list[float]:
    d, noise = diffusion(), x_T()
    options = {} if name == "ddim" else {"sigmas": "karras"}
    return [max_error(sample(name, steps, noise, **options)[0], ode_solution(d, noise)) for steps in (5, 10, 20, 50)]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_converges_to_the_ode_solution(name):
    errors = karras_errors(name)
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    ddim = karras_errors("ddim")
    if name == "euler":  # Euler is DDIM (Karras et al. 2022, section 3); same accuracy per step
        assert errors[1] < 1.2 * ddim[1]
    elif name == "heun":  # 2 NFE per step; its trapezoid is poor for the huge first steps (s_T = 157)
        assert errors[1] < ddim[1] and errors[2] < 0.5 * ddim[2], (errors, ddim)
    else:  # dpmpp_2m, unipc: 1 NFE per step
        assert errors[1] < 0.5 * ddim[1] and errors[2] < 0.5 * ddim[2], (errors, ddim)
        euler = karras_errors("euler")
        assert errors[1] < 0.5 * euler[1] and errors[2] < 0.5 * euler[2], (errors, euler)


@pytest.mark.parametrize("name", ["ddim", *DETERMINISTIC])
def test_empirical_order(name):
    """Time-uniform steps including t = 0 (spacing="linspace"), 100 -> 200 steps, against the
    discrete solution (see discrete_solution)."""
    d, noise = diffusion(), x_T()
    ref = discrete_solution(d, noise)
    e1, e2 = (max_error(sample(name, n, noise, spacing="linspace")[0], ref) for n in (100, 200))
    declared = registry.get("sampler", name).metadata["order"]
    assert abs(math.log2(e1 / e2) - declared) < 0.35, (e1, e2)


def test_heun_uses_euler_where_the_noise_level_falls_steeply():
    """Cosine schedule, trailing steps: the first step from T-1 has s / s' ~ 3000. Heun's trapezoid
    there (max_ratio=inf: Karras et al.'s Algorithm 1, as diffusers) amplifies the slope error; the
    default (Euler on steps with s / s' > 5) stays better than DDIM."""
    d = diffreg.Diffusion.from_config({"schedule": "cosine", "num_timesteps": 1000})
    noise = x_T()
    ref = ode_solution(d, noise)
    runs = {ratio: sample("heun", 10, noise, d=d, max_ratio=ratio) for ratio in (5.0, math.inf)}
    errors = {ratio: max_error(out, ref) for ratio, (out, _) in runs.items()}
    ddim = max_error(sample("ddim", 10, noise, d=d)[0], ref)
    assert {ratio: len(model.calls) for ratio, (_, model) in runs.items()} == {5.0: 18, math.inf: 19}
    assert errors[5.0] < 0.6 * ddim and errors[math.inf] > 10 * errors[5.0], (errors, ddim)


@pytest.mark.parametrize("name", SAMPLERS)
def test_nfe(name):
    steps = 10
    _, model = sample(name, steps, x_T(4), generator=torch.Generator())
    nfe = registry.get("sampler", name).metadata["nfe_per_step"]
    assert len(model.calls) == (2 * steps - 1 if name == "heun" else steps * nfe)
    if name == "heun":  # the first step at s = inf is Euler too
        _, model = sample(name, steps, x_T(4), mean_type="v", ztsnr=True)
        assert len(model.calls) == 2 * steps - 2


# -- stochastic -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "steps", "std_tol"),
    [("dpmpp_2m_sde", 100, 0.015), ("euler_ancestral", 100, 0.04), ("euler_ancestral", 500, 0.012)],
)
def test_stochastic_samplers_reproduce_the_data(name, steps, std_tol):
    """4000 samples. Euler ancestral (= DDPM ancestral sampling) is first order: its std is biased
    low by O(1/steps) (0.27 at 100 steps, 0.29 at 500); DPM-Solver++(2M) SDE is within noise."""
    d = diffusion()
    model = GaussianDenoiser(d)
    gen = torch.Generator().manual_seed(0)
    out = d.sample(model, (4000, 1), sampler=name, steps=steps, generator=gen, clip_denoised=False)
    assert abs(float(out.mean()) - MU) < 0.015
    assert abs(float(out.std()) - S) < std_tol


@pytest.mark.parametrize("name", STOCHASTIC)
def test_reproducible_with_a_seeded_generator(name):
    noise = x_T(8).float()

    def run(seed):
        return sample(name, 10, noise, dtype=torch.float32, generator=torch.Generator().manual_seed(seed))[0]

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    step_noise = torch.randn(10, *noise.shape)
    a = sample(name, 10, noise, dtype=torch.float32, step_noise=step_noise, generator=torch.Generator().manual_seed(1))
    b = sample(name, 10, noise, dtype=torch.float32, step_noise=step_noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0])


def test_eta_zero_sde_is_dpmpp_2m():
    noise = x_T(16)
    a = sample("dpmpp_2m_sde", 10, noise, eta=0.0)[0]
    b = sample("dpmpp_2m", 10, noise)[0]
    assert max_error(a, b) < 1e-12


# -- multistep state is per call ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde", "unipc", "heun"])
def test_interleaved_loops_do_not_interfere(name):
    d = diffusion()
    sampler = registry.create("sampler", name)
    times = d.grid_times(10, "trailing")
    n1, n2 = x_T(8), x_T(8, seed=1)

    def loop(noise, seed):
        return sample_loop_progressive(
            d,
            GaussianDenoiser(d),
            noise.shape,
            times=times,
            sampler=sampler,
            noise=noise,
            dtype=torch.float64,
            clip_denoised=False,
            generator=torch.Generator().manual_seed(seed),
        )

    final = {}
    for a, b in zip(loop(n1, 1), loop(n2, 2), strict=True):  # step by step, alternating
        final = {1: a["sample"], 2: b["sample"]}
    for key, noise in ((1, n1), (2, n2)):
        alone = sample_loop(
            d,
            GaussianDenoiser(d),
            noise.shape,
            times=times,
            sampler=sampler,
            noise=noise,
            dtype=torch.float64,
            clip_denoised=False,
            generator=torch.Generator().manual_seed(key),
        )
        assert torch.equal(final[key], alone)


# -- against diffusers ----------------------------------------------------------------------------


def run_diffusers(scheduler, steps, noise, step_kwargs=lambda k: {}):
    d = diffusion()
    model = GaussianDenoiser(d)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma  # Euler/Heun work in VE form x~ = x / alpha
    for k, t in enumerate(scheduler.timesteps):
        out = model(scheduler.scale_model_input(x, t), torch.full((x.shape[0],), int(t)))
        x = scheduler.step(out, t, x, **step_kwargs(k)).prev_sample
    return x, [int(t) for t in scheduler.timesteps]


DIFFUSERS = {
    # DPMSolverMultistep: final_sigmas_type="zero" makes diffusers' last step first order, as ours.
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # UniPC: diffusers' lower_order_final and its a = 1/2 for one-point systems, as ours.
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_matches_diffusers(name):
    """Same betas, same (trailing) timesteps, same exact denoiser, float64. Measured differences
    are ~1e-7 (diffusers keeps sigmas in float32) and ~1e-5 for Euler/Heun (float32 sigma
    interpolation); the tolerance is loose. diffusers draws the ancestral noise from the generator
    at every step, as we do (the last step's draw is unused by both)."""
    diffusers = pytest.importorskip("diffusers")
    cls, options = DIFFUSERS[name]
    d, steps, noise = diffusion(), 10, x_T(32)
    scheduler = getattr(diffusers, cls)(
        num_train_timesteps=1000, trained_betas=d.betas.tolist(), timestep_spacing="trailing", **options
    )
    step_noise = torch.randn(steps, *noise.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    step_kwargs, ours_options = {
        "euler_ancestral": (lambda k: {"generator": gen}, {}),
        "dpmpp_2m_sde": (lambda k: {"variance_noise": step_noise[k]}, {"step_noise": step_noise}),
    }.get(name, (lambda k: {}, {}))
    ref, timesteps = run_diffusers(scheduler, steps, noise, step_kwargs)
    unique = sorted(set(timesteps), reverse=True)
    assert unique == spaced_timesteps(1000, steps, "trailing")[::-1]
    if name == "heun":  # Algorithm 1 exactly (the default max_ratio=5 changes no step of this grid)
        ours_options["max_ratio"] = math.inf
    ours, _ = sample(name, steps, noise, generator=torch.Generator().manual_seed(5), **ours_options)
    assert max_error(ours, ref) < 1e-3
    assert max_error(ours, ref) < 1e-3 * max_error(ref, ode_solution(d, noise)) + 1e-4


# -- sigma grids ----------------------------------------------------------------------------------


def test_sigmas_option_is_the_core_grid_of_that_name():
    d = diffusion()
    for grid in ("karras", "exponential", "lambda_uniform"):
        sampler = registry.create("sampler", "dpmpp_2m", sigmas=grid)
        assert np.array_equal(d.grid_times(12, None, sampler), d.grid_times(12, grid))


def test_sampling_visits_the_grid_with_exactly_the_steps_asked():
    d = diffusion(num_timesteps=20)  # a short process: 20 karras levels, most between timesteps
    times = d.grid_times(20, "karras")
    assert len(times) == 20 and times[0] == 19
    for name in SAMPLERS:
        stats = {}
        d.sample(GaussianDenoiser(d), (2, 1), sampler=name, steps=20, sigmas="karras", stats=stats,
                 generator=torch.Generator())
        assert stats["steps"] == 20
        assert stats["timesteps"][0] == 19 and np.allclose(stats["timesteps"], times)


@pytest.mark.parametrize("name", SAMPLERS)
def test_unknown_grid_is_a_clear_error(name):
    with pytest.raises(ComponentOptionError, match="karras"):
        registry.create("sampler", name, sigmas="krras")
    with pytest.raises(ComponentOptionError):
        registry.create("sampler", name, sigmas=7)
    with pytest.raises(ValueError, match="unknown sigmas grid 'krras'"):
        registry.get("sampler", name).factory(sigmas="krras")
    with pytest.raises(ComponentOptionError, match="karras"):
        diffusion().sample(GaussianDenoiser(diffusion()), (2, 1), sampler=name, steps=5, sigmas="krras")


def test_bad_options():
    with pytest.raises(ComponentOptionError, match="order"):
        registry.create("sampler", "unipc", order=4)
    with pytest.raises(ComponentOptionError, match="eta"):
        registry.create("sampler", "euler_ancestral", eta=-1.0)
    with pytest.raises(ComponentOptionError, match="max_ratio"):
        registry.create("sampler", "heun", max_ratio=1.0)
    with pytest.raises(ComponentOptionError, match="solver_type"):
        registry.create("sampler", "dpmpp_2m_sde", solver_type="rk4")


@pytest.mark.parametrize("order", [1, 3])
def test_unipc_orders(order):
    """UniPC-1 (with its corrector) and UniPC-3 converge at least like a 1.2-order method here; the
    measured orders (100 -> 200 steps) are about 1.6 and 2.4: the warm-up and final steps are lower order."""
    d, noise = diffusion(), x_T()
    ref = discrete_solution(d, noise)
    e1, e2 = (max_error(sample("unipc", n, noise, spacing="linspace", order=order)[0], ref) for n in (100, 200))
    assert math.log2(e1 / e2) > 1.2, (e1, e2)
    assert registry.create("sampler", "unipc", order=order).order == order


@pytest.mark.parametrize("grid", ["karras", "lambda_uniform"])
def test_solvers_pass_conformance_on_their_own_sigma_grids(grid):
    # check_sampler uses the sampler's own grid, so a sigma grid is checked as it is actually
    # sampled: final samples converge to the exact ODE solution
    import diffreg.testing

    report = diffreg.testing.check_sampler("dpmpp_2m", sigmas=grid)
    assert report.final_errors[-1] < report.final_errors[0]


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_final_order_2_converges_to_the_ode_solution_at_sigma_zero(name):
    """With ``final_order=1`` every solver converges to discrete_solution (the ODE to s_0, then a
    first-order jump to the data): against the exact end point ode_solution its error stops
    falling. ``final_order=2`` extrapolates D to s = 0 through the last two levels (D(s) = a + c s^2
    along the ODE: dD/ds = -s d eps/ds); then the error keeps falling at the declared order."""
    d, noise = diffusion(), x_T()
    exact = ode_solution(d, noise)
    declared = registry.get("sampler", name).metadata["order"]
    first = [max_error(sample(name, n, noise, grid="exponential")[0], exact) for n in (400, 800)]
    assert first[1] > 0.9 * first[0], first  # the floor (5.2e-4): one first-order jump from s_0 = 0.01
    second = [max_error(sample(name, n, noise, grid="exponential", final_order=2)[0], exact) for n in (200, 400)]
    assert second[1] < first[0] / 10, (first, second)  # measured: 14x (dpmpp_2m), 800x (unipc)
    assert math.log2(second[0] / second[1]) > declared - 0.35, second  # measured: 2.0 and 3.7


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize("value", [0, 3, 1.5, True, "2"])
def test_bad_final_order_is_refused_naming_it(name, value):
    with pytest.raises(ComponentOptionError, match=r"final_order.* must be .*, got"):
        registry.create("sampler", name, final_order=value)
