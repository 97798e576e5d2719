"""The `diffreg` command end to end (click's CliRunner, in-process)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from diffreg.cli import main


def test_sample_writes_grid_and_npz_in_evaluator_layout(run, tiny_checkpoint, tmp_path):
    result = run(
        "sample",
        tiny_checkpoint,
        "--num-samples",
        12,
        "--steps",
        5,
        "--batch-size",
        5,
        "--output",
        "g.png",
        "--npz",
        "s.npz",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "12 samples with ddim (5 steps, 5 NFE" in result.output
    with np.load(tmp_path / "s.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (12, 8, 8, 1)
    assert labels.tolist() == [k % 10 for k in range(12)]
    grid = Image.open(tmp_path / "g.png")
    assert grid.size[0] > 8 * 10


def test_samples_do_not_depend_on_batch_size(run, tiny_checkpoint, tmp_path):
    for name, batch in (("a.npz", 6), ("b.npz", 4)):
        assert (
            run(
                "sample",
                tiny_checkpoint,
                "--num-samples",
                6,
                "--steps",
                4,
                "--batch-size",
                batch,
                "--sampler",
                "ddpm",
                "--npz",
                name,
                "--no-progress",
            ).exit_code
            == 0
        )
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_sample_with_class_label_and_guidance(run, tiny_checkpoint, tmp_path):
    result = run(
        "sample",
        tiny_checkpoint,
        "--num-samples",
        4,
        "--steps",
        3,
        "--class-label",
        "7",
        "--guidance-scale",
        2.5,
        "--eta",
        0.5,
        "--npz",
        "s.npz",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_1"].tolist() == [7, 7, 7, 7]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--class-label", "12"], "labels must be in 0..9"),
        (["--sampler", "ddimm"], "did you mean 'ddim'"),
        (["--steps", "0"], "steps must be in [1, 100]"),
        (["--sampler", "ddpm", "--eta", "0.3"], "sampler 'ddpm' has no option 'eta'"),
    ],
)
def test_bad_sample_arguments_fail_with_a_clear_message(run, tiny_checkpoint, args, message):
    result = run("sample", tiny_checkpoint, "--num-samples", 2, "--no-progress", *args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_sample_on_a_non_checkpoint_is_a_clear_error(run, tmp_path):
    (tmp_path / "x.safetensors").write_text("hello")
    result = run("sample", tmp_path / "x.safetensors", "--no-progress")
    assert result.exit_code == 1 and "not a readable safetensors file" in result.output


def test_info_prints_config_and_parameter_count(run, tiny_checkpoint):
    result = run("info", tiny_checkpoint, "--json")
    report = json.loads(result.output)
    assert report["config"]["model"]["name"] == "unet"
    assert report["parameters"] > 1000 and report["format_version"] == 2  # 2: with sampling defaults


def test_plugins_and_list_json(run):
    plugins = json.loads(run("plugins", "--json").output)
    builtin = [p for p in plugins["plugins"] if p["name"] == "diffreg"]
    assert builtin and {"kind": "sampler", "name": "ddim", "qualified_name": "diffreg:ddim"} in builtin[0]["components"]
    listed = json.loads(run("list", "sampler", "--json").output)
    assert {c["qualified_name"] for c in listed} >= {"diffreg:ddim", "diffreg:ddpm"}
    assert all(c["kind"] == "sampler" for c in listed)


def test_train_then_sample(run, tmp_path):
    (tmp_path / "t.toml").write_text(
        'steps = 3\nbatch_size = 8\n[diffusion]\nnum_timesteps = 50\nschedule = "cosine"\n'
        '[model]\nname = "unet"\nmodel_channels = 8\nchannel_mult = [1]\nattention_resolutions = []\nnum_heads = 1\n'
    )
    result = run("train", "--config", "t.toml", "--output", "m.safetensors", "--no-progress")
    assert result.exit_code == 0, result.output
    result = run("sample", "m.safetensors", "--num-samples", 3, "--steps", 2, "--no-progress")
    assert result.exit_code == 0, result.output


@pytest.fixture
def installed_plugins(plugin_dist):
    """A working plugin and a broken one, visible to the process-wide registry for one test."""
    from plugin_fixtures import registering_source

    from diffreg import registry

    plugin_dist("goodplug", registering_source("good_sampler", order=1), distribution="good-dist", version="2.0.1")
    plugin_dist("badplug", "raise ImportError('needs a missing library')\n", distribution="bad-dist", version="0.3")
    registry.reset()
    yield
    registry.reset()


def test_plugins_shows_distribution_version_components_and_failures(run, installed_plugins):
    result = run("plugins")
    assert result.exit_code == 0
    assert "goodplug  (good-dist 2.0.1)" in result.output
    assert "sampler           good_sampler" in result.output
    failed = result.output.split("failed plugins:")[1]
    assert "badplug  (bad-dist 0.3): import failed: ImportError: needs a missing library" in failed


def test_list_shows_qualified_names_with_their_source(run, installed_plugins):
    result = run("list", "sampler")
    assert "goodplug:good_sampler" in result.output and "good-dist 2.0.1" in result.output
    assert "diffreg:ddim" in result.output


def test_a_plugin_sampler_runs_from_the_command_line(run, installed_plugins, tiny_checkpoint, tmp_path):
    result = run(
        "sample", tiny_checkpoint, "--sampler", "good_sampler", "--num-samples", 2, "--steps", 2, "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert "with good_sampler" in result.output


def test_own_images_train_interrupt_resume_then_sample_with_any_sampler(run, tmp_path):
    """Issue 6's story: a folder of images, a run stopped half-way and resumed, and a file that
    someone else samples with any sampler and no flags."""
    for k, name in enumerate(["circle", "square"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(4):
            img = Image.new("L", (8, 8), 0)
            img.paste(255 if k else 128, (i, i, i + 4, i + 4))
            img.save(tmp_path / "imgs" / name / f"{i}.png")
    common = [
        "--set",
        "data.name=folder",
        "--set",
        "data.path=imgs",
        "--set",
        "diffusion.num_timesteps=50",
        "--set",
        "diffusion.schedule=cosine",
        "--set",
        "model.model_channels=8",
        "--set",
        "model.channel_mult=[1]",
        "--set",
        "model.attention_resolutions=[]",
        "--set",
        "model.num_heads=1",
        "--batch-size",
        4,
        "--output",
        "mine.safetensors",
        "--no-progress",
    ]
    assert run("train", "--steps", 2, *common).exit_code == 0
    result = run("train", "--steps", 4, "--resume", *common)
    assert result.exit_code == 0, result.output
    for sampler in ("ddim", "ddpm", "dpmpp_2m", "unipc", "heun"):
        result = run(
            "sample",
            "mine.safetensors",
            "--sampler",
            sampler,
            "--steps",
            3,
            "--num-samples",
            2,
            "--npz",
            f"{sampler}.npz",
            "--no-progress",
        )
        assert result.exit_code == 0, result.output
        with np.load(tmp_path / f"{sampler}.npz") as f:
            assert f["arr_0"].shape == (2, 8, 8, 1) and f["arr_1"].tolist() == [0, 1]


def test_bad_set_override_is_a_clear_error(run):
    result = run("train", "--set", "lr", "--output", "x.safetensors", "--no-progress")
    assert result.exit_code == 1 and "expected KEY=VALUE" in result.output


def test_bundled_model_samples_with_a_plugin_solver(run, tmp_path):
    result = run(
        "sample",
        "--sampler",
        "dpmpp_2m",
        "--steps",
        10,
        "--num-samples",
        10,
        "--npz",
        "s.npz",
        "--option",
        "sigmas=karras",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "with dpmpp_2m (10 steps, 10 NFE, grid karras" in result.output  # no collapse: 10 asked, 10 run


def test_grid_flag_chooses_the_levels_and_conflicts_are_refused(run):
    result = run("sample", "--steps", 7, "--num-samples", 2, "--npz", "", "--grid", '{"name": "karras", "rho": 5}',
                 "--no-progress")
    assert result.exit_code == 0, result.output
    assert "(7 steps, 7 NFE, grid " in result.output and "karras" in result.output
    result = run("sample", "--grid", "karras", "--spacing", "leading", "--no-progress")
    assert result.exit_code != 0 and "--spacing 'leading' (its older spelling) both given" in result.output
    result = run("sample", "--sampler", "dpmpp_2m", "--spacing", "leading", "--option", "sigmas=karras")
    assert result.exit_code != 0 and "sigmas='karras' both choose the grid" in result.output
    result = run("sample", "--grid", "karas")
    assert result.exit_code != 0 and "did you mean 'karras'" in result.output


def test_a_failure_writing_the_npz_leaves_the_previous_grid_and_npz_untouched(run, tiny_checkpoint, tmp_path):
    (tmp_path / "g.png").write_bytes(b"old grid")
    (tmp_path / "s.npz").write_bytes(b"old arrays")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(np, "savez", disk_full)
        args = ["sample", str(tiny_checkpoint), "--num-samples", "2", "--steps", "2", "--output", "g.png"]
        result = CliRunner().invoke(main, [*args, "--npz", "s.npz", "--no-progress"])
    assert result.exit_code != 0
    assert (tmp_path / "g.png").read_bytes() == b"old grid"  # not replaced by the new grid alone
    assert (tmp_path / "s.npz").read_bytes() == b"old arrays"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


# -- issue 19: the command line as a newcomer meets it ------------------------------------------------


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_flag_sets_torch_threads_for_sample_and_train(run, tiny_checkpoint, restore_threads):
    torch.set_num_threads(2)
    result = run("sample", tiny_checkpoint, "--num-samples", 1, "--steps", 1, "--threads", 1, "--no-progress")
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1 and "1 CPU thread ->" in result.output
    for command in ("sample", "train"):
        result = run(command, "--threads", 0)
        assert result.exit_code == 2 and "Invalid value for '--threads'" in result.output


def test_default_threads_follow_omp_and_the_idle_cores(monkeypatch):
    from diffreg import cli_support

    assert cli_support.default_threads({"OMP_NUM_THREADS": "3"}) == 3
    monkeypatch.setattr(cli_support.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for load, expected in ((0.2, 8), (2.4, 6), (6.7, 1), (7.6, 1), (100.0, 1)):  # round(8 - load), at least 1
        monkeypatch.setattr(cli_support.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert cli_support.default_threads({}) == expected, load


def test_a_huge_run_shows_one_progress_bar_and_a_capped_picture(run, tiny_checkpoint, tmp_path):
    result = run(
        "sample", tiny_checkpoint, "--num-samples", 30, "--batch-size", 7, "--steps", 2,
        "--grid-max", 12, "--output", "g.png", "--npz", "s.npz", "--progress",
    )
    assert result.exit_code == 0, result.output
    # 5 batches of 2 steps in one bar of 10 steps (tqdm redraws it; it starts once)
    assert len(re.findall(r"(?<!\d)0/10 \[", result.stderr)) == 1 and "10/10 [" in result.stderr
    assert "/2 [" not in result.stderr  # no bar per batch
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (30, 8, 8, 1)
    # 12 tiles of 8x8 pixels upscaled 4x (32 px) with 2 px gaps, in 10 columns (one per class): 2 rows
    assert Image.open(tmp_path / "g.png").size == (10 * 34 + 2, 2 * 34 + 2)
    assert "the picture shows the first 12" in result.output


def test_a_failed_picture_never_costs_the_samples(run, tiny_checkpoint, tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError("cannot allocate the picture")

    monkeypatch.setattr(Image.Image, "save", no_memory)
    result = run("sample", tiny_checkpoint, "--num-samples", 3, "--steps", 2, "--output", "g.png", "--npz", "s.npz",
                 "--no-progress")
    assert result.exit_code == 1
    message = "the samples are in 's.npz'; the picture 'g.png' was not written: cannot allocate the picture"
    assert message in result.output
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (3, 8, 8, 1) and f["arr_1"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # no picture, no temporary file


def test_the_picture_format_follows_the_suffix(run, tiny_checkpoint, tmp_path):
    for name, magic in (("g.jpg", b"\xff\xd8\xff"), ("G.JPEG", b"\xff\xd8\xff"), ("g.png", b"\x89PNG\r\n\x1a\n"),
                        ("g.bmp", b"BM")):
        result = run("sample", tiny_checkpoint, "--num-samples", 2, "--steps", 1, "--output", name, "--npz", "",
                     "--no-progress")
        assert result.exit_code == 0, result.output
        assert (tmp_path / name).read_bytes().startswith(magic), name


@pytest.mark.parametrize(
    "args,message",
    [
        (["--output", "g.pdf"], "--output 'g.pdf': suffix '.pdf'; accepted: .png, .jpg, .jpeg"),
        (["--output", "grid"], "--output 'grid': no suffix; accepted: .png"),
        (["--npz", "s.npy"], "--npz 's.npy': the samples are an .npz archive; give a name ending in .npz"),
    ],
)
def test_unknown_suffixes_are_refused_before_sampling(run, tmp_path, args, message):
    result = run("sample", "--no-progress", *args)  # the bundled model: refused before it is loaded
    assert result.exit_code == 1 and message in result.output
    assert list(tmp_path.iterdir()) == []


def test_guidance_without_labels_is_refused_naming_the_value(run, tiny_checkpoint):
    result = run("sample", tiny_checkpoint, "--class-label", "none", "--guidance-scale", 3, "--no-progress")
    assert result.exit_code == 1
    assert "--guidance-scale 3 does nothing here: --class-label none draws without labels" in result.output


def test_class_label_none_records_the_null_label(run, tiny_checkpoint, tmp_path):
    result = run("sample", tiny_checkpoint, "--class-label", "none", "--num-samples", 3, "--steps", 1, "--npz",
                 "s.npz", "--no-progress")
    assert result.exit_code == 0, result.output
    assert ", unconditional," in result.output and "guidance" not in result.output  # nothing to guide towards
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_1"].tolist() == [-1, -1, -1]


def test_an_unconditional_checkpoint_writes_no_labels(run, tmp_path):
    """guided-diffusion's image_sample.py writes arr_0 only when the model has no classes."""
    import diffreg
    from diffreg import registry

    cfg = diffreg.CheckpointConfig.from_dict(
        {
            "diffusion": {"num_timesteps": 20, "schedule": "cosine"},
            "model": {"name": "unet", "in_channels": 1, "out_channels": 1, "image_size": 8, "model_channels": 8,
                      "channel_mult": [1], "attention_resolutions": [], "num_heads": 1},
            "data": {"shape": [1, 8, 8]},
        }
    )
    diffreg.save_checkpoint(tmp_path / "u.safetensors", registry.create("model", "unet", **cfg.model.options), cfg)
    result = run("sample", "u.safetensors", "--num-samples", 2, "--steps", 1, "--npz", "s.npz", "--no-progress")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "s.npz") as f:
        assert sorted(f.files) == ["arr_0"]
    result = run("sample", "u.safetensors", "--guidance-scale", 2, "--no-progress")
    assert result.exit_code == 1
    assert "--guidance-scale 2 does nothing here: this checkpoint is unconditional" in result.output


def test_the_grid_has_one_column_per_requested_label(run, tiny_checkpoint, tmp_path):
    result = run("sample", tiny_checkpoint, "--class-label", "1,7", "--num-samples", 5, "--steps", 1,
                 "--output", "g.png", "--npz", "s.npz", "--no-progress")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "s.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert labels.tolist() == [1, 7, 1, 7, 1]
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (3 * 34 + 2, 2 * 34 + 2)  # two columns, three rows
    for k in range(5):  # sample k sits at row k // 2, column k % 2 (its label's column), upscaled 4x
        r, c = divmod(k, 2)
        tile = grid[2 + r * 34 : 2 + r * 34 + 32, 2 + c * 34 : 2 + c * 34 + 32]
        assert np.array_equal(tile, np.kron(images[k, :, :, 0], np.ones((4, 4), dtype=np.uint8))), k


def test_info_defaults_to_the_bundled_model_and_names_the_data_as_the_config_does(run):
    result = run("info", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["file"].endswith("digits.safetensors")
    assert report["config"]["data"]["name"] == "digits" and "dataset" not in report["config"]["data"]
    text = run("info").output
    assert '"name": "digits"' in text and '"dataset"' not in text


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample", "--seed", "-5"], "Invalid value for '--seed': -5 is not in the range"),
        (["train", "--set", "lr", "--output", "x.safetensors"], "--set 'lr': expected KEY=VALUE"),
        (["sample", "--sampler", "DDIM", "--num-samples", "1"], "unknown sampler 'DDIM'"),
    ],
)
def test_messages_name_the_flag_and_the_value(run, args, message):
    result = run(*args, "--no-progress")
    assert result.exit_code in (1, 2) and message in result.output
    assert "--option" not in result.output
    if "DDIM" in args:
        assert "did you mean 'ddim'?" in result.output


def test_a_sampler_in_a_config_file_points_to_where_samplers_are_chosen(run, tmp_path):
    (tmp_path / "c.toml").write_text('[diffusion]\nsampler = "ddim"\n')
    result = run("train", "--config", "c.toml", "--output", "x.safetensors", "--no-progress")
    assert result.exit_code == 1 and "has no field 'sampler'" in result.output
    assert "diffreg sample --sampler NAME" in result.output and "did you mean 'timestep_sampler'" not in result.output


def test_a_typo_in_disable_plugins_is_reported_from_the_command_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "DIFFREG_DISABLE_PLUGINS": "diffreg-solverz", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "diffreg.cli", "list", "sampler"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("warning: DIFFREG_DISABLE_PLUGINS names 'diffreg-solverz'")
    assert "did you mean 'diffreg-solvers'?" in result.stderr and len(result.stderr.splitlines()) == 1


def test_per_sample_seeds_make_samples_independent_of_the_batch_size_to_float_rounding(tiny_checkpoint):
    """The README's claim: the noise of sample k is exactly the same in any batch; the samples agree
    to float32 rounding of the batched kernels (measured ~1e-6 on the bundled model), not bit for bit."""
    import diffreg
    from diffreg.sampling import per_sample_generators
    from diffreg.sampling.noise import draw_noise

    model, diffusion, _ = diffreg.load_checkpoint(tiny_checkpoint)
    alone = torch.cat([draw_noise((1, 1, 8, 8), per_sample_generators(0, 1, start=k), "cpu", torch.float32)
                       for k in range(6)])
    batched = draw_noise((6, 1, 8, 8), per_sample_generators(0, 6), "cpu", torch.float32)
    assert torch.equal(alone, batched)
    y = torch.tensor([3, 1, 4, 1, 5, 9])
    runs = []
    for batch in (6, 4, 1):
        parts = []
        for lo in range(0, 6, batch):
            n = min(batch, 6 - lo)
            gens = per_sample_generators(0, n, start=lo)
            parts.append(
                diffusion.sample(model, (n, 1, 8, 8), sampler="ddpm", steps=5, model_kwargs={"y": y[lo : lo + n]},
                                 generator=gens)
            )
        runs.append(torch.cat(parts))
    for other in runs[1:]:
        assert (runs[0] - other).abs().max().item() < 1e-5


def test_float16_on_the_cpu_warns(run, tiny_checkpoint):
    result = run("sample", tiny_checkpoint, "--dtype", "float16", "--num-samples", 1, "--steps", 1, "--npz", "",
                 "--output", "g.png", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "warning: --dtype float16 on the CPU is ~20-35x slower than float32" in result.stderr


def test_sample_help_states_the_guidance_convention(run):
    text = " ".join(run("sample", "--help").output.split())
    assert "0 = unconditional, 1 = conditional without guidance" in text


def test_train_bundled_script_writes_outside_the_package(tmp_path):
    """The script runs `diffreg train`; a stand-in `diffreg` on PATH records the arguments."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "scripts").mkdir()
    shutil.copy(repo / "scripts" / "train_bundled.sh", tmp_path / "scripts")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "diffreg").write_text('#!/bin/sh\necho "$@" > "$ARGS_FILE"\n')
    (tmp_path / "bin" / "diffreg").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "ARGS_FILE": str(tmp_path / "args")}
    env.pop("OUTPUT", None)
    subprocess.run(["bash", str(tmp_path / "scripts" / "train_bundled.sh"), "--threads", "1"], env=env, check=True)
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("--output") + 1] == "out/digits.safetensors" and (tmp_path / "out").is_dir()
    assert "assets" not in " ".join(args) and args[-2:] == ["--threads", "1"]
    subprocess.run(["bash", str(tmp_path / "scripts" / "train_bundled.sh")], env={**env, "OUTPUT": "x/m.safetensors"},
                   check=True)
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("--output") + 1] == "x/m.safetensors"


def test_class_label_none_needs_a_null_class():
    from diffreg.cli_support import parse_labels

    assert parse_labels("none", 10, 3, null_class=10).tolist() == [10, 10, 10]  # the model's "no label"
    with pytest.raises(ValueError, match="--class-label none: this model has no null class"):
        parse_labels("none", 10, 3, null_class=None)


def test_a_guidance_method_without_labels_is_refused_but_autoguidance_is_not(run, tiny_checkpoint):
    result = run("sample", tiny_checkpoint, "--class-label", "none", "--guidance", "apg", "--no-progress")
    assert result.exit_code == 1
    assert "--guidance apg needs class labels: --class-label none draws without labels" in result.output
    result = run("sample", tiny_checkpoint, "--class-label", "none", "--guidance", "autoguidance", "--guidance-option",
                 f"guide={tiny_checkpoint}", "--guidance-scale", 2, "--num-samples", 2, "--steps", 1, "--npz", "",
                 "--output", "g.png", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "guidance autoguidance" in result.output and " 2, " in result.output


def test_a_closed_pipe_on_stdout_ends_the_command_quietly(tmp_path):
    import subprocess
    import sys

    # `diffreg list | head -1`: the reader goes away; the command stops as shell tools do (SIGPIPE
    # status 141), without "Error: Broken pipe"
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffreg.cli", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path
    )
    proc.stdout.close()  # before the command writes anything (importing torch alone takes a second)
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, stderr
    assert "Broken pipe" not in stderr and "Traceback" not in stderr
