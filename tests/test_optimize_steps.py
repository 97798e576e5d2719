"""Step schedules optimized per model and NFE (diffreg/optimize.py, `diffreg optimize-steps`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffreg
from diffreg.config import SamplingConfig
from diffreg.errors import ConfigError
from diffreg.optimize import optimize_steps
from diffreg.testing import GaussianMixture, exact_ode_solution

pytest.importorskip("diffreg_solvers")



def _rms_to_exact(diffusion, model, mixture, times, x_T):
    """RMS distance (per element) to the exact probability-flow ODE solution (scipy DOP853)."""
    exact = exact_ode_solution(mixture, diffusion, x_T, diffusion.num_timesteps - 1)
    x = diffusion.sample(
        model,
        x_T.shape,
        sampler="dpmpp_2m",
        grid=list(times),
        steps=len(times),
        noise=x_T,
        clip_denoised=False,
        dtype=torch.float64,
    )
    return float(((x - exact) ** 2).mean().sqrt())


def test_optimized_grid_beats_the_default_and_log_snr_grids_on_fresh_draws():
    mixture = GaussianMixture.example(dim=2)
    diffusion = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    model = mixture.denoiser(diffusion, "eps")
    result = optimize_steps(
        diffusion,
        model,
        (2,),
        sampler="dpmpp_2m",
        nfe=5,
        draws=64,
        seed=0,
        max_evals=24,
        dtype=torch.float64,
        clip_denoised=False,
    )
    assert result.steps == 5 and result.nfe == 5 and len(result.times) == 5
    assert result.times[0] == 999.0 and np.all(np.diff(result.times) < 0)
    # the module's own held-out figures (distance to its many-step reference) ...
    assert result.held_out["optimized"] < 0.5 * result.held_out["trailing"]
    # ... and, independently, the distance to the exact ODE solution on draws neither half saw
    x_T = torch.randn(128, 2, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    optimized = _rms_to_exact(diffusion, model, mixture, result.times, x_T)
    for grid in ("trailing", "karras", "exponential"):
        baseline = _rms_to_exact(diffusion, model, mixture, diffusion.grid_times(5, grid), x_T)
        assert optimized < 0.7 * baseline, (grid, optimized, baseline)


def test_optimize_steps_saves_a_grid_that_sample_uses_by_default(run, tiny_checkpoint, tmp_path):
    result = run(
        "optimize-steps",
        tiny_checkpoint,
        "--sampler",
        "dpmpp_2m",
        "--nfe",
        3,
        "--draws",
        8,
        "--max-evals",
        4,
        "--reference-steps",
        12,
        "--output",
        "g.json",
        "--save-to-checkpoint",
        "opt.safetensors",
        "--threads",
        1,
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "g.json").read_text())
    times = saved["grid"]["times"]
    assert saved["grid"]["name"] == "explicit" and len(times) == 3 and times[0] == 99.0
    assert set(saved["held_out_error"]) == {"optimized", "trailing", "karras", "exponential"}
    # the checkpoint round-trips the grid, the sampler and the steps
    _, diffusion, cfg = diffreg.load_checkpoint(tmp_path / "opt.safetensors")
    assert cfg.sampling.grid.name == "explicit" and cfg.sampling.grid.options["times"] == times
    assert cfg.sampling.sampler.name == "dpmpp_2m" and cfg.sampling.steps == 3
    # `diffreg sample` uses them when no --sampler, --steps or --grid is given ...
    result = run("sample", "opt.safetensors", "--num-samples", 4, "--output", "", "--npz", "a.npz", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "4 samples with dpmpp_2m (3 steps, 3 NFE, grid " in result.output and "explicit" in result.output
    # ... and they are the samples of that sampler on those times, given explicitly
    result = run(
        "sample",
        tiny_checkpoint,
        "--sampler",
        "dpmpp_2m",
        "--steps",
        3,
        "--grid",
        json.dumps(times),
        "--num-samples",
        4,
        "--output",
        "",
        "--npz",
        "b.npz",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    # a different --steps falls back to the default grid, saying so
    result = run(
        "sample", "opt.safetensors", "--steps", 4, "--num-samples", 2, "--output", "", "--npz", "c.npz", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert "differs from the 3 levels of the checkpoint's grid" in result.output
    assert "(4 steps, 4 NFE, grid trailing" in result.output
    # the Python spelling of the same defaults
    assert cfg.sampling.sample_options() == {"sampler": "dpmpp_2m", "steps": 3, "grid": saved["grid"]}
    x = diffusion.grid_times(3, cfg.sampling.sample_options()["grid"])
    np.testing.assert_allclose(x, times)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--sampler", "dpm_solver_3s", "--nfe", 3), "nfe 3 is below the minimum for sampler 'dpm_solver_3s'"),
        (("--sampler", "dpmpp_2m", "--nfe", 1), "nfe 1 is below the minimum for sampler 'dpmpp_2m': 2 (two steps"),
        (("--sampler", "ddpm", "--nfe", 5), "sampler 'ddpm' is stochastic"),
        (("--sampler", "euler_ancestral", "--nfe", 5), "(or give eta=0 to make it deterministic)"),
        (("--sampler", "adaptive", "--nfe", 5), "chooses its own step sizes by error control"),
        (("--sampler", "dpmpp_2m", "--nfe", 5, "--draws", 7), "--draws 7: give an even number"),
    ],
)
def test_bad_optimize_steps_input_gets_a_clear_error(run, tiny_checkpoint, args, message):
    fast = ("--max-evals", 1, "--reference-steps", 4, "--output", "")
    result = run("optimize-steps", tiny_checkpoint, *fast, *(args if "--draws" in args else (*args, "--draws", 4)))
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_optimize_steps_refuses_a_file_that_is_not_a_checkpoint(run, tmp_path):
    (tmp_path / "notes.safetensors").write_text("not a checkpoint")
    result = run("optimize-steps", tmp_path / "notes.safetensors", "--nfe", 5)
    assert result.exit_code == 1 and "is not a readable safetensors file" in result.output


def test_optimize_steps_refuses_a_process_without_a_finite_log_snr_range(monkeypatch):
    from diffreg.optimize import check_process

    with pytest.raises(ValueError, match="no noise-level process"):
        check_process(object())
    process = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000}).process
    monkeypatch.setattr(process, "log_snr_range", lambda: (-np.inf, np.inf))
    with pytest.raises(ValueError, match="no finite log-SNR range"):
        check_process(process)


def test_sampling_config_grid_round_trips_and_checks_steps():
    cfg = SamplingConfig.from_dict({"grid": [999.0, 500.5, 20.0], "sampler": "unipc", "clip": False})
    assert cfg.to_dict() == {
        "clip": False,
        "dynamic_threshold": None,
        "grid": {"name": "explicit", "times": [999.0, 500.5, 20.0]},
        "sampler": "unipc",
    }
    assert SamplingConfig.from_json(cfg.to_json()) == cfg
    assert cfg.sample_options() == {
        "sampler": "unipc",
        "steps": 3,
        "grid": {"name": "explicit", "times": [999.0, 500.5, 20.0]},
    }
    assert SamplingConfig().to_dict() == {"clip": True, "dynamic_threshold": None}  # older files unchanged
    with pytest.raises(ConfigError, match=r"sampling\.steps is 4 but the explicit sampling\.grid has 3 levels"):
        SamplingConfig(grid=[999.0, 500.5, 20.0], steps=4)
    with pytest.raises(ConfigError, match=r"sampling\.steps must be an int"):
        SamplingConfig(steps=0)


def test_family_levels_span_the_range_strictly_increasing_and_contain_the_exponential_grid():
    from diffreg.optimize import family_levels

    process = diffreg.Diffusion.from_config({"schedule": "cosine", "num_timesteps": 1000}).process
    lo, hi = process.log_snr_range()
    for steps in (2, 3, 10, 50):
        # (a, b, log p) = (second level of the exponential grid, hi, 0) is the exponential grid:
        # log-SNR uniform from lo to hi (computed here from its definition, not from the grid kind)
        a = lo + (hi - lo) / (steps - 1)
        np.testing.assert_allclose(family_levels(lo, hi, steps, (a, hi, 0.0)), np.linspace(lo, hi, steps), atol=1e-12)
        for params in ((lo, lo, 3.0), (hi, hi, -3.0), (0.0, hi, 1.5), (hi - 1e-9, lo, 0.0)):
            lam = family_levels(lo, hi, steps, params)
            assert lam[0] == lo and lam[-1] <= hi and np.all(np.diff(lam) >= 1e-3 - 1e-12), (steps, params)


def test_optimized_grid_moves_levels_as_a_whole_out_of_the_pure_noise_end():
    # cosine schedule, v: the exponential grid spends its first ~7 of 12 levels at log-SNR < -4, where
    # every sample is still noise; the one-level-at-a-time refinement alone stayed in that local
    # minimum (levels never pass each other). Measured against the exact ODE on unseen draws.
    mixture = GaussianMixture.example(dim=2)
    diffusion = diffreg.Diffusion.from_config({"schedule": "cosine", "num_timesteps": 1000, "parameterization": "v"})
    model = mixture.denoiser(diffusion, "v")
    result = optimize_steps(
        diffusion, model, (2,), sampler="dpmpp_2m", nfe=12, draws=128, seed=0, max_evals=96,
        dtype=torch.float64, clip_denoised=False,
    )  # fmt: skip
    lam = np.log(diffusion.process.alpha_sigma(np.asarray(result.times))[0]) - np.log(
        diffusion.process.alpha_sigma(np.asarray(result.times))[1]
    )
    assert (lam[1:] < -4).sum() == 0, lam  # no free level left in the pure-noise end
    x_T = torch.randn(128, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    optimized = _rms_to_exact(diffusion, model, mixture, result.times, x_T)
    exponential = _rms_to_exact(diffusion, model, mixture, diffusion.grid_times(12, "exponential"), x_T)
    # 14x measured (the level-at-a-time refinement alone: 4x, with a level left below -4)
    assert optimized < exponential / 10, (optimized, exponential)


def test_the_default_reference_is_far_closer_to_the_exact_solution_than_the_grids_it_judges():
    from diffreg.optimize import default_reference

    name, levels, options = default_reference()
    assert (name, levels, options) == ("unipc", 200, {"order": 3, "final_order": 2})
    mixture = GaussianMixture.example(dim=2)
    diffusion = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    model = mixture.denoiser(diffusion, "eps")
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = exact_ode_solution(mixture, diffusion, x_T, 999)

    def rms(**sampler_options):
        x = diffusion.sample(
            model, x_T.shape, sampler="unipc", grid="exponential", steps=levels, noise=x_T,
            clip_denoised=False, dtype=torch.float64, **sampler_options,
        )  # fmt: skip
        return float(((x - exact) ** 2).mean().sqrt())

    # the first-order jump to the data leaves a floor (~2.5e-4 per element here) ...
    assert rms(order=3) > 1e-4
    # ... which the second-order last step removes
    assert rms(**options) < 1e-5


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        *[
            (bad, r"reference must be \(sampler name, levels in 2\.\.10,000\[, options dict\]\), got")
            for bad in [("unipc",), ("unipc", 1), ("unipc", True), (3, 100), ("unipc", 100, "order=3"), ("unipc", 10_001)]
        ],
        # a random or self-stepping reference has no fixed solution to fit a grid to
        (("ddpm", 20), r"the reference sampler must be deterministic and follow its grid: sampler 'ddpm' is stochastic"),
        (("ddim", 20, {"eta": 1.0}), r"the reference sampler must be .*'ddim' is stochastic"),
        (("adaptive", 20), r"the reference sampler must be .*'adaptive' chooses its own step sizes"),
    ],
)
def test_a_bad_reference_is_refused_naming_it(reference, message):
    mixture = GaussianMixture.example(dim=2)
    diffusion = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    with pytest.raises(ValueError, match=message):
        optimize_steps(
            diffusion, mixture.denoiser(diffusion, "eps"), (2,), nfe=4, draws=4, reference=reference,
            clip_denoised=False,
        )  # fmt: skip


def test_a_bundled_checkpoint_by_name_can_be_optimized_and_saved_but_not_overwritten(run, tmp_path):
    from diffreg.checkpoint import bundled_checkpoint_path

    fast = ("--nfe", 3, "--draws", 4, "--max-evals", 1, "--reference-steps", 4, "--output", "", "--threads", 1)
    result = run("optimize-steps", "flow-digits", *fast, "--save-to-checkpoint", tmp_path / "fd.safetensors")
    assert result.exit_code == 0, result.output
    _, saved, cfg = diffreg.load_checkpoint(tmp_path / "fd.safetensors")
    assert not saved.process.discrete  # the rectified-flow model, now with its grid
    assert cfg.sampling.grid.name == "explicit" and len(cfg.sampling.grid.options["times"]) == 3
    asset = bundled_checkpoint_path("flow-digits")
    before = asset.read_bytes()
    result = run("optimize-steps", "flow-digits", *fast, "--save-to-checkpoint", asset)
    assert result.exit_code == 1 and "is the same file as the checkpoint" in result.output
    assert asset.read_bytes() == before


def test_steps_for_nfe_stops_at_what_the_default_grid_has():
    # rectified flow is continuous, but its trailing grid has at most 1000 levels: an NFE beyond
    # that runs 1000 steps (it failed with "steps must be in [1, 1000], got 1001")
    from diffreg.optimize import steps_for_nfe

    _, diffusion, cfg = diffreg.load_checkpoint("flow-digits")
    zero = lambda x, t, **kwargs: torch.zeros_like(x)  # noqa: E731
    sampler = diffreg.registry.create("sampler", "dpmpp_2m")
    for nfe in (1000, 1001, 10**6):
        assert steps_for_nfe(diffusion, zero, sampler, nfe, cfg.sample_shape, {}, {}) == 1000


def test_out_of_memory_in_optimize_steps_names_its_own_flags(run, monkeypatch):
    import diffreg.optimize

    def exhausted(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(diffreg.optimize, "optimize_steps", exhausted)
    result = run("optimize-steps", "--nfe", 5, "--draws", 4, "--output", "")
    assert result.exit_code == 1
    assert "out of memory (simulated); lower --draws or --reference-steps" in result.output
    assert "--batch-size" not in result.output


def test_max_evals_counts_the_searchs_calls_after_the_baselines():
    mixture = GaussianMixture.example(dim=2)
    diffusion = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    for max_evals in (1, 10, 40):
        result = optimize_steps(
            diffusion, mixture.denoiser(diffusion, "eps"), (2,), sampler="dpmpp_2m", nfe=6, draws=8,
            max_evals=max_evals, reference=("unipc", 20), dtype=torch.float64, clip_denoised=False,
        )  # fmt: skip
        baselines = len(result.fit_baselines)  # trailing, karras, exponential
        assert baselines == 3 and baselines < result.evaluations <= baselines + max_evals, (max_evals, result.evaluations)


def test_family_levels_refuse_what_they_cannot_place():
    from diffreg.optimize import family_levels

    for args, message in (
        ((-5, 5, 1, (0, 5, 0)), "steps must be an int >= 2"),
        ((-5, 5, 3, (0, 5)), r"params must be three numbers \(a, b, log p\)"),
        ((-5, 5, 3, (float("nan"), 5, 0)), "params must be finite"),
        ((5, -5, 3, (0, 5, 0)), "must be finite with lo < hi"),
        ((-5, -4.999, 20, (0, 5, 0)), r"20 levels do not fit 0.001 apart in the log-SNR range \[-5, -4.999\]"),
    ):
        with pytest.raises(ValueError, match=message):
            family_levels(*args)
    lam = family_levels(-5, 5, 20, (9, -9, 2))  # parameters beyond the range: still a grid
    assert lam[0] == -5 and lam[-1] <= 5 and np.all(np.diff(lam) > 0)


def test_optimize_steps_takes_numpy_ints_and_bounds_the_seed():
    mixture = GaussianMixture.example(dim=2)
    diffusion = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    model = mixture.denoiser(diffusion, "eps")
    common = {"sampler": "dpmpp_2m", "draws": 4, "dtype": torch.float64, "clip_denoised": False}
    result = optimize_steps(
        diffusion, model, (2,), nfe=np.int64(4), max_evals=np.int64(2), reference=("unipc", np.int64(10)), **common
    )
    assert result.steps == 4
    with pytest.raises(ValueError, match=r"seed must be below 2\*\*63 \(a torch generator's seed\), got 18446744073709551616"):
        optimize_steps(diffusion, model, (2,), nfe=4, seed=2**64, **common)
