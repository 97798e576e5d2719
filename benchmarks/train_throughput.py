"""Training throughput: images/s of ``diffreg.training.Trainer.train_step`` beside a hand-written
PyTorch loop on the same model, both reading the same image folder through a streaming
``DataLoader`` (Pillow decode in worker processes).

    python benchmarks/train_throughput.py                 # CPU, writes benchmarks/train_throughput.json
    python benchmarks/train_throughput.py --device cuda --images 4096 --batch 128 --channels 64

The hand-written loop is what a researcher would write without diffreg: a Dataset decoding PNGs
with Pillow, a shuffled DataLoader, uniform timesteps, q_sample from the cosine schedule's
alpha-bar, eps-MSE, backward, gradient clipping, AdamW, an EMA lerp. diffreg's step does the same
work plus its own: seeded per-micro-batch generators, a gradient-norm check and a loss read-back
(one device sync) per step. Both run in turn in windows of ``--window`` steps; the figure is the
median images/s over windows. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def make_folder(root: Path, n: int, size: int) -> Path:
    """``n`` random RGB PNGs of ``size`` x ``size`` in two class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(2):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i:05d}.png")
    return root


class Folder(torch.utils.data.Dataset):
    """The hand-written loop's dataset: PNGs decoded with Pillow, scaled to [-1, 1]."""

    def __init__(self, root: Path):
        self.files = sorted(root.glob("*/*.png"))
        self.labels = [0 if f.parent.name == "c0" else 1 for f in self.files]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            x = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1
        return x, self.labels[i]


def hand_loop(model, loader, device, steps_iter, T=1000):
    """A generator of per-window timings of the hand-written loop."""
    s = 0.008
    t_ = np.arange(T + 1) / T
    f = np.cos((t_ + s) / (1 + s) * math.pi / 2) ** 2
    abar = torch.tensor(np.clip(f[1:] / f[0], 0, 1), dtype=torch.float32, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = [p.detach().clone() for p in model.parameters()]
    data = iter(_forever(loader))
    while True:
        n = next(steps_iter)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        images = 0
        for _ in range(n):
            x, y = next(data)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            t = torch.randint(0, T, (x.shape[0],), device=device)
            noise = torch.randn_like(x)
            a = abar[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x + (1 - a).sqrt() * noise
            loss = ((model(x_t, t, y=y) - noise) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 0.001)
            images += x.shape[0]
        float(loss.detach())  # one read-back per window
        if device.type == "cuda":
            torch.cuda.synchronize()
        yield images / (time.perf_counter() - start)


def _forever(loader):
    while True:
        yield from loader


def diffreg_loop(trainer, device, steps_iter):
    while True:
        n = next(steps_iter)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        yield n * trainer.cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=32, help="UNet model_channels")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window", type=int, default=8, help="steps per timed window")
    parser.add_argument("--output", default=str(HERE / "train_throughput.json"))
    args = parser.parse_args()

    from diffreg import registry
    from diffreg.training import TrainConfig, Trainer

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(Path(tmp) / "imgs", args.images, args.size)
        model_options = {
            "name": "unet",
            "model_channels": args.channels,
            "channel_mult": [1, 2],
            "num_res_blocks": 1,
            "attention_resolutions": [args.size // 4],
            "num_heads": 4,
        }
        cfg = TrainConfig.from_dict(
            {
                "batch_size": args.batch,
                "lr": 1e-4,
                "steps": 10**9,
                "label_dropout": 0.0,
                "data_workers": args.workers,
                "data": {"name": "folder", "path": str(root)},
                "diffusion": {"schedule": "cosine", "num_timesteps": 1000, "loss": "mse"},
                "model": model_options,
            }
        )
        trainer = Trainer(cfg, device=device)
        trainer.model.train()
        torch.manual_seed(0)
        hand_model = registry.create("model", "unet", **trainer.model_spec.options).to(device).train()
        loader = torch.utils.data.DataLoader(
            Folder(root),
            batch_size=args.batch,
            shuffle=True,
            drop_last=True,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=args.workers > 0,
        )
        steps = iter(lambda: args.window, None)
        runs = {
            "diffreg": diffreg_loop(trainer, device, steps),
            "hand-written": hand_loop(hand_model, loader, device, steps),
        }
        figures: dict[str, list[float]] = {k: [] for k in runs}
        for k in runs:
            next(runs[k])  # warm-up window (workers start, allocator, kernels)
        for _ in range(args.windows):
            for k, run in runs.items():
                figures[k].append(next(run))
        trainer.close()
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "images": args.images,
        "size": args.size,
        "batch": args.batch,
        "model_channels": args.channels,
        "workers": args.workers,
        "windows": args.windows,
        "window_steps": args.window,
        "images_per_s": {k: statistics.median(v) for k, v in figures.items()},
        "all_windows": figures,
    }
    result["ratio_diffreg_to_hand"] = result["images_per_s"]["diffreg"] / result["images_per_s"]["hand-written"]
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("device", "images_per_s", "ratio_diffreg_to_hand")}, indent=1))


if __name__ == "__main__":
    main()
