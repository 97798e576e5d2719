"""Checkpoints remember which distribution provided each component (issue 15): written to the
header, resolved to that provider first on load, and a clear error naming the package to install
when it is gone. Plugins are real ``*.dist-info`` distributions (``plugin_fixtures.py``)."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
import torch
from plugin_fixtures import registering_source
from safetensors.torch import load_file, save_file

import diffreg
from diffreg import provenance, registry
from diffreg.builtin.schedules import CosineSchedule, LinearSchedule
from diffreg.checkpoint import read_metadata
from diffreg.errors import AmbiguousComponentError, CheckpointError, MissingProviderError, UnknownComponentError

LINEAR_EDM = registering_source("karras_vp", hook="diffreg_register_schedules", base="diffreg.builtin.schedules.LinearSchedule")
EDM = registering_source("karras_vp", hook="diffreg_register_schedules", base="diffreg.builtin.schedules.CosineSchedule")


@pytest.fixture(autouse=True)
def _fresh_process_registry(monkeypatch):
    for key in ("DIFFREG_LOAD_PLUGINS", "DIFFREG_DISABLE_PLUGINS", "DIFFREG_STRICT_PLUGINS"):
        monkeypatch.delenv(key, raising=False)
    registry.reset()
    yield
    registry.reset()


def _uninstall(dist) -> None:
    sys.path.remove(str(dist.site))
    sys.modules.pop(dist.module, None)
    importlib.invalidate_caches()
    registry.reset()


def _save(path, schedule="karras_vp"):
    cfg = {"diffusion": {"schedule": schedule, "num_timesteps": 50}, "model": {"name": "mlp", "hidden": 8, "depth": 1}}
    model = registry.create("model", "mlp", hidden=8, depth=1)
    return diffreg.save_checkpoint(path, model, cfg)


def test_header_records_provider_and_version_of_every_component(plugin_dist, tmp_path):
    plugin_dist("edmplug", EDM, distribution="diffreg-edm", version="0.2.0")
    path = _save(tmp_path / "m.safetensors")
    recorded = json.loads(read_metadata(path)[provenance.HEADER_KEY])
    assert recorded["diffusion.schedule"] == {"name": "karras_vp", "provider": "diffreg-edm", "version": "0.2.0"}
    assert recorded["model"] == {"name": "mlp", "provider": "diffreg", "version": diffreg.__version__}
    assert set(recorded) == {"model", *(f"diffusion.{f}" for f in diffreg.DiffusionConfig._kinds)}


def test_loading_after_uninstall_names_file_field_and_package(plugin_dist, tmp_path):
    dist = plugin_dist("edmplug", EDM, distribution="diffreg-edm", version="0.2.0")
    path = _save(tmp_path / "checkpoint.safetensors")
    _uninstall(dist)
    with pytest.raises(MissingProviderError) as info:
        diffreg.load_checkpoint(path)
    assert str(info.value) == (
        f"{path}: diffusion.schedule: schedule 'karras_vp' was provided by 'diffreg-edm 0.2.0', which is not "
        "installed (or is disabled); pip install 'diffreg-edm==0.2.0'"
    )
    assert isinstance(info.value, UnknownComponentError)


def test_info_shows_the_providers_and_names_the_package_to_install_after_uninstall(plugin_dist, tmp_path):
    from click.testing import CliRunner

    from diffreg.cli import main

    dist = plugin_dist("edmplug", EDM, distribution="diffreg-edm", version="0.2.0")
    path = _save(tmp_path / "checkpoint.safetensors")
    shown = CliRunner().invoke(main, ["info", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "diffusion.schedule: karras_vp from diffreg-edm 0.2.0" in shown.output and "missing" not in shown.output
    _uninstall(dist)
    result = CliRunner().invoke(main, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["providers"]["diffusion.schedule"]["provider"] == "diffreg-edm"
    assert report["missing"] == [
        f"{path}: diffusion.schedule: schedule 'karras_vp' was provided by 'diffreg-edm 0.2.0', which is not "
        "installed (or is disabled); pip install 'diffreg-edm==0.2.0'"
    ]
    text = CliRunner().invoke(main, ["info", str(path)]).output
    assert "missing: " in text and "pip install 'diffreg-edm==0.2.0'" in text


def test_a_second_plugin_with_the_same_name_does_not_break_old_checkpoints(plugin_dist, tmp_path):
    plugin_dist("edmplug", EDM, distribution="diffreg-edm", version="0.2.0")
    path = _save(tmp_path / "m.safetensors")
    plugin_dist("otheredm", LINEAR_EDM, distribution="other-edm")
    registry.reset()
    with pytest.raises(AmbiguousComponentError):
        registry.get("schedule", "karras_vp")
    _, diffusion, config = diffreg.load_checkpoint(path)
    assert config.diffusion.schedule.name == "diffreg-edm:karras_vp"
    np.testing.assert_array_equal(diffusion.betas, CosineSchedule(50).betas)  # diffreg-edm's, not other-edm's


def test_a_name_now_resolving_elsewhere_loads_the_recorded_provider(plugin_dist, tmp_path):
    # a checkpoint whose 'cosine' came from a plugin: the built-in 'cosine' (bare names go to the
    # built-in first) must not silently replace it
    plugin_dist(
        "shadowplug",
        registering_source("cosine", hook="diffreg_register_schedules", base="diffreg.builtin.schedules.LinearSchedule"),
        distribution="shadow-dist",
        version="3.1",
    )
    path = _save(tmp_path / "m.safetensors", schedule="shadow-dist:cosine")
    assert json.loads(read_metadata(path)[provenance.HEADER_KEY])["diffusion.schedule"]["provider"] == "shadow-dist"
    tensors, meta = load_file(path), read_metadata(path)
    meta["diffreg.config"] = meta["diffreg.config"].replace('"shadow-dist:cosine"', '"cosine"')
    save_file(tensors, str(path), metadata=meta)
    assert registry.get("schedule", "cosine").builtin
    _, diffusion, _ = diffreg.load_checkpoint(path)
    np.testing.assert_array_equal(diffusion.betas, LinearSchedule(50).betas)  # the plugin's, not the built-in's


def test_builtin_only_checkpoint_loads_unchanged(tmp_path):
    path = _save(tmp_path / "m.safetensors", schedule="cosine")
    _, _, config = diffreg.load_checkpoint(path)
    assert config.diffusion.schedule.name == "cosine" and config.model.name == "mlp"


def test_checkpoint_without_provider_record_loads_as_before(tmp_path):
    path = _save(tmp_path / "m.safetensors", schedule="cosine")
    tensors, meta = load_file(path), read_metadata(path)
    del meta[provenance.HEADER_KEY]
    save_file(tensors, str(path), metadata=meta)
    model, _, _ = diffreg.load_checkpoint(path)
    assert isinstance(model, torch.nn.Module)


@pytest.mark.parametrize("bad", ["not json", "[1, 2]", '{"model": {"name": 3}}', "[" * 100_000])
def test_invalid_provider_record_is_a_checkpoint_error(tmp_path, bad):
    path = _save(tmp_path / "m.safetensors", schedule="cosine")
    tensors, meta = load_file(path), read_metadata(path)
    meta[provenance.HEADER_KEY] = bad
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="diffreg.providers entry is invalid"):
        diffreg.load_checkpoint(path)
