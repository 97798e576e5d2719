"""The testing kit for plugin authors (diffreg.testing, diffreg.pytest_plugin): the built-ins pass
every conformance check, deliberately wrong plugins fail them, and the exact references (the
Gaussian-mixture denoiser, the probability-flow ODE solution) agree with independent computations."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import diffreg
from diffreg import registry
from diffreg.builtin.samplers import DDIM
from diffreg.parameterization import EpsPrediction, Parameterization
from diffreg.pytest_plugin import PluginRegistrar, builtin_registry
from diffreg.sampling import Sampler
from diffreg.sampling.context import exp
from diffreg.schedule import NoiseSchedule
from diffreg.testing import (
    GaussianMixture,
    check_loss,
    check_parameterization,
    check_sampler,
    check_schedule,
    exact_ode_solution,
    sliced_wasserstein,
)


def make(T=1000, schedule="linear", parameterization="eps", **schedule_options):
    return diffreg.Diffusion.from_config(
        {"schedule": {"name": schedule, **schedule_options}, "num_timesteps": T, "parameterization": parameterization}
    )


# -- plugins that are wrong on purpose -------------------------------------------------------------


class TextbookDDIM(Sampler):
    """Deterministic DDIM written out from Song et al. 2021, eq. 12, on ctx.denoise and the
    grid's levels (x = alpha x0 + sigma eps): the base of the deliberately wrong DDIMs below."""

    order = 1
    nfe_per_step = 1
    x_scale = 1.0

    def prepare(self, ctx):
        lv = ctx.levels
        a, s, a2, s2 = lv.alpha[:-1], lv.sigma[:-1], lv.alpha[1:], lv.sigma[1:]
        # x' = a2 x0 + s2 (x - a x0) / s
        return list(zip((a2 - s2 * a / s).tolist(), (self.x_scale * s2 / s).tolist(), strict=True))

    def step(self, ctx, state, i, x):
        k_xstart, k_x = state[i]
        pred = ctx.denoise(x, i)
        return k_xstart * pred.pred_xstart + k_x * x, pred.pred_xstart


class OffCoefficientDDIM(TextbookDDIM):
    """DDIM with its x_t coefficient 1 % too large: a consistent but wrong update."""

    x_scale = 1.01


class EpsDDIM(TextbookDDIM):
    """DDIM that recovers x0 from pred_eps itself, (x - sigma eps) / alpha: right wherever alpha > 0,
    inf/NaN from a zero-terminal-SNR start (alpha = 0), where only the Prediction's x0 is finite."""

    def step(self, ctx, state, i, x):
        k_xstart, k_x = state[i]
        a, s = float(ctx.levels.alpha[i]), float(ctx.levels.sigma[i])
        x0 = (x - s * ctx.denoise(x, i).pred_eps) / a if a > 0 else x * math.inf
        return k_xstart * x0 + k_x * x, x0


class DDIMClaimingOrder2(DDIM):
    order = 2


class Heun(Sampler):
    """Heun's method on d x_tilde / d sigma = eps (Karras et al. 2022, Algorithm 1, no churn), the
    last step Euler to sigma = 0: a correct second-order sampler, to calibrate the order check."""

    order = 2
    nfe_per_step = 2
    stochastic = False

    def step(self, ctx, state, i, x):
        lv = ctx.levels
        a = lv.alpha[i] ** 2
        pred = ctx.denoise(x, i)
        if ctx.is_last(i):
            return pred.pred_xstart, pred.pred_xstart
        a_next = lv.alpha[i + 1] ** 2
        sigma, sigma_next = math.sqrt((1 - a) / a), math.sqrt((1 - a_next) / a_next)
        x_tilde = x / math.sqrt(a)
        guess = (x_tilde + (sigma_next - sigma) * pred.pred_eps) * math.sqrt(a_next)
        eps_next = ctx.denoise(guess, i + 1).pred_eps
        return (x_tilde + (sigma_next - sigma) * 0.5 * (pred.pred_eps + eps_next)) * math.sqrt(a_next), pred.pred_xstart


class HeunWithWarmup(Heun):
    """Heun declaring two warm-up steps: the kit studies convergence at 40-320 steps."""

    warmup_steps = 2


class DDIMWithNegativeWarmup(TextbookDDIM):
    warmup_steps = -1


class HeunClaimingOneEvaluation(Heun):
    nfe_per_step = 1


class LoudDDPM(Sampler):
    """Ancestral sampling with the noise scaled by 2 (posterior mean of Ho et al. 2020, eq. 7,
    written out on the grid's abar)."""

    order = 1
    nfe_per_step = 1
    stochastic = True

    def prepare(self, ctx):
        abar, abar_prev = ctx.levels.alpha[:-1] ** 2, ctx.levels.alpha[1:] ** 2
        beta = 1 - abar / abar_prev
        coef1 = beta * np.sqrt(abar_prev) / (1 - abar)
        coef2 = (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)
        return list(zip(coef1.tolist(), coef2.tolist(), strict=True))

    def step(self, ctx, state, i, x):
        pred = ctx.denoise(x, i)
        coef_xstart, coef_x = state[i]
        mean = coef_xstart * pred.pred_xstart + coef_x * x
        if ctx.is_last(i):
            return mean, pred.pred_xstart
        return mean + 2.0 * exp(0.5 * pred.log_variance) * ctx.noise(i, x), pred.pred_xstart


class RawOutputDDIM(TextbookDDIM):
    """Reads the raw model output as eps instead of the parameterization's Prediction."""

    def step(self, ctx, state, i, x):
        eps = ctx.model_output(x, i)
        a = ctx.levels.alpha[i] ** 2
        pred_xstart = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        k_xstart, k_x = state[i]
        return k_xstart * pred_xstart + k_x * x, pred_xstart


class NoOrder(Sampler):
    def step(self, ctx, state, i, x):
        pred = ctx.denoise(x, i)
        return pred.pred_xstart, pred.pred_xstart


class TwiceEps(Parameterization):
    """The network predicts 2 eps: unusual but consistent (predict inverts target)."""

    def predict(self, output, x_t, alpha, sigma):
        eps = output / 2
        return EpsPrediction().predict(eps, x_t, alpha, sigma)

    def target(self, x_start, noise, alpha, sigma):
        return 2 * noise


class BrokenEps(TwiceEps):
    """target says 2 eps, predict reads eps: the round trip fails."""

    def predict(self, output, x_t, alpha, sigma):
        return EpsPrediction().predict(output, x_t, alpha, sigma)


class MeanReducedLoss:
    """Returns the batch mean instead of per-example values."""

    def __call__(self, diffusion, model, x_start, x_t, t, noise, model_kwargs):
        out = diffusion.call_model(model, x_t, t, model_kwargs)
        return {"loss": ((out - noise) ** 2).mean()}


class BiasedLoss:
    """MSE against eps + 0.3: its minimum is not the posterior mean."""

    def __call__(self, diffusion, model, x_start, x_t, t, noise, model_kwargs):
        out = diffusion.call_model(model, x_t, t, model_kwargs)
        return {"loss": ((out - noise - 0.3) ** 2).flatten(1).mean(1)}


class MeanOnlyLoss:
    """MSE on the mean channels only: a learned variance would never train."""

    def __call__(self, diffusion, model, x_start, x_t, t, noise, model_kwargs):
        out = diffusion.call_model(model, x_t, t, model_kwargs)
        mean, _ = diffusion.parameterization.split(out, x_t)
        return {"loss": ((mean - noise) ** 2).flatten(1).mean(1)}


class WrongPlugins:
    @diffreg.hookimpl
    def diffreg_register_samplers(self, register):
        register("off-ddim", OffCoefficientDDIM, order=1, nfe_per_step=1, stochastic=False)
        register("ddim-order2", DDIMClaimingOrder2, order=2, nfe_per_step=1, stochastic=False)
        register("heun2", Heun, order=2, nfe_per_step=2, stochastic=False)
        register("heun-nfe1", HeunClaimingOneEvaluation)
        register("loud-ddpm", LoudDDPM, order=1, nfe_per_step=1, stochastic=True)
        register("no-order", NoOrder)
        register("raw-ddim", RawOutputDDIM)
        register("eps-ddim", EpsDDIM)
        register("heun-warmup", HeunWithWarmup)
        register("ddim-negative-warmup", DDIMWithNegativeWarmup)

    @diffreg.hookimpl
    def diffreg_register_parameterizations(self, register):
        register("twice-eps", TwiceEps)
        register("broken-eps", BrokenEps)

    @diffreg.hookimpl
    def diffreg_register_losses(self, register):
        register("mean-reduced", MeanReducedLoss)
        register("biased", BiasedLoss)
        register("mean-only", MeanOnlyLoss)


@pytest.fixture
def wrong_plugins():
    with registry.plugin(WrongPlugins(), "kit-test-plugins"):
        yield


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,options", [("ddim", {}), ("ddpm", {})])
def test_check_sampler_on_cuda(name, options):
    check_sampler(name, device="cuda", **options)


# -- the built-ins pass ----------------------------------------------------------------------------


def test_ddim_passes_check_sampler_at_first_order():
    report = check_sampler("ddim")
    assert report.stochastic is False and report.order == 1 and report.stop_timestep == 99
    assert report.model_calls == 10
    assert 0.9 < report.slope < 1.1
    assert 0.85 < report.final_slope < 1.1
    assert report.final_errors[-1] < 0.02


@pytest.mark.parametrize("name,options", [("ddim", {"eta": 1.0}), ("ddpm", {})])
def test_stochastic_builtins_pass_check_sampler(name, options):
    report = check_sampler(name, **options)
    assert report.stochastic is True
    assert report.swd < 0.03


@pytest.mark.parametrize(
    "name,options",
    [
        ("linear", {}),
        ("cosine", {}),
        ("scaled_linear", {}),
        ("sigmoid", {}),
        ("linear", {"rescale_zero_terminal_snr": True}),
        ("cosine", {"rescale_zero_terminal_snr": True, "s": 0.01}),
        ("explicit", {"betas": [0.1, 0.2, 0.5, 1.0], "num_timesteps": (4,)}),
    ],
)
def test_builtin_schedules_pass_check_schedule(name, options):
    check_schedule(name, **options)


def test_every_builtin_schedule_is_covered():
    # check_schedule is the discrete (betas) contract; the continuous processes are checked in test_flow_edm.py
    continuous = {"rectified_flow", "edm", "vp"}
    assert set(builtin_registry().names("schedule")) == {"linear", "cosine", "scaled_linear", "sigmoid", "explicit"} | continuous


@pytest.mark.parametrize("name", ["eps", "x0", "v"])
def test_builtin_parameterizations_pass(name):
    check_parameterization(name)


@pytest.mark.parametrize(
    "name,options",
    [("mse", {}), ("rescaled_mse", {}), ("kl", {}), ("rescaled_kl", {}), ("mse", {"min_snr_gamma": 5.0})],
)
def test_builtin_losses_pass(name, options):
    check_loss(name, **options)


# -- wrong plugins fail ----------------------------------------------------------------------------


def test_ddim_with_a_coefficient_off_fails_check_sampler(wrong_plugins):
    with pytest.raises(AssertionError, match=r"sampler 'off-ddim': declares order 1, but .* shrinks at order -"):
        check_sampler("off-ddim")


def test_sampler_claiming_a_higher_order_fails(wrong_plugins):
    with pytest.raises(AssertionError, match=r"declares order 2, but .* shrinks at order 1\.00"):
        check_sampler("ddim-order2")


def test_a_true_second_order_sampler_passes_at_order_2(wrong_plugins):
    report = check_sampler("heun2", other_processes=False)  # written for abar > 0 (sigma = sqrt((1 - a) / a))
    assert report.nfe_per_step == 2 and report.model_calls == 19  # the last step is Euler
    assert 1.9 < report.slope < 2.3


def test_sampler_calling_the_model_more_often_than_declared_fails(wrong_plugins):
    with pytest.raises(AssertionError, match="declares nfe_per_step=1 but called the model 19 times in 10 steps"):
        check_sampler("heun-nfe1")


def test_stochastic_sampler_with_doubled_noise_fails_the_distribution_check(wrong_plugins):
    with pytest.raises(AssertionError, match=r"'loud-ddpm': the samples do not reproduce the data distribution"):
        check_sampler("loud-ddpm")


def test_sampler_ignoring_the_parameterization_fails(wrong_plugins):
    with pytest.raises(AssertionError, match="with the x0 parameterization the samples differ from eps's"):
        check_sampler("raw-ddim")


def test_sampler_that_divides_by_alpha_fails_only_at_zero_terminal_snr(wrong_plugins):
    # the default process has alpha > 0 everywhere: the main pass succeeds, the extra pass does not
    check_sampler("eps-ddim", other_processes=False)
    with pytest.raises(AssertionError, match=r"'eps-ddim' on zero terminal SNR \(v\): .*non-finite"):
        check_sampler("eps-ddim")


def test_declared_warmup_chooses_finer_step_counts(wrong_plugins):
    report = check_sampler("heun-warmup", other_processes=False)
    assert report.steps == [40, 80, 160, 320]
    assert check_sampler("heun2", other_processes=False).steps == [10, 20, 40, 80]


def test_negative_warmup_is_refused(wrong_plugins):
    with pytest.raises(AssertionError, match=r"declares `warmup_steps` = -1; accepted: an int >= 0"):
        check_sampler("ddim-negative-warmup")


def test_ddim_passes_on_cosine_short_t_and_zero_terminal_snr():
    report = check_sampler("ddim")
    # final RMS error to the exact ODE solution at 80 steps (calibration: 0.008, 0.015, 0.015)
    assert set(report.other_processes) == {"cosine T=1000", "linear T=100", "zero terminal SNR (v)"}
    assert all(0 < e < 0.03 for e in report.other_processes.values())


def test_sampler_without_declared_order_fails(wrong_plugins):
    with pytest.raises(AssertionError, match="declares no valid `order`"):
        check_sampler("no-order")


def test_consistent_plugin_parameterization_passes_and_broken_one_fails(wrong_plugins):
    check_parameterization("twice-eps")
    with pytest.raises(AssertionError, match=r"'broken-eps' .* round trip failed"):
        check_parameterization("broken-eps")


def test_loss_that_is_not_per_example_fails(wrong_plugins):
    with pytest.raises(AssertionError, match=r"term 'loss' must be a per-example tensor of shape \[16\]"):
        check_loss("mean-reduced", variances=("fixed_small",))


def test_loss_not_minimized_by_the_posterior_mean_fails(wrong_plugins):
    with pytest.raises(AssertionError, match="does not minimize the expected loss"):
        check_loss("biased", mean_types=("eps",), variances=("fixed_small",))
    check_loss("biased", mean_types=("eps",), variances=("fixed_small",), check_minimum=False)


def test_loss_that_ignores_a_learned_variance_fails(wrong_plugins):
    with pytest.raises(AssertionError, match=r"\(eps, learned_range\): the loss does not train the learned variance"):
        check_loss("mean-only", mean_types=("eps",))


class _QuadraticSchedule(NoiseSchedule):
    def compute_betas(self, num_timesteps):
        return np.linspace(1e-2, 0.2**0.5, num_timesteps) ** 2 * (100 / num_timesteps)


def test_a_correct_schedule_factory_passes_check_schedule():
    check_schedule(_QuadraticSchedule, num_timesteps=(25, 100, 1000))


class _RandomSchedule(NoiseSchedule):
    def compute_betas(self, num_timesteps):
        return np.random.default_rng().uniform(1e-4, 0.02, num_timesteps)


def test_nondeterministic_schedule_fails_check_schedule():
    with pytest.raises(AssertionError, match="not deterministic"):
        check_schedule(_RandomSchedule)


def test_factory_returning_a_non_schedule_fails():
    with pytest.raises(AssertionError, match=r"not a diffreg\.NoiseSchedule"):
        check_schedule(lambda T: np.full(T, 0.01))


def test_schedule_that_cannot_build_names_t():
    with pytest.raises(AssertionError, match=r"schedule 'linear' with num_timesteps=10 .* raised"):
        check_schedule("linear", num_timesteps=(10,))


# -- the exact references agree with independent computations ---------------------------------------


def _quadrature_posterior(mixture, x_t, c, s):
    """E[x0 | x_t] and E[eps | x_t] for 1-D data by the trapezoidal rule over x0, from the definition
    p(x0 | x_t) ~ p(x0) N(x_t; c x0, s^2)."""
    grid = np.linspace(-4.0, 4.0, 400_001)
    log_prior = mixture.log_prob(torch.from_numpy(grid)[:, None]).numpy()
    out = []
    for x in x_t:
        log_lik = -0.5 * (x - c * grid) ** 2 / s**2 if s > 0 else np.zeros_like(grid)
        w = np.exp(log_prior + log_lik - np.max(log_prior + log_lik))
        x0 = np.trapezoid(w * grid, grid) / np.trapezoid(w, grid)
        out.append((x0, (x - c * x0) / s if s > 0 else 0.0))
    return np.array(out)


@pytest.mark.parametrize("alpha_bar", [0.0, 0.02, 0.5, 0.97, 0.9999])
def test_denoiser_equals_the_posterior_mean_by_numerical_integration(alpha_bar):
    mixture = GaussianMixture([0.2, 0.5, 0.3], [[-1.0], [0.3], [1.2]], [0.3, 0.2, 0.4])
    x_t = np.array([-1.7, -0.4, 0.0, 0.35, 1.1, 2.5])
    c, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    want = _quadrature_posterior(mixture, x_t, c, s)
    x0, eps = mixture.denoise(torch.tensor(x_t)[:, None], alpha_bar)
    np.testing.assert_allclose(x0[:, 0].numpy(), want[:, 0], rtol=0, atol=1e-8)
    np.testing.assert_allclose(eps[:, 0].numpy(), want[:, 1], rtol=0, atol=1e-6)
    # the same through the variance-exploding form, x_tilde = x_t / c, sigma = s / c
    if alpha_bar > 0:
        x_tilde, sigma = torch.tensor(x_t)[:, None] / c, s / c
        np.testing.assert_allclose(mixture.x0_at_sigma(x_tilde, sigma)[:, 0].numpy(), want[:, 0], atol=1e-8)
        np.testing.assert_allclose(mixture.eps_at_sigma(x_tilde, sigma)[:, 0].numpy(), want[:, 1], atol=1e-6)


def test_denoiser_limits_at_zero_and_infinite_noise():
    mixture = GaussianMixture.example(2)
    x = torch.tensor([[0.3, -2.0], [1.5, 0.1]], dtype=torch.float64)
    x0, eps = mixture.denoise(x, 0.0)
    torch.testing.assert_close(x0, mixture.mean.expand(2, 2))
    torch.testing.assert_close(eps, x)
    torch.testing.assert_close(mixture.x0_at_sigma(x, 0.0), x)
    torch.testing.assert_close(mixture.eps_at_sigma(x, 0.0), torch.zeros_like(x))
    torch.testing.assert_close(mixture.x0_at_sigma(x, math.inf), mixture.mean.expand(2, 2))
    torch.testing.assert_close(mixture.eps_at_sigma(x, math.inf), torch.zeros_like(x))


def test_log_prob_is_normalized_and_sampling_matches_the_moments():
    mixture = GaussianMixture([1.0, 3.0], [[-1.0], [0.5]], [0.3, 0.6])
    grid = torch.linspace(-6, 6, 20001, dtype=torch.float64)
    assert abs(torch.trapezoid(mixture.log_prob(grid[:, None]).exp(), grid).item() - 1) < 1e-9
    x = mixture.sample(200_000, torch.Generator().manual_seed(0))
    assert x.shape == (200_000, 1) and x.dtype == torch.float64
    assert abs(x.mean().item() - 0.125) < 0.01
    var = 0.25 * (0.09 + 1.0) + 0.75 * (0.36 + 0.25) - 0.125**2
    assert abs(x.var().item() - var) < 0.01


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_exact_model_outputs_match_the_posterior_for_every_mean_type_and_shape(mean_type):
    d = make(T=100)
    mixture = GaussianMixture.example(4)
    t = torch.tensor([0, 10, 50, 99])
    x = torch.randn(4, 1, 2, 2)
    out = mixture.denoiser(d, mean_type)(x, t, y=torch.zeros(4))
    assert out.shape == x.shape and out.dtype == torch.float32
    a = torch.tensor(np.array(d.alphas_cumprod))[t]
    x0, eps = mixture.denoise(x.reshape(4, 4), a)
    want = {"eps": eps, "x0": x0, "v": a.sqrt()[:, None] * eps - (1 - a).sqrt()[:, None] * x0}[mean_type]
    torch.testing.assert_close(out.reshape(4, 4), want.float())


def test_exact_model_is_finite_at_zero_terminal_snr():
    d = make(T=100, rescale_zero_terminal_snr=True)
    assert d.alphas_cumprod[-1] == 0
    mixture = GaussianMixture.example(2)
    x = torch.randn(3, 2, dtype=torch.float64)
    t = torch.full((3,), 99)
    torch.testing.assert_close(mixture.denoiser(d, "eps")(x, t), x)
    torch.testing.assert_close(mixture.denoiser(d, "x0")(x, t), mixture.mean.expand(3, 2))
    torch.testing.assert_close(mixture.denoiser(d, "v")(x, t), -mixture.mean.expand(3, 2))


def test_denoiser_of_a_respaced_diffusion_serves_only_its_kept_timesteps():
    base = make(T=100)
    spaced = base.respace([0, 49, 99])
    mixture = GaussianMixture.example(2)
    x = torch.randn(2, 2)
    t = torch.tensor([49, 99])
    torch.testing.assert_close(mixture.denoiser(spaced)(x, t), mixture.denoiser(base)(x, t))
    with pytest.raises(ValueError, match="timestep 50, which its diffusion does not have"):
        mixture.denoiser(spaced)(x, torch.tensor([49, 50]))


def test_denoiser_rejects_data_of_the_wrong_dimension():
    with pytest.raises(ValueError, match="the mixture is 2-dimensional"):
        GaussianMixture.example(2).denoiser(make(T=100))(torch.zeros(2, 1, 2, 2), torch.tensor([1, 2]))


@pytest.mark.parametrize(
    "weights,means,stds,match",
    [
        ([1.0, -1.0], [[0.0], [1.0]], [1.0, 1.0], "weights must be > 0"),
        ([1.0], [[0.0]], [0.0], "stds must be > 0"),
        ([0.5, 0.5], [0.0, 1.0], [1.0, 1.0], r"means must have shape \[K=2, D\]"),
        ([1.0], [[math.nan]], [1.0], "means must be finite"),
    ],
)
def test_gaussian_mixture_rejects_bad_parameters(weights, means, stds, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(weights, means, stds)


def _karras_sigmas(sigma_max, n, sigma_min=1e-3, rho=7.0):
    ramp = np.linspace(0, 1, n)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return np.append(s, 0.0)


def _integrate_ve(mixture, x_tilde, sigmas, heun):
    """Euler or Heun (Karras et al. 2022, Algorithm 1) on d x_tilde / d sigma = eps_hat."""
    x = x_tilde.clone()
    for s, s_next in itertools.pairwise(sigmas):
        d = mixture.eps_at_sigma(x, s)
        x_next = x + (s_next - s) * d
        if heun and s_next > 0:
            x_next = x + (s_next - s) * 0.5 * (d + mixture.eps_at_sigma(x_next, s_next))
        x = x_next
    return x


def test_exact_ode_solution_agrees_with_fine_euler_and_heun_in_the_ve_form():
    d = make()
    mixture = GaussianMixture.example(2)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_ode_solution(mixture, d, x_T, t_start=999)
    a = d.alphas_cumprod[999]
    sigma_max = math.sqrt((1 - a) / a)
    x_tilde = x_T / math.sqrt(a)
    heun = [
        (_integrate_ve(mixture, x_tilde, _karras_sigmas(sigma_max, n), True) - exact).abs().max() for n in (400, 800)
    ]
    assert heun[1] < 5e-5
    assert 3.3 < heun[0] / heun[1] < 4.7  # second order: a quarter of the error for twice the steps
    euler = [
        (_integrate_ve(mixture, x_tilde, _karras_sigmas(sigma_max, n), False) - exact).abs().max() for n in (1000, 2000)
    ]
    assert euler[1] < 2e-3
    assert 1.7 < euler[0] / euler[1] < 2.3  # first order: half the error for twice the steps


def test_ddim_converges_to_the_exact_ode_solution_at_first_order():
    d = make()
    mixture = GaussianMixture.example(2)
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = exact_ode_solution(mixture, d, x_T, t_start=999)
    model = mixture.denoiser(d, "eps")
    errors = [
        (d.sample(model, x_T.shape, steps=n, noise=x_T, clip_denoised=False, dtype=torch.float64) - exact).abs().max()
        for n in (250, 1000)
    ]
    assert errors[1] < 1e-2
    assert 3.2 < errors[0] / errors[1] < 4.8


def test_exact_ode_solution_from_zero_terminal_snr():
    d = make(parameterization="v", rescale_zero_terminal_snr=True)
    mixture = GaussianMixture.example(2)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = exact_ode_solution(mixture, d, x_T)  # from t = 999, where abar = 0 (sigma = inf)
    assert torch.isfinite(exact).all()
    model = mixture.denoiser(d, "v")
    errors = [
        (d.sample(model, x_T.shape, steps=n, noise=x_T, clip_denoised=False, dtype=torch.float64) - exact).abs().max()
        for n in (100, 400)
    ]
    assert errors[1] < 1e-2
    assert errors[0] / errors[1] > 3


def test_exact_ode_solution_composes_through_an_intermediate_timestep():
    d = make()
    mixture = GaussianMixture.example(2)
    x_T = torch.randn(8, 2, dtype=torch.float64)
    mid = exact_ode_solution(mixture, d, x_T, t_start=999, t_end=300)
    torch.testing.assert_close(
        exact_ode_solution(mixture, d, mid, t_start=300), exact_ode_solution(mixture, d, x_T), rtol=0, atol=1e-7
    )
    with pytest.raises(ValueError, match="t_end must be below t_start"):
        exact_ode_solution(mixture, d, x_T, t_start=300, t_end=300)


# -- sliced Wasserstein ------------------------------------------------------------------------------


def test_sliced_wasserstein_of_a_shift_and_of_unequal_sizes():
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sliced_wasserstein(x, x) == 0.0
    assert sliced_wasserstein(x, x.repeat(3, 1)) < 1e-12
    # a shift by m moves every projection by theta . m: SW_2 = sqrt(E (theta . m)^2) = |m| / sqrt(D)
    shift = torch.tensor([0.3, 0.4], dtype=torch.float64)
    assert abs(sliced_wasserstein(x, x + shift, projections=4096) - 0.5 / math.sqrt(2)) < 0.01
    # 1-D, by hand: F_a^-1 = 0, 1, 2 on thirds and F_b^-1 = 0, 3 on halves -> W_2^2 = 1/6 + 4/6 + 1/3
    a = torch.tensor([[2.0], [0.0], [1.0]])
    b = torch.tensor([[3.0], [0.0]])
    assert sliced_wasserstein(a, b) == pytest.approx(math.sqrt(7 / 6), rel=1e-12)


def test_sliced_wasserstein_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="differ in dimension"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 3))


# -- the pytest plugin --------------------------------------------------------------------------------


def test_builtin_registry_holds_only_the_builtins():
    reg = builtin_registry()
    assert reg is not registry.default_registry()
    assert all(c.builtin for c in reg.components())
    assert reg.names("sampler") == ["ddim", "ddpm"]


def test_plugin_registrar_registers_for_a_while_then_removes():
    with PluginRegistrar() as register:
        info = register(WrongPlugins(), "kit-registrar")
        assert info.name == "kit-registrar"
        assert registry.get("sampler", "loud-ddpm").plugin == "kit-registrar"
    assert "loud-ddpm" not in registry.names("sampler")


def test_pytest_plugin_fixtures_work_when_enabled(tmp_path):
    (tmp_path / "test_uses_fixtures.py").write_text(
        textwrap.dedent(
            """
            import diffreg
            from diffreg import registry
            from diffreg.builtin.samplers import DDIM


            class Plugin:
                @diffreg.hookimpl
                def diffreg_register_samplers(self, register):
                    register("fixture-ddim", DDIM)


            def test_registry(diffreg_registry):
                assert diffreg_registry.names("sampler") == ["ddim", "ddpm"]


            def test_register(register_plugin):
                register_plugin(Plugin(), "fixture-plugin")
                assert registry.get("sampler", "fixture-ddim").plugin == "fixture-plugin"


            def test_removed_afterwards():
                assert "fixture-ddim" not in registry.names("sampler")


            def test_mixture(gaussian_mixture):
                assert gaussian_mixture.sample(5).shape == (5, 2)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "diffreg.pytest_plugin", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout
