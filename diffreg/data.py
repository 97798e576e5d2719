"""Small built-in datasets for demos and tests; nothing is downloaded.

- ``digits``: scikit-learn's handwritten digits (1797 images, 8x8, 10 classes; the data ships
  inside scikit-learn), scaled to [-1, 1] and optionally resized.
- 2-D toys: ``moons``, ``swiss_roll``, ``gaussian_mixture`` (for the ``mlp`` model).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "moons", "swiss_roll", "gaussian_mixture")


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
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
