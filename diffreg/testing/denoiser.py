"""The exact (posterior-mean) model of a Gaussian mixture, for any process and parameterization."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffreg import registry
from diffreg.diffusion import Diffusion
from diffreg.parameterization import Parameterization
from diffreg.testing._arrays import _flat
from diffreg.testing.mixture import ClassConditionalMixture, GaussianMixture


class ExactDenoiser:
    """The optimal model for data drawn from a :class:`GaussianMixture`: ``model(x, t, **kwargs)``.

    Args:
        mixture: the data distribution.
        diffusion: the process; its ``alphas_cumprod`` gives a = abar_t. diffreg always calls a model
            with timesteps of the *original* process, also when sampling a respaced diffusion, so build
            this from the un-respaced diffusion. (A respaced diffusion is accepted too: then only
            its kept original timesteps, ``diffusion.timestep_map``, are valid.)
        mean_type: what the model outputs: ``"eps"``, ``"x0"`` or ``"v"`` (closed forms:
            eps_hat, x0_hat, v_hat = sqrt(a) eps_hat - sqrt(1 - a) x0_hat, Salimans & Ho 2022, eq. 10),
            or any other registered parameterization name or :class:`~diffreg.parameterization.Parameterization`:
            the output is its ``target(x0_hat, eps_hat, alpha, sigma)`` (the optimal prediction of
            any target linear in x0 and eps).

    Call: ``x`` ``[N, D]`` or ``[N, C, H, W]`` (flattened to D = C*H*W), any float dtype and
    device; ``t`` ``[N]`` original timesteps: int64, or float for a level between timesteps (then
    alpha and sigma follow the process's interpolation rule, :class:`~diffreg.process.DiscreteProcess`);
    keyword arguments (``y``, ...) are ignored.
    Computes in float64 and returns ``x``'s shape and dtype. Finite at abar = 0.

    Raises:
        UnknownComponentError: (on construction) a ``mean_type`` name that is not registered.
        ValueError: (on call) ``x`` without D values per example, ``t`` of the wrong shape, or a
            timestep that the diffusion does not have; TypeError: a non-integer ``t``.
    """

    def __init__(self, mixture: GaussianMixture, diffusion: Diffusion, mean_type: str | Parameterization = "eps"):
        self.mixture = mixture
        self.diffusion = diffusion
        if isinstance(mean_type, str):
            self.mean_type_name = mean_type
            self.mean_type: Parameterization = registry.create("parameterization", mean_type)
        elif isinstance(mean_type, Parameterization):
            self.mean_type_name = getattr(mean_type, "name", "") or type(mean_type).__name__
            self.mean_type = mean_type
        else:
            raise TypeError(f"mean_type must be a name or a Parameterization, got {mean_type!r}")
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._continuous = not diffusion.process.discrete
        if self._continuous:  # a continuous process: times come back from the network's time input
            return
        keep = np.asarray(diffusion.timestep_map, dtype=np.int64)
        inverse = np.full(int(keep[-1]) + 1, -1, dtype=np.int64)
        inverse[keep] = np.arange(len(keep))
        self._inverse = torch.from_numpy(inverse)

    def __repr__(self) -> str:
        if self._continuous:
            return f"ExactDenoiser({self.mixture!r}, mean_type={self.mean_type_name!r}, {self.diffusion.process!r})"
        return f"ExactDenoiser({self.mixture!r}, mean_type={self.mean_type_name!r}, T={self.diffusion.num_timesteps})"

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._tables:
            tb = self.diffusion.tables
            self._tables[key] = (
                self._inverse.to(device),
                torch.tensor(np.array(tb.sqrt_alphas_cumprod), dtype=torch.float64, device=device),
                torch.tensor(np.array(tb.sqrt_one_minus_alphas_cumprod), dtype=torch.float64, device=device),
            )
        return self._tables[key]

    def index(self, t: torch.Tensor) -> torch.Tensor:
        """Original timesteps ``t`` (int64 ``[N]``) -> indices into ``diffusion``'s tables.

        Raises:
            ValueError: a timestep the diffusion does not have.
        """
        inverse, _, _ = self._on(t.device)
        t = t.long()
        bad = (t < 0) | (t >= inverse.shape[0])
        idx = inverse[t.clamp(0, inverse.shape[0] - 1)]
        bad = bad | (idx < 0)
        if bool(bad.any()):
            first = int(t[bad][0])
            raise ValueError(
                f"ExactDenoiser got timestep {first}, which its diffusion does not have (kept original "
                f"timesteps: {self.diffusion.timestep_map[0]}..{self.diffusion.timestep_map[-1]}, "
                f"{self.diffusion.num_timesteps} of them); build the denoiser from the un-respaced diffusion"
            )
        return idx

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The optimal prediction at ``x`` (``[N, ...]``) and original timesteps ``t`` (int64 ``[N]``),
        in ``x``'s shape and dtype; ``kwargs`` are ignored. Raises ValueError / TypeError for a bad
        ``x`` or ``t``."""
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must be an int64 tensor of shape [{x.shape[0]}], got {t!r}")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must hold timesteps, got dtype {t.dtype}")
        flat = _flat(x, self.mixture.dim, "x").to(torch.float64)
        if self._continuous:  # the process's time from its network time input (its inverse)
            if not t.is_floating_point():
                raise TypeError(f"t must hold the float time input of {self.diffusion.process!r}, got dtype {t.dtype}")
            process = self.diffusion.process
            times = process.t_from_model_time(t.detach().to("cpu", torch.float64).numpy())
            a, b = process.alpha_sigma(np.clip(times, 0.0, process.t_max))
            c = torch.from_numpy(np.asarray(a, dtype=np.float64))[:, None].to(x.device)
            s = torch.from_numpy(np.asarray(b, dtype=np.float64))[:, None].to(x.device)
        elif t.is_floating_point():  # a fractional level: the process's own interpolation rule
            process = self.diffusion.process
            model_t = t.detach().to("cpu", torch.float64).numpy() / process.time_scale
            times = np.interp(model_t, self.diffusion.timestep_map, np.arange(self.diffusion.num_timesteps))
            a, b = process.alpha_sigma(times)
            c = torch.from_numpy(a)[:, None].to(x.device)
            s = torch.from_numpy(b)[:, None].to(x.device)
        else:
            idx = self.index(t.to(x.device))
            _, sqrt_a, sqrt_1ma = self._on(x.device)
            c, s = sqrt_a[idx][:, None], sqrt_1ma[idx][:, None]
        if self.mean_type.scales_input:  # the network saw a preconditioned input (EDM's c_in x)
            flat = flat / self.mean_type.scale_input(torch.ones_like(flat[:, :1]), c, s)
        x0, eps = self.mixture._posterior(flat, c, s)
        out = self.mean_type.target(x0, eps, c, s)  # the optimal prediction of any linear target
        return out.reshape(x.shape).to(x.dtype)



class ConditionalExactDenoiser(ExactDenoiser):
    """The optimal model ``model(x, t, y=...)`` for a :class:`ClassConditionalMixture`: with
    ``y[n]`` in ``0..C-1`` the exact E[. | x_t, y] (the class's components only), with
    ``y[n] == null_class`` (= C) the exact unconditional E[. | x_t] (every component); without
    ``y`` unconditional. Otherwise as :class:`ExactDenoiser`.

    Raises:
        ValueError: (on call) a label outside 0..C, besides :class:`ExactDenoiser`'s errors.
    """

    def __init__(self, mixture: ClassConditionalMixture, diffusion: Diffusion, mean_type: str | Parameterization = "eps"):
        super().__init__(mixture, diffusion, mean_type)
        self.null_class = mixture.num_classes
        self.num_classes = mixture.num_classes
        self._parts: dict[int, ExactDenoiser] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        mixture = self.mixture
        assert isinstance(mixture, ClassConditionalMixture)
        if y is None:
            return super().__call__(x, t)
        if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
            raise ValueError(f"y must be a [{x.shape[0]}] tensor of labels, got {y!r}")
        if bool(((y < 0) | (y > self.null_class)).any()):
            raise ValueError(
                f"labels must be in 0..{self.null_class} ({self.null_class}: unconditional), got {y.tolist()}"
            )
        out = torch.empty_like(x)
        for label in torch.unique(y).tolist():  # a few classes: one exact mixture per label
            rows = y == label
            if label not in self._parts:
                sub = mixture if label == self.null_class else mixture.class_mixture(label)
                self._parts[label] = ExactDenoiser(sub, self.diffusion, self.mean_type)
            out[rows] = self._parts[label](x[rows], t[rows])
        return out
