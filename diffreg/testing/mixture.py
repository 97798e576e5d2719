"""Gaussian-mixture data whose optimal denoiser is known in closed form at every noise level."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from diffreg.testing._arrays import _as_float64, _flat, _per_example

if TYPE_CHECKING:
    from diffreg.diffusion import Diffusion
    from diffreg.parameterization import Parameterization
    from diffreg.testing.denoiser import ConditionalExactDenoiser, ExactDenoiser


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

    def denoiser(self, diffusion: Diffusion, mean_type: str | Parameterization = "eps") -> ExactDenoiser:
        """An exact model for ``diffusion``: see :class:`ExactDenoiser`.

        Build it from the *un-respaced* diffusion (the model is called with original timesteps);
        a respaced one works too, for its kept timesteps only.
        """
        from diffreg.testing.denoiser import ExactDenoiser  # the denoiser module imports this one

        return ExactDenoiser(self, diffusion, mean_type)



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
            raise ValueError(
                f"classes must give a class >= 0 for each of the {self.num_components} components, got {list(classes)}"
            )
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
        minus_inf = torch.tensor(-math.inf, dtype=torch.float64, device=flat.device)
        per_class = torch.where(member[None], joint[:, None, :], minus_inf)
        per_class = torch.logsumexp(per_class, dim=2)  # [N, C]
        return per_class - torch.logsumexp(joint, dim=1, keepdim=True)

    def denoiser(self, diffusion: Diffusion, mean_type: str | Parameterization = "eps") -> ConditionalExactDenoiser:  # type: ignore[override]
        """An exact class-conditional model for ``diffusion``: see :class:`ConditionalExactDenoiser`."""
        from diffreg.testing.denoiser import ConditionalExactDenoiser

        return ConditionalExactDenoiser(self, diffusion, mean_type)
