"""Checkpoints: one safetensors file that carries its configuration; every bad file gets a clear
error; writes are atomic."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_unet_checkpoint_config
from safetensors import safe_open
from safetensors.torch import save_file

import diffreg
from diffreg import registry
from diffreg.checkpoint import bundled_checkpoint_path, read_metadata
from diffreg.config import CheckpointConfig
from diffreg.errors import CheckpointError


def _model(cfg):
    return registry.create("model", cfg.model.name, **cfg.model.options)


def test_round_trip_keeps_weights_bitwise_and_config_equal(tmp_path):
    cfg = tiny_unet_checkpoint_config()
    model = _model(cfg)
    path = diffreg.save_checkpoint(tmp_path / "m.safetensors", model, cfg)
    loaded, diffusion, loaded_cfg = diffreg.load_checkpoint(path)
    assert loaded_cfg == cfg
    assert loaded_cfg.to_dict() == cfg.to_dict()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert diffusion.num_timesteps == cfg.diffusion.num_timesteps
    assert diffusion.parameterization.variance_type.name == "learned_range"
    assert not loaded.training


def test_metadata_records_config_and_versions(tmp_path):
    cfg = tiny_unet_checkpoint_config()
    path = diffreg.save_checkpoint(tmp_path / "m.safetensors", _model(cfg), cfg)
    meta = read_metadata(path)
    assert meta["diffreg.version"] == diffreg.__version__
    assert meta["diffreg.format_version"] == "2"  # 2: the config carries sampling defaults
    assert json.loads(meta["diffreg.config"])["model"]["name"] == "unet"


def test_half_precision_storage_loads_back_as_requested_dtype(tmp_path):
    cfg = tiny_unet_checkpoint_config()
    model = _model(cfg)
    path = diffreg.save_checkpoint(tmp_path / "m.safetensors", model, cfg, dtype=torch.float16)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("time_embed.0.weight").dtype == torch.float16
    loaded = diffreg.load_checkpoint(path).model
    w = loaded.state_dict()["time_embed.0.weight"]
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, model.state_dict()["time_embed.0.weight"].half().float())
    assert next(diffreg.load_checkpoint(path, dtype=torch.bfloat16).model.parameters()).dtype == torch.bfloat16


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        diffreg.load_checkpoint(tmp_path / "nope.safetensors")


def test_not_a_safetensors_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(2)}, path)  # a pickle: must never be unpickled
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        diffreg.load_checkpoint(path)


def test_truncated_file_is_a_checkpoint_error(tmp_path, tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        diffreg.load_checkpoint(path)


def test_newer_format_is_refused_with_upgrade_hint(tmp_path):
    cfg = tiny_unet_checkpoint_config()
    path = tmp_path / "new.safetensors"
    save_file(
        {"x": torch.zeros(1)},
        str(path),
        metadata={"diffreg.kind": "model", "diffreg.format_version": "99", "diffreg.config": cfg.to_json()},
    )
    with pytest.raises(CheckpointError, match="newer than this diffreg understands"):
        diffreg.load_checkpoint(path)


def test_training_state_file_is_named_as_such(tmp_path):
    path = tmp_path / "state.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"diffreg.kind": "training_state"})
    with pytest.raises(CheckpointError, match="training-state file"):
        diffreg.load_checkpoint(path)


def test_foreign_safetensors_file_says_it_has_no_config(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="without a diffreg configuration"):
        diffreg.load_checkpoint(path)


def test_mismatched_tensors_are_reported_together_with_the_options(tmp_path):
    cfg = tiny_unet_checkpoint_config(variance="learned_range")
    model = _model(cfg)
    state = model.state_dict()
    state.pop("time_embed.0.bias")
    state["extra.weight"] = torch.zeros(1)
    # a file whose config says fixed_small (1 output channel) but whose weights have 2
    wrong = tiny_unet_checkpoint_config(variance="fixed_small")
    path = tmp_path / "bad.safetensors"
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(path),
        metadata={"diffreg.kind": "model", "diffreg.format_version": "1", "diffreg.config": wrong.to_json()},
    )
    with pytest.raises(CheckpointError) as info:
        diffreg.load_checkpoint(path)
    message = str(info.value)
    assert "missing tensors (1): time_embed.0.bias" in message
    assert "unexpected tensors (1): extra.weight" in message
    assert "shape of out.2.weight: file (2, 16, 3, 3), model (1, 16, 3, 3)" in message
    assert "out_channels" in message and "fixed_small" in message


def test_interrupted_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    cfg = tiny_unet_checkpoint_config()
    path = diffreg.save_checkpoint(tmp_path / "m.safetensors", _model(cfg), cfg)
    before = path.read_bytes()

    def explode(*args, **kwargs):
        open(args[1], "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("diffreg.checkpoint.save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        diffreg.save_checkpoint(path, _model(cfg), cfg)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_bundled_checkpoint_loads_without_flags():
    model, _, cfg = diffreg.load_checkpoint()
    assert bundled_checkpoint_path().stat().st_size < 6_000_000
    assert cfg.num_classes == 10 and cfg.sample_shape == (1, 8, 8)
    assert cfg.diffusion.schedule.name == "cosine" and cfg.diffusion.variance.name == "learned_range"
    out = model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999]), y=torch.tensor([3, 10]))
    assert out.shape == (2, 2, 8, 8)


# -- hostile headers: nothing is built or allocated from the header alone ---------------------------


def _header_only(path, config: dict, tensors=None, version="2"):
    """A safetensors file whose header carries ``config`` but (by default) one tiny tensor."""
    save_file(
        tensors if tensors is not None else {"x": torch.zeros(1)},
        str(path),
        metadata={"diffreg.kind": "model", "diffreg.format_version": version, "diffreg.config": json.dumps(config)},
    )
    return path


def test_a_header_describing_a_huge_model_is_refused_before_any_allocation(tmp_path):
    # model_channels 2048 x channel_mult 32: the first level's 3x3 convolutions alone hold
    # 65536^2 * 9 weights (154 GB in float32). Building it for real would raise an out-of-memory
    # RuntimeError, not a CheckpointError; the shapes are compared on the meta device first.
    cfg = tiny_unet_checkpoint_config().to_dict()
    cfg["model"].update(model_channels=2048, channel_mult=[32, 32], num_heads=1)
    path = _header_only(tmp_path / "huge.safetensors", cfg)
    assert path.stat().st_size < 2000
    with pytest.raises(CheckpointError, match=r"does not fit its configuration: .*missing tensors"):
        diffreg.load_checkpoint(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_res_blocks", 100_000, r"num_res_blocks must be an integer in 1\.\.32, got 100000"),
        ("model_channels", 10**6, r"model_channels must be an integer in 1\.\.2,048, got 1000000"),
        # data.shape follows image_size here, and its own bound (values per sample) is checked first
        ("image_size", 2**20, r"data.shape \[1, 1048576, 1048576\] is too large: at most 8 dimensions and 67,108,864"),
        ("channel_mult", [1] * 50, r"channel_mult must be a list of 1\.\.8 integers.*got 50 entries"),
        ("channel_mult", [1, 10**6], r"channel_mult .*entry 1 is 1000000"),
        ("num_classes", 10**9, r"num_classes must be an integer in 1\.\.100,000"),
    ],
)
def test_out_of_bounds_model_options_in_a_header_are_named(tmp_path, field, value, message):
    cfg = tiny_unet_checkpoint_config().to_dict()
    cfg["model"][field] = value
    if field == "num_classes":
        cfg["data"]["num_classes"] = value
    if field == "image_size":
        cfg["data"]["shape"] = [1, value, value]
    path = _header_only(tmp_path / "bad.safetensors", cfg)
    with pytest.raises(CheckpointError, match=message):
        diffreg.load_checkpoint(path)


def test_a_cosine_schedule_of_a_billion_steps_in_a_header_is_refused(tmp_path):
    cfg = tiny_unet_checkpoint_config().to_dict()
    cfg["diffusion"]["num_timesteps"] = 10**9
    path = _header_only(tmp_path / "t.safetensors", cfg)
    with pytest.raises(CheckpointError, match=r"num_timesteps must be an int in 2\.\.100,000, got 1000000000"):
        diffreg.load_checkpoint(path)


@pytest.mark.parametrize("version", ["0", "-1", "1.5", "one", ""])
def test_a_format_version_that_is_not_a_positive_int_is_named(tmp_path, version):
    path = _header_only(tmp_path / "v.safetensors", tiny_unet_checkpoint_config().to_dict(), version=version)
    with pytest.raises(CheckpointError, match=rf"bad checkpoint format version {version!r}; accepted: 1\.\.2"):
        diffreg.load_checkpoint(path)


def test_a_deeply_nested_header_config_is_a_one_line_error(tmp_path):
    path = tmp_path / "deep.safetensors"
    save_file(
        {"x": torch.zeros(1)},
        str(path),
        metadata={"diffreg.kind": "model", "diffreg.config": "[" * 100_000 + "]" * 100_000},
    )
    with pytest.raises(CheckpointError, match="nested too deeply"):
        diffreg.load_checkpoint(path)


def test_deeply_nested_model_options_are_refused(tmp_path):
    cfg = tiny_unet_checkpoint_config().to_dict()
    nested: list = []
    for _ in range(100):
        nested = [nested]
    cfg["model"]["attention_resolutions"] = nested
    path = _header_only(tmp_path / "n.safetensors", cfg)
    with pytest.raises(CheckpointError, match="nested more than 32 levels"):
        diffreg.load_checkpoint(path)


def test_float8_weights_are_refused_by_name(tmp_path):
    cfg = tiny_unet_checkpoint_config()
    state = {k: v.contiguous() for k, v in _model(cfg).state_dict().items()}
    state["time_embed.0.weight"] = state["time_embed.0.weight"].to(torch.float8_e4m3fn)
    path = _header_only(tmp_path / "f8.safetensors", cfg.to_dict(), tensors=state)
    with pytest.raises(CheckpointError, match=r"float8 tensors \(1\): time_embed\.0\.weight is F8_E4M3.*float16"):
        diffreg.load_checkpoint(path)


# -- sampling defaults ---------------------------------------------------------------------------


def test_files_without_sampling_defaults_load_with_clipping_on():
    # the bundled digits model predates the field (format 1); it was always sampled with clipping
    assert read_metadata(bundled_checkpoint_path())["diffreg.format_version"] == "1"
    _, _, cfg = diffreg.load_checkpoint()
    assert cfg.sampling == diffreg.config.SamplingConfig(clip=True, dynamic_threshold=None)


def test_sampling_defaults_round_trip_through_a_checkpoint(tmp_path):
    cfg = tiny_unet_checkpoint_config()
    cfg = CheckpointConfig.from_dict({**cfg.to_dict(), "sampling": {"clip": False, "dynamic_threshold": 0.995}})
    path = diffreg.save_checkpoint(tmp_path / "m.safetensors", _model(cfg), cfg)
    _, _, loaded = diffreg.load_checkpoint(path)
    assert loaded.sampling.clip is False and loaded.sampling.dynamic_threshold == 0.995
    assert loaded.sampling.driver_options() == {"clip_denoised": False, "dynamic_threshold": 0.995}


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"clip": "yes"}, r"sampling\.clip must be true .* or false .*, got 'yes'"),
        ({"dynamic_threshold": 1.5}, r"dynamic_threshold must be a percentile in \(0, 1\].*got 1\.5"),
        ({"dynamic_threshold": 0}, r"dynamic_threshold must be a percentile in \(0, 1\].*got 0"),
        ({"clipping": True}, r"SamplingConfig has no field 'clipping'.*did you mean 'clip'"),
    ],
)
def test_bad_sampling_defaults_are_named(tmp_path, sampling, message):
    cfg = {**tiny_unet_checkpoint_config().to_dict(), "sampling": sampling}
    path = _header_only(tmp_path / "s.safetensors", cfg)
    with pytest.raises(CheckpointError, match=message):
        diffreg.load_checkpoint(path)
