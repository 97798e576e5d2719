"""Atomic file writes: write beside the target, fsync, then rename over it, so an interrupted
write never leaves a half-written file where a good one was."""

from __future__ import annotations

import contextlib
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
    on error it is removed and ``path`` is untouched.

    Raises:
        FileNotFoundError: the target's folder does not exist.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: folder {str(folder)!r} does not exist")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {str(target)!r}: {exc.strerror}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; give the usual umask-based mode
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise OSError(exc.errno, f"cannot write {str(target)!r}: {exc.strerror or exc}") from exc
        raise


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """:func:`atomic_path` for several files that belong together: yield one temporary path per
    target; the targets are replaced only once every file was written (so a failure on the last
    one leaves none of them changed), and on error every temporary file is removed.

    Raises:
        FileNotFoundError: a target's folder does not exist.
    """
    with contextlib.ExitStack() as stack:
        temps = [stack.enter_context(atomic_path(p)) for p in paths]
        yield temps
        # leaving the stack replaces the targets, last one first; all writing is done by then


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)
