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
