"""Noise schedules (the ``betas`` of the forward process) and timestep respacing.

A schedule owns one thing: a float64 ``betas`` array of shape ``[T]``. Every other coefficient
table is derived from it in :class:`DiffusionTables`, so it can never drift.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import overload

import numpy as np
import torch


class NoiseSchedule(abc.ABC):
    """Base class of schedules (kind ``schedule``).

    Subclasses implement :meth:`compute_betas`; the factory signature is
    ``Schedule(num_timesteps: int, **options)``. ``betas`` is validated once: ``T >= 2`` and every
    beta in ``(0, 1]``.

    Args:
        num_timesteps: T, the number of diffusion steps (int >= 2).
        rescale_zero_terminal_snr: rescale so that ``alphas_cumprod[-1] == 0`` (Lin et al. 2024,
            "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1).

    Raises:
        ValueError: for ``num_timesteps < 2`` or a beta outside ``(0, 1]`` (naming its index).
    """

    def __init__(self, num_timesteps: int, *, rescale_zero_terminal_snr: bool = False):
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
            raise TypeError(f"num_timesteps must be an int, got {num_timesteps!r}")
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)
        self.rescale_zero_terminal_snr = rescale_zero_terminal_snr
        betas = np.asarray(self.compute_betas(self.num_timesteps), dtype=np.float64)
        if rescale_zero_terminal_snr:
            betas = rescale_zero_terminal_snr_betas(betas)
        self._betas = validate_betas(betas, type(self).__name__)
        self._betas.setflags(write=False)

    @abc.abstractmethod
    def compute_betas(self, num_timesteps: int) -> np.ndarray:
        """Return the float64 betas, shape ``[num_timesteps]``."""

    @property
    def betas(self) -> np.ndarray:
        """float64 array ``[T]``, read-only."""
        return self._betas

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_timesteps={self.num_timesteps})"


def validate_betas(betas: np.ndarray, source: str = "schedule") -> np.ndarray:
    """Check that ``betas`` is 1-D, of length >= 2, finite, and in ``(0, 1]``.

    Raises ``ValueError`` naming the first offending index and value.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(f"{source}: betas must be 1-D with at least 2 values, got shape {betas.shape}")
    bad = np.flatnonzero(~((betas > 0) & (betas <= 1)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{source}: betas must lie in (0, 1]; betas[{i}] = {float(betas[i])!r}")
    return betas.copy()


def rescale_zero_terminal_snr_betas(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last one is 0 and the first is unchanged.

    Lin et al. 2024, Algorithm 1. Returns float64 betas ``[T]`` whose last value is 1.
    """
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Discretize a continuous ``alpha_bar(t)`` on ``t in [0, 1]`` into betas.

    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta), as in Nichol & Dhariwal
    2021 (eq. 17) and guided-diffusion's ``betas_for_alpha_bar``.
    """
    betas = []
    for i in range(num_timesteps):
        t1 = i / num_timesteps
        t2 = (i + 1) / num_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    """Nichol & Dhariwal 2021, eq. 17: f(t) = cos(((t + s) / (1 + s)) * pi / 2) ** 2."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


# -- respacing -----------------------------------------------------------------------------------


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Timesteps to keep from a process of ``num_timesteps`` steps (ascending list of indices).

    Same rules as guided-diffusion's ``respace.space_timesteps``:

    - ``"ddimN"``: the smallest integer stride ``s`` for which ``range(0, T, s)`` has exactly N
      elements.
    - ``"a,b,c"`` (or a list of ints): split ``[0, T)`` into as many equal sections and take that
      many evenly strided steps from each (float stride, rounded), first and last included.

    Raises:
        ValueError: for an impossible spec (a section asking for more steps than it has, a count
            of 0, a DDIM count no integer stride can give, or an unparsable string).
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim") :])
            except ValueError:
                raise ValueError(f"cannot parse respacing {section_counts!r}; expected 'ddimN'") from None
            if not 1 <= desired <= num_timesteps:
                raise ValueError(f"respacing {section_counts!r}: N must be in [1, {num_timesteps}]")
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            if desired == 1:
                return [0]
            raise ValueError(
                f"respacing {section_counts!r}: no integer stride gives exactly {desired} steps "
                f"out of {num_timesteps}; use a section count such as '{desired}' instead"
            )
        try:
            counts = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"cannot parse respacing {section_counts!r}; expected 'ddimN' or counts like '10,10,10'"
            ) from None
    else:
        counts = [int(x) for x in section_counts]
    if not counts:
        raise ValueError("respacing needs at least one section count")
    if len(counts) > num_timesteps:
        raise ValueError(f"respacing {section_counts!r}: more sections than the {num_timesteps} steps")
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if section_count < 0 or section_count > size:
            raise ValueError(
                f"respacing {section_counts!r}: section {i} has {size} steps, "
                f"cannot take {section_count} (accepted: 0..{size})"
            )
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    if not all_steps:
        raise ValueError(f"respacing {section_counts!r} keeps no timesteps")
    return sorted(set(all_steps))


SPACINGS = ("leading", "trailing", "linspace")


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """``steps`` timesteps out of ``num_timesteps`` (ascending), with diffusers' three spacings.

    - ``leading``: ``0, r, 2r, ...`` with ``r = T // steps`` (DDIM paper; diffusers' default).
    - ``trailing``: ``round(T - k * T / steps) - 1`` for k < steps: starts at ``T - 1`` (Lin et al.
      2024, Table 2; recommended).
    - ``linspace``: ``round(linspace(0, T - 1, steps))``.

    Raises:
        ValueError: ``steps`` outside ``[1, T]``, an unknown spacing, or duplicate timesteps.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {steps!r}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}] (the process length), got {steps}")
    if spacing == "leading":
        ratio = num_timesteps // steps
        ts = np.arange(0, steps) * ratio
    elif spacing == "trailing":
        # T - k T / steps for k < steps: diffusers' np.arange(T, 0, -T / steps) without its float
        # end point, which adds a spurious extra value for some counts (61, 103, ... at T = 1000)
        ts = np.round(num_timesteps - np.arange(steps) * (num_timesteps / steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; accepted: {', '.join(SPACINGS)}")
    out = sorted(int(t) for t in ts)
    if len(set(out)) != len(out):
        raise ValueError(f"spacing {spacing!r} gives duplicate timesteps for steps={steps}")
    return out


# -- coefficient tables ----------------------------------------------------------------------------


def axpby(a, x: torch.Tensor, b, y: torch.Tensor) -> torch.Tensor:
    """``a * x + b * y`` for coefficients that are tensors broadcastable to ``x`` or Python
    numbers; with numbers it is two fused kernels (``torch.add(x * a, y, alpha=b)``)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return (x * a).add_(y, alpha=b)  # one allocation
    return a * x + b * y


class DiffusionTables:
    """Every per-timestep coefficient of a Gaussian diffusion, computed once in float64.

    Built from ``betas`` (float64 ``[T]``); each attribute is a read-only float64 numpy array of
    shape ``[T]`` with guided-diffusion's name and formula (Ho et al. 2020, eqs. 4, 6-7):

    ``betas``, ``alphas_cumprod``, ``alphas_cumprod_prev``, ``alphas_cumprod_next``,
    ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``, ``log_one_minus_alphas_cumprod``,
    ``sqrt_recip_alphas_cumprod``, ``sqrt_recipm1_alphas_cumprod``, ``posterior_variance``,
    ``posterior_log_variance_clipped`` (the log of the posterior variance with its t = 0 value
    replaced by the t = 1 value, which is 0 otherwise), ``posterior_mean_coef1``,
    ``posterior_mean_coef2``.

    :meth:`gather` returns one table at timesteps ``t`` on ``x``'s device and dtype; device copies
    are made once per device and reused, so per-step gathers cost no host-device transfer.
    """

    NAMES = (
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "alphas_cumprod_next",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "log_betas",
    )

    def __init__(self, betas: np.ndarray):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must be a 1-D array of values in (0, 1]")
        self.num_timesteps = int(betas.shape[0])
        alphas = 1.0 - betas
        acp = np.cumprod(alphas, axis=0)
        acp_prev = np.append(1.0, acp[:-1])
        self.betas = betas
        self.log_betas = np.log(betas)
        self.alphas_cumprod = acp
        self.alphas_cumprod_prev = acp_prev
        self.alphas_cumprod_next = np.append(acp[1:], 0.0)
        with np.errstate(divide="ignore"):
            self.sqrt_alphas_cumprod = np.sqrt(acp)
            self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
            self.log_one_minus_alphas_cumprod = np.log(1.0 - acp)
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1)
            # Ho et al. 2020, eq. 7: beta_tilde = beta_t (1 - abar_{t-1}) / (1 - abar_t)
            self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
            # The variance is 0 at t = 0: clip the log by using the t = 1 value there.
            first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
            self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
            self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
            self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
        for name in self.NAMES:
            getattr(self, name).setflags(write=False)
        self._device_cache: dict[tuple[str, str], object] = {}

    def derive(self, name: str, compute) -> None:
        """Add table ``name`` = ``compute(self)`` (float64 ``[T]``) once; later calls do nothing.

        For coefficient tables that belong to one component (for example ``fixed_large``'s
        variance), so they too are computed once in float64 and cached per device.
        """
        if name not in self.__dict__:
            values = np.asarray(compute(self), dtype=np.float64)
            values.setflags(write=False)
            setattr(self, name, values)

    def on(self, name: str, device) -> torch.Tensor:
        """Table ``name`` as a float64 tensor on ``device`` (float32 where float64 is unsupported)."""
        key = (name, str(device))
        table = self._device_cache.get(key)
        if table is None:
            dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
            table = torch.tensor(np.array(getattr(self, name)), dtype=dtype).to(device)
            self._device_cache[key] = table
        return table  # type: ignore[return-value]

    def alpha_sigma(self, t: torch.Tensor | int, x: torch.Tensor):
        """(alpha, sigma) = (sqrt(abar_t), sqrt(1 - abar_t)) at timesteps ``t``: Python floats for
        an int ``t``; float64 tensors ``[N, 1, ...]`` (broadcastable to ``x``) for int64 ``[N]``."""
        if isinstance(t, int):
            return float(self.sqrt_alphas_cumprod[t]), float(self.sqrt_one_minus_alphas_cumprod[t])
        shape = t.shape + (1,) * (x.ndim - t.ndim)
        return (
            self.on("sqrt_alphas_cumprod", t.device)[t].reshape(shape),
            self.on("sqrt_one_minus_alphas_cumprod", t.device)[t].reshape(shape),
        )

    @overload
    def gather(self, name: str, t: int, x: torch.Tensor) -> float: ...

    @overload
    def gather(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...

    def gather(self, name: str, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor | float:
        """``table[t]`` cast to ``x.dtype``, shaped ``[N, 1, ..., 1]`` to broadcast against ``x``.

        ``t`` is an int64 tensor ``[N]`` on ``x``'s device (one timestep per example), or a Python
        int when every example is at the same timestep (sampling loops): then the value is a
        Python float, read from the host table, and formulas cost no per-step gather at all.
        """
        if isinstance(t, int):
            return float(getattr(self, name)[t])
        values = self.on(name, t.device)[t].to(x.dtype)
        return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))
