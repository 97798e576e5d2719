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

from diffreg.testing.checks import SamplerReport, check_loss, check_parameterization, check_sampler, check_schedule
from diffreg.testing.checks._common import _diffusion, _linear_betas  # noqa: F401  (used by plugin tests)
from diffreg.testing.denoiser import ConditionalExactDenoiser, ExactDenoiser
from diffreg.testing.distances import sliced_wasserstein
from diffreg.testing.mixture import ClassConditionalMixture, GaussianMixture
from diffreg.testing.ode import exact_ode_solution

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
