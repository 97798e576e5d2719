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


@pytest.fixture
def run(tmp_path, monkeypatch):
    """``run("sample", ...)``: the diffreg CLI in a fresh working directory (``tmp_path``), its
    result (exit code, output); exceptions propagate (``catch_exceptions=False``)."""
    from click.testing import CliRunner

    from diffreg.cli import main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


#: a training configuration small enough for a test (a few seconds per step at most)
TINY_TRAIN = {
    "batch_size": 8,
    "lr": 1e-3,
    "diffusion": {"schedule": "cosine", "num_timesteps": 50},
    "model": {"name": "unet", "model_channels": 8, "channel_mult": [1], "attention_resolutions": [], "num_heads": 1},
}


def tiny_train_config(**changes):
    """:data:`TINY_TRAIN` with ``changes`` as a ``TrainConfig``."""
    from diffreg.training import TrainConfig

    return TrainConfig.from_dict({**TINY_TRAIN, **changes})


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a Trainer is built (the checks must come before any work)."""
    from diffreg import training

    def forbidden(*args, **kwargs):
        raise AssertionError("training started before the outputs were checked")

    monkeypatch.setattr(training.Trainer, "__init__", forbidden)


__all__ = ["TINY_TRAIN", "tiny_train_config", "tiny_unet_checkpoint_config"]
