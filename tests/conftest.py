"""Shared fixtures: a tiny trained checkpoint, exact Gaussian denoisers, deterministic seeds."""

from __future__ import annotations

import math

import pytest
import torch
from plugin_fixtures import plugin_dist  # noqa: F401  (a fixture for every test module)

import diffreg
from diffreg import registry
from diffreg.config import CheckpointConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_unet_checkpoint_config(variance: str = "learned_range", num_timesteps: int = 100) -> CheckpointConfig:
    return CheckpointConfig(
        diffusion={"schedule": "cosine", "num_timesteps": num_timesteps, "variance": variance, "loss": "rescaled_mse"},
        model={
            "name": "unet",
            "in_channels": 1,
            "out_channels": 2 if variance.startswith("learned") else 1,
            "image_size": 8,
            "model_channels": 16,
            "channel_mult": [1, 2],
            "num_heads": 2,
            "num_classes": 10,
        },
        data={"dataset": "digits", "shape": [1, 8, 8], "num_classes": 10},
    )


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A small randomly initialized (untrained) class-conditional UNet checkpoint."""
    cfg = tiny_unet_checkpoint_config()
    torch.manual_seed(1)
    model = registry.create("model", cfg.model.name, **cfg.model.options)
    # zero-initialized output layers would make every output 0; perturb them so tests see signal
    with torch.no_grad():
        for p in model.out.parameters():
            p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    diffreg.save_checkpoint(path, model, cfg)
    return path


class GaussianDenoiser:
    """The exact eps-prediction for 1-D-per-pixel Gaussian data x0 ~ N(mu, s^2), independent per
    dimension: E[x0 | x_t] = mu + sqrt(a) s^2 / (a s^2 + 1 - a) (x_t - sqrt(a) mu), a = abar_t;
    eps = (x_t - sqrt(a) E[x0|x_t]) / sqrt(1 - a)."""

    def __init__(self, alphas_cumprod, mu: float = 0.5, s: float = 0.3, mean_type: str = "eps"):
        self.abar = torch.tensor(alphas_cumprod, dtype=torch.float64)
        self.mu, self.s, self.mean_type = mu, s, mean_type
        self.calls: list[torch.Tensor] = []

    def __call__(self, x, t, **kwargs):
        self.calls.append(t.clone())
        a = self.abar[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x0 = self.mu + a.sqrt() * self.s**2 / (a * self.s**2 + 1 - a) * (x - a.sqrt() * self.mu)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if self.mean_type == "eps":
            return eps
        if self.mean_type == "x0":
            return x0
        return a.sqrt() * eps - (1 - a).sqrt() * x0  # v


@pytest.fixture
def gaussian_denoiser():
    return GaussianDenoiser


def pytest_report_header(config):
    return f"diffreg {diffreg.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}"


__all__ = ["GaussianDenoiser", "math", "tiny_unet_checkpoint_config"]
