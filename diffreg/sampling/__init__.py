"""Sampling: the sampler contract, the grid contract, the context (the denoiser at any noise
level), the driver, and noise/seeding. One module per idea:

- :mod:`~diffreg.sampling.contract`: :class:`Sampler` (kind ``sampler``);
- :mod:`~diffreg.sampling.grid`: :class:`Grid` (kind ``grid``) and :func:`resolve_grid`;
- :mod:`~diffreg.sampling.context`: :class:`SamplingContext`, :class:`Levels`;
- :mod:`~diffreg.sampling.driver`: :func:`sample_loop`, :func:`sample_loop_progressive`;
- :mod:`~diffreg.sampling.noise`: :func:`draw_noise`, :func:`per_sample_generators`;
- :mod:`~diffreg.sampling.single_step`: guided-diffusion's single-step API (``p_sample``, ...).
"""

from diffreg.sampling.context import Levels, SamplingContext, dynamic_threshold
from diffreg.sampling.contract import Sampler
from diffreg.sampling.driver import resolve_sampler, sample_loop, sample_loop_progressive, split_options
from diffreg.sampling.grid import Grid, resolve_grid
from diffreg.sampling.noise import draw_noise, per_sample_generators

__all__ = [
    "Grid",
    "Levels",
    "Sampler",
    "SamplingContext",
    "draw_noise",
    "dynamic_threshold",
    "per_sample_generators",
    "resolve_grid",
    "resolve_sampler",
    "sample_loop",
    "sample_loop_progressive",
    "split_options",
]
