"""Regression tests from the adversarial pass on issue 12's fixes, one per kind of fault:

- sizes read from a file that drive allocations before anything is checked (a checkpoint's
  ``data.shape``, a diffusers ``config.json`` / ``scheduler_config.json``): refused, naming the bound,
  before any allocation;
- foreign configs that diffusers itself cannot build (IndexError, ZeroDivisionError, ...): one
  line naming the file, never the catch-all;
- JSON nested beyond Python's recursion limit, from any source (``--grid``, diffusers configs);
- numbers passed to native code unbounded (``--threads 100000`` crashed the process with SIGSEGV);
- a plugin component that exits (``sys.exit``) or fails while it runs: exit 1 naming the plugin,
  never "exit 0 with nothing written", a raw traceback or "please report it" (to diffreg).
"""

from __future__ import annotations

import json
import struct
import time
import warnings

import pytest
import torch
from click.testing import CliRunner

import diffreg
from diffreg import registry
from diffreg.checkpoint_config import MAX_SAMPLE_VALUES
from diffreg.cli import main
from diffreg.errors import CheckpointError, ConfigError

diffusers = pytest.importorskip("diffusers")

CATCH_ALL = "please report"


def _rewrite_config(src, dst, mutate):
    """Copy the safetensors file ``src`` to ``dst`` with its ``diffreg.config`` JSON changed by
    ``mutate`` (the tensors are untouched)."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    cfg = json.loads(header["__metadata__"]["diffreg.config"])
    mutate(cfg)
    header["__metadata__"]["diffreg.config"] = json.dumps(cfg)
    text = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return dst


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory):
    cfg = {
        "diffusion": {"schedule": "linear", "num_timesteps": 100},
        "model": {"name": "mlp", "dim": 2, "hidden": 16, "depth": 1},
        "data": {"shape": [2]},
    }
    model = registry.create("model", "mlp", dim=2, hidden=16, depth=1)
    path = tmp_path_factory.mktemp("mlp") / "m.safetensors"
    diffreg.save_checkpoint(path, model, cfg)
    return path


# -- sizes from a file are bounded before they allocate --------------------------------------------


@pytest.mark.parametrize("shape", [[10**9], [2, 10**5, 10**5], [1] * 9])
def test_a_checkpoint_data_shape_beyond_the_bound_is_refused_before_sampling(mlp_checkpoint, tmp_path, shape):
    # sampling allocated [N, *shape] from this header field alone: [1e9] hung `diffreg sample`
    bad = _rewrite_config(mlp_checkpoint, tmp_path / "bad.safetensors", lambda c: c["data"].update(shape=shape))
    with pytest.raises(CheckpointError, match=f"{MAX_SAMPLE_VALUES:,}"):
        diffreg.load_checkpoint(bad)


def test_an_mlp_checkpoint_whose_data_shape_is_not_its_dim_is_refused_at_load(mlp_checkpoint, tmp_path):
    bad = _rewrite_config(mlp_checkpoint, tmp_path / "bad.safetensors", lambda c: c["data"].update(shape=[3]))
    with pytest.raises(CheckpointError, match=r"data.shape = \[3\] but the model takes vectors of dim 2"):
        diffreg.load_checkpoint(bad)


def _tiny_pipeline(path, **scheduler):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = diffusers.DDPMScheduler(num_train_timesteps=100, **scheduler)
        diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture
def pipeline(tmp_path):
    return _tiny_pipeline(tmp_path / "pipe")


def _edit(path, part, **changes):
    file = path / part
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # 1e6 blocks: building the network hung; 1e10 class rows: the process was killed for memory
        ({"layers_per_block": 10**6}, r"layers_per_block = 1000000 is out of bounds \(at most 64\)"),
        ({"num_class_embeds": 10**10}, r"num_class_embeds = 10000000000 is out of bounds"),
        ({"block_out_channels": [8, 16] * 100}, "block_out_channels has 200 entries; at most 32"),
        ({"sample_size": 10**6}, f"too large: at most 8 dimensions and {MAX_SAMPLE_VALUES:,} values"),
    ],
)
def test_a_hostile_diffusers_unet_config_is_refused_naming_the_bound(pipeline, changes, expected):
    _edit(pipeline, "unet/config.json", **changes)
    start = time.perf_counter()
    with pytest.raises((ValueError, CheckpointError), match=expected):
        diffreg.load_checkpoint(pipeline)
    assert time.perf_counter() - start < 30


def test_diffusers_widths_that_do_not_fit_the_weights_allocate_nothing(pipeline):
    # 100,000 x 100,000 x 3 x 3 float32 convolutions are 360 GB: built for real they failed (or, on a
    # large machine, allocated) before the weights were compared; on the meta device they cost nothing
    _edit(pipeline, "unet/config.json", block_out_channels=[100_000, 100_000], norm_num_groups=4)
    with pytest.raises(CheckpointError, match="does not fit .*config.json.*shape of"):
        diffreg.load_checkpoint(pipeline)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"num_train_timesteps": 10**9}, r"num_train_timesteps must be an int in 2..100,000, got 1000000000"),
        ({"num_train_timesteps": -1}, "num_train_timesteps must be an int"),
        ({"trained_betas": [[0.1]] * 100}, "trained_betas must be a list of 2..100,000 numbers"),
        ({"beta_schedule": "evil"}, r"cannot be built from this scheduler config \(NotImplementedError"),
        ({"beta_start": 1e308}, r"cannot be built from this scheduler config \(RuntimeError"),
    ],
)
def test_a_hostile_diffusers_scheduler_config_gets_one_line_naming_it(pipeline, changes, expected):
    _edit(pipeline, "scheduler/scheduler_config.json", **changes)
    with pytest.raises(ConfigError, match=expected):
        diffreg.load_checkpoint(pipeline)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"block_out_channels": [], "down_block_types": [], "up_block_types": []}, "IndexError"),
        ({"norm_num_groups": 0}, "ZeroDivisionError"),
        ({"time_embedding_type": "evil"}, "UnboundLocalError"),
        ({"block_out_channels": [-8, 16]}, "RuntimeError"),
    ],
)
def test_a_unet_config_diffusers_cannot_build_is_a_value_error_naming_the_cause(pipeline, changes, error):
    _edit(pipeline, "unet/config.json", **changes)
    with pytest.raises(ValueError, match=f"diffusers cannot build a UNet2DModel from this config \\({error}"):
        diffreg.load_checkpoint(pipeline)


@pytest.mark.parametrize("part", ["unet/config.json", "scheduler/scheduler_config.json", "model_index.json"])
def test_deeply_nested_diffusers_json_is_refused_in_one_line(pipeline, part):
    (pipeline / part).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        diffreg.load_checkpoint(pipeline)


def test_a_diffusers_unet_config_with_a_non_int_size_names_the_key(pipeline):
    _edit(pipeline, "unet/config.json", sample_size=[8, 8, 8])
    with pytest.raises(CheckpointError, match=r"sample_size must be a positive int or \[height, width\], got \[8, 8, 8\]"):
        diffreg.load_checkpoint(pipeline)


# -- the command line: every fault is one line, exit 1 ---------------------------------------------


def _sample_args(checkpoint, tmp_path, *extra):
    return [
        "sample", str(checkpoint), "--steps", "2", "--num-samples", "2", "--output", "",
        "--npz", str(tmp_path / "o.npz"), "--no-progress", "--threads", "1", *extra,
    ]  # fmt: skip


def test_threads_beyond_the_bound_are_refused_not_a_segfault(mlp_checkpoint, tmp_path):
    # torch.set_num_threads(100_000) crashes the process with SIGSEGV
    args = _sample_args(mlp_checkpoint, tmp_path)
    args[args.index("--threads") + 1] = "100000"
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "--threads (or DIFFREG_THREADS) = 100,000: at most 4,096 CPU threads" in result.output
    assert torch.get_num_threads() < 100_000


def test_a_deeply_nested_grid_is_one_line(mlp_checkpoint, tmp_path):
    result = CliRunner().invoke(main, _sample_args(mlp_checkpoint, tmp_path, "--grid", "[" * 10_000 + "]" * 10_000))
    assert result.exit_code == 1
    assert "nested too deeply" in result.output and CATCH_ALL not in result.output


_EXITING_SAMPLER = """
import diffreg
from diffreg.builtin.samplers import DDIM

class Exiting(DDIM):
    def steps(self, ctx, x):
        raise SystemExit(0)
        yield

class Faulty(DDIM):
    def steps(self, ctx, x):
        [][1]
        yield

class Closing(DDIM):
    def steps(self, ctx, x):
        raise GeneratorExit
        yield

class Stopping(DDIM):
    def steps(self, ctx, x):
        return
        yield

@diffreg.hookimpl
def diffreg_register_samplers(register):
    register("stopping", Stopping)
    register("exiting", Exiting)
    register("faulty", Faulty)
    register("closing", Closing)
"""


@pytest.fixture
def bad_sampler_plugin(plugin_dist, monkeypatch):
    for key in ("DIFFREG_LOAD_PLUGINS", "DIFFREG_DISABLE_PLUGINS", "DIFFREG_STRICT_PLUGINS", "DIFFREG_DEBUG"):
        monkeypatch.delenv(key, raising=False)
    plugin_dist("advplug", _EXITING_SAMPLER, distribution="adv-dist", version="0.3")
    registry.reset()
    yield
    registry.reset()


@pytest.mark.parametrize(
    ("sampler", "expected"),
    [
        # sys.exit(0) inside a component made `diffreg sample` exit 0 having written nothing
        ("exiting", "raised SystemExit(0) before the command finished"),
        # GeneratorExit printed a raw traceback
        ("closing", "raised GeneratorExit before the command finished"),
        # an IndexError in the plugin went to the catch-all: "please report it" (to diffreg)
        ("faulty", "IndexError: list index out of range (a fault in that plugin"),
    ],
)
def test_a_plugin_component_that_exits_or_fails_is_named_and_exits_1(
    bad_sampler_plugin, mlp_checkpoint, tmp_path, sampler, expected
):
    result = CliRunner().invoke(main, _sample_args(mlp_checkpoint, tmp_path, "--sampler", sampler))
    assert result.exit_code == 1, result.output
    assert expected in result.output
    assert "plugin 'advplug' (adv-dist 0.3), at " in result.output
    assert "DIFFREG_DISABLE_PLUGINS=advplug" in result.output
    assert CATCH_ALL not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.npz").exists()


def test_a_plugin_sampler_that_stops_early_is_a_sampling_error(bad_sampler_plugin, mlp_checkpoint, tmp_path):
    # was a RuntimeError through the catch-all ("unexpected ... please report it")
    result = CliRunner().invoke(main, _sample_args(mlp_checkpoint, tmp_path, "--sampler", "stopping"))
    assert result.exit_code == 1
    assert "sampler Stopping stopped after 0 of 2 steps" in result.output and CATCH_ALL not in result.output
