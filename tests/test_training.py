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


TINY = {
    "batch_size": 16,
    "lr": 1e-3,
    "ema_decay": 0.9,
    "diffusion": {
        "schedule": "cosine",
        "num_timesteps": 50,
        "variance": "learned_range",
        "loss": "rescaled_mse",
        "timestep_sampler": {"name": "loss_second_moment", "history_per_term": 1},
    },
    "model": {"name": "unet", "model_channels": 8, "channel_mult": [1], "attention_resolutions": [], "num_heads": 1},
}


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path):
    straight = train(TrainConfig.from_dict({**TINY, "steps": 8}), tmp_path / "a.safetensors", progress=False)
    first = TrainConfig.from_dict({**TINY, "steps": 4})
    train(first, tmp_path / "b.safetensors", progress=False)
    resumed = train(
        TrainConfig.from_dict({**TINY, "steps": 8}), tmp_path / "b.safetensors", progress=False, resume=True
    )
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = _weights(tmp_path / "a.state.safetensors"), _weights(tmp_path / "b.state.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # optimizer, RNG and timestep-sampler state too


def test_resume_refuses_a_different_configuration(tmp_path):
    train(TrainConfig.from_dict({**TINY, "steps": 2}), tmp_path / "m.safetensors", progress=False)
    changed = TrainConfig.from_dict({**TINY, "steps": 4, "lr": 5e-3})
    with pytest.raises(diffreg.CheckpointError, match="differs in lr"):
        train(changed, tmp_path / "m.safetensors", progress=False, resume=True)


def test_resume_without_a_state_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(TrainConfig.from_dict({**TINY, "steps": 2}), tmp_path / "none.safetensors", progress=False, resume=True)


def test_periodic_checkpoints_are_written_during_the_run(tmp_path, monkeypatch):
    from diffreg import training

    saved_steps = []
    original = training.Trainer.save

    def spy(self, output, dtype=None):
        saved_steps.append(self.step)
        return original(self, output, dtype)

    monkeypatch.setattr(training.Trainer, "save", spy)
    train(TrainConfig.from_dict({**TINY, "steps": 6, "save_every": 2}), tmp_path / "m.safetensors", progress=False)
    assert saved_steps == [2, 4, 6]


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    from diffreg import training

    calls = {"n": 0}
    original = training.Diffusion.training_losses

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = original(self, *args, **kwargs)
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(training.Diffusion, "training_losses", poisoned)
    with pytest.raises(FloatingPointError, match="at step 2"):
        train(TrainConfig.from_dict({**TINY, "steps": 5}), tmp_path / "m.safetensors", progress=False)
    assert not (tmp_path / "m.safetensors").exists()


def test_training_state_file_is_refused_as_a_model(tmp_path):
    train(TrainConfig.from_dict({**TINY, "steps": 1}), tmp_path / "m.safetensors", progress=False)
    with pytest.raises(diffreg.CheckpointError, match="training-state file"):
        diffreg.load_checkpoint(tmp_path / "m.state.safetensors")


def test_bf16_autocast_trains(tmp_path):
    path = train(TrainConfig.from_dict({**TINY, "steps": 2, "bf16": True}), tmp_path / "m.safetensors", progress=False)
    assert diffreg.load_checkpoint(path).config.num_classes == 10


def test_user_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    from diffreg.data import load_dataset

    for k, name in enumerate(["cats", "dogs"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (k * 255, i * 100, 0)).save(tmp_path / "imgs" / name / f"{i}.png")
    x, y, num_classes = load_dataset("folder", path=str(tmp_path / "imgs"), image_size=8)
    assert x.shape == (6, 3, 8, 8) and num_classes == 2 and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x[0, 0].max().item() == pytest.approx(-1.0) and x[3, 0].min().item() == pytest.approx(1.0)  # red channel


def test_user_npz_round_trips_the_sample_layout(tmp_path):
    import numpy as np

    from diffreg.data import load_dataset

    images = np.random.default_rng(0).integers(0, 256, size=(5, 4, 4, 1), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images, np.array([0, 1, 2, 1, 0]))
    x, y, num_classes = load_dataset("npz", path=str(tmp_path / "d.npz"))
    assert x.shape == (5, 1, 4, 4) and num_classes == 3 and y.tolist() == [0, 1, 2, 1, 0]
    torch.testing.assert_close(x[2, 0], torch.from_numpy(images[2, :, :, 0]).float() / 127.5 - 1)


def test_train_on_a_2d_toy_with_the_mlp(tmp_path):
    cfg = TrainConfig.from_dict(
        {
            "steps": 3,
            "batch_size": 32,
            "data": {"name": "moons", "n": 256},
            "diffusion": {"num_timesteps": 50, "schedule": "cosine"},
            "model": {"name": "mlp", "hidden": 32, "depth": 1},
        }
    )
    model, diffusion, ckpt = diffreg.load_checkpoint(train(cfg, tmp_path / "m.safetensors", progress=False))
    assert ckpt.sample_shape == (2,) and ckpt.num_classes == 2
    out = diffusion.sample(model, (4, 2), steps=5, model_kwargs={"y": torch.tensor([0, 1, 0, 1])})
    assert out.shape == (4, 2) and torch.isfinite(out).all()
