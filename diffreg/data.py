"""Small built-in datasets for demos and tests; nothing is downloaded.

- ``digits``: scikit-learn's handwritten digits (1797 images, 8x8, 10 classes; the data ships
  inside scikit-learn), scaled to [-1, 1] and optionally resized.
- 2-D toys: ``moons``, ``swiss_roll``, ``gaussian_mixture`` (for the ``mlp`` model).
- Your data: ``folder`` (a folder of images) and ``npz`` (arrays).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "moons", "swiss_roll", "gaussian_mixture", "folder", "npz")
#: Largest image (width x height) the image-folder loader decodes: 64 megapixels, far above
#: any training image and below Pillow's decompression-bomb warning (about 89 megapixels).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_digits(image_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as images.

    Args:
        image_size: output H = W (8 is native; larger sizes are bilinear upsampling).

    Returns:
        ``(images, labels)``: float32 ``[1797, 1, image_size, image_size]`` in [-1, 1] (pixel
        values 0..16 mapped linearly), int64 ``[1797]`` in 0..9.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(-1, 1)
    return images.contiguous(), torch.from_numpy(bunch.target.astype(np.int64))


def toy_2d(name: str, n: int = 4096, seed: int = 0, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D toy data, roughly in [-1, 1]^2.

    Returns ``(x, labels)``: float32 ``[n, 2]`` and int64 ``[n]`` (the moon, the mixture
    component, or 0 for the swiss roll).
    """
    rng = np.random.default_rng(seed)
    if name == "moons":
        from sklearn.datasets import make_moons

        x, y = make_moons(n_samples=n, noise=noise, random_state=seed)
        x = (x - np.array([0.5, 0.25])) / np.array([1.1, 0.6])
    elif name == "swiss_roll":
        from sklearn.datasets import make_swiss_roll

        x3, _ = make_swiss_roll(n_samples=n, noise=noise * 10, random_state=seed)
        x = x3[:, [0, 2]] / 12.0
        y = np.zeros(n, dtype=np.int64)
    elif name == "gaussian_mixture":
        k = 8
        y = rng.integers(0, k, size=n)
        angles = 2 * math.pi * y / k
        centers = 0.75 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        x = centers + noise * rng.standard_normal((n, 2))
    else:
        raise ValueError(f"unknown toy dataset {name!r}; known: moons, swiss_roll, gaussian_mixture")
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)


def list_image_folder(path: str) -> tuple[list, list[int], list[str]]:
    """The images of a folder: ``(files, labels, classes)``. With sub-folders, each is a class
    (sorted names are labels 0..K-1) and its images are listed; without, the folder's own images
    (labels 0, ``classes`` empty). Suffixes: :data:`IMAGE_SUFFIXES`; sorted names.

    Raises:
        FileNotFoundError: no such folder. ValueError: no images in it.
    """
    from pathlib import Path

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes:
        files = [
            (f, k)
            for k, c in enumerate(classes)
            for f in sorted((root / c).iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
    else:
        files = [(f, 0) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {str(root)!r}")
    return [f for f, _ in files], [k for _, k in files], classes


def open_image(f):
    """``PIL.Image.open(f)`` refusing decompression bombs and images above :data:`MAX_IMAGE_PIXELS`
    (only the header is read). Raises ValueError naming the file."""
    from PIL import Image

    # Pillow checks an image's declared size when it opens it (the header only): a warning
    # above Image.MAX_IMAGE_PIXELS, an error above twice that; we refuse above our own bound
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(f)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"{str(f)!r} is too large to decode safely (a decompression bomb?): {exc}") from None
    except OSError as exc:
        raise ValueError(f"{str(f)!r} is not a readable image ({exc})") from exc
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        raise ValueError(
            f"{str(f)!r} is {width}x{height} = {width * height:,} pixels; image-folder images may have at "
            f"most {MAX_IMAGE_PIXELS:,} pixels (resize them first)"
        )
    return img


def image_defaults(first, image_size: int | None, channels: int | None) -> tuple[int, int]:
    """``(image_size, channels)``: the given ones, or the first image's width and mode (1 for
    grey modes, else 3). Raises ValueError for channels other than 1, 3 or a bad size."""
    with open_image(first) as img:
        channels = channels or (1 if img.mode in ("L", "1", "I;16", "I") else 3)
        image_size = image_size or img.size[0]
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not (isinstance(image_size, int) and not isinstance(image_size, bool) and image_size >= 1):
        raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
    return image_size, channels


def decode_image(f, image_size: int, channels: int) -> np.ndarray:
    """One image as uint8 ``[image_size, image_size, channels]``: converted to grey (1) or RGB (3),
    resized square with Lanczos. Raises ValueError naming the file (:func:`open_image`)."""
    from PIL import Image

    with open_image(f) as img:
        try:
            img = img.convert("L" if channels == 1 else "RGB")
            img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
        except OSError as exc:
            raise ValueError(f"{str(f)!r} is not a readable image ({exc})") from exc
        return np.array(img, dtype=np.uint8).reshape(image_size, image_size, channels)


def load_image_folder(
    path: str, image_size: int | None = None, channels: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Images from a folder, all in memory (training streams them instead:
    :class:`diffreg.data_loading.ImageFolderDataset`): one sub-folder per class (sorted names are
    labels 0..K-1), or flat (unlabelled). Read with Pillow, resized to ``image_size`` square
    (Lanczos; default: the first image's width), ``channels`` 1 (grey) or 3 (RGB; default: from
    the first image).

    Returns ``(images, labels, num_classes)``: float32 ``[N, C, S, S]`` in [-1, 1], int64 ``[N]``
    (zeros when unlabelled), ``K`` or ``None``.

    Raises:
        FileNotFoundError: no such folder. ValueError: no images in it, a bad ``channels``, an
        unreadable image, or one larger than :data:`MAX_IMAGE_PIXELS` or Pillow's decompression-bomb
        limit (naming the file).
    """
    files, labels, classes = list_image_folder(path)
    image_size, channels = image_defaults(files[0], image_size, channels)
    arrays = [decode_image(f, image_size, channels) for f in files]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images.contiguous(), torch.tensor(labels, dtype=torch.long), (len(classes) if classes else None)


def read_npz_arrays(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(arr_0, arr_1 or None)`` of an ``.npz`` read whole with ``allow_pickle=False``.

    Raises:
        ValueError: not an npz archive, a single array, no ``arr_0``, object arrays.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{str(path)!r} is not an .npz archive of arrays ({exc})") from exc
    if not hasattr(archive, "files"):  # a bare .npy array
        raise ValueError(f"{str(path)!r} is a single array; expected an .npz archive with arr_0 (and arr_1)")
    with archive as f:
        if "arr_0" not in f:
            raise ValueError(f"{str(path)!r} has no arr_0 (found: {', '.join(f.files)})")
        try:
            data = f["arr_0"]
            labels = f["arr_1"] if "arr_1" in f else None
        except ValueError as exc:  # object arrays: reading them would unpickle, which we never do
            raise ValueError(
                f"{str(path)!r} holds pickled Python objects (an object array), which diffreg never loads; "
                f"save plain numeric arrays (np.savez(path, arr_0=images, arr_1=labels)) ({exc})"
            ) from None
    return data, labels


def check_npz_arrays(data: np.ndarray, labels: np.ndarray | None, path: str) -> tuple[np.ndarray | None, int | None]:
    """Check the layout of ``arr_0`` (NHWC images or ``[N, D]`` vectors, at least one example) and
    ``arr_1`` (one integer label 0..9999 per example). Returns ``(labels, num_classes)`` (``None,
    None`` when unlabelled; ``num_classes = max + 1``). Raises ValueError naming what is wrong."""
    if data.ndim not in (2, 4):
        raise ValueError(f"arr_0 must be NHWC images or [N, D] vectors, got shape {data.shape}")
    if labels is None:
        if data.shape[0] == 0:
            raise ValueError(f"{str(path)!r} holds no examples")
        return None, None
    if labels.shape != (data.shape[0],):
        raise ValueError(f"arr_1 must hold one label per example ({data.shape[0]}), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"arr_1 labels must be integers, got dtype {labels.dtype}")
    if data.shape[0] == 0:
        raise ValueError(f"{str(path)!r} holds no examples")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= 10_000:
        raise ValueError(f"arr_1 labels must be in 0..9999 (class indices), got {low}..{high}")
    return np.asarray(labels, dtype=np.int64), high + 1


def load_npz(path: str) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Arrays from an ``.npz`` (read with ``allow_pickle=False``), all in memory (training streams
    them instead: :class:`diffreg.data_loading.ArrayFileDataset`): ``arr_0`` images NHWC (pixel
    values 0..255 as any integer or float dtype, mapped to [-1, 1]; or floats already in [-1, 1])
    or vectors ``[N, D]`` (as they are); optional ``arr_1``
    integer labels (then ``num_classes = max + 1``). The layout ``diffreg sample --npz`` writes.

    Raises:
        FileNotFoundError: no such file. ValueError: missing ``arr_0``, images outside 0..255 and
        [-1, 1] (naming the range found), or mismatched labels.
    """
    from pathlib import Path

    if not Path(path).is_file():
        raise FileNotFoundError(f"npz file {str(path)!r} does not exist")
    data, labels = read_npz_arrays(path)
    labels, num_classes = check_npz_arrays(data, labels, path)
    if data.ndim == 4:
        pixels = pixel_mapping(data, path)
        x = data.astype(np.float32)
        x = torch.from_numpy(x / np.float32(127.5) - np.float32(1.0) if pixels else x).permute(0, 3, 1, 2)
    else:
        x = torch.from_numpy(data.astype(np.float32))
    y = torch.zeros(x.shape[0], dtype=torch.long) if labels is None else torch.from_numpy(labels)
    return x.contiguous(), y, num_classes


def pixel_mapping(data: np.ndarray, path: str, chunk_bytes: int = 64 * 1024 * 1024) -> bool:
    """Whether NHWC images ``data`` are pixel values to map by ``v / 127.5 - 1`` (True) or floats
    already in [-1, 1] to keep (False); ``[N, D]`` vectors are kept (False). Integers (any
    integer dtype) and floats spanning more than [-1, 1] but within 0..255 are pixel values. The
    range is read in chunks of about ``chunk_bytes`` (a memory-mapped array is never loaded whole).

    Raises ``ValueError`` naming the file, the dtype and the range found for anything else
    (negative pixel codes, values above 255, NaN or infinity, booleans, strings).
    """
    if data.ndim != 4:
        return False
    if data.dtype == np.bool_ or not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise ValueError(f"{str(path)!r}: arr_0 images must be integers 0..255 or floats, got dtype {data.dtype}")
    if data.dtype == np.uint8:
        return True
    if data.size == 0:
        return False
    floating = np.issubdtype(data.dtype, np.floating)
    rows = max(1, chunk_bytes // max(1, data[0].nbytes))
    low, high = None, None
    for i in range(0, data.shape[0], rows):
        part = np.asarray(data[i : i + rows])
        if floating and not np.isfinite(part).all():
            raise ValueError(f"{str(path)!r}: arr_0 images hold NaN or infinite values")
        lo, hi = part.min(), part.max()
        low = lo if low is None else min(low, lo)
        high = hi if high is None else max(high, hi)
    if floating and low >= -1 and high <= 1:
        return False
    if low >= 0 and high <= 255:
        return True
    raise ValueError(
        f"{str(path)!r}: arr_0 images ({data.dtype}) span {low}..{high}; accepted: pixel values 0..255 "
        "(integers or floats) or floats in [-1, 1]"
    )


def load_dataset(name: str, **options) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Load a built-in dataset by name: ``(x, labels, num_classes)``.

    Raises ``ValueError`` for an unknown name (listing the known ones).
    """
    if name == "digits":
        x, y = load_digits(**options)
        return x, y, 10
    if name in ("moons", "swiss_roll", "gaussian_mixture"):
        x, y = toy_2d(name, **options)
        return x, y, {"moons": 2, "swiss_roll": None, "gaussian_mixture": 8}[name]
    if name == "folder":
        return load_image_folder(**options)
    if name == "npz":
        return load_npz(**options)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
