"""Training beyond toy sizes: streamed data (image folders, memory-mapped npz), the index stream,
gradient accumulation, learning-rate schedules, fp16 loss scaling, exact streaming resume."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffreg import training
from diffreg.data_loading import ArrayFileDataset, IndexStream, RankBatches
from diffreg.training import TrainConfig, Trainer, train

MLP = {
    "batch_size": 8,
    "lr": 1e-2,
    "data": {"name": "moons", "n": 64},
    "diffusion": {"num_timesteps": 20, "schedule": "cosine"},
    "model": {"name": "mlp", "hidden": 16, "depth": 1},
}
UNET = {"name": "unet", "model_channels": 8, "channel_mult": [1], "attention_resolutions": [], "num_heads": 1}


def _cfg(base=MLP, **changes):
    return TrainConfig.from_dict({**base, **changes})


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _image_folder(root, n_per_class=5, size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            pixels[..., 0] = 255 * k
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


# -- the index stream ----------------------------------------------------------------------------------


def test_each_epoch_visits_every_example_once_and_positions_cross_epochs():
    stream = IndexStream(10, seed=3)
    taken = stream.take(0, 30)
    for epoch in range(3):
        assert sorted(taken[epoch * 10 : (epoch + 1) * 10].tolist()) == list(range(10))
    assert not torch.equal(taken[:10], taken[10:20])  # a new permutation per epoch
    assert torch.equal(stream.take(7, 6), taken[7:13])  # from any position, across the epoch boundary


def test_two_ranks_read_the_global_batch_of_one_process_accumulating_two_micro_batches():
    stream = IndexStream(13, seed=0)

    def per_step(world, accum, steps=5):
        orders = [
            RankBatches(
                stream, batch_size=6, micro=6 // (world * accum), grad_accum=accum, world=world, rank=r
            ).tensors()
            for r in range(world)
        ]
        out = []
        for _ in range(steps):
            chunks = [[next(o) for _ in range(accum)] for o in orders]  # [rank][round]
            out.append(torch.cat([chunks[r][a] for a in range(accum) for r in range(world)]))  # chunk a * world + r
        return torch.stack(out)

    one = per_step(1, 1)
    assert torch.equal(one.reshape(-1), stream.take(0, 30))
    assert torch.equal(per_step(2, 1), one) and torch.equal(per_step(1, 2), one) and torch.equal(per_step(2, 3), one)


# -- streamed datasets ----------------------------------------------------------------------------------


def test_streamed_image_folder_equals_the_in_memory_loader(tmp_path):
    from diffreg.data import load_image_folder
    from diffreg.data_loading import ImageFolderDataset

    _image_folder(tmp_path / "imgs")
    x, y, k = load_image_folder(str(tmp_path / "imgs"), image_size=8)
    dataset = ImageFolderDataset(str(tmp_path / "imgs"), image_size=8)
    assert len(dataset) == 10 and dataset.num_classes == k == 2 and dataset.example_shape == (3, 8, 8)
    for i in (0, 4, 9):
        xi, yi = dataset[i]
        assert torch.equal(xi, x[i]) and yi == y[i]


def test_uncompressed_npz_is_memory_mapped_and_compressed_is_read(tmp_path):
    from diffreg.data import load_npz

    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (7, 4, 5, 3), dtype=np.uint8), rng.integers(0, 3, 7)
    np.savez(tmp_path / "plain.npz", images, labels)
    np.savez_compressed(tmp_path / "small.npz", images, labels)
    np.save(tmp_path / "images.npy", images)
    x, _, _ = load_npz(str(tmp_path / "plain.npz"))
    plain = ArrayFileDataset(str(tmp_path / "plain.npz"))
    assert isinstance(plain.data, np.memmap) and plain.num_classes == 3 and plain.example_shape == (3, 4, 5)
    for dataset in (
        plain,
        ArrayFileDataset(str(tmp_path / "small.npz")),
        ArrayFileDataset(str(tmp_path / "images.npy")),
    ):
        for i in range(7):
            xi, yi = dataset[i]
            assert torch.equal(xi, x[i])
            assert yi == (0 if dataset.path.endswith(".npy") else int(labels[i]))
    assert isinstance(ArrayFileDataset(str(tmp_path / "images.npy")).data, np.memmap)


def test_npz_float_images_out_of_range_are_refused_when_streamed(tmp_path):
    np.savez(tmp_path / "bad.npz", np.full((2, 4, 4, 1), 300.0, np.float32))
    with pytest.raises(ValueError, match=r"span 300\.0\.\.300\.0"):
        ArrayFileDataset(str(tmp_path / "bad.npz"))


MEMORY_LIMITED = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, torch
    from PIL import Image
    from diffreg.training import TrainConfig, train

    folder, out, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cfg = TrainConfig.from_dict({
        "steps": 2, "batch_size": 2, "data_workers": 0,
        "data": {"name": "folder", "path": folder, "image_size": size, "channels": 3, "hflip": True},
        "diffusion": {"num_timesteps": 10, "schedule": "cosine"},
        "model": {"name": "unet", "model_channels": 4, "channel_mult": [1, 1, 1, 1], "attention_resolutions": [],
                  "num_heads": 1, "num_res_blocks": 1},  # the middle block's attention at 16 x 16
    })
    train(TrainConfig.from_dict({**cfg.to_dict(), "steps": 1}), out + ".warm.safetensors", progress=False)
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize"))
    dataset_bytes = n * 3 * size * size * 4  # the whole folder as float32 tensors
    limit = vm + dataset_bytes // 3
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:  # the limit is real: holding the decoded folder fails under it
        torch.empty(dataset_bytes // 4, dtype=torch.float32)
        raise SystemExit("the memory limit does not bind")
    except (RuntimeError, MemoryError):
        pass
    train(cfg, out, progress=False)
    print("trained", limit - vm, dataset_bytes)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_an_image_folder_larger_than_the_memory_limit_trains(tmp_path):
    from PIL import Image

    n, size = 300, 128  # 300 x 3 x 128 x 128 float32 = 59 MB decoded; the limit leaves 20 MB
    (tmp_path / "imgs").mkdir()
    for i in range(n):  # tiny files on disk (flat colours compress), large once decoded
        Image.new("RGB", (size, size), (i % 256, (7 * i) % 256, 0)).save(tmp_path / "imgs" / f"{i:04d}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_LIMITED, str(tmp_path / "imgs"), str(tmp_path / "m"), str(n), str(size)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0 and "trained" in result.stdout, result.stdout + result.stderr
    assert (tmp_path / "m").exists()


# -- gradient accumulation ------------------------------------------------------------------------


def test_k_micro_batches_equal_one_batch_k_times_larger():
    big = Trainer(_cfg(grad_accum=1))
    small = Trainer(_cfg(grad_accum=4))
    x, y = big.data.x[:8], big.data.y[:8]
    x_start, kwargs, t, weights, noise = big.micro_inputs(x, y, chunk=0)
    weights = torch.linspace(0.5, 2.0, 8)  # unequal importance weights, as a loss-aware sampler gives
    big.train_step([(x_start, kwargs, t, weights, noise)])
    parts = [
        (
            x_start[i : i + 2],
            {k: v[i : i + 2] for k, v in kwargs.items()},
            t[i : i + 2],
            weights[i : i + 2],
            noise[i : i + 2],
        )
        for i in range(0, 8, 2)
    ]
    small.train_step(parts)
    for a, b in zip(_params(big.model), _params(small.model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32 sums in another order
    assert big.micro == 8 and small.micro == 2


def test_batch_size_not_divisible_by_grad_accum_is_a_config_error():
    with pytest.raises(Exception, match="batch_size 8 is not divisible by grad_accum 3"):
        _cfg(grad_accum=3)


# -- learning-rate schedules ----------------------------------------------------------------------


def _lrs(cfg, steps):
    trainer = Trainer(cfg)
    seen = []
    for _ in range(steps):
        trainer.train_step()
        seen.append(trainer.optimizer.param_groups[0]["lr"])
    return seen


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_each_schedule_matches_its_formula(schedule):
    lr, lr_min, warmup, steps = 1e-2, 1e-3, 3, 10
    seen = _lrs(_cfg(steps=steps, lr=lr, lr_min=lr_min, lr_warmup=warmup, lr_schedule=schedule), steps)
    for k in (0, 1, 2):  # warm-up: linear to lr at update warmup - 1
        assert seen[k] == pytest.approx(lr * (k + 1) / 3, rel=1e-12)
    for k in (3, 5, 8, 9):
        if schedule == "constant":
            expected = lr
        else:  # half a cosine from lr to lr_min over the 7 updates after warm-up
            expected = lr_min + (lr - lr_min) * (1 + math.cos(math.pi * (k - 3) / 7)) / 2
        assert seen[k] == pytest.approx(expected, rel=1e-12)
    if schedule == "cosine":
        assert seen[3] == pytest.approx(lr) and seen[9] < 0.05 * lr + lr_min


def test_cosine_resume_with_other_steps_asks_for_lr_decay_steps(tmp_path):
    import diffreg

    train(_cfg(steps=2, lr_schedule="cosine"), tmp_path / "m.safetensors", progress=False)
    with pytest.raises(diffreg.CheckpointError, match="set lr_decay_steps = 2"):
        train(_cfg(steps=4, lr_schedule="cosine"), tmp_path / "m.safetensors", progress=False, resume=True)


# -- fp16 loss scaling --------------------------------------------------------------------------------


def _poison(trainer, at_steps):
    """Put inf into the first parameter's gradient during the given steps."""
    param = next(trainer.model.parameters())
    param.register_hook(lambda g: g * float("inf") if trainer.step in at_steps else g)


def test_fp16_overflow_skips_the_step_halves_the_scale_and_training_continues():
    trainer = Trainer(_cfg(fp16=True))
    _poison(trainer, at_steps={3})
    for _ in range(3):  # the first steps may overflow by themselves at the initial scale 2^16
        trainer.train_step()
    skipped, scale, before = trainer.skipped_steps, trainer.scaler.get_scale(), _params(trainer.model)
    trainer.train_step()  # step 3: overflow
    assert trainer.skipped_steps == skipped + 1 and trainer.scaler.get_scale() == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(before, _params(trainer.model), strict=True))  # no update
    trainer.train_step()
    assert trainer.skipped_steps == skipped + 1 and trainer.step == 5
    assert not all(torch.equal(a, b) for a, b in zip(before, _params(trainer.model), strict=True))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_fp16_run_that_keeps_overflowing_is_stopped_naming_the_step():
    trainer = Trainer(_cfg(fp16=True, max_skipped_steps=3))
    _poison(trainer, at_steps=set(range(100)))
    trainer.train_step()
    trainer.train_step()
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps skipped .* up to step 2"):
        trainer.train_step()


def test_fp16_skipped_steps_and_scale_resume_exactly(tmp_path, monkeypatch):
    original = Trainer.__init__

    def poisoned_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _poison(self, at_steps={1})

    monkeypatch.setattr(training.Trainer, "__init__", poisoned_init)
    train(_cfg(steps=4, fp16=True), tmp_path / "a.safetensors", progress=False)
    train(_cfg(steps=2, fp16=True), tmp_path / "b.safetensors", progress=False)
    train(_cfg(steps=4, fp16=True), tmp_path / "b.safetensors", progress=False, resume=True)
    a, b = load_file(str(tmp_path / "a.state.safetensors")), load_file(str(tmp_path / "b.state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from diffreg.checkpoint import read_metadata

    skipped = int(read_metadata(tmp_path / "b.state.safetensors")["skipped_steps"])
    assert skipped >= 1 and float(a["scaler/scale"]) == 2.0 ** (16 - skipped)  # 2^16 halved per skip, no growth


def test_bf16_and_fp16_together_are_refused():
    with pytest.raises(Exception, match="bf16 and fp16 are both true"):
        _cfg(bf16=True, fp16=True)


# -- streaming resume -------------------------------------------------------------------------------


def test_streamed_folder_with_flips_accumulation_and_cosine_resumes_bit_exactly(tmp_path):
    folder = _image_folder(tmp_path / "imgs")  # 10 images; batch 4 crosses epochs
    base = {
        "batch_size": 4,
        "grad_accum": 2,
        "lr_schedule": "cosine",
        "lr_warmup": 2,
        "lr_decay_steps": 8,
        "data_workers": 1,
        "data": {"name": "folder", "path": str(folder), "image_size": 8, "hflip": True},
        "diffusion": {
            "num_timesteps": 20,
            "schedule": "cosine",
            "timestep_sampler": {"name": "loss_second_moment", "history_per_term": 1},
        },
        "model": UNET,
    }
    train(TrainConfig.from_dict({**base, "steps": 6}), tmp_path / "a.safetensors", progress=False)
    train(TrainConfig.from_dict({**base, "steps": 3}), tmp_path / "b.safetensors", progress=False)
    resumed = TrainConfig.from_dict({**base, "steps": 6, "data_workers": 0})  # workers do not change results
    train(resumed, tmp_path / "b.safetensors", progress=False, resume=True)
    for name in ("{}.safetensors", "{}.state.safetensors"):
        a, b = load_file(str(tmp_path / name.format("a"))), load_file(str(tmp_path / name.format("b")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    from diffreg.checkpoint import read_metadata

    meta = read_metadata(tmp_path / "b.state.safetensors")
    assert (meta["data_epoch"], meta["data_offset"], meta["data_size"]) == ("2", "4", "10")  # 6 x 4 = 24 = 2 x 10 + 4


def test_hflip_flips_about_half_of_the_images(tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    trainer = Trainer(
        TrainConfig.from_dict(
            {
                "batch_size": 10,
                "data_workers": 0,
                "model": UNET,
                "diffusion": {"num_timesteps": 20, "schedule": "cosine"},
                "data": {"name": "folder", "path": str(folder), "image_size": 8, "hflip": True},
            }
        )
    )
    x, y = trainer._next_micro()
    flipped = [trainer.micro_inputs(x, y, chunk=c)[0] for c in range(20)]
    share = np.mean(
        [[torch.equal(f[i], x[i].flip(-1)) and not torch.equal(f[i], x[i]) for i in range(10)] for f in flipped]
    )
    assert 0.35 < share < 0.65 and all(
        torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(-1)) for f in flipped for i in range(10)
    )


def test_the_image_folder_recipe_reads_and_builds(tmp_path):
    from pathlib import Path

    text = (Path(__file__).parents[1] / "configs" / "image_folder.toml").read_text()
    cfg = TrainConfig.from_toml(text)
    assert cfg.grad_accum == 2 and cfg.fp16 and cfg.data.options["hflip"] and cfg.posthoc_ema_every == 4000
    assert TrainConfig.from_toml(cfg.to_toml()) == cfg
    assert cfg.lr_at(0) == pytest.approx(1e-7) and cfg.lr_at(cfg.steps - 1) == pytest.approx(1e-5, rel=1e-3)
