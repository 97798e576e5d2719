"""diffreg-solvers: fast ODE/SDE samplers for diffreg, registered through the ``diffreg`` entry point.

After ``pip install diffreg-solvers``::

    diffusion.sample(model, shape, sampler="dpmpp_2m", steps=20)
    diffusion.sample(model, shape, sampler="unipc", steps=10, sigmas="karras")

Samplers: ``euler``, ``heun``, ``euler_ancestral``, ``dpmpp_2m``, ``dpmpp_2m_sde``, ``unipc``; each
takes ``sigmas=None | "karras" | "exponential" | "lambda_uniform"``, the older spelling of
``Diffusion.sample(grid=...)`` (diffreg's ``grid`` kind).
"""

from __future__ import annotations

import diffreg

from .karras import HeunChurn, Restart
from .multistep import DEIS, IPNDM, DPMSolverPP3MSDE
from .samplers import SIGMA_GRIDS, DPMSolverPP2M, DPMSolverPP2MSDE, Euler, EulerAncestral, GridSampler, Heun, UniPC
from .singlestep import Adaptive, DPMSolver2S, DPMSolver3S, DPMSolverSinglestep

__version__ = "0.1.0"

#: name -> (class, paper); order / nfe_per_step / stochastic come from the class attributes.
SAMPLERS = {
    "euler": (Euler, "Karras et al. 2022, Elucidating the Design Space, Algorithm 1 (Euler)"),
    "heun": (Heun, "Karras et al. 2022, Elucidating the Design Space, Algorithm 1"),
    "euler_ancestral": (EulerAncestral, "Song et al. 2021 (score SDE), ancestral step in Karras et al. 2022 form"),
    "dpmpp_2m": (DPMSolverPP2M, "Lu et al. 2022, DPM-Solver++, Algorithm 2"),
    "dpmpp_2m_sde": (DPMSolverPP2MSDE, "Lu et al. 2022, DPM-Solver++ (SDE-DPM-Solver++, multistep)"),
    "unipc": (UniPC, "Zhao et al. 2023, UniPC (variant bh2: B(h) = expm1(h); bh1: B(h) = h)"),
    "dpmpp_3m_sde": (DPMSolverPP3MSDE, "Lu et al. 2022, DPM-Solver++ (3M, SDE form of k-diffusion)"),
    "dpm_solver_2s": (DPMSolver2S, "Lu et al. 2022, DPM-Solver, Algorithm 1 (DPM-Solver++(2S) by default)"),
    "dpm_solver_3s": (DPMSolver3S, "Lu et al. 2022, DPM-Solver, Algorithm 2"),
    "deis": (DEIS, "Zhang & Chen 2023, DEIS, tAB (eqs. 14-15)"),
    "ipndm": (IPNDM, "Zhang & Chen 2023, DEIS paper, iPNDM"),
    "heun_churn": (HeunChurn, "Karras et al. 2022, Elucidating the Design Space, Algorithm 2"),
    "restart": (Restart, "Xu et al. 2023, Restart Sampling, Algorithm 1"),
    "adaptive": (Adaptive, "Lu et al. 2022, DPM-Solver, section 4.2 (adaptive DPM-Solver-12)"),
}


@diffreg.hookimpl
def diffreg_register_samplers(register):
    # metadata = the class attributes (the defaults; an instance with eta=0 has stochastic False)
    for name, (cls, paper) in SAMPLERS.items():
        register(name, cls, order=cls.order, nfe_per_step=cls.nfe_per_step, stochastic=cls.stochastic, paper=paper)


__all__ = [
    "DEIS",
    "IPNDM",
    "SAMPLERS",
    "SIGMA_GRIDS",
    "Adaptive",
    "DPMSolver2S",
    "DPMSolver3S",
    "DPMSolverPP2M",
    "DPMSolverPP2MSDE",
    "DPMSolverPP3MSDE",
    "DPMSolverSinglestep",
    "Euler",
    "EulerAncestral",
    "GridSampler",
    "Heun",
    "HeunChurn",
    "Restart",
    "UniPC",
    "__version__",
    "diffreg_register_samplers",
]
