"""final_level="t_min": the last step goes to the process's least noisy level (diffusers'
``set_alpha_to_one=False``), for every sampler and grid. Parity with diffusers' DDIM is in
tests/test_pretrained_diffusers.py; here: the exact ODE state at t_min (closed-form denoiser of a
Gaussian mixture, scipy's DOP853 reference), step counts, errors and the recorded default."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import diffreg
from diffreg import registry
from diffreg.checkpoint_config import SamplingConfig
from diffreg.errors import ConfigError
from diffreg.testing import ExactDenoiser, GaussianMixture
from diffreg.testing.ode import exact_ode_solution

T = 1000
MIXTURE = GaussianMixture([0.5, 0.5], [[-0.6], [0.7]], [0.2, 0.3])


def _diffusion():
    betas = np.linspace(0.01, 0.02, T).tolist()  # sigma at t = 0 is 0.1: t_min and the data differ
    return diffreg.Diffusion.from_config({"schedule": {"name": "explicit", "betas": betas}, "num_timesteps": T})


def _x_start():
    return torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("sampler", ["adaptive", "dpm_solver_3s"])
def test_accurate_solvers_end_at_the_exact_ode_state_at_t_min(sampler):
    if sampler not in registry.names("sampler"):
        pytest.skip(f"{sampler} is not registered (diffreg-solvers not installed)")
    d = _diffusion()
    model = ExactDenoiser(MIXTURE, d)
    times = np.linspace(200, 0, 40).tolist()  # ends at t_min itself: 39 steps
    at_t_min = exact_ode_solution(MIXTURE, d, _x_start(), 200, t_end=0)
    at_data = exact_ode_solution(MIXTURE, d, _x_start(), 200)
    assert (at_t_min - at_data).abs().max() > 0.05
    stats = {}
    x = d.sample(
        model, (64, 1), sampler=sampler, grid=times, noise=_x_start(), dtype=torch.float64, clip_denoised=False,
        final_level="t_min", stats=stats,
    )
    assert (x - at_t_min).abs().max() < 0.012
    assert stats["steps"] == 39


@pytest.mark.parametrize("grid,steps_run", [("trailing", 10), ("leading", 9)])
def test_every_sampler_ends_at_t_min_on_any_grid(grid, steps_run):
    # trailing ends at t = 99: one more step to t_min = 0; leading ends at t = 0 = t_min: that level
    # is the final one (no zero-length step)
    d = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    model = ExactDenoiser(MIXTURE, d)
    for name in registry.names("sampler"):
        stats = {}
        x = d.sample(
            model, (8, 1), sampler=name, steps=10, grid=grid, noise=_x_start()[:8].float(), final_level="t_min",
            generator=torch.Generator().manual_seed(1), clip_denoised=False, stats=stats,
        )
        assert torch.isfinite(x).all() and stats["steps"] == steps_run, name


def test_ddim_last_step_goes_to_alpha_bar_0_by_hand():
    # one DDIM step from t = 500 to t_min: x' = sqrt(abar_0) x0 + sqrt(1 - abar_0) eps (Song et al., eq. 12)
    d = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000})
    abar = d.alphas_cumprod
    x = _x_start()
    model = lambda x, t, **k: 0.5 * x  # noqa: E731  (an eps model)
    got = d.sample(model, (64, 1), sampler="ddim", grid=[500], noise=x, dtype=torch.float64, clip_denoised=False,
                   final_level="t_min")
    eps = 0.5 * x
    x0 = (x - np.sqrt(1 - abar[500]) * eps) / np.sqrt(abar[500])
    expected = np.sqrt(abar[0]) * x0 + np.sqrt(1 - abar[0]) * eps
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_bad_final_level_values_are_named():
    d = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 100})
    model = lambda x, t, **k: x  # noqa: E731
    with pytest.raises(ValueError, match=r"final_level must be one of 'data', 't_min', got 'tmin'"):
        d.sample(model, (2, 1), steps=5, final_level="tmin")
    with pytest.raises(ValueError, match="leaves no step"):
        d.sample(model, (2, 1), grid=[0], final_level="t_min")
    with pytest.raises(ConfigError, match="sampling.final_level"):
        SamplingConfig(final_level="zero")


def test_sampling_config_records_t_min_only_when_set():
    assert "final_level" not in SamplingConfig().to_dict()
    assert "final_level" not in SamplingConfig().driver_options()
    cfg = SamplingConfig.from_dict({"final_level": "t_min"})
    assert cfg.to_dict()["final_level"] == "t_min" and cfg.driver_options()["final_level"] == "t_min"
    assert SamplingConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_final_level_flag_changes_the_samples(tmp_path):
    from click.testing import CliRunner

    from diffreg.cli import main

    arrays = {}
    for level in ("data", "t_min"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = CliRunner().invoke(
                main,
                ["sample", "--steps", "4", "--num-samples", "2", "--no-progress", "--final-level", level,
                 "--npz", str(tmp_path / f"{level}.npz"), "--output", str(tmp_path / f"{level}.png")],
            )
        assert result.exit_code == 0, result.output
        arrays[level] = np.load(tmp_path / f"{level}.npz")["arr_0"]
    assert "ending at t_min" in result.output
    assert not np.array_equal(arrays["data"], arrays["t_min"])
