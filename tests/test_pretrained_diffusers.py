"""diffusers folders load and sample as diffusers' own schedulers do (diffusers: test-only reference).

The reference numbers come from diffusers' ``DDIMScheduler`` / ``DDPMScheduler`` loops and
``DDPMPipeline`` on the same noise. Exactness is checked in float64, where the two libraries agree
to ~1e-13 (float32 runs differ by each library's own rounding, ~1e-5, also checked loosely).
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffreg  # noqa: E402
from diffreg import registry  # noqa: E402
from diffreg.convert.diffusers import export_diffusers  # noqa: E402
from diffreg.errors import CheckpointError, ConfigError  # noqa: E402

SHAPE = (2, 3, 8, 8)


def _unet(**extra):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=extra.pop("out_channels", 3),
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        **extra,
    )


def _save(path, unet, **scheduler):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**scheduler)).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("pipe") / "ddpm", _unet(), num_train_timesteps=1000)


def _noise(seed=1, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _load64(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, diffusion, cfg = diffreg.load_checkpoint(path, dtype=torch.float64)
    return model, diffusion, cfg


def _scheduler64(cls, path, **overrides):
    s = cls.from_pretrained(str(path / "scheduler"), **overrides)
    s.alphas_cumprod = s.alphas_cumprod.double()  # float64 reference: same formulas, no float32 rounding
    if hasattr(s, "final_alpha_cumprod"):
        s.final_alpha_cumprod = s.final_alpha_cumprod.double()
    s.one = torch.tensor(1.0, dtype=torch.float64)
    return s


def _diffusers_ddim(unet, sched, steps, noise, labels=None):
    sched.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(x, t, class_labels=labels).sample[:, : x.shape[1]]  # DDIM uses the mean channels
            # use_clipped_model_output: eps re-derived from the clipped x0, as guided-diffusion and diffreg
            x = sched.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x


@pytest.mark.parametrize("steps", [20, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_equals_diffusers_ddim_scheduler(pipe, steps, spacing):
    model, diffusion, cfg = _load64(pipe)
    sched = _scheduler64(diffusers.DDIMScheduler, pipe, timestep_spacing=spacing)
    expected = _diffusers_ddim(model.unet, sched, steps, _noise())
    got = diffusion.sample(model, SHAPE, sampler="ddim", steps=steps, spacing=spacing, noise=_noise(), dtype=torch.float64)
    assert (got - expected).abs().max() <= 1e-10


def test_ddim_float32_agrees_to_rounding(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, diffusion, _ = diffreg.load_checkpoint(pipe)
    sched = diffusers.DDIMScheduler.from_pretrained(str(pipe / "scheduler"))
    noise = _noise().float()
    expected = _diffusers_ddim(model.unet, sched, 20, noise)
    got = diffusion.sample(model, SHAPE, sampler="ddim", steps=20, spacing="leading", noise=noise)
    assert (got - expected).abs().max() <= 1e-4


def _ddpm_pair(path, steps, spacing="leading", labels=None):
    """diffusers' DDPMScheduler loop (noise from a seeded generator) and diffreg's ddpm on the same noise."""
    model, diffusion, _ = _load64(path)
    sched = _scheduler64(diffusers.DDPMScheduler, path, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    start = x.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model.unet(x, t, class_labels=labels).sample, t, x, generator=g).prev_sample
    g = torch.Generator().manual_seed(3)
    torch.randn(SHAPE, generator=g, dtype=torch.float64)
    # diffusers draws one noise per step with t > 0 (the last step adds none)
    step_noise = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(steps - 1)]
    step_noise.append(torch.zeros(SHAPE, dtype=torch.float64))
    kwargs = {"model_kwargs": {"y": labels}} if labels is not None else {}
    got = diffusion.sample(
        model, SHAPE, sampler="ddpm", steps=steps, spacing=spacing, noise=start, step_noise=step_noise,
        dtype=torch.float64, **kwargs,
    )
    return got, x


def test_ddpm_equals_diffusers_ddpm_scheduler(pipe):
    got, expected = _ddpm_pair(pipe, 25)
    assert (got - expected).abs().max() <= 1e-10


def test_unscaled_linear_betas_at_t_200_full_ddpm_loop(tmp_path):
    # diffusers' "linear" does not scale betas by 1000 / T (guided-diffusion's does)
    path = _save(tmp_path / "p", _unet(), num_train_timesteps=200)
    _, diffusion, _ = _load64(path)
    ref = diffusers.DDPMScheduler.from_pretrained(str(path / "scheduler"))
    # the alpha-bars diffusers' steps use (float32), exactly; the betas to float32 rounding of those
    np.testing.assert_allclose(diffusion.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=1e-15, atol=0)
    np.testing.assert_allclose(diffusion.betas, np.linspace(1e-4, 0.02, 200), rtol=1e-3)  # not 5x these
    got, expected = _ddpm_pair(path, 200)
    assert (got - expected).abs().max() <= 1e-10


def test_learned_range_v_prediction_cosine_class_conditional(tmp_path):
    path = _save(
        tmp_path / "p",
        _unet(out_channels=6, num_class_embeds=10),
        num_train_timesteps=100,
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        prediction_type="v_prediction",
    )
    model, diffusion, cfg = _load64(path)
    assert (cfg.diffusion.parameterization.name, cfg.diffusion.variance.name) == ("v", "learned_range")
    assert cfg.model.name == "diffusers_unet2d" and cfg.model.options["config"]["num_class_embeds"] == 10
    assert cfg.num_classes == 10
    labels = torch.tensor([3, 7])
    # leading: the last step is t = 0 (with trailing, diffusers' last step is at t > 0 and adds noise
    # of variance exp(frac log beta + (1 - frac) log 1e-20); guided-diffusion and diffreg add none)
    got, expected = _ddpm_pair(path, 20, spacing="leading", labels=labels)
    assert (got - expected).abs().max() <= 1e-10
    sched = _scheduler64(diffusers.DDIMScheduler, path, timestep_spacing="trailing")
    expected = _diffusers_ddim(model.unet, sched, 10, _noise(), labels)
    got = diffusion.sample(
        model, SHAPE, sampler="ddim", steps=10, noise=_noise(), dtype=torch.float64, model_kwargs={"y": labels}
    )
    assert (got - expected).abs().max() <= 1e-10


def test_every_registered_sampler_runs_on_a_diffusers_folder(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, diffusion, _ = diffreg.load_checkpoint(pipe)
    for name in registry.names("sampler"):
        x = diffusion.sample(model, SHAPE, sampler=name, steps=4, noise=_noise().float())
        assert x.shape == SHAPE and torch.isfinite(x).all(), name


def test_export_round_trip_ddpm_pipeline_gives_diffregs_samples(pipe, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, diffusion, cfg = diffreg.load_checkpoint(pipe)
    ckpt = diffreg.save_checkpoint(tmp_path / "m.safetensors", model, cfg)
    out = export_diffusers(ckpt, tmp_path / "exported")
    loaded = diffusers.DDPMPipeline.from_pretrained(str(out))
    steps = 10
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        images = loaded(batch_size=2, generator=g, num_inference_steps=steps, output_type="np").images
    g = torch.Generator().manual_seed(5)
    start = torch.randn(SHAPE, generator=g)
    step_noise = [torch.randn(SHAPE, generator=g) for _ in range(steps - 1)] + [torch.zeros(SHAPE)]
    x = diffusion.sample(model, SHAPE, sampler="ddpm", steps=steps, spacing="leading", noise=start, step_noise=step_noise)
    ours = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - images).max() <= 1e-4  # float32 on both sides


def test_export_refuses_an_adm_unet(tmp_path):
    with pytest.raises(ConfigError, match="diffusers has no class for"):
        export_diffusers(diffreg.checkpoint.bundled_checkpoint_path(), tmp_path / "out")


def test_the_model_records_diffusers_and_its_config(pipe):
    _, _, cfg = _load64(pipe)
    config = json.loads((pipe / "unet" / "config.json").read_text())
    assert cfg.model.options["config"]["block_out_channels"] == list(config["block_out_channels"])
    assert cfg.model.options["diffusers_version"] == config["_diffusers_version"]
    assert cfg.data["source"]["library"] == "diffusers"


def test_learned_variance_is_refused_with_the_reason(tmp_path):
    path = _save(tmp_path / "p", _unet(out_channels=6), num_train_timesteps=50, variance_type="learned")
    with pytest.raises(ConfigError, match="log"):
        _load64(path)


def test_diffusers_weights_file_alone_names_its_folder(pipe):
    with pytest.raises(CheckpointError, match="diffusers UNet2DModel weights.*diffreg sample"):
        diffreg.load_checkpoint(pipe / "unet" / "diffusion_pytorch_model.safetensors")


def test_a_plain_folder_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a diffusers pipeline"):
        diffreg.load_checkpoint(tmp_path)


def test_missing_diffusers_says_how_to_install(pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"pip install 'diffreg\[diffusers\]'"):
        diffreg.load_checkpoint(pipe)


def test_cli_samples_a_diffusers_folder(pipe, tmp_path):
    from click.testing import CliRunner

    from diffreg.cli import main

    result = CliRunner().invoke(
        main,
        [
            "sample", str(pipe), "--steps", "3", "--num-samples", "2", "--no-progress",
            "--output", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 8, 8, 3)


def _diffusers_ddim_stock(unet, sched, steps, noise):
    """diffusers' DDIMPipeline loop as shipped: use_clipped_model_output left at its default
    (False): the model's own eps is kept beside the clipped x0."""
    sched.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample[:, : x.shape[1]], t, x, eta=0.0).prev_sample
    return x


def test_ddim_with_the_model_eps_reproduces_the_stock_diffusers_pipeline(pipe):
    model, diffusion, _ = _load64(pipe)
    sched = _scheduler64(diffusers.DDIMScheduler, pipe, timestep_spacing="trailing")
    expected = _diffusers_ddim_stock(model.unet, sched, 20, _noise())
    got = diffusion.sample(
        model, SHAPE, sampler="ddim", steps=20, noise=_noise(), dtype=torch.float64, use_clipped_model_output=False
    )
    assert (got - expected).abs().max() <= 1e-10
    default = diffusion.sample(model, SHAPE, sampler="ddim", steps=20, noise=_noise(), dtype=torch.float64)
    assert (default - expected).abs().max() > 1e-3  # clipping engaged: the two conventions differ here


def test_leading_grid_offset_is_diffusers_steps_offset(pipe):
    model, diffusion, _ = _load64(pipe)
    sched = _scheduler64(diffusers.DDIMScheduler, pipe, timestep_spacing="leading", steps_offset=1)
    sched.set_timesteps(25)
    times = diffusion.grid_times(25, {"name": "leading", "offset": 1})
    assert times.tolist() == sched.timesteps.tolist()
    expected = _diffusers_ddim(model.unet, sched, 25, _noise())
    got = diffusion.sample(
        model, SHAPE, sampler="ddim", steps=25, grid={"name": "leading", "offset": 1}, noise=_noise(), dtype=torch.float64
    )
    # diffusers' last step goes to alpha_cumprod[0] minus the offset: to the clean data here
    # (set_alpha_to_one=True, the default), as diffreg's
    assert (got - expected).abs().max() <= 1e-10


def test_info_describes_a_diffusers_pipeline_as_sample_loads_it(tmp_path):
    from click.testing import CliRunner

    from diffreg.cli import main

    path = _save(tmp_path / "vp", _unet(), num_train_timesteps=200, beta_schedule="squaredcos_cap_v2",
                 prediction_type="v_prediction", clip_sample=False)  # fmt: skip
    result = CliRunner().invoke(main, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    reference = diffusers.UNet2DModel.from_pretrained(str(path / "unet"))
    assert report["parameters"] == sum(p.numel() for p in reference.parameters())
    assert report["layout"] == "diffusers pipeline folder" and report["weights"].endswith(
        "diffusion_pytorch_model.safetensors"
    )
    assert report["written_by"] == f"diffusers {diffusers.__version__}"
    config = report["config"]
    assert config["model"]["name"] == "diffusers_unet2d"
    assert config["diffusion"]["parameterization"] == "v" and config["diffusion"]["num_timesteps"] == 200
    betas = torch.tensor(config["diffusion"]["schedule"]["betas"], dtype=torch.float64)
    reference_abar = diffusers.DDPMScheduler.from_pretrained(str(path / "scheduler")).alphas_cumprod.double()
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), reference_abar, rtol=1e-12, atol=1e-12)
    assert config["data"]["shape"] == [3, 8, 8] and config["sampling"]["clip"] is False
    _, _, loaded = _load64(path)  # what `sample` loads
    assert loaded.diffusion.parameterization.name == "v" and loaded.model.name == "diffusers_unet2d"

    text = CliRunner().invoke(main, ["info", str(path / "unet")])  # a bare UNet folder, in text
    assert text.exit_code == 0, text.output
    assert text.output.startswith(f"{path / 'unet'}: {report['parameters']:,} parameters in ")
    assert "diffusers model folder, written by diffusers" in text.output
    assert "loads as: model diffusers_unet2d, parameterization v, variance fixed_small, schedule explicit, T = 200, " \
        "sample shape [3, 8, 8], unconditional" in text.output
    assert "(200 values)" in text.output  # the betas are shortened in the text report


def test_info_refuses_a_plain_folder_naming_what_is_accepted(tmp_path):
    from click.testing import CliRunner

    from diffreg.cli import main

    (tmp_path / "notes.txt").write_text("x")
    result = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert result.exit_code == 1 and "not a diffusers pipeline (model_index.json) or model" in result.output


def test_info_on_the_weights_file_alone_names_its_folder_as_sample_does(pipe):
    from click.testing import CliRunner

    from diffreg.cli import main

    result = CliRunner().invoke(main, ["info", str(pipe / "unet" / "diffusion_pytorch_model.safetensors")])
    assert result.exit_code == 1 and "diffusers UNet2DModel weights; load the folder that holds it" in result.output


def _save_ddim(path, unet, **scheduler):
    """A pipeline folder whose scheduler is diffusers' DDIMScheduler with ``scheduler`` options."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**scheduler)).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def no_alpha_one(tmp_path_factory):
    return _save_ddim(tmp_path_factory.mktemp("p") / "ddim", _unet(), num_train_timesteps=1000, set_alpha_to_one=False)


def _load_strict(path):
    """load_checkpoint in float64, failing on any warning (none is expected)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return diffreg.load_checkpoint(path, dtype=torch.float64)


@pytest.mark.parametrize(
    "spacing,grid",
    [
        ("trailing", "trailing"),  # last step 19 -> alpha_bar[0]: a real step
        ("leading", "leading"),  # the grid ends at t = 0: diffusers' last step 0 -> alpha_bar[0] keeps x
        # (not linspace: diffusers' DDIM steps to t - T // steps, which is not the next linspace level)
    ],
)
def test_set_alpha_to_one_false_ends_at_alpha_bar_0_as_diffusers(no_alpha_one, spacing, grid):
    model, diffusion, cfg = _load_strict(no_alpha_one)
    assert cfg.sampling.final_level == "t_min"
    sched = _scheduler64(diffusers.DDIMScheduler, no_alpha_one, timestep_spacing=spacing)
    assert float(sched.final_alpha_cumprod) == float(sched.alphas_cumprod[0]) < 1.0
    expected = _diffusers_ddim(model.unet, sched, 20, _noise())
    got = diffusion.sample(
        model, SHAPE, sampler="ddim", steps=20, grid=grid, noise=_noise(), dtype=torch.float64,
        **cfg.sampling.driver_options(),
    )
    assert (got - expected).abs().max() <= 1e-10
    # ... and not what ending at the data gives
    to_data = diffusion.sample(model, SHAPE, sampler="ddim", steps=20, grid=grid, noise=_noise(), dtype=torch.float64)
    assert (to_data - expected).abs().max() > 1e-3


def test_stable_diffusion_style_scheduler_leading_offset_no_alpha_one(tmp_path):
    # Stable Diffusion's DDIM settings: leading spacing, steps_offset=1, set_alpha_to_one=False,
    # scaled_linear betas, no clipping; the model's own eps (diffusers' default) and diffreg's
    # re-derived eps agree without clipping
    path = _save_ddim(
        tmp_path / "sd", _unet(), num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # steps_offset: chosen below as the grid's offset
        model, diffusion, cfg = diffreg.load_checkpoint(path, dtype=torch.float64)
    sched = _scheduler64(diffusers.DDIMScheduler, path)
    expected = _diffusers_ddim_stock(model.unet, sched, 25, _noise())
    got = diffusion.sample(
        model, SHAPE, sampler="ddim", steps=25, grid={"name": "leading", "offset": 1}, noise=_noise(),
        dtype=torch.float64, use_clipped_model_output=False, **cfg.sampling.driver_options(),
    )
    assert (got - expected).abs().max() <= 1e-10


def test_set_alpha_to_one_false_with_the_model_eps_and_clipping(no_alpha_one):
    # diffusers' stock call (the model's eps beside the clipped x0) on trailing spacing: the last
    # step 19 -> alpha_bar[0] keeps eps_model as well
    model, diffusion, cfg = _load_strict(no_alpha_one)
    sched = _scheduler64(diffusers.DDIMScheduler, no_alpha_one, timestep_spacing="trailing")
    expected = _diffusers_ddim_stock(model.unet, sched, 20, _noise())
    got = diffusion.sample(
        model, SHAPE, sampler="ddim", steps=20, grid="trailing", noise=_noise(), dtype=torch.float64,
        use_clipped_model_output=False, **cfg.sampling.driver_options(),
    )
    assert (got - expected).abs().max() <= 1e-10


def test_zero_terminal_snr_ddim_v_prediction_as_diffusers(tmp_path):
    path = _save_ddim(
        tmp_path / "zsnr", _unet(), num_train_timesteps=1000, rescale_betas_zero_snr=True,
        prediction_type="v_prediction", timestep_spacing="trailing",
    )
    model, diffusion, cfg = _load_strict(path)  # nothing differs from diffusers' DDIM: no warning
    sched = _scheduler64(diffusers.DDIMScheduler, path)
    assert float(sched.alphas_cumprod[-1]) == 0.0  # diffusers' DDIM keeps alpha_bar = 0 at t = T-1
    assert diffusion.alphas_cumprod[-1] == 0.0
    np.testing.assert_allclose(diffusion.alphas_cumprod, sched.alphas_cumprod.numpy(), rtol=1e-14, atol=0)
    for steps in (10, 25):
        expected = _diffusers_ddim(model.unet, sched, steps, _noise())
        got = diffusion.sample(model, SHAPE, sampler="ddim", steps=steps, noise=_noise(), dtype=torch.float64)
        assert (got - expected).abs().max() <= 1e-10


@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_zero_terminal_snr_keeps_the_scheduler_classes_own_last_alpha_bar(tmp_path, cls):
    # these classes replace alpha_bar[T-1] = 0 by 2**-24; the recorded schedule is theirs
    scheduler = getattr(diffusers, cls)(
        num_train_timesteps=100, rescale_betas_zero_snr=True, prediction_type="v_prediction"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusers.DDPMPipeline(unet=_unet(), scheduler=scheduler).save_pretrained(str(tmp_path / "p"))
    _, diffusion, _ = _load_strict(tmp_path / "p")
    assert diffusion.alphas_cumprod[-1] == pytest.approx(2.0**-24, rel=1e-12)
    np.testing.assert_allclose(diffusion.alphas_cumprod, scheduler.alphas_cumprod.double().numpy(), rtol=1e-12, atol=0)


def _cli(*args):
    from click.testing import CliRunner

    from diffreg.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_convert_from_diffusers_writes_what_loading_the_folder_gives(no_alpha_one, tmp_path):
    out = tmp_path / "m.safetensors"
    result = _cli("convert", "from-diffusers", no_alpha_one, "--output", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    model, diffusion, cfg = _load_strict(no_alpha_one)
    model2, diffusion2, cfg2 = diffreg.load_checkpoint(out, dtype=torch.float64)
    assert cfg2.sampling.final_level == "t_min" and cfg2.model.name == "diffusers_unet2d"
    # the file samples as diffusers' own DDIM loop on the folder (set_alpha_to_one=False)
    sched = _scheduler64(diffusers.DDIMScheduler, no_alpha_one, timestep_spacing="trailing")
    expected = _diffusers_ddim(model.unet, sched, 10, _noise())
    got = diffusion2.sample(
        model2, SHAPE, sampler="ddim", steps=10, noise=_noise(), dtype=torch.float64, **cfg2.sampling.driver_options()
    )
    assert (got - expected).abs().max() <= 1e-10


def test_cli_convert_from_diffusers_refuses_bad_inputs(no_alpha_one, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    result = _cli("convert", "from-diffusers", tmp_path / "plain", "--output", tmp_path / "m.safetensors")
    assert result.exit_code == 1 and "not a diffusers pipeline" in result.output
    weights = no_alpha_one / "unet" / "diffusion_pytorch_model.safetensors"
    result = _cli("convert", "from-diffusers", weights, "--output", tmp_path / "m.safetensors")
    assert result.exit_code == 1 and "is not a folder" in result.output
    before = weights.read_bytes()
    result = _cli("convert", "from-diffusers", no_alpha_one, "--output", weights)
    assert result.exit_code == 1 and "is the diffusers folder or one of its files" in result.output
    assert weights.read_bytes() == before
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_round_trip_diffreg_to_diffusers_and_back_gives_the_same_samples(no_alpha_one, tmp_path):
    first = tmp_path / "first.safetensors"
    assert _cli("convert", "from-diffusers", no_alpha_one, "--output", first).exit_code == 0
    result = _cli("convert", "diffusers", first, "--output", tmp_path / "exported")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exported" / "model_index.json").is_file()
    back = tmp_path / "back.safetensors"
    result = _cli("convert", "from-diffusers", tmp_path / "exported", "--output", back)
    assert result.exit_code == 0, result.output
    samples = []
    for path in (first, back):
        model, diffusion, cfg = diffreg.load_checkpoint(path, dtype=torch.float64)
        assert cfg.sampling.final_level == "t_min"  # kept as set_alpha_to_one: false in the folder
        for sampler in ("ddim", "ddpm"):
            samples.append(
                diffusion.sample(
                    model, SHAPE, sampler=sampler, steps=8, noise=_noise(), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2), **cfg.sampling.driver_options(),
                )
            )
    for a, b in zip(samples[:2], samples[2:]):
        # diffusers rebuilds the betas in float32 from trained_betas: alpha-bars to ~1e-7 relative
        assert (a - b).abs().max() <= 1e-5
