"""The conformance checks a plugin's own tests call, one module per kind."""

from diffreg.testing.checks.loss import check_loss
from diffreg.testing.checks.parameterization import check_parameterization
from diffreg.testing.checks.sampler import check_sampler
from diffreg.testing.checks.schedule import check_schedule
from diffreg.testing.report import SamplerReport

__all__ = ["SamplerReport", "check_loss", "check_parameterization", "check_sampler", "check_schedule"]
