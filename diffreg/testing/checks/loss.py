"""check_loss: a training loss with the exact model of a Gaussian mixture."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from diffreg import registry
from diffreg.diffusion import Diffusion
from diffreg.testing.checks._common import _diffusion, _fail, _linear_betas
from diffreg.testing.denoiser import ExactDenoiser
from diffreg.testing.mixture import GaussianMixture


def check_loss(
    name: str,
    /,
    *,
    mean_types: Sequence[str] = ("eps", "x0", "v"),
    variances: Sequence[str] = ("fixed_small", "learned_range"),
    check_minimum: bool = True,
    **options: Any,
) -> None:
    """Check a training loss (kind ``loss``) with the exact model of a :class:`GaussianMixture`.

    For each mean type and variance type given, on a linear T = 1000 process
    (``Diffusion.training_losses`` with fixed noise; a learned variance gets zero variance channels
    from the model, i.e. halfway between beta_tilde and beta for ``learned_range``):

    - the result is a dict with a ``"loss"`` key; every value is a floating tensor of shape ``[N]``
      (per example), finite, for data of shape ``[N, D]`` and ``[N, C, H, W]``;
    - the same inputs give the same loss;
    - it is differentiable: the gradient of the mean loss with respect to the model output is
      finite and not zero on the mean channels (and on the variance channels when learned);
    - with ``check_minimum`` (for losses whose expectation the posterior-mean prediction minimizes:
      MSE on eps, x0 or v, and the Gaussian KL terms of the variational bound, Ho et al. 2020,
      eq. 5): over 2048 examples at t >= 1 (2-D data), the mean loss at the exact model is below the
      mean loss with the mean channels shifted by +-0.5 (a constant) and by +-0.5 u (u a fixed
      standard-normal draw per element). The shifts do not depend on the noise, so this tests the
      expected loss, not a fit to the drawn noise.

    Args:
        name: a registered loss name; ``options`` go to its factory.

    Raises:
        AssertionError: naming the loss, mean type, variance type and what failed.
    """
    base_where = f"loss {name!r}" + (f" with options {options}" if options else "")
    try:
        loss = registry.create("loss", name, **options)
    except Exception as exc:
        raise AssertionError(f"{base_where}: building it raised {type(exc).__name__}: {exc}") from exc
    if not callable(loss):
        _fail(f"{base_where}: the factory returned {type(loss).__name__}, which is not callable")
    betas = _linear_betas(1000)
    for mean_type in mean_types:
        for variance in variances:
            diffusion = _diffusion(betas, mean_type, variance, loss)
            learned = diffusion.parameterization.learned_variance
            where = f"{base_where} ({mean_type}, {variance})"
            for shape in ((16, 2), (16, 2, 2, 2)):
                dim = int(np.prod(shape[1:]))
                mixture = GaussianMixture.example(dim)
                exact = mixture.denoiser(diffusion, mean_type)
                gen = torch.Generator().manual_seed(7)
                x0 = mixture.sample(shape[0], gen).reshape(shape).float()
                noise = torch.randn(shape, generator=gen)
                t = torch.linspace(0, 999, shape[0]).round().long()
                delta = torch.zeros((shape[0], shape[1] * (2 if learned else 1), *shape[2:]), requires_grad=True)

                def model(
                    x: torch.Tensor,
                    tt: torch.Tensor,
                    _exact: ExactDenoiser = exact,
                    _delta: torch.Tensor = delta,
                    _learned: bool = learned,
                    **kwargs: Any,
                ) -> torch.Tensor:
                    out = _exact(x, tt)
                    if _learned:
                        out = torch.cat([out, torch.zeros_like(out)], dim=1)
                    return out + _delta

                try:
                    terms = diffusion.training_losses(model, x0, t, noise=noise)
                except Exception as exc:
                    raise AssertionError(f"{where}: computing it raised {type(exc).__name__}: {exc}") from exc
                if not isinstance(terms, Mapping) or "loss" not in terms:
                    _fail(f"{where}: must return a dict with a 'loss' key, got {terms!r}")
                for key, value in terms.items():
                    if not isinstance(value, torch.Tensor) or value.shape != (shape[0],):
                        _fail(
                            f"{where}: term {key!r} must be a per-example tensor of shape [{shape[0]}] for data "
                            f"{list(shape)}, got {getattr(value, 'shape', type(value).__name__)}"
                        )
                    if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                        _fail(f"{where}: term {key!r} is not a finite float tensor: {value}")
                again = diffusion.training_losses(model, x0, t, noise=noise)["loss"]
                if not torch.equal(again, terms["loss"]):
                    _fail(f"{where}: not deterministic: the same inputs and noise gave a different loss")
                try:
                    terms["loss"].mean().backward()
                except Exception as exc:
                    raise AssertionError(f"{where}: loss.backward() raised {type(exc).__name__}: {exc}") from exc
                grad = delta.grad
                if grad is None or not bool(torch.isfinite(grad).all()):
                    _fail(f"{where}: the gradient with respect to the model output is missing or not finite")
                assert grad is not None
                mean_grad, var_grad = grad.split(shape[1], dim=1) if learned else (grad, None)
                if not bool((mean_grad != 0).any()):
                    _fail(f"{where}: the loss does not depend on the mean channels of the model output")
                if var_grad is not None and not bool((var_grad != 0).any()):
                    _fail(f"{where}: the loss does not train the learned variance (zero gradient on its channels)")
            if check_minimum:
                _check_minimum(diffusion, mean_type, learned, where)


def _check_minimum(diffusion: Diffusion, mean_type: str, learned: bool, where: str) -> None:
    n = 2048
    mixture = GaussianMixture.example(2)
    exact = mixture.denoiser(diffusion, mean_type)
    gen = torch.Generator().manual_seed(8)
    x0 = mixture.sample(n, gen)
    noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    t = torch.randint(1, diffusion.num_timesteps, (n,), generator=gen)
    directions = {"a constant": torch.ones(n, 2, dtype=torch.float64)}
    directions["a random direction u"] = torch.randn(n, 2, generator=gen, dtype=torch.float64)

    def mean_loss(shift: torch.Tensor | None) -> float:
        def model(x: torch.Tensor, tt: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            out = exact(x, tt) if shift is None else exact(x, tt) + shift
            return torch.cat([out, torch.zeros_like(out)], dim=1) if learned else out

        with torch.no_grad():
            return float(diffusion.training_losses(model, x0, t, noise=noise)["loss"].mean())

    at_exact = mean_loss(None)
    for label, u in directions.items():
        plus, minus = mean_loss(0.5 * u), mean_loss(-0.5 * u)
        if not at_exact < min(plus, minus):
            _fail(
                f"{where}: the exact (posterior-mean) model does not minimize the expected loss: mean loss "
                f"{at_exact:.6g} at the exact model, {plus:.6g} and {minus:.6g} with its output shifted by +-0.5 "
                f"times {label} (pass check_minimum=False for a loss that the posterior mean does not minimize)"
            )
