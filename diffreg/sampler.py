"""Deprecated import path: everything moved to :mod:`diffreg.sampling` (kept so that code written
against diffreg 0.1 keeps working)."""

from diffreg.sampling import *  # noqa: F403
from diffreg.sampling import __all__  # noqa: F401
from diffreg.sampling.context import exp  # noqa: F401
from diffreg.sampling.single_step import (  # noqa: F401
    check_eta,
    ddim_coefficients,
    ddim_reverse_sample,
    ddim_reverse_sample_loop,
    ddim_sample,
    p_sample,
)
