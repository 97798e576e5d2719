"""guided-diffusion's single-step API with per-example timesteps (``p_sample``, ``ddim_sample``,
``ddim_reverse_sample``): the same update rules as the ``ddpm`` and ``ddim`` samplers
(:mod:`diffreg.builtin.samplers`), with coefficients gathered per example from the tables."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from diffreg.builtin.samplers import check_eta, ddim_coefficients, ddpm_update
from diffreg.parameterization import eps_from_xstart, xstart_from_eps
from diffreg.sampling.noise import Generator, draw_noise


def _masked_noise(t: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None, generator: Generator) -> torch.Tensor:
    """The noise of a single step with per-example ``t``: ``noise`` (drawn if None), zero where
    ``t == 0`` (the last step adds none)."""
    if noise is None:
        noise = draw_noise(x.shape, generator, x.device, x.dtype)
    elif noise.shape != x.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
    return (t != 0).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)) * noise


def _prediction(diffusion, model, x, t, clip_denoised, denoised_fn, model_kwargs):
    from diffreg.diffusion import _check_t

    t = _check_t(t, x, diffusion.num_timesteps)
    out = diffusion.call_model(model, x, t, model_kwargs)
    return t, diffusion.prediction_from_output(out, x, t, clip_denoised, denoised_fn)


def _gather(diffusion, t, x, names):
    return [diffusion.tables.gather(name, t, x) for name in names]


def p_sample(
    diffusion, model, x, t, *, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, noise=None,
    generator=None,
) -> dict[str, torch.Tensor]:
    """See :meth:`diffreg.Diffusion.p_sample`."""
    t, pred = _prediction(diffusion, model, x, t, clip_denoised, denoised_fn, model_kwargs)
    coef_x0, coef_x = _gather(diffusion, t, x, ("posterior_mean_coef1", "posterior_mean_coef2"))
    std = torch.exp(0.5 * torch.as_tensor(pred.log_variance, dtype=x.dtype, device=x.device))
    mean = ddpm_update(x, pred.pred_xstart, coef_x0, coef_x, 0.0, None)
    if cond_fn is not None:
        grad = cond_fn(x, diffusion.model_timesteps(t), **(model_kwargs or {}))
        variance = torch.exp(pred.log_variance) if pred.variance is None else pred.variance
        mean = mean.float() + variance * grad.float()
    return {"sample": mean + std * _masked_noise(t, x, noise, generator), "pred_xstart": pred.pred_xstart}


def ddim_sample(
    diffusion, model, x, t, *, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0,
    noise=None, generator=None,
) -> dict[str, torch.Tensor]:
    """See :meth:`diffreg.Diffusion.ddim_sample`."""
    eta = check_eta(eta)
    t, pred = _prediction(diffusion, model, x, t, clip_denoised, denoised_fn, model_kwargs)
    tables = diffusion.tables
    alpha, sigma = tables.alpha_sigma(t, x)
    pred_xstart = pred.pred_xstart
    if cond_fn is not None:
        grad = cond_fn(x, diffusion.model_timesteps(t), **(model_kwargs or {}))
        eps = pred.pred_eps - sigma.to(x.dtype) * grad
        pred_xstart = xstart_from_eps(x, eps, alpha, sigma)
    abar_prev = tables.on("alphas_cumprod_prev", t.device)[t].reshape(alpha.shape)
    k_x0, k_x, c = ddim_coefficients(alpha, sigma, abar_prev.sqrt(), (1 - abar_prev).sqrt(), eta)
    sample = axpby_t(k_x0, pred_xstart, k_x, x)
    if eta > 0:
        sample = sample + c.to(x.dtype) * _masked_noise(t, x, noise, generator)
    return {"sample": sample, "pred_xstart": pred_xstart}


def axpby_t(a: torch.Tensor, x: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """a x + b y with float64 coefficient tensors cast to ``x``'s dtype."""
    return a.to(x.dtype) * x + b.to(x.dtype) * y


def ddim_reverse_sample(
    diffusion, model, x, t, *, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0
) -> dict[str, torch.Tensor]:
    """See :meth:`diffreg.Diffusion.ddim_reverse_sample` (Song et al. 2021, eq. 13 run forward:
    x' = alpha_next x0 + sigma_next eps)."""
    if eta != 0.0:
        raise ValueError(f"DDIM inversion is deterministic: eta must be 0, got {eta!r}")
    t, pred = _prediction(diffusion, model, x, t, clip_denoised, denoised_fn, model_kwargs)
    tables = diffusion.tables
    eps = eps_from_xstart(x, pred.pred_xstart, *tables.alpha_sigma(t, x))
    abar_next = tables.gather("alphas_cumprod_next", t, x)
    sample = pred.pred_xstart * torch.sqrt(abar_next) + torch.sqrt(1 - abar_next) * eps
    return {"sample": sample, "pred_xstart": pred.pred_xstart}


def ddim_reverse_sample_loop(
    diffusion, model, x, *, clip_denoised=True, denoised_fn=None, model_kwargs=None, progress=False
) -> torch.Tensor:
    """Map data ``x`` (``[N, ...]``) to noise x_T by deterministic DDIM inversion over every
    timestep of ``diffusion`` (t = 0 .. T-1). Returns a tensor of ``x``'s shape."""
    n = x.shape[0]
    for step in tqdm(range(diffusion.num_timesteps), disable=not progress, leave=False):
        t = torch.full((n,), step, dtype=torch.long, device=x.device)
        with torch.no_grad():
            x = ddim_reverse_sample(
                diffusion, model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
            )["sample"]
    return x
