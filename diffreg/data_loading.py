"""Training data as a stream: datasets read lazily (image folders decoded with Pillow one image at
a time, ``.npz``/``.npy`` arrays memory-mapped), the deterministic index stream every rank shares,
and the per-rank micro-batches of it, through ``torch.utils.data.DataLoader`` (workers, pinned
memory on CUDA).

The order of examples is a property of the run, not of the process count: epoch ``e`` visits
``torch.randperm(N)`` drawn from a generator seeded with ``(seed, e)``; global position ``p`` (the
``p``-th example the run consumes) is ``perm_{p // N}[p % N]``. Optimizer step ``s`` takes
positions ``[s B, (s + 1) B)`` (``B`` the global batch), cut into ``world * grad_accum`` chunks of
``B / (world * grad_accum)``: accumulation round ``a`` of rank ``r`` is chunk ``a * world + r``. So
a run resumes exactly from its step (``epoch = s B // N``, ``offset = s B % N``), and two processes
see the same global batch as one process accumulating two micro-batches (as torch's
``DistributedSampler`` shards, but without padding: the stream never ends).

Small built-in datasets (digits, 2-D toys) stay whole on the device and are indexed directly.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

if TYPE_CHECKING:  # pragma: no cover
    from diffreg.config import ComponentSpec

#: Files up to this total size are fingerprinted by their full content; above, by names, sizes
#: and the first and last MiB of each array (reading a large dataset through at every resume
#: would take minutes).
FINGERPRINT_FULL_BYTES = 256 * 1024 * 1024


def seed_for(*words: int) -> int:
    """A 64-bit seed from integers (numpy's ``SeedSequence``: distinct inputs give independent
    streams; negative integers are taken modulo 2**64)."""
    state = np.random.SeedSequence([int(w) % 2**64 for w in words]).generate_state(2, np.uint32)
    return int(state[0]) | (int(state[1]) << 32)


class IndexStream:
    """The run's global order of example indices: a fresh permutation of ``range(size)`` per epoch
    (``torch.randperm`` seeded with ``seed_for(seed, epoch)``), endless.

    Args:
        size: number of examples N >= 1. seed: the run's seed.
    """

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError(f"a dataset needs at least one example, got {size}")
        self.size, self.seed = int(size), int(seed)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        """int64 ``[N]``: the order of epoch ``epoch``."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(seed_for(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g)
        return self._perm

    def take(self, start: int, count: int) -> torch.Tensor:
        """int64 ``[count]``: the indices at global positions ``start .. start + count - 1``."""
        parts, position = [], start
        while position < start + count:
            epoch, offset = divmod(position, self.size)
            n = min(self.size - offset, start + count - position)
            parts.append(self.permutation(epoch)[offset : offset + n])
            position += n
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


class RankBatches(Sampler[list[int]]):
    """This rank's micro-batches of the :class:`IndexStream`, from optimizer step ``start_step`` on:
    for each step, ``grad_accum`` lists of ``micro`` indices (round ``a`` = chunk
    ``a * world + rank``). Endless; a ``batch_sampler`` for ``DataLoader``."""

    def __init__(
        self,
        stream: IndexStream,
        *,
        batch_size: int,
        micro: int,
        grad_accum: int,
        world: int,
        rank: int,
        start_step: int = 0,
    ):
        self.stream, self.batch_size, self.micro = stream, batch_size, micro
        self.grad_accum, self.world, self.rank, self.start_step = grad_accum, world, rank, start_step

    def tensors(self) -> Iterator[torch.Tensor]:
        """The micro-batches as int64 tensors ``[micro]``."""
        step = self.start_step
        while True:
            for a in range(self.grad_accum):
                chunk = a * self.world + self.rank
                yield self.stream.take(step * self.batch_size + chunk * self.micro, self.micro)
            step += 1

    def __iter__(self) -> Iterator[list[int]]:
        return (indices.tolist() for indices in self.tensors())


# -- datasets --------------------------------------------------------------------------------------


class ImageFolderDataset(Dataset):
    """A folder of images (one sub-folder per class, or flat), decoded lazily: ``dataset[i]`` opens
    image ``i`` with Pillow, converts it to ``channels`` (1: grey, 3: RGB), resizes it to
    ``image_size`` square (Lanczos) and returns ``(float32 [C, S, S] in [-1, 1], int label)``.
    Files, labels, size and channel defaults are as :func:`diffreg.data.load_image_folder`.

    Raises (at construction): FileNotFoundError, ValueError as ``load_image_folder``.
    """

    def __init__(self, path: str, image_size: int | None = None, channels: int | None = None):
        from diffreg.data import image_defaults, list_image_folder

        self.root = Path(path)
        self.files, self.labels, classes = list_image_folder(path)
        self.num_classes = len(classes) if classes else None
        self.image_size, self.channels = image_defaults(self.files[0], image_size, channels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from diffreg.data import decode_image

        pixels = decode_image(self.files[index], self.image_size, self.channels)  # uint8 [S, S, C]
        x = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return x, self.labels[index]

    @property
    def example_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    def fingerprint(self) -> str:
        """SHA-256 of the file names (relative), labels and sizes, and of their bytes when they
        total at most :data:`FINGERPRINT_FULL_BYTES`."""
        digest = hashlib.sha256(repr((self.image_size, self.channels)).encode())
        sizes = [f.stat().st_size for f in self.files]
        for f, label, size in zip(self.files, self.labels, sizes, strict=True):
            digest.update(f"{f.relative_to(self.root)}\0{label}\0{size}\n".encode())
        if sum(sizes) <= FINGERPRINT_FULL_BYTES:
            for f in self.files:
                digest.update(f.read_bytes())
        return digest.hexdigest()


def _member_memmap(path: str, name: str) -> np.ndarray | None:
    """``name`` of the ``.npz`` at ``path`` memory-mapped, if it is stored uncompressed (as
    ``np.savez`` writes it); ``None`` if it is compressed or absent."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(name + ".npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as fh:
            fh.seek(info.header_offset)
            local = fh.read(30)  # the zip local file header: name and extra field lengths at 26, 28
            start = (
                info.header_offset
                + 30
                + int.from_bytes(local[26:28], "little")
                + int.from_bytes(local[28:30], "little")
            )
            fh.seek(start)
            version = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(fh)  # the dtype's description only: nothing unpickled
            offset = fh.tell()
    if dtype.hasobject:
        return None  # the whole-file reader refuses it with its message (nothing is unpickled)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _has_member(path: str, name: str) -> bool:
    with zipfile.ZipFile(path) as archive:
        return name + ".npy" in archive.namelist()


class ArrayFileDataset(Dataset):
    """NHWC images or ``[N, D]`` vectors in an ``.npz`` (``arr_0``, optional ``arr_1`` labels) or a
    ``.npy`` (no labels), memory-mapped when stored uncompressed (``np.savez``, ``np.save``) so
    that files larger than memory stream from disk; a compressed ``.npz`` (``np.savez_compressed``)
    is read whole. Pixel values map to [-1, 1] as :func:`diffreg.data.load_npz` (the range is
    checked in chunks, never loading the array). ``dataset[i]`` is ``(float32 [C, H, W] or [D],
    int label)``.

    Raises (at construction): FileNotFoundError, ValueError as ``load_npz``.
    """

    def __init__(self, path: str):
        from diffreg.data import check_npz_arrays, pixel_mapping

        self.path = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"npz file {self.path!r} does not exist")
        labels = None
        if self.path.endswith(".npy"):
            try:
                data = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise ValueError(f"{self.path!r} is not a .npy array ({exc})") from exc
        else:
            try:
                data = _member_memmap(self.path, "arr_0")
                labels = _member_memmap(self.path, "arr_1")
            except zipfile.BadZipFile as exc:
                raise ValueError(f"{self.path!r} is not an .npz archive of arrays ({exc})") from exc
            if data is None or (labels is None and _has_member(self.path, "arr_1")):  # compressed, object, missing
                from diffreg.data import read_npz_arrays

                data, labels = read_npz_arrays(self.path)
        self.labels_array, self.num_classes = check_npz_arrays(data, labels, self.path)
        self.data = data
        self.pixels = pixel_mapping(data, self.path)  # True: 0..255 values mapped by v / 127.5 - 1

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = np.array(self.data[index], dtype=np.float32)
        x = torch.from_numpy(row / np.float32(127.5) - np.float32(1.0) if self.pixels else row)
        if x.ndim == 3:
            x = x.permute(2, 0, 1).contiguous()
        return x, int(self.labels_array[index]) if self.labels_array is not None else 0

    @property
    def example_shape(self) -> tuple[int, ...]:
        shape = tuple(int(s) for s in self.data.shape[1:])
        return (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape

    def fingerprint(self) -> str:
        """SHA-256 of the shape, dtype and bytes of the arrays (of the first and last MiB of each
        when the file is larger than :data:`FINGERPRINT_FULL_BYTES`)."""
        digest = hashlib.sha256()
        for array in (self.data, self.labels_array):
            if array is None:
                continue
            digest.update(repr((array.shape, str(array.dtype))).encode())
            flat = np.ravel(array, order="A").view(np.uint8)  # a view for C- or Fortran-ordered arrays
            if flat.size <= FINGERPRINT_FULL_BYTES:
                digest.update(memoryview(flat))
            else:
                digest.update(memoryview(flat[: 1 << 20]))
                digest.update(memoryview(flat[-(1 << 20) :]))
        return digest.hexdigest()


def make_loader(dataset: Dataset, batches: RankBatches, *, workers: int, device: torch.device) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` in the order of ``batches``: ``workers`` processes
    (0: in this process), pinned memory on CUDA, two batches prefetched per worker. The order does
    not depend on ``workers`` (the loader returns batches in the sampler's order). The loader gets
    its own generator (workers draw no random numbers), so torch's global RNG, which model dropout
    uses and the training state saves, is not touched."""
    options: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "generator": torch.Generator().manual_seed(0),
    }
    if workers > 0:
        options.update(prefetch_factor=2, persistent_workers=False)
    return DataLoader(dataset, batch_sampler=batches, **options)


class TrainingData:
    """What a training run reads: either tensors held whole on the device (``x``, ``y``: the small
    built-in datasets) or a lazily read ``dataset`` streamed through a ``DataLoader``.

    Attributes: ``example_shape`` (``[C, H, W]`` or ``[D]``), ``num_classes`` (or None), ``size``.
    """

    def __init__(
        self,
        *,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        num_classes: int | None = None,
        dataset: Any = None,
        workers: int = 0,
    ):
        self.x, self.y, self.dataset, self.workers = x, y, dataset, workers
        if dataset is not None:
            self.example_shape, self.num_classes, self.size = dataset.example_shape, dataset.num_classes, len(dataset)
        else:
            assert x is not None and y is not None
            self.example_shape, self.num_classes, self.size = tuple(x.shape[1:]), num_classes, int(x.shape[0])
        self._fingerprint: str | None = None

    @property
    def streamed(self) -> bool:
        return self.dataset is not None

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the data: of the float32 examples and int64 labels when held in memory
        (:func:`diffreg.train_state.data_fingerprint`), else the dataset's own (file names, sizes
        and bytes); computed once."""
        if self._fingerprint is None:
            if self.dataset is not None:
                self._fingerprint = self.dataset.fingerprint()
            else:
                from diffreg.train_state import data_fingerprint

                self._fingerprint = data_fingerprint(self.x, self.y)
        return self._fingerprint

    def clip_by_default(self) -> bool:
        """Whether samples should be clipped to [-1, 1]: images whose values lie there (streamed
        images always do: they are mapped there); vectors never."""
        if len(self.example_shape) != 3:
            return False
        if self.dataset is not None:
            return True
        lo, hi = float(self.x.min()), float(self.x.max())
        return -1.0 <= lo and hi <= 1.0

    def batches(self, order: RankBatches, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless ``(x, y)`` micro-batches on ``device`` in ``order``."""
        if self.dataset is None:
            assert self.x is not None and self.y is not None
            for idx in order.tensors():
                idx = idx.to(self.x.device)
                yield self.x[idx], self.y[idx]
            return
        loader = make_loader(self.dataset, order, workers=self.workers, device=device)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


#: data options that are augmentations, not loader arguments
AUGMENTATIONS = ("hflip",)


def load_training_data(spec: ComponentSpec, workers: int = 0) -> TrainingData:
    """The configured data: image folders and npz/npy files streamed lazily, the small built-in
    datasets whole. A bad option is a ConfigError naming the dataset and option."""
    import inspect

    from diffreg import data as data_module
    from diffreg.errors import ConfigError

    streamed: dict[str, Any] = {"folder": ImageFolderDataset, "npz": ArrayFileDataset}
    loaders: dict[str, Any] = {"digits": data_module.load_digits, **streamed}
    loader = loaders.get(spec.name, data_module.toy_2d)
    signature = inspect.signature(loader.__init__ if isinstance(loader, type) else loader)
    accepted = [p for p in signature.parameters if p not in ("name", "self")] + list(AUGMENTATIONS)
    unknown = [k for k in spec.options if k not in accepted]
    if spec.name in data_module.DATASETS and unknown:
        raise ConfigError(f"data {spec.name!r} has no option {unknown[0]!r}; accepted: {', '.join(accepted)}")
    hflip = spec.options.get("hflip", False)
    if not isinstance(hflip, bool):
        raise ConfigError(f"data option hflip must be true or false, got {hflip!r}")
    options = {k: v for k, v in spec.options.items() if k not in AUGMENTATIONS}
    try:
        if spec.name in streamed:
            data = TrainingData(dataset=streamed[spec.name](**options), workers=workers)
        else:
            x, y, num_classes = data_module.load_dataset(spec.name, **options)
            if x.shape[0] < 1:
                raise ConfigError(f"data {spec.name!r} has no examples")
            data = TrainingData(x=x, y=y, num_classes=num_classes)
    except TypeError as exc:
        raise ConfigError(f"data {spec.name!r}: bad options {spec.options}: {exc}") from exc
    if hflip and len(data.example_shape) != 3:
        raise ConfigError(f"data option hflip flips images; {spec.name!r} holds vectors of shape {data.example_shape}")
    return data
