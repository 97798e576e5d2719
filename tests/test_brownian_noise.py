"""Brownian-tree noise (issue 18): with a fixed seed a stochastic sampler gives the same sample at 20
or 40 steps up to the discretisation error, independently of the batch it is drawn in."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffreg
from diffreg.sampling.noise import BrownianTree, per_sample_generators
from diffreg.testing import GaussianMixture


def test_tree_is_brownian_motion_and_consistent():
    """Same value for the same time in any query order; increments over disjoint intervals are
    independent N(0, dt) (checked on 4000 paths: variance within 4 standard errors, correlation
    below 0.1); the increment over [a, c] is the sum of those over [a, b] and [b, c]."""
    tree = BrownianTree(list(range(4000)), (), 0.0, 1.0)
    w3, w1, w7 = tree.value(0.3), tree.value(0.1), tree.value(0.7)
    assert torch.equal(BrownianTree(list(range(4000)), (), 0.0, 1.0).value(0.7), w7)
    assert torch.equal(tree.value(0.3), w3)
    for (a, wa), (b, wb) in (((0.0, 0.0), (0.1, w1)), ((0.1, w1), (0.3, w3)), ((0.3, w3), (0.7, w7))):
        var = float(((wb - wa) ** 2).mean())
        assert abs(var - (b - a)) < 4 * (b - a) * math.sqrt(2 / 4000)
    corr = np.corrcoef((w3 - w1).numpy(), (w7 - w3).numpy())[0, 1]
    assert abs(corr) < 0.1
    z = tree.increment(0.1, 0.7)
    assert torch.allclose(z * math.sqrt(0.6), (w7 - w1).float(), atol=1e-6)


def _sample(d, n, steps, sampler, start=0, noise_type="brownian", **options):
    mixture = GaussianMixture.example(2)
    gens = per_sample_generators(7, n, start=start)
    x_T = torch.stack([torch.randn(2, generator=g, dtype=torch.float64) for g in gens])
    return d.sample(
        mixture.denoiser(d), (n, 2), sampler=sampler, steps=steps, noise=x_T, generator=gens,
        dtype=torch.float64, clip_denoised=False, noise_type=noise_type, **options,
    )


@pytest.mark.parametrize("sampler, options", [("ddpm", {}), ("dpmpp_2m_sde", {}), ("euler_ancestral", {})])
def test_same_sample_at_20_and_40_steps(sampler, options):
    """The RMS difference between 20 and 40 steps is a small fraction of the one with independent
    noise (~ the distribution's spread), and shrinks with the steps (40 vs 80 below 20 vs 40)."""
    pytest.importorskip("diffreg_solvers")
    d = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000, "parameterization": "eps"})
    runs = {s: _sample(d, 64, s, sampler, **options) for s in (20, 40, 80)}
    independent = _sample(d, 64, 40, sampler, noise_type="gaussian", **options)
    rms = lambda a, b: float(((a - b) ** 2).mean().sqrt())  # noqa: E731
    assert rms(runs[20], runs[40]) < 0.25 * rms(runs[20], independent)
    assert rms(runs[40], runs[80]) < rms(runs[20], runs[40])


def test_independent_of_batch_size():
    pytest.importorskip("diffreg_solvers")
    d = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000, "parameterization": "eps"})
    batch = _sample(d, 6, 10, "dpmpp_2m_sde")
    alone = _sample(d, 1, 10, "dpmpp_2m_sde", start=4)
    assert torch.allclose(batch[4:5], alone, atol=1e-12)


def test_unknown_noise_type_is_named():
    d = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 100})
    with pytest.raises(ValueError, match="unknown noise_type 'pink'; accepted: gaussian, brownian"):
        d.sample(lambda x, t: torch.zeros_like(x), (2, 2), steps=3, noise_type="pink")
