"""GPU readiness, checked without a GPU.

Two checkers assert the brief's rule "per-step work stays on the device" on a CPU-only machine:

- the ``meta`` device: a sampling call whose state and model live on ``meta`` fails on any host
  read of a tensor value (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``) and on
  any non-scalar CPU tensor meeting the state, the two mistakes that pass on the CPU and break (or
  stall) on CUDA;
- :class:`HostReads`, a ``TorchFunctionMode`` that records every host read of a tensor value
  while a sampler's step runs, on real CPU numbers.

Both run every registered sampler (the adaptive one declares ``host_reads_per_step`` and is
checked to read). tests/test_cuda.py checks the same on a real GPU.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from conftest import tiny_unet_checkpoint_config
from torch.overrides import TorchFunctionMode

import diffreg
import diffreg.sampling.driver as driver
from diffreg import registry
from diffreg.sampling.contract import Sampler

FACTORIES = {c.name: c.factory for c in registry.components("sampler")}
ON_DEVICE = sorted(n for n, f in FACTORIES.items() if not getattr(f, "host_reads_per_step", False))
READING = sorted(n for n, f in FACTORIES.items() if getattr(f, "host_reads_per_step", False))

#: the tensor methods that read a value on the host (a device synchronisation on CUDA)
READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu", "nonzero", "__array__"}


class HostReads(TorchFunctionMode):
    """Records ``(method, caller)`` for every host read of a tensor value while active."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
            self.reads.append((name, where))
        return func(*args, **(kwargs or {}))


def _setup(variance: str, device: str):
    cfg = tiny_unet_checkpoint_config(variance)
    torch.manual_seed(0)
    model = registry.create("model", cfg.model.name, **cfg.model.options).eval().to(device)
    diffusion = diffreg.Diffusion.from_config({"schedule": "cosine", "num_timesteps": 100, "variance": variance})
    return model, diffusion


@pytest.fixture
def meta_ok(monkeypatch):
    """Let the sampling driver accept device="meta" (it accepts cpu, cuda and mps only)."""
    monkeypatch.setattr(driver, "resolve_device", torch.device)


#: call variants: (variance, options); every sampler runs each
VARIANTS = [
    ("fixed_small", {}),
    ("learned_range", {"guidance_scale": 3.0}),
    ("fixed_small", {"noise_type": "brownian", "guidance_scale": 2.0, "guidance": "apg"}),
    ("learned_range", {"dtype": torch.float16, "dynamic_threshold": 0.9}),
]


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("sampler", ON_DEVICE)
def test_every_sampler_runs_on_the_meta_device(meta_ok, sampler, variant):
    variance, options = VARIANTS[variant]
    model, diffusion = _setup(variance, "meta")
    y = torch.tensor([1, 2, 3], device="meta")
    out = diffusion.sample(
        model, (3, 1, 8, 8), sampler=sampler, steps=4, model_kwargs={"y": y}, check_finite=False, **options
    )
    assert out.device.type == "meta" and out.shape == (3, 1, 8, 8)
    assert out.dtype == options.get("dtype", torch.float32)


@pytest.mark.parametrize("guidance", sorted({c.name for c in registry.components("guidance")} - {"autoguidance"}))
def test_every_guidance_runs_on_the_meta_device(meta_ok, guidance):
    model, diffusion = _setup("fixed_small", "meta")
    y = torch.tensor([1, 2], device="meta")
    scale = 0.5 if guidance == "cfgpp" else 2.0  # CFG++'s lambda is in [0, 1]
    out = diffusion.sample(
        model, (2, 1, 8, 8), sampler="ddim", steps=4, model_kwargs={"y": y}, guidance=guidance,
        guidance_scale=scale, check_finite=False,
    )
    assert out.device.type == "meta"


def test_autoguidance_with_a_guide_model_runs_on_the_meta_device(meta_ok):
    model, diffusion = _setup("fixed_small", "meta")
    guide, _ = _setup("fixed_small", "meta")
    out = diffusion.sample(
        model, (2, 1, 8, 8), sampler="dpmpp_2m", steps=4, model_kwargs={"y": torch.tensor([1, 2], device="meta")},
        guidance={"name": "autoguidance", "guide": guide}, guidance_scale=2.0, check_finite=False,
    )
    assert out.device.type == "meta"


@pytest.mark.parametrize("config", [
    {"schedule": "rectified_flow", "parameterization": "flow"},
    {"schedule": "edm", "parameterization": "edm"},
    {"schedule": "vp", "parameterization": "v"},
])
def test_continuous_processes_sample_on_the_meta_device(meta_ok, config):
    diffusion = diffreg.Diffusion.from_config(config)
    model = registry.create("model", "unet", in_channels=1, out_channels=1, image_size=8, model_channels=16,
                            channel_mult=[1, 2], num_heads=2).eval().to("meta")
    for sampler in ("euler", "heun", "dpmpp_2m_sde", "ddim"):
        out = diffusion.sample(model, (2, 1, 8, 8), sampler=sampler, steps=4, check_finite=False,
                               noise_type="brownian")
        assert out.device.type == "meta"


def test_the_meta_checker_catches_a_host_read_and_a_cpu_tensor(meta_ok):
    """The checker can fail: a sampler that reads a value per step, and one that meets a CPU table."""
    model, diffusion = _setup("fixed_small", "meta")

    class Reads(Sampler):
        def steps(self, ctx, x):
            for i in range(ctx.num_steps):
                x0 = ctx.denoise(x, i).pred_xstart
                if x0.abs().max() > 1:  # branching on a tensor value: a sync on CUDA
                    x0 = x0 / 2
                yield x0, x0

    class CpuTable(Sampler):
        def steps(self, ctx, x):
            scale = torch.ones(x.shape[1:])  # made without device=
            for i in range(ctx.num_steps):
                x0 = ctx.denoise(x, i).pred_xstart
                yield x0 * scale, x0

    for bad in (Reads(), CpuTable()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            diffusion.sample(model, (2, 1, 8, 8), sampler=bad, steps=3, check_finite=False,
                             model_kwargs={"y": torch.tensor([1, 2], device="meta")})


class ToyNet(torch.nn.Module):
    """A class-conditional stand-in for the network, arithmetic only (the UNet checks its labels'
    values on the CPU, by design, and is covered on ``meta`` above)."""

    null_class = 10

    def __init__(self, learned: bool):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.1))
        self.learned = learned

    def forward(self, x, t, y=None):
        eps = x * self.w + 1e-3 * t.float().reshape(-1, *[1] * (x.ndim - 1)) + 1e-2 * y.float().reshape(-1, 1, 1, 1)
        return torch.cat([eps, torch.zeros_like(eps)], 1) if self.learned else eps


def _steps_reads(sampler: str, variance: str, **options) -> list[tuple[str, str]]:
    """The host reads made while each step of a CPU sampling call runs (setup and the single
    end-of-loop finiteness read excluded)."""
    _, diffusion = _setup(variance, "cpu")
    model = ToyNet(variance.startswith("learned"))
    gens = diffreg.sampling.per_sample_generators(0, 2)
    run = diffreg.sampling.sample_loop_progressive(
        diffusion.respace("ddim4"), model, (2, 1, 8, 8), sampler=sampler, generator=gens,
        model_kwargs={"y": torch.tensor([3, 4])}, **options,
    )
    mode = HostReads()
    with torch.no_grad():
        for _ in range(run.ctx.num_steps):
            with mode:
                next(run)
        with pytest.raises(StopIteration):
            next(run)  # the end-of-loop finiteness report reads once, after the steps
    return mode.reads


@pytest.mark.parametrize("sampler", ON_DEVICE)
def test_sampling_steps_make_no_host_reads(sampler):
    reads = _steps_reads(sampler, "learned_range", guidance_scale=2.0)
    reads += _steps_reads(sampler, "fixed_small", noise_type="brownian")
    assert reads == [], f"{sampler} reads tensor values on the host inside its steps: {reads}"


@pytest.mark.parametrize("sampler", READING)
def test_samplers_declaring_host_reads_do_read(sampler):
    """The declaration is true (else the sampler should drop it and be checked as the others)."""
    reads = _steps_reads(sampler, "fixed_small")
    assert reads, f"{sampler} declares host_reads_per_step but made no host read"


def test_the_host_read_checker_sees_a_read():
    x = torch.ones(3)
    with HostReads() as mode:
        if x.sum() > 0:
            float(x[0])
    assert [name for name, _ in mode.reads] == ["__bool__", "__float__"]


# -- torchrun on GPUs: one device per rank, NCCL only for CUDA tensors --------------------------


def test_rank_device_gives_each_torchrun_process_its_local_gpu(monkeypatch):
    from diffreg.train_distributed import rank_device

    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert rank_device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # an explicit index is kept
    assert rank_device(torch.device("cpu")) == torch.device("cpu")
    assert made_current == [torch.device("cuda", 1), torch.device("cuda", 0)]
    monkeypatch.setenv("WORLD_SIZE", "1")
    made_current.clear()
    assert rank_device(torch.device("cuda")) == torch.device("cuda")  # one process: unchanged
    assert made_current == []


@pytest.mark.parametrize("device,backend", [("cpu", "gloo"), ("cuda", "nccl")])
def test_process_group_backend_follows_the_training_device(monkeypatch, device, backend):
    """NCCL reduces CUDA tensors only: a CPU run on a machine with a GPU must use gloo."""
    import torch.distributed as dist

    from diffreg.train_distributed import init_distributed

    chosen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", chosen.append)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert init_distributed(torch.device(device)) == (0, 2)
    assert chosen == [backend]
