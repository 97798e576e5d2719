"""An exact benchmark of guidance methods (docs/guidance.md).

Part 1, exact: a 2-D class-conditional Gaussian mixture (:class:`diffreg.testing.ClassConditionalMixture`:
3 classes, 2 overlapping components each) with exact conditional and unconditional denoisers, so
every difference comes from the guidance method alone. Per method and scale, over 3 x 200 samples
(DDIM, 20 trailing steps, no clipping):

- ``sw``: sliced Wasserstein-2 distance from the samples of class y to 4000 draws of p(x | y),
  averaged over the classes (lower: closer to the conditional distribution);
- ``acc``: class accuracy by the exact posterior argmax_y p(y | x);
- ``std``: per-class standard deviation of the samples over that of p(x | y), averaged over classes
  and coordinates (diversity: 1 = as diverse as the data, < 1 collapsed);
- ``nfe_batch``: forward passes x batch multiplier (2 for a doubled batch) per sample.

Part 2, the bundled digits model (8x8, 10 classes): per method and scale, 200 samples (20 per
class, DDIM, 20 steps): ``svm``: accuracy of an SVM trained on scikit-learn's digits; ``fd``: the
Frechet distance between the samples and the 1797 real digits in a 16-dimensional PCA space
(fitted on the real digits).

Run: ``python benchmarks/guidance.py [--json benchmarks/guidance.json]`` (about a minute on a CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import diffreg
from diffreg.sampling import per_sample_generators
from diffreg.testing import ClassConditionalMixture, sliced_wasserstein

#: method -> (scales, options)
METHODS: dict[str, tuple[tuple[float, ...], dict]] = {
    "none (conditional)": ((1.0,), {}),
    "cfg": ((2.0, 4.0, 7.0), {}),
    "cfg_rescale": ((2.0, 4.0, 7.0), {"phi": 0.7}),
    "interval": ((2.0, 4.0, 7.0), {"sigma_low": 0.28, "sigma_high": 5.42}),
    "apg": ((2.0, 4.0, 7.0), {}),
    "cfg_zero_star": ((2.0, 4.0, 7.0), {}),
    "cfgpp": ((0.2, 0.5, 0.8), {}),
    "autoguidance": ((2.0, 4.0, 7.0), {}),
}


def _sample(diffusion, model, y, name, scale, options, steps, seed, shape, clip):
    calls = []

    def counted(x, t, **kwargs):
        calls.append(x.shape[0])
        return model(x, t, **kwargs)

    counted.null_class = getattr(model, "null_class", None)
    if "guide" in options:  # the guide's passes count too
        guide = options["guide"]

        def counted_guide(x, t, **kwargs):
            calls.append(x.shape[0])
            return guide(x, t, **kwargs)

        options = {**options, "guide": counted_guide}
    guidance = None if name.startswith("none") else name
    x = diffusion.sample(
        counted,
        (y.shape[0], *shape),
        sampler="ddim",
        steps=steps,
        generator=per_sample_generators(seed, y.shape[0]),
        model_kwargs={"y": y},
        guidance=guidance,
        guidance_scale=scale if guidance else None,
        guidance_options=options if guidance else None,
        clip_denoised=clip,
    )
    return x, sum(calls) / y.shape[0]


def weak_guide(mixture: ClassConditionalMixture, diffusion):
    """Autoguidance's "bad version of itself" for the exact benchmark: the exact conditional
    denoiser of the same classes with every component 1.6 times wider (a model that learned the
    data too blurry)."""
    blurred = ClassConditionalMixture(mixture.weights, mixture.means, mixture.stds * 1.6, mixture.classes.tolist())
    return blurred.denoiser(diffusion)


def exact_table(per_class: int = 200, steps: int = 20) -> list[dict]:
    mixture = ClassConditionalMixture.example()
    diffusion = diffreg.Diffusion.from_config({"num_timesteps": 1000})
    model = mixture.denoiser(diffusion)
    guide = weak_guide(mixture, diffusion)
    c = mixture.num_classes
    y = torch.arange(c).repeat_interleave(per_class)
    refs = [mixture.class_mixture(k).sample(4000, torch.Generator().manual_seed(10 + k)) for k in range(c)]
    ref_std = [r.std(0) for r in refs]
    rows = []
    for name, (scales, options) in METHODS.items():
        for scale in scales:
            opts = {**options, "guide": guide} if name == "autoguidance" else options
            x, cost = _sample(diffusion, model, y, name, scale, opts, steps, 0, (2,), False)
            x = x.double()
            acc = float((mixture.log_posterior(x).argmax(1) == y).double().mean())
            sw = float(np.mean([sliced_wasserstein(x[y == k], refs[k]) for k in range(c)]))
            std = float(np.mean([(x[y == k].std(0) / ref_std[k]).mean() for k in range(c)]))
            rows.append({"method": name, "scale": scale, "sw": sw, "acc": acc, "std": std, "nfe_batch": cost})
    return rows


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, eq. 6)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * root))


def digits_table(per_class: int = 20, steps: int = 20) -> list[dict]:
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.svm import SVC

    digits = load_digits()
    svm = SVC(gamma=0.001).fit(digits.data, digits.target)
    pca = PCA(16, random_state=0).fit(digits.data)
    real = pca.transform(digits.data)
    model, diffusion, cfg = diffreg.load_checkpoint()
    y = torch.arange(10).repeat_interleave(per_class)
    rows = []
    for name, (scales, options) in METHODS.items():
        if name == "autoguidance":
            continue  # no weaker digits model is bundled
        for scale in scales:
            x, cost = _sample(diffusion, model, y, name, scale, options, steps, 0, (1, 8, 8), True)
            pixels = ((x.clamp(-1, 1) + 1) / 2 * 16).reshape(len(y), 64).numpy()
            acc = float(np.mean(svm.predict(pixels) == y.numpy()))
            rows.append({"method": name, "scale": scale, "svm": acc, "fd": _frechet(pca.transform(pixels), real), "nfe_batch": cost})
    return rows


def markdown(exact: list[dict], digits: list[dict]) -> str:
    lines = ["| method | scale | SW to p(x\\|y) | accuracy p(y\\|x) | std ratio | passes x batch | digits SVM acc | digits FD (PCA-16) |",
             "|---|---|---|---|---|---|---|---|"]
    by_key = {(r["method"], r["scale"]): r for r in digits}
    for r in exact:
        d = by_key.get((r["method"], r["scale"]))
        tail = f"{d['svm']:.3f} | {d['fd']:.2f}" if d else "- | -"
        lines.append(f"| {r['method']} | {r['scale']:g} | {r['sw']:.4f} | {r['acc']:.3f} | {r['std']:.3f} | {r['nfe_batch']:.0f} | {tail} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--no-digits", action="store_true", help="skip part 2 (the bundled model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    exact = exact_table()
    digits = [] if args.no_digits else digits_table()
    result = {"exact": exact, "digits": digits, "seconds": round(time.perf_counter() - start, 1),
              "torch": torch.__version__, "diffreg": diffreg.__version__}
    print(markdown(exact, digits))
    if args.json is not None:
        from diffreg.fileio import atomic_write

        text = json.dumps(result, indent=1) + "\n"
        atomic_write(args.json, lambda tmp: tmp.write_text(text))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
