"""check_schedule: a noise schedule against the ``schedule`` contract."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from diffreg import registry
from diffreg.diffusion import Diffusion
from diffreg.schedule import NoiseSchedule, spaced_timesteps
from diffreg.testing.checks._common import _diffusion, _fail


def check_schedule(
    name_or_factory: str | Callable[..., Any],
    /,
    *,
    num_timesteps: Sequence[int] = (50, 100, 1000),
    **options: Any,
) -> None:
    """Check a noise schedule against the ``schedule`` contract (:mod:`diffreg.hookspecs`).

    For each T in ``num_timesteps``: the factory (``factory(T, **options)``, or the registered
    ``name`` through :func:`diffreg.registry.create`) returns a :class:`~diffreg.NoiseSchedule`
    whose ``betas`` is a float64 numpy array of shape ``[T]``, finite, in (0, 1]; alphas_cumprod
    (Ho et al. 2020, eq. 4: prod (1 - beta)) is non-increasing and ends below where it starts;
    building twice gives identical betas; a :class:`~diffreg.Diffusion` builds from it (by
    name through ``Diffusion.from_config`` for a registered name), has the same alphas_cumprod, noises
    data to finite values at t = 0 and t = T - 1, and respaces to 10 trailing steps.

    Args:
        name_or_factory: a registered schedule name, or a factory ``(num_timesteps, **options)``.
        num_timesteps: the T values to try (the linear schedule needs T >= 21 with its defaults).
        options: the schedule's options.

    Raises:
        AssertionError: naming the schedule, T and what failed (also when building it raised).
    """
    label = name_or_factory if isinstance(name_or_factory, str) else getattr(name_or_factory, "__name__", "factory")

    def build(T: int) -> Any:
        try:
            if isinstance(name_or_factory, str):
                return registry.create("schedule", name_or_factory, T, **options)
            return name_or_factory(T, **options)
        except Exception as exc:
            raise AssertionError(
                f"schedule {label!r} with num_timesteps={T} and options {options}: building it raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    for T in num_timesteps:
        where = f"schedule {label!r} (num_timesteps={T}, options {options})"
        schedule = build(T)
        if not isinstance(schedule, NoiseSchedule):
            _fail(f"{where}: the factory returned {type(schedule).__name__}, not a diffreg.NoiseSchedule")
        betas = schedule.betas
        if not isinstance(betas, np.ndarray) or betas.dtype != np.float64:
            _fail(
                f"{where}: betas must be a float64 numpy array, got {type(betas).__name__} "
                f"{getattr(betas, 'dtype', '')}"
            )
        if betas.shape != (T,):
            _fail(f"{where}: betas has shape {betas.shape}, expected ({T},)")
        bad = np.flatnonzero(~(np.isfinite(betas) & (betas > 0) & (betas <= 1)))
        if bad.size:
            _fail(f"{where}: betas must be finite and in (0, 1]; betas[{bad[0]}] = {betas[bad[0]]!r}")
        acp = np.cumprod(1.0 - betas)
        rising = np.flatnonzero(np.diff(acp) > 0)
        if rising.size:
            _fail(f"{where}: alphas_cumprod increases at index {rising[0] + 1}")
        if not acp[-1] < acp[0]:
            _fail(f"{where}: alphas_cumprod does not decrease (first {acp[0]!r}, last {acp[-1]!r})")
        again = build(T).betas
        if not np.array_equal(np.asarray(again), betas):
            _fail(f"{where}: not deterministic: building it twice gave different betas")
        try:
            if isinstance(name_or_factory, str):
                spec = {"name": name_or_factory, **options}
                diffusion = Diffusion.from_config({"schedule": spec, "num_timesteps": T})
            else:
                diffusion = _diffusion(betas)
            x = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(4, 2)
            t = torch.tensor([0, T - 1, T // 2, 1])
            noised = diffusion.q_sample(x, t, noise=torch.ones_like(x))
            spaced = diffusion.respace(spaced_timesteps(T, min(T, 10), "trailing"))
        except Exception as exc:
            raise AssertionError(f"{where}: building a Diffusion from it raised {type(exc).__name__}: {exc}") from exc
        if not np.allclose(diffusion.alphas_cumprod, acp, rtol=1e-12, atol=0):
            _fail(f"{where}: the Diffusion's alphas_cumprod differs from cumprod(1 - betas)")
        if not bool(torch.isfinite(noised).all()):
            _fail(f"{where}: q_sample gave non-finite values: {noised.tolist()}")
        if not np.all(np.isfinite(spaced.alphas_cumprod)):
            _fail(f"{where}: respacing to 10 steps gave non-finite alphas_cumprod")
