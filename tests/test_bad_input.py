"""Bad input, kind by kind: each gets a clear error naming the value and what is accepted; never a
crash deep in torch, never a silent wrong result, never a traceback from the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import diffreg
from diffreg.checkpoint import bundled_checkpoint_path, read_metadata
from diffreg.cli import main
from diffreg.errors import CheckpointError, ComponentOptionError, ConfigError


def zeros_model(x, t, **kwargs):
    return torch.zeros_like(x)


@pytest.fixture(scope="module")
def d():
    return diffreg.Diffusion.from_config({"num_timesteps": 100})


# -- the Python API --------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [[100, 0], [-1, 0]])
def test_timestep_out_of_range_names_the_value(d, t):
    with pytest.raises(ValueError, match=r"timestep -?\d+ is out of range; accepted: 0\.\.99"):
        d.q_sample(torch.randn(2, 1, 2, 2), torch.tensor(t))


def test_integer_data_is_refused(d):
    with pytest.raises(TypeError, match="floating-point tensor"):
        d.q_sample(torch.ones(2, 1, 2, 2, dtype=torch.long), torch.tensor([1, 2]))


def test_infinite_eta_is_refused(d):
    with pytest.raises(ValueError, match="eta must be"):
        d.ddim_sample(zeros_model, torch.randn(2, 1, 2, 2), torch.tensor([1, 0]), eta=math.inf)


@pytest.mark.parametrize("shape", [(2, 2.5), (True, 3), "abc", (0, 1, 2, 2), (1,)])
def test_bad_shapes_are_refused(d, shape):
    with pytest.raises((TypeError, ValueError), match="shape must be"):
        d.sample(zeros_model, shape, steps=2)


@pytest.mark.parametrize("dtype", [torch.int32, "float64"])
def test_non_float_sampling_dtype_is_refused(d, dtype):
    with pytest.raises(TypeError, match=r"floating-point torch\.dtype"):
        d.sample(zeros_model, (1, 1, 2, 2), steps=2, dtype=dtype)


@pytest.mark.parametrize("device", ["tpu", ""])
def test_unknown_device_is_refused(d, device):
    with pytest.raises(ValueError, match="device"):
        d.sample(zeros_model, (1, 1, 2, 2), steps=2, device=device)


def test_step_noise_of_the_wrong_shape_is_refused(d):
    with pytest.raises(ValueError, match=r"step_noise\[0\] has shape \(1,\)"):
        d.sample(zeros_model, (1, 1, 2, 2), sampler="ddpm", steps=3, step_noise=[torch.randn(1)] * 3)


def test_model_returning_a_tuple_is_named(d):
    with pytest.raises(TypeError, match="the model must return a tensor, got tuple"):
        d.sample(lambda x, t, **k: (x,), (1, 1, 2, 2), steps=2)


def test_cond_fn_gradient_of_the_wrong_shape_is_named(d):
    with pytest.raises(ValueError, match="cond_fn must return the gradient"):
        d.sample(zeros_model, (1, 1, 2, 2), steps=2, cond_fn=lambda x, t, **k: torch.zeros(3))


def test_infinite_model_output_is_reported_even_when_clipping_hides_it(d):
    with pytest.raises(diffreg.SamplingError, match="non-finite"):
        d.sample(lambda x, t, **k: torch.full_like(x, math.inf), (1, 1, 2, 2), steps=3)


@pytest.mark.parametrize("generator", [5, "ab"])
def test_bad_generator_is_refused(d, generator):
    with pytest.raises(TypeError, match="generator must be"):
        d.sample(zeros_model, (2, 1, 2, 2), steps=2, generator=generator)


@pytest.mark.parametrize("spec", [[1.5, 3.7], [True, False], 5])
def test_respace_refuses_non_integer_indices(d, spec):
    with pytest.raises(TypeError, match="respace takes"):
        d.respace(spec)


@pytest.mark.parametrize("dtype", [torch.int32, "float16"])
def test_load_checkpoint_refuses_non_float_dtypes(dtype):
    with pytest.raises(TypeError, match=r"floating-point torch\.dtype"):
        diffreg.load_checkpoint(None, dtype=dtype)


def test_save_checkpoint_refuses_a_model_that_does_not_fit_its_config(tmp_path):
    model, _, cfg = diffreg.load_checkpoint()
    wrong = {"diffusion": cfg.diffusion.to_dict(), "model": {**cfg.model.to_dict(), "model_channels": 64}}
    with pytest.raises(ConfigError, match="does not match the configuration"):
        diffreg.save_checkpoint(tmp_path / "m.safetensors", model, wrong)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("options", [{"model_channels": -1}, {"model_channels": 0}, {"num_res_blocks": -1}])
def test_unet_options_are_validated(options):
    with pytest.raises(ComponentOptionError, match=r"must be an integer in 1\.\.[0-9,]+, got -?\d"):
        diffreg.registry.create("model", "unet", **options)


# -- checkpoints whose metadata lies ----------------------------------------------------------------


def _tampered(tmp_path, edit, name="bad.safetensors"):
    meta = read_metadata(bundled_checkpoint_path())
    config = json.loads(meta["diffreg.config"])
    edit(config)
    meta["diffreg.config"] = json.dumps(config)
    path = tmp_path / name
    save_file(load_file(str(bundled_checkpoint_path())), str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.pop("model"), "missing 'model'"),
        (lambda c: c.__setitem__("data", [1, 2]), "data must be a table"),
        (lambda c: c["data"].__setitem__("num_classes", 0), "num_classes must be a positive int"),
        (
            lambda c: c["data"].__setitem__("num_classes", 20),
            "data.num_classes = 20 but the model has num_classes = 10",
        ),
        (lambda c: c["data"].__setitem__("shape", "abc"), "data.shape must be a list of positive ints"),
        (lambda c: c["data"].__setitem__("guidance_scale", "abc"), "guidance_scale must be a number"),
        (lambda c: c["data"].__setitem__("guidance_scale", -2.0), r"guidance_scale -2.0 is out of range; accepted: 0"),
    ],
)
def test_checkpoint_with_inconsistent_metadata_is_refused(tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        diffreg.load_checkpoint(_tampered(tmp_path, edit))


def test_checkpoint_with_integer_weights_is_refused(tmp_path):
    meta = read_metadata(bundled_checkpoint_path())
    tensors = {k: v.to(torch.int32) for k, v in load_file(str(bundled_checkpoint_path())).items()}
    save_file(tensors, str(tmp_path / "int.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="non-floating dtype"):
        diffreg.load_checkpoint(tmp_path / "int.safetensors")


def test_a_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a regular file"):
        diffreg.load_checkpoint(tmp_path)


# -- the command line --------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


SAMPLE = ["sample", "--num-samples", 2, "--steps", 2, "--no-progress"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--option", "noise=1"], "sampler 'ddim' has no option 'noise'"),
        (["--option", "generator=1"], "has no option 'generator'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--guidance-scale", "inf"], "--guidance-scale must be finite"),
        (["--guidance-scale", "nan"], "--guidance-scale must be finite"),
        (["--guidance-scale", "1e308"], "out of range"),
        (["--guidance-scale", "-3"], "--guidance-scale -3.0 is out of range; accepted: 0..10000 (0: unconditional"),
        (["--num-samples", "100000000000"], "more than one run holds in memory"),
        (["--output", "nodir/g.png"], "folder 'nodir' does not exist"),
        (["--output", "."], ""),
        (["--output", "same.x", "--npz", "same.x"], "are the same file"),
        (["--class-label", "1,,2"], "comma list of ints"),
        (["--output", "a" * 300 + ".png"], "too long"),
    ],
)
def test_sample_flags_fail_cleanly(cli, args, message):
    result = cli(*SAMPLE, *args)
    if message:
        assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_sample_with_a_directory_as_output_is_refused(cli, tmp_path):
    (tmp_path / "adir").mkdir()
    result = cli(*SAMPLE, "--output", "adir")
    assert result.exit_code != 0 and "is a directory" in result.output


@pytest.mark.parametrize(
    "toml,message",
    [
        ("steps = 2.5", "steps must be an integer >= 1"),
        ("steps = inf", "steps must be an integer >= 1"),
        ("batch_size = 2.5", "batch_size must be an integer >= 1"),
        ('seed = "abc"', "seed must be an integer"),
        ('bf16 = "yes"', "bf16 must be true or false"),
        ('class_conditional = "no"', "class_conditional must be true or false"),
        ('guidance_scale = "abc"', "guidance_scale must be a number"),
        ("guidance_scale = -1.5", "guidance_scale -1.5 is out of range; accepted: 0..10000"),
        ("weight_decay = -1", "weight_decay must be a finite number >= 0"),
        ("lr = inf", "lr must be a finite number > 0"),
        ('[data]\nname = "digits"\nimage_sise = 8', "data 'digits' has no option 'image_sise'"),
        ('[model]\nname = "unet"\nnum_classes = 3', "num_classes=3 does not match the data"),
    ],
)
def test_bad_training_configuration_fails_before_training(cli, tmp_path, toml, message):
    (tmp_path / "c.toml").write_text(toml + "\n")
    result = cli("train", "--config", "c.toml", "--output", "m.safetensors", "--no-progress")
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "m.safetensors").exists()


def test_npz_with_negative_labels_is_refused(cli, tmp_path):
    np.savez(tmp_path / "d.npz", np.zeros((3, 8, 8, 1), np.uint8), np.array([0, -1, 1]))
    (tmp_path / "c.toml").write_text('steps = 1\n[data]\nname = "npz"\npath = "d.npz"\n')
    result = cli("train", "--config", "c.toml", "--output", "m.safetensors", "--no-progress")
    assert result.exit_code == 1 and "labels must be in 0..9999" in result.output


def test_folder_with_a_broken_image_names_the_file(cli, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_text("not an image")
    (tmp_path / "c.toml").write_text('steps = 1\n[data]\nname = "folder"\npath = "imgs"\n')
    result = cli("train", "--config", "c.toml", "--output", "m.safetensors", "--no-progress")
    assert result.exit_code == 1 and "a.png" in result.output and "not a readable image" in result.output


def test_resume_from_a_state_without_optimizer_is_refused(tmp_path):
    from diffreg.training import TrainConfig, train

    cfg = {
        "steps": 1,
        "batch_size": 4,
        "diffusion": {"num_timesteps": 50, "schedule": "cosine"},
        "model": {
            "name": "unet",
            "model_channels": 8,
            "channel_mult": [1],
            "attention_resolutions": [],
            "num_heads": 1,
        },
    }
    train(TrainConfig.from_dict(cfg), tmp_path / "m.safetensors", progress=False)
    state = tmp_path / "m.state.safetensors"
    tensors = {k: v for k, v in load_file(str(state)).items() if not k.startswith("optim/")}
    save_file(tensors, str(state), metadata=read_metadata(state))
    with pytest.raises(CheckpointError, match="incomplete: no optim/"):
        train(TrainConfig.from_dict({**cfg, "steps": 2}), tmp_path / "m.safetensors", progress=False, resume=True)


def test_checkpoint_whose_sample_shape_does_not_fit_the_model_is_refused(tmp_path):
    path = _tampered(tmp_path, lambda c: c["data"].__setitem__("shape", [1, 16, 16]))
    with pytest.raises(CheckpointError, match=r"data.shape = \[1, 16, 16\] but the model takes \[1, 8, 8\]"):
        diffreg.load_checkpoint(path)


def test_diffreg_debug_shows_the_traceback_of_a_user_error(cli, monkeypatch):
    plain = cli(*SAMPLE, "--sampler", "ddimm")
    assert plain.exit_code == 1 and "unknown sampler 'ddimm'" in plain.output and "Traceback" not in plain.output
    monkeypatch.setenv("DIFFREG_DEBUG", "1")
    with pytest.raises(diffreg.UnknownComponentError, match="ddimm"):
        cli(*SAMPLE, "--sampler", "ddimm")


def test_numpy_numbers_are_numbers_and_ints_beyond_float_range_are_out_of_range():
    from diffreg.validation import check_guidance_scale

    assert check_guidance_scale(np.float32(3)) == 3.0 and check_guidance_scale(np.int64(2)) == 2.0
    with pytest.raises(ValueError, match=r"guidance_scale is out of range \(beyond a float's\), got 1000"):
        check_guidance_scale(10**400)
    with pytest.raises(TypeError, match="must be a number"):
        check_guidance_scale(np.bool_(True))


# -- sequence options, labels and missing labels through the Python API ---------------------------


@pytest.mark.parametrize(
    "value,message",
    [
        ("12", r"channel_mult must be a list of 1\.\.8 integers, each in 1\.\.32 such as \[1, 2, 4\], got '12'"),
        (2, r"channel_mult must be a list .* got 2"),
        ([], r"channel_mult must be a list of 1\.\.8 integers.*; got 0 entries: \[\]"),
        ([1, 2.0], r"channel_mult .*; entry 1 is 2\.0"),
        ([1, True], r"channel_mult .*; entry 1 is True"),
        ([1, 0], r"channel_mult .*; entry 1 is 0"),
        ([1] * 9, r"got 9 entries"),
    ],
)
def test_channel_mult_names_the_value_and_what_is_accepted(value, message):
    with pytest.raises(ComponentOptionError, match=message):
        diffreg.registry.create("model", "unet", channel_mult=value, image_size=256)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"attention_resolutions": "4"}, r"attention_resolutions must be a list of 0\.\.16 integers"),
        ({"num_res_blocks": 10**5}, r"num_res_blocks must be an integer in 1\.\.32, got 100000"),
        ({"dropout": 1.5}, r"dropout must be a number in \[0, 1\), got 1\.5"),
    ],
)
def test_other_unet_options_name_value_and_bound(options, message):
    with pytest.raises(ComponentOptionError, match=message):
        diffreg.registry.create("model", "unet", **options)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"hidden": 10**6}, r"MLPDenoiser option hidden must be an integer in 1\.\.65,536, got 1000000"),
        ({"depth": 10**4}, r"depth must be an integer in 1\.\.256, got 10000"),
        ({"num_classes": 0}, r"num_classes must be an integer in 1\.\.100,000, got 0"),
        ({"out_dim": 0}, r"out_dim must be an integer in 1\.\.131,072, got 0"),
    ],
)
def test_mlp_options_name_value_and_bound(options, message):
    with pytest.raises(ComponentOptionError, match=message):
        diffreg.registry.create("model", "mlp", **options)


@pytest.fixture(scope="module")
def conditional_models():
    return {
        "unet": diffreg.registry.create("model", "unet", model_channels=8, num_heads=1, num_classes=3),
        "mlp": diffreg.registry.create("model", "mlp", hidden=8, depth=1, num_classes=3),
    }


def _inputs(name):
    return (torch.zeros(2, 1, 8, 8) if name == "unet" else torch.zeros(2, 2)), torch.tensor([5, 5])


@pytest.mark.parametrize("name", ["unet", "mlp"])
@pytest.mark.parametrize("label", [4, -1, 1000])
def test_class_labels_out_of_range_name_the_label(conditional_models, name, label):
    # 3 real classes: 0..2, and 3 the null class; torch would raise IndexError inside nn.Embedding
    x, t = _inputs(name)
    with pytest.raises(ValueError, match=rf"class label {label} is out of range; accepted: 0\.\.2 \(and 3, the null"):
        conditional_models[name](x, t, y=torch.tensor([0, label]))


@pytest.mark.parametrize("name", ["unet", "mlp"])
def test_float_or_misshaped_labels_are_named(conditional_models, name):
    x, t = _inputs(name)
    with pytest.raises(TypeError, match=r"class labels y must be an integer tensor.*got a torch\.float32 tensor"):
        conditional_models[name](x, t, y=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"class labels y must have shape \[2\] \(one per sample\), got \(3,\)"):
        conditional_models[name](x, t, y=torch.tensor([0, 1, 2]))


def test_labels_for_an_unconditional_mlp_are_refused():
    model = diffreg.registry.create("model", "mlp", hidden=8, depth=1)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.zeros(2, 2), torch.tensor([1, 1]), y=torch.tensor([0, 1]))


@pytest.mark.parametrize("name", ["unet", "mlp"])
def test_sampling_a_conditional_model_without_labels_warns_once(name):
    model = (
        diffreg.registry.create("model", "unet", model_channels=8, num_heads=1, num_classes=3)
        if name == "unet"
        else diffreg.registry.create("model", "mlp", hidden=8, depth=1, num_classes=3)
    )
    d = diffreg.Diffusion.from_config({"schedule": "cosine", "num_timesteps": 10})
    shape = (2, 1, 8, 8) if name == "unet" else (2, 2)
    expected = r"class-conditional \(num_classes=3\) but was called without class labels"
    with pytest.warns(UserWarning, match=expected) as seen:
        d.sample(model, shape, steps=3, generator=torch.Generator().manual_seed(0))
    assert sum("without class labels" in str(w.message) for w in seen) == 1  # once, not per step


# -- hostile data files ---------------------------------------------------------------------------


def test_a_pickled_npz_is_refused_naming_the_file(cli, tmp_path):
    np.savez(tmp_path / "d.npz", np.array([{"a": 1}, None], dtype=object))
    (tmp_path / "c.toml").write_text('steps = 1\n[data]\nname = "npz"\npath = "d.npz"\n')
    result = cli("train", "--config", "c.toml", "--output", "m.safetensors", "--no-progress")
    assert result.exit_code == 1 and "'d.npz' holds pickled Python objects" in result.output, result.output


def _folder_with(tmp_path, size):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "imgs" / "a.png")
    Image.new("1", size).save(tmp_path / "imgs" / "b.png")  # a few kB on disk, huge decoded
    (tmp_path / "c.toml").write_text('steps = 1\n[data]\nname = "folder"\npath = "imgs"\n')


def test_an_image_above_our_pixel_bound_is_named(cli, tmp_path):
    _folder_with(tmp_path, (9000, 8000))  # 72 megapixels > 64 Mi, below Pillow's own limit
    result = cli("train", "--config", "c.toml", "--output", "m.safetensors", "--no-progress")
    assert result.exit_code == 1, result.output
    assert "b.png' is 9000x8000 = 72,000,000 pixels; image-folder images may have at most 67,108,864" in result.output


@pytest.mark.parametrize("limit", [1000, 30])  # 8 * 8 * 2 > 100: Pillow's error; > 30: its warning
def test_a_decompression_bomb_is_named(cli, tmp_path, monkeypatch, limit):
    from PIL import Image

    _folder_with(tmp_path, (40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # Pillow warns above it, raises above twice it
    result = cli("train", "--config", "c.toml", "--output", "m.safetensors", "--no-progress")
    assert result.exit_code == 1 and "too large to decode safely (a decompression bomb?)" in result.output
    assert "unexpected" not in result.output


def test_a_non_utf8_training_config_is_named(cli, tmp_path):
    (tmp_path / "c.toml").write_bytes(b"steps = 1\n# \xff\n")
    result = cli("train", "--config", "c.toml", "--output", "m.safetensors", "--no-progress")
    assert result.exit_code == 1 and "'c.toml' is not UTF-8 text (byte 0xff at offset 12)" in result.output


def test_a_deeply_nested_setting_is_named(cli):
    result = cli("train", "--set", "lr=" + "[" * 50_000 + "]" * 50_000, "--output", "m.safetensors", "--no-progress")
    assert result.exit_code == 1 and "lr=...: the value is nested too deeply" in result.output, result.output
    result = cli(*SAMPLE, "--option", "eta=" + "[" * 50_000 + "]" * 50_000)
    assert result.exit_code == 1 and "eta=...: the value is nested too deeply" in result.output, result.output


def test_a_deeply_nested_training_config_is_named(cli, tmp_path):
    (tmp_path / "c.toml").write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")
    result = cli("train", "--config", "c.toml", "--output", "m.safetensors", "--no-progress")
    assert result.exit_code == 1 and "nested too deeply" in result.output and "unexpected" not in result.output


# -- sample flags: numbers, memory, clipping --------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range 0<=x<=9223372036854775807"),
        (["--eta", "1e308"], "Invalid value for '--eta': 1e+308 is not in the range 0.0<=x<=1.0"),
        (["--dynamic-threshold", "0"], "Invalid value for '--dynamic-threshold': 0.0 is not in the range 0.0<x<=1.0"),
        (["--dynamic-threshold", "1.5"], "Invalid value for '--dynamic-threshold'"),
    ],
)
def test_out_of_range_sample_numbers_are_named(cli, args, message):
    result = cli(*SAMPLE, *args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_nan_eta_is_named(cli):
    result = cli(*SAMPLE, "--eta", "nan")
    assert result.exit_code == 1 and "eta must be finite, got nan" in result.output, result.output


def test_out_of_memory_says_lower_the_batch_size(cli, monkeypatch):
    def exhausted(*args, **kwargs):  # what torch's CPU allocator raises
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes"
        )

    monkeypatch.setattr(diffreg.Diffusion, "sample", exhausted)
    result = cli(*SAMPLE)
    assert result.exit_code == 1 and "out of memory" in result.output and "lower --batch-size" in result.output
    assert "unexpected" not in result.output


def test_a_moons_model_samples_without_clipping_by_default(cli, tmp_path):
    # the moons reach +-1.5: clipping x_0 to [-1, 1] piles samples on the box's edge (issue 12)
    trained = cli("train", "--set", "data.name=moons", "--set", "model.name=mlp", "--set", "model.hidden=32",
                  "--steps", 30, "--output", "m.safetensors", "--no-progress")  # fmt: skip
    assert trained.exit_code == 0, trained.output
    _, _, cfg = diffreg.load_checkpoint(tmp_path / "m.safetensors")
    assert cfg.sampling.clip is False
    base = ["sample", "m.safetensors", "--num-samples", 200, "--steps", 10, "--no-progress", "--output", ""]
    default = cli(*base, "--npz", "default.npz")
    assert default.exit_code == 0 and "no clipping" in default.output, default.output
    clipped = cli(*base, "--clip", "--npz", "clipped.npz")
    assert clipped.exit_code == 0 and "clip to [-1, 1]" in clipped.output, clipped.output
    x = np.load(tmp_path / "default.npz")["arr_0"]
    x_clipped = np.load(tmp_path / "clipped.npz")["arr_0"]
    # a (barely trained) model that is not clipped leaves the box; the same noise clipped stays in it
    assert np.abs(x).max() > 1.0 and not np.any(np.abs(x) == 1.0)
    assert np.abs(x_clipped).max() <= 1.0 + 1e-6
    assert not np.allclose(x, x_clipped)


def test_an_image_model_records_clipping_and_no_clip_turns_it_off(cli, tmp_path, tiny_checkpoint):
    _, _, cfg = diffreg.load_checkpoint(tiny_checkpoint)
    assert cfg.sampling.clip is True
    result = cli("sample", tiny_checkpoint, "--num-samples", 2, "--steps", 2, "--no-progress", "--no-clip",
                 "--dynamic-threshold", "0.9")  # fmt: skip
    assert result.exit_code == 0 and "no clipping, dynamic threshold 0.9" in result.output, result.output


@pytest.mark.parametrize(
    ("times", "message"),
    [
        ([999.0, 500.0, 0.0, 0.0], r"times\[3\] = 0.0 follows times\[2\] = 0.0"),  # repeated
        ([999.0, 500.0, 700.0], r"times\[2\] = 700.0 follows times\[1\] = 500.0"),  # reversed
        ([999.0, 500.0, 500.000001], r"times\[2\] = 500.000001 follows"),  # equal log-SNR in float64
        ([999.0, 1e-13, 0.0], r"times\[2\] = 0.0 follows times\[1\] = 1e-13"),
        ([1000.0, 3.0], r"times\[0\] = 1000.0 is outside the process's range \[0.0, 999.0\]"),
        ([999.0, -1.0], r"times\[1\] = -1.0 is outside"),
        ([float("nan")], r"times\[0\] = nan is outside"),
        ([], r"times must be a non-empty 1-D sequence of process times, got shape \(0,\)"),
        ([[999.0, 0.0]], r"got shape \(1, 2\)"),
        (["late"], r"times must be a sequence of numbers \(process times\), got \['late'\]"),
    ],
)
def test_sampling_on_bad_times_names_the_offending_level(times, message):
    # every sampler divides by the log-SNR step h = lambda' - lambda: a repeated level was a
    # ZeroDivisionError deep in a solver, a reversed one a silent wrong result
    from diffreg.testing import GaussianMixture

    diffusion = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    model = GaussianMixture.example(2).denoiser(diffusion, "eps")
    for sampler in ("ddim", "unipc"):
        with pytest.raises(ValueError, match=message):
            diffreg.sampling.sample_loop(diffusion, model, (2, 2), sampler=sampler, times=times)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (["a", 0], r"explicit grid times\[0\] must be a number, got 'a'"),
        ([True, False], r"explicit grid times\[0\] must be a number, got True"),
        ([999, None], r"explicit grid times\[1\] must be a number, got None"),
        ({"name": "explicit", "sigmas": [1e10, 1]}, r"sigmas\[0\] = 10000000000.0 is outside the process's VE sigma range \[0.0100005, 157.4"),
        ({"name": "explicit", "sigmas": [80, 1e-9]}, r"sigmas\[1\] = 1e-09 is outside the process's VE sigma range"),
        ({"name": "explicit", "sigmas": [80, 1, 0]}, r"explicit grid sigmas must be > 0 .*got 0.0"),
        ({"name": "explicit", "sigmas": [80, -1]}, r"explicit grid sigmas must be > 0 .*got -1.0"),
        ({"name": "explicit", "sigmas": [float("inf"), 1]}, r"sigmas\[0\] = inf is outside"),  # not zero terminal SNR
        (np.zeros((2, 2)), r"an explicit grid is a 1-D list of process times, got shape \(2, 2\)"),
    ],
)
def test_explicit_grid_entries_are_checked_naming_the_entry(grid, message):
    from diffreg.testing import GaussianMixture

    diffusion = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    model = GaussianMixture.example(2).denoiser(diffusion, "eps")
    with pytest.raises(ValueError, match=message):
        diffusion.sample(model, (2, 2), grid=grid)


def test_explicit_grids_from_tensors_and_near_range_sigmas():
    from diffreg.testing import GaussianMixture

    diffusion = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    model = GaussianMixture.example(2).denoiser(diffusion, "eps")
    for grid in (torch.tensor([999.0, 500.0, 0.0]), np.array([999.0, 500.0, 0.0])):
        stats: dict = {}
        diffusion.sample(model, (2, 2), grid=grid, stats=stats)
        assert [float(t) for t in stats["timesteps"]] == [999.0, 500.0, 0.0]
    # VE sigma at t = 0 is sqrt(beta_0 / (1 - beta_0)) = 0.0100005; 0.01 (rounded) is within 0.1%: t = 0
    stats = {}
    diffusion.sample(model, (2, 2), grid={"name": "explicit", "sigmas": [157.0, 1.0, 0.01]}, stats=stats)
    assert float(stats["timesteps"][-1]) == 0.0
    # zero terminal SNR: sigma = inf is the first level, pure noise
    ztsnr = diffreg.Diffusion.from_config(
        {"schedule": {"name": "linear", "rescale_zero_terminal_snr": True}, "num_timesteps": 1000, "parameterization": "v"}
    )
    stats = {}
    ztsnr.sample(GaussianMixture.example(2).denoiser(ztsnr, "v"), (2, 2), grid={"name": "explicit", "sigmas": [float("inf"), 1.0]}, stats=stats)
    assert float(stats["timesteps"][0]) == 999.0


def test_option_values_inf_are_floats():
    from diffreg.cli_choices import _parse_options

    parsed = _parse_options(("max_ratio=inf", "a=-Infinity", "b=+INF", "c=info", "d=1e3", "e=Infinity"))
    assert parsed == {"max_ratio": math.inf, "a": -math.inf, "b": math.inf, "c": "info", "d": 1000.0, "e": math.inf}
