"""Issue 15 item 8: one name per idea; the old names stay importable as aliases of the new ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffreg
from diffreg import hookspecs, registry
from diffreg.errors import PluginError
from diffreg.registry import Registry


def test_old_parameterization_names_are_the_same_classes():
    from diffreg.parameterization import MeanAndVariance, MeanType, ModelParameterization, Parameterization

    assert MeanType is Parameterization
    assert ModelParameterization is MeanAndVariance


def test_the_parameterization_kind_makes_a_parameterization_and_the_diffusion_holds_a_mean_and_variance():
    from diffreg.parameterization import MeanAndVariance, Parameterization

    assert hookspecs.KINDS["parameterization"].product_type() is Parameterization
    assert isinstance(registry.create("parameterization", "v"), Parameterization)
    d = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 100, "parameterization": "v"})
    assert isinstance(d.parameterization, MeanAndVariance)
    assert isinstance(d.parameterization.mean_type, Parameterization)


def test_a_factory_returning_something_else_is_refused_naming_parameterization():
    class NotAParameterization:
        pass

    class WrongProduct:
        @diffreg.hookimpl
        def diffreg_register_parameterizations(self, register):
            register("wrong", NotAParameterization)

    reg = Registry(entry_points=False, env={})
    with reg.plugin(WrongProduct(), "wrongplug"):
        with pytest.raises(PluginError, match=r"not a diffreg\.parameterization\.Parameterization"):
            reg.create("parameterization", "wrong")


def test_timestep_map_on_is_the_respaced_original_timesteps_and_tables_map_its_alias():
    d = diffreg.Diffusion.from_config({"schedule": "linear", "num_timesteps": 1000}).respace("ddim10")
    got = d.timestep_map_on(torch.device("cpu"))
    # guided-diffusion's space_timesteps(1000, "ddim10"): stride 1000 // 10 = 100 from 0
    assert got.dtype == torch.int64
    assert got.tolist() == list(np.arange(0, 1000, 100))
    assert d.tables_map(torch.device("cpu")) is got
    assert type(d).tables_map is type(d).timestep_map_on
