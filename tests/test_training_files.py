"""Training's files: outputs checked before any work, the checkpoint and its state replaced as a
pair, the state checked against the run that resumes from it, npz pixel ranges."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_TRAIN, tiny_train_config
from safetensors.torch import load_file, save_file

import diffreg
from diffreg import training
from diffreg.checkpoint import read_metadata
from diffreg.cli import main
from diffreg.training import train

TINY = TINY_TRAIN


_cfg = tiny_train_config



# -- outputs checked before training ----------------------------------------------------------------


def test_missing_folder_over_long_name_and_read_only_file_are_found_before_training(tmp_path, no_training):
    with pytest.raises(FileNotFoundError, match=r"folder '.*nodir' does not exist"):
        train(_cfg(steps=1), tmp_path / "nodir" / "m.safetensors", progress=False)
    with pytest.raises(OSError, match="file name is too long"):
        train(_cfg(steps=1), tmp_path / ("m" * 240 + ".safetensors"), progress=False)  # its state's name: 258
    (tmp_path / "m.safetensors").write_bytes(b"old")
    (tmp_path / "m.safetensors").chmod(0o444)
    with pytest.raises(PermissionError, match="read-only"):
        train(_cfg(steps=1), tmp_path / "m.safetensors", progress=False)
    assert (tmp_path / "m.safetensors").read_bytes() == b"old"


def test_an_output_or_its_state_that_is_the_data_is_refused_before_training(tmp_path, no_training):
    np.savez(tmp_path / "d.npz", np.zeros((4, 8, 8, 1), np.uint8))
    before = (tmp_path / "d.npz").read_bytes()
    data = {"name": "npz", "path": str(tmp_path / "d.npz")}
    with pytest.raises(ValueError, match=r"the output '.*d\.npz' is the same file as data\.path"):
        train(_cfg(steps=1, data=data), tmp_path / "d.npz", progress=False)
    data = {"name": "npz", "path": str(tmp_path / "m.state.safetensors")}
    (tmp_path / "m.state.safetensors").write_bytes(b"an input")
    with pytest.raises(ValueError, match="its training state .* is the same file as data.path"):
        train(_cfg(steps=1, data=data), tmp_path / "m.safetensors", progress=False)
    assert (tmp_path / "d.npz").read_bytes() == before


def test_cli_train_refuses_to_write_over_its_config_or_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text("steps = 1\n")
    np.savez(tmp_path / "d.npz", np.zeros((4, 8, 8, 1), np.uint8))
    for args, message in [
        (["--config", "c.toml", "--output", "./c.toml"], "is the same file as --config"),
        (["--set", "data.name=npz", "--set", "data.path=d.npz", "--output", "d.npz"], "same file as data.path"),
    ]:
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        result = CliRunner().invoke(main, ["train", *args, "--no-progress"])
        assert result.exit_code == 1 and message in result.output, result.output
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# -- the checkpoint and its state: a pair -----------------------------------------------------------


def _pair(tmp_path):
    return (tmp_path / "m.safetensors").read_bytes(), (tmp_path / "m.state.safetensors").read_bytes()


def test_a_full_disk_writing_the_state_keeps_the_previous_pair_and_names_the_file(tmp_path, monkeypatch):
    train(_cfg(steps=2), tmp_path / "m.safetensors", progress=False)
    old = _pair(tmp_path)

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(diffreg.train_state, "save_file", disk_full)
    with pytest.raises(OSError, match=r"cannot write '.*m\.state\.safetensors': No space left on device"):
        train(_cfg(steps=4), tmp_path / "m.safetensors", progress=False, resume=True)
    assert _pair(tmp_path) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.state.safetensors"]


def test_a_failure_syncing_the_state_keeps_the_previous_pair(tmp_path, monkeypatch):
    train(_cfg(steps=2), tmp_path / "m.safetensors", progress=False)
    old = _pair(tmp_path)
    real_fsync = os.fsync

    def fsync(fd):
        if ".m.state.safetensors" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(diffreg.fileio.os, "fsync", fsync)
    with pytest.raises(OSError, match=r"cannot write '.*m\.state\.safetensors': Input/output error"):
        train(_cfg(steps=4), tmp_path / "m.safetensors", progress=False, resume=True)
    assert _pair(tmp_path) == old


def test_cli_reports_a_full_disk_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def disk_full(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(diffreg.checkpoint, "save_file", disk_full)
    result = CliRunner().invoke(main, ["train", "--steps", "1", "--set", "model.model_channels=8", "--no-progress"])
    assert result.exit_code == 1 and "cannot write 'model.safetensors': No space left on device" in result.output
    assert "unexpected" not in result.output and list(tmp_path.iterdir()) == []


# -- resuming ------------------------------------------------------------------------------------------


def test_resume_with_steps_not_beyond_the_saved_step_says_so_and_writes_nothing(tmp_path, monkeypatch):
    train(_cfg(steps=3), tmp_path / "m.safetensors", progress=False)
    old = _pair(tmp_path)
    monkeypatch.chdir(tmp_path)
    for steps in (2, 3):
        args = ["train", "--steps", str(steps), "--resume", "--output", "m.safetensors", "--no-progress"]
        result = CliRunner().invoke(main, [*args, "--batch-size", "8", "--set", "lr=1e-3", *_tiny_settings()])
        assert result.exit_code == 1, result.output
        assert f"is at step 3 and steps is {steps}: nothing to train" in result.output
        assert "trained to step" not in result.output and _pair(tmp_path) == old


def _tiny_settings():
    return [
        "--set",
        "diffusion.schedule=cosine",
        "--set",
        "diffusion.num_timesteps=50",
        "--set",
        "model.model_channels=8",
        "--set",
        "model.channel_mult=[1]",
        "--set",
        "model.attention_resolutions=[]",
        "--set",
        "model.num_heads=1",
    ]


def _tamper(path, edit_tensors=None, edit_meta=None):
    tensors, meta = load_file(str(path)), read_metadata(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(path), metadata=meta)


def _first(tensors, prefix):
    return next(k for k in sorted(tensors) if k.startswith(prefix))


@pytest.mark.parametrize(
    "edit_tensors,edit_meta,message",
    [
        (None, lambda m: m.update(param_groups=m["param_groups"].replace('"lr": 0.001', '"lr": 0.5')),
         "optimizer lr is 0.5, the configuration says 0.001"),
        (None, lambda m: m.update(ema_updates="7"), "EMA update count '7' differs from step 2"),
        (None, lambda m: m.update(step="5"), "optimizer step of parameter 0 is 2.0, the state's step is 5"),
        (None, lambda m: m.update(step="-1"), "step '-1' is not an integer >= 0"),
        (None, lambda m: m.update(running_loss="NaN"), "running loss 'NaN' is not a finite number"),
        (None, lambda m: m.update(world_size="2"), "saved by 2 process(es), this run has 1"),
        (lambda t: t.__setitem__("rng/torch", t["rng/torch"][:100]), None, "RNG state rng/torch is"),
        (lambda t: t.__setitem__("optim/0/exp_avg_sq", -torch.ones_like(t["optim/0/exp_avg_sq"])), None,
         "optimizer exp_avg_sq of parameter 0 holds non-finite or negative values"),
        (lambda t: t.__setitem__("optim/0/exp_avg", t["optim/0/exp_avg"].double()), None,
         "optimizer exp_avg of parameter 0 is torch.float64"),
        (lambda t: t.__setitem__("optim/1/step", torch.tensor([1.0, 2.0])), None, "optimizer step of parameter 1"),
        (lambda t: t.pop("optim/3/exp_avg"), None, "optimizer state of parameter 3 has exp_avg_sq, step"),
        (lambda t: t.__setitem__(_first(t, "ema/"), t[_first(t, "ema/")] * float("inf")), None,
         "holds non-finite values"),
    ],
)
def test_a_damaged_or_foreign_state_is_refused_at_load_naming_what_differs(tmp_path, edit_tensors, edit_meta, message):
    train(_cfg(steps=2), tmp_path / "m.safetensors", progress=False)
    _tamper(tmp_path / "m.state.safetensors", edit_tensors, edit_meta)
    with pytest.raises(diffreg.CheckpointError, match="cannot resume from") as info:
        train(_cfg(steps=10), tmp_path / "m.safetensors", progress=False, resume=True)
    assert message in str(info.value)


def test_every_difference_is_named_in_one_error(tmp_path):
    train(_cfg(steps=2), tmp_path / "m.safetensors", progress=False)
    _tamper(tmp_path / "m.state.safetensors", edit_meta=lambda m: m.update(ema_updates="9", world_size="3"))
    expected = r"it was saved by 3 process\(es\), this run has 1; EMA update count '9' differs"
    with pytest.raises(diffreg.CheckpointError, match=expected):
        train(_cfg(steps=4), tmp_path / "m.safetensors", progress=False, resume=True)


def test_the_configuration_not_the_state_sets_the_learning_rate(tmp_path):
    train(_cfg(steps=2), tmp_path / "m.safetensors", progress=False)
    trainer = training.Trainer(_cfg(steps=4))
    trainer.load_state(tmp_path / "m.state.safetensors")
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3]
    groups = json.loads(read_metadata(tmp_path / "m.state.safetensors")["param_groups"])
    assert [g["lr"] for g in groups] == [1e-3]


def test_different_data_under_the_same_path_is_noticed(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8))
    data = {"name": "npz", "path": str(tmp_path / "d.npz")}
    train(_cfg(steps=2, data=data), tmp_path / "m.safetensors", progress=False)
    np.savez(tmp_path / "d.npz", rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8))  # same shape, new pixels
    with pytest.raises(diffreg.CheckpointError, match=r"the data at '.*d\.npz' is not the data it was saved with"):
        train(_cfg(steps=4, data=data), tmp_path / "m.safetensors", progress=False, resume=True)


# -- npz pixel ranges ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.float32, np.float64])
def test_npz_pixels_in_0_255_become_minus_one_to_one_whatever_the_dtype(tmp_path, dtype):
    from diffreg.data import load_npz

    pixels = np.array([0, 1, 127, 128, 254, 255] * 4).reshape(1, 4, 6, 1)
    np.savez(tmp_path / "d.npz", pixels.astype(dtype))
    x, _, _ = load_npz(str(tmp_path / "d.npz"))
    expected = [-1.0, -1 + 2 / 255, -1 + 254 / 255, -1 + 256 / 255, 1 - 2 / 255, 1.0]  # 2 v / 255 - 1
    assert x.dtype == torch.float32 and x.shape == (1, 1, 4, 6)
    torch.testing.assert_close(x[0, 0, 0], torch.tensor(expected), rtol=0, atol=1e-6)


def test_npz_floats_already_in_minus_one_to_one_are_kept(tmp_path):
    from diffreg.data import load_npz

    images = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 4, 4, 1)
    np.savez(tmp_path / "d.npz", images)
    assert torch.equal(load_npz(str(tmp_path / "d.npz"))[0][0, 0], torch.from_numpy(images[0, :, :, 0]))


@pytest.mark.parametrize(
    "images,message",
    [
        (np.full((1, 2, 2, 1), 1000, np.uint16), "span 1000..1000; accepted: pixel values 0..255"),
        (np.full((1, 2, 2, 1), -5, np.int16), "span -5..-5"),
        (np.full((1, 2, 2, 1), -3.0, np.float32), "span -3.0..-3.0"),
        (np.full((1, 2, 2, 1), np.nan, np.float32), "NaN or infinite"),
        (np.ones((1, 2, 2, 1), bool), "got dtype bool"),
    ],
)
def test_npz_pixels_outside_the_accepted_ranges_are_refused_naming_the_range(tmp_path, images, message):
    from diffreg.data import load_npz

    np.savez(tmp_path / "d.npz", images)
    with pytest.raises(ValueError, match="d.npz") as info:
        load_npz(str(tmp_path / "d.npz"))
    assert message in str(info.value)
