"""diffreg's diffusion math checked against independent references.

References used here (test-only):

- diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` (float32 implementations, so tolerances are
  ~1e-6 relative where they are involved);
- closed forms written out in this file (float64 numpy), with the paper equation named;
- small hand-checked numbers, derived in comments.

Nothing here is copied from diffreg's outputs: every expected value is computed independently.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

import diffreg
from diffreg import registry
from diffreg.gaussian import discretized_gaussian_log_likelihood, normal_kl
from diffreg.schedule import space_timesteps

T = 1000


def make_diffusion(
    schedule="linear", num_timesteps=T, parameterization="eps", variance="fixed_small", **schedule_options
):
    spec = {"name": schedule, **schedule_options} if schedule_options else schedule
    return diffreg.Diffusion.from_config(
        {
            "schedule": spec,
            "num_timesteps": num_timesteps,
            "parameterization": parameterization,
            "variance": variance,
        }
    )


def ho_linear_betas(num_timesteps=T, beta_start=1e-4, beta_end=0.02):
    """Ho et al. 2020, sec. 4: betas linear from 1e-4 to 0.02 (T = 1000), float64."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def ref_tables(betas):
    """Closed-form coefficient tables in float64, derived independently of diffreg.

    The posterior q(x_{t-1} | x_t, x_0) is written via Bayes' rule as a product of two Gaussians
    in x_{t-1}:  N(x_{t-1}; sqrt(abar_{t-1}) x0, 1 - abar_{t-1})  (eq. 4 at t-1)  and
    N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)  (eq. 2).  Precisions add:

        1 / var = 1 / (1 - abar_{t-1}) + alpha_t / beta_t
        mean    = var * (sqrt(abar_{t-1}) / (1 - abar_{t-1}) * x0 + sqrt(alpha_t) / beta_t * x_t)

    which is Ho et al. 2020 eqs. 6-7 in another algebraic form.  At t = 0 (abar_{-1} = 1) the
    posterior is a point mass at x0: var = 0, coef1 = 1, coef2 = 0.
    """
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    var = np.zeros_like(betas)
    coef1 = np.zeros_like(betas)
    coef2 = np.zeros_like(betas)
    coef1[0], coef2[0], var[0] = 1.0, 0.0, 0.0
    prec = 1.0 / (1.0 - abar_prev[1:]) + alphas[1:] / betas[1:]
    var[1:] = 1.0 / prec
    coef1[1:] = var[1:] * np.sqrt(abar_prev[1:]) / (1.0 - abar_prev[1:])
    coef2[1:] = var[1:] * np.sqrt(alphas[1:]) / betas[1:]
    return {"betas": betas, "abar": abar, "abar_prev": abar_prev, "var": var, "coef1": coef1, "coef2": coef2}


def bcast(values, ndim):
    """float64 numpy [N] -> torch [N, 1, ..., 1]."""
    return torch.tensor(np.asarray(values, dtype=np.float64)).reshape((-1,) + (1,) * (ndim - 1))


class Recorder:
    """A deterministic toy model that records the (original) timesteps it receives."""

    def __init__(self, fn):
        self.fn = fn
        self.seen: list[list[int]] = []

    def __call__(self, x, t, **kwargs):
        self.seen.append([int(v) for v in t.reshape(-1)])
        return self.fn(x, t)


def toy(x, t):
    t = torch.as_tensor(t)
    return 0.1 * x + 0.001 * t.float().reshape(-1, *([1] * (x.ndim - 1)))


def ddpm_ref(**kwargs):
    opts = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    opts.update(kwargs)
    return DDPMScheduler(**opts)


def ddim_ref(**kwargs):
    opts = dict(
        num_train_timesteps=T,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
    )
    opts.update(kwargs)
    return DDIMScheduler(**opts)


def close(actual, expected, rtol, atol):
    a = actual.detach().double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = expected.detach().double().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


# -- 1. schedules vs diffusers ----------------------------------------------------------------------


def test_linear_betas_equal_diffusers_linear():
    betas = registry.create("schedule", "linear", T).betas
    ref = ddpm_ref(beta_schedule="linear").betas
    close(betas, ref, rtol=1e-6, atol=1e-9)


def test_linear_betas_scale_with_num_timesteps_like_guided_diffusion():
    # guided-diffusion scales the linear endpoints by 1000 / T: for T = 100 the betas run
    # linearly from 1e-3 to 0.2 (hand-checked: 1e-4 * 10 and 0.02 * 10).
    betas = registry.create("schedule", "linear", 100).betas
    assert betas[0] == pytest.approx(1e-3, rel=1e-12)
    assert betas[-1] == pytest.approx(0.2, rel=1e-12)
    close(np.diff(betas), np.full(99, (0.2 - 1e-3) / 99), rtol=1e-9, atol=0)


def test_scaled_linear_betas_equal_diffusers_scaled_linear():
    betas = registry.create("schedule", "scaled_linear", T, beta_start=0.00085, beta_end=0.012).betas
    ref = ddpm_ref(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).betas
    close(betas, ref, rtol=1e-6, atol=1e-9)


def test_cosine_betas_equal_diffusers_squaredcos_cap_v2():
    betas = registry.create("schedule", "cosine", T).betas
    ref = ddpm_ref(beta_schedule="squaredcos_cap_v2").betas
    close(betas, ref, rtol=1e-6, atol=1e-6)


def test_cosine_alphas_cumprod_equal_nichol_dhariwal_closed_form():
    # Nichol & Dhariwal 2021, eq. 17: abar_t = f(t) / f(0), f(t) = cos(((t/T + s) / (1 + s)) pi/2)^2.
    # With beta_i = 1 - f((i+1)/T) / f(i/T) the cumulative product telescopes to
    # abar[i] = f((i+1)/T) / f(0), exactly, wherever no beta was clipped at max_beta (all but the
    # last step for T = 1000).
    d = make_diffusion("cosine")
    s = 0.008
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    i = np.arange(T - 1)
    close(d.alphas_cumprod[: T - 1], f((i + 1) / T) / f(0.0), rtol=1e-10, atol=1e-15)
    assert d.betas[-1] == pytest.approx(0.999)  # the clipped last step


def test_sigmoid_betas_equal_diffusers_sigmoid():
    betas = registry.create("schedule", "sigmoid", T, beta_start=1e-4, beta_end=0.02).betas
    ref = ddpm_ref(beta_schedule="sigmoid").betas
    close(betas, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_rescale_zero_terminal_snr_equals_diffusers_rescale_betas_zero_snr(name):
    opts = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}
    sched = registry.create("schedule", name, T, rescale_zero_terminal_snr=True, **opts)
    ref = ddpm_ref(beta_schedule=name, rescale_betas_zero_snr=True, **opts)
    # diffusers rescales in float32 and recovers betas as 1 - abar_t / abar_{t-1}, which loses
    # ~1e-5 absolute; the cumulative products are well conditioned.
    close(sched.betas, ref.betas, rtol=0, atol=2e-5)
    abar = np.cumprod(1.0 - sched.betas)
    close(abar, ref.alphas_cumprod, rtol=1e-4, atol=1e-6)
    assert abar[-1] == 0.0
    assert float(ref.alphas_cumprod[-1]) == 0.0


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_rescale_zero_terminal_snr_equals_lin_et_al_closed_form(name):
    # Lin et al. 2024, Alg. 1, in float64: sqrt(abar') = (sqrt(abar) - sqrt(abar_T)) *
    # sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_T)): the first value is kept, the last becomes 0.
    plain = registry.create("schedule", name, T).betas
    rescaled = registry.create("schedule", name, T, rescale_zero_terminal_snr=True).betas
    r = np.sqrt(np.cumprod(1.0 - plain))
    expected = ((r - r[-1]) * r[0] / (r[0] - r[-1])) ** 2
    close(np.cumprod(1.0 - rescaled), expected, rtol=1e-9, atol=1e-15)
    assert rescaled[0] == pytest.approx(plain[0], rel=1e-9)
    assert rescaled[-1] == 1.0


# -- 2. coefficient tables vs closed forms -----------------------------------------------------------


def test_alphas_cumprod_equals_product_of_one_minus_betas():
    d = make_diffusion("linear")
    ref = ref_tables(ho_linear_betas())
    close(d.betas, ref["betas"], rtol=1e-12, atol=0)
    # Ho et al. 2020, eq. 4: abar_t = prod_{s<=t} (1 - beta_s); spot-check abar_0 = 1 - 1e-4 by hand.
    assert d.alphas_cumprod[0] == pytest.approx(1 - 1e-4, rel=1e-14)
    close(d.alphas_cumprod, ref["abar"], rtol=1e-12, atol=0)
    close(d.alphas_cumprod_prev, ref["abar_prev"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_variance_equals_bayes_closed_form(schedule):
    d = make_diffusion(schedule)
    ref = ref_tables(d.betas)
    close(d.posterior_variance, ref["var"], rtol=1e-10, atol=1e-300)
    # clipped log-variance: log(var) with the t = 0 entry replaced by the t = 1 one
    expected_log = np.log(np.concatenate([[ref["var"][1]], ref["var"][1:]]))
    close(d.posterior_log_variance_clipped, expected_log, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_mean_coefs_equal_bayes_closed_form(schedule):
    d = make_diffusion(schedule)
    ref = ref_tables(d.betas)
    close(d.posterior_mean_coef1, ref["coef1"], rtol=1e-10, atol=1e-14)
    close(d.posterior_mean_coef2, ref["coef2"], rtol=1e-10, atol=1e-14)


# -- 3. forward process and posterior -----------------------------------------------------------------


def test_q_sample_equals_diffusers_add_noise():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, 4, generator=g)
    noise = torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 700, 999])
    d = make_diffusion("linear")
    ref = ddpm_ref().add_noise(x0, noise, t.int())
    close(d.q_sample(x0, t, noise=noise), ref, rtol=1e-5, atol=2e-6)


def test_q_posterior_mean_variance_equals_closed_form():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 3, 3, generator=g)
    xt = torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 3, 400, 999])
    d = make_diffusion("cosine")
    ref = ref_tables(d.betas)
    tn = t.numpy()
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    exp_mean = bcast(ref["coef1"][tn], 4) * x0.double() + bcast(ref["coef2"][tn], 4) * xt.double()
    close(mean, exp_mean, rtol=1e-5, atol=1e-6)
    assert torch.equal(mean[0], x0[0])  # t = 0: the posterior mean is x0 itself
    close(var, bcast(ref["var"][tn], 4).expand_as(xt), rtol=1e-5, atol=1e-12)
    clipped = np.concatenate([[ref["var"][1]], ref["var"][1:]])  # t = 0 uses the t = 1 variance
    close(logvar, bcast(np.log(clipped[tn]), 4).expand_as(xt), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [1, 2, 10, 500, 999])
def test_fixed_small_variance_equals_diffusers_get_variance(t):
    d = make_diffusion("linear", variance="fixed_small")
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(t))
    out = d.p_mean_variance(lambda x, tt: torch.zeros_like(x), x, torch.full((2,), t), clip_denoised=False)
    ref = ddpm_ref(variance_type="fixed_small")._get_variance(t)
    # diffusers forms beta_t = 1 - abar_t / abar_{t-1} in float32: at small t (abar ~ 1) that
    # loses up to ~1e-3 relative precision, hence rtol; the float64 closed-form test above is tight.
    # (fixed_large would differ by (1 - abar_t) / (1 - abar_{t-1}): 2x at t = 1, 10% at t = 10.)
    close(out["variance"], torch.full_like(x, float(ref)), rtol=1e-3, atol=1e-9)


def test_fixed_large_variance_is_betas_with_posterior_variance_at_t0():
    d = make_diffusion("linear", variance="fixed_large")
    betas = ho_linear_betas()
    ref = ref_tables(betas)
    t = torch.tensor([0, 1, 17, 500, 999])
    x = torch.zeros(5, 1, 2, 2, dtype=torch.float64)
    out = d.p_mean_variance(lambda x, tt: torch.zeros_like(x), x, t, clip_denoised=False)
    expected = betas[t.numpy()].copy()
    expected[0] = ref["var"][1]  # beta_tilde_1 at t = 0 (guided-diffusion's FIXED_LARGE)
    close(out["variance"][:, 0, 0, 0], expected, rtol=1e-12, atol=0)
    close(out["log_variance"][:, 0, 0, 0], np.log(expected), rtol=1e-12, atol=0)


# -- 4. v-prediction -------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0, 37, 500, 999])
def test_v_pred_xstart_equals_diffusers_pred_original_sample(t):
    g = torch.Generator().manual_seed(10 + t)
    xt = torch.randn(2, 3, 4, 4, generator=g)
    v = torch.randn(2, 3, 4, 4, generator=g)
    d = make_diffusion("cosine", parameterization="v")
    out = d.p_mean_variance(lambda x, tt: v, xt, torch.full((2,), t), clip_denoised=False)
    sched = ddpm_ref(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    ref = sched.step(v, t, xt, generator=torch.Generator().manual_seed(0)).pred_original_sample
    close(out["pred_xstart"], ref, rtol=1e-5, atol=1e-5)


def test_v_target_equals_diffusers_get_velocity():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 3, 4, 4, generator=g)
    noise = torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0, 100, 600, 999])
    d = make_diffusion("cosine", parameterization="v")
    xt = d.q_sample(x0, t, noise=noise)
    target = d.parameterization.mean_type.target(x0, noise, *d.tables.alpha_sigma(t, x0))
    ref = ddpm_ref(beta_schedule="squaredcos_cap_v2").get_velocity(x0, noise, t)
    # at t = 0, diffusers' float32 sqrt(1 - abar_0) (abar_0 = 1 - 4e-5) is only good to ~1e-3
    # relative, i.e. ~5e-6 absolute on v
    close(target, ref, rtol=1e-5, atol=2e-5)
    # float64 closed form, Salimans & Ho 2022, eq. 10: v = sqrt(abar) eps - sqrt(1 - abar) x0
    abar = bcast(np.cumprod(1.0 - d.betas)[t.numpy()], 4)
    exact = torch.sqrt(abar) * noise.double() - torch.sqrt(1 - abar) * x0.double()
    close(target, exact, rtol=1e-6, atol=1e-6)


def test_v_training_loss_vanishes_for_diffusers_velocity():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([5, 300, 990])
    ref_v = ddpm_ref(beta_schedule="squaredcos_cap_v2").get_velocity(x0, noise, t)
    d = make_diffusion("cosine", parameterization="v")
    losses = d.training_losses(lambda x, tt: ref_v, x0, t, noise=noise)
    assert float(losses["loss"].max()) < 1e-10
    # and a wrong prediction is penalised: the mse of predicting 0 is mean(v^2)
    zero = d.training_losses(lambda x, tt: torch.zeros_like(x), x0, t, noise=noise)
    close(zero["loss"], (ref_v**2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-7)


# -- 5. DDIM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [9, 5, 1, 0])
def test_ddim_step_equals_diffusers_ddim_step(index):
    # "ddim10" of 1000 keeps 0, 100, ..., 900 == diffusers' leading spacing with steps_offset=0.
    # The last step (index 0) goes to abar_prev = 1 == set_alpha_to_one=True.
    d = make_diffusion("linear").respace("ddim10")
    g = torch.Generator().manual_seed(20 + index)
    x = torch.randn(2, 3, 4, 4, generator=g)
    eps = torch.randn(2, 3, 4, 4, generator=g)
    model = Recorder(lambda x, t: eps)
    out = d.ddim_sample(model, x, torch.full((2,), index), clip_denoised=False, eta=0.0)
    assert model.seen == [[100 * index] * 2]
    sched = ddim_ref(timestep_spacing="leading")
    sched.set_timesteps(10)
    ref = sched.step(eps, 100 * index, x, eta=0.0)
    close(out["sample"], ref.prev_sample, rtol=1e-5, atol=1e-5)
    close(out["pred_xstart"], ref.pred_original_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", [7, 2])
def test_ddim_step_with_eta_equals_diffusers_with_same_noise(index):
    # Song et al. 2021, eq. 16: sigma = eta sqrt((1-abar_prev)/(1-abar)) sqrt(1 - abar/abar_prev)
    d = make_diffusion("linear").respace("ddim10")
    g = torch.Generator().manual_seed(30 + index)
    x, eps, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    out = d.ddim_sample(lambda x, t: eps, x, torch.full((2,), index), clip_denoised=False, eta=0.5, noise=z)
    sched = ddim_ref(timestep_spacing="leading")
    sched.set_timesteps(10)
    ref = sched.step(eps, 100 * index, x, eta=0.5, variance_noise=z).prev_sample
    close(out["sample"], ref, rtol=1e-5, atol=1e-5)


def _diffusers_ddim_loop(sched, model, x_T, steps, **step_kwargs):
    sched.set_timesteps(steps)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t), int(t), x, eta=0.0, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_full_loop_equals_diffusers_loop(spacing):
    # Only leading and trailing are compared: diffusers' DDIM always steps back by T // N, which is
    # the kept predecessor for these two spacings but not for "linspace".
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    d = make_diffusion("linear")
    ours = d.sample(toy, x_T.shape, sampler="ddim", steps=10, spacing=spacing, clip_denoised=False, noise=x_T)
    ref = _diffusers_ddim_loop(ddim_ref(timestep_spacing=spacing), toy, x_T, 10)
    close(ours, ref, rtol=1e-5, atol=1e-5)


def test_ddim_full_loop_v_zero_terminal_snr_equals_diffusers():
    # v-prediction on a zero-terminal-SNR schedule, trailing spacing (Lin et al. 2024): the first
    # step is at abar = 0 exactly, where x0 = -v and eps = x_t.
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    d = make_diffusion(
        "scaled_linear", parameterization="v", beta_start=0.00085, beta_end=0.012, rescale_zero_terminal_snr=True
    )
    ours = d.sample(toy, x_T.shape, sampler="ddim", steps=10, spacing="trailing", clip_denoised=False, noise=x_T)
    sched = ddim_ref(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    ref = _diffusers_ddim_loop(sched, toy, x_T, 10)
    assert torch.isfinite(ours).all()
    close(ours, ref, rtol=1e-4, atol=1e-4)


def test_ddim_full_loop_v_zero_terminal_snr_clipped_equals_diffusers():
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    d = make_diffusion(
        "scaled_linear", parameterization="v", beta_start=0.00085, beta_end=0.012, rescale_zero_terminal_snr=True
    )
    # check_finite=False: otherwise diffreg raises SamplingError blaming the model at step 1
    ours = d.sample(
        toy, x_T.shape, sampler="ddim", steps=10, spacing="trailing", clip_denoised=True, noise=x_T, check_finite=False
    )
    # diffusers with clipping + use_clipped_model_output=True has guided-diffusion's semantics:
    # eps recomputed from the clipped x0 (eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)).
    sched = ddim_ref(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=True,
    )
    ref = _diffusers_ddim_loop(sched, toy, x_T, 10, use_clipped_model_output=True)
    assert torch.isfinite(ref).all()
    close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule,ref_schedule", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_ddim_full_loop_clipped_equals_diffusers_clipped(schedule, ref_schedule):
    # guided-diffusion clips x0 to [-1, 1] and recomputes eps from it: diffusers'
    # clip_sample=True with use_clipped_model_output=True. The toy model's eps is large enough
    # that clipping is active in the first steps.
    x_T = 2.0 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    d = make_diffusion(schedule)
    ours = d.sample(toy, x_T.shape, sampler="ddim", steps=10, spacing="leading", clip_denoised=True, noise=x_T)
    sched = ddim_ref(beta_schedule=ref_schedule, clip_sample=True, timestep_spacing="leading")
    ref = _diffusers_ddim_loop(sched, toy, x_T, 10, use_clipped_model_output=True)
    close(ours, ref, rtol=1e-5, atol=1e-5)


def test_ddpm_loop_equals_diffusers_ddpm_loop_with_same_noise():
    # Ancestral sampling (Ho et al. 2020, Alg. 2) over 10 leading-spaced steps: diffusers draws one
    # N(0, I) tensor per step with t > 0 from its generator; diffreg gets the same tensors as
    # explicit step_noise (the last, t = 0, entry must be ignored: Alg. 2 adds no noise at t = 0).
    shape = (2, 3, 4, 4)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(123)
    step_noise = [torch.randn(shape, generator=g) for _ in range(9)] + [torch.ones(shape)]
    d = make_diffusion("linear")
    ours = d.sample(
        toy, shape, sampler="ddpm", steps=10, spacing="leading", clip_denoised=False, noise=x_T, step_noise=step_noise
    )
    sched = ddpm_ref(variance_type="fixed_small", timestep_spacing="leading", steps_offset=0)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(123)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(toy(x, t), int(t), x, generator=g).prev_sample
    close(ours, x, rtol=1e-5, atol=1e-5)


# -- 6. ancestral step ------------------------------------------------------------------------------


def test_p_sample_mean_and_variance_equal_fixed_small_posterior():
    g = torch.Generator().manual_seed(9)
    xt = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    z = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 321, 999])
    d = make_diffusion("linear", variance="fixed_small")
    ref = ref_tables(ho_linear_betas())
    tn = t.numpy()
    # x0 from eps (Ho et al. 2020, eq. 4 solved for x0): x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    abar = bcast(ref["abar"][tn], 4)
    x0 = (xt - torch.sqrt(1 - abar) * eps) / torch.sqrt(abar)
    mean = bcast(ref["coef1"][tn], 4) * x0 + bcast(ref["coef2"][tn], 4) * xt
    std = torch.sqrt(bcast(ref["var"][tn], 4))
    expected = mean + std * z
    expected[0] = mean[0]  # Alg. 2: no noise at the last step (t = 0)
    out = d.p_sample(lambda x, tt: eps, xt, t, clip_denoised=False, noise=z)
    close(out["sample"], expected, rtol=1e-9, atol=1e-9)
    close(out["pred_xstart"], x0, rtol=1e-9, atol=1e-9)


def test_learned_range_log_variance_interpolates_beta_and_posterior_variance():
    g = torch.Generator().manual_seed(11)
    xt = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    v = torch.rand(4, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 1, 500, 999])
    d = make_diffusion("linear", variance="learned_range")
    ref = ref_tables(ho_linear_betas())
    tn = t.numpy()
    # Nichol & Dhariwal 2021, eq. 15: log sigma^2 = frac log beta + (1 - frac) log beta_tilde,
    # frac = (v + 1) / 2, with beta_tilde_0 (= 0) replaced by beta_tilde_1.
    log_bt = np.log(np.concatenate([[ref["var"][1]], ref["var"][1:]]))
    frac = (v + 1) / 2
    expected = frac * bcast(np.log(ref["betas"][tn]), 4) + (1 - frac) * bcast(log_bt[tn], 4)
    out = d.p_mean_variance(lambda x, tt: torch.cat([eps, v], dim=1), xt, t, clip_denoised=False)
    close(out["log_variance"], expected, rtol=1e-10, atol=1e-10)
    close(out["variance"], torch.exp(expected), rtol=1e-10, atol=1e-14)


# -- 7. variational-bound terms ------------------------------------------------------------------


@pytest.mark.parametrize("m1,s1,m2,s2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 1.3), (1.0, 2.0, 0.0, 0.7)])
def test_normal_kl_equals_numerical_integral(m1, s1, m2, s2):
    # KL(p || q) = int p log(p / q), integrated numerically with scipy.
    p, q = stats.norm(m1, s1), stats.norm(m2, s2)
    ref, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -30, 30, limit=200)
    # and the textbook closed form: log(s2/s1) + (s1^2 + (m1-m2)^2) / (2 s2^2) - 1/2
    closed = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    assert ref == pytest.approx(closed, abs=1e-8)
    kl = normal_kl(
        torch.tensor(m1, dtype=torch.float64),
        torch.tensor(2 * math.log(s1), dtype=torch.float64),
        torch.tensor(m2, dtype=torch.float64),
        torch.tensor(2 * math.log(s2), dtype=torch.float64),
    )
    assert float(kl) == pytest.approx(ref, abs=1e-8)


def test_discretized_log_likelihood_of_sharp_gaussian_at_its_mean_is_near_zero():
    # scale 1e-3, bin half-width 1/255 ~ 3.9 sigma: P(bin) = 1 - 2 Phi(-3.92) ~ 1 - 9e-5.
    x = torch.zeros(1)
    ll = discretized_gaussian_log_likelihood(x, means=torch.zeros(1), log_scales=torch.tensor([math.log(1e-3)]))
    assert float(ll) <= 0.0
    assert float(ll) == pytest.approx(0.0, abs=2e-4)


@pytest.mark.parametrize("k,mean,scale", [(128, 0.1, 0.3), (100, -0.3, 0.05), (200, 0.5, 1.0), (128, 0.0019, 0.004)])
def test_discretized_log_likelihood_middle_bin_equals_exact_normal_cdf(k, mean, scale):
    # Ho et al. 2020, eq. 13: a middle bin of the 8-bit grid x = 2k/255 - 1 has probability
    # Phi((x + 1/255 - m)/s) - Phi((x - 1/255 - m)/s); diffreg uses guided-diffusion's tanh
    # approximation of Phi, whose absolute error is < 1.8e-4 everywhere (checked numerically
    # against scipy), so a difference of two CDFs is good to 3.6e-4.
    x = 2 * k / 255 - 1
    exact = stats.norm.cdf((x + 1 / 255 - mean) / scale) - stats.norm.cdf((x - 1 / 255 - mean) / scale)
    ll = discretized_gaussian_log_likelihood(
        torch.tensor([x], dtype=torch.float64),
        means=torch.tensor([mean], dtype=torch.float64),
        log_scales=torch.tensor([math.log(scale)], dtype=torch.float64),
    )
    assert math.exp(float(ll)) == pytest.approx(exact, abs=4e-4)


@pytest.mark.parametrize("m,s", [(0.8, 0.4), (0.0, 0.6)])
def test_discretized_log_likelihood_edge_bins_are_open(m, s):
    # x = -1: P = Phi((-1 + 1/255 - m)/s);  x = +1: P = 1 - Phi((1 - 1/255 - m)/s); one tanh-CDF
    # evaluation each, good to 1.8e-4.
    x = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    ll = discretized_gaussian_log_likelihood(
        x, means=torch.full((2,), m, dtype=torch.float64), log_scales=torch.full((2,), math.log(s), dtype=torch.float64)
    )
    lo = stats.norm.cdf((-1 + 1 / 255 - m) / s)
    hi = 1 - stats.norm.cdf((1 - 1 / 255 - m) / s)
    assert math.exp(float(ll[0])) == pytest.approx(lo, abs=2e-4)
    assert math.exp(float(ll[1])) == pytest.approx(hi, abs=2e-4)


def test_discretized_likelihood_sums_to_one_over_the_256_bins():
    # The bins tile the real line (edge bins open), so their probabilities sum to 1 whatever
    # approximation of the CDF is used (the sum telescopes).
    x = torch.tensor([2 * k / 255 - 1 for k in range(256)], dtype=torch.float64)
    for m, s in [(0.0, 0.5), (0.7, 0.05), (-0.95, 2.0)]:
        ll = discretized_gaussian_log_likelihood(
            x, means=torch.full_like(x, m), log_scales=torch.full_like(x, math.log(s))
        )
        assert float(ll.exp().sum()) == pytest.approx(1.0, abs=1e-9)


# -- 8. respacing ---------------------------------------------------------------------------------


def test_space_timesteps_ddim10_of_1000_is_stride_100():
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))


def test_space_timesteps_sections_hand_derived_small_cases():
    # T=30, "2,3": two sections of 15 steps.  Section 0 (0..14), 2 steps, stride 14/1 = 14:
    # 0, 14.  Section 1 (15..29), 3 steps, stride 14/2 = 7: 15, 22, 29.
    assert space_timesteps(30, "2,3") == [0, 14, 15, 22, 29]
    # T=10, "2,2,2": sizes 4, 3, 3 (the remainder goes to the first section).
    # Section 0 (0..3) stride 3: 0, 3.  Section 1 (4..6) stride 2: 4, 6.  Section 2 (7..9): 7, 9.
    assert space_timesteps(10, "2,2,2") == [0, 3, 4, 6, 7, 9]
    # T=8, "4": stride 7/3 -> 0, 2.33, 4.67, 7.0, rounded to the nearest: 0, 2, 5, 7.
    assert space_timesteps(8, "4") == [0, 2, 5, 7]
    # T=6, "3": stride 5/2 = 2.5 -> round(0), round(2.5), round(5.0) = 0, 2, 5 (Python rounds
    # half to even, as guided-diffusion's code does).
    assert space_timesteps(6, "3") == [0, 2, 5]


def test_space_timesteps_10_10_10_of_300():
    # three sections of 100 steps, 10 from each with stride 99/9 = 11 exactly
    expected = [100 * s + 11 * k for s in range(3) for k in range(10)]
    assert space_timesteps(300, "10,10,10") == expected


def test_space_timesteps_ddim7_of_10_raises_naming_spec():
    # strides 1..9 over 10 steps give 10, 5, 4, 3, 2, 2, 2, 2, 2 steps: never 7.
    with pytest.raises(ValueError, match="ddim7"):
        space_timesteps(10, "ddim7")


def test_space_timesteps_section_larger_than_section_size_raises_naming_spec():
    with pytest.raises(ValueError, match="'6,1'"):
        space_timesteps(10, "6,1")  # section 0 has 5 steps
    with pytest.raises(ValueError, match="'11'"):
        space_timesteps(10, "11")


def test_respace_keeps_marginals_and_maps_to_original_timesteps():
    d = make_diffusion("cosine")
    sp = d.respace("2,3")
    keep = space_timesteps(T, "2,3")
    assert list(sp.timestep_map) == keep
    close(sp.alphas_cumprod, d.alphas_cumprod[keep], rtol=1e-8, atol=1e-18)
    # new beta_i = 1 - abar[k_i] / abar[k_{i-1}] (guided-diffusion SpacedDiffusion)
    prev = np.concatenate([[1.0], d.alphas_cumprod[keep][:-1]])
    close(sp.betas, 1 - d.alphas_cumprod[keep] / prev, rtol=1e-12, atol=1e-15)


# -- 9. exact-denoiser round trip (property) -----------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    schedule=st.sampled_from(["linear", "cosine"]),
    num_timesteps=st.integers(min_value=30, max_value=1000),
    t_frac=st.floats(min_value=0.0, max_value=1.0),
    parameterization=st.sampled_from(["eps", "x0", "v"]),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_exact_denoiser_recovers_x0(schedule, num_timesteps, t_frac, parameterization, seed):
    # float64 throughout: with eps-prediction x0 = x_t / sqrt(abar) - ..., and 1 / sqrt(abar)
    # reaches ~2e4 at the end of the cosine schedule, which float32 inputs cannot resolve to 1e-4.
    t_int = min(int(t_frac * num_timesteps), num_timesteps - 1)
    d = make_diffusion(schedule, num_timesteps=num_timesteps, parameterization=parameterization)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.full((2,), t_int)
    abar = float(np.prod(1.0 - np.asarray(d.betas[: t_int + 1])))  # eq. 4, computed here
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    truth = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[parameterization]  # Salimans & Ho eq. 10 for v
    xt = d.q_sample(x0, t, noise=noise)
    close(xt, a * x0 + s * noise, rtol=1e-12, atol=1e-12)
    out = d.p_mean_variance(lambda x, tt: truth, xt, t, clip_denoised=False)
    close(out["pred_xstart"], x0, rtol=0, atol=1e-4)
    close(out["pred_eps"], noise, rtol=0, atol=1e-4)


# -- 10. Diffusion.sample timestep selection ------------------------------------------------------


def _sampled_original_timesteps(spacing, steps=10):
    d = make_diffusion("linear")
    model = Recorder(lambda x, t: torch.zeros_like(x))
    d.sample(
        model,
        (1, 1, 2, 2),
        sampler="ddim",
        steps=steps,
        spacing=spacing,
        clip_denoised=False,
        noise=torch.zeros(1, 1, 2, 2),
    )
    return [seen[0] for seen in model.seen]


@pytest.mark.parametrize("steps", [10, 7, 50])
def test_sample_trailing_starts_at_last_timestep(steps):
    seen = _sampled_original_timesteps("trailing", steps)
    assert seen[0] == T - 1
    ref = ddim_ref(timestep_spacing="trailing")
    ref.set_timesteps(steps)
    assert seen == [int(t) for t in ref.timesteps]


@pytest.mark.parametrize("steps", [10, 7, 50])
def test_sample_leading_timesteps_equal_diffusers_leading(steps):
    ref = ddim_ref(timestep_spacing="leading")
    ref.set_timesteps(steps)
    assert _sampled_original_timesteps("leading", steps) == [int(t) for t in ref.timesteps]


@pytest.mark.parametrize("steps", [10, 7, 50])
def test_sample_linspace_timesteps_equal_diffusers_linspace(steps):
    ref = ddim_ref(timestep_spacing="linspace")
    ref.set_timesteps(steps)
    assert _sampled_original_timesteps("linspace", steps) == [int(t) for t in ref.timesteps]
