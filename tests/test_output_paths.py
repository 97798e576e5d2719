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

from diffreg import training
from diffreg.checkpoint import read_config
from diffreg.cli import main
from diffreg.training import TrainConfig, train

TINY = {
    "batch_size": 8,
    "lr": 1e-3,
    "diffusion": {"schedule": "cosine", "num_timesteps": 50},
    "model": {"name": "unet", "model_channels": 8, "channel_mult": [1], "attention_resolutions": [], "num_heads": 1},
}
TINY_SET = [
    "--set", "diffusion.schedule=cosine", "--set", "diffusion.num_timesteps=50", "--set", "model.model_channels=8",
    "--set", "model.channel_mult=[1]", "--set", "model.attention_resolutions=[]", "--set", "model.num_heads=1",
    "--batch-size", "8",
]  # fmt: skip


def _cfg(**changes):
    return TrainConfig.from_dict({**TINY, **changes})


@pytest.fixture
def no_training(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("training started before the outputs were checked")

    monkeypatch.setattr(training.Trainer, "__init__", forbidden)


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
    with pytest.raises(ValueError, match=r"--resume: the output '/dev/null' is not a regular file .* no training state"):
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
