"""Atomic writes: one file (atomic_path) and files that belong together (atomic_paths)."""

from __future__ import annotations

import os

import pytest

from diffreg import fileio
from diffreg.fileio import atomic_paths


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_paths_writes_every_file(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.npz"
    a.write_bytes(b"old a")
    with atomic_paths(a, b) as (ta, tb):
        ta.write_bytes(b"new a")
        tb.write_bytes(b"new b")
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"new b" and _leftovers(tmp_path) == []


def test_an_error_while_writing_leaves_every_target_as_it_was(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.npz"
    a.write_bytes(b"old a")
    with pytest.raises(OSError, match=r"cannot write '.*b\.npz': No space left on device"):
        with atomic_paths(a, b) as (ta, tb):
            ta.write_bytes(b"new a")
            raise OSError(28, "No space left on device", str(tb))  # as a full disk reports it
    assert a.read_bytes() == b"old a" and not b.exists() and _leftovers(tmp_path) == []


def test_a_failed_replacement_puts_back_the_targets_already_replaced(tmp_path, monkeypatch):
    a, b = tmp_path / "a.png", tmp_path / "b.npz"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(b) and str(src).endswith(".tmp") and ".old." not in str(src):
            raise PermissionError(1, "Operation not permitted")  # e.g. an immutable target
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(OSError, match=r"cannot write '.*b\.npz': Operation not permitted"):
        with atomic_paths(a, b) as (ta, tb):
            ta.write_bytes(b"new a")
            tb.write_bytes(b"new b")
    assert a.read_bytes() == b"old a" and b.read_bytes() == b"old b" and _leftovers(tmp_path) == []


def test_a_target_that_became_a_directory_is_refused_before_anything_is_replaced(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.npz"
    a.write_bytes(b"old a")
    with pytest.raises(IsADirectoryError, match=r"b\.npz'"):
        with atomic_paths(a, b) as (ta, tb):
            ta.write_bytes(b"new a")
            tb.write_bytes(b"new b")
            b.mkdir()  # appears while sampling runs
    assert a.read_bytes() == b"old a" and b.is_dir() and _leftovers(tmp_path) == []


def test_an_interruption_while_replacing_puts_back_the_old_files_and_no_target_is_ever_missing(tmp_path, monkeypatch):
    a, b = tmp_path / "a.png", tmp_path / "b.npz"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp") and ".old." not in str(src):
            assert os.path.exists(dst)  # replaced in one step, never removed first
            if str(dst) == str(b):
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_paths(a, b) as (ta, tb):
            ta.write_bytes(b"new a")
            tb.write_bytes(b"new b")
    assert a.read_bytes() == b"old a" and b.read_bytes() == b"old b" and _leftovers(tmp_path) == []


def test_a_dangling_symlink_target_is_put_back_not_deleted(tmp_path, monkeypatch):
    a, b = tmp_path / "a.png", tmp_path / "b.npz"
    a.symlink_to(tmp_path / "nowhere")
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(b) and ".old." not in str(src):
            raise PermissionError(1, "Operation not permitted")
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(OSError, match="Operation not permitted"):
        with atomic_paths(a, b) as (ta, tb):
            ta.write_bytes(b"new a")
            tb.write_bytes(b"new b")
    assert a.is_symlink() and os.readlink(a) == str(tmp_path / "nowhere") and not b.exists()


def test_without_hard_links_the_old_files_are_moved_aside_and_put_back(tmp_path, monkeypatch):
    a, b = tmp_path / "a.png", tmp_path / "b.npz"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")

    def no_link(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")  # as on FAT

    monkeypatch.setattr(fileio.os, "link", no_link)
    with atomic_paths(a, b) as (ta, tb):
        ta.write_bytes(b"new a")
        tb.write_bytes(b"new b")
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"new b" and _leftovers(tmp_path) == []
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(b) and ".old." not in str(src):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(OSError, match=r"b\.npz'"):
        with atomic_paths(a, b) as (ta, tb):
            ta.write_bytes(b"newer a")
            tb.write_bytes(b"newer b")
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"new b" and _leftovers(tmp_path) == []


# -- what is not a regular file is written through, never renamed over -------------------------------


def test_a_device_node_is_written_through_not_replaced(tmp_path):
    import stat

    with fileio.atomic_path("/dev/null") as tmp:
        tmp.write_bytes(b"discarded")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and not tmp.exists()
    with open("/dev/null", "rb") as fh:
        assert fh.read() == b""  # still the null device


def test_a_fifo_is_written_through_to_its_reader(tmp_path):
    import stat
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    keep = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader is there before the write starts
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))  # as `cat pipe` reads
    reader.start()
    try:
        with atomic_paths(tmp_path / "grid.png", fifo) as (ta, tb):
            ta.write_bytes(b"grid")
            tb.write_bytes(b"arrays" * 20000)  # more than a pipe holds at once
    finally:
        reader.join(timeout=30)
        os.close(keep)
    assert received == [b"arrays" * 20000] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert (tmp_path / "grid.png").read_bytes() == b"grid" and _leftovers(tmp_path) == []


def test_a_fifo_nobody_reads_is_refused_without_waiting_and_the_other_files_are_put_back(tmp_path):
    import stat

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "grid.png").write_bytes(b"old grid")
    with pytest.raises(OSError, match=r"cannot write '.*pipe': no process is reading"):
        with atomic_paths(tmp_path / "grid.png", fifo) as (ta, tb):
            ta.write_bytes(b"new grid")
            tb.write_bytes(b"arrays")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and (tmp_path / "grid.png").read_bytes() == b"old grid"


def test_dev_stdout_is_written_to_the_stream_and_stays_a_link(tmp_path):
    import subprocess
    import sys

    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('fileio', {fileio.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "with m.atomic_path('/dev/stdout') as tmp:\n"
        "    tmp.write_bytes(b'through the pipe')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"through the pipe" and os.path.islink("/dev/stdout")


def test_a_symbolic_link_to_a_file_keeps_pointing_at_the_new_file(tmp_path):
    (tmp_path / "real.png").write_bytes(b"old")
    (tmp_path / "link.png").symlink_to("real.png")
    with fileio.atomic_path(tmp_path / "link.png") as tmp:
        tmp.write_bytes(b"new")
    assert os.readlink(tmp_path / "link.png") == "real.png" and (tmp_path / "real.png").read_bytes() == b"new"


# -- permissions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o664])
def test_a_replaced_file_keeps_its_mode(tmp_path, mode):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"old")
    target.chmod(mode)
    with fileio.atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and (target.stat().st_mode & 0o777) == mode


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_a_new_file_gets_the_umask_mode_and_the_umask_is_read_without_changing_it(tmp_path, monkeypatch, mask):
    old = os.umask(mask)
    try:

        def forbidden(*args):
            raise AssertionError("os.umask changes the process-wide umask; other threads would see it")

        monkeypatch.setattr(fileio.os, "umask", forbidden)
        assert fileio.umask() == mask
        with fileio.atomic_path(tmp_path / "new.png") as tmp:
            tmp.write_bytes(b"x")
        assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o666 & ~mask

        def no_proc(*args, **kwargs):
            raise FileNotFoundError("/proc/self/status")

        monkeypatch.setattr(fileio, "open", no_proc, raising=False)  # the fallback: a probe file's mode
        assert fileio.umask() == mask
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_a_read_only_file_is_refused_not_replaced(tmp_path):
    target = tmp_path / "keep.npz"
    target.write_bytes(b"precious")
    target.chmod(0o444)  # refused for root too: no write bit at all
    with pytest.raises(PermissionError, match=r"'.*keep\.npz': the file is read-only \(mode 0444\)"):
        with fileio.atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
    assert target.read_bytes() == b"precious" and _leftovers(tmp_path) == []


def test_a_folder_the_user_cannot_write_is_found_before_any_work():
    """As a user without write permission on the folder (root runs it as nobody)."""
    import subprocess
    import sys
    import tempfile

    folder = tempfile.mkdtemp()  # in /tmp, which every user can reach
    try:
        os.chmod(folder, 0o755)
        code = (
            "import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('fileio', {fileio.__file__!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "try:\n"
            f"    m.check_writable({folder + '/out.png'!r})\n"
            "except PermissionError as exc:\n"
            "    print(exc.strerror)\n"
        )
        user = {"user": 65534} if os.geteuid() == 0 else {}
        if not user:
            os.chmod(folder, 0o555)
        python = "/usr/bin/python3" if user else sys.executable  # nobody cannot read root's own Python
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, **user)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"cannot write {folder + '/out.png'!r}: Permission denied"
    finally:
        os.chmod(folder, 0o755)
        os.rmdir(folder)


def test_an_over_long_name_and_a_missing_folder_are_named(tmp_path):
    with pytest.raises(OSError, match=r"too long \(300 bytes; at most 255 here\)"):
        fileio.check_writable(tmp_path / ("a" * 296 + ".png"))
    with pytest.raises(FileNotFoundError, match=r"folder '.*nodir' does not exist"):
        fileio.check_writable(tmp_path / "nodir" / "g.png")
    long_name = tmp_path / ("b" * 250 + ".png")  # fits: the temporary files beside it must fit too
    with fileio.atomic_path(long_name) as tmp:
        tmp.write_bytes(b"ok")
    assert long_name.read_bytes() == b"ok"


def test_an_output_that_is_an_input_is_refused(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"model")
    os.link(tmp_path / "m.safetensors", tmp_path / "hard.safetensors")
    (tmp_path / "sym.safetensors").symlink_to("m.safetensors")
    for alias in ("m.safetensors", "hard.safetensors", "sym.safetensors", "./sub/../m.safetensors"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(ValueError, match="is the same file as the checkpoint"):
            fileio.refuse_inputs_as_outputs(
                {"--output": tmp_path / alias}, {"the checkpoint": tmp_path / "m.safetensors"}
            )
    fileio.refuse_inputs_as_outputs({"--output": tmp_path / "o.png"}, {"the checkpoint": tmp_path / "m.safetensors"})
    with pytest.raises(ValueError, match="--output and --npz are the same file"):
        fileio.refuse_inputs_as_outputs({"--output": tmp_path / "x", "--npz": tmp_path / "sub/../x"}, {})


def test_a_safetensors_write_error_names_the_file_and_the_os_cause(tmp_path):
    import torch
    from safetensors.torch import save_file

    with pytest.raises(OSError) as info:
        with fileio.naming("shown.safetensors"):
            save_file({"a": torch.zeros(2)}, str(tmp_path / "nodir" / "x.safetensors"))  # a real SafetensorError
    assert info.value.errno == 2
    assert info.value.strerror == "cannot write 'shown.safetensors': No such file or directory"
