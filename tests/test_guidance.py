"""Guidance methods (kind ``guidance``): each equals its paper's formula on hand-computed inputs,
w = 1 is the conditional model where that holds, CFG++ with DDIM is the paper's Algorithm 1 on
the exact denoiser, every method composes with every registered sampler, interval guidance makes
one plain pass outside its interval, and bad options get clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffreg
from diffreg import registry
from diffreg.errors import UnknownComponentError
from diffreg.parameterization import Prediction
from diffreg.process import NoiseLevel
from diffreg.sampling.guidance import GuidanceCall, resolve_guidance
from diffreg.testing import ClassConditionalMixture, GaussianMixture


def diffusion(T=1000, **config):
    return diffreg.Diffusion.from_config({"num_timesteps": T, **config})


def pred(x0, eps, level):
    return Prediction(torch.tensor([x0], dtype=torch.float64), torch.tensor([eps], dtype=torch.float64), 0.0,
                      alpha=level.alpha, sigma=level.sigma)


def combine(name, cond, uncond, x, level, w, levels=None, call=None, **options):
    g = registry.create("guidance", name, **options)
    call = call or GuidanceCall(w, levels)
    x0, eps = g.combine(cond, uncond, torch.tensor([x], dtype=torch.float64), level, call)
    return x0, (eps() if callable(eps) else eps)


LEVEL = NoiseLevel(0.0, 0.6, 0.8)  # alpha, sigma: x = 0.6 x0 + 0.8 eps


# -- each method is its paper's formula on hand-computed inputs ------------------------------------


def test_cfg_is_ho_and_salimans_eq6():
    # x0 = u + w (c - u) = [0, 1] + 3 ([1, 2] - [0, 1]) = [3, 4]; eps alike
    x0, eps = combine("cfg", pred([1.0, 2.0], [0.5, 0.0], LEVEL), pred([0.0, 1.0], [0.0, 0.5], LEVEL), [0.0, 0.0], LEVEL, 3.0)
    torch.testing.assert_close(x0, torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(eps, torch.tensor([[1.5, -1.0]], dtype=torch.float64))


def test_cfg_rescale_in_x0_space_by_hand():
    # c = [1, 3] (unbiased std sqrt 2), u = 0, w = 2: g = [2, 6] (std 2 sqrt 2): factor 1/2;
    # phi = 0.7: 0.7 * 0.5 + 0.3 = 0.65 -> [1.3, 3.9] (Lin et al. 2024, eqs. 15-16)
    x = [1.0, 2.0]
    x0, eps = combine("cfg_rescale", pred([1.0, 3.0], [0, 0], LEVEL), pred([0.0, 0.0], [0, 0], LEVEL), x, LEVEL, 2.0,
                      phi=0.7, space="x0")
    torch.testing.assert_close(x0, torch.tensor([[1.3, 3.9]], dtype=torch.float64))
    torch.testing.assert_close(eps, (torch.tensor([x], dtype=torch.float64) - 0.6 * x0) / 0.8)


def test_cfg_rescale_in_v_space_is_algorithm_2_on_v():
    # the paper's Algorithm 2 on v = alpha eps - sigma x0, written out with numpy
    c0, ce, u0, ue = [0.2, -0.4, 0.9], [1.0, 0.3, -0.5], [0.1, 0.1, 0.0], [0.7, -0.2, 0.4]
    x = np.array([0.3, -0.1, 0.5])
    a, s, w, phi = 0.6, 0.8, 4.0, 0.7
    vc, vu = a * np.array(ce) - s * np.array(c0), a * np.array(ue) - s * np.array(u0)
    g = vu + w * (vc - vu)
    v = phi * g * vc.std(ddof=1) / g.std(ddof=1) + (1 - phi) * g
    x0_want, eps_want = a * x - s * v, s * x + a * v  # alpha^2 + sigma^2 = 1
    level = NoiseLevel(0.0, a, s)
    x0, eps = combine("cfg_rescale", pred(c0, ce, level), pred(u0, ue, level), x.tolist(), level, w, phi=phi)
    np.testing.assert_allclose(x0[0].numpy(), x0_want, rtol=1e-12)
    np.testing.assert_allclose(eps[0].numpy(), eps_want, rtol=1e-12)


def test_apg_by_hand_with_momentum_norm_threshold_and_eta():
    # Sadat et al. 2024, Algorithm 1. c = [3, 4] (unit [0.6, 0.8]), u = [3, 0]: diff = [0, 4],
    # parallel = 3.2 [0.6, 0.8] = [1.92, 2.56], orthogonal = [-1.92, 1.44]; w = 2, eta = 0:
    # x0 = c + orthogonal = [1.08, 5.44]. Second call (momentum -0.5): diff = [0, 4] - 0.5 [0, 4]
    # = [0, 2]: x0 = c + [-0.96, 0.72] = [2.04, 4.72].
    c, u = pred([3.0, 4.0], [0, 0], LEVEL), pred([3.0, 0.0], [0, 0], LEVEL)
    call = GuidanceCall(2.0, None)
    g = registry.create("guidance", "apg", momentum=-0.5)
    x = torch.zeros(1, 2, dtype=torch.float64)
    torch.testing.assert_close(g.combine(c, u, x, LEVEL, call)[0], torch.tensor([[1.08, 5.44]], dtype=torch.float64))
    torch.testing.assert_close(g.combine(c, u, x, LEVEL, call)[0], torch.tensor([[2.04, 4.72]], dtype=torch.float64))
    # norm threshold 1: diff [0, 4] -> [0, 1]: orthogonal [-0.48, 0.36] -> [2.52, 4.36]
    x0, _ = combine("apg", c, u, [0, 0], LEVEL, 2.0, momentum=0.0, norm_threshold=1.0)
    torch.testing.assert_close(x0, torch.tensor([[2.52, 4.36]], dtype=torch.float64))
    # eta = 1, no momentum, no threshold: plain CFG, c + (w - 1) diff = [3, 8]
    x0, _ = combine("apg", c, u, [0, 0], LEVEL, 2.0, momentum=0.0, eta=1.0)
    torch.testing.assert_close(x0, torch.tensor([[3.0, 8.0]], dtype=torch.float64))


def test_apg_state_lives_in_the_call_not_the_plugin():
    c, u = pred([3.0, 4.0], [0, 0], LEVEL), pred([3.0, 0.0], [0, 0], LEVEL)
    g = registry.create("guidance", "apg", momentum=-0.5)
    x = torch.zeros(1, 2, dtype=torch.float64)
    first = g.combine(c, u, x, LEVEL, GuidanceCall(2.0, None))[0]
    again = g.combine(c, u, x, LEVEL, GuidanceCall(2.0, None))[0]  # a new call starts afresh
    torch.testing.assert_close(first, again)


def test_cfg_zero_star_by_hand():
    # Fan et al. 2025, eqs. 8-10 on the rectified-flow velocity v = eps - x0. v_c = [1, 0],
    # v_u = [1, 1]: s* = 1/2; w = 3: v = 0.5 [1, 1] + 3 ([1, 0] - 0.5 [1, 1]) = [2, -1].
    # x = [1.4, 0] at alpha 0.6, sigma 0.8: x_rf = x / 1.4 = [1, 0], t = 4/7:
    # x0 = x_rf - t v = [-1/7, 4/7], eps = x_rf + (1 - t) v = [13/7, -3/7].
    levels = diffreg.sampling.Levels(np.array([1.0, 0.5, 0.0]), np.array([0.2, 0.6, 1.0]), np.array([0.98, 0.8, 0.0]))
    c, u = pred([0.0, 0.0], [1.0, 0.0], LEVEL), pred([0.0, 0.0], [1.0, 1.0], LEVEL)
    x0, eps = combine("cfg_zero_star", c, u, [1.4, 0.0], LEVEL, 3.0, levels=levels, zero_init_steps=0)
    torch.testing.assert_close(x0, torch.tensor([[-1 / 7, 4 / 7]], dtype=torch.float64))
    torch.testing.assert_close(eps, torch.tensor([[13 / 7, -3 / 7]], dtype=torch.float64))
    # zero-init of the first grid level (log-SNR <= the first level's): v = 0, x0 = eps = x_rf
    first = NoiseLevel(1.0, 0.2, 0.98)
    x0, eps = combine("cfg_zero_star", c, u, [1.18, 0.0], first, 3.0, levels=levels, zero_init_steps=1)
    torch.testing.assert_close(x0, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(eps, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    # ... but not the second level
    x0, _ = combine("cfg_zero_star", c, u, [1.4, 0.0], LEVEL, 3.0, levels=levels, zero_init_steps=1)
    torch.testing.assert_close(x0, torch.tensor([[-1 / 7, 4 / 7]], dtype=torch.float64))


@pytest.mark.parametrize("sigma_ve,inside", [(0.5, False), (0.50001, True), (2.0, True), (2.00001, False)])
def test_interval_is_half_open_in_ve_sigma(sigma_ve, inside):
    g = registry.create("guidance", "interval", sigma_low=0.5, sigma_high=2.0)
    alpha = 1 / math.sqrt(1 + sigma_ve**2)
    assert g.active(NoiseLevel(0.0, alpha, sigma_ve * alpha), None) is inside


@pytest.mark.parametrize(
    "name,options",
    [("cfg", {}), ("cfg_rescale", {}), ("cfg_rescale", {"space": "eps"}), ("cfg_rescale", {"space": "x0"}),
     ("interval", {}), ("apg", {}), ("apg", {"eta": 0.5, "norm_threshold": 0.3}), ("cfg_zero_star", {"zero_init_steps": 0})],
)
def test_scale_one_combines_to_the_conditional_prediction(name, options):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    x0c, x0u = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    c = Prediction(x0c, (x - 0.6 * x0c) / 0.8, 0.0, alpha=0.6, sigma=0.8)
    u = Prediction(x0u, (x - 0.6 * x0u) / 0.8, 0.0, alpha=0.6, sigma=0.8)
    g = registry.create("guidance", name, **options)
    assert g.identity_at_one
    x0, eps = g.combine(c, u, x, LEVEL, GuidanceCall(1.0, None))
    torch.testing.assert_close(x0, x0c)
    torch.testing.assert_close(eps() if callable(eps) else eps, c.pred_eps)


# -- in sampling ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exact():
    mixture = ClassConditionalMixture.example()
    d = diffusion()
    return mixture, d, mixture.denoiser(d)


def run(d, model, y, *, steps=8, seed=0, **options):
    options.setdefault("clip_denoised", False)
    return d.sample(model, (y.shape[0], 2), steps=steps, model_kwargs={"y": y}, noise=torch.randn(y.shape[0], 2, generator=torch.Generator().manual_seed(seed)),
                    generator=torch.Generator().manual_seed(seed + 1), **options)


def test_cfg_by_name_gives_todays_numbers(exact):
    # the lerp of the raw outputs (eps) written out as a model: the same samples
    _, d, model = exact
    y = torch.tensor([0, 1, 2, 1])

    def manual(x, t, **kwargs):
        return torch.lerp(model(x, t, y=torch.full_like(y, 3)), model(x, t, y=y), 2.5)

    want = run(d, manual, y)
    torch.testing.assert_close(run(d, model, y, guidance="cfg", guidance_scale=2.5), want)
    torch.testing.assert_close(run(d, model, y, guidance_scale=2.5), want)  # cfg is the default


@pytest.mark.parametrize("name", ["cfg", "cfg_rescale", "interval", "apg", "cfg_zero_star", "autoguidance"])
def test_scale_one_samples_the_conditional_model(exact, name):
    mixture, d, model = exact
    y = torch.tensor([0, 1, 2, 2])
    options = {"zero_init_steps": 0} if name == "cfg_zero_star" else {}
    if name == "autoguidance":
        options = {"guide": GaussianMixture.example().denoiser(d)}
    calls = []

    def counted(x, t, **kwargs):
        calls.append(x.shape[0])
        return model(x, t, **kwargs)

    got = run(d, counted, y, guidance=name, guidance_scale=1.0, guidance_options=options)
    assert calls == [4] * 8  # no unconditional pass at all
    torch.testing.assert_close(got, run(d, model, y))


def test_cfgpp_with_ddim_is_the_papers_algorithm_1(exact):
    # Chung et al. 2024, Algorithm 1 (DDIM), written out on the exact denoiser:
    #   eps_l = eps_u + lambda (eps_c - eps_u); x0 = (x - sqrt(1 - abar) eps_l) / sqrt(abar);
    #   x' = sqrt(abar') x0 + sqrt(1 - abar') eps_u
    _, d, model = exact
    y = torch.tensor([0, 1, 2, 0, 1])
    lam, steps = 0.6, 10
    got = run(d, model, y, steps=steps, guidance="cfgpp", guidance_scale=lam)
    times = [int(t) for t in d.grid_times(steps)]
    abar = d.tables.alphas_cumprod
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    for k, t in enumerate(times):
        tt = torch.full((5,), t)
        eps_c, eps_u = model(x, tt, y=y), model(x, tt, y=torch.full_like(y, 3))
        eps_l = eps_u + lam * (eps_c - eps_u)
        x0 = (x - math.sqrt(1 - abar[t]) * eps_l) / math.sqrt(abar[t])
        a_next = abar[times[k + 1]] if k + 1 < steps else 1.0
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps_u
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    # and it is not plain CFG at the same scale
    assert not torch.allclose(got, run(d, model, y, steps=steps, guidance="cfg", guidance_scale=lam), atol=1e-3)


def test_cfgpp_first_order_samplers_agree(exact):
    # Euler and DDIM(eta=0) are one update; DDPM is DDIM(eta=1): the same under CFG++ too
    _, d, model = exact
    y = torch.tensor([0, 1, 2])
    opts = {"guidance": "cfgpp", "guidance_scale": 0.7}
    torch.testing.assert_close(run(d, model, y, sampler="euler", **opts), run(d, model, y, sampler="ddim", **opts), rtol=1e-5, atol=1e-5)
    noise = torch.randn(8, 3, 2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        run(d, model, y, sampler="ddpm", step_noise=noise, **opts),
        run(d, model, y, sampler="ddim", eta=1.0, step_noise=noise, **opts), rtol=1e-5, atol=1e-5,
    )


def all_samplers():
    return registry.names("sampler")


@pytest.mark.parametrize("sampler", all_samplers())
def test_every_guidance_composes_with_every_sampler(exact, sampler):
    mixture, d, model = exact
    y = torch.tensor([0, 1, 2])
    # cfg through the guidance door equals the sampler run on the lerped model (independent path)
    def manual(x, t, **kwargs):
        return torch.lerp(model(x, t, y=torch.full_like(y, 3)), model(x, t, y=y), 3.0)

    torch.testing.assert_close(run(d, model, y, sampler=sampler, guidance="cfg", guidance_scale=3.0),
                               run(d, manual, y, sampler=sampler), rtol=1e-5, atol=1e-5)
    for name in registry.names("guidance"):
        options = {"guide": GaussianMixture.example().denoiser(d)} if name == "autoguidance" else {}
        w = 0.5 if name == "cfgpp" else 3.0
        if name == "cfgpp" and not getattr(registry.get("sampler", sampler).factory, "supports_unconditional_renoise", False):
            with pytest.raises(ValueError, match="does not support"):
                run(d, model, y, sampler=sampler, guidance=name, guidance_scale=w)
            continue
        out = run(d, model, y, sampler=sampler, guidance=name, guidance_scale=w, guidance_options=options)
        assert out.shape == (3, 2) and bool(torch.isfinite(out).all()), (name, sampler)


def test_autoguidance_is_karras_eq2(exact):
    # D = D_guide + w (D_main - D_guide), the guide given the same condition: one DDIM step by hand
    mixture, d, model = exact
    guide = GaussianMixture.example().denoiser(d)
    y = torch.tensor([0, 2])

    def manual(x, t, **kwargs):
        return torch.lerp(guide(x, t), model(x, t, y=y), 2.0)

    got = run(d, model, y, guidance="autoguidance", guidance_scale=2.0, guidance_options={"guide": guide})
    torch.testing.assert_close(got, run(d, manual, y), rtol=1e-5, atol=1e-5)


def test_interval_makes_one_plain_pass_outside_the_interval(exact):
    _, d, model = exact
    y = torch.tensor([0, 1, 2])
    steps, lo, hi = 10, 0.3, 3.0
    batches = []

    def counted(x, t, **kwargs):
        batches.append(x.shape[0])
        return model(x, t, **kwargs)

    counted.null_class = 3

    run(d, counted, y, steps=steps, guidance="interval", guidance_scale=4.0,
        guidance_options={"sigma_low": lo, "sigma_high": hi})
    abar = d.tables.alphas_cumprod[[int(t) for t in d.grid_times(steps)]]
    ve = np.sqrt((1 - abar) / abar)
    want = [6 if lo < s <= hi else 3 for s in ve]
    assert batches == want and 3 in want and 6 in want


def test_guidance_config_dict_and_options_are_one_api():
    a = resolve_guidance({"name": "cfg_rescale", "phi": 0.5})
    b = resolve_guidance("cfg_rescale", {"phi": 0.5})
    assert (a.phi, a.space) == (b.phi, b.space) == (0.5, "v")


# -- bad options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("interval", {"sigma_low": -1.0}, "sigma_low must be >= 0"),
        ("interval", {"sigma_low": 2.0, "sigma_high": 1.0}, r"interval \(sigma_low, sigma_high\] = \(2.0, 1.0\] is empty"),
        ("interval", {"sigma_high": float("nan")}, "sigma_high must be finite"),
        ("cfg_rescale", {"phi": 1.5}, r"phi must be in \[0, 1\]"),
        ("cfg_rescale", {"space": "logits"}, "unknown space 'logits' for cfg_rescale; accepted: v, eps, x0"),
        ("apg", {"momentum": 1.0}, r"momentum must be in \(-1, 1\)"),
        ("apg", {"norm_threshold": -2}, "norm_threshold must be >= 0"),
        ("cfg_zero_star", {"zero_init_steps": -1}, "zero_init_steps must be an int >= 0"),
        ("autoguidance", {}, "autoguidance needs guide="),
    ],
)
def test_bad_options_are_named(name, options, match):
    with pytest.raises(ValueError, match=match):
        registry.create("guidance", name, **options)


def test_bad_calls_are_named(exact):
    _, d, model = exact
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"guidance_scale 3.0 is out of range for cfgpp\(\); accepted: 0..1"):
        run(d, model, y, guidance="cfgpp", guidance_scale=3.0)
    with pytest.raises(ValueError, match="needs guidance_scale="):
        run(d, model, y, guidance="apg")
    with pytest.raises(ValueError, match=r"guidance_scale -1.0 is out of range .* accepted: 0..10000"):
        run(d, model, y, guidance="cfg_rescale", guidance_scale=-1.0)
    with pytest.raises(TypeError, match="guidance_options .* without guidance="):
        run(d, model, y, guidance_options={"phi": 0.3})
    with pytest.raises(TypeError, match=r"given both in guidance= and guidance_options="):
        run(d, model, y, guidance={"name": "cfg_rescale", "phi": 0.3}, guidance_scale=2, guidance_options={"phi": 0.3})
    with pytest.raises(UnknownComponentError):
        run(d, model, y, guidance="cgf", guidance_scale=2)


def test_a_guide_model_of_another_shape_is_refused(exact, tmp_path):
    _, d, model = exact
    y = torch.tensor([0, 1])
    # by checkpoint: a 3-D guide for 2-D samples
    cfg = {"diffusion": {"num_timesteps": 1000}, "model": {"name": "mlp", "dim": 3, "hidden": 8, "depth": 1},
           "data": {"shape": [3]}}
    path = tmp_path / "guide.safetensors"
    diffreg.save_checkpoint(path, registry.create("model", "mlp", dim=3, hidden=8, depth=1), cfg)
    with pytest.raises(ValueError, match=r"guide model .*guide.safetensors' makes samples of shape \(3,\), the sampled model \(2,\)"):
        run(d, model, y, guidance="autoguidance", guidance_scale=2.0, guidance_options={"guide": str(path)})
    # by model: an output of another shape
    with pytest.raises(ValueError, match="guide model .* gave an output of another shape"):
        run(d, model, y, guidance="autoguidance", guidance_scale=2.0,
            guidance_options={"guide": lambda x, t, **k: torch.zeros(x.shape[0], 5)})


def test_a_guide_checkpoint_of_the_same_shape_guides(exact, tmp_path):
    _, d, model = exact
    y = torch.tensor([0, 1])
    options = {"dim": 2, "hidden": 8, "depth": 1, "num_classes": 3}  # conditional, as Karras et al.'s guides
    cfg = {"diffusion": {"num_timesteps": 1000}, "model": {"name": "mlp", **options}, "data": {"shape": [2], "num_classes": 3}}
    path = tmp_path / "guide.safetensors"
    guide = registry.create("model", "mlp", **options)
    diffreg.save_checkpoint(path, guide, cfg)

    def manual(x, t, **kwargs):
        with torch.no_grad():
            return torch.lerp(guide(x, t, y=y), model(x, t, y=y), 2.0)

    got = run(d, model, y, guidance="autoguidance", guidance_scale=2.0, guidance_options={"guide": str(path)})
    torch.testing.assert_close(got, run(d, manual, y), rtol=1e-5, atol=1e-5)


# -- configuration and command line ---------------------------------------------------------------


def test_a_default_guidance_travels_with_a_checkpoint(tmp_path):
    from diffreg.config import CheckpointConfig

    cfg = CheckpointConfig(diffusion={"num_timesteps": 10}, model={"name": "mlp"},
                           sampling={"guidance": {"name": "cfg_rescale", "phi": 0.5}})
    back = CheckpointConfig.from_json(cfg.to_json())
    assert back.sampling.guidance_spec() == {"name": "cfg_rescale", "phi": 0.5}
    assert "guidance" not in CheckpointConfig(diffusion={"num_timesteps": 10}, model={"name": "mlp"}).to_dict()["sampling"]


def test_cli_sample_with_guidance_flags(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from diffreg.cli import main

    args = ["sample", str(tiny_checkpoint), "--steps", "3", "--num-samples", "4", "--no-progress",
            "--output", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz"), "--guidance-scale", "3"]
    result = CliRunner().invoke(main, [*args, "--guidance", "cfg_rescale", "--guidance-option", "phi=0.5"])
    assert result.exit_code == 0, result.output
    assert "guidance cfg_rescale(phi=0.5, space='v') 3" in result.output
    result = CliRunner().invoke(main, [*args, "--guidance", "interval", "--guidance-option", "sigma_low=-1"])
    assert result.exit_code != 0 and "sigma_low must be >= 0" in result.output
    result = CliRunner().invoke(main, [*args, "--guidance-option", "phi=0.5"])
    assert result.exit_code != 0 and "--guidance-option phi=0.5 given without --guidance NAME" in result.output
