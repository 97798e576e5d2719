"""The grid contract (kind ``grid``): which noise levels a sampler visits.

A grid is a callable ``grid(process, steps) -> times``: ``steps`` times of the
:class:`~diffreg.process.Process` (float64, strictly decreasing, the first the noisiest), one per
model-evaluating step. The driver appends the data level (sigma = 0) after the last, so step ``i``
moves from ``times[i]`` to ``times[i + 1]``. Any grid works with any sampler and any process, and
``steps`` asked is ``steps`` run: a level between two integer timesteps of a discrete process is a
fractional time (see :class:`~diffreg.process.DiscreteProcess`), never merged with a neighbour.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffreg import registry
from diffreg.process import Process


class Grid(abc.ABC):
    """Base class of grids (kind ``grid``); subclasses implement :meth:`times`."""

    @abc.abstractmethod
    def times(self, process: Process, steps: int) -> np.ndarray:
        """``steps`` times of ``process``, float64, strictly decreasing, within its range."""

    def max_steps(self, process: Process) -> int | None:
        """The most steps this grid can give on ``process`` (``None``: no limit)."""
        return None

    def fixed_steps(self) -> int | None:
        """The one step count this grid gives (an explicit list of levels), or ``None`` when it
        lays out any number of steps."""
        return None

    def __call__(self, process: Process, steps: int) -> np.ndarray:
        """:meth:`times`, validated.

        Raises:
            TypeError / ValueError: ``steps`` not an int >= 1; the grid's times not strictly
                decreasing or outside the process's range (naming the grid).
        """
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise TypeError(f"steps must be an int, got {steps!r}")
        most = self.max_steps(process)
        if steps < 1 or (most is not None and steps > most):
            accepted = f"in [1, {most}] (the process length)" if most is not None else ">= 1"
            raise ValueError(f"steps must be {accepted}, got {steps}")
        times = np.asarray(self.times(process, int(steps)), dtype=np.float64)
        if times.shape != (steps,):
            raise ValueError(f"grid {self!r} gave {times.shape[0] if times.ndim else 0} levels for steps={steps}")
        if not np.all(np.isfinite(times)) or times.min() < process.t_min or times.max() > process.t_max:
            raise ValueError(f"grid {self!r} gave times outside [{process.t_min}, {process.t_max}]: {times.tolist()}")
        if steps > 1 and not np.all(np.diff(times) < 0):
            raise ValueError(f"grid {self!r} gave times that do not strictly decrease: {times.tolist()}")
        return times

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({options})"


def explicit_length(grid: Any) -> int | None:
    """:meth:`Grid.fixed_steps` of ``grid`` in any form :func:`resolve_grid` accepts (a list of times
    has its length), or ``None``: for a grid of any length, and for anything that is not a grid
    (where the caller's later :func:`resolve_grid` says why)."""
    try:
        return resolve_grid(grid).fixed_steps()
    except (TypeError, ValueError):
        return None


def resolve_grid(grid: str | Grid | Sequence[float] | dict[str, Any]) -> Grid:
    """A :class:`Grid` from a registered name, ``{"name": ..., **options}``, an explicit list of
    process times, or a grid instance (unchanged).

    Raises:
        UnknownComponentError / ComponentOptionError: an unknown name or option.
        TypeError: anything else.
    """
    if isinstance(grid, Grid):
        return grid
    if isinstance(grid, str):
        return registry.create("grid", grid)
    if isinstance(grid, dict):
        options = dict(grid)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise TypeError(f"a grid given as a dict needs a 'name', got {grid!r}")
        return registry.create("grid", name, **options)
    if isinstance(grid, np.ndarray) or (torch.is_tensor(grid)):
        if grid.ndim != 1:
            raise ValueError(f"an explicit grid is a 1-D list of process times, got shape {tuple(grid.shape)}")
        grid = grid.tolist()  # once, before sampling (a tensor on the GPU is read here, not in the loop)
    if isinstance(grid, (list, tuple)):
        return registry.create("grid", "explicit", times=list(grid))  # each entry checked there
    raise TypeError(
        f"grid must be a registered name, a dict with 'name', a list (or 1-D array/tensor) of times or a Grid, "
        f"got {grid!r}"
    )
