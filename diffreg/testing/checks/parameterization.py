"""check_parameterization: a mean type against the ``parameterization`` contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffreg import registry
from diffreg.parameterization import Parameterization
from diffreg.testing.checks._common import _diffusion, _fail, _linear_betas
from diffreg.testing.mixture import GaussianMixture


def check_parameterization(
    name: str,
    /,
    *,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    **options: Any,
) -> None:
    """Check a mean type (kind ``parameterization``) against the contract of
    :class:`~diffreg.parameterization.Parameterization`.

    On a linear T = 1000 process, for shapes ``[N, 2]`` and ``[N, 2, 2, 2]``, every dtype in
    ``dtypes`` and timesteps spread over 0..T-1:

    - the training target ``target(tables, x0, x_t, t, eps)`` has x0's shape and dtype and is finite;
    - round trip: fed back as the model output, ``p_mean_variance`` returns ``pred_xstart`` = x0 and
      ``pred_eps`` = eps (x_t = sqrt(a) x0 + sqrt(1 - a) eps, Ho et al. 2020, eq. 4), in x's dtype;
    - ``predict`` with a Python-int timestep (what sampling loops pass) equals ``predict`` with a
      tensor timestep;
    - with the exact model of a :class:`GaussianMixture` for this mean type (closed form for eps, x0
      and v; ``target(x0_hat, eps_hat)`` for others), ``pred_xstart`` equals the mixture's posterior
      mean E[x0 | x_t] and ``pred_eps`` equals E[eps | x_t].

    Args:
        name: a registered parameterization name; ``options`` go to its factory.
        dtypes: float dtypes to try.

    Raises:
        AssertionError: naming the parameterization, dtype, shape and what failed.
    """
    where = f"parameterization {name!r}"
    try:
        mean_type = registry.create("parameterization", name, **options)
    except Exception as exc:
        raise AssertionError(f"{where}: building it raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(mean_type, Parameterization):
        _fail(f"{where}: the factory returned {type(mean_type).__name__}, not a diffreg.parameterization.Parameterization")
    diffusion = _diffusion(_linear_betas(), mean_type)
    T = diffusion.num_timesteps
    tables = diffusion.tables
    t = torch.linspace(0, T - 1, 12).round().long()
    n = t.shape[0]
    for shape in ((n, 2), (n, 2, 2, 2)):
        dim = int(np.prod(shape[1:]))
        mixture = GaussianMixture.example(dim)
        gen = torch.Generator().manual_seed(dim)
        x0_64 = mixture.sample(n, gen).reshape(shape)
        eps_64 = torch.randn(shape, generator=gen, dtype=torch.float64)
        for dtype in dtypes:
            here = f"{where} ({dtype}, shape {list(shape)})"
            x0, eps = x0_64.to(dtype), eps_64.to(dtype)
            x_t = diffusion.q_sample(x0, t, noise=eps)
            target = mean_type.target(x0, eps, *tables.alpha_sigma(t, x0))
            if not isinstance(target, torch.Tensor) or target.shape != x0.shape or target.dtype != dtype:
                _fail(
                    f"{here}: target must be a {dtype} tensor of shape {list(shape)}, got "
                    f"{getattr(target, 'dtype', type(target).__name__)} {list(getattr(target, 'shape', []))}"
                )
            if not bool(torch.isfinite(target).all()):
                _fail(f"{here}: target is not finite")
            out = diffusion.p_mean_variance(lambda x, tt, _out=target, **k: _out, x_t, t, clip_denoised=False)
            tol = 2e-4 if dtype == torch.float32 else 1e-9
            for key, want in (("pred_xstart", x0), ("pred_eps", eps)):
                got = out[key]
                if got.shape != x0.shape or got.dtype != dtype:
                    _fail(f"{here}: {key} is {got.dtype} {list(got.shape)}, expected {dtype} {list(shape)}")
                if not bool(torch.isfinite(got).all()):
                    _fail(f"{here}: {key} is not finite when the model outputs the training target")
                err = float((got - want).abs().max())
                if not err <= tol:
                    _fail(
                        f"{here}: round trip failed: feeding the training target back as the model output gives "
                        f"{key} off by {err:.3g} (tolerance {tol:g}); predict() must invert target()"
                    )
            k = int(t[n // 2])
            by_tensor = mean_type.predict(target[:1], x_t[:1], *tables.alpha_sigma(t[n // 2 : n // 2 + 1], x_t[:1]))
            by_int = mean_type.predict(target[:1], x_t[:1], *tables.alpha_sigma(k, x_t[:1]))
            for what, u, v in zip(("pred_xstart", "pred_eps"), by_tensor, by_int, strict=True):
                if v.dtype != dtype or not torch.allclose(u, v, rtol=1e-5, atol=tol):
                    _fail(f"{here}: predict() with t as a Python int ({k}) differs from t as a tensor in {what}")
        # the exact model: pred_xstart must be the posterior mean
        x_t64 = diffusion.q_sample(x0_64, t, noise=eps_64)
        model = mixture.denoiser(diffusion, mean_type)
        out = diffusion.p_mean_variance(model, x_t64, t, clip_denoised=False)
        want_x0, want_eps = mixture.denoise(x_t64, torch.tensor(np.array(diffusion.alphas_cumprod))[t])
        for key, want in (("pred_xstart", want_x0), ("pred_eps", want_eps)):
            err = float((out[key] - want).abs().max())
            if not err <= 1e-6:
                _fail(
                    f"{where} (float64, shape {list(shape)}): with the exact model of a Gaussian mixture, {key} "
                    f"differs from the posterior mean by {err:.3g} (tolerance 1e-6)"
                )
        for dtype in dtypes:
            got = diffusion.p_mean_variance(model, x_t64.to(dtype), t, clip_denoised=False)["pred_xstart"]
            if got.dtype != dtype:
                _fail(f"{where}: pred_xstart is {got.dtype} for a {dtype} model and input")
