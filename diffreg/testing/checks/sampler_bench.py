"""Where :func:`~diffreg.testing.check_sampler` runs a sampler: the exact model of a Gaussian
mixture on one process, each parameterization it accepts, and the sampler's own grids."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from diffreg.diffusion import Diffusion
from diffreg.testing.checks._common import _diffusion, _linear_betas
from diffreg.testing.mixture import GaussianMixture

#: The parameterizations whose exact models must give the same samples as the main one.
_OTHER_PARAMETERIZATIONS = ("eps", "x0", "v", "flow", "edm")


class SamplerBench:
    """One process with exact models of :meth:`GaussianMixture.example` (2-D) for a sampler.

    Args:
        name, options: the sampler (a registered name) and its options.
        where: how failures name the sampler.
        device: where to sample.
        process: ``None`` for guided-diffusion's linear T = 1000 process (the eps, x0 and v
            parameterizations, trailing spacing), or a configuration for
            :meth:`Diffusion.from_config` without ``parameterization``: a schedule name or table
            (``"rectified_flow"``, ``{"name": "edm"}``) or a dict with a ``schedule`` key
            (``{"schedule": "cosine", "num_timesteps": 100}``).
        parameterization: the main parameterization (the exact model predicts in its form).
        grid: the grid (``None``: the sampler's own, else trailing).
        compare: also build the other parameterizations the process accepts, whose samples must
            equal the main one's.
    """

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        where: str,
        device: torch.device,
        process: str | Mapping[str, Any] | None = None,
        parameterization: str = "eps",
        grid: Any = None,
        compare: bool = True,
    ):
        self.name, self.options, self.where, self.device = name, dict(options), where, device
        self.bases: dict[str, Diffusion] = {}
        if process is None:
            betas = _linear_betas(1000)
            self.bases = {m: _diffusion(betas, m) for m in (("eps", "x0", "v") if compare else ("eps",))}
            self.main = "eps"
        else:
            config = dict(process) if isinstance(process, Mapping) and "schedule" in process else {"schedule": process}
            for m in dict.fromkeys((parameterization, *(_OTHER_PARAMETERIZATIONS if compare else ()))):
                try:
                    self.bases[m] = Diffusion.from_config({**config, "parameterization": m})
                except ValueError:
                    if m == parameterization:
                        raise
            self.main = parameterization
        self.default = process is None  # guided-diffusion's linear T = 1000 process
        self.grid = grid
        self.grid_kw: dict[str, Any] = {"spacing": "trailing"} if process is None and grid is None else {"grid": grid}
        self.t_top = self.process.t_max
        self.prior_std = float(getattr(self.process, "prior_std", 1.0))
        self.mixture = GaussianMixture.example(2)

    @property
    def diffusion(self) -> Diffusion:
        """The main parameterization's diffusion."""
        return self.bases[self.main]

    @property
    def process(self) -> Any:
        """The main diffusion's process."""
        return self.bases[self.main].process

    def grid_times(self, steps: int, instance: Any) -> list[float]:
        """The times of the sampler's own grid of ``steps`` steps (``grid``, else its ``grid``
        attribute, else trailing), ascending, rounded to 1e-9."""
        return sorted(round(v, 9) for v in self.diffusion.grid_times(steps, self.grid, instance).tolist())

    def run(
        self,
        shape: Sequence[int],
        steps: int,
        seed: int,
        *,
        mean_type: str | None = None,
        dtype: torch.dtype = torch.float32,
        mix: GaussianMixture | None = None,
        callback: Callable[..., None] | None = None,
        calls: list[int] | None = None,
    ) -> torch.Tensor:
        """Sample ``shape`` in ``steps`` steps from x_T = prior_std * N(0, I) (seeded), with the
        exact model of ``mix`` (default: the bench's mixture) in ``mean_type`` form (default: the
        main one). ``calls`` collects one entry per model call. Raises AssertionError (naming the
        sampler and the run) for anything sampling raises."""
        mean_type = mean_type or self.main
        base = self.bases[mean_type]
        gen = torch.Generator().manual_seed(seed)
        noise = (torch.randn(tuple(shape), generator=gen, dtype=dtype) * self.prior_std).to(self.device)
        exact = (mix or self.mixture).denoiser(base, mean_type)

        def model(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if calls is not None:
                calls.append(int(t[0]))
            return exact(x, t, **kwargs)

        try:
            return base.sample(
                model,
                tuple(shape),
                sampler=self.name,
                steps=steps,
                noise=noise,
                generator=gen,
                clip_denoised=False,
                dtype=dtype,
                callback=callback,
                **self.grid_kw,
                **self.options,
            )
        except Exception as exc:
            raise AssertionError(
                f"{self.where}: sampling {list(shape)} ({mean_type} parameterization, {steps} steps, {dtype}) raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
