"""CUDA: every sampler on the GPU (float32 and float16) with zero host-device synchronisations per
step, samples equal to the CPU's for the same seed, a few training steps, checkpoints loaded onto
the GPU.

Skipped on machines without CUDA (CI here is CPU-only; tests/test_device_readiness.py checks the
same rules on the ``meta`` device). On a GPU machine run, in under 5 minutes::

    OMP_NUM_THREADS=4 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device_readiness.py
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_unet_checkpoint_config

import diffreg
from diffreg import registry
from diffreg.sampling import per_sample_generators

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FACTORIES = {c.name: c.factory for c in registry.components("sampler")}
SAMPLERS = sorted(FACTORIES)


def _model(variance, device="cuda"):
    cfg = tiny_unet_checkpoint_config(variance)
    torch.manual_seed(0)
    model = registry.create("model", cfg.model.name, **cfg.model.options)
    with torch.no_grad():  # a non-zero output layer, so the samples depend on the network
        for p in model.out.parameters():
            p.normal_(0, 0.02)
    return model.to(device).eval()


def _diffusion(variance="fixed_small"):
    return diffreg.Diffusion.from_config({"schedule": "cosine", "num_timesteps": 100, "variance": variance})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_on_cuda_without_a_sync_per_step(sampler, dtype):
    variance = "learned_range"
    diffusion = _diffusion(variance)
    model = _model(variance).to(dtype)
    y = torch.arange(4, device="cuda")
    run = diffreg.sampling.sample_loop_progressive(
        diffusion.respace("ddim8"), model, (4, 1, 8, 8), sampler=sampler, dtype=dtype,
        generator=torch.Generator(device="cuda").manual_seed(0), model_kwargs={"y": y}, guidance_scale=2.0,
    )
    syncs_allowed = getattr(FACTORIES[sampler], "host_reads_per_step", False)
    torch.cuda.synchronize()
    if not syncs_allowed:
        torch.cuda.set_sync_debug_mode("error")
    try:
        steps = [next(run) for _ in range(run.ctx.num_steps)]  # no step may synchronise
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(StopIteration):
        next(run)  # the single end-of-loop finiteness check runs here, outside the steps
    out = steps[-1]["sample"]
    assert out.is_cuda and out.dtype == dtype and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("sampler,options", [
    ("ddim", {}), ("ddpm", {}), ("euler_ancestral", {"noise_type": "brownian"}), ("dpmpp_2m_sde", {}),
])
def test_cuda_samples_equal_cpu_samples_for_the_same_seed(sampler, options):
    """Per-sample CPU generators (what ``diffreg sample`` uses): the same noise on both devices,
    so the samples differ only by float rounding; and sample k is independent of its batch."""
    diffusion = _diffusion()
    y = torch.tensor([1, 2, 3])
    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = diffusion.sample(
            _model("fixed_small", device), (3, 1, 8, 8), sampler=sampler, steps=10, device=device,
            generator=per_sample_generators(7, 3), model_kwargs={"y": y.to(device)}, **options,
        )
    torch.testing.assert_close(runs["cuda"].cpu(), runs["cpu"], atol=2e-3, rtol=2e-3)
    alone = diffusion.sample(
        _model("fixed_small"), (1, 1, 8, 8), sampler=sampler, steps=10, device="cuda",
        generator=per_sample_generators(7, 1, start=2), model_kwargs={"y": y[2:].cuda()}, **options,
    )
    torch.testing.assert_close(alone[0], runs["cuda"][2], atol=1e-4, rtol=1e-4)


def test_brownian_noise_with_one_cuda_generator():
    diffusion = _diffusion()
    g = torch.Generator(device="cuda")
    a = diffusion.sample(_model("fixed_small"), (2, 1, 8, 8), sampler="euler_ancestral", steps=6,
                         generator=g.manual_seed(3), noise_type="brownian", model_kwargs={"y": torch.tensor([1, 2], device="cuda")})
    b = diffusion.sample(_model("fixed_small"), (2, 1, 8, 8), sampler="euler_ancestral", steps=6,
                         generator=g.manual_seed(3), noise_type="brownian", model_kwargs={"y": torch.tensor([1, 2], device="cuda")})
    assert a.is_cuda and torch.equal(a, b)


@pytest.mark.parametrize("precision", [{}, {"bf16": True}, {"fp16": True}])
def test_training_steps_on_cuda(tmp_path, precision):
    from diffreg.training import TrainConfig, Trainer

    cfg = TrainConfig.from_dict({
        "steps": 3, "batch_size": 16, "lr": 1e-3, **precision,
        "diffusion": {"schedule": "cosine", "num_timesteps": 100, "variance": "learned_range", "loss": "rescaled_mse"},
        "model": {"name": "unet", "model_channels": 16, "channel_mult": [1, 2], "num_heads": 2},
    })
    trainer = Trainer(cfg, device="cuda")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    losses = [trainer.train_step() for _ in range(3)]
    assert all(p.is_cuda for p in trainer.model.parameters())
    assert all(isinstance(v, float) and v == v for v in losses)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True))


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_checkpoint_loads_onto_cuda_and_samples_as_on_the_cpu(tiny_checkpoint, dtype):
    model, diffusion, _ = diffreg.load_checkpoint(tiny_checkpoint, device="cuda", dtype=dtype)
    assert all(p.is_cuda and p.dtype == (dtype or torch.float32) for p in model.parameters())
    cpu_model, _, _ = diffreg.load_checkpoint(tiny_checkpoint)
    y = torch.tensor([4, 5])
    kwargs = {"sampler": "ddim", "steps": 8, "generator": None}
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gpu = diffusion.sample(model, x_T.shape, noise=x_T.cuda(), model_kwargs={"y": y.cuda()}, **kwargs)
    cpu = diffusion.sample(cpu_model, x_T.shape, noise=x_T, model_kwargs={"y": y}, **kwargs)
    tol = 2e-3 if dtype is None else 5e-2
    torch.testing.assert_close(gpu.cpu(), cpu, atol=tol, rtol=tol)


def test_cli_sample_on_cuda_equals_cpu(tiny_checkpoint, tmp_path, monkeypatch):
    import numpy as np
    from click.testing import CliRunner

    from diffreg.cli import main

    monkeypatch.chdir(tmp_path)
    for device in ("cpu", "cuda"):
        result = CliRunner().invoke(main, [
            "sample", str(tiny_checkpoint), "--num-samples", "6", "--steps", "8", "--batch-size", "4",
            "--sampler", "ddpm", "--seed", "5", "--device", device, "--output", f"{device}.png", "--npz", f"{device}.npz",
        ], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    cpu, gpu = (np.load(f"{d}.npz")["arr_0"].astype(int) for d in ("cpu", "cuda"))
    assert cpu.shape == gpu.shape and np.abs(cpu - gpu).max() <= 2  # uint8 pixels, rounding only
