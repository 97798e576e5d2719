"""Atomic file writes: write beside the target, fsync, then rename over it, so an interrupted
write never leaves a half-written file where a good one was."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path`` atomically,
    on error it is removed and ``path`` is untouched (:func:`atomic_paths` with one target).

    Raises:
        FileNotFoundError: the target's folder does not exist. OSError: naming the target.
    """
    with atomic_paths(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """:func:`atomic_path` for several files that belong together: yield one temporary path per
    target (in each target's folder). Once the body has written them all, every temporary file is
    synced, then the targets are replaced one by one, each by one atomic rename while a hard link
    keeps its old file; if a replacement fails or is interrupted, the ones already made are undone,
    so the targets end up all new or all as they were. On error every temporary file is removed.

    Raises:
        FileNotFoundError: a target's folder does not exist. OSError: naming the target it
        could not write (also for errors the body raises while writing a temporary file).
    """
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for target in targets:
            temps.append(_temporary_beside(target))
        try:
            yield list(temps)
        except OSError as exc:
            raise _naming_target(exc, dict(zip(temps, targets, strict=False))) from exc
        for tmp, target in zip(temps, targets, strict=True):
            try:
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.chmod(tmp, _default_mode())  # mkstemp makes 0600; give the usual umask-based mode
            except OSError as exc:
                raise OSError(exc.errno, f"cannot write {str(target)!r}: {exc.strerror or exc}") from exc
        _replace_all(temps, targets)
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _temporary_beside(target: Path) -> Path:
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: folder {str(folder)!r} does not exist")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {str(target)!r}: {exc.strerror}") from exc
    os.close(fd)
    return Path(name)


def _naming_target(exc: OSError, target_of: dict[Path, Path]) -> OSError:
    """``exc`` re-worded to name the target whose temporary file it concerns (else every target)."""
    filename = Path(exc.filename) if exc.filename else None
    target = target_of.get(filename) if filename is not None else None
    names = str(target) if target is not None else ", ".join(str(t) for t in target_of.values())
    return OSError(exc.errno, f"cannot write {names!r}: {exc.strerror or exc}")


def _replace_all(temps: list[Path], targets: list[Path]) -> None:
    """Move each temporary file over its target, keeping a hard link to each old target until all
    are in place (so no target is ever missing); on any failure or interruption, put back what was
    already replaced."""
    for target in targets:
        if target.is_dir():
            raise IsADirectoryError(errno.EISDIR, f"cannot write {str(target)!r}: it is a directory")
    done: list[tuple[Path, Path | None]] = []  # (target, a link to its old file, or None: there was none)
    current = targets[0]
    try:
        for tmp, target in zip(temps, targets, strict=True):
            current = target
            old = None
            if os.path.lexists(target):
                old = target.with_name(f".{target.name}.{os.getpid()}.old.tmp")
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
                try:
                    os.link(target, old, follow_symlinks=False)
                except OSError:  # no hard links here (FAT, some network mounts): move it aside
                    os.replace(target, old)
            done.append((target, old))
            os.replace(tmp, target)  # atomic: the target is the old file, then the new one
    except BaseException as exc:
        lost = []
        for replaced, old in reversed(done):
            try:
                if old is not None:
                    os.replace(old, replaced)  # a no-op when both still name the old file
                    with contextlib.suppress(FileNotFoundError):
                        old.unlink()
                elif os.path.lexists(replaced):
                    replaced.unlink()
            except OSError:
                lost.append(f"{str(replaced)!r} (its previous content is in {str(old)!r})")
        if not isinstance(exc, OSError):
            raise
        where = f"; could not put back {', '.join(lost)}" if lost else ""
        raise OSError(exc.errno, f"cannot write {str(current)!r}: {exc.strerror or exc}{where}") from exc
    for _, old in done:
        if old is not None:
            with contextlib.suppress(OSError):
                old.unlink()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)
