"""`diffreg sample`'s outputs are checked before sampling: something to write, not an input,
writable; what is not a regular file is written through."""

from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest
from click.testing import CliRunner

import diffreg
from diffreg.cli import main

SAMPLE = ["sample", "--num-samples", "2", "--steps", "2", "--no-progress"]


@pytest.fixture
def no_sampling(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the outputs were checked")

    monkeypatch.setattr(diffreg.checkpoint, "load_checkpoint", forbidden)


def _run(tmp_path, monkeypatch, *args):
    monkeypatch.chdir(tmp_path)
    return CliRunner().invoke(main, [*SAMPLE, *map(str, args)])


def test_nothing_to_write_is_refused_before_sampling(tmp_path, monkeypatch, no_sampling):
    result = _run(tmp_path, monkeypatch, "--output", "", "--npz", "")
    assert result.exit_code == 1 and "nothing to write" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--output", "--npz"])
def test_writing_over_the_checkpoint_is_refused_before_sampling(tmp_path, monkeypatch, tiny_checkpoint, flag):
    shutil.copy(tiny_checkpoint, tmp_path / "m.safetensors")
    os.link(tmp_path / "m.safetensors", tmp_path / "alias.bin")
    before = (tmp_path / "m.safetensors").read_bytes()
    for target in ("m.safetensors", "./m.safetensors", "alias.bin"):
        other = "--npz" if flag == "--output" else "--output"
        result = _run(tmp_path, monkeypatch, "m.safetensors", flag, target, other, "x.out")
        assert result.exit_code == 1, result.output
        expected = f"{flag} '{os.path.normpath(target)}' is the same file as the checkpoint 'm.safetensors'"
        assert expected in result.output
    assert (tmp_path / "m.safetensors").read_bytes() == before and not (tmp_path / "x.out").exists()


def test_a_read_only_output_is_refused_before_sampling(tmp_path, monkeypatch, no_sampling):
    (tmp_path / "g.png").write_bytes(b"keep")
    (tmp_path / "g.png").chmod(0o400)
    result = _run(tmp_path, monkeypatch, "--output", "g.png", "--npz", "")
    assert result.exit_code == 1 and "--output cannot write 'g.png': the file is read-only (mode 0400)" in result.output
    assert (tmp_path / "g.png").read_bytes() == b"keep"


def test_dev_null_as_an_output_stays_the_null_device(tmp_path, monkeypatch, tiny_checkpoint):
    result = _run(tmp_path, monkeypatch, tiny_checkpoint, "--output", "/dev/null", "--npz", "s.npz")
    assert "Traceback" not in result.output and "unexpected" not in result.output  # refused by name, or written
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_fifo_as_the_npz_is_written_through_to_its_reader(tmp_path, monkeypatch, tiny_checkpoint):
    import io
    import threading

    fifo = tmp_path / "s.npz"
    os.mkfifo(fifo)
    keep = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader is there before the write starts
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))  # as `cat s.npz` reads
    reader.start()
    try:
        result = _run(tmp_path, monkeypatch, tiny_checkpoint, "--output", "", "--npz", "s.npz")
    finally:
        reader.join(timeout=60)
        os.close(keep)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with np.load(io.BytesIO(received[0])) as f:
        assert f["arr_0"].shape == (2, 8, 8, 1)
