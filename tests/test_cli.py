"""The `diffreg` command end to end (click's CliRunner, in-process)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from diffreg.cli import main


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


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
