"""Flow matching and EDM (issue 16): continuous processes, the flow and edm parameterizations,
their losses and level densities, every sampler on them, checked against independent values
(closed forms, diffusers' FlowMatchEulerDiscreteScheduler, NVIDIA EDM's Algorithm 1 written out,
the exact Gaussian-mixture ODE solution)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffreg import Diffusion, registry
from diffreg.errors import SamplingError
from diffreg.testing import GaussianMixture, check_loss, check_sampler, exact_ode_solution, sliced_wasserstein

FLOW = {"schedule": "rectified_flow", "parameterization": "flow"}
EDM = {"schedule": "edm", "parameterization": "edm"}


# -- processes ---------------------------------------------------------------------------------


def test_rectified_flow_levels_are_the_interpolation_with_sd3_shift():
    t = np.array([0.0, 0.1, 0.5, 0.9, 1.0])
    plain = registry.create("schedule", "rectified_flow", 1000)
    alpha, sigma = plain.alpha_sigma(t)
    np.testing.assert_allclose(alpha, 1 - t, rtol=0, atol=1e-15)
    np.testing.assert_allclose(sigma, t, rtol=0, atol=1e-15)
    shifted = registry.create("schedule", "rectified_flow", 1000, shift=3.0)
    want = 3 * t / (1 + 2 * t)  # SD3, eq. 23 with sqrt(m/n) = 3
    np.testing.assert_allclose(shifted.alpha_sigma(t)[1], want, rtol=1e-14)
    # resolution-dependent: shift 1.5 at 512 px over a 256 px base is shift 3
    by_resolution = registry.create("schedule", "rectified_flow", 1000, shift=1.5, resolution=512)
    np.testing.assert_allclose(by_resolution.alpha_sigma(t)[1], want, rtol=1e-14)
    lam = np.log(1 - want[1:-1]) - np.log(want[1:-1])
    np.testing.assert_allclose(shifted.t_from_log_snr(lam), t[1:-1], rtol=1e-12)
    # the network gets the shifted time times t_scale (SD3: 1000)
    sd3 = registry.create("schedule", "rectified_flow", 1000, shift=3.0, t_scale=1000.0)
    assert float(sd3.model_input(0.5, 1, torch.device("cpu"))[0]) == pytest.approx(1000 * 1.5 / 2, rel=1e-6)
    assert sd3.clean.t == 0.0 and sd3.clean.sigma == 0.0 and sd3.clean.alpha == 1.0


def test_edm_and_vp_levels_match_their_papers():
    edm = registry.create("schedule", "edm", 1000)
    t = np.array([0.002, 0.5, 80.0])
    alpha, sigma = edm.alpha_sigma(t)
    assert np.all(alpha == 1) and np.all(sigma == t) and edm.prior_std == 80.0
    assert float(edm.model_input(0.5, 1, torch.device("cpu"))[0]) == pytest.approx(math.log(0.5) / 4, rel=1e-6)
    vp = registry.create("schedule", "vp", 1000)
    t = np.array([1e-3, 0.3, 1.0])
    log_alpha = -0.25 * t**2 * (20 - 0.1) - 0.5 * t * 0.1  # Song et al. 2021, eq. 33
    alpha, sigma = vp.alpha_sigma(t)
    np.testing.assert_allclose(alpha, np.exp(log_alpha), rtol=1e-14)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-14)
    np.testing.assert_allclose(vp.t_from_log_snr(np.log(alpha / sigma)), t, rtol=1e-10)
    cosine = registry.create("schedule", "vp", 1000, kind="cosine")
    f = np.cos((t[:2] + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2  # Nichol & Dhariwal eq. 17
    alpha, sigma = cosine.alpha_sigma(t[:2])
    np.testing.assert_allclose(alpha**2, f, rtol=1e-12)
    np.testing.assert_allclose(cosine.t_from_log_snr(np.log(alpha / sigma)), t[:2], rtol=1e-8)


def test_continuous_diffusion_noises_with_float_times_and_refuses_the_table_api():
    d = Diffusion.from_config(FLOW)
    x0, eps = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(d.q_sample(x0, t, eps), (1 - t[:, None]) * x0 + t[:, None] * eps, rtol=1e-15)
    with pytest.raises(TypeError, match="float times"):
        d.q_sample(x0, torch.tensor([0, 1, 2]), eps)
    with pytest.raises(ValueError, match="outside"):
        d.q_sample(x0, torch.tensor([0.0, 0.5, 1.5], dtype=torch.float64), eps)
    for call in (
        lambda: d.q_posterior_mean_variance(x0, x0, t),
        lambda: d.respace("ddim10"),
        lambda: d.calc_bpd_loop(None, x0),
        lambda: d.p_sample(None, x0, t),
        lambda: d.alphas_cumprod,
    ):
        with pytest.raises(ValueError, match="rectified_flow.*continuous process"):
            call()
    with pytest.raises(ValueError, match="steps="):
        d.sample(lambda x, tt: x, (2, 2), steps=None)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"schedule": "edm", "parameterization": "v"}, "variance-preserving"),
        ({"schedule": "rectified_flow", "parameterization": "eps"}, "alpha = 0"),
        ({"schedule": "rectified_flow", "parameterization": "flow", "variance": "learned_range"}, "learned"),
        ({"schedule": "edm", "parameterization": "edm", "loss": "kl"}, "variational bound"),
        ({"schedule": "linear", "timestep_sampler": "log_normal"}, "continuous process"),
        ({"schedule": "edm", "timestep_sampler": "loss_second_moment"}, "integer timesteps"),
    ],
)
def test_combinations_that_cannot_work_are_refused_at_build_time_with_the_reason(config, match):
    with pytest.raises(ValueError, match=match):
        Diffusion.from_config(config)


def test_ddpm_refuses_a_non_variance_preserving_process_and_runs_on_continuous_vp():
    mix = GaussianMixture.example(2)
    d = Diffusion.from_config(FLOW)
    with pytest.raises(SamplingError, match="variance-preserving.*ddim with eta=1"):
        d.sample(mix.denoiser(d, "flow"), (4, 2), sampler="ddpm", steps=5)
    vp = Diffusion.from_config({"schedule": "vp", "parameterization": "eps"})
    out = vp.sample(mix.denoiser(vp, "eps"), (4, 2), sampler="ddpm", steps=5, clip_denoised=False)
    assert torch.isfinite(out).all()


# -- parameterizations -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flow", "edm"])
@pytest.mark.parametrize("process", [FLOW["schedule"], "edm", "vp", "cosine"])
def test_flow_and_edm_predictions_invert_their_targets_on_every_process(name, process):
    d = Diffusion.from_config({"schedule": process, "parameterization": name})
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    p = d.process
    t = np.linspace(p.t_min, p.t_max, 6)
    alpha, sigma = (torch.from_numpy(v)[:, None] for v in p.alpha_sigma(t))
    x = alpha * x0 + sigma * eps
    mt = d.parameterization.mean_type
    pred_x0, pred_eps = mt.predict(mt.target(x0, eps, alpha, sigma), x, alpha, sigma)
    torch.testing.assert_close(pred_x0, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(pred_eps, eps, rtol=0, atol=1e-9 * float(sigma.max() / sigma.min()))


@pytest.mark.parametrize(("name", "options"), [("flow", {}), ("edm", {}), ("edm", {"sigma_data": 1.0})])
def test_flow_and_edm_pass_the_parameterization_kit_on_a_discrete_process(name, options):
    from diffreg.testing import check_parameterization

    check_parameterization(name, **options)  # round trips, and the exact model's posterior mean


def test_flow_target_is_the_velocity_and_edm_matches_table_1():
    flow = registry.create("parameterization", "flow")
    x0, eps = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    s = 0.3
    x = (1 - s) * x0 + s * eps
    torch.testing.assert_close(flow.target(x0, eps, 1 - s, s), eps - x0)
    u = eps - x0  # d x_t / dt of x_t = (1 - t) x0 + t eps
    torch.testing.assert_close(flow.predict(u, x, 1 - s, s)[0], x0)
    edm = registry.create("parameterization", "edm", sigma_data=0.5)
    for sig in (0.002, 0.5, 3.0, 80.0):
        sd = 0.5  # Karras et al. 2022, Table 1, VE (alpha = 1)
        c_skip, c_out, c_in = sd**2 / (sig**2 + sd**2), sig * sd / math.sqrt(sig**2 + sd**2), 1 / math.sqrt(sig**2 + sd**2)
        x = x0 + sig * eps
        f = torch.randn(4, 2, dtype=torch.float64)
        torch.testing.assert_close(edm.scale_input(x, 1.0, sig), c_in * x)
        torch.testing.assert_close(edm.predict(f, x, 1.0, sig)[0], c_skip * x + c_out * f)
        torch.testing.assert_close(edm.target(x0, eps, 1.0, sig), (x0 - c_skip * x) / c_out)


def test_edm_preconditioning_scales_the_network_input_in_sampling_and_training():
    seen = []

    def model(x, t):
        seen.append(float(x.abs().max()))
        return torch.zeros_like(x)

    d = Diffusion.from_config(EDM)
    x = torch.full((2, 2), 80.0)
    d.sample(model, (2, 2), sampler="euler", steps=1, noise=x, clip_denoised=False)
    assert seen[0] == pytest.approx(80.0 / math.sqrt(80.0**2 + 0.25), rel=1e-6)
    d.training_losses(model, torch.zeros(2, 2), torch.tensor([3.0, 3.0]), noise=torch.ones(2, 2))
    assert seen[1] == pytest.approx(3.0 / math.sqrt(9.0 + 0.25), rel=1e-6)


# -- losses and densities ----------------------------------------------------------------------


def test_flow_matching_and_edm_losses_pass_the_conformance_kit():
    check_loss("flow_matching", mean_types=("flow", "eps", "x0"), variances=("fixed_small",))
    check_loss("edm", mean_types=("edm", "eps", "x0"), variances=("fixed_small",))


def test_edm_loss_is_the_mse_of_the_preconditioned_output_and_flow_matching_the_mse_of_velocity():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    net = torch.nn.Linear(3, 3)

    def model(x, t):
        return net(x) + t[:, None].float()

    for base, loss in ((EDM, "edm"), (FLOW, "flow_matching")):
        t = torch.linspace(0.01, 0.99, 8, dtype=torch.float64) * (80.0 if base is EDM else 1.0)
        a = Diffusion.from_config({**base, "loss": loss}).training_losses(model, x0, t, noise=noise)["loss"]
        b = Diffusion.from_config({**base, "loss": "mse"}).training_losses(model, x0, t, noise=noise)["loss"]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # lambda(sigma) c_out^2 = 1; target = eps - x0


def test_level_densities_draw_their_distributions():
    from scipy import stats

    g = torch.Generator().manual_seed(0)
    flow = Diffusion.from_config({**FLOW, "timestep_sampler": {"name": "logit_normal", "mean": 0.5, "std": 0.8}})
    t, w = flow.create_timestep_sampler().sample(4000, generator=g)
    assert t.dtype == torch.float64 and torch.all(w == 1)
    logit = np.log(t.numpy()) - np.log1p(-t.numpy())
    assert stats.kstest(logit, "norm", args=(0.5, 0.8)).pvalue > 0.01
    edm = Diffusion.from_config({**EDM, "timestep_sampler": "log_normal"})
    sigma = edm.create_timestep_sampler().sample(4000, generator=g)[0].numpy()
    inside = sigma[(sigma > 0.002) & (sigma < 80)]
    assert len(inside) > 3990 and abs(np.log(inside).mean() + 1.2) < 0.06 and abs(np.log(inside).std() - 1.2) < 0.06
    uniform = Diffusion.from_config(FLOW).create_timestep_sampler().sample(4000, generator=g)[0].numpy()
    assert stats.kstest(uniform, "uniform", args=(1e-3, 1 - 1e-3)).pvalue > 0.01
    # on a discrete process logit_normal's timestep masses are those of floor(u T)
    discrete = registry.create("timestep_sampler", "logit_normal", 10)
    with np.errstate(divide="ignore"):
        edges = stats.norm.cdf(np.log(np.arange(11) / 10) - np.log1p(-np.arange(11) / 10))
    np.testing.assert_allclose(discrete.weights(), np.diff(edges), rtol=1e-9)


# -- grids and samplers ------------------------------------------------------------------------


def test_continuous_grids():
    d = Diffusion.from_config(FLOW)
    np.testing.assert_allclose(d.grid_times(4, "trailing"), [1.0, 0.75, 0.5, 0.25], rtol=1e-15)
    np.testing.assert_allclose(d.grid_times(3, "linspace"), [1.0, 0.5005, 1e-3], rtol=1e-15)
    np.testing.assert_allclose(d.grid_times(1000, "trailing")[-1], 1e-3, rtol=1e-12)
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        d.grid_times(1001, "trailing")
    e = Diffusion.from_config(EDM)
    rho, n = 7.0, 6
    ramp = np.arange(n) / (n - 1)
    karras = (80 ** (1 / rho) + ramp * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho  # Karras et al. eq. 5
    np.testing.assert_allclose(e.grid_times(n, "karras"), karras, rtol=1e-12)
    np.testing.assert_allclose(e.grid_times(n, "exponential"), np.geomspace(80, 0.002, n), rtol=1e-12)


SAMPLERS = ["ddim", "euler", "heun", "dpmpp_2m", "unipc", "euler_ancestral", "dpmpp_2m_sde"]


@pytest.mark.parametrize(("config", "grid"), [(FLOW, "trailing"), (EDM, "karras"), ({"schedule": "vp"}, "exponential")])
def test_every_registered_sampler_runs_the_step_count_asked(config, grid):
    d = Diffusion.from_config(config)
    mix = GaussianMixture.example(2)
    model = mix.denoiser(d, d.parameterization.mean_type)
    names = registry.names("sampler")
    assert set(SAMPLERS) <= set(names)
    for sampler, steps in ((name, steps) for name in names for steps in (1, 2, 7)):
        stats: dict = {}
        if sampler == "ddpm" and d.process.name != "vp":
            continue  # ddpm is refused off variance-preserving processes (tested above)
        out = d.sample(model, (5, 2), sampler=sampler, steps=steps, grid=grid, stats=stats, clip_denoised=False)
        assert stats["steps"] == steps and torch.isfinite(out).all(), sampler


DETERMINISTIC = [("ddim", 1), ("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("unipc", 2), ("deis", 3), ("dpm_solver_2s", 2)]


@pytest.mark.parametrize(("sampler", "order"), DETERMINISTIC)
@pytest.mark.parametrize(
    ("process", "parameterization", "grid", "options"),
    [
        ("rectified_flow", "flow", None, {}),
        ({"name": "rectified_flow", "shift": 3.0}, "flow", None, {}),
        ({"name": "edm"}, "edm", "karras", {}),
    ],
)
def test_deterministic_samplers_converge_to_the_exact_ode_at_their_order(sampler, order, process, parameterization, grid, options):
    report = check_sampler(
        sampler, process=process, parameterization=parameterization, grid=grid, **options
    )
    assert report.order == order  # the declared order, reached (check_sampler asserts slope >= order - 0.3)
    assert report.slope is not None and report.slope >= order - 0.3
    assert report.final_errors[-1] < 0.02


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde"])
@pytest.mark.parametrize(("process", "parameterization", "grid"), [("rectified_flow", "flow", None), ({"name": "edm"}, "edm", "karras")])
def test_stochastic_samplers_sample_the_mixture(sampler, process, parameterization, grid):
    check_sampler(sampler, process=process, parameterization=parameterization, grid=grid, distribution_samples=4000, swd_threshold=0.06)


def test_ddim_with_eta_1_samples_the_mixture_on_a_flow():
    check_sampler("ddim", process="rectified_flow", parameterization="flow", eta=1.0, distribution_samples=4000, swd_threshold=0.06)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_equals_diffusers_flow_match_euler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    mix = GaussianMixture.example(2)
    steps = 12
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double().numpy()  # shifted, then the terminal 0
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    def velocity(x, sigma):  # the exact flow model: E[eps - x0 | x], x = (1 - sigma) x0 + sigma eps
        c = torch.full((x.shape[0], 1), 1 - sigma, dtype=torch.float64)
        s = torch.full((x.shape[0], 1), sigma, dtype=torch.float64)
        x0, eps = mix._posterior(x.double(), c, s)
        return (eps - x0).float()

    x = x_T.clone()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity(x, float(sigmas[i])), t, x).prev_sample
    d = Diffusion.from_config({"schedule": {"name": "rectified_flow", "shift": shift}, "parameterization": "flow"})
    times = d.process._unshift(sigmas[:-1])  # the same levels as flow times
    np.testing.assert_allclose(d.process.alpha_sigma(times)[1], sigmas[:-1], rtol=1e-12)
    if shift == 1.0:  # diffusers' grid is diffreg's linspace grid (t_min = 1/1000)
        np.testing.assert_allclose(d.grid_times(steps, "linspace"), sigmas[:-1], rtol=1e-6)
    ours = d.sample(mix.denoiser(d, "flow"), (64, 2), sampler="euler", grid=list(times), steps=steps, noise=x_T, clip_denoised=False)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)


def test_edm_heun_equals_edm_algorithm_1():
    mix = GaussianMixture.example(2)
    n, rho, s_min, s_max = 18, 7.0, 0.002, 80.0
    i = np.arange(n)
    t = np.append((s_max ** (1 / rho) + i / (n - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho, 0.0)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * t[0]

    def denoise(x, sigma):
        return mix.x0_at_sigma(x, sigma)

    x = x_T.clone()  # Karras et al. 2022, Algorithm 1 (deterministic Heun)
    for k in range(n):
        d = (x - denoise(x, t[k])) / t[k]
        x_next = x + (t[k + 1] - t[k]) * d
        if t[k + 1] != 0:
            d_prime = (x_next - denoise(x_next, t[k + 1])) / t[k + 1]
            x_next = x + (t[k + 1] - t[k]) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    diffusion = Diffusion.from_config(EDM)
    ours = diffusion.sample(
        mix.denoiser(diffusion, "edm"), (64, 2), sampler="heun", max_ratio=math.inf, steps=n, grid="karras",
        noise=x_T, dtype=torch.float64, clip_denoised=False,
    )
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)
    exact = exact_ode_solution(mix, diffusion, x_T, t_start=80.0)
    assert float((ours - exact).pow(2).mean().sqrt()) < 0.05  # and Algorithm 1 solves the ODE (0.021 measured)


def test_exact_ode_solution_is_the_same_on_flow_vp_and_edm_forms():
    # the probability-flow ODE depends on alpha and sigma only through sigma / alpha
    mix = GaussianMixture.example(2)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    flow = Diffusion.from_config(FLOW)
    edm = Diffusion.from_config({"schedule": {"name": "edm", "sigma_max": 4.0}, "parameterization": "edm"})
    x_ve = 4.0 * z  # a state at VE level 4, which is flow time 0.8 (sigma / alpha = 0.8 / 0.2)
    a = exact_ode_solution(mix, flow, 0.2 * x_ve, t_start=0.8)  # the same state in flow scale
    b = exact_ode_solution(mix, edm, x_ve, t_start=4.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


# -- training ------------------------------------------------------------------------------------


def test_a_flow_model_trained_on_a_2d_toy_samples_it(tmp_path):
    import diffreg
    from diffreg.data import toy_2d
    from diffreg.training import TrainConfig, train

    torch.manual_seed(0)
    cfg = TrainConfig.from_dict(
        {
            "steps": 600,
            "batch_size": 256,
            "lr": 3e-3,
            "ema_decay": 0.99,
            "class_conditional": False,
            "data": {"name": "moons", "n": 4096},
            "diffusion": {"schedule": "rectified_flow", "parameterization": "flow", "loss": "flow_matching",
                          "timestep_sampler": "logit_normal"},
            "model": {"name": "mlp", "hidden": 128, "depth": 3},
        }
    )
    model, diffusion, _ = diffreg.load_checkpoint(train(cfg, tmp_path / "m.safetensors", progress=False))
    data, _ = toy_2d("moons", 2000, seed=1)
    samples = diffusion.sample(model, (2000, 2), sampler="heun", steps=20, generator=torch.Generator().manual_seed(2), clip_denoised=False)
    swd = sliced_wasserstein(samples, data)
    noise_swd = sliced_wasserstein(torch.randn(2000, 2, generator=torch.Generator().manual_seed(3)), data)
    assert swd < 0.1 and swd < noise_swd / 5


@pytest.mark.parametrize(
    "diffusion_toml",
    [
        'schedule = "rectified_flow"\nparameterization = "flow"\nloss = "flow_matching"\ntimestep_sampler = {name = "logit_normal"}\n',
        'schedule = "edm"\nparameterization = "edm"\nloss = "edm"\ntimestep_sampler = {name = "log_normal"}\n',
    ],
)
def test_train_from_toml_then_sample_with_every_sampler_from_the_cli(tmp_path, monkeypatch, diffusion_toml):
    from click.testing import CliRunner

    from diffreg.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.toml").write_text(
        "steps = 3\nbatch_size = 8\n[diffusion]\n" + diffusion_toml
        + '[model]\nname = "unet"\nmodel_channels = 8\nchannel_mult = [1]\nattention_resolutions = []\nnum_heads = 1\n'
    )
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--config", "t.toml", "--output", "m.safetensors", "--no-progress"])
    assert result.exit_code == 0, result.output
    for sampler in SAMPLERS:
        result = runner.invoke(
            main, ["sample", "m.safetensors", "--sampler", sampler, "--num-samples", "2", "--steps", "3", "--no-progress"]
        )
        assert result.exit_code == 0, (sampler, result.output)
    result = runner.invoke(main, ["sample", "m.safetensors", "--sampler", "ddpm", "--num-samples", "2", "--no-progress"])
    assert result.exit_code != 0 and "ddim with eta=1" in result.output
