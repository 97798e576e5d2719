"""CUDA: sampling runs on the GPU with zero host-device synchronisations per step.

Skipped on machines without CUDA (CI here is CPU-only; run on a GPU machine with `make test`)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_unet_checkpoint_config

import diffreg
from diffreg import registry

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model(variance):
    cfg = tiny_unet_checkpoint_config(variance)
    return registry.create("model", cfg.model.name, **cfg.model.options).cuda().eval()


@pytest.mark.parametrize("sampler,options", [("ddim", {}), ("ddim", {"eta": 1.0}), ("ddpm", {})])
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_sampling_loop_makes_no_host_device_sync(sampler, options, variance):
    diffusion = diffreg.Diffusion.from_config({"schedule": "cosine", "num_timesteps": 100, "variance": variance})
    model = _model(variance)
    y = torch.arange(4, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x_T = torch.randn(4, 1, 8, 8, device="cuda")
    run = diffusion.sample(
        model,
        (4, 1, 8, 8),
        sampler=sampler,
        steps=10,
        noise=x_T,
        generator=gen,
        model_kwargs={"y": y},
        guidance_scale=2.0,
        check_finite=False,
        **options,
    )
    torch.cuda.synchronize()
    progressive = diffreg.sampling.sample_loop_progressive(
        diffusion.respace("ddim10"),
        model,
        (4, 1, 8, 8),
        sampler=sampler,
        noise=x_T,
        generator=gen,
        model_kwargs={"y": y},
        guidance_scale=2.0,
        **options,
    )
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps = [next(progressive) for _ in range(10)]  # every step, none may synchronise
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(StopIteration):
        next(progressive)  # the single end-of-loop finiteness check runs here, outside the steps
    assert run.is_cuda and steps[-1]["sample"].is_cuda


def test_cuda_matches_cpu():
    diffusion = diffreg.Diffusion.from_config({"schedule": "cosine", "num_timesteps": 100})
    model = _model("fixed_small")
    x_T = torch.randn(2, 1, 8, 8)
    cpu = diffusion.sample(model.cpu(), x_T.shape, steps=10, noise=x_T, model_kwargs={"y": torch.tensor([1, 2])})
    gpu = diffusion.sample(
        model.cuda(), x_T.shape, steps=10, noise=x_T.cuda(), model_kwargs={"y": torch.tensor([1, 2], device="cuda")}
    )
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
