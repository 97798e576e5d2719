"""SIGTERM during a write: the temporary files are removed, the targets keep their old content,
and the process still ends by SIGTERM (exit status 143 in a shell; -15 from subprocess)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from diffreg import fileio

# a write that has started (a temporary file holds part of the new content), then waits to be killed
SLOW_WRITE = """
import sys, time
from pathlib import Path

def slow_write(tmp):
    Path(tmp).write_bytes(b"partial")
    Path(sys.argv[1]).write_text("ready")
    time.sleep(120)
"""


def _terminate_when_ready(tmp_path, script: str, *args: str) -> int:
    """Run ``script`` (with ``ready`` as argv[1]), send SIGTERM once it says it is writing; its status."""
    ready = tmp_path / "ready"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITE + textwrap.dedent(script), str(ready), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the write never started: {proc.communicate()[0].decode()[-2000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ready.unlink()
    assert "Traceback" not in output, output
    return proc.returncode


def test_sigterm_during_atomic_write_removes_the_temporary_file_and_keeps_the_target(tmp_path):
    (tmp_path / "out.bin").write_bytes(b"old")
    status = _terminate_when_ready(
        tmp_path,
        """
        from diffreg.fileio import atomic_write
        atomic_write("out.bin", slow_write)
        """,
    )
    assert status == -signal.SIGTERM  # ended by the signal, as without the handler
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]  # no .out.bin.*.tmp
    assert (tmp_path / "out.bin").read_bytes() == b"old"


def test_sigterm_during_diffreg_sample_keeps_the_old_samples_and_leaves_no_temporary_file(tmp_path, tiny_checkpoint):
    (tmp_path / "samples.npz").write_bytes(b"old samples")
    status = _terminate_when_ready(
        tmp_path,
        """
        import numpy as np
        from diffreg.cli import main
        np.savez = lambda fh, **arrays: slow_write(fh.name)
        main(["sample", sys.argv[2], "--num-samples", "2", "--steps", "2", "--no-progress", "--output", ""])
        """,
        str(tiny_checkpoint),
    )
    assert status == -signal.SIGTERM
    assert sorted(os.listdir(tmp_path)) == ["samples.npz"]
    assert (tmp_path / "samples.npz").read_bytes() == b"old samples"


def test_sigterm_while_train_saves_keeps_the_old_checkpoint_and_state(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"old model")
    (tmp_path / "m.state.safetensors").write_bytes(b"old state")
    status = _terminate_when_ready(
        tmp_path,
        """
        import diffreg.checkpoint
        from diffreg.cli import main
        diffreg.checkpoint.save_file = lambda tensors, filename, metadata=None: slow_write(filename)
        main(["train", "--steps", "1", "--batch-size", "8", "--set", "model.model_channels=8", "--set",
              "model.channel_mult=[1]", "--set", "model.attention_resolutions=[]", "--set", "model.num_heads=1",
              "--output", "m.safetensors", "--no-progress"])
        """,
    )
    assert status == -signal.SIGTERM
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "m.state.safetensors"]
    assert (tmp_path / "m.safetensors").read_bytes() == b"old model"
    assert (tmp_path / "m.state.safetensors").read_bytes() == b"old state"


def test_the_handler_is_only_there_during_a_write_and_a_program_s_own_handler_is_kept(tmp_path):
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    seen = []
    fileio.atomic_write(tmp_path / "a", lambda tmp: seen.append(signal.getsignal(signal.SIGTERM)))
    assert callable(seen[0]) and seen[0] != signal.SIG_DFL  # ours, while writing
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # given back

    def own(signum, frame):
        pass

    for kept in (own, signal.SIG_IGN):
        previous = signal.signal(signal.SIGTERM, kept)
        try:
            fileio.atomic_write(tmp_path / "b", lambda tmp: seen.append(signal.getsignal(signal.SIGTERM)))
            assert seen[-1] is kept and signal.getsignal(signal.SIGTERM) is kept
        finally:
            signal.signal(signal.SIGTERM, previous)


def test_sigterm_raises_terminated_inside_the_block_and_cleanup_runs_first(tmp_path):
    if fileio.CLEANUP_SIGNALS[0] != signal.SIGTERM:
        pytest.skip("no SIGTERM here")
    # a nested block (as atomic_paths inside a command) only unwinds: the outermost one ends the
    # process, which a test cannot let happen; so check the unwinding inside an outer block whose
    # kill is replaced
    killed = []
    real_kill = os.kill
    try:
        os.kill = lambda pid, signum: killed.append(signum)  # type: ignore[assignment]
        with pytest.raises(fileio.Terminated):
            with fileio.cleanup_on_termination():
                with pytest.raises(fileio.Terminated):
                    with fileio.atomic_path(tmp_path / "t") as tmp:
                        tmp.write_bytes(b"partial")
                        real_kill(os.getpid(), signal.SIGTERM)
                        time.sleep(5)  # the handler raises here
                assert os.listdir(tmp_path) == []
                raise fileio.Terminated(signal.SIGTERM)  # on to the outer block
    finally:
        os.kill = real_kill  # type: ignore[assignment]
    assert killed == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
