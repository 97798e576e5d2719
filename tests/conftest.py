"""Shared fixtures: a tiny trained checkpoint, exact Gaussian denoisers, deterministic seeds."""

from __future__ import annotations

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


def pytest_report_header(config):
    return f"diffreg {diffreg.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}"


__all__ = ["tiny_unet_checkpoint_config"]
