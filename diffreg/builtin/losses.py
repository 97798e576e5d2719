"""Built-in losses (``mse``, ``rescaled_mse``, ``kl``, ``rescaled_kl``, ``flow_matching``,
``edm``) and timestep samplers / level densities (``uniform``, ``loss_second_moment``,
``logit_normal``, ``log_normal``)."""

from diffreg import hookimpl
from diffreg.loss import (
    EDMLoss,
    FlowMatchingLoss,
    KLLoss,
    LogitNormalSampler,
    LogNormalSampler,
    LossSecondMomentSampler,
    MSELoss,
    UniformSampler,
)


def mse(min_snr_gamma: float | None = None) -> MSELoss:
    """Plain MSE on the parameterization's target (+ the VB term for learned variance)."""
    return MSELoss(rescaled=False, min_snr_gamma=min_snr_gamma)


def rescaled_mse(min_snr_gamma: float | None = None) -> MSELoss:
    """MSE with the VB term scaled by T / 1000 (Improved DDPM's hybrid objective)."""
    return MSELoss(rescaled=True, min_snr_gamma=min_snr_gamma)


def kl() -> KLLoss:
    """The variational bound in bits per dimension."""
    return KLLoss(rescaled=False)


def rescaled_kl() -> KLLoss:
    """The variational bound times T."""
    return KLLoss(rescaled=True)


@hookimpl
def diffreg_register_losses(register):
    register("mse", mse, paper="Ho et al. 2020")
    register("rescaled_mse", rescaled_mse, paper="Nichol & Dhariwal 2021")
    register("kl", kl, paper="Ho et al. 2020")
    register("rescaled_kl", rescaled_kl, paper="Nichol & Dhariwal 2021")
    register("flow_matching", FlowMatchingLoss, paper="Lipman et al. 2023, eq. 23")
    register("edm", EDMLoss, paper="Karras et al. 2022, Table 1 (lambda = 1 / c_out^2)")


@hookimpl
def diffreg_register_timestep_samplers(register):
    register("uniform", UniformSampler)
    register("loss_second_moment", LossSecondMomentSampler, paper="Nichol & Dhariwal 2021")
    register("logit_normal", LogitNormalSampler, paper="Esser et al. 2024 (SD3), eq. 19")
    register("log_normal", LogNormalSampler, paper="Karras et al. 2022, Table 1")
