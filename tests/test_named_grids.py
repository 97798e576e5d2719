"""Named grids of a checkpoint (``sampling.grids``, diffreg/named_grids.py): stored by
``diffreg optimize-steps --save-to-checkpoint [--name]``, used by ``diffreg sample --grid NAME``,
listed by ``diffreg info``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

import diffreg
from diffreg.config import CheckpointConfig, SamplingConfig
from diffreg.errors import ConfigError

pytest.importorskip("diffreg_solvers")

FAST = ("--draws", 4, "--max-evals", 1, "--reference-steps", 4, "--threads", 1)



@pytest.fixture
def sampling_stats(monkeypatch):
    """The ``stats`` every ``Diffusion.sample`` call of a run fills (NFE, steps, the timesteps the
    model was called at), as the sampling driver reports them."""
    seen: list[dict] = []
    original = diffreg.Diffusion.sample

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append(dict(kwargs["stats"]))
        return out

    monkeypatch.setattr(diffreg.Diffusion, "sample", spy)
    return seen


def _stored_config(path) -> dict:
    """The configuration JSON as written in the file's header (read without diffreg)."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["diffreg.config"])


def _sample(run, *args):
    return run("sample", *args, "--num-samples", 3, "--output", "", "--npz", "s.npz", "--no-progress", "--threads", 1)


def test_two_optimized_grids_are_kept_by_name_and_sampled_by_name(run, tiny_checkpoint, tmp_path, sampling_stats):
    # optimize twice, the first run's output as the second's input: two samplers, two NFEs
    first = run(
        "optimize-steps", tiny_checkpoint, "--sampler", "dpmpp_2m", "--nfe", 3, *FAST,
        "--output", "a.json", "--save-to-checkpoint", "a.safetensors",
    )  # fmt: skip
    assert first.exit_code == 0, first.output
    assert "`--grid dpmpp_2m-3` by name" in first.output
    second = run(
        "optimize-steps", "a.safetensors", "--sampler", "unipc", "--nfe", 5, *FAST,
        "--output", "b.json", "--save-to-checkpoint", "b.safetensors",
    )  # fmt: skip
    assert second.exit_code == 0, second.output
    assert "(other named grids: dpmpp_2m-3)" in second.output
    results = {"dpmpp_2m-3": json.loads((tmp_path / "a.json").read_text())}
    results["unipc-5"] = json.loads((tmp_path / "b.json").read_text())
    # the file holds both, as each run reported them, and the second run's grid as the default
    sampling = _stored_config(tmp_path / "b.safetensors")["sampling"]
    assert sorted(sampling["grids"]) == ["dpmpp_2m-3", "unipc-5"]
    for name, result in results.items():
        preset = sampling["grids"][name]
        assert preset["grid"] == result["grid"] and preset["sampler"] == result["sampler"]
        assert preset["steps"] == result["steps"] and preset["nfe"] == result["nfe"]
        assert preset["held_out_error"] == result["held_out_error"]["optimized"]
    assert sampling["grid"] == results["unipc-5"]["grid"] and sampling["sampler"] == "unipc"

    # each name samples on its saved times with its saved sampler, whatever the default is
    for name, result in results.items():
        sampling_stats.clear()
        out = _sample(run, "b.safetensors", "--grid", name)
        assert out.exit_code == 0, out.output
        (stats,) = sampling_stats
        assert stats["timesteps"] == pytest.approx(result["grid"]["times"], abs=0)
        assert stats["nfe"] == result["nfe"] and stats["steps"] == len(result["grid"]["times"])
        assert f"3 samples with {result['sampler']} ({result['steps']} steps, {result['nfe']} NFE, grid {name}" in (
            out.output
        )
    # and --grid dpmpp_2m-3 gives the samples of dpmpp_2m on those times given explicitly
    named = _sample(run, "b.safetensors", "--grid", "dpmpp_2m-3")
    with np.load(tmp_path / "s.npz") as f:
        by_name = f["arr_0"]
    explicit = _sample(
        run,
        tiny_checkpoint,
        "--sampler",
        "dpmpp_2m",
        "--steps",
        3,
        "--grid",
        json.dumps(results["dpmpp_2m-3"]["grid"]["times"]),
    )
    assert named.exit_code == 0 and explicit.exit_code == 0, explicit.output
    with np.load(tmp_path / "s.npz") as f:
        np.testing.assert_array_equal(by_name, f["arr_0"])

    # diffreg info lists both, in text and JSON
    text = run("info", "b.safetensors")
    assert text.exit_code == 0, text.output
    assert "named grids (diffreg sample --grid NAME):" in text.output
    assert "dpmpp_2m-3           dpmpp_2m, 3 steps, 3 NFE, held-out error" in text.output
    assert "unipc-5              unipc, 5 steps, 5 NFE, held-out error" in text.output
    lines = text.output.splitlines()
    assert [line.endswith("(the default)") for line in lines if "-3 " in line or "-5 " in line] == [False, True]
    report = json.loads(run("info", "--json", "b.safetensors").output)
    assert [(g["name"], g["sampler"], g["steps"], g["nfe"], g["default"]) for g in report["named_grids"]] == [
        ("dpmpp_2m-3", "dpmpp_2m", 3, 3, False),
        ("unipc-5", "unipc", 5, 5, True),
    ]


@pytest.fixture
def named_checkpoint(tiny_checkpoint, tmp_path):
    """The tiny checkpoint with two hand-made named grids (times no built-in grid produces)."""
    model, _, cfg = diffreg.load_checkpoint(None)  # the bundled digits model: trained, so orders differ
    sampling = cfg.sampling.with_named_grid(
        "odd", {"sampler": "dpmpp_2m", "grid": [99.0, 71.5, 40.25, 3.0], "nfe": 4}, default=False
    ).with_named_grid("heun-x", {"sampler": {"name": "heun", "max_ratio": 1e9}, "grid": [95.5, 50.0, 10.0]})
    path = tmp_path / "named.safetensors"
    import attrs

    diffreg.save_checkpoint(path, model, attrs.evolve(cfg, sampling=sampling))
    return path


def test_sample_by_name_uses_its_times_and_sampler_or_the_given_one_with_a_note(run, named_checkpoint, sampling_stats):
    out = _sample(run, named_checkpoint, "--grid", "odd")
    assert out.exit_code == 0, out.output
    assert sampling_stats[-1]["timesteps"] == [99.0, 71.5, 40.25, 3.0]
    assert sampling_stats[-1]["nfe"] == 4 and "with dpmpp_2m (4 steps, 4 NFE, grid odd" in out.output
    assert "note:" not in out.output
    # --steps equal to its length is fine
    assert _sample(run, named_checkpoint, "--grid", "odd", "--steps", 4).exit_code == 0
    # another sampler: allowed, with one note
    out = _sample(run, named_checkpoint, "--grid", "odd", "--sampler", "ddim")
    assert out.exit_code == 0, out.output
    assert "note: grid 'odd' was fitted for sampler dpmpp_2m; sampling it with ddim" in out.output
    assert sampling_stats[-1]["timesteps"] == [99.0, 71.5, 40.25, 3.0] and "with ddim (4 steps" in out.output
    # the sampler's options come with it (the checkpoint's default sampler is not used)
    out = _sample(run, named_checkpoint, "--grid", "heun-x")
    assert out.exit_code == 0 and "note:" not in out.output, out.output
    # Heun with max_ratio 1e9 corrects every step to a nonzero level (2 evaluations each) and takes an
    # Euler step to 0 (1): 2 + 2 + 1 (with the default max_ratio 5 each of these steps is Euler: 3)
    assert sampling_stats[-1]["timesteps"] == [95.5, 50.0, 10.0] and sampling_stats[-1]["nfe"] == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--grid", "odd", "--steps", 7), "--steps 7 and --grid odd (4 levels) disagree; leave --steps out or give "),
        (
            ("--grid", "od"),
            "unknown grid 'od'; known: explicit, exponential, karras, lambda_uniform, leading, linspace, trailing; "
            "this checkpoint's named grids: heun-x, odd; did you mean 'odd'?",
        ),
        (("--grid", "karas"), "this checkpoint's named grids: heun-x, odd; did you mean 'karras'?"),
    ],
)
def test_bad_sample_by_name_gets_a_clear_error(run, named_checkpoint, args, message):
    out = _sample(run, named_checkpoint, *args)
    assert out.exit_code == 1 and message in out.output, out.output
    assert "Traceback" not in out.output


def test_unknown_grid_on_a_checkpoint_without_named_grids_says_none(run, tiny_checkpoint):
    out = _sample(run, tiny_checkpoint, "--grid", "unipc-8")
    assert out.exit_code == 1 and "unknown grid 'unipc-8'; known: " in out.output
    assert "this checkpoint's named grids: (none)" in out.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--name", "odd"), "--name odd: 'named.safetensors' already has a named grid 'odd' (sampler dpmpp_2m, 4 "),
        (("--name", "karras"), "grid name 'karras' is a registered grid kind"),
        (("--name", "two words"), "grid name 'two words' is not accepted; a name is 1-64 characters"),
        (("--name", "x" * 65), "is not accepted; a name is 1-64 characters"),
    ],
)
def test_optimize_steps_refuses_a_bad_or_taken_name_before_the_search(run, named_checkpoint, args, message):
    out = run(
        "optimize-steps", named_checkpoint.name, "--nfe", 4, *FAST, "--output", "",
        "--save-to-checkpoint", "out.safetensors", *args,
    )  # fmt: skip
    assert out.exit_code == 1 and message in out.output, out.output
    assert "reference:" not in out.output  # no search ran


def test_optimize_steps_replace_and_name_need_their_flags(run, named_checkpoint, tmp_path):
    out = run("optimize-steps", named_checkpoint.name, "--nfe", 4, *FAST, "--output", "", "--name", "mine")
    assert out.exit_code == 1 and "--name names the grid --save-to-checkpoint stores" in out.output
    out = run(
        "optimize-steps", named_checkpoint.name, "--sampler", "dpmpp_2m", "--nfe", 3, *FAST, "--output", "g.json",
        "--save-to-checkpoint", "out.safetensors", "--name", "odd", "--replace",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    grids = _stored_config(tmp_path / "out.safetensors")["sampling"]["grids"]
    assert sorted(grids) == ["heun-x", "odd"]
    assert grids["odd"]["grid"] == json.loads((tmp_path / "g.json").read_text())["grid"]
    assert grids["odd"]["steps"] == 3 and grids["heun-x"]["grid"]["times"] == [95.5, 50.0, 10.0]


def test_named_grids_round_trip_and_older_configs_are_unchanged(tiny_checkpoint):
    preset = {
        "sampler": {"name": "unipc", "order": 2},
        "grid": {"name": "explicit", "times": [999.0, 500.5, 20.0]},
        "steps": 3,
        "nfe": 3,
        "held_out_error": 0.25,
        "reference": {"sampler": "unipc", "levels": 200},
    }
    cfg = SamplingConfig.from_dict({"clip": False, "grids": {"unipc-3": preset, "b.2_x": {**preset, "nfe": None}}})
    assert cfg.to_dict()["grids"] == {"unipc-3": preset, "b.2_x": {k: v for k, v in preset.items() if k != "nfe"}}
    assert SamplingConfig.from_json(cfg.to_json()) == cfg
    assert SamplingConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.sample_options(grid="unipc-3") == {
        "sampler": "unipc",
        "order": 2,
        "steps": 3,
        "grid": {"name": "explicit", "times": [999.0, 500.5, 20.0]},
    }
    with pytest.raises(
        KeyError, match=re.escape("no named grid 'nope' in this checkpoint; its named grids: b.2_x, unipc-3")
    ):
        cfg.sample_options(grid="nope")
    # a list of times is the explicit grid; steps default to its length
    assert SamplingConfig(grids={"g": {"sampler": "ddim", "grid": [3.0, 1.0]}}).grids["g"].steps == 2
    # no named grid: nothing written, so the stored header of an older file reads and writes back the same
    assert "grids" not in SamplingConfig().to_dict()
    with safe_open(str(tiny_checkpoint), framework="pt") as f:
        header = f.metadata()["diffreg.config"]
    assert "grids" not in header
    assert CheckpointConfig.from_json(header).to_json() == header


def test_named_grids_run_the_default_config_through_the_python_api(named_checkpoint):
    model, diffusion, cfg = diffreg.load_checkpoint(named_checkpoint)
    stats: dict = {}
    y = {"y": torch.zeros(1, dtype=torch.long)}
    diffusion.sample(model, (1, 1, 8, 8), model_kwargs=y, stats=stats, **cfg.sampling.sample_options(grid="odd"))
    assert stats["timesteps"] == [99.0, 71.5, 40.25, 3.0] and stats["nfe"] == 4


@pytest.mark.parametrize(
    ("grids", "message"),
    [
        ({"trailing": {"sampler": "ddim", "grid": [3.0, 1.0]}}, "grid name 'trailing' is a registered grid kind"),
        ({"explicit": {"sampler": "ddim", "grid": [3.0, 1.0]}}, "grid name 'explicit' is a registered grid kind"),
        ({"-x": {"sampler": "ddim", "grid": [3.0, 1.0]}}, "grid name '-x' is not accepted"),
        ({"a:b": {"sampler": "ddim", "grid": [3.0, 1.0]}}, "grid name 'a:b' is not accepted"),
        ({"g": {"sampler": "ddim", "grid": [3.0, 4.0]}}, r"sampling.grids['g'].grid.times must be strictly decreasing"),
        ({"g": {"sampler": "ddim", "grid": []}}, "sampling.grids['g'].grid.times must be a non-empty list"),
        ({"g": {"sampler": "ddim", "grid": [3.0, float("nan")]}}, "must hold finite numbers, got nan"),
        ({"g": {"sampler": "ddim", "grid": [3.0, "1"]}}, "must hold finite numbers, got '1'"),
        ({"g": {"sampler": "ddim", "grid": "karras"}}, "sampling.grids['g'].grid must be {'name': 'explicit'"),
        ({"g": {"sampler": "ddim", "grid": [3.0, 1.0], "steps": 3}}, "steps is 3 but its grid has 2 levels"),
        ({"g": {"sampler": "ddim", "grid": [3.0, 1.0], "nfe": 0}}, "sampling.grids['g'].nfe must be a positive int"),
        ({"g": {"sampler": "ddim", "grid": [3.0, 1.0], "held_out_error": -1}}, "held_out_error must be a number >= 0"),
        ({"g": {"grid": [3.0, 1.0]}}, "sampling.grids['g'] is missing 'sampler'"),
        ({"g": {"sampler": "ddim", "grid": [3.0, 1.0], "times": 1}}, "sampling.grids['g'] has no field 'times'"),
        ({"g": [3.0, 1.0]}, "sampling.grids['g'] must be a table with sampler and grid, got list"),
        ([1], "sampling.grids must be a table name -> preset, got list"),
    ],
)
def test_bad_named_grids_are_refused_naming_the_field_and_value(grids, message):
    with pytest.raises(ConfigError) as info:
        SamplingConfig.from_dict({"grids": grids})
    assert message in str(info.value)


def test_an_explicit_grid_list_sets_its_own_steps(run, tiny_checkpoint, sampling_stats):
    result = _sample(run, tiny_checkpoint, "--grid", "[99, 60.5, 20, 3]")
    assert result.exit_code == 0, result.output
    assert sampling_stats[-1]["steps"] == 4 and sampling_stats[-1]["nfe"] == 4
    assert [float(t) for t in sampling_stats[-1]["timesteps"]] == [99.0, 60.5, 20.0, 3.0]
    result = _sample(run, tiny_checkpoint, "--grid", "[99, 60.5, 20, 3]", "--steps", 5)
    assert result.exit_code == 1 and "the explicit grid has 4 levels; steps=5 asked" in result.output


def test_options_without_sampler_go_to_the_checkpoints_sampler(run, tiny_checkpoint, tmp_path, sampling_stats):
    # the checkpoint records unipc; --option order=3 is unipc's option, not ddim's (which the
    # options were checked against before the checkpoint was read)
    model, _, cfg = diffreg.load_checkpoint(None)  # the bundled digits model: trained, so orders differ
    cfg = CheckpointConfig.from_dict({**cfg.to_dict(), "sampling": {**cfg.sampling.to_dict(), "sampler": "unipc"}})
    path = tmp_path / "unipc.safetensors"
    diffreg.save_checkpoint(path, model, cfg)
    outputs = {}
    for label, args in (
        ("recorded, order 3", ("--option", "order=3")),
        ("explicit, order 3", ("--sampler", "unipc", "--option", "order=3")),
        ("recorded, order 2", ()),
    ):
        result = _sample(run, path, "--steps", 6, "--seed", 0, *args)
        assert result.exit_code == 0, result.output
        assert "with unipc" in result.output
        outputs[label] = np.load(tmp_path / "s.npz")["arr_0"]
    np.testing.assert_array_equal(outputs["recorded, order 3"], outputs["explicit, order 3"])
    assert not np.array_equal(outputs["recorded, order 3"], outputs["recorded, order 2"])
    # no recorded sampler: ddim's options are the measure, and the error says what it accepts
    result = _sample(run, tiny_checkpoint, "--option", "order=3")
    assert result.exit_code == 1
    assert "sampler 'ddim' has no option 'order'; accepted: eta, use_clipped_model_output" in result.output


def test_saving_keeps_the_weights_dtype_and_the_summary_names_the_default_grid(run, tmp_path):
    from safetensors import safe_open

    from diffreg.checkpoint import bundled_checkpoint_path

    out = tmp_path / "fast.safetensors"
    result = run("optimize-steps", "--nfe", 4, *FAST, "--output", "", "--save-to-checkpoint", out)
    assert result.exit_code == 0, result.output
    with safe_open(str(bundled_checkpoint_path()), framework="pt") as f:
        bundled = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    with safe_open(str(out), framework="pt") as f:
        saved = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert saved == bundled and set(bundled.values()) == {"F16"}  # not doubled to F32
    assert out.stat().st_size < 1.05 * bundled_checkpoint_path().stat().st_size
    result = _sample(run, out)  # the default grid is also the named grid dpmpp_2m-4
    assert result.exit_code == 0 and "grid dpmpp_2m-4 (explicit, 4 levels)" in result.output


def test_a_grid_no_better_than_a_baseline_on_held_out_draws_gets_a_note(run, monkeypatch):
    import diffreg.optimize

    real = diffreg.optimize.optimize_steps

    def worse(*args, **kwargs):
        result = real(*args, **kwargs)
        result.held_out["optimized"] = 2 * max(v for k, v in result.held_out.items() if k != "optimized")
        return result

    monkeypatch.setattr(diffreg.optimize, "optimize_steps", worse)
    result = run("optimize-steps", "--nfe", 4, *FAST, "--output", "")
    assert result.exit_code == 0
    assert "note: on the held-out draws the optimized grid" in result.output
    assert "more --draws or --max-evals usually help" in result.output
