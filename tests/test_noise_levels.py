"""The noise-level core (issue 13): processes as levels, grids, the denoiser at any level, and
samplers that evaluate it between grid points."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffreg
from diffreg import registry
from diffreg.process import DiscreteProcess
from diffreg.pytest_plugin import PluginRegistrar
from diffreg.sampling import Sampler
from diffreg.schedule import spaced_timesteps
from diffreg.testing import GaussianMixture, check_sampler


def make(schedule="linear", T=1000, parameterization="eps", **options):
    return diffreg.Diffusion.from_config(
        {"schedule": {"name": schedule, **options}, "num_timesteps": T, "parameterization": parameterization}
    )


# -- every grid gives exactly the steps asked ------------------------------------------------------


@pytest.mark.parametrize("T", [7, 50, 1000])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spacing_gives_exactly_n_distinct_timesteps_for_every_n(T, spacing):
    for n in range(1, T + 1):
        ts = spaced_timesteps(T, n, spacing)
        assert len(ts) == n and len(set(ts)) == n and 0 <= ts[0] and ts[-1] <= T - 1, (T, n)
    if spacing == "trailing":  # starts at T - 1 (Lin et al. 2024) for every count
        assert all(spaced_timesteps(T, n, "trailing")[-1] == T - 1 for n in range(1, T + 1))


def test_trailing_61_of_1000_is_diffusers_formula_without_the_extra_point():
    # diffusers: np.round(np.arange(T, 0, -T / n)) - 1, which has 62 entries for n = 61
    T, n = 1000, 61
    expected = sorted(int(round(T - k * T / n)) - 1 for k in range(n))
    assert spaced_timesteps(T, n, "trailing") == expected
    assert len(np.arange(T, 0, -T / n)) == 62  # the fault this replaces


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("grid", ["leading", "trailing", "linspace", "karras", "exponential"])
def test_every_grid_gives_exactly_n_strictly_decreasing_levels(schedule, grid):
    for T in (50, 1000):
        d = make(schedule, T)
        for n in list(range(1, T + 1)) if T == 50 else [1, 2, 3, 7, 10, 20, 61, 103, 500, 1000]:
            times = d.grid_times(n, grid)
            assert times.shape == (n,), (T, n)
            assert np.all(np.diff(times) < 0)
            assert times[-1] >= 0
            if grid != "leading" and (n > 1 or grid != "linspace"):
                assert times[0] == T - 1  # from the noisiest level (leading starts below it)


@pytest.mark.parametrize("grid", ["karras", "exponential"])
def test_sigma_grids_no_longer_collapse(grid):
    """The bundled model's cosine process, 10 and 20 Karras steps: 10 and 20 model calls (it was 7
    and 12 when levels snapped to integer timesteps)."""
    d = make("cosine", 1000)
    mixture = GaussianMixture.example(2)
    for n in (10, 20):
        stats = {}
        d.sample(mixture.denoiser(d), (4, 2), sampler="ddim", steps=n, grid=grid, clip_denoised=False, stats=stats)
        assert stats["steps"] == n and stats["nfe"] == n


def test_karras_grid_matches_eq_5_in_ve_sigma():
    d = make("linear", 1000)
    times = d.grid_times(12, {"name": "karras", "rho": 7.0})
    abar = d.process.alpha_sigma(times)[0] ** 2
    got = np.sqrt((1 - abar) / abar)
    s_min, s_max = (math.sqrt((1 - a) / a) for a in (d.alphas_cumprod[0], d.alphas_cumprod[-1]))
    ramp = np.linspace(0, 1, 12)
    want = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_exponential_grid_is_uniform_in_log_snr_and_lambda_uniform_is_the_same():
    d = make("cosine", 1000)
    times = d.grid_times(9, "exponential")
    alpha, sigma = d.process.alpha_sigma(times)
    lam = np.log(alpha / sigma)
    assert np.allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-9)
    assert np.array_equal(times, d.grid_times(9, "lambda_uniform"))


def test_zero_terminal_snr_grids_start_from_pure_noise():
    d = make("linear", 1000, parameterization="v", rescale_zero_terminal_snr=True)
    for grid in ("karras", "exponential", "trailing"):
        times = d.grid_times(10, grid)
        assert times[0] == 999 and d.process.level(times[0]).alpha == 0.0
        assert np.all(np.isfinite(d.process.alpha_sigma(times)[1]))


def test_explicit_grids():
    d = make("linear", 100)
    assert d.grid_times(None, [99, 50.5, 10]).tolist() == [99, 50.5, 10]
    times = d.grid_times(3, {"name": "explicit", "sigmas": [50.0, 1.0, 0.05]})
    abar = d.process.alpha_sigma(times)[0] ** 2
    np.testing.assert_allclose(np.sqrt((1 - abar) / abar), [50.0, 1.0, 0.05], rtol=1e-9)
    with pytest.raises(ValueError, match="strictly decreasing"):
        d.grid_times(None, [10, 50])
    with pytest.raises(ValueError, match="outside"):
        d.grid_times(None, [150, 50])
    with pytest.raises(ValueError, match="steps=2 asked"):
        d.grid_times(2, [99, 50, 10])


def test_unknown_grid_suggests_the_closest():
    with pytest.raises(diffreg.UnknownComponentError, match="karras"):
        make().sample(lambda x, t: x, (1, 1), steps=5, grid="karas")


# -- the discrete process at fractional levels -------------------------------------------------------


def test_integer_levels_are_the_tables_exactly():
    d = make("cosine", 1000)
    t = np.arange(1000, dtype=np.float64)
    alpha, sigma = d.process.alpha_sigma(t)
    assert np.array_equal(alpha, np.sqrt(d.alphas_cumprod))
    assert np.array_equal(sigma, np.sqrt(1 - d.alphas_cumprod))


def test_fractional_levels_interpolate_log_snr_linearly():
    d = make("linear", 1000)
    lam = 0.5 * (np.log(d.alphas_cumprod) - np.log1p(-d.alphas_cumprod))
    t = np.array([10.25, 500.5, 998.75])
    alpha, sigma = d.process.alpha_sigma(t)
    lo = np.floor(t).astype(int)
    w = t - lo
    want = (1 - w) * lam[lo] + w * lam[lo + 1]
    np.testing.assert_allclose(np.log(alpha / sigma), want, rtol=1e-12)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-14)
    # and back: t_from_log_snr inverts it
    np.testing.assert_allclose(d.process.t_from_log_snr(want), t, atol=1e-9)


def test_nearest_interpolation_snaps_to_timesteps():
    d = make("linear", 100)
    p = DiscreteProcess(d.alphas_cumprod, interpolation="nearest")
    alpha, _ = p.alpha_sigma(np.array([10.4, 10.6]))
    assert np.array_equal(alpha, np.sqrt(d.alphas_cumprod[[10, 11]]))
    assert p.model_input(10.6, 2, torch.device("cpu")).tolist() == [11, 11]
    with pytest.raises(ValueError, match="accepted: log_snr, nearest"):
        DiscreteProcess(d.alphas_cumprod, interpolation="linear")


def test_zero_terminal_snr_stays_finite_between_the_last_timesteps():
    d = make("linear", 1000, parameterization="v", rescale_zero_terminal_snr=True)
    alpha, sigma = d.process.alpha_sigma(np.array([998.0, 998.5, 999.0]))
    assert alpha[2] == 0.0 and sigma[2] == 1.0
    assert 0 < alpha[1] < alpha[0] and np.isfinite(sigma).all()
    np.testing.assert_allclose(alpha[1] ** 2, 0.5 * d.alphas_cumprod[998], rtol=1e-12)  # abar linear there


def test_model_input_is_the_original_timestep_interpolated():
    d = make("linear", 1000).respace([0, 100, 300, 999])
    p = d.process
    assert p.model_input(2.0, 3, torch.device("cpu")).tolist() == [300] * 3  # int64, as guided-diffusion
    assert p.model_input(2.0, 1, torch.device("cpu")).dtype == torch.long
    frac = p.model_input(1.5, 1, torch.device("cpu"))
    assert frac.dtype == torch.float32 and frac.item() == pytest.approx(200.0)


def test_exact_denoiser_at_fractional_levels_is_the_closed_form_posterior_mean():
    """x0 ~ N(mu, s^2): E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu)."""
    d = make("cosine", 1000)
    mu, s = 0.3, 0.5
    mixture = GaussianMixture([1.0], [[mu]], [s])
    model = mixture.denoiser(d, "x0")
    t = torch.tensor([10.5, 333.25, 998.9], dtype=torch.float64)
    x = torch.tensor([[0.7], [-1.2], [2.0]], dtype=torch.float64)
    alpha, sigma = d.process.alpha_sigma(t.numpy())
    want = mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (x[:, 0].numpy() - alpha * mu)
    np.testing.assert_allclose(model(x, t)[:, 0].numpy(), want, rtol=1e-12)


# -- the denoiser at any level: samplers written against it -----------------------------------------


class HeunChurn(Sampler):
    """Heun's method with churn (Karras et al. 2022, Algorithm 2): before each step the level is
    raised from sigma_i to sigma_hat = sigma_i (1 + gamma) by fresh noise, so the model is evaluated
    at a level that is on no grid; with s_churn = 0 it is Algorithm 1 (deterministic, order 2).
    Written in the VE form x~ = x / alpha, s = sigma / alpha; last step Euler."""

    order = 2
    nfe_per_step = 2

    def __init__(self, s_churn: float = 0.0):
        self.s_churn = s_churn
        self.stochastic = s_churn > 0

    def steps(self, ctx, x):
        lv = ctx.levels
        n = ctx.num_steps
        gamma = min(self.s_churn / n, math.sqrt(2) - 1)
        for i in range(n):
            here, there = lv[i], lv[i + 1]
            s, s_next = here.ve_sigma, there.ve_sigma
            x_tilde = x / here.alpha
            level = here
            if gamma > 0 and math.isfinite(s):
                level = ctx.level_at(ve_sigma=s * (1 + gamma))
                s_hat = level.ve_sigma
                x_tilde = x_tilde + math.sqrt(s_hat**2 - s**2) * ctx.noise(i, x)
                s = s_hat
            d0 = ctx.denoise(x_tilde * level.alpha, level).pred_xstart
            slope = (x_tilde - d0) / s
            x_tilde_next = x_tilde + (s_next - s) * slope
            if not there.is_clean:
                d1 = ctx.denoise(x_tilde_next * there.alpha, i + 1).pred_xstart
                x_tilde_next = x_tilde + (s_next - s) * 0.5 * (slope + (x_tilde_next - d1) / s_next)
            x = x_tilde_next * there.alpha
            yield x, d0


class DPMSolver2(Sampler):
    """DPM-Solver-2, single step (Lu et al. 2022, "DPM-Solver", Algorithm 1 with r1 = 1/2, data
    prediction form): the model is also evaluated at the midpoint in log-SNR between grid levels."""

    order = 2
    nfe_per_step = 2
    stochastic = False

    def steps(self, ctx, x):
        lv = ctx.levels
        for i in range(ctx.num_steps):
            here, there = lv[i], lv[i + 1]
            d0 = ctx.denoise(x, i).pred_xstart
            if there.is_clean or not math.isfinite(here.log_snr):  # first order at the ends
                x = (there.sigma / here.sigma) * x + (there.alpha - there.sigma / here.sigma * here.alpha) * d0
                yield x, d0
                continue
            mid = ctx.level_at(log_snr=0.5 * (here.log_snr + there.log_snr))
            h = there.log_snr - here.log_snr
            h_mid = mid.log_snr - here.log_snr
            u = (mid.sigma / here.sigma) * x - mid.alpha * math.expm1(-h_mid) * d0
            d_mid = ctx.denoise(u, mid).pred_xstart
            x = (there.sigma / here.sigma) * x - there.alpha * math.expm1(-h) * d_mid
            yield x, d0


@pytest.fixture
def level_plugins():
    class Plugin:
        @diffreg.hookimpl
        def diffreg_register_samplers(self, register):
            register("churn_example", HeunChurn)  # diffreg-solvers registers heun_churn
            register("dpm2_example", DPMSolver2)

    with PluginRegistrar() as register:
        register(Plugin(), name="level-plugins")
        yield


def test_heun_with_churn_evaluates_between_grid_points_and_passes_at_order_2(level_plugins):
    # this test's Heun works in the VE sigma = sigma / alpha, infinite at zero terminal SNR
    report = check_sampler("churn_example", other_processes=False)
    assert report.slope >= 1.7
    calls = []
    d = make("linear", 1000)

    def model(x, t):
        calls.append(t[0].item())
        return torch.zeros_like(x)

    d.sample(model, (2, 2), sampler="churn_example", steps=5, s_churn=2.0, generator=torch.Generator().manual_seed(0))
    grid = set(d.grid_times(5, "trailing").tolist())
    assert any(c not in grid for c in calls)  # churned levels lie between grid points


def test_heun_with_churn_samples_the_distribution(level_plugins):
    check_sampler(
        "churn_example", s_churn=10.0, distribution_steps=50, distribution_samples=4000, swd_threshold=0.06,
        other_processes=False,  # VE sigma: infinite at zero terminal SNR
    )  # fmt: skip


def test_dpm_solver_2_evaluates_midpoints_and_passes_at_order_2(level_plugins):
    report = check_sampler("dpm2_example")
    assert report.slope >= 1.7
    calls = []
    d = make("linear", 1000)
    mixture = GaussianMixture.example(2)
    exact = mixture.denoiser(d)

    def model(x, t):
        calls.append(t[0].item())
        return exact(x, t)

    d.sample(model, (2, 2), sampler="dpm2_example", steps=5, clip_denoised=False)
    assert len(calls) == 9 and sum(isinstance(c, float) and not c.is_integer() for c in calls) >= 3


def test_denoiser_views_are_consistent_at_a_fractional_level():
    d = make("cosine", 1000, parameterization="v")
    mixture = GaussianMixture.example(2)
    seen = {}

    class Probe(Sampler):
        def steps(self, ctx, x):
            level = ctx.level_at(log_snr=0.3)
            pred = ctx.denoise(x, level)
            seen.update(level=level, pred=pred, x=x)
            yield x, pred.pred_xstart

    x = torch.randn(16, 2, dtype=torch.float64)
    from diffreg.sampling import sample_loop

    sample_loop(d, mixture.denoiser(d, "v"), (16, 2), sampler=Probe(), times=[999.0], noise=x,
                dtype=torch.float64, clip_denoised=False)
    level, pred = seen["level"], seen["pred"]
    assert level.log_snr == pytest.approx(0.3, abs=1e-9)
    # x = alpha x0 + sigma eps, and v = alpha eps - sigma x0
    torch.testing.assert_close(level.alpha * pred.pred_xstart + level.sigma * pred.pred_eps, x)
    torch.testing.assert_close(pred.pred_v, level.alpha * pred.pred_eps - level.sigma * pred.pred_xstart)


def test_builtin_samplers_run_with_any_grid_by_name():
    d = make("cosine", 1000)
    mixture = GaussianMixture.example(2)
    for sampler in registry.names("sampler"):
        for grid in ("leading", "trailing", "linspace", "karras", "exponential"):
            stats = {}
            x = d.sample(mixture.denoiser(d), (4, 2), sampler=sampler, steps=6, grid=grid, stats=stats,
                         clip_denoised=False, generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(x).all() and stats["steps"] == 6, (sampler, grid)


def test_ddim_eta_above_one_is_refused():
    with pytest.raises(diffreg.ComponentOptionError, match=r"eta must be in \[0, 1\]"):
        make().sample(lambda x, t: x, (1, 1), steps=2, eta=1.5)


def test_an_explicit_grid_without_steps_has_its_own_length():
    from diffreg.testing import GaussianMixture

    d = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    model = GaussianMixture.example(2).denoiser(d, "eps")
    for grid, levels in (([999.0, 500.0, 20.0], 3), ({"name": "explicit", "times": [999.0, 500.5]}, 2), ("karras", 50)):
        stats: dict = {}
        d.sample(model, (2, 2), grid=grid, stats=stats)
        assert stats["steps"] == levels and stats["nfe"] == levels, (grid, stats)
    with pytest.raises(ValueError, match=r"the explicit grid has 3 levels; steps=50 asked \(give steps=3\)"):
        d.sample(model, (2, 2), grid=[999.0, 500.0, 20.0], steps=50)  # an explicit 50 is still checked
