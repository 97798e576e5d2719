"""Measure the bundled digits model: an independent classifier's accuracy on its samples.

An RBF SVM trained on scikit-learn's digits reads each sample; the score is the fraction read as
the requested class. Prints a markdown table over guidance scales and samplers, and the time of
500 digits with DDIM at 50 steps.

    python scripts/evaluate_bundled.py [CHECKPOINT] [--num-samples 500]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.svm import SVC

import diffreg
from diffreg.sampling import per_sample_generators


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", nargs="?", default=None)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--scales", default="1,1.5,2,3")
    parser.add_argument("--samplers", default="ddim,ddpm")
    args = parser.parse_args()
    digits = load_digits()
    classifier = SVC(gamma=0.001).fit(digits.data, digits.target)
    model, diffusion, _ = diffreg.load_checkpoint(args.checkpoint)
    n = args.num_samples
    labels = torch.arange(n) % 10
    print("| sampler | steps | guidance scale | accuracy | seconds |")
    print("|---|---|---|---|---|")
    for sampler in args.samplers.split(","):
        for scale in (float(s) for s in args.scales.split(",")):
            start = time.perf_counter()
            x = diffusion.sample(
                model,
                (n, 1, 8, 8),
                sampler=sampler,
                steps=50,
                generator=per_sample_generators(0, n),
                model_kwargs={"y": labels},
                guidance_scale=scale,
            )
            seconds = time.perf_counter() - start
            pixels = ((x.clamp(-1, 1) + 1) / 2 * 16).reshape(n, 64).numpy()
            accuracy = float(np.mean(classifier.predict(pixels) == labels.numpy()))
            print(f"| {sampler} | 50 | {scale:g} | {accuracy:.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
