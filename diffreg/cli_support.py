"""Helpers of the ``diffreg sample`` / ``diffreg train`` commands: class labels and how they are
recorded, the picture of a run (a capped grid laid out by label, or a scatter plot), the file
formats chosen by suffix, writing the samples before the picture, and the CPU thread count."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffreg.fileio import atomic_path

#: The label ``arr_1`` records for a sample drawn without a class (``--class-label none``).
NO_LABEL = -1
#: Largest ``--grid-max``: a picture of at most this many samples (100 x 100 tiles).
MAX_GRID = 10_000
#: Picture suffixes and the Pillow format each writes (those this Pillow cannot save are dropped).
PICTURE_SUFFIXES = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


# -- labels -------------------------------------------------------------------------------------------


def parse_labels(
    spec: str, num_classes: int | None, count: int, null_class: int | None = None
) -> torch.Tensor | None:
    """The model's labels for ``count`` samples (int64 ``[count]``), or ``None`` for an
    unconditional checkpoint: ``all`` (cycle 0..K-1), ``none`` (every sample unconditional: the
    model's ``null_class``, default ``num_classes``), an int, or a comma list (cycled).

    Raises ``ValueError`` naming a label outside ``[0, num_classes)``, ``none`` for a model without
    a null class, or a label on an unconditional checkpoint.
    """
    spec = spec.strip().lower()
    if num_classes is None:
        if spec not in ("all", "none"):
            raise ValueError(f"--class-label {spec!r}: this checkpoint is unconditional (it has no classes)")
        return None
    if spec == "none":
        if null_class is None:
            raise ValueError(
                "--class-label none: this model has no null class (it was trained without label dropout), "
                "so it cannot sample without a label; give 'all', a label or a comma list"
            )
        return torch.full((count,), null_class, dtype=torch.long)
    if spec == "all":
        return torch.arange(count, dtype=torch.long) % num_classes
    values = label_list(spec, num_classes)
    return torch.tensor(values, dtype=torch.long).repeat(math.ceil(count / len(values)))[:count]


def label_list(spec: str, num_classes: int) -> list[int]:
    """The ints of a ``--class-label`` list such as ``'1,7'``; ``ValueError`` naming the spec."""
    try:
        values = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"--class-label {spec!r}: expected 'all', 'none', an int or a comma list of ints such as '1,3,5'"
        ) from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if not values or bad:
        raise ValueError(f"--class-label {spec!r}: labels must be in 0..{num_classes - 1} for this checkpoint")
    return values


def recorded_labels(spec: str, labels: torch.Tensor | None) -> np.ndarray | None:
    """What ``arr_1`` records: the labels asked for, :data:`NO_LABEL` (-1) for ``none``, and
    nothing (``None``: no ``arr_1``, as guided-diffusion's ``image_sample.py`` writes for an
    unconditional model) for an unconditional checkpoint. int64 ``[N]``."""
    if labels is None:
        return None
    if spec.strip().lower() == "none":
        return np.full(labels.shape[0], NO_LABEL, dtype=np.int64)
    return labels.numpy().astype(np.int64)


def label_columns(spec: str, num_classes: int | None) -> int | None:
    """Columns of the picture: one per requested label (``all``: every class; ``'1,7'``: two), so
    each column holds one label; ``None`` (a square grid) for one label, ``none``, or no classes."""
    spec = spec.strip().lower()
    if num_classes is None or spec == "none":
        return None
    if spec == "all":
        return num_classes
    count = len(spec.split(","))
    return count if count > 1 else None


# -- the picture ----------------------------------------------------------------------------------------


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` floats in [-1, 1] -> uint8 ``[N, H, W, C]`` (the layout of guided-diffusion's
    evaluator: ``(x + 1) * 127.5``, rounded and clamped)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, ncols: int, cell: int = 32, pad: int = 2):
    """A Pillow image tiling uint8 NHWC ``images`` in rows of ``ncols`` (row-major, so with labels
    cycled over ``ncols`` values each column holds one label), each upscaled (nearest) to about
    ``cell`` pixels."""
    from PIL import Image

    n, h, w, c = images.shape
    scale = max(1, cell // max(h, w))
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    grid = Image.new("L" if c == 1 else "RGB", (ncols * (w * scale + pad) + pad, nrows * (h * scale + pad) + pad), 0)
    for k in range(n):
        arr = images[k, :, :, 0] if c == 1 else images[k, :, :, :3]
        tile = Image.fromarray(arr).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        r, col = divmod(k, ncols)
        grid.paste(tile, (pad + col * (w * scale + pad), pad + r * (h * scale + pad)))
    return grid


def scatter_image(points: np.ndarray, size: int = 512):
    """A Pillow scatter plot of ``[N, 2]`` points (for 2-D toy models; vectorized: 3x3-pixel dots,
    so millions of points take about a second)."""
    from PIL import Image

    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    pts = np.asarray(points, dtype=np.float64)[:, :2]
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts):
        lim = max(1.5, float(np.abs(pts).max()) * 1.05)
        px = np.clip(((pts[:, 0] / lim + 1) / 2 * size).astype(np.int64), 1, size - 2)
        py = np.clip(((1 - (pts[:, 1] / lim + 1) / 2) * size).astype(np.int64), 1, size - 2)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                canvas[py + dy, px + dx] = (30, 80, 200)
    return Image.fromarray(canvas)


def run_picture(x: torch.Tensor | np.ndarray, columns: int | None, grid_max: int):
    """The picture of a run: for images (uint8 NHWC), a grid of the first ``grid_max`` laid out in
    ``columns`` (``None``: as square as possible); for vectors ``[N, 2]``, a scatter plot of all."""
    if isinstance(x, np.ndarray) and x.ndim == 4:
        shown = x[:grid_max]
        ncols = columns if columns is not None else math.ceil(math.sqrt(len(shown)))
        return image_grid(shown, ncols)
    return scatter_image(np.asarray(x))


# -- files -----------------------------------------------------------------------------------------------


def picture_format(path: Path | None, flag: str = "--output") -> str | None:
    """The Pillow format ``path``'s suffix asks for (case-insensitive), ``None`` for no picture.

    Raises ``ValueError`` naming the path and the accepted suffixes.
    """
    if path is None:
        return None
    from PIL import Image

    Image.init()
    accepted = {s: f for s, f in PICTURE_SUFFIXES.items() if f in Image.SAVE}
    suffix = path.suffix.lower()
    if suffix not in accepted:
        given = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise ValueError(f"{flag} {str(path)!r}: {given}; accepted: {', '.join(accepted)}")
    return accepted[suffix]


def check_npz_name(path: Path | None, flag: str = "--npz") -> None:
    """Refuse an ``--npz`` name that does not end in ``.npz`` (numpy would read it back under
    another name), naming it."""
    if path is not None and path.suffix.lower() != ".npz":
        raise ValueError(f"{flag} {str(path)!r}: the samples are an .npz archive; give a name ending in .npz")


def write_run(
    npz_path: Path | None,
    arrays: Mapping[str, np.ndarray],
    picture_path: Path | None,
    make_picture: Callable[[], Any],
) -> list[str]:
    """Write the samples first, then the picture, each atomically on its own: a picture that fails
    (too big, out of memory, disk full) never costs the samples. Returns what was written.

    Raises:
        PictureError: the picture failed after the samples were written (naming both).
        OSError: the samples could not be written (nothing was, the picture neither).
    """
    written: list[str] = []
    if npz_path is not None:
        with atomic_path(npz_path) as tmp, open(tmp, "wb") as fh:  # straight to disk: no copy in memory
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        written.append(str(npz_path))
    if picture_path is not None:
        try:
            fmt = picture_format(picture_path)
            picture = make_picture()
            options: dict[str, Any] = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
            with atomic_path(picture_path) as tmp:
                picture.save(tmp, format=fmt, **options)
        except (OSError, MemoryError, ValueError, RuntimeError) as exc:
            kept = f"the samples are in {str(npz_path)!r}; " if npz_path is not None else ""
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            raise PictureError(f"{kept}the picture {str(picture_path)!r} was not written: {reason}") from exc
        written.append(str(picture_path))
    return written


class PictureError(RuntimeError):
    """The picture of a run could not be written (the samples were, if asked for)."""


# -- threads ------------------------------------------------------------------------------------------


def default_threads(environ: Mapping[str, str] | None = None) -> int:
    """CPU threads for torch when ``--threads`` is not given: ``OMP_NUM_THREADS`` if set, else the
    cores this process may use that the machine's 1-minute load average leaves idle (rounded, at
    least 1). On a busy machine torch's default (one thread per core)
    fights the other processes: 10-step sampling took 13-24 s with 2 threads against 1.3 s with one
    on a 2-core machine at load 7."""
    env = os.environ if environ is None else environ
    explicit = env.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        load = 0.0
    idle = int(cores - load + 0.5)
    return max(1, min(cores, idle))


#: Most CPU threads accepted: torch's thread pool crashes the process (SIGSEGV) when asked for
#: about 100,000; no machine has more than a few thousand cores.
MAX_THREADS = 4096


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (``None``: :func:`default_threads`); returns it.

    Raises:
        ValueError: ``threads`` (or ``OMP_NUM_THREADS`` behind the default) above :data:`MAX_THREADS`.
    """
    count = default_threads() if threads is None else int(threads)
    if count > MAX_THREADS:
        source = "--threads (or DIFFREG_THREADS)" if threads is not None else "OMP_NUM_THREADS"
        raise ValueError(f"{source} = {count:,}: at most {MAX_THREADS:,} CPU threads are accepted")
    torch.set_num_threads(count)
    return count
