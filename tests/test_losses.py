"""Training losses, the variational bound, min-SNR weighting, timestep samplers, schedule
validation and reduced-precision numerics, each checked against a value computed here.

Every reference is written out in this file in float64 from the paper equations named in the
comments; the only thing taken from diffreg is ``diffusion.betas`` (the schedule, checked against
diffusers in ``test_math_reference.py``), from which abar_t = prod_{s<=t} (1 - beta_s) is formed
here.

Notation: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (Ho et al. 2020, eq. 4), abar_{-1} = 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import diffreg
from diffreg import registry
from diffreg.errors import ComponentOptionError, ConfigError

LN2 = math.log(2.0)


# -- helpers: the references, written out independently ------------------------------------------


def make(
    schedule="linear",
    num_timesteps=1000,
    parameterization="eps",
    variance="fixed_small",
    loss="mse",
    **extra,
):
    return diffreg.Diffusion.from_config(
        {
            "schedule": schedule,
            "num_timesteps": num_timesteps,
            "parameterization": parameterization,
            "variance": variance,
            "loss": loss,
            **extra,
        }
    )


def explicit(betas):
    return {"name": "explicit", "betas": [float(b) for b in betas]}


def abar_of(diffusion) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s), float64 (Ho et al. 2020, eq. 4)."""
    return np.cumprod(1.0 - np.asarray(diffusion.betas, dtype=np.float64))


def col(values, ndim: int = 4) -> torch.Tensor:
    """float64 [N] -> torch float64 [N, 1, ..., 1]."""
    return torch.tensor(np.asarray(values, dtype=np.float64)).reshape((-1,) + (1,) * (ndim - 1))


def ref_x_t(diffusion, x0, t, eps):
    """Ho et al. 2020, eq. 4, in float64."""
    a = col(abar_of(diffusion)[t.numpy()], x0.ndim)
    return a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()


def ref_posterior(diffusion, x0, x_t, t):
    """q(x_{t-1} | x_t, x0) for t > 0 (Ho et al. 2020, eqs. 6-7), float64:
    mean = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t,
    var  = beta_t (1 - abar_{t-1}) / (1 - abar_t)."""
    betas = np.asarray(diffusion.betas, dtype=np.float64)
    abar = abar_of(diffusion)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    tt = t.numpy()
    b, a, ap = col(betas[tt], x0.ndim), col(abar[tt], x0.ndim), col(abar_prev[tt], x0.ndim)
    mean = b * ap.sqrt() / (1 - a) * x0.double() + (1 - ap) * (1 - b).sqrt() / (1 - a) * x_t.double()
    var = b * (1 - ap) / (1 - a)
    return mean, var.expand_as(mean)


def ref_gauss_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) = 0.5 (log(v2 / v1) + v1 / v2 + (m1 - m2)^2 / v2 - 1), nats."""
    return 0.5 * (torch.log(v2 / v1) + v1 / v2 + (m1 - m2) ** 2 / v2 - 1.0)


def ref_decoder_nll_bits(x0, mean, std):
    """-log p(x0) in bits/dim, averaged over dims, of 8-bit data under N(mean, std^2) discretized
    into 256 bins of width 2/255 centred on the data values, the two edge bins open to +-inf
    (Ho et al. 2020, eq. 13), with the exact normal CDF."""
    x = x0.double().numpy()
    m = np.broadcast_to(mean.double().numpy(), x.shape)
    s = np.broadcast_to(std.double().numpy(), x.shape)
    upper = (x + 1.0 / 255.0 - m) / s
    lower = (x - 1.0 / 255.0 - m) / s
    interior = np.log(stats.norm.cdf(upper) - stats.norm.cdf(lower))
    logp = np.where(x < -0.999, stats.norm.logcdf(upper), np.where(x > 0.999, stats.norm.logsf(lower), interior))
    return -logp.reshape(x.shape[0], -1).mean(axis=1) / LN2


def mean_over_dims(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def ref_mse(diffusion, parameterization, model, x0, t, eps):
    """mean over dims of (target - model(x_t, t))^2 with the parameterization's target, float64."""
    x_t = ref_x_t(diffusion, x0, t, eps)
    a = col(abar_of(diffusion)[t.numpy()], x0.ndim)
    target = {
        "eps": eps.double(),  # Ho et al. 2020, eq. 14
        "x0": x0.double(),
        "v": a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double(),  # Salimans & Ho 2022, eq. 10
    }[parameterization]
    return mean_over_dims((target - model(x_t, t)) ** 2)


def toy_model(x, t):
    """A deterministic stand-in network: 0.7 x + 1e-4 t."""
    return 0.7 * x + 1e-4 * t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def eight_bit_images(n, c=3, h=4, w=4, seed=0):
    """Data on the 8-bit grid k / 127.5 - 1, with both edge values present in every example."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 256, (n, c, h, w), generator=g)
    k[:, 0, 0, 0] = 0
    k[:, 0, 0, 1] = 255
    return k.double() / 127.5 - 1.0


def data(n, c=3, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) * 2 - 1, torch.randn(n, c, h, w, generator=g)


def assert_close(actual, expected, rtol, atol=0.0):
    a = actual.detach().double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = expected.detach().double().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


# -- 1. the MSE objective for each parameterization --------------------------------------------------


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_mse_loss_equals_mean_squared_error_to_the_parameterization_target(parameterization):
    d = make(parameterization=parameterization)
    x0, eps = data(6)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    terms = d.training_losses(toy_model, x0, t, noise=eps)

    expected = ref_mse(d, parameterization, toy_model, x0, t, eps)
    assert set(terms) == {"loss", "mse"}
    assert_close(terms["mse"], expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(terms["loss"], terms["mse"])


def test_mse_loss_calls_the_model_with_x_t_and_t():
    d = make(num_timesteps=100, schedule="cosine")
    x0, eps = data(3)
    t = torch.tensor([0, 42, 99])
    seen = {}

    def model(x, tt):
        seen["x"], seen["t"] = x.clone(), tt.clone()
        return torch.zeros_like(x)

    d.training_losses(model, x0, t, noise=eps)
    assert torch.equal(seen["t"], t)
    assert_close(seen["x"], ref_x_t(d, x0, t, eps), rtol=1e-6, atol=1e-6)


# -- 2. the hybrid objective (learned_range variance) ------------------------------------------------


def hybrid_inputs(n=4, c=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, c, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(n, c, 4, 4, generator=g)
    out = torch.cat([torch.randn(n, c, 4, 4, generator=g), torch.rand(n, c, 4, 4, generator=g) * 2 - 1], dim=1)
    return x0, eps, out


@pytest.mark.parametrize("loss", ["mse", "rescaled_mse"])
def test_hybrid_terms_are_mse_vb_and_their_sum(loss):
    d = make(schedule="cosine", num_timesteps=250, variance="learned_range", loss=loss)
    x0, eps, out = hybrid_inputs()
    t = torch.tensor([0, 1, 100, 249])
    terms = d.training_losses(lambda x, tt: out, x0, t, noise=eps)
    assert set(terms) == {"mse", "vb", "loss"}
    # Nichol & Dhariwal 2021, eq. 16: L_hybrid = L_simple + lambda L_vlb
    assert_close(terms["loss"], terms["mse"] + terms["vb"], rtol=1e-7)
    # L_simple is the eps regression on the first C channels only
    expected_mse = mean_over_dims((eps.double() - out[:, :2].double()) ** 2)
    assert_close(terms["mse"], expected_mse, rtol=1e-6)


def test_rescaled_mse_vb_is_t_over_1000_times_mse_vb():
    mse = make(schedule="cosine", num_timesteps=250, variance="learned_range", loss="mse")
    rescaled = make(schedule="cosine", num_timesteps=250, variance="learned_range", loss="rescaled_mse")
    x0, eps, out = hybrid_inputs()
    t = torch.tensor([0, 7, 120, 249])
    vb = mse.training_losses(lambda x, tt: out, x0, t, noise=eps)["vb"]
    vb_rescaled = rescaled.training_losses(lambda x, tt: out, x0, t, noise=eps)["vb"]
    assert torch.all(vb > 0)
    assert_close(vb_rescaled, vb * (250 / 1000), rtol=1e-6)


def test_hybrid_vb_term_sends_no_gradient_into_the_mean_channels():
    d = make(schedule="cosine", num_timesteps=250, variance="learned_range", loss="rescaled_mse")
    x0, eps, out = hybrid_inputs()
    out = out.clone().requires_grad_(True)
    t = torch.tensor([0, 3, 100, 249])
    d.training_losses(lambda x, tt: out, x0, t, noise=eps)["vb"].sum().backward()
    assert out.grad is not None
    assert torch.count_nonzero(out.grad[:, :2]) == 0
    assert torch.all(out.grad[:, 2:].abs().reshape(4, -1).amax(dim=1) > 0)


def test_hybrid_mse_term_sends_no_gradient_into_the_variance_channels():
    d = make(schedule="cosine", num_timesteps=250, variance="learned_range", loss="rescaled_mse")
    x0, eps, out = hybrid_inputs()
    out = out.clone().requires_grad_(True)
    t = torch.tensor([0, 3, 100, 249])
    d.training_losses(lambda x, tt: out, x0, t, noise=eps)["mse"].sum().backward()
    assert torch.count_nonzero(out.grad[:, 2:]) == 0
    assert torch.count_nonzero(out.grad[:, :2]) > 0


def test_hybrid_vb_at_t_positive_equals_closed_form_kl_with_learned_range_variance():
    d = make(schedule="cosine", num_timesteps=250, variance="learned_range", loss="mse")
    x0, eps, out = hybrid_inputs()
    t = torch.tensor([1, 10, 100, 249])
    vb = d.training_losses(lambda x, tt: out, x0, t, noise=eps)["vb"]

    x_t = ref_x_t(d, x0, t, eps)
    q_mean, q_var = ref_posterior(d, x0, x_t, t)
    a = col(abar_of(d)[t.numpy()])
    pred_x0 = (x_t - (1 - a).sqrt() * out[:, :2].double()) / a.sqrt()  # eq. 4 solved for x0
    p_mean, _ = ref_posterior(d, pred_x0, x_t, t)
    # Nichol & Dhariwal 2021, eq. 15: log sigma^2 = frac log beta_t + (1 - frac) log beta_tilde_t
    frac = (out[:, 2:].double() + 1) / 2
    log_beta = col(np.log(np.asarray(d.betas)[t.numpy()]))
    p_var = torch.exp(frac * log_beta + (1 - frac) * torch.log(q_var))
    expected = mean_over_dims(ref_gauss_kl(q_mean, q_var, p_mean, p_var)) / LN2
    assert_close(vb, expected, rtol=1e-5, atol=1e-7)


def test_public_vb_term_equals_closed_form_kl_and_the_hybrid_loss_is_mse_plus_it():
    """diffreg.loss.vb_term, the helper loss plugins reuse: at t > 0 it is the closed-form KL of
    Nichol & Dhariwal 2021 (eq. 15 variance) in bits, and MSELoss's loss is mse + vb_term."""
    from diffreg.loss import vb_term

    d = make(schedule="cosine", num_timesteps=250, variance="learned_range", loss="mse")
    x0, eps, out = hybrid_inputs()
    t = torch.tensor([1, 10, 100, 249])
    x_t = d.q_sample(x0, t, noise=eps)
    mean_part, var_part = out[:, :2], out[:, 2:]
    vb = vb_term(d, mean_part, var_part, x0, x_t, t)

    xr = ref_x_t(d, x0, t, eps)
    q_mean, q_var = ref_posterior(d, x0, xr, t)
    a = col(abar_of(d)[t.numpy()])
    pred_x0 = (xr - (1 - a).sqrt() * mean_part.double()) / a.sqrt()
    p_mean, _ = ref_posterior(d, pred_x0, xr, t)
    frac = (var_part.double() + 1) / 2
    log_beta = col(np.log(np.asarray(d.betas)[t.numpy()]))
    p_var = torch.exp(frac * log_beta + (1 - frac) * torch.log(q_var))
    assert_close(vb, mean_over_dims(ref_gauss_kl(q_mean, q_var, p_mean, p_var)) / LN2, rtol=1e-5, atol=1e-7)

    terms = d.training_losses(lambda x, tt: out, x0, t, noise=eps)
    expected_mse = mean_over_dims((eps.double() - mean_part.double()) ** 2)
    assert_close(terms["loss"], expected_mse + vb.double(), rtol=1e-6)


def test_public_vb_term_trains_only_the_variance_half():
    from diffreg.loss import vb_term

    d = make(schedule="cosine", num_timesteps=250, variance="learned_range", loss="mse")
    x0, eps, out = hybrid_inputs()
    t = torch.tensor([0, 3, 100, 249])
    mean_part = out[:, :2].clone().requires_grad_(True)
    var_part = out[:, 2:].clone().requires_grad_(True)
    x_t = d.q_sample(x0, t, noise=eps)
    vb_term(d, mean_part, var_part, x0, x_t, t).sum().backward()
    assert mean_part.grad is None
    assert torch.all(var_part.grad.abs().reshape(4, -1).amax(dim=1) > 0)


def test_public_vb_term_without_a_learned_variance_names_the_variance():
    from diffreg.loss import vb_term

    d = make(schedule="cosine", num_timesteps=50, variance="fixed_small", loss="mse")
    x0, eps, out = hybrid_inputs()
    t = torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="var_part=None.*'fixed_small'"):
        vb_term(d, out[:, :2], None, x0, x0, t)
    with pytest.raises(ValueError, match=r"var_part has shape \(4, 1, 4, 4\)"):
        vb_term(d, out[:, :2], out[:, 2:3], x0, x0, t)


# -- 3. the variational bound: kl / rescaled_kl ------------------------------------------------------


def kl_model(seed=5, n=4, c=3, log_std_range=(-5.0, -3.0)):
    """An x0-predicting model with a learned log-variance: output = [x0_hat, log sigma^2], both fixed."""
    g = torch.Generator().manual_seed(seed)
    x0 = eight_bit_images(n, c, seed=seed)
    x0_hat = (x0 + 0.01 * torch.randn(x0.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    lo, hi = log_std_range
    log_std = lo + (hi - lo) * torch.rand(x0.shape, generator=g, dtype=torch.float64)
    out = torch.cat([x0_hat, 2 * log_std], dim=1).float()
    eps = torch.randn(x0.shape, generator=g)
    return x0.float(), eps, out


def test_kl_loss_equals_vb_terms_bpd_output():
    d = make(schedule="cosine", num_timesteps=50, parameterization="x0", variance="learned", loss="kl")
    x0, eps, out = kl_model()
    t = torch.tensor([0, 1, 25, 49])
    terms = d.training_losses(lambda x, tt: out, x0, t, noise=eps)
    x_t = d.q_sample(x0, t, noise=eps)
    vb = d.vb_terms_bpd(lambda x, tt: out, x0, x_t, t, clip_denoised=False)["output"]
    assert set(terms) == {"loss"}
    assert torch.equal(terms["loss"], vb)


def test_rescaled_kl_is_t_times_kl():
    kl = make(schedule="cosine", num_timesteps=50, parameterization="x0", variance="learned", loss="kl")
    rkl = make(schedule="cosine", num_timesteps=50, parameterization="x0", variance="learned", loss="rescaled_kl")
    x0, eps, out = kl_model()
    t = torch.tensor([0, 1, 25, 49])
    plain = kl.training_losses(lambda x, tt: out, x0, t, noise=eps)["loss"]
    rescaled = rkl.training_losses(lambda x, tt: out, x0, t, noise=eps)["loss"]
    assert_close(rescaled, 50 * plain, rtol=1e-6)


def test_kl_loss_at_t0_is_discretized_decoder_nll_in_bits():
    d = make(schedule="cosine", num_timesteps=50, parameterization="x0", variance="learned", loss="kl")
    x0, eps, out = kl_model()
    t = torch.zeros(4, dtype=torch.long)
    loss = d.training_losses(lambda x, tt: out, x0, t, noise=eps)["loss"]
    # at t = 0 the posterior mean is x0_hat itself (coef1 = beta_0 / (1 - abar_0) = 1, coef2 = 0)
    mean, std = out[:, :3].double(), torch.exp(0.5 * out[:, 3:].double())
    expected = ref_decoder_nll_bits(x0, mean, std)
    assert np.all(expected > 0.1)
    # guided-diffusion's tanh approximation of Phi: ~1e-3 relative
    assert_close(loss, expected, rtol=1e-3)


def test_kl_loss_at_t0_uses_open_edge_bins():
    """With the mean at the data edge, an open edge bin holds ~half the mass: -log2(1/2) = 1 bit."""
    d = make(schedule="cosine", num_timesteps=50, parameterization="x0", variance="learned", loss="kl")
    x0 = torch.tensor([-1.0, 1.0]).reshape(2, 1, 1, 1)
    # std 0.5: the bin [-1, -1 + 1/255] alone would hold ~0.3% of the mass; the open bin
    # (-inf, -1 + 1/255] holds Phi((1/255) / 0.5) = 0.50313 of it.
    out = torch.cat([x0, torch.full_like(x0, 2 * math.log(0.5))], dim=1)
    loss = d.training_losses(lambda x, tt: out, x0, torch.zeros(2, dtype=torch.long), noise=torch.zeros_like(x0))
    expected = -math.log2(stats.norm.cdf((1 / 255) / 0.5))
    assert_close(loss["loss"], [expected, expected], rtol=1e-3)


def test_kl_loss_at_t_positive_is_closed_form_gaussian_kl_in_bits():
    d = make(schedule="cosine", num_timesteps=50, parameterization="x0", variance="learned", loss="kl")
    x0, eps, out = kl_model(log_std_range=(-3.0, -1.0))
    t = torch.tensor([1, 2, 25, 49])
    loss = d.training_losses(lambda x, tt: out, x0, t, noise=eps)["loss"]

    x_t = ref_x_t(d, x0, t, eps)
    q_mean, q_var = ref_posterior(d, x0, x_t, t)
    p_mean, _ = ref_posterior(d, out[:, :3].double(), x_t, t)
    p_var = torch.exp(out[:, 3:].double())
    # Ho et al. 2020, eq. 5: L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), in bits/dim
    expected = mean_over_dims(ref_gauss_kl(q_mean, q_var, p_mean, p_var)) / LN2
    assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_kl_loss_is_zero_when_the_model_equals_the_posterior():
    """Fixed-small variance is the posterior variance; an x0 model that returns the true x0 then
    makes p equal q for every t > 0, so each KL vanishes."""
    d = make(schedule="cosine", num_timesteps=50, parameterization="x0", variance="fixed_small", loss="kl")
    x0, eps = data(4)
    t = torch.tensor([1, 5, 30, 49])
    loss = d.training_losses(lambda x, tt: x0, x0, t, noise=eps)["loss"]
    assert_close(loss, np.zeros(4), rtol=0, atol=1e-5)


# -- 4. min-SNR weighting (Hang et al. 2023) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("parameterization", "weight"),
    [
        # Hang et al. 2023, eq. 8: w = min(SNR, gamma) on the x0 scale; the eps error is SNR times
        # the x0 error, the v error (SNR + 1) times it, so w is divided by those.
        ("eps", lambda snr: np.minimum(snr, 5.0) / snr),
        ("v", lambda snr: np.minimum(snr, 5.0) / (snr + 1.0)),
        ("x0", lambda snr: np.minimum(snr, 5.0)),
    ],
)
def test_min_snr_gamma_weights_each_example(parameterization, weight):
    d = make(parameterization=parameterization, loss={"name": "mse", "min_snr_gamma": 5.0})
    x0, eps = data(6)
    t = torch.tensor([0, 10, 150, 300, 600, 999])
    abar = abar_of(d)[t.numpy()]
    snr = abar / (1 - abar)  # SNR_t = abar_t / (1 - abar_t)
    assert snr.max() > 5 > snr.min()  # both sides of the clamp are exercised

    unweighted = ref_mse(d, parameterization, toy_model, x0, t, eps).numpy()
    terms = d.training_losses(toy_model, x0, t, noise=eps)
    # Float32 inputs: abar_t is rounded to float32 (error <= 2^-24) before 1 - abar_t is formed, a
    # relative error of up to 2^-24 / (1 - abar_t) in SNR (6e-4 at t = 0, where 1 - abar = 1e-4).
    rtol = 1e-5 + 2.0**-24 / (1 - abar)
    np.testing.assert_array_less(
        np.abs(terms["mse"].double().numpy() - unweighted * weight(snr)), rtol * unweighted * weight(snr)
    )
    assert torch.equal(terms["loss"], terms["mse"])


@pytest.mark.parametrize("gamma", [0, -1, 0.0, -1.0, float("nan")])
def test_min_snr_gamma_not_positive_is_rejected_by_from_config(gamma):
    with pytest.raises(ComponentOptionError, match="min_snr_gamma"):
        make(loss={"name": "mse", "min_snr_gamma": gamma})


# -- 5. calc_bpd_loop ----------------------------------------------------------------------------------


def test_calc_bpd_loop_shapes():
    d = make(schedule="cosine", num_timesteps=20, parameterization="x0")
    x0, eps = data(3)
    out = d.calc_bpd_loop(lambda x, tt: 0.5 * torch.tanh(x), x0, noise=eps)
    assert out["total_bpd"].shape == (3,) and out["prior_bpd"].shape == (3,)
    for key in ("vb", "xstart_mse", "mse"):
        assert out[key].shape == (3, 20), key


def test_calc_bpd_loop_total_is_sum_of_terms_plus_prior():
    d = make(schedule="cosine", num_timesteps=20, parameterization="x0")
    x0, eps = data(3)
    out = d.calc_bpd_loop(lambda x, tt: 0.5 * torch.tanh(x), x0, noise=eps)
    assert_close(out["total_bpd"], out["vb"].double().sum(1) + out["prior_bpd"].double(), rtol=1e-6)


def test_calc_bpd_loop_vb_columns_run_from_t_T_minus_1_to_0_as_guided_diffusion():
    d = make(schedule="cosine", num_timesteps=20, parameterization="x0")
    x0 = eight_bit_images(2, 2, seed=11).float()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(12))

    def model(x, tt):  # near the data, so the t = 0 bins are not in the far tail of the CDF
        return x0 + 0.02 * torch.tanh(x)

    out = d.calc_bpd_loop(model, x0, noise=eps)

    expected = np.zeros((2, 20))
    for k in range(20):
        t = torch.full((2,), k, dtype=torch.long)
        x_t = ref_x_t(d, x0, t, eps)
        pred_x0 = model(x_t, t).clamp(-1, 1)  # clip_denoised=True (the default)
        if k == 0:
            # fixed_small at t = 0 uses the t = 1 posterior variance (beta_tilde_0 = 0)
            _, var1 = ref_posterior(d, x0, x_t, torch.ones(2, dtype=torch.long))
            expected[:, 0] = ref_decoder_nll_bits(x0, pred_x0, var1.sqrt())
        else:
            q_mean, q_var = ref_posterior(d, x0, x_t, t)
            p_mean, _ = ref_posterior(d, pred_x0, x_t, t)
            expected[:, k] = (mean_over_dims(ref_gauss_kl(q_mean, q_var, p_mean, q_var)) / LN2).numpy()
    # guided-diffusion's order: column 0 is t = T-1, the last column t = 0
    expected = expected[:, ::-1]
    assert_close(out["vb"][:, :-1], expected[:, :-1], rtol=1e-5, atol=1e-6)
    assert_close(out["vb"][:, -1], expected[:, -1], rtol=1e-3)


def test_calc_bpd_loop_prior_bpd_is_kl_of_q_x_T_to_standard_normal():
    betas = [0.2, 0.2, 0.2, 0.2, 0.2]  # abar_{T-1} = 0.8^5, far from 0 so the prior term is sizable
    d = make(schedule=explicit(betas), num_timesteps=5, parameterization="x0")
    x0, eps = data(3)
    out = d.calc_bpd_loop(lambda x, tt: 0.5 * torch.tanh(x), x0, noise=eps)
    a = 0.8**5
    # KL(N(sqrt(a) x0, 1 - a) || N(0, 1)) = 0.5 (-log(1 - a) + (1 - a) + a x0^2 - 1), per dim
    kl = 0.5 * (-math.log(1 - a) + (1 - a) + a * x0.double() ** 2 - 1)
    expected = mean_over_dims(kl) / LN2
    assert torch.all(expected > 0.01)
    assert_close(out["prior_bpd"], expected, rtol=1e-5)


def test_calc_bpd_loop_with_same_noise_is_reproducible():
    d = make(schedule="cosine", num_timesteps=20, parameterization="x0")
    x0, eps = data(3)
    first = d.calc_bpd_loop(lambda x, tt: 0.5 * torch.tanh(x), x0, noise=eps)
    torch.randn(100)  # move the global generator: a fixed noise must not depend on it
    second = d.calc_bpd_loop(lambda x, tt: 0.5 * torch.tanh(x), x0, noise=eps)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_calc_bpd_loop_xstart_mse_is_zero_for_a_perfect_x0_model():
    d = make(schedule="cosine", num_timesteps=20, parameterization="x0")
    x0, eps = data(3)
    out = d.calc_bpd_loop(lambda x, tt: x0, x0, noise=eps)
    assert torch.count_nonzero(out["xstart_mse"]) == 0


def test_calc_bpd_loop_eps_mse_is_zero_for_a_perfect_x0_model():
    """eps recovered from x_t and the true x0 is the noise used (eq. 4 solved for eps)."""
    d = make(schedule="cosine", num_timesteps=20, parameterization="x0")
    x0, eps = data(3)
    out = d.calc_bpd_loop(lambda x, tt: x0, x0, noise=eps)
    assert_close(out["mse"], np.zeros((3, 20)), rtol=0, atol=1e-8)


# -- 6. timestep samplers --------------------------------------------------------------------------


def test_uniform_sampler_draws_int64_in_range_with_unit_weights():
    sampler = registry.create("timestep_sampler", "uniform", 7)
    t, w = sampler.sample(500)
    assert t.dtype == torch.int64 and t.shape == (500,)
    assert int(t.min()) >= 0 and int(t.max()) <= 6
    assert set(t.tolist()) == set(range(7))
    assert torch.equal(w, torch.ones(500))


def feed(sampler, t_value, losses):
    for loss in losses:
        sampler.update_with_losses(torch.tensor([t_value]), torch.tensor([loss]))


def warmed_up_sampler():
    """T = 4; the last 10 losses of each t have root-mean-squares 1, 2, 3 and sqrt(8)."""
    sampler = registry.create("timestep_sampler", "loss_second_moment", 4)
    feed(sampler, 0, [1.0] * 10)
    feed(sampler, 1, [2.0] * 10)
    feed(sampler, 2, [100.0, 100.0, 100.0] + [3.0] * 10)  # the first three leave the window
    feed(sampler, 3, [0.0] * 5 + [4.0] * 5)  # mean 2, but second moment 8
    return sampler


EXPECTED_RMS = np.array([1.0, 2.0, 3.0, math.sqrt(8.0)])


def expected_p(rms=EXPECTED_RMS, uniform_prob=0.001):
    # Nichol & Dhariwal 2021, eq. 18, mixed with uniform: p = (1 - u) rms / sum(rms) + u / T
    return (1 - uniform_prob) * rms / rms.sum() + uniform_prob / len(rms)


def test_loss_second_moment_is_uniform_until_every_t_has_ten_losses():
    sampler = registry.create("timestep_sampler", "loss_second_moment", 4)
    for t_value in range(4):
        feed(sampler, t_value, [float(t_value + 1)] * (10 if t_value < 3 else 9))
    w = sampler.weights()
    assert_close(w / w.sum(), np.full(4, 0.25), rtol=1e-15)
    _, weights = sampler.sample(50)
    assert torch.equal(weights, torch.ones(50))


def test_loss_second_moment_weights_are_rms_of_last_ten_losses_mixed_with_uniform():
    sampler = warmed_up_sampler()
    w = sampler.weights()
    assert w.dtype == np.float64
    assert_close(w / w.sum(), expected_p(), rtol=1e-12)


def test_loss_second_moment_sample_weights_are_one_over_T_p():
    sampler = warmed_up_sampler()
    t, weights = sampler.sample(400, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64
    assert_close(weights, 1.0 / (4 * expected_p()[t.numpy()]), rtol=1e-6)


def test_loss_second_moment_importance_weighted_loss_is_unbiased():
    """E_{t~p}[L(t) / (T p(t))] = sum_t p(t) L(t) / (T p(t)) = mean_t L(t), computed exactly."""
    sampler = warmed_up_sampler()
    w = sampler.weights()
    p = w / w.sum()
    losses = np.array([0.3, 1.7, 5.0, 0.01])
    estimate = np.sum(p * (1.0 / (4 * p)) * losses)
    assert p.min() > 0
    assert estimate == pytest.approx(losses.mean(), rel=1e-12)


def test_loss_second_moment_state_dict_round_trip_reproduces_weights():
    sampler = warmed_up_sampler()
    restored = registry.create("timestep_sampler", "loss_second_moment", 4)
    restored.load_state_dict(sampler.state_dict())
    assert np.array_equal(restored.weights(), sampler.weights())
    feed(sampler, 1, [7.0])
    feed(restored, 1, [7.0])
    assert np.array_equal(restored.weights(), sampler.weights())


def test_loss_second_moment_state_dict_is_a_snapshot():
    sampler = warmed_up_sampler()
    state = sampler.state_dict()
    before = sampler.weights()
    feed(sampler, 0, [50.0] * 10)
    restored = registry.create("timestep_sampler", "loss_second_moment", 4)
    restored.load_state_dict(state)
    assert np.array_equal(restored.weights(), before)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"history_per_term": 0}, "history_per_term"),
        ({"uniform_prob": 2}, "uniform_prob"),
        ({"uniform_prob": -0.5}, "uniform_prob"),
    ],
)
def test_loss_second_moment_rejects_invalid_options(options, named):
    with pytest.raises(ComponentOptionError, match=named):
        registry.create("timestep_sampler", "loss_second_moment", 10, **options)


def test_from_config_rejects_out_of_range_timestep_sampler_option():
    with pytest.raises(ComponentOptionError, match="uniform_prob"):
        make(timestep_sampler={"name": "loss_second_moment", "uniform_prob": 2.0})


# -- 7. schedule validation --------------------------------------------------------------------------


def test_num_timesteps_1_is_rejected_naming_the_value():
    with pytest.raises(ValueError, match=r"num_timesteps.*\b1\b") as info:
        make(schedule="cosine", num_timesteps=1)
    assert isinstance(info.value, (ConfigError, ComponentOptionError))


def test_schedule_factory_rejects_num_timesteps_1_naming_the_value():
    with pytest.raises(ComponentOptionError, match=r"num_timesteps.*\b1\b"):
        registry.create("schedule", "cosine", 1)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1, float("nan")])
def test_explicit_beta_outside_0_1_is_rejected_naming_its_index(bad):
    betas = [0.1, 0.1, 0.1, bad, 0.1]
    with pytest.raises(ValueError, match=r"betas\[3\]") as info:
        make(schedule=explicit(betas), num_timesteps=5)
    assert isinstance(info.value, (ConfigError, ComponentOptionError))


def test_explicit_beta_of_exactly_1_is_accepted():
    d = make(schedule=explicit([0.1, 0.1, 0.1, 1.0]), num_timesteps=4)
    assert d.alphas_cumprod[-1] == 0.0


def test_linear_schedule_with_20_steps_is_rejected_because_last_beta_reaches_1():
    # 1000 / 20 * 0.02 = 1: the last beta would be 1
    with pytest.raises(ValueError, match="last beta") as info:
        make(schedule="linear", num_timesteps=20)
    assert isinstance(info.value, (ConfigError, ComponentOptionError))


def test_linear_schedule_with_21_steps_is_accepted():
    d = make(schedule="linear", num_timesteps=21)
    assert d.betas[-1] == pytest.approx(1000 / 21 * 0.02)


def test_explicit_schedule_of_wrong_length_is_rejected_naming_both_lengths():
    with pytest.raises(ValueError, match=r"3 betas.*num_timesteps=5") as info:
        make(schedule=explicit([0.1, 0.2, 0.3]), num_timesteps=5)
    assert isinstance(info.value, (ConfigError, ComponentOptionError))


# -- 8. numerics across dtypes -------------------------------------------------------------------------

# Inputs are rounded to the low-precision dtype first and the float32 reference is computed from
# those same rounded values, so only the arithmetic's rounding is measured. bfloat16 keeps 8
# significant bits (unit roundoff 2^-9 ~ 2e-3), float16 11 bits (2^-12 ~ 2.4e-4); a few operations
# in a row give the tolerances below.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
LOW_DTYPES = [torch.bfloat16, torch.float16]


def rounded(dtype, *tensors):
    return [x.to(dtype) for x in tensors]


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_q_sample_in_low_precision_keeps_dtype_and_matches_float32(dtype):
    d = make()
    x0, eps = rounded(dtype, *data(4))
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, t, noise=eps)
    assert x_t.dtype == dtype
    reference = d.q_sample(x0.float(), t, noise=eps.float())
    tol = TOLERANCE[dtype]
    assert_close(x_t.float(), reference, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_p_mean_variance_in_low_precision_matches_float32(dtype):
    d = make()
    x, _ = data(4)
    (x,) = rounded(dtype, x)
    t = torch.tensor([100, 300, 600, 900])
    out = d.p_mean_variance(toy_model, x, t)
    reference = d.p_mean_variance(toy_model, x.float(), t)
    tol = TOLERANCE[dtype]
    # pred_xstart = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps (eq. 4 solved for x0) amplifies the
    # rounding of its two terms by sqrt(1/abar_t) (about 50 at t = 900): the problem's own
    # condition number, which float32 hides and a 16-bit format does not.
    condition = col(np.sqrt(1 / abar_of(d)[t.numpy()])).float()
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        assert out[key].dtype == dtype, key
        assert torch.isfinite(out[key]).all(), key
        scale = float(reference[key].abs().max())
        if key == "pred_xstart":
            assert_close(out[key].float() / condition, reference[key] / condition, rtol=0, atol=tol)
        else:
            assert_close(out[key].float(), reference[key], rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_training_losses_in_low_precision_match_float32(dtype, parameterization):
    d = make(parameterization=parameterization)
    x0, eps = rounded(dtype, *data(6))
    t = torch.tensor([0, 10, 150, 300, 600, 999])
    loss = d.training_losses(toy_model, x0, t, noise=eps)["loss"]
    reference = d.training_losses(toy_model, x0.float(), t, noise=eps.float())["loss"]
    tol = TOLERANCE[dtype]
    assert torch.isfinite(loss).all()
    assert_close(loss.float(), reference, rtol=tol, atol=tol * 1e-3)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_min_snr_training_losses_in_bfloat16_match_float32(parameterization):
    d = make(parameterization=parameterization, loss={"name": "mse", "min_snr_gamma": 5.0})
    x0, eps = rounded(torch.bfloat16, *data(6))
    t = torch.tensor([0, 10, 150, 300, 600, 999])
    loss = d.training_losses(toy_model, x0, t, noise=eps)["loss"]
    reference = d.training_losses(toy_model, x0.float(), t, noise=eps.float())["loss"]
    tol = TOLERANCE[torch.bfloat16]
    assert_close(loss.float(), reference, rtol=tol, atol=tol * 1e-3)


def test_tables_stay_float64_after_low_precision_use():
    d = make()
    x0, eps = rounded(torch.bfloat16, *data(2))
    d.training_losses(toy_model, x0, torch.tensor([3, 700]), noise=eps)
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped"):
        assert getattr(d, name).dtype == np.float64, name
    assert d.tables.on("alphas_cumprod", "cpu").dtype == torch.float64
