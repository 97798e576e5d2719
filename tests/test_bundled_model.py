"""The bundled digits model draws recognisable digits of the requested class.

An independent classifier (an SVM trained on scikit-learn's digits, which the model never saw
as labels at sampling time) must read most samples as the requested digit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffreg
from diffreg.sampling import per_sample_generators


@pytest.fixture(scope="module")
def digit_classifier():
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001).fit(digits.data, digits.target)


def test_bundled_model_samples_are_read_as_the_requested_digit(digit_classifier):
    model, diffusion, cfg = diffreg.load_checkpoint()
    n = 100
    labels = torch.arange(n) % 10
    x = diffusion.sample(
        model,
        (n, 1, 8, 8),
        sampler="ddim",
        steps=50,
        generator=per_sample_generators(0, n),
        model_kwargs={"y": labels},
        guidance_scale=cfg.data.get("guidance_scale", 1.0),
    )
    pixels = ((x.clamp(-1, 1) + 1) / 2 * 16).reshape(n, 64).numpy()  # back to sklearn's 0..16 scale
    accuracy = float(np.mean(digit_classifier.predict(pixels) == labels.numpy()))
    assert accuracy >= 0.9



@pytest.mark.parametrize(("sampler", "steps"), [("euler", 50), ("heun", 10)])
def test_bundled_flow_model_samples_are_read_as_the_requested_digit(digit_classifier, sampler, steps):
    model, diffusion, cfg = diffreg.load_checkpoint("flow-digits")
    assert diffusion.process.name == "rectified_flow" and diffusion.parameterization.mean_type.name == "flow"
    n = 100
    labels = torch.arange(n) % 10
    x = diffusion.sample(
        model,
        (n, 1, 8, 8),
        sampler=sampler,
        steps=steps,
        generator=per_sample_generators(0, n),
        model_kwargs={"y": labels},
        guidance_scale=cfg.data.get("guidance_scale", 1.0),
    )
    pixels = ((x.clamp(-1, 1) + 1) / 2 * 16).reshape(n, 64).numpy()
    accuracy = float(np.mean(digit_classifier.predict(pixels) == labels.numpy()))
    assert accuracy >= 0.9
