"""The sampling driver and the built-in samplers: reproducibility, guidance, errors, and landing on
the data distribution with an exact denoiser."""

from __future__ import annotations

import threading

import pytest
import torch

import diffreg
from diffreg.errors import ComponentOptionError, SamplingError, UnknownComponentError
from diffreg.sampling import per_sample_generators
from diffreg.testing import ExactDenoiser, GaussianMixture


def make(T=100, variance="fixed_small", parameterization="eps", schedule="linear"):
    return diffreg.Diffusion.from_config(
        {
            "schedule": {"name": schedule},
            "num_timesteps": T,
            "variance": variance,
            "parameterization": parameterization,
        }
    )


def toy_model(x, t, **kwargs):
    return 0.3 * torch.tanh(x) + 1e-3 * t.float().reshape(-1, *([1] * (x.ndim - 1)))


def test_ddim_eta1_step_equals_ddpm_step_with_same_noise():
    # Song et al. 2021, eq. 16: with eta = 1, sigma_t^2 is the DDPM posterior variance and the
    # DDIM mean equals the posterior mean (Ho et al. 2020, eq. 7) -> identical steps.
    d = make(T=200)
    x = torch.randn(4, 1, 4, 4)
    t = torch.tensor([150, 80, 10, 1])
    z = torch.randn_like(x)
    a = d.p_sample(toy_model, x, t, clip_denoised=False, noise=z)["sample"]
    b = d.ddim_sample(toy_model, x, t, clip_denoised=False, eta=1.0, noise=z)["sample"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ddim_eta0_draws_no_random_numbers():
    d = make()
    state = torch.random.get_rng_state()
    d.sample(toy_model, (2, 1, 4, 4), steps=10, noise=torch.zeros(2, 1, 4, 4))
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("sampler,opts", [("ddpm", {}), ("ddim", {"eta": 0.5})])
def test_seeded_runs_repeat_exactly(sampler, opts):
    d = make()
    runs = [
        d.sample(toy_model, (3, 1, 4, 4), sampler=sampler, steps=20, generator=torch.Generator().manual_seed(7), **opts)
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_per_sample_generators_make_samples_independent_of_batch_size():
    d = make()
    full = d.sample(toy_model, (6, 1, 4, 4), sampler="ddpm", steps=10, generator=per_sample_generators(3, 6))
    part = d.sample(toy_model, (2, 1, 4, 4), sampler="ddpm", steps=10, generator=per_sample_generators(3, 2, start=4))
    torch.testing.assert_close(full[4:], part, rtol=0, atol=1e-6)


def test_explicit_step_noise_reproduces_ddpm_loop():
    d = make(T=50)
    steps = 10
    x_T = torch.randn(2, 1, 4, 4)
    step_noise = torch.randn(steps, 2, 1, 4, 4)
    a = d.sample(toy_model, x_T.shape, sampler="ddpm", steps=steps, noise=x_T, step_noise=step_noise)
    # the same chain, written out with single steps on the respaced process
    r = d.respace(diffreg.schedule.spaced_timesteps(50, steps, "trailing"))
    x = x_T
    for i, k in enumerate(reversed(range(r.num_timesteps))):
        x = r.p_sample(toy_model, x, torch.full((2,), k), noise=step_noise[i])["sample"]
    torch.testing.assert_close(a, x)


def test_model_receives_original_timesteps_in_descending_order():
    d = make(T=1000)
    seen = []
    d.sample(lambda x, t, **k: seen.append(int(t[0])) or torch.zeros_like(x), (1, 1, 2, 2), steps=4, spacing="trailing")
    assert seen == [999, 749, 499, 249]


def test_callback_gets_step_timestep_sample_and_prediction():
    d = make()
    got = []
    out = d.sample(toy_model, (2, 1, 4, 4), steps=5, callback=lambda i, t, x, x0: got.append((i, t, x.shape, x0.shape)))
    assert [g[0] for g in got] == list(range(5))
    assert [g[1] for g in got] == sorted((g[1] for g in got), reverse=True)
    assert got[-1][2] == out.shape


def test_guidance_scale_one_equals_conditional_model():
    d = make()

    def model(x, t, y=None):
        return toy_model(x, t) + 0.1 * y.float().reshape(-1, 1, 1, 1)

    model.null_class = 10
    y = torch.tensor([1, 2])
    noise = torch.randn(2, 1, 4, 4)
    guided = d.sample(model, (2, 1, 4, 4), steps=8, noise=noise, model_kwargs={"y": y}, guidance_scale=1.0)
    plain = d.sample(model, (2, 1, 4, 4), steps=8, noise=noise, model_kwargs={"y": y})
    assert torch.equal(guided, plain)


def test_classifier_free_guidance_extrapolates_from_the_null_class():
    # Ho & Salimans 2022, eq. 6: eps = eps(x, null) + w (eps(x, y) - eps(x, null)), one batched pass
    d = make()
    calls = []

    def model(x, t, y=None):
        calls.append(x.shape[0])
        return toy_model(x, t) + 0.05 * y.float().reshape(-1, 1, 1, 1)

    model.null_class = 10
    y = torch.tensor([1, 3])
    x = torch.randn(2, 1, 4, 4)
    w = 3.0
    got = d.sample(model, x.shape, steps=1, noise=x, model_kwargs={"y": y}, guidance_scale=w, clip_denoised=False)
    assert calls == [4]
    r = d.respace(diffreg.schedule.spaced_timesteps(100, 1, "trailing"))

    def manual(x, t, **kwargs):
        cond, uncond = model(x, t, y=y), model(x, t, y=torch.full_like(y, 10))
        return uncond + w * (cond - uncond)

    want = r.ddim_sample(manual, x, torch.zeros(2, dtype=torch.long), clip_denoised=False)["sample"]
    torch.testing.assert_close(got, want)


def test_classifier_guidance_shifts_ddpm_mean_by_variance_times_gradient():
    # Dhariwal & Nichol 2021, Algorithm 1: mu + Sigma grad log p(y | x_t)
    d = make()
    x = torch.randn(2, 1, 4, 4)
    t = torch.tensor([50, 20])
    z = torch.zeros_like(x)
    g = torch.full_like(x, 0.5)
    base = d.p_sample(toy_model, x, t, noise=z)["sample"]
    guided = d.p_sample(toy_model, x, t, noise=z, cond_fn=lambda x, t, **k: g)["sample"]
    variance = torch.tensor(d.posterior_variance, dtype=torch.float32)[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(guided - base, variance * g)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_exact_denoiser_lands_on_the_data_distribution(sampler):
    d = make(T=1000, schedule="cosine")
    model = ExactDenoiser(GaussianMixture([1.0], [[0.5]], [0.3]), d)  # data N(0.5, 0.3^2)
    x = d.sample(
        model,
        (4000, 1, 1, 1),
        sampler=sampler,
        steps=100,
        generator=torch.Generator().manual_seed(0),
        clip_denoised=False,
    )
    assert abs(x.mean().item() - 0.5) < 0.02
    assert abs(x.std().item() - 0.3) < 0.02


def test_ddim_inversion_round_trip_error_shrinks_at_first_order():
    # DDIM is a first-order ODE solver (Song et al. 2021, section 4.3): inverting and resampling
    # with an exact denoiser returns x0 with an error ~ 1 / steps.
    base = make(T=1000, schedule="cosine")
    model = ExactDenoiser(GaussianMixture([1.0], [[0.5]], [0.3]), base)
    x0 = 0.5 + 0.3 * torch.randn(16, 1, 1, 1)
    errors = []
    for steps in (50, 200):
        d = base.respace(f"ddim{steps}")
        x_T = d.ddim_reverse_sample_loop(model, x0, clip_denoised=False)
        back = d.ddim_sample_loop(model, x0.shape, noise=x_T, clip_denoised=False)
        errors.append((back - x0).abs().max().item())
    assert errors[1] < 0.02
    assert 3.0 < errors[0] / errors[1] < 5.0  # 4x the steps, 4x less error


def test_bfloat16_model_keeps_float32_state():
    d = make()
    net = torch.nn.Conv2d(1, 1, 1)
    noise = torch.randn(2, 1, 4, 4)
    ref = d.sample(lambda x, t, **k: net(x), (2, 1, 4, 4), noise=noise, steps=5)
    half = torch.nn.Conv2d(1, 1, 1).to(torch.bfloat16)
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in net.state_dict().items()})
    # a module model: inputs are cast to its dtype, outputs back to float32
    out2 = d.sample(_ModuleModel(half), (2, 1, 4, 4), noise=noise, steps=5)
    assert out2.dtype == torch.float32
    torch.testing.assert_close(out2, ref, atol=5e-2, rtol=0)


class _ModuleModel(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, **kwargs):
        return self.net(x)


def test_two_loops_in_threads_do_not_interfere():
    d = make()
    noise = torch.randn(2, 1, 4, 4)
    want = d.sample(toy_model, noise.shape, sampler="ddim", steps=10, noise=noise, eta=0.0)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(d.sample(toy_model, noise.shape, steps=10, noise=noise)))
        for _ in range(2)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(r, want) for r in results)


@pytest.mark.parametrize("steps", [0, 101, -1])
def test_steps_outside_range_is_a_clear_error(steps):
    with pytest.raises(ValueError, match=r"steps must be in \[1, 100\]"):
        make().sample(toy_model, (1, 1, 2, 2), steps=steps)


def test_unknown_sampler_suggests_the_closest_name():
    with pytest.raises(UnknownComponentError, match="did you mean 'ddim'"):
        make().sample(toy_model, (1, 1, 2, 2), sampler="ddimm")


def test_unknown_sampler_option_is_a_clear_error():
    with pytest.raises(ComponentOptionError, match="sampler 'ddpm' has no option 'eta'"):
        make().sample(toy_model, (1, 1, 2, 2), sampler="ddpm", eta=0.5)


def test_wrong_output_channels_names_the_expected_count():
    d = make(variance="learned_range")
    with pytest.raises(ValueError, match="expected 2 channels"):
        d.sample(toy_model, (1, 1, 2, 2), steps=2)


def test_nonfinite_model_output_names_the_step():
    d = make()

    def model(x, t, **kwargs):
        out = toy_model(x, t)
        return out * float("nan") if int(t[0]) < 30 else out

    with pytest.raises(SamplingError, match=r"non-finite \(NaN or inf\) at step 7 of 10 \(timestep 29"):
        d.sample(model, (1, 1, 2, 2), steps=10, clip_denoised=False)


def test_noise_of_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="noise has shape"):
        make().sample(toy_model, (2, 1, 2, 2), noise=torch.zeros(3, 1, 2, 2))


def test_negative_eta_is_rejected():
    with pytest.raises(ComponentOptionError, match="eta must be"):
        make().sample(toy_model, (1, 1, 2, 2), eta=-1.0)


def test_dynamic_thresholding_bounds_pred_xstart():
    d = make()
    seen = []
    d.sample(
        lambda x, t, **k: -10 * x,
        (2, 1, 4, 4),
        steps=5,
        clip_denoised=False,
        dynamic_threshold=0.9,
        callback=lambda i, t, x, x0: seen.append(x0.abs().max().item()),
    )
    assert max(seen) <= 1.0 + 1e-6


# -- DDIM's scaled-state step and buffer reuse -----------------------------------------------------

IDENTITY = lambda x0: x0  # noqa: E731  (a denoised_fn sends DDIM down the general path)


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", None)])
def test_scaled_state_step_equals_the_general_step(variance, clip, sampler, eta):
    # the fast path (x / sqrt(abar), four fused kernels) and the textbook update
    # x_{t-1} = k_xstart x0 + k_x x_t + std z (taken whenever a denoised_fn is given) are the
    # same algebra; DDPM takes it with the posterior variance (fixed_small) only
    d = make(T=200, variance=variance)
    c = 2 if variance == "learned_range" else 1

    def model(x, t, **kwargs):
        eps = 1.5 * torch.tanh(x) + 1e-3 * t.float().reshape(-1, 1, 1, 1)
        return torch.cat([eps, torch.zeros_like(eps)], 1) if c == 2 else eps

    shape = (3, 1, 4, 4)
    x_T = torch.randn(shape)
    step_noise = torch.randn(20, *shape) if eta != 0.0 else None
    opts = dict(steps=20, noise=x_T, sampler=sampler, clip_denoised=clip, step_noise=step_noise)
    if eta is not None:
        opts["eta"] = eta
    fast = d.sample(model, shape, **opts)
    general = d.sample(model, shape, denoised_fn=IDENTITY, **opts)
    torch.testing.assert_close(fast, general, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("sampler,options", [("ddim", {}), ("ddim", {"eta": 0.5}), ("ddpm", {})])
def test_sample_loop_equals_the_progressive_loop_and_keeps_every_intermediate(sampler, options):
    # sample_loop carries x / sqrt(abar) from step to step in reused scratch tensors; the
    # progressive loop recomputes it from each yielded state (which its caller may change): the
    # same numbers to float rounding
    d = make(T=100).respace("ddim10")
    x_T = torch.randn(4, 1, 4, 4)
    x_T_before = x_T.clone()
    kept, copies = [], []
    gen = torch.Generator().manual_seed(5)
    for step in diffreg.sampling.sample_loop_progressive(
        d, toy_model, x_T.shape, sampler=sampler, noise=x_T, generator=gen, **options
    ):
        kept.append(step["sample"])
        copies.append(step["sample"].clone())
    gen = torch.Generator().manual_seed(5)
    final = diffreg.sampling.sample_loop(d, toy_model, x_T.shape, sampler=sampler, noise=x_T, generator=gen, **options)
    torch.testing.assert_close(final, kept[-1], rtol=1e-5, atol=1e-6)
    assert torch.equal(x_T, x_T_before)  # the caller's noise is never written
    for a, b in zip(kept, copies, strict=True):  # yielded states are never overwritten later
        assert torch.equal(a, b)
    assert len({s.data_ptr() for s in kept}) == len(kept)


def test_results_of_consecutive_calls_never_share_memory():
    d = make(T=100)
    x_T = torch.randn(2, 1, 4, 4)
    first = d.sample(toy_model, x_T.shape, steps=10, noise=x_T)
    saved = first.clone()
    second = d.sample(toy_model, x_T.shape, steps=10, noise=2 * x_T)
    assert torch.equal(first, saved) and first.data_ptr() != second.data_ptr()


@pytest.mark.parametrize("denoised_fn", [None, IDENTITY])
def test_changing_a_yielded_sample_in_place_steers_the_next_step_on_both_paths(denoised_fn):
    # as in guided-diffusion's loops, the next step starts from the yielded tensor as it is then
    d = make(T=100).respace("ddim10")
    x_T = torch.randn(2, 1, 4, 4)

    def run(edit):
        for step in d.ddim_sample_loop_progressive(toy_model, x_T.shape, noise=x_T, denoised_fn=denoised_fn):
            if edit and step["i"] == 3:
                step["sample"].mul_(0.5)
            final = step["sample"]
        return final

    edited, plain = run(True), run(False)
    assert not torch.allclose(edited, plain)
    # the same edit made by hand between two halves of the loop gives the same result
    half = [s["sample"].clone() for s in d.ddim_sample_loop_progressive(toy_model, x_T.shape, noise=x_T)][3]
    torch.testing.assert_close(edited, _continue_from(d, half * 0.5, first_step=4), rtol=1e-5, atol=1e-5)


def _continue_from(d, x, first_step):
    """DDIM steps first_step.. of d (every timestep) from x, with guided-diffusion's single-step API."""
    for k in range(d.num_timesteps - 1 - first_step, -1, -1):
        x = d.ddim_sample(toy_model, x, torch.full((x.shape[0],), k))["sample"]
    return x


def test_inf_from_an_eps_model_is_reported_at_its_step_even_when_clipping_would_hide_it():
    d = make()

    def model(x, t, **kwargs):
        out = toy_model(x, t)
        return out + float("inf") if int(t[0]) < 30 else out

    with pytest.raises(SamplingError, match=r"non-finite \(NaN or inf\) at step 7 of 10 \(timestep 29"):
        d.sample(model, (1, 1, 2, 2), steps=10, clip_denoised=True)


def test_sampling_under_inference_mode_equals_no_grad():
    d = make()
    x_T = torch.randn(2, 1, 4, 4)
    expected = d.sample(toy_model, x_T.shape, steps=10, noise=x_T)
    with torch.inference_mode():
        got = d.sample(toy_model, x_T.shape, steps=10, noise=x_T.clone())
        progressive = [s["sample"] for s in d.ddim_sample_loop_progressive(toy_model, x_T.shape, noise=x_T.clone())]
    assert torch.equal(got, expected)
    assert progressive[-1].shape == x_T.shape


@pytest.mark.parametrize("w", [-0.5, float("nan"), 1e5])
def test_guidance_scale_outside_0_to_10000_is_refused_naming_the_range(w):
    with pytest.raises(ValueError, match=r"guidance_scale .* accepted: 0\.\.10000|guidance_scale must be finite"):
        make().sample(toy_model, (1, 1, 2, 2), steps=2, guidance_scale=w, uncond_model_kwargs={})


def test_progressive_loop_can_stop_early_and_be_closed():
    run = make().ddim_sample_loop_progressive(toy_model, (1, 1, 2, 2), noise=torch.zeros(1, 1, 2, 2))
    first = next(run)
    run.close()
    assert first["i"] == 0
    with pytest.raises(StopIteration):
        next(run)


# -- what the scratch tensors and the scaled state must never change (found by an adversarial pass)


def test_a_call_under_inference_mode_does_not_break_the_next_call():
    d = make()
    model = lambda x, t, **k: 0.1 * x  # noqa: E731
    for sampler in ("ddim", "ddpm"):
        with torch.inference_mode():
            d.sample(model, (2, 3, 4, 4), sampler=sampler, steps=5)
        assert torch.isfinite(d.sample(model, (2, 3, 4, 4), sampler=sampler, steps=5)).all()


@pytest.mark.parametrize("view", ["transpose", "expand", "identity"])
def test_a_model_returning_a_view_of_its_input_gives_the_progressive_result(view):
    d = make()
    make_view = {
        "transpose": lambda x: x.transpose(-1, -2),
        "expand": lambda x: x[:, :1].expand_as(x),
        "identity": lambda x: x,
    }[view]
    model = lambda x, t, **k: make_view(x)  # noqa: E731
    x_T = torch.randn(2, 3, 4, 4)
    final = d.sample(model, x_T.shape, steps=10, noise=x_T)
    progressive = [s["sample"] for s in d.ddim_sample_loop_progressive(model, x_T.shape, noise=x_T)]
    reference = d.respace([k for k in range(100)]).ddim_sample_loop(model, x_T.shape, noise=x_T, denoised_fn=IDENTITY)
    torch.testing.assert_close(progressive[-1], reference, rtol=1e-5, atol=1e-5)
    general = d.sample(model, x_T.shape, steps=10, noise=x_T, denoised_fn=IDENTITY)
    torch.testing.assert_close(final, general, rtol=1e-5, atol=1e-5)


def test_a_model_that_keeps_its_inputs_sees_each_one_unchanged():
    # e.g. a cache that compares each input with the previous one: inputs are never recycled
    d = make()
    seen, copies = [], []

    def model(x, t, **kwargs):
        seen.append(x)
        copies.append(x.clone())
        return 0.3 * torch.tanh(x)

    for sampler in ("ddim", "ddpm"):
        seen.clear(), copies.clear()
        d.sample(model, (2, 1, 4, 4), sampler=sampler, steps=6, generator=torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(seen, copies, strict=True))
        assert len({a.data_ptr() for a in seen}) == len(seen)


def test_two_noise_draws_in_one_step_are_independent_in_sample_loop():
    class TwoDraws(diffreg.Sampler):
        stochastic = True

        def step(self, ctx, state, i, x):
            x0 = ctx.denoise(x, i).pred_xstart
            z1, z2 = ctx.noise(i, x), ctx.noise(i, x)
            return 0.9 * x + 0.1 * x0 + 0.01 * (z1 - z2), x0

    d = make().respace("ddim10")
    runs = []
    for progressive in (True, False):
        gen = torch.Generator().manual_seed(1)
        opts = dict(sampler=TwoDraws(), noise=torch.zeros(2, 1, 4, 4), generator=gen)
        if progressive:
            runs.append(list(diffreg.sampling.sample_loop_progressive(d, toy_model, (2, 1, 4, 4), **opts))[-1]["sample"])
        else:
            runs.append(diffreg.sampling.sample_loop(d, toy_model, (2, 1, 4, 4), **opts))
    assert torch.equal(runs[0], runs[1]) and runs[0].abs().sum() > 0


@pytest.mark.parametrize("edit", ["fill_", "data", "numpy"])
def test_a_callback_editing_the_state_steers_the_next_step_however_it_writes(edit):
    d = make()
    write = {
        "fill_": lambda x: x.fill_(0.5),
        "data": lambda x: x.data.fill_(0.5),
        "numpy": lambda x: x.numpy().fill(0.5),
    }[edit]

    def callback(i, t, x, pred_xstart):
        if i == 3:
            write(x)

    x_T = torch.randn(2, 1, 4, 4)
    got = d.sample(toy_model, x_T.shape, steps=10, noise=x_T, callback=callback)
    expected = d.sample(toy_model, x_T.shape, steps=10, noise=x_T, callback=callback, denoised_fn=IDENTITY)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, d.sample(toy_model, x_T.shape, steps=10, noise=x_T), atol=1e-3)


def test_float16_state_with_the_cosine_schedule_stays_finite():
    # x / sqrt(abar) would reach ~1e4 |x| at t = T, beyond float16: such states take the general path
    d = make(T=1000, schedule="cosine")
    model = lambda x, t, **k: 0.1 * x  # noqa: E731
    x_T = torch.randn(2, 3, 8, 8)
    x = d.sample(model, x_T.shape, steps=50, dtype=torch.float16, noise=x_T)
    general = d.sample(model, x_T.shape, steps=50, dtype=torch.float16, noise=x_T, denoised_fn=IDENTITY)
    assert x.dtype == torch.float16 and torch.isfinite(x).all() and torch.equal(x, general)


def test_nan_in_unused_variance_channels_is_still_reported_by_ddim():
    d = make(variance="learned_range")

    def model(x, t, **kwargs):
        return torch.cat([toy_model(x, t), torch.full_like(x, float("nan"))], 1)

    with pytest.raises(SamplingError, match="at step 0 of 5"):
        d.sample(model, (1, 1, 2, 2), steps=5)


def test_absurdly_large_model_output_is_reported_as_such_not_clipped_away():
    # eps = 1e35 clips to a finite sample; the record (a sum) overflows and says so
    d = make(T=1000, schedule="cosine")
    with pytest.raises(SamplingError, match=r"at step 0 of 5 .*values so large, beyond ~1e38 / their count"):
        d.sample(lambda x, t, **k: torch.full_like(x, 1e35), (2, 3, 32, 32), steps=5)
    assert torch.isfinite(d.sample(lambda x, t, **k: torch.full_like(x, 1e30), (2, 3, 32, 32), steps=5)).all()


def test_a_run_cannot_be_iterated_after_run():
    run = diffreg.sampling.sample_loop_progressive(make(), toy_model, (1, 1, 2, 2), noise=torch.zeros(1, 1, 2, 2))
    run.run()
    with pytest.raises(RuntimeError, match="already run"):
        next(run)


def test_eta_takes_numpy_numbers_and_refuses_what_is_not_a_finite_number_from_zero_up():
    import numpy as np

    d = make()
    fixed = dict(noise=torch.ones(1, 1, 2, 2), step_noise=torch.ones(5, 1, 1, 2, 2))
    a = d.sample(toy_model, (1, 1, 2, 2), steps=5, eta=np.float32(0.5), **fixed)
    b = d.sample(toy_model, (1, 1, 2, 2), steps=5, eta=0.5, **fixed)
    assert torch.equal(a, b)
    for eta, message in ((10**400, "beyond a float's"), (-1, "must be >= 0"), (float("nan"), "must be finite")):
        with pytest.raises(ComponentOptionError, match=message):
            d.sample(toy_model, (1, 1, 2, 2), steps=5, eta=eta)
        with pytest.raises(ValueError, match=message):
            d.ddim_sample(toy_model, torch.zeros(1, 1, 2, 2), torch.tensor([5]), eta=eta)
