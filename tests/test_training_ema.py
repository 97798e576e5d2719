"""Post-hoc EMA (Karras et al. 2024, EDM2): power-function averages, snapshots, reconstruction of
an EMA of another length, and ``diffreg ema``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from diffreg.ema import PowerEMA, reconstruct, sigma_rel_to_gamma, write_snapshot

T = 400  # training steps of the synthetic runs


class OneHot(torch.nn.Module):
    """A 'model' whose weights at step tau are the unit vector e_tau: any average of its weights
    over the run is the averaging profile itself (weight of each step)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(T + 1, dtype=torch.float64))

    def at(self, tau):
        with torch.no_grad():
            self.w.zero_()
            self.w[tau] = 1.0
        return self


def _direct_power_ema(gamma, steps=T):
    """The power-function EMA tracked step by step, as EDM2's eq. (3) defines it (written out here,
    independently of diffreg.ema): beta_t = (1 - 1/t)^(gamma + 1)."""
    ema = np.zeros(T + 1)
    for t in range(1, steps + 1):
        beta = (1 - 1 / t) ** (gamma + 1)
        ema *= beta
        ema[t] += 1 - beta
    return ema


def _relative_std(profile, t):
    tau = np.arange(len(profile))
    mean = (profile * tau).sum()
    return np.sqrt((profile * tau**2).sum() - mean**2) / t


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_gamma_gives_a_profile_of_the_asked_relative_width(sigma_rel):
    profile = _direct_power_ema(sigma_rel_to_gamma(sigma_rel))
    assert profile.sum() == pytest.approx(1.0)
    assert _relative_std(profile, T) == pytest.approx(sigma_rel, rel=0.02)  # discrete steps vs the integral


def test_gamma_closed_form_examples_and_refusals():
    # sigma_rel(gamma) = sqrt((g + 1) / ((g + 2)^2 (g + 3))): gamma 6.94 (EDM2's sigma_rel 0.10 ~ gamma 6.94)
    for gamma in (1.0, 6.94, 16.97):
        sigma = np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))
        assert sigma_rel_to_gamma(float(sigma)) == pytest.approx(gamma, rel=1e-9)
    for bad in (0.0, 0.3, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="sigma_rel must be"):
            sigma_rel_to_gamma(bad)


def _snapshots(tmp_path, every=20):
    model = OneHot()
    phema = PowerEMA(model, (0.05, 0.10))
    for t in range(1, T + 1):
        phema.update(model.at(t), t)
        if t % every == 0:
            write_snapshot(tmp_path / "snaps", phema, t)
    return phema


def test_reconstruction_matches_a_directly_tracked_power_ema_of_another_length(tmp_path):
    phema = _snapshots(tmp_path)
    for sigma_rel in (0.05, 0.10):  # the tracked lengths themselves: exactly the last snapshot
        state, _ = reconstruct(tmp_path / "snaps", sigma_rel)
        own = phema.models[(0.05, 0.10).index(sigma_rel)].w.detach().numpy()
        np.testing.assert_allclose(state["w"].numpy(), own, atol=1e-7)
    direct_05, direct_10 = _direct_power_ema(sigma_rel_to_gamma(0.05)), _direct_power_ema(sigma_rel_to_gamma(0.10))
    scale = np.linalg.norm(direct_10 - direct_05)  # how much the profile changes between the two tracked lengths
    for sigma_rel in (0.065, 0.075, 0.15):  # between them, and beyond (EDM2 Fig. 4 reconstructs 0.15+)
        state, info = reconstruct(tmp_path / "snaps", sigma_rel)
        direct = _direct_power_ema(sigma_rel_to_gamma(sigma_rel))
        error = np.linalg.norm(state["w"].numpy() - direct)
        # least squares over 20 snapshots x 2 lengths (EDM2 sec. 3.2) leaves a residual; measured
        # 0.2-0.6 % of the profile's norm and < 1 % of the gap between the two tracked profiles
        # (discrete steps vs the continuous profiles the solve assumes); 4x margin
        assert error < 0.05 * scale and error < 0.02 * np.linalg.norm(direct), (sigma_rel, error, scale)
        assert info["snapshots"] == T // 20 and info["step"] == T
    state, info = reconstruct(tmp_path / "snaps", 0.075, step=200)  # an earlier time: snapshots up to it
    direct = _direct_power_ema(sigma_rel_to_gamma(0.075), steps=200)
    assert np.linalg.norm(state["w"].numpy() - direct) < 0.02 * np.linalg.norm(direct) and info["snapshots"] == 10


def test_missing_snapshots_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no post-hoc EMA snapshots"):
        reconstruct(tmp_path / "none", 0.05)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no post-hoc EMA snapshots"):
        reconstruct(tmp_path / "empty", 0.05)


def test_training_keeps_snapshots_and_diffreg_ema_reconstructs_them(tmp_path, monkeypatch):
    import diffreg
    from diffreg.cli import main
    from diffreg.training import TrainConfig, train

    cfg = TrainConfig.from_dict(
        {
            "steps": 6,
            "batch_size": 8,
            "posthoc_ema_every": 2,
            "posthoc_ema_sigma_rels": [0.05, 0.2],
            "data": {"name": "moons", "n": 64},
            "diffusion": {"num_timesteps": 20, "schedule": "cosine"},
            "model": {"name": "mlp", "hidden": 16, "depth": 1},
        }
    )
    train(cfg, tmp_path / "m.safetensors", progress=False)
    snaps = sorted(p.name for p in (tmp_path / "m.phema").iterdir())
    assert snaps == [f"step-{s:09d}.safetensors" for s in (2, 4, 6)]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["ema", "m.safetensors", "--sigma-rel", "0.2", "--output", "e.safetensors"])
    assert result.exit_code == 0 and "from 3 snapshot(s)" in result.output, result.output
    last = load_file(str(tmp_path / "m.phema" / snaps[-1]))
    model, _, config = diffreg.load_checkpoint(tmp_path / "e.safetensors")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, last[f"1/{name}"], atol=1e-6, rtol=1e-6)  # sigma_rel 0.2 is tracked
    assert config.data["dataset"] == "moons"

    # resume keeps the averages exactly
    train(TrainConfig.from_dict({**cfg.to_dict(), "steps": 3}), tmp_path / "r.safetensors", progress=False)
    train(cfg, tmp_path / "r.safetensors", progress=False, resume=True)
    a, b = load_file(str(tmp_path / "m.phema" / snaps[-1])), load_file(str(tmp_path / "r.phema" / snaps[-1]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    result = CliRunner().invoke(main, ["ema", "m.safetensors", "--sigma-rel", "0.5", "--output", "x.safetensors"])
    assert result.exit_code != 0 and "sigma_rel must be a number in (0, 0.2887)" in result.output
