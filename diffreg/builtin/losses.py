"""Built-in losses (``mse``, ``rescaled_mse``, ``kl``, ``rescaled_kl``) and timestep samplers
(``uniform``, ``loss_second_moment``)."""

from diffreg import hookimpl
from diffreg.loss import KLLoss, LossSecondMomentSampler, MSELoss, UniformSampler


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


@hookimpl
def diffreg_register_timestep_samplers(register):
    register("uniform", UniformSampler)
    register("loss_second_moment", LossSecondMomentSampler, paper="Nichol & Dhariwal 2021")
