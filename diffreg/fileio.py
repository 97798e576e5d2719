"""Atomic file writes: write beside the target, fsync, then rename over it, so an interrupted
write never leaves a half-written file where a good one was.

What is not a regular file (``/dev/null``, ``/dev/stdout``, a FIFO, any device node) is written
through, never renamed over. An existing file keeps its mode (and, for root, its owner); a file
with no write permission is refused, not replaced. Checks run before any work
(:func:`check_writable`, :func:`refuse_inputs_as_outputs`), so a bad output path costs nothing.
SIGTERM / SIGHUP during a write remove its temporary files before the process ends
(:func:`cleanup_on_termination`); :func:`shown` prints any name the OS takes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

_NAME_IN_TEMP = 60  # characters of the target's name kept in a temporary file's name
#: Signals that end a process by default and can be caught: while a write is in progress they
#: unwind it (its temporary files are removed), then end the process as the signal would have.
CLEANUP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(BaseException):
    """Raised in the main thread when a :data:`CLEANUP_SIGNALS` signal arrives inside
    :func:`cleanup_on_termination`: not an ``Exception``, so only ``finally`` blocks and cleanup
    handlers (``except BaseException: ...; raise``) see it on its way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_termination = threading.local()


@contextlib.contextmanager
def cleanup_on_termination() -> Iterator[None]:
    """Turn SIGTERM / SIGHUP (:data:`CLEANUP_SIGNALS`) into :class:`Terminated` while the body runs,
    so cleanup code runs (the temporary files of :func:`atomic_paths` are removed, a replacement in
    progress is undone); when the outermost such block is left by it, the process ends by that same
    signal (exit status 128 + 15 = 143 for SIGTERM, as without this handler), after flushing stdout
    and stderr. Nested blocks share the outermost one's handler.

    Only where the signal's disposition is the default (which ends the process): a handler the
    program installed, or ``SIG_IGN`` (``nohup``), is left as it is; so is a thread other than the
    main one (Python runs handlers there only) and a forked child (it gets the default back).
    SIGKILL cannot be caught: a process killed by it can leave ``.<name>.*.tmp`` files beside its
    targets (never a damaged target); they are safe to delete.
    """
    depth = getattr(_termination, "depth", 0)
    if depth or threading.current_thread() is not threading.main_thread():
        _termination.depth = depth + 1
        try:
            yield
        finally:
            _termination.depth = depth
        return
    owner = os.getpid()
    fired: list[int] = []

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked child (a data-loader worker): end as the default would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if not fired:  # once: a second signal must not interrupt the cleanup of the first
            fired.append(signum)
            raise Terminated(signum)

    installed = {}
    for signum in CLEANUP_SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signum) == signal.SIG_DFL:
                installed[signum] = signal.signal(signum, handler)
    _termination.depth = 1
    try:
        yield
    except Terminated as exc:
        fired[:] = fired or [exc.signum]
    finally:
        _termination.depth = 0
        for signum, previous in installed.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, previous)
    if fired:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.kill(os.getpid(), fired[0])  # the default disposition is back: the process ends here
        raise Terminated(fired[0])  # pragma: no cover - only if the signal was blocked meanwhile


def umask() -> int:
    """The process's umask, read without changing it (``os.umask`` would set it for a moment,
    and other threads would create files with the wrong mode in that window).

    Source: ``Umask:`` in ``/proc/self/status`` (Linux >= 4.7); elsewhere the mode of a file
    created with mode 0o777 in a new private temporary folder (the kernel applies the umask to it).
    """
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8) & 0o777
    folder = tempfile.mkdtemp(prefix=".diffreg-umask.")
    try:
        probe = os.path.join(folder, "probe")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o777))
        return 0o777 & ~stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, "probe"))
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def shown(path: str | os.PathLike[str] | bytes) -> str:
    """``path`` as text any terminal or log can print: a name the OS took that is not valid in the
    file system's encoding (bytes such as ``0xff`` on a UTF-8 system, which Python holds as lone
    surrogates) gets those bytes as ``\\xNN`` escapes, as ``ls -b`` shows them; every other name
    is unchanged. Printing the raw name would raise ``UnicodeEncodeError`` on a strict stream
    (``PYTHONIOENCODING=utf-8``, a test runner's capture) after the file was written."""
    raw = os.fsencode(path)
    return raw.decode(sys.getfilesystemencoding(), "backslashreplace")


def _default_mode() -> int:
    return 0o666 & ~umask()


def writes_through(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is written in place rather than replaced: it exists and is not a regular
    file (a device node such as ``/dev/null``, a FIFO, a socket, a terminal), or it names an open
    stream through ``/proc`` (``/dev/stdout``, ``/dev/fd/N``)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode)) or os.path.realpath(path).startswith("/proc/")


def _where(path: str | os.PathLike[str]) -> Path:
    """The file a write to ``path`` replaces: ``path`` with symbolic links resolved (a link to a
    file keeps pointing at the new file)."""
    return Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)


def check_writable(path: str | os.PathLike[str], *, probe: bool = True) -> None:
    """Check that :func:`atomic_paths` can write ``path``, before any work is done.

    Refused: a directory; a missing folder; a name longer than the file system allows; an existing
    file without write permission (for root too: no write bit at all); a folder where no file can
    be created (``probe``: one is created and removed, which also finds read-only mounts and a
    full quota). A device node, FIFO or ``/dev/stdout`` only needs to be writable.

    Raises:
        IsADirectoryError, FileNotFoundError, PermissionError or OSError: naming ``path`` and why.
    """
    shown = repr(str(path))
    if writes_through(path):
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, f"cannot write {shown}: permission denied")
        return
    target = _where(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {shown}: folder {str(folder)!r} does not exist")
    limit = 255  # NAME_MAX of every common Linux, macOS and Windows file system
    with contextlib.suppress(OSError, ValueError):
        limit = os.pathconf(folder, "PC_NAME_MAX")
    if len(os.fsencode(target.name)) > limit:
        raise OSError(
            errno.ENAMETOOLONG,
            f"cannot write {shown}: the file name is too long ({len(os.fsencode(target.name))} bytes; "
            f"at most {limit} here)",
        )
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot write {shown}: it is a directory; give a file name")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and (not os.access(target, os.W_OK) or not st.st_mode & 0o222):
        raise PermissionError(
            errno.EACCES,
            f"cannot write {shown}: the file is read-only (mode {stat.S_IMODE(st.st_mode):04o}); "
            "make it writable or choose another file",
        )
    if probe:
        _temporary_beside(target, shown).unlink()


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` are one file: the same inode when both exist (hard links, symbolic
    links, ``./x`` and ``x``), else the same resolved path."""
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_inputs_as_outputs(
    outputs: Mapping[str, str | os.PathLike[str] | None], inputs: Mapping[str, str | os.PathLike[str] | None]
) -> None:
    """Refuse, before any work, to write a file that is also read (the input would be destroyed
    by the output), and to write one file twice. Keys describe each path (``"--output"``,
    ``"data.path"``); ``None`` values are skipped.

    Raises:
        ValueError: naming both descriptions and the path.
    """
    outs = [(k, v) for k, v in outputs.items() if v is not None and str(v) != ""]
    ins = [(k, v) for k, v in inputs.items() if v is not None and str(v) != ""]
    for i, (out_name, out) in enumerate(outs):
        for in_name, inp in ins:
            if same_file(out, inp):
                raise ValueError(
                    f"{out_name} {str(out)!r} is the same file as {in_name} {str(inp)!r}: writing it would destroy "
                    "the input; choose another output"
                )
        for other_name, other in outs[i + 1 :]:
            if same_file(out, other):
                raise ValueError(f"{out_name} and {other_name} are the same file {str(out)!r}")


@contextlib.contextmanager
def naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise an error from writing ``path`` (an OSError, or a safetensors error wrapping one,
    such as a full disk) as an OSError that names ``path`` and the cause."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {str(path)!r}: {_cause(exc)}") from exc
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        code = re.search(r"(?:os error |code: )(\d+)", str(exc))
        number = int(code.group(1)) if code else errno.EIO
        cause = os.strerror(number) if code else str(exc)
        raise OSError(number, f"cannot write {str(path)!r}: {cause}") from exc


def _cause(exc: OSError) -> str:
    """The reason in ``exc``, without the ``cannot write '...': `` prefix an inner layer added."""
    return re.sub(r"^cannot write (?:'[^']*'|\"[^\"]*\"): ", "", exc.strerror or str(exc))


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

    A replaced file keeps its mode (root: its owner too); a new one gets ``0o666 & ~umask``. A
    symbolic link to a file keeps pointing at it (the file it names is replaced). A target that is
    not a regular file (:func:`writes_through`: ``/dev/null``, a FIFO, ``/dev/stdout``) is written
    in place after the others were replaced (a FIFO with no reader is refused rather than waited on).
    SIGTERM or SIGHUP while this runs unwinds it like an error, then ends the process by the signal
    (:func:`cleanup_on_termination`).

    Raises:
        FileNotFoundError: a target's folder does not exist. PermissionError: a target is
        read-only. OSError: naming the target it could not write (also for errors the body raises
        while writing a temporary file).
    """
    through = [writes_through(p) for p in paths]
    targets = [Path(p) if t else _where(p) for p, t in zip(paths, through, strict=True)]
    for path, passes in zip(paths, through, strict=True):
        check_writable(path, probe=False)
    temps: list[Path] = []
    with cleanup_on_termination(), _removing(temps):
        for index, (target, passes) in enumerate(zip(targets, through, strict=True)):
            temps.append(_temporary_elsewhere(target) if passes else _temporary_beside(target, repr(str(paths[index]))))
        try:
            yield list(temps)
        except OSError as exc:
            raise _naming_target(exc, dict(zip(temps, targets, strict=False))) from exc
        for tmp, target, passes in zip(temps, targets, through, strict=True):
            if passes:
                continue
            with naming(target):
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                _give_mode(tmp, target)
        replaced = [(tmp, target) for tmp, target, passes in zip(temps, targets, through, strict=True) if not passes]
        streams = [(tmp, target) for tmp, target, passes in zip(temps, targets, through, strict=True) if passes]
        _replace_all([t for t, _ in replaced], [t for _, t in replaced], then=lambda: _write_through(streams))


@contextlib.contextmanager
def _removing(temps: list[Path]) -> Iterator[None]:
    """Remove every file in ``temps`` (as it is when the block ends), however the block ends."""
    try:
        yield
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _give_mode(tmp: Path, target: Path) -> None:
    """The mode (and, as root, the owner) the replaced file had; else the umask's default."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; give the usual umask-based mode
        return
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
        with contextlib.suppress(OSError):
            os.chown(tmp, st.st_uid, st.st_gid)
    os.chmod(tmp, stat.S_IMODE(st.st_mode) & 0o777)


def _temporary_beside(target: Path, shown: str | None = None) -> Path:
    shown = shown or repr(str(target))
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {shown}: folder {str(folder)!r} does not exist")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name[:_NAME_IN_TEMP]}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {shown}: {exc.strerror or exc}") from exc
    os.close(fd)
    return Path(name)


def _temporary_elsewhere(target: Path) -> Path:
    """A temporary file in the system's temporary folder, for a target that is written through."""
    try:
        fd, name = tempfile.mkstemp(prefix=".diffreg.", suffix=".tmp")
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {str(target)!r}: no temporary file: {exc.strerror or exc}") from exc
    os.close(fd)
    return Path(name)


def _write_through(streams: list[tuple[Path, Path]]) -> None:
    """Copy each temporary file into its target in place (device, FIFO, open stream)."""
    for tmp, target in streams:
        with naming(target):
            try:
                # a FIFO nobody reads would block forever: refuse it instead
                fd = os.open(target, os.O_WRONLY | os.O_NONBLOCK | os.O_APPEND)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    raise OSError(errno.ENXIO, "no process is reading from it (a FIFO needs a reader)") from exc
                raise
            os.set_blocking(fd, True)
            with os.fdopen(fd, "wb") as out, open(tmp, "rb") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)


def _naming_target(exc: OSError, target_of: dict[Path, Path]) -> OSError:
    """``exc`` re-worded to name the target whose temporary file it concerns (else every target)."""
    if not exc.filename and (exc.strerror or "").startswith("cannot write "):
        return exc  # already names its file (:func:`naming`)
    filename = Path(exc.filename) if exc.filename else None
    target = target_of.get(filename) if filename is not None else None
    names = str(target) if target is not None else ", ".join(str(t) for t in target_of.values())
    return OSError(exc.errno, f"cannot write {names!r}: {_cause(exc)}")


def _replace_all(temps: list[Path], targets: list[Path], then: Callable[[], None] = lambda: None) -> None:
    """Move each temporary file over its target, keeping a hard link to each old target until all
    are in place (so no target is ever missing), then call ``then``; on any failure or
    interruption, put back what was already replaced."""
    for target in targets:
        if target.is_dir():
            raise IsADirectoryError(errno.EISDIR, f"cannot write {str(target)!r}: it is a directory")
    done: list[tuple[Path, Path | None]] = []  # (target, a link to its old file, or None: there was none)
    current = targets[0] if targets else None
    try:
        for index, (tmp, target) in enumerate(zip(temps, targets, strict=True)):
            current = target
            old = None
            if os.path.lexists(target):
                old = target.with_name(f".{target.name[:_NAME_IN_TEMP]}.{os.getpid()}.{index}.old.tmp")
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
                try:
                    os.link(target, old, follow_symlinks=False)
                except OSError:  # no hard links here (FAT, some network mounts): move it aside
                    os.replace(target, old)
            done.append((target, old))
            os.replace(tmp, target)  # atomic: the target is the old file, then the new one
        current = None
        then()
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
        if current is None:  # ``then`` failed: its error names its file
            raise OSError(exc.errno, f"{exc.strerror or exc}{where}") from exc
        raise OSError(exc.errno, f"cannot write {str(current)!r}: {_cause(exc)}{where}") from exc
    for _, old in done:
        if old is not None:
            with contextlib.suppress(OSError):
                old.unlink()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)
