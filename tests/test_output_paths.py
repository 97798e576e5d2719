"""Output names as the OS takes them: names that are not UTF-8 are written and printed (with
their undecodable bytes as ``\\xNN``), and outputs that are not regular files (``/dev/null``, a
FIFO) get nothing derived from their name (no training state, no snapshot folder beside them)."""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
import time
import warnings

import pytest
from click.testing import CliRunner
from conftest import TINY_TRAIN, tiny_train_config

from diffreg.checkpoint import read_config
from diffreg.cli import main
from diffreg.training import TrainConfig, train

TINY = TINY_TRAIN
TINY_SET = [
    "--set", "diffusion.schedule=cosine", "--set", "diffusion.num_timesteps=50", "--set", "model.model_channels=8",
    "--set", "model.channel_mult=[1]", "--set", "model.attention_resolutions=[]", "--set", "model.num_heads=1",
    "--batch-size", "8",
]  # fmt: skip


_cfg = tiny_train_config



class _Drain:
    """A reader of ``fifo`` from before the first write to :meth:`stop`: collects every byte any
    number of writers put into it (so a test sees two checkpoints written one after the other)."""

    def __init__(self, fifo):
        self.fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.chunks: list[bytes] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:  # a writer is there, nothing to read yet
                chunk = b""
            if chunk:
                self.chunks.append(chunk)
            elif self.done.is_set():
                return
            else:
                time.sleep(0.005)

    def stop(self) -> bytes:
        self.done.set()
        self.thread.join(timeout=60)
        os.close(self.fd)
        return b"".join(self.chunks)


# -- outputs that are not regular files -------------------------------------------------------------------


def test_training_into_a_fifo_writes_the_checkpoint_once_and_no_state_beside_it(tmp_path):
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    drain = _Drain(fifo)
    try:
        with pytest.warns(UserWarning, match=r"'.*m.safetensors' is not a regular file: .*no training state"):
            train(_cfg(steps=3, save_every=1), fifo, progress=False)  # save_every: no checkpoint per step
    finally:
        received = drain.stop()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no m.state.safetensors
    # one checkpoint, not three one after another: a safetensors file is 8 bytes (the header's
    # length N), N bytes of JSON header, then the data up to the largest end offset in it
    header_len = struct.unpack("<Q", received[:8])[0]
    header = json.loads(received[8 : 8 + header_len])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert len(received) == 8 + header_len + end
    (tmp_path / "got.safetensors").write_bytes(received)
    assert read_config(tmp_path / "got.safetensors").model.options["model_channels"] == 8


def test_training_into_dev_null_leaves_no_state_file_in_dev():
    stray = "/dev/null.state.safetensors"
    if os.path.lexists(stray):
        pytest.skip(f"{stray} exists already (left by something else)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(_cfg(steps=1), "/dev/null", progress=False)
        assert not os.path.lexists(stray)
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    finally:
        if os.path.lexists(stray):
            os.unlink(stray)


def test_resume_or_snapshots_with_a_non_regular_output_are_refused_before_training(tmp_path, no_training):
    with pytest.raises(ValueError, match=r"--resume: the output '/dev/null' is not a regular file .* no training"):
        train(_cfg(steps=2), "/dev/null", progress=False, resume=True)
    with pytest.raises(ValueError, match=r"posthoc_ema_every = 1: the output '/dev/null' is not a regular file"):
        train(_cfg(steps=2, posthoc_ema_every=1), "/dev/null", progress=False)
    assert not os.path.lexists("/dev/null.phema") and not os.path.lexists("/dev/null.state.safetensors")


def test_cli_train_into_dev_null_says_that_no_state_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stray = "/dev/null.state.safetensors"
    existed = os.path.lexists(stray)
    try:
        with pytest.warns(UserWarning, match=r"the output '/dev/null' is not a regular file: .*no training state"):
            args = ["train", "--steps", "1", *TINY_SET, "--output", "/dev/null", "--no-progress"]
            result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert existed or not os.path.lexists(stray)
    finally:
        if not existed and os.path.lexists(stray):
            os.unlink(stray)


# -- names that are not UTF-8 ----------------------------------------------------------------------------


def _name(raw: bytes) -> str:
    """A file name as Python holds one the OS gave it (undecodable bytes as lone surrogates)."""
    return os.fsdecode(raw)


def test_shown_escapes_the_bytes_a_name_cannot_decode_and_keeps_the_rest():
    from diffreg.fileio import shown

    assert shown(_name(b"a\xff.npz")) == "a\\xff.npz"  # as `ls -b` shows it
    assert shown(b"dir/b\xfe\xc3.png") == "dir/b\\xfe\\xc3.png"
    assert shown("caf\u00e9 \u56fe.png") == "caf\u00e9 \u56fe.png"  # valid names are unchanged
    assert shown(_name(b"a\xff.npz")).encode("utf-8").decode("utf-8") == "a\\xff.npz"  # printable anywhere


def test_sample_writes_outputs_with_undecodable_names_and_exits_0(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.chdir(tmp_path)
    npz, picture = _name(b"s\xff.npz"), _name(b"g\xfe.png")
    args = ["sample", str(tiny_checkpoint), "--num-samples", "2", "--steps", "2", "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--npz", npz, "--output", picture])  # a strict UTF-8 stdout
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(b".")) == [b"g\xfe.png", b"s\xff.npz"]
    assert result.output.rstrip().endswith("-> s\\xff.npz, g\\xfe.png")
    assert open(b"g\xfe.png", "rb").read(4) == b"\x89PNG"


def test_train_writes_a_checkpoint_and_state_with_undecodable_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--steps", "1", *TINY_SET, "--output", _name(b"m\xff.safetensors"), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(b".")) == [b"m\xff.safetensors", b"m\xff.state.safetensors"]
    assert result.output.rstrip().endswith("-> m\\xff.safetensors")


def test_optimize_steps_writes_outputs_with_undecodable_names(tmp_path, monkeypatch, tiny_checkpoint):
    pytest.importorskip("diffreg_solvers")
    monkeypatch.chdir(tmp_path)
    fast = ["--nfe", "3", "--draws", "4", "--max-evals", "2", "--reference-steps", "8", "--seed", "0"]
    out, saved = _name(b"grid\xff.json"), _name(b"c\xfe.safetensors")
    result = CliRunner().invoke(main, ["optimize-steps", str(tiny_checkpoint), *fast, "--output", out,
                                       "--save-to-checkpoint", saved])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(b".")) == [b"c\xfe.safetensors", b"grid\xff.json"]
    assert "wrote grid\\xff.json" in result.output
    assert "wrote c\\xfe.safetensors: `diffreg sample c\\xfe" in result.output


def test_ema_prints_an_undecodable_output_name(tmp_path, monkeypatch):
    cfg = TrainConfig.from_dict(
        {
            "steps": 2,
            "batch_size": 8,
            "posthoc_ema_every": 1,
            "posthoc_ema_sigma_rels": [0.05, 0.2],
            "data": {"name": "moons", "n": 64},
            "diffusion": {"num_timesteps": 20, "schedule": "cosine"},
            "model": {"name": "mlp", "hidden": 16, "depth": 1},
        }
    )
    train(cfg, tmp_path / "m.safetensors", progress=False)
    monkeypatch.chdir(tmp_path)
    args = ["ema", "m.safetensors", "--sigma-rel", "0.1", "--output", _name(b"e\xfe.safetensors")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith("-> e\\xfe.safetensors") and os.path.isfile(b"e\xfe.safetensors")
