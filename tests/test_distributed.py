"""torchrun with 2 CPU processes (gloo): training with DDP, and sampling split across ranks that
equals a single-process run sample for sample."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from diffreg.cli import main


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "diffreg.cli",
        *map(str, args),
    ]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_two_process_training_and_sampling_match_a_single_process(tmp_path, tiny_checkpoint, monkeypatch):
    (tmp_path / "t.toml").write_text(
        'steps = 3\nbatch_size = 8\n[diffusion]\nnum_timesteps = 50\nschedule = "cosine"\n'
        '[model]\nname = "unet"\nmodel_channels = 8\nchannel_mult = [1]\nattention_resolutions = []\nnum_heads = 1\n'
    )
    _torchrun("train", "--config", "t.toml", "--output", "ddp.safetensors", "--no-progress", cwd=tmp_path)
    assert (tmp_path / "ddp.safetensors").exists() and (tmp_path / "ddp.state.safetensors").exists()

    args = ["sample", tiny_checkpoint, "--num-samples", 7, "--steps", 3, "--sampler", "ddpm", "--no-progress"]
    _torchrun(*args, "--npz", "two.npz", "--output", "two.png", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(main, [*map(str, args), "--npz", "one.npz", "--output", "one.png"]).exit_code == 0
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
