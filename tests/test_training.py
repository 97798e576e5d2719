"""Training: a tiny run on the real digits lowers the loss; configuration from TOML."""

from __future__ import annotations

import pytest
import torch

import diffreg
from diffreg.training import EMA, TrainConfig, train


def _fixed_batch_loss(model, diffusion, x, y):
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=g)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        return diffusion.training_losses(model, x, t, model_kwargs={"y": y}, noise=noise)["mse"].mean().item()


def test_tiny_training_run_lowers_the_loss(tmp_path):
    from diffreg.data import load_digits

    cfg = TrainConfig.from_dict(
        {
            "steps": 150,
            "batch_size": 64,
            "lr": 2e-3,
            "ema_decay": 0.9,
            "diffusion": {
                "schedule": "cosine",
                "num_timesteps": 100,
                "variance": "learned_range",
                "loss": "rescaled_mse",
            },
            "model": {"name": "unet", "model_channels": 16, "channel_mult": [1, 2], "num_heads": 2},
        }
    )
    path = train(cfg, tmp_path / "m.safetensors", progress=False)
    model, diffusion, ckpt_cfg = diffreg.load_checkpoint(path)
    assert ckpt_cfg.num_classes == 10 and ckpt_cfg.model.options["out_channels"] == 2
    x, y = load_digits()
    x, y = x[:256], y[:256]
    torch.manual_seed(0)
    fresh = diffreg.registry.create("model", "unet", **ckpt_cfg.model.options)
    with torch.no_grad():  # an untrained network with a non-zero output layer predicts noise badly
        for p in fresh.out.parameters():
            p.normal_(0, 0.02)
    assert _fixed_batch_loss(model, diffusion, x, y) < 0.6 * _fixed_batch_loss(fresh, diffusion, x, y)


def test_train_config_reads_the_bundled_recipe():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "configs" / "digits.toml").read_text()
    cfg = TrainConfig.from_toml(text)
    assert cfg.diffusion.variance.name == "learned_range"
    assert TrainConfig.from_toml(cfg.to_toml()) == cfg


def test_bad_training_values_are_config_errors():
    with pytest.raises(diffreg.ConfigError, match="label_dropout"):
        TrainConfig(label_dropout=1.5)
    with pytest.raises(diffreg.ConfigError, match="steps"):
        TrainConfig(steps=0)


def test_ema_warmup_tracks_the_model_early():
    # with warm-up the first update uses decay min(0.999, 1/10) = 0.1: EMA moves 90% of the way
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, 0.999)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)
    assert ema.model.weight.item() == pytest.approx(0.9)
