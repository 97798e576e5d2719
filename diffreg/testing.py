"""Testing kit for plugin authors: an exact denoiser, an exact ODE reference, conformance checks.

Data whose distribution is a mixture of isotropic Gaussians has a closed-form optimal denoiser at
every noise level, so a plugin can be tested against exact answers instead of a trained network:

- :class:`GaussianMixture`: the data distribution; :meth:`GaussianMixture.denoiser` is a model
  (``model(x, t, **kwargs)``) that predicts eps, x0 or v exactly for any :class:`~diffreg.Diffusion`.
- :func:`exact_ode_solution`: the probability-flow ODE solved to ~1e-10, the limit a deterministic
  sampler reaches as its number of steps grows.
- :func:`sliced_wasserstein`: a distance between two sample sets.
- Conformance checks a plugin's own tests call: :func:`check_schedule`,
  :func:`check_parameterization`, :func:`check_sampler`, :func:`check_loss`. Each raises
  ``AssertionError`` with a message naming what failed, and passes for every built-in.

Conventions: ``a = abar_t = alphas_cumprod[t]``; the forward process is
x_t = sqrt(a) x0 + sqrt(1 - a) eps (Ho et al. 2020, eq. 4); its variance-exploding form is
x_tilde = x_t / sqrt(a) = x0 + sigma eps with sigma = sqrt((1 - a) / a) (Song et al. 2021,
"Score-based generative modeling through SDEs"; Karras et al. 2022, "Elucidating the design
space", section 2). All the mixture mathematics runs in float64.

``scipy`` (a test dependency of diffreg) is needed only by :func:`exact_ode_solution` and
:func:`check_sampler`.

The checks resolve names in the process-wide registry (:mod:`diffreg.registry`): register a plugin
under test with ``diffreg.registry.plugin(obj)`` (or the ``register_plugin`` fixture) or install it.
The opt-in pytest fixtures live in :mod:`diffreg.pytest_plugin`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import torch

from diffreg import registry
from diffreg.diffusion import Diffusion
from diffreg.loss import Loss
from diffreg.parameterization import MeanType, ModelParameterization
from diffreg.sampling import Sampler
from diffreg.schedule import NoiseSchedule, spaced_timesteps

__all__ = [
    "ClassConditionalMixture",
    "ConditionalExactDenoiser",
    "ExactDenoiser",
    "GaussianMixture",
    "SamplerReport",
    "check_loss",
    "check_parameterization",
    "check_sampler",
    "check_schedule",
    "exact_ode_solution",
    "sliced_wasserstein",
]



def _as_float64(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float64)
    try:
        return torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"GaussianMixture {name} must be numbers, got {value!r}") from exc


def _flat(x: torch.Tensor, dim: int, what: str) -> torch.Tensor:
    """``x`` ``[N, ...]`` as ``[N, dim]`` (ValueError naming ``what`` when the sizes disagree)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(x).__name__}")
    if x.ndim < 1 or (x.ndim == 1 and dim != 1):
        raise ValueError(f"{what} must have shape [N, ...] with {dim} values per example, got {tuple(x.shape)}")
    n = x.shape[0]
    per = int(np.prod(x.shape[1:])) if x.ndim > 1 else 1
    if per != dim:
        raise ValueError(
            f"{what} has shape {tuple(x.shape)}: {per} values per example, but the mixture is {dim}-dimensional"
        )
    return x.reshape(n, dim)


def _per_example(value: float | torch.Tensor, n: int, device: torch.device, what: str) -> torch.Tensor:
    """A float or a ``[N]`` tensor as a float64 ``[N, 1]`` column on ``device``."""
    v = torch.as_tensor(value, dtype=torch.float64, device=device)
    if v.ndim == 0:
        v = v.expand(n)
    if v.shape != (n,):
        raise ValueError(f"{what} must be a number or have shape [{n}], got {tuple(v.shape)}")
    return v.to(device=device, dtype=torch.float64).reshape(n, 1)


class GaussianMixture:
    """A mixture of isotropic Gaussians in D dimensions: p(x0) = sum_k w_k N(x0; mu_k, s_k^2 I).

    Its optimal denoiser is known in closed form at every noise level (see :meth:`denoise`), which
    makes it the data distribution of the conformance checks.

    Args:
        weights: ``[K]`` positive mixture weights (normalized to sum to 1).
        means: ``[K, D]`` component means mu_k.
        stds: ``[K]`` positive isotropic standard deviations s_k.

    All three are stored as float64 CPU tensors (attributes ``weights``, ``means``, ``stds``);
    computations move them to the input's device.

    Raises:
        ValueError: wrong shapes, non-finite values, weights or stds that are not positive.
        TypeError: values that are not numbers.
    """

    def __init__(self, weights: Any, means: Any, stds: Any):
        w = _as_float64(weights, "weights")
        mu = _as_float64(means, "means")
        s = _as_float64(stds, "stds")
        if w.ndim != 1 or w.shape[0] < 1:
            raise ValueError(f"GaussianMixture weights must have shape [K] with K >= 1, got {tuple(w.shape)}")
        k = w.shape[0]
        if mu.ndim != 2 or mu.shape[0] != k or mu.shape[1] < 1:
            raise ValueError(f"GaussianMixture means must have shape [K={k}, D], got {tuple(mu.shape)}")
        if s.shape != (k,):
            raise ValueError(f"GaussianMixture stds must have shape [K={k}], got {tuple(s.shape)}")
        for name, value in (("weights", w), ("means", mu), ("stds", s)):
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"GaussianMixture {name} must be finite, got {value.tolist()}")
        if not bool((w > 0).all()):
            raise ValueError(f"GaussianMixture weights must be > 0, got {w.tolist()}")
        if not bool((s > 0).all()):
            raise ValueError(f"GaussianMixture stds must be > 0, got {s.tolist()}")
        self.weights = w / w.sum()
        self.means = mu
        self.stds = s
        self._log_weights = self.weights.log()
        self._on: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def example(cls, dim: int = 2) -> GaussianMixture:
        """A fixed 3-component mixture in ``dim`` dimensions with means in [-0.7, 0.7] and stds
        0.15-0.25: the data of :func:`check_sampler` and the ``gaussian_mixture`` fixture.

        Raises:
            ValueError: ``dim < 1``.
        """
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if dim == 2:
            means = [[-0.5, -0.3], [0.55, 0.4], [0.0, 0.7]]
        else:
            gen = torch.Generator().manual_seed(1000 + dim)
            means = (torch.rand(3, dim, generator=gen, dtype=torch.float64) * 1.4 - 0.7).tolist()
        return cls([0.45, 0.35, 0.2], means, [0.2, 0.15, 0.25])

    @property
    def dim(self) -> int:
        """D, the dimension of the data."""
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        """K, the number of components."""
        return int(self.weights.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        """The mixture's mean sum_k w_k mu_k, float64 ``[D]`` (E[x0], also E[x0 | x_t] at abar = 0)."""
        return self.weights @ self.means

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, D={self.dim})"

    def _params(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = str(device)
        cached = self._on.get(key)
        if cached is None:
            cached = (self._log_weights.to(device), self.means.to(device), self.stds.to(device))
            self._on[key] = cached
        return cached

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` independent draws, float64 ``[n, D]`` on the CPU.

        A component k ~ Categorical(w), then x0 = mu_k + s_k z with z ~ N(0, I). ``generator`` (a CPU
        ``torch.Generator``) makes the draw reproducible.

        Raises:
            ValueError: ``n < 0``.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator) if n else torch.zeros(0).long()
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x), float64 ``[N]`` on ``x``'s device, for ``x`` of shape ``[N, D]`` (or ``[N, ...]``
        with D values per example): logsumexp_k (log w_k + log N(x; mu_k, s_k^2 I)).

        Raises:
            ValueError: ``x`` without D values per example.
        """
        flat = _flat(x, self.dim, "x").to(torch.float64)
        log_w, mu, s = self._params(flat.device)
        sq = ((flat[:, None, :] - mu[None]) ** 2).sum(-1)  # [N, K]
        var = s**2
        log_n = -0.5 * self.dim * torch.log(2 * math.pi * var) - 0.5 * sq / var
        return torch.logsumexp(log_w + log_n, dim=1)

    def _posterior(self, x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[x0 | x], E[eps | x]) for x = c x0 + s eps, x0 ~ this mixture, eps ~ N(0, I).

        ``x`` float64 ``[N, D]``; ``c``, ``s`` float64 ``[N, 1]`` (or ``[1, 1]``), not both 0.
        Given component k, x ~ N(c mu_k, (c^2 s_k^2 + s^2) I); by Gaussian conditioning
        E[x0 | x, k] = mu_k + c s_k^2 / var_k (x - c mu_k) and E[eps | x, k] = s / var_k (x - c mu_k)
        (no cancellation, finite at c = 0 and at s = 0). Responsibilities are normalized in log
        space.
        """
        log_w, mu, std = self._params(x.device)
        diff = x[:, None, :] - c[:, :, None] * mu[None]  # [N, K, D]
        var = c**2 * std[None] ** 2 + s**2  # [N, K]
        logits = log_w[None] - 0.5 * self.dim * torch.log(var) - 0.5 * (diff**2).sum(-1) / var
        r = torch.softmax(logits, dim=1)  # logsumexp-normalized responsibilities, [N, K]
        x0 = r @ mu + ((r * c * std[None] ** 2 / var)[:, :, None] * diff).sum(1)
        eps = ((r * s / var)[:, :, None] * diff).sum(1)
        return x0, eps

    def denoise(self, x_t: torch.Tensor, alpha_bar: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimal (MMSE) predictions at x_t = sqrt(a) x0 + sqrt(1 - a) eps, a = ``alpha_bar``.

        x0_hat = E[x0 | x_t] = sum_k r_k(x_t) (mu_k + sqrt(a) s_k^2 / (a s_k^2 + 1 - a) (x_t - sqrt(a) mu_k)),
        with responsibilities r_k from the marginals N(sqrt(a) mu_k, (a s_k^2 + 1 - a) I) (Bishop 2006,
        "Pattern Recognition and Machine Learning", eqs. 2.116 and 9.13), and
        eps_hat = E[eps | x_t] = (x_t - sqrt(a) x0_hat) / sqrt(1 - a), computed per component without
        cancellation. At a = 0 (zero terminal SNR) x0_hat = sum_k w_k mu_k and eps_hat = x_t; at
        a = 1, x0_hat = x_t and eps_hat = 0.

        Args:
            x_t: ``[N, D]`` or ``[N, ...]`` with D values per example, any float dtype and device.
            alpha_bar: a float or a ``[N]`` tensor of values in [0, 1].

        Returns:
            ``(x0_hat, eps_hat)``, float64, ``x_t``'s shape and device.

        Raises:
            ValueError: a shape mismatch, or ``alpha_bar`` outside [0, 1].
        """
        flat = _flat(x_t, self.dim, "x_t").to(torch.float64)
        a = _per_example(alpha_bar, flat.shape[0], flat.device, "alpha_bar")
        if not bool(((a >= 0) & (a <= 1)).all()):
            raise ValueError(f"alpha_bar must lie in [0, 1], got {a.flatten().tolist()}")
        x0, eps = self._posterior(flat, a.sqrt(), (1 - a).sqrt())
        return x0.reshape(x_t.shape), eps.reshape(x_t.shape)

    def _ve(self, x_tilde: torch.Tensor, sigma: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = _flat(x_tilde, self.dim, "x_tilde").to(torch.float64)
        sig = _per_example(sigma, flat.shape[0], flat.device, "sigma")
        if not bool((sig >= 0).all()):  # NaN fails too
            raise ValueError(f"sigma must be >= 0 (inf allowed), got {sig.flatten().tolist()}")
        # x_t = c x_tilde with c = 1/sqrt(1 + sigma^2), s = sigma c: exact at sigma = 0 and sigma = inf
        c = 1.0 / torch.sqrt(1.0 + sig**2)
        s = 1.0 / torch.sqrt(1.0 + sig ** (-2.0))
        x0, eps = self._posterior(c * flat, c, s)
        return x0.reshape(x_tilde.shape), eps.reshape(x_tilde.shape)

    def x0_at_sigma(self, x_tilde: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """E[x0 | x_tilde] in the variance-exploding form x_tilde = x0 + sigma eps (Karras et al.
        2022, "Elucidating the design space of diffusion-based generative models", section 2: the
        ideal denoiser D(x; sigma)); equal to :meth:`denoise` at x_t = x_tilde / sqrt(1 + sigma^2),
        a = 1 / (1 + sigma^2).

        Args:
            x_tilde: ``[N, D]`` (or ``[N, ...]``), any float dtype.
            sigma: a float or ``[N]`` tensor >= 0; ``inf`` gives the mixture mean.

        Returns:
            float64 tensor of ``x_tilde``'s shape.

        Raises:
            ValueError: a shape mismatch or a negative / NaN sigma.
        """
        return self._ve(x_tilde, sigma)[0]

    def eps_at_sigma(self, x_tilde: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """E[eps | x_tilde] = (x_tilde - D(x_tilde; sigma)) / sigma for x_tilde = x0 + sigma eps:
        the right-hand side of the probability-flow ODE d x_tilde / d sigma = eps_hat (Karras et al.
        2022, eq. 1 with eq. 3 and sigma(t) = t). 0 at sigma = 0 and at sigma = inf.

        Args / Returns / Raises: as :meth:`x0_at_sigma`.
        """
        return self._ve(x_tilde, sigma)[1]

    def denoiser(self, diffusion: Diffusion, mean_type: str | MeanType = "eps") -> ExactDenoiser:
        """An exact model for ``diffusion``: see :class:`ExactDenoiser`.

        Build it from the *un-respaced* diffusion (the model is called with original timesteps);
        a respaced one works too, for its kept timesteps only.
        """
        return ExactDenoiser(self, diffusion, mean_type)


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
            or any other registered parameterization name or :class:`~diffreg.parameterization.MeanType`:
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

    def __init__(self, mixture: GaussianMixture, diffusion: Diffusion, mean_type: str | MeanType = "eps"):
        self.mixture = mixture
        self.diffusion = diffusion
        if isinstance(mean_type, str):
            self.mean_type_name = mean_type
            self.mean_type: MeanType = registry.create("parameterization", mean_type)
        elif isinstance(mean_type, MeanType):
            self.mean_type_name = getattr(mean_type, "name", "") or type(mean_type).__name__
            self.mean_type = mean_type
        else:
            raise TypeError(f"mean_type must be a name or a MeanType, got {mean_type!r}")
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


# -- a class-conditional mixture (exact conditional and unconditional denoisers) -------------------


class ClassConditionalMixture(GaussianMixture):
    """A :class:`GaussianMixture` whose components are grouped into classes: p(x0 | y) is the
    mixture of class y's components (their weights renormalized), p(y) the sum of their weights,
    and p(x0) = sum_y p(y) p(x0 | y) the full mixture. Both the conditional denoiser E[x0 | x_t, y]
    and the unconditional E[x0 | x_t] are exact (:meth:`denoiser`), which makes it the data of the
    guidance tests and benchmark.

    Args:
        weights, means, stds: as :class:`GaussianMixture`.
        classes: ``[K]`` the class (0..C-1) of each component; every class has a component.

    Raises:
        ValueError: as :class:`GaussianMixture`; ``classes`` of the wrong length, or a class
            without components.
    """

    def __init__(self, weights: Any, means: Any, stds: Any, classes: Sequence[int]):
        super().__init__(weights, means, stds)
        cls = torch.as_tensor(list(classes), dtype=torch.long)
        if cls.shape != (self.num_components,) or (cls < 0).any():
            raise ValueError(f"classes must give a class >= 0 for each of the {self.num_components} components, got {list(classes)}")
        self.num_classes = int(cls.max()) + 1
        missing = sorted(set(range(self.num_classes)) - set(cls.tolist()))
        if missing:
            raise ValueError(f"classes {missing} have no component (classes must be 0..C-1): {list(classes)}")
        self.classes = cls
        #: [C, K] boolean membership
        self.membership = cls[None, :] == torch.arange(self.num_classes)[:, None]
        #: p(y), float64 [C]
        self.class_prior = (self.membership.double() * self.weights[None]).sum(1)

    @classmethod
    def example(cls, dim: int = 2) -> ClassConditionalMixture:  # type: ignore[override]
        """Three classes in 2-D (6 components, 2 per class, overlapping across classes): the data
        of the guidance benchmark. Raises ValueError for ``dim != 2``."""
        if dim != 2:
            raise ValueError(f"ClassConditionalMixture.example is 2-D, got dim={dim}")
        means = [[-0.6, -0.2], [-0.2, 0.5], [0.3, -0.5], [0.65, 0.05], [0.1, 0.2], [-0.45, 0.65]]
        return cls([0.2, 0.15, 0.2, 0.15, 0.15, 0.15], means, [0.18, 0.15, 0.2, 0.15, 0.22, 0.12], [0, 0, 1, 1, 2, 2])

    def class_mixture(self, y: int) -> GaussianMixture:
        """p(x0 | y) as a :class:`GaussianMixture`. Raises ValueError for an unknown class."""
        if not 0 <= int(y) < self.num_classes:
            raise ValueError(f"class y must be in 0..{self.num_classes - 1}, got {y!r}")
        keep = self.membership[int(y)]
        return GaussianMixture(self.weights[keep], self.means[keep], self.stds[keep])

    def log_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """log p(y | x) of clean data, float64 ``[N, C]`` (Bayes' rule over the components:
        the class's components' responsibilities summed in log space).

        Raises:
            ValueError: ``x`` without D values per example.
        """
        flat = _flat(x, self.dim, "x").to(torch.float64)
        log_w, mu, s = self._params(flat.device)
        var = s**2
        log_n = -0.5 * self.dim * torch.log(2 * math.pi * var) - 0.5 * ((flat[:, None] - mu[None]) ** 2).sum(-1) / var
        joint = log_w + log_n  # [N, K]
        member = self.membership.to(flat.device)
        per_class = torch.where(member[None], joint[:, None, :], torch.tensor(-math.inf, dtype=torch.float64, device=flat.device))
        per_class = torch.logsumexp(per_class, dim=2)  # [N, C]
        return per_class - torch.logsumexp(joint, dim=1, keepdim=True)

    def denoiser(self, diffusion: Diffusion, mean_type: str | MeanType = "eps") -> ConditionalExactDenoiser:  # type: ignore[override]
        """An exact class-conditional model for ``diffusion``: see :class:`ConditionalExactDenoiser`."""
        return ConditionalExactDenoiser(self, diffusion, mean_type)


class ConditionalExactDenoiser(ExactDenoiser):
    """The optimal model ``model(x, t, y=...)`` for a :class:`ClassConditionalMixture`: with
    ``y[n]`` in ``0..C-1`` the exact E[. | x_t, y] (the class's components only), with
    ``y[n] == null_class`` (= C) the exact unconditional E[. | x_t] (every component); without
    ``y`` unconditional. Otherwise as :class:`ExactDenoiser`.

    Raises:
        ValueError: (on call) a label outside 0..C, besides :class:`ExactDenoiser`'s errors.
    """

    def __init__(self, mixture: ClassConditionalMixture, diffusion: Diffusion, mean_type: str | MeanType = "eps"):
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
            raise ValueError(f"labels must be in 0..{self.null_class} ({self.null_class}: unconditional), got {y.tolist()}")
        out = torch.empty_like(x)
        for label in torch.unique(y).tolist():  # a few classes: one exact mixture per label
            rows = y == label
            if label not in self._parts:
                sub = mixture if label == self.null_class else mixture.class_mixture(label)
                self._parts[label] = ExactDenoiser(sub, self.diffusion, self.mean_type)
            out[rows] = self._parts[label](x[rows], t[rows])
        return out


# -- the exact probability-flow ODE ---------------------------------------------------------------


def exact_ode_solution(
    mixture: GaussianMixture,
    diffusion: Diffusion,
    x_T: torch.Tensor,
    t_start: float | None = None,
    *,
    t_end: float | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """The exact solution of the probability-flow ODE from ``x_T`` at timestep ``t_start`` to data
    (or to the state at timestep ``t_end``).

    The ODE is Song et al. 2021 ("Score-based generative modeling through SDEs", eq. 13); in the
    variance-exploding form d x_tilde / d sigma = eps_hat(x_tilde, sigma) (Karras et al. 2022, eq. 1
    with eq. 3, sigma(t) = t), with x_tilde = x_t / sqrt(a), sigma = sqrt((1 - a) / a). It is solved
    after the change of variables sigma = tan(theta), x_t = cos(theta) x_tilde (so
    x_t = cos(theta) x0 + sin(theta) eps), which turns it into

        d x_t / d theta = v_hat(x_t, theta) = cos(theta) eps_hat - sin(theta) x0_hat

    (Salimans & Ho 2022, section 4: the angular parameterization, whose velocity is v), from
    theta_start = arccos(sqrt(abar[t_start])) down to theta = 0, where x_t = x0 (or down to
    theta_end = arccos(sqrt(abar[t_end])), where the state is x_{t_end}). Both ends are regular:
    sigma = inf (zero terminal SNR, abar = 0) is simply theta = pi / 2, where v_hat = -E[x0], so no
    large-sigma cut-off or special first step is needed. Solved with
    ``scipy.integrate.solve_ivp(method="DOP853")``.

    Any process x = alpha x0 + sigma eps (rectified flow, EDM, continuous VP: a
    :class:`~diffreg.continuous.ContinuousDiffusion`) has the same ODE in its VE form (it depends
    on alpha and sigma only through sigma / alpha), so it is solved the same way on the scaled
    state x / r, r = sqrt(alpha^2 + sigma^2) = r (cos(theta) x0 + sin(theta) eps) with
    theta = atan2(sigma, alpha), and scaled back by the end level's r.

    Args:
        mixture: the data distribution (the exact denoiser is its posterior mean).
        diffusion: gives abar at ``t_start``; un-respaced (or respaced, if ``t_start`` is kept);
            or a continuous diffusion, whose process gives alpha and sigma at any time.
        x_T: ``[N, D]`` or ``[N, ...]`` with D values per example: the state at ``t_start``.
        t_start: an original timestep of ``diffusion`` (default: its last, as in sampling); a
            float time of a continuous process (default: its ``t_max``).
        t_end: a timestep (time) below ``t_start`` to stop at (default: none, integrate to
            sigma = 0 and return data).
        rtol, atol: solver tolerances, at most 1e-9.

    Returns:
        x0 (or x_{t_end}, in the same variance-preserving scale as ``x_T``), float64, ``x_T``'s
        shape (``[N, D]`` for ``[N, D]`` input), on ``x_T``'s device.

    Raises:
        ValueError: a shape mismatch, an unknown ``t_start`` or ``t_end``, ``t_end >= t_start``,
            tolerances above 1e-9.
        RuntimeError: the solver failed.
        ImportError: scipy is not installed.
    """
    from scipy.integrate import solve_ivp

    if not (0 < rtol <= 1e-9 and 0 < atol <= 1e-9):
        raise ValueError(f"rtol and atol must be in (0, 1e-9], got {rtol} and {atol}")
    flat = _flat(x_T, mixture.dim, "x_T").detach().to(device="cpu", dtype=torch.float64)
    n, dim = flat.shape
    process = diffusion.process
    continuous = not process.discrete
    if t_start is None:
        t_start = process.t_max if continuous else int(diffusion.timestep_map[-1])
    lookup = None if continuous else ExactDenoiser(mixture, diffusion)

    def angle(t: float) -> tuple[float, float]:
        """theta = atan2(sigma, alpha) and the scale r = sqrt(alpha^2 + sigma^2) at time t."""
        if continuous:
            a, b = (float(v[0]) for v in process.alpha_sigma(np.array([float(t)])))
        else:
            assert lookup is not None
            abar = float(diffusion.alphas_cumprod[int(lookup.index(torch.tensor([int(t)]))[0])])
            a, b = math.sqrt(abar), math.sqrt(max(1.0 - abar, 0.0))
        return math.atan2(b, a), math.hypot(a, b)

    theta_start, r_start = angle(t_start)
    theta_end, r_end = 0.0, 1.0
    if t_end is not None:
        if not t_end < t_start:
            raise ValueError(f"t_end must be below t_start, got t_end={t_end} and t_start={t_start}")
        theta_end, r_end = angle(t_end)
    flat = flat / r_start  # x = r (cos(theta) x0 + sin(theta) eps) for any process
    if theta_start == theta_end or n == 0:
        return (flat * r_end).reshape(x_T.shape).to(x_T.device)

    def velocity(theta: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(y).reshape(n, dim)
        c = torch.tensor([[math.cos(theta)]], dtype=torch.float64)
        s = torch.tensor([[math.sin(theta)]], dtype=torch.float64)
        x0, eps = mixture._posterior(x, c, s)
        return (c * eps - s * x0).reshape(-1).numpy()

    sol = solve_ivp(velocity, (theta_start, theta_end), flat.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"exact_ode_solution: the ODE solver failed: {sol.message}")
    out = torch.from_numpy(np.ascontiguousarray(sol.y[:, -1])).reshape(x_T.shape) * r_end
    return out.to(x_T.device)


# -- distances --------------------------------------------------------------------------------------


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, projections: int = 128, generator: torch.Generator | None = None
) -> float:
    """The sliced 2-Wasserstein distance between two empirical distributions:
    SW_2(a, b) = sqrt(mean_theta W_2^2(theta . a, theta . b)) over ``projections`` directions theta
    uniform on the unit sphere, with the 1-D W_2 computed exactly from sorted projections
    (Rabin et al. 2011, "Wasserstein barycenter and its application to texture mixing";
    Bonneel et al. 2015, "Sliced and Radon Wasserstein barycenters of measures").

    Args:
        a: ``[n, ...]`` samples; b: ``[m, ...]`` samples with the same values per example (n and m
            may differ: then the quantile functions are compared on the merged grid of levels).
        projections: number of random directions (>= 1).
        generator: a CPU ``torch.Generator`` for the directions (default: a fixed seed, 0).

    Returns:
        A Python float >= 0 (computed in float64), in the units of the data.

    Raises:
        ValueError: empty inputs, mismatched dimensions, ``projections < 1``.
    """
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    if a.ndim < 1 or b.ndim < 1 or a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"need non-empty sample sets, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    xa = a.detach().reshape(a.shape[0], -1).to(device="cpu", dtype=torch.float64)
    xb = b.detach().reshape(b.shape[0], -1).to(device="cpu", dtype=torch.float64)
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(f"samples differ in dimension: {tuple(a.shape)} vs {tuple(b.shape)}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    directions = torch.randn(projections, xa.shape[1], generator=gen, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    pa = (xa @ directions.T).sort(dim=0).values  # [n, P]
    pb = (xb @ directions.T).sort(dim=0).values  # [m, P]
    return float(_sorted_w2(pa, pb).mean().sqrt())


def _sorted_w2(pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
    """W_2^2 per column between 1-D empirical distributions given sorted samples ``[n, P]``,
    ``[m, P]``: the integral over u in (0, 1) of (F_a^-1(u) - F_b^-1(u))^2, exact for step quantile
    functions."""
    n, m = pa.shape[0], pb.shape[0]
    if m % n == 0:
        return ((pa.repeat_interleave(m // n, dim=0) - pb) ** 2).mean(dim=0)
    if n % m == 0:
        return ((pa - pb.repeat_interleave(n // m, dim=0)) ** 2).mean(dim=0)
    levels = (
        torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n, torch.arange(1, m + 1, dtype=torch.float64) / m])
        .sort()
        .values
    )
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mid = levels - widths / 2
    ia = torch.clamp((mid * n).floor().long(), max=n - 1)
    ib = torch.clamp((mid * m).floor().long(), max=m - 1)
    return (widths[:, None] * (pa[ia] - pb[ib]) ** 2).sum(dim=0)


# -- conformance checks ----------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    raise AssertionError(message)


def _linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    return np.asarray(registry.create("schedule", "diffreg:linear", num_timesteps).betas)


def _diffusion(
    betas: np.ndarray, mean_type: str | MeanType = "eps", variance: str = "fixed_small", loss: str | Loss = "mse"
) -> Diffusion:
    mt = registry.create("parameterization", f"diffreg:{mean_type}") if isinstance(mean_type, str) else mean_type
    vt = registry.create("variance", f"diffreg:{variance}")
    ls = registry.create("loss", f"diffreg:{loss}") if isinstance(loss, str) else loss
    return Diffusion(betas, ModelParameterization(mt, vt), ls)


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


def check_parameterization(
    name: str,
    /,
    *,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    **options: Any,
) -> None:
    """Check a mean type (kind ``parameterization``) against the contract of
    :class:`~diffreg.parameterization.MeanType`.

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
    if not isinstance(mean_type, MeanType):
        _fail(f"{where}: the factory returned {type(mean_type).__name__}, not a diffreg.parameterization.MeanType")
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


def _declared(instance: Any, metadata: Mapping[str, Any], key: str) -> Any:
    """``key`` from the instance or a class below :class:`Sampler`, else the registration metadata."""
    if key in vars(instance) or any(key in vars(cls) for cls in type(instance).__mro__ if cls not in (Sampler, object)):
        return getattr(instance, key)
    return metadata.get(key)


@dataclass
class SamplerReport:
    """What :func:`check_sampler` measured.

    Attributes:
        name: the sampler; order, nfe_per_step, stochastic: as declared.
        steps: step counts of the convergence study (deterministic samplers).
        stop_timestep: the timestep every one of those grids visits, where ``errors`` is measured.
        errors: RMS distance of the state at ``stop_timestep`` to :func:`exact_ode_solution`
            (``t_end=stop_timestep``), per step count (float64 runs).
        slope: the fitted convergence order of ``errors``, -d log(error) / d log(steps).
        final_errors, final_slope: the same for the final samples against the exact solution at
            sigma = 0.
        model_calls: model evaluations in a run of ``steps[0]`` steps (at most
            ``steps[0] * nfe_per_step``).
        swd: sliced Wasserstein distance of the samples to the data (stochastic samplers), and
            ``swd_reference``: the same distance for an independent data set of the same size.
    """

    name: str
    order: float
    nfe_per_step: int
    stochastic: bool
    steps: list[int] = field(default_factory=list)
    stop_timestep: int | None = None
    errors: list[float] = field(default_factory=list)
    slope: float | None = None
    final_errors: list[float] = field(default_factory=list)
    final_slope: float | None = None
    model_calls: int | None = None
    swd: float | None = None
    swd_reference: float | None = None


def _slope(steps: Sequence[int], errors: Sequence[float]) -> float:
    return -float(np.polyfit(np.log(np.asarray(steps, dtype=np.float64)), np.log(np.asarray(errors)), 1)[0])


def check_sampler(
    name: str,
    /,
    *,
    expected_order: float | None = None,
    order_tolerance: float = 0.3,
    convergence_steps: Sequence[int] | None = None,
    max_error: float = 0.05,
    distribution_steps: int = 100,
    distribution_samples: int = 10000,
    swd_threshold: float = 0.045,
    device: str | torch.device = "cpu",
    process: str | Mapping[str, Any] | None = None,
    parameterization: str = "eps",
    grid: Any = None,
    **options: Any,
) -> SamplerReport:
    """Check a sampler (kind ``sampler``) with the exact model of a 2-D :class:`GaussianMixture`
    (:meth:`GaussianMixture.example`) on a linear T = 1000 process, trailing spacing, no clipping.

    - It is a :class:`~diffreg.Sampler` declaring ``order`` (> 0), ``nfe_per_step`` (int >= 1) and
      ``stochastic`` (bool), each on its class or instance (other than :class:`~diffreg.Sampler`'s
      defaults) or else as registration metadata (non-bool metadata such as DDIM's
      ``"when eta > 0"`` leaves ``stochastic`` to the instance); it calls the model at most
      ``steps * nfe_per_step`` times.
    - Shapes ``[N, D]`` and ``[N, C, H, W]``: float32 samples of that shape on ``device``, finite;
      the image-shaped run equals the flat run reshaped; the same noise and generator give identical
      samples; the eps, x0 and v parameterizations give the same samples (to 1e-3).
    - Deterministic samplers, run in float64 from the same x_T (64 points): the state at
      ``stop_timestep`` (the smallest timestep > 0 that every grid of ``convergence_steps`` visits:
      99 for the default 10, 20, 40, 80) is compared with :func:`exact_ode_solution`; the RMS error
      must shrink with slope (least-squares fit of log error against log steps) >= declared order -
      ``order_tolerance``. The final samples are compared with the exact solution at sigma = 0:
      their error must shrink with slope >= min(order, 1) - ``order_tolerance`` and be below
      ``max_error`` at the most steps. (The last step, from t ~ T/N to data, is where sigma ~ sqrt(t)
      makes every sampler first order on a uniform grid of t, hence the intermediate stop for the
      order.) Calibration: DDIM measures slope 1.00 (final 0.94, final error 0.014 at 80 steps);
      second-order Heun (Karras et al. 2022, Algorithm 1) 2.12, DPM-Solver++(2M) 1.88, UniPC 2.28;
      DDIM with its x_t coefficient 1 % off -1.2; DDIM declaring order 2 fails at 1.00.
    - Stochastic samplers: ``distribution_samples`` samples after ``distribution_steps`` steps must
      lie within sliced Wasserstein distance ``swd_threshold`` (:func:`sliced_wasserstein`) of
      max(20000, 2 n) data samples. Calibration (10000 samples, 100 steps): DDPM and DDIM(eta=1)
      0.021 (0.021-0.026 over seeds; 0.035-0.037 at 50 steps); an independent data set of 10000:
      0.011 on average, 0.023 at most over 60 seeds; DDPM with its noise scaled by 1.5: 0.07-0.08,
      by 2: 0.16. (With 2000 samples the data-vs-data distance alone reaches 0.05: too noisy.)

    - ``process=``: another process instead of the linear T = 1000 one, as a ``schedule`` config
      (a name or ``{"name": ..., **options}``, e.g. ``"rectified_flow"`` or ``{"name": "edm"}``);
      the exact model then predicts in ``parameterization`` form (e.g. ``"flow"`` or ``"edm"``),
      the other parameterizations the process accepts must give the same samples, x_T is drawn
      with the process's ``prior_std``, and the levels are ``grid``'s (default ``trailing``).
      Where the grids of ``convergence_steps`` share no intermediate level (e.g. ``karras``), the
      declared order is checked on the final samples.

    Keyword arguments other than those listed are the sampler's options (for example ``eta``).

    Args:
        name: a registered sampler name (bare or ``plugin:name``).
        expected_order: overrides the declared order.
        convergence_steps: at least 2 step counts, each grid sharing a timestep > 0 with the others
            (multiples of the smallest do). Default: chosen from the declared order: 10, 20, 40, 80
            below order 2.5; 40, 80, 160, 320 from order 2.5 on, where the lower-order warm-up
            steps of a multistep solver (its first steps, one order less each) would otherwise
            dominate the error at 10-80 steps. Calibration: DEIS (tAB3) measures 2.54 at 10-80 and
            2.87 at 40-320, DPM-Solver++(3M) 2.32 and 2.94, DPM-Solver-3 (single step) 2.82 at 10-80.
        device: where to sample (the exact model follows the data's device).

    Returns:
        A :class:`SamplerReport` with the measured numbers.

    Raises:
        AssertionError: naming the sampler and what failed (also when sampling raised).
        ValueError: ``convergence_steps`` without a shared timestep.
        ImportError: scipy (needed for the ODE reference) is not installed.
    """
    where = f"sampler {name!r}" + (f" with options {options}" if options else "")
    try:
        component = registry.get("sampler", name)
        instance = registry.create("sampler", name, **options)
    except Exception as exc:
        raise AssertionError(f"{where}: building it raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(instance, Sampler):
        _fail(f"{where}: the factory returned {type(instance).__name__}, not a diffreg.Sampler")
    order = expected_order if expected_order is not None else _declared(instance, component.metadata, "order")
    nfe = _declared(instance, component.metadata, "nfe_per_step")
    if isinstance(order, bool) or not isinstance(order, (int, float)) or not order > 0:
        _fail(f"{where}: declares no valid `order` (a number > 0 as a class attribute or metadata), got {order!r}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        _fail(f"{where}: declares no valid `nfe_per_step` (an int >= 1), got {nfe!r}")
    stochastic = _declared(instance, component.metadata, "stochastic")
    if not isinstance(stochastic, bool):  # metadata such as "when eta > 0": the instance decides
        stochastic = getattr(instance, "stochastic", None)
    if not isinstance(stochastic, bool):
        _fail(f"{where}: declares no boolean `stochastic` (instance attribute or metadata), got {stochastic!r}")
    report = SamplerReport(str(name), float(order), int(nfe), bool(stochastic))
    device = torch.device(device)
    T = 1000
    if process is None:
        betas = _linear_betas(T)
        bases = {m: _diffusion(betas, m) for m in ("eps", "x0", "v")}
        main = "eps"
    else:
        bases = {}
        for m in dict.fromkeys((parameterization, "eps", "x0", "v", "flow", "edm")):
            try:
                bases[m] = Diffusion.from_config({"schedule": process, "parameterization": m})
            except ValueError:
                if m == parameterization:
                    raise
        main = parameterization
    the_process = bases[main].process
    t_top = the_process.t_max
    prior_std = float(getattr(the_process, "prior_std", 1.0))
    grid_kw: dict[str, Any] = {"spacing": "trailing"} if process is None and grid is None else {"grid": grid}
    mixture = GaussianMixture.example(2)

    def run(
        mean_type: str,
        shape: Sequence[int],
        steps: int,
        seed: int,
        dtype: torch.dtype = torch.float32,
        mix: GaussianMixture = mixture,
        callback: Callable[..., None] | None = None,
        calls: list[int] | None = None,
    ) -> torch.Tensor:
        base = bases[mean_type]
        gen = torch.Generator().manual_seed(seed)
        noise = (torch.randn(tuple(shape), generator=gen, dtype=dtype) * prior_std).to(device)
        exact = mix.denoiser(base, mean_type)

        def model(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if calls is not None:
                calls.append(int(t[0]))
            return exact(x, t, **kwargs)

        try:
            return base.sample(
                model,
                tuple(shape),
                sampler=name,
                steps=steps,
                noise=noise,
                generator=gen,
                clip_denoised=False,
                dtype=dtype,
                callback=callback,
                **grid_kw,
                **options,
            )
        except Exception as exc:
            raise AssertionError(
                f"{where}: sampling {list(shape)} ({mean_type} parameterization, {steps} steps, {dtype}) raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    if convergence_steps is None:
        convergence_steps = (10, 20, 40, 80) if order < 2.5 else (40, 80, 160, 320)
    steps_list = sorted({int(s) for s in convergence_steps})
    if len(steps_list) < 2:
        raise ValueError(f"convergence_steps needs at least 2 different step counts, got {convergence_steps}")
    # the sampler's own grids (a sampler with a sigma grid chooses its timesteps)
    grids = [
        sorted(round(v, 9) for v in bases[main].grid_times(s, grid, instance).tolist()) for s in steps_list
    ]
    shared = sorted(set.intersection(*(set(g) for g in grids)) - {0, round(t_top, 9)})
    if (
        process is None
        and not shared
        and all(g == spaced_timesteps(T, s, "trailing") for g, s in zip(grids, steps_list, strict=True))
    ):
        raise ValueError(
            f"the trailing grids of convergence_steps {steps_list} share no timestep other than the first; "
            "use multiples of the smallest count"
        )
    # where the grids share no intermediate timestep (their own sigma grids), only the final
    # samples are compared
    stop = shared[0] if shared else None
    visited_steps = [len(g) for g in grids]

    steps0 = steps_list[0]
    calls: list[int] = []
    flat = run(main, (8, 2), steps0, seed=1, calls=calls)
    report.model_calls = len(calls)
    if not 1 <= len(calls) <= steps0 * nfe:
        _fail(
            f"{where}: declares nfe_per_step={nfe} but called the model {len(calls)} times in {steps0} steps "
            f"(at most {steps0 * nfe})"
        )
    if not isinstance(flat, torch.Tensor) or flat.shape != (8, 2):
        _fail(f"{where}: sampling shape [8, 2] returned {getattr(flat, 'shape', type(flat).__name__)}")
    if flat.dtype != torch.float32:
        _fail(f"{where}: the samples are {flat.dtype}, expected the driver's dtype float32")
    if flat.device != device:
        _fail(f"{where}: the samples are on {flat.device}, expected {device}")
    if not bool(torch.isfinite(flat).all()):
        _fail(f"{where}: the samples are not finite: {flat.tolist()}")
    if not torch.equal(flat, run(main, (8, 2), steps0, seed=1)):
        _fail(f"{where}: not reproducible: the same noise and generator gave different samples")
    mix4 = GaussianMixture.example(4)
    image = run(main, (8, 1, 2, 2), steps0, seed=2, mix=mix4)
    if image.shape != (8, 1, 2, 2) or image.dtype != torch.float32 or not bool(torch.isfinite(image).all()):
        _fail(f"{where}: sampling shape [8, 1, 2, 2] gave {image.dtype} {list(image.shape)} (or non-finite values)")
    flat4 = run(main, (8, 4), steps0, seed=2, mix=mix4)
    if not torch.allclose(image.reshape(8, 4), flat4, rtol=0, atol=1e-5):
        _fail(f"{where}: samples of shape [8, 1, 2, 2] differ from the same samples drawn as [8, 4]")
    for mean_type in [m for m in bases if m != main]:
        other = run(mean_type, (8, 2), steps0, seed=1)
        err = float((other - flat).abs().max())
        if not err <= 1e-3:
            _fail(
                f"{where}: with the {mean_type} parameterization the samples differ from {main}'s by {err:.3g} "
                "(the exact models agree, so a sampler must use the Prediction, not the raw model output)"
            )

    if not stochastic:
        n = 64
        x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * prior_std
        reference = exact_ode_solution(mixture, bases[main], x_T, t_start=t_top)
        reference_stop = (
            exact_ode_solution(mixture, bases[main], x_T, t_start=t_top, t_end=stop) if stop is not None else None
        )
        errors, final_errors = [], []
        for steps, grid in zip(steps_list, grids, strict=True):
            states: dict[int, torch.Tensor] = {}
            visit = grid[::-1]  # the state after step i is at visit[i + 1]

            def record(
                i: int,
                t: int,
                x: torch.Tensor,
                pred_xstart: torch.Tensor,
                _visit: list[int] = visit,
                _states: dict[int, torch.Tensor] = states,
            ) -> None:
                if i + 1 < len(_visit) and _visit[i + 1] == stop:
                    _states[stop] = x.detach().clone()

            out = run(main, (n, 2), steps, seed=3, dtype=torch.float64, callback=record)
            if out.dtype != torch.float64:
                _fail(f"{where}: sampling in float64 returned {out.dtype}; a step must keep x's dtype")
            final_errors.append(float(((out.cpu() - reference) ** 2).mean().sqrt()))
            if stop is not None and reference_stop is not None:
                errors.append(float(((states[stop].cpu() - reference_stop) ** 2).mean().sqrt()))
        report.steps, report.stop_timestep, report.errors, report.final_errors = (
            visited_steps,
            stop,
            errors,
            final_errors,
        )
        for what, errs in ((f"the state at timestep {stop}", errors), ("the final samples", final_errors)):
            if not all(math.isfinite(e) and e > 0 for e in errs):
                _fail(f"{where}: error of {what} to the exact ODE solution is not finite and positive: {errs}")
        report.final_slope = _slope(visited_steps, final_errors)
        # no shared intermediate level (e.g. karras grids): the order is measured on the final samples
        report.slope = _slope(visited_steps, errors) if errors else (report.final_slope if process is not None else None)
        table = ", ".join(f"{s}: {e:.3g}" for s, e in zip(visited_steps, errors, strict=False))
        final_table = ", ".join(f"{s}: {e:.3g}" for s, e in zip(visited_steps, final_errors, strict=True))
        if report.slope is not None and not report.slope >= order - order_tolerance:
            _fail(
                f"{where}: declares order {order:g}, but the error of "
                f"{'its state at timestep ' + str(stop) if stop is not None else 'its final samples'} to the exact "
                f"probability-flow ODE solution shrinks at order {report.slope:.2f} (< {order:g} - "
                f"{order_tolerance:g}); RMS error by steps: {table}"
            )
        if not report.final_slope >= min(order, 1.0) - order_tolerance:
            _fail(
                f"{where}: the error of its final samples to the exact probability-flow ODE solution shrinks at "
                f"order {report.final_slope:.2f} (< {min(order, 1.0):g} - {order_tolerance:g}); RMS error by "
                f"steps: {final_table}"
            )
        if not final_errors[-1] <= max_error:
            _fail(
                f"{where}: the error of its final samples to the exact probability-flow ODE solution is "
                f"{final_errors[-1]:.3g} at {steps_list[-1]} steps (> {max_error:g}); RMS error by steps: "
                f"{final_table}"
            )
    else:
        n = int(distribution_samples)
        samples = run(main, (n, 2), distribution_steps, seed=4)
        data = mixture.sample(max(20000, 2 * n), torch.Generator().manual_seed(5))
        report.swd = sliced_wasserstein(samples, data)
        report.swd_reference = sliced_wasserstein(mixture.sample(n, torch.Generator().manual_seed(6)), data)
        if not report.swd <= swd_threshold:
            _fail(
                f"{where}: the samples do not reproduce the data distribution: sliced Wasserstein distance "
                f"{report.swd:.3g} of {n} samples after {distribution_steps} steps to {data.shape[0]} data samples "
                f"(threshold {swd_threshold:g}; an independent data set of {n}: {report.swd_reference:.3g})"
            )
    return report


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
