"""Built-in mean types (``eps``, ``x0``, ``v``, ``flow``, ``edm``) and variance types (``fixed_small``,
``fixed_large``, ``learned``, ``learned_range``)."""

from diffreg import hookimpl
from diffreg.parameterization import (
    EDMPreconditioning,
    EpsPrediction,
    FixedLargeVariance,
    FixedSmallVariance,
    FlowPrediction,
    LearnedRangeVariance,
    LearnedVariance,
    VPrediction,
    XStartPrediction,
)


@hookimpl
def diffreg_register_parameterizations(register):
    register("eps", EpsPrediction, paper="Ho et al. 2020")
    register("x0", XStartPrediction)
    register("v", VPrediction, paper="Salimans & Ho 2022")
    register("flow", FlowPrediction, paper="Lipman et al. 2023; Liu et al. 2023 (velocity eps - x0)")
    register("edm", EDMPreconditioning, paper="Karras et al. 2022, Table 1")


@hookimpl
def diffreg_register_variances(register):
    register("fixed_small", FixedSmallVariance)
    register("fixed_large", FixedLargeVariance)
    register("learned", LearnedVariance, paper="Nichol & Dhariwal 2021")
    register("learned_range", LearnedRangeVariance, paper="Nichol & Dhariwal 2021")
