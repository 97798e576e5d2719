"""OpenAI checkpoints: converted with their README flags, they equal OpenAI's own model and loops.

The reference is guided-diffusion-sdk (OpenAI's ``guided_diffusion`` modules; test-only): its
``script_util`` builds the model and diffusion from the same flags, and its ``ddim_sample_loop`` /
``p_sample_loop`` run on the same noise.
"""

from __future__ import annotations

import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    script_util = pytest.importorskip("guided_diffusion.script_util")

import diffreg
from diffreg.checkpoint import save_checkpoint
from diffreg.convert.openai import config_from_flags, convert_openai
from diffreg.errors import CheckpointError, ConfigError

SHAPE = (2, 3, 8, 8)
BASE = (
    "--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 8,4 "
    "--class_cond True --learn_sigma True --resblock_updown True --num_head_channels 16 --use_scale_shift_norm True"
)


def _openai(flags: str):
    """OpenAI's model and diffusion from ``flags`` (script_util's own argument handling)."""
    args = script_util.model_and_diffusion_defaults()
    values = dict(zip(flags.split()[::2], flags.split()[1::2]))
    for key, text in values.items():
        name = key[2:]
        default = args[name]
        args[name] = script_util.str2bool(text) if isinstance(default, bool) else type(default)(text)
    torch.manual_seed(0)
    model, diffusion = script_util.create_model_and_diffusion(**args)
    with torch.no_grad():  # OpenAI zero-initializes output convolutions: give every weight a value
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval(), diffusion


def _convert(tmp_path, flags, **kwargs):
    model, diffusion = _openai(flags)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out, _ = convert_openai(tmp_path / "model.pt", flags, tmp_path / "model.safetensors", **kwargs)
    ours, our_diffusion, cfg = diffreg.load_checkpoint(out)
    return (model, diffusion), (ours, our_diffusion, cfg)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(SHAPE, generator=g), torch.tensor([3, 999])


@pytest.mark.parametrize("new_order", [False, True])
def test_converted_model_equals_openais(tmp_path, new_order):
    flags = BASE + f" --use_new_attention_order {new_order} --diffusion_steps 100"
    (theirs, _), (ours, _, cfg) = _convert(tmp_path, flags)
    assert set(ours.state_dict()) == set(theirs.state_dict())  # key for key
    assert cfg.model.options["use_new_attention_order"] is new_order
    x, y = _inputs()
    t = torch.tensor([5, 80])
    with torch.no_grad():
        assert (ours(x, t, y) - theirs(x, t, y)).abs().max() <= 1e-5


def test_num_heads_upsample_and_strided_resampling(tmp_path):
    flags = (
        "--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 4 "
        "--num_heads 4 --num_heads_upsample 2 --use_scale_shift_norm False --diffusion_steps 50"
    )
    (theirs, _), (ours, _, _) = _convert(tmp_path, flags)
    x, _ = _inputs()
    with torch.no_grad():
        assert (ours(x, torch.tensor([0, 49])) - theirs(x, torch.tensor([0, 49]))).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "extra",
    [
        "--diffusion_steps 100 --rescale_timesteps False --noise_schedule linear",
        "--diffusion_steps 100 --rescale_timesteps True --noise_schedule cosine",
        "--diffusion_steps 1000 --rescale_timesteps True --noise_schedule linear --timestep_respacing 10",
    ],
)
def test_ddim_and_ddpm_loops_equal_openais(tmp_path, extra):
    flags = BASE + " " + extra.replace(" --timestep_respacing 10", "")
    (theirs, _), (ours, diffusion, cfg) = _convert(tmp_path, flags)
    assert cfg.diffusion.rescale_timesteps == ("rescale_timesteps True" in extra)
    steps = int(extra.split("--diffusion_steps ")[1].split()[0])
    respacing = "10"  # ten evenly spaced steps (space_timesteps' section counts), on both sides
    _, reference = _openai(flags + f" --timestep_respacing {respacing}")
    spaced = diffusion.respace(respacing)
    assert list(spaced.timestep_map) == list(reference.timestep_map)
    noise, _ = _inputs()
    y = {"y": torch.tensor([1, 7])}
    with torch.no_grad():
        # OpenAI's model and loop in float32: equal up to float32 rounding (its GroupNorm32 and
        # _extract_into_tensor compute in float32, so it cannot run in float64)
        expected = reference.ddim_sample_loop(theirs, SHAPE, noise=noise, model_kwargs=y)
        got = spaced.ddim_sample_loop(ours, SHAPE, noise=noise, model_kwargs=y)
        assert (got - expected).abs().max() <= 1e-4
        # the loops' maths in float64 with one network (the converted one, equal to OpenAI's above):
        # OpenAI's loop calls it through its own timestep map and rescaling
        ours64, noise64 = ours.double(), noise.double()
        expected = reference.ddim_sample_loop(ours64, SHAPE, noise=noise64, model_kwargs=y)
        got = spaced.ddim_sample_loop(ours64, SHAPE, noise=noise64, model_kwargs=y, dtype=torch.float64)
        assert (got - expected).abs().max() <= 1e-5
        torch.manual_seed(7)  # OpenAI's p_sample draws randn_like(x) at every step
        expected = reference.p_sample_loop(ours64, SHAPE, noise=noise64, model_kwargs=y)
        torch.manual_seed(7)
        step_noise = [torch.randn(SHAPE, dtype=torch.float64) for _ in range(spaced.num_timesteps)]
        got = spaced.p_sample_loop(
            ours64, SHAPE, noise=noise64, step_noise=step_noise, model_kwargs=y, dtype=torch.float64
        )
        assert (got - expected).abs().max() <= 1e-5
    assert steps == cfg.diffusion.num_timesteps


def test_without_rescaling_an_improved_diffusion_model_samples_differently(tmp_path):
    # the silent failure of issue 14: the same weights with rescale_timesteps off differ
    flags = BASE + " --diffusion_steps 100 --rescale_timesteps True"
    _, (ours, diffusion, cfg) = _convert(tmp_path, flags)
    import attrs

    plain = diffreg.Diffusion.from_config(attrs.evolve(cfg.diffusion, rescale_timesteps=False))
    noise, _ = _inputs()
    y = torch.tensor([1, 7])
    a = diffusion.respace("ddim5").ddim_sample_loop(ours, SHAPE, noise=noise, model_kwargs={"y": y})
    b = plain.respace("ddim5").ddim_sample_loop(ours, SHAPE, noise=noise, model_kwargs={"y": y})
    assert (a - b).abs().max() > 1e-2


def test_model_timesteps_are_rescaled_floats():
    d = diffreg.Diffusion.from_config({"num_timesteps": 4000, "schedule": "cosine", "rescale_timesteps": True})
    t = d.model_timesteps(torch.tensor([0, 1, 3999]))
    assert t.dtype == torch.float32
    assert t.tolist() == pytest.approx([0.0, 0.25, 999.75])  # t * 1000 / T
    spaced = d.respace([0, 2000, 3999])
    assert spaced.model_timesteps(torch.tensor([1, 2])).tolist() == pytest.approx([500.0, 999.75])


def test_rescale_timesteps_round_trips_through_json_and_toml():
    cfg = diffreg.DiffusionConfig(rescale_timesteps=True)
    assert diffreg.DiffusionConfig.from_json(cfg.to_json()).rescale_timesteps is True
    assert diffreg.DiffusionConfig.from_toml(cfg.to_toml()).rescale_timesteps is True
    assert diffreg.DiffusionConfig().rescale_timesteps is False
    with pytest.raises(ConfigError, match="rescale_timesteps must be true or false"):
        diffreg.DiffusionConfig(rescale_timesteps="yes")


def test_flags_map_as_script_util_does():
    cfg, notes = config_from_flags(
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 "
        "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
        "--resblock_updown True --use_fp16 True --use_scale_shift_norm True --timestep_respacing 250"
    )
    m, d = cfg["model"], cfg["diffusion"]
    assert m["channel_mult"] == [1, 1, 2, 2, 4, 4]  # script_util's default at 256
    assert (m["out_channels"], m["num_classes"], m["null_class_embedding"]) == (6, 1000, False)
    assert (m["num_head_channels"], m["use_new_attention_order"]) == (64, False)
    assert (d["variance"], d["schedule"], d["rescale_timesteps"], d["loss"]) == ("learned_range", "linear", False, "mse")
    assert any("timestep_respacing" in n for n in notes) and any("use_fp16" in n for n in notes)


def test_improved_diffusion_defaults():
    cfg, _ = config_from_flags(
        "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
        "--diffusion_steps 4000 --noise_schedule cosine"
    )  # improved-diffusion's CIFAR-10 flags: only improved-diffusion has a 32-pixel layout
    assert cfg["model"]["channel_mult"] == [1, 2, 2, 2]
    assert cfg["diffusion"]["rescale_timesteps"] is True and cfg["diffusion"]["loss"] == "rescaled_mse"


def test_ambiguous_flags_ask_for_the_source():
    flags = "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True"
    with pytest.raises(ConfigError, match="--source"):
        config_from_flags(flags)
    assert config_from_flags(flags, source="improved-diffusion")[0]["diffusion"]["rescale_timesteps"] is True
    assert config_from_flags(flags, source="guided-diffusion")[0]["diffusion"]["rescale_timesteps"] is False


def test_unknown_flag_is_named_with_the_closest():
    with pytest.raises(ConfigError, match="--num_chanels.*did you mean --num_channels"):
        config_from_flags("--num_chanels 64 --num_head_channels 32")


def test_weights_that_do_not_fit_the_flags_name_the_flag(tmp_path):
    model, _ = _openai(BASE + " --diffusion_steps 100")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    wrong = BASE.replace("--class_cond True", "--class_cond False") + " --diffusion_steps 100"
    with pytest.raises(CheckpointError, match="label_emb.weight.*--class_cond"):
        convert_openai(tmp_path / "m.pt", wrong, tmp_path / "o.safetensors")


def test_openai_weights_given_to_load_checkpoint_name_the_convert_command(tmp_path):
    from safetensors.torch import save_file

    model, _ = _openai(BASE + " --diffusion_steps 100")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="OpenAI improved-/guided-diffusion.*diffreg convert openai"):
        diffreg.load_checkpoint(tmp_path / "m.safetensors")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="never unpickles.*diffreg convert openai"):
        diffreg.load_checkpoint(tmp_path / "m.pt")


def test_pt_files_are_read_with_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert_openai(tmp_path / "evil.pt", BASE, tmp_path / "o.safetensors")


def test_cli_convert_openai(tmp_path):
    from click.testing import CliRunner

    from diffreg.cli import main

    model, _ = _openai(BASE + " --diffusion_steps 100")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    result = CliRunner().invoke(
        main,
        ["convert", "openai", str(tmp_path / "m.pt"), "--flags", BASE + " --diffusion_steps 100",
         "--output", str(tmp_path / "m.safetensors")],
    )
    assert result.exit_code == 0, result.output
    _, _, cfg = diffreg.load_checkpoint(tmp_path / "m.safetensors")
    assert cfg.diffusion.num_timesteps == 100 and cfg.model.options["resblock_updown"] is True


def test_checkpoints_with_diffreg_0_1_unet_names_still_load(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, _, cfg = diffreg.load_checkpoint()
    path = save_checkpoint(tmp_path / "new.safetensors", model, cfg)
    with safe_open(str(path), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    def old_name(key: str) -> str:  # the names diffreg 0.1 wrote (hand-listed)
        key = key.replace(".out_layers.0.", ".out_norm.").replace(".out_layers.3.", ".out_layers.2.")
        key = key.replace(".skip_connection.", ".skip.")
        return key.replace("input_blocks.2.0.op.", "input_blocks.2.0.conv.")

    save_file({old_name(k): v for k, v in state.items()}, str(tmp_path / "old.safetensors"), metadata=meta)
    old, _, _ = diffreg.load_checkpoint(tmp_path / "old.safetensors")
    for (k, a), (_, b) in zip(sorted(old.state_dict().items()), sorted(model.state_dict().items())):
        assert torch.equal(a, b), k
