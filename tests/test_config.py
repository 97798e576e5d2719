"""DiffusionConfig: built from names and option tables, frozen, lossless through JSON and TOML."""

from __future__ import annotations

import json
import sys

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import diffreg
from diffreg import ComponentSpec, Diffusion, DiffusionConfig
from diffreg.config import FORMAT_VERSION
from diffreg.errors import ComponentOptionError, ConfigError, UnknownComponentError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DESIGN_EXAMPLE = {
    "schedule": "cosine",
    "num_timesteps": 1000,
    "parameterization": "eps",
    "variance": "learned_range",
    "loss": "rescaled_mse",
}

WITH_OPTIONS = {
    "schedule": {"name": "cosine", "max_beta": 0.99, "s": 0.01},
    "num_timesteps": 250,
    "parameterization": "v",
    "variance": "learned",
    "loss": {"name": "mse", "min_snr_gamma": 5.0},
    "timestep_sampler": {"name": "loss_second_moment", "history_per_term": 4, "uniform_prob": 0.01},
}


# -- building from dicts ---------------------------------------------------------------------------


def test_defaults():
    cfg = DiffusionConfig()
    assert cfg.schedule == ComponentSpec("linear")
    assert cfg.num_timesteps == 1000
    assert cfg.parameterization == ComponentSpec("eps")
    assert cfg.variance == ComponentSpec("fixed_small")
    assert cfg.loss == ComponentSpec("mse")
    assert cfg.timestep_sampler == ComponentSpec("uniform")
    assert cfg.format_version == FORMAT_VERSION


def test_from_dict_accepts_bare_names():
    cfg = DiffusionConfig.from_dict(DESIGN_EXAMPLE)
    assert cfg.schedule == ComponentSpec("cosine", {})
    assert cfg.variance == ComponentSpec("learned_range", {})
    assert cfg.loss == ComponentSpec("rescaled_mse", {})


def test_from_dict_accepts_name_tables_with_options():
    cfg = DiffusionConfig.from_dict(WITH_OPTIONS)
    assert cfg.schedule == ComponentSpec("cosine", {"max_beta": 0.99, "s": 0.01})
    assert cfg.loss == ComponentSpec("mse", {"min_snr_gamma": 5.0})
    assert cfg.timestep_sampler.options == {"history_per_term": 4, "uniform_prob": 0.01}


def test_from_dict_accepts_qualified_names():
    assert DiffusionConfig.from_dict({"schedule": "diffreg:cosine"}).schedule.name == "diffreg:cosine"


def test_omitted_fields_take_their_defaults():
    assert DiffusionConfig.from_dict({"schedule": "cosine"}) == DiffusionConfig(schedule="cosine")


def test_to_dict_writes_a_bare_name_without_options_and_a_table_with_options():
    data = DiffusionConfig.from_dict(WITH_OPTIONS).to_dict()
    assert data["parameterization"] == "v"
    assert data["schedule"] == {"name": "cosine", "max_beta": 0.99, "s": 0.01}
    assert data["num_timesteps"] == 250
    assert data["format_version"] == FORMAT_VERSION


def test_tuple_option_values_are_stored_as_lists():
    spec = ComponentSpec("explicit", {"betas": (0.1, 0.2)})
    assert spec.options == {"betas": [0.1, 0.2]}


def test_option_that_is_not_a_json_value_raises_config_error():
    with pytest.raises(ConfigError, match="JSON values"):
        DiffusionConfig.from_dict({"schedule": {"name": "cosine", "max_beta": object()}})


def test_component_table_without_name_raises_config_error():
    with pytest.raises(ConfigError, match="schedule: a table needs a 'name' key"):
        DiffusionConfig.from_dict({"schedule": {"max_beta": 0.5}})


@pytest.mark.parametrize("value", [3, None, ""])
def test_component_that_is_not_a_name_raises_config_error(value):
    with pytest.raises(ConfigError):
        DiffusionConfig.from_dict({"schedule": value})


def test_from_dict_of_a_non_mapping_raises_config_error():
    with pytest.raises(ConfigError, match="expects a mapping"):
        DiffusionConfig.from_dict(["schedule", "cosine"])


# -- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [DESIGN_EXAMPLE, WITH_OPTIONS], ids=["names", "options"])
def test_to_dict_round_trips_through_json(data):
    cfg = DiffusionConfig.from_dict(data)
    assert DiffusionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("data", [DESIGN_EXAMPLE, WITH_OPTIONS], ids=["names", "options"])
def test_to_json_round_trips_through_from_json(data):
    cfg = DiffusionConfig.from_dict(data)
    assert DiffusionConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("data", [DESIGN_EXAMPLE, WITH_OPTIONS], ids=["names", "options"])
def test_to_toml_round_trips_through_from_toml(data):
    cfg = DiffusionConfig.from_dict(data)
    assert DiffusionConfig.from_toml(cfg.to_toml()) == cfg


def test_to_toml_is_plain_toml_holding_to_dict():
    cfg = DiffusionConfig.from_dict(WITH_OPTIONS)
    assert tomllib.loads(cfg.to_toml()) == cfg.to_dict()


def test_round_trip_keeps_ints_and_floats_apart():
    cfg = DiffusionConfig.from_dict({"schedule": {"name": "cosine", "max_beta": 1}})
    for back in (
        DiffusionConfig.from_json(cfg.to_json()),
        DiffusionConfig.from_toml(cfg.to_toml()),
    ):
        assert type(back.schedule.options["max_beta"]) is int


def test_toml_round_trip_of_an_option_set_to_none_keeps_its_meaning():
    # TOML has no null: None is left out only where the factory's default is None as well
    cfg = DiffusionConfig.from_dict({"loss": {"name": "mse", "min_snr_gamma": None}})
    back = DiffusionConfig.from_toml(cfg.to_toml())
    assert back.loss.options == {}
    assert diffreg.Diffusion.from_config(back).loss.min_snr_gamma is None


def test_toml_refuses_none_for_an_option_whose_default_is_not_none():
    cfg = DiffusionConfig.from_dict({"schedule": {"name": "cosine", "max_beta": None}})
    with pytest.raises(ConfigError, match="option 'max_beta' is None, which TOML cannot store"):
        cfg.to_toml()


def test_invalid_json_raises_config_error():
    with pytest.raises(ConfigError, match="invalid JSON"):
        DiffusionConfig.from_json("{not json")


def test_invalid_toml_raises_config_error():
    with pytest.raises(ConfigError, match="invalid TOML"):
        DiffusionConfig.from_toml("schedule = = 1")


# -- rejected configurations -----------------------------------------------------------------------


def test_unknown_key_raises_config_error_suggesting_the_closest_field():
    with pytest.raises(ConfigError, match=r"has no field 'schedul'.*did you mean 'schedule'\?"):
        DiffusionConfig.from_dict({"schedul": "cosine"})


def test_unknown_key_message_lists_the_known_fields():
    with pytest.raises(ConfigError) as info:
        DiffusionConfig.from_dict({"unrelated_key": 1})
    for field in (
        "schedule",
        "num_timesteps",
        "parameterization",
        "variance",
        "loss",
        "timestep_sampler",
    ):
        assert field in str(info.value)


def test_unknown_key_in_toml_raises_config_error():
    with pytest.raises(ConfigError, match="did you mean 'num_timesteps'"):
        DiffusionConfig.from_toml('num_timestep = 100\nschedule = "cosine"\n')


def test_newer_format_version_raises_config_error():
    with pytest.raises(ConfigError, match="newer than this diffreg understands"):
        DiffusionConfig.from_dict({"format_version": FORMAT_VERSION + 1})


def test_newer_format_version_in_constructor_raises_config_error():
    with pytest.raises(ConfigError, match="newer"):
        DiffusionConfig(format_version=FORMAT_VERSION + 1)


def test_newer_format_version_in_json_raises_config_error():
    data = {**DESIGN_EXAMPLE, "format_version": FORMAT_VERSION + 1}
    with pytest.raises(ConfigError, match="upgrade diffreg"):
        DiffusionConfig.from_json(json.dumps(data))


@pytest.mark.parametrize("value", [1, 0, -5, 100_001, 10**9])
def test_num_timesteps_out_of_range_raises_config_error(value):
    # bounded above too: a cosine schedule of 1e9 steps would hang building its tables
    with pytest.raises(ConfigError, match=rf"num_timesteps must be an int in 2\.\.100,000, got {value}"):
        DiffusionConfig.from_dict({"num_timesteps": value})


@pytest.mark.parametrize("value", [True, 100.0, "100"])
def test_num_timesteps_that_is_not_an_int_raises_config_error(value):
    with pytest.raises(ConfigError, match="num_timesteps"):
        DiffusionConfig(num_timesteps=value)


def test_diffusion_from_config_with_an_unknown_schedule_raises_unknown_component_error():
    with pytest.raises(UnknownComponentError, match=r"unknown schedule 'cosin'.*did you mean 'cosine'"):
        Diffusion.from_config({"schedule": "cosin"})


def test_diffusion_from_config_with_a_bad_option_raises_component_option_error():
    with pytest.raises(ComponentOptionError, match="schedule 'cosine' has no option 'max_bta'"):
        Diffusion.from_config({"schedule": {"name": "cosine", "max_bta": 0.9}})


def test_diffusion_from_config_with_a_bad_timestep_sampler_option_raises():
    with pytest.raises(ComponentOptionError, match="uniform"):
        Diffusion.from_config({"timestep_sampler": {"name": "uniform", "history_per_term": 3}})


def test_validate_raises_for_an_unknown_name():
    with pytest.raises(UnknownComponentError, match="unknown loss 'msee'"):
        DiffusionConfig(loss="msee").validate()


def test_validate_returns_the_config_when_valid():
    cfg = DiffusionConfig.from_dict(WITH_OPTIONS)
    assert cfg.validate() is cfg


# -- immutability ----------------------------------------------------------------------------------


def test_config_is_frozen():
    cfg = DiffusionConfig()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.num_timesteps = 10  # type: ignore[misc]


def test_component_spec_is_frozen():
    spec = ComponentSpec("cosine")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        spec.name = "linear"  # type: ignore[misc]


def test_evolve_returns_a_changed_copy_and_leaves_the_original():
    cfg = DiffusionConfig.from_dict(DESIGN_EXAMPLE)
    changed = attrs.evolve(cfg, num_timesteps=50)
    assert changed.num_timesteps == 50
    assert cfg.num_timesteps == 1000
    assert changed.schedule == cfg.schedule


def test_evolve_converts_a_name_or_table_to_a_component_spec():
    cfg = attrs.evolve(DiffusionConfig(), schedule={"name": "cosine", "max_beta": 0.5})
    assert cfg.schedule == ComponentSpec("cosine", {"max_beta": 0.5})


def test_evolve_validates_the_new_values():
    with pytest.raises(ConfigError):
        attrs.evolve(DiffusionConfig(), num_timesteps=1)


# -- Diffusion.from_config -------------------------------------------------------------------------


def test_diffusion_from_config_accepts_the_design_example_dict():
    diffusion = Diffusion.from_config(DESIGN_EXAMPLE)
    assert diffusion.num_timesteps == 1000
    assert diffusion.config == DiffusionConfig.from_dict(DESIGN_EXAMPLE)


def test_diffusion_config_to_dict_round_trips_through_json():
    diffusion = Diffusion.from_config(WITH_OPTIONS)
    assert DiffusionConfig.from_dict(json.loads(json.dumps(diffusion.config.to_dict()))) == diffusion.config


# -- property: every config built from registered names --------------------------------------------


def _finite(lo: float, hi: float):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def _spec(name: str, options: dict) -> str | dict:
    return {"name": name, **options} if options else name


@st.composite
def _beta_range(draw, lo: float, hi: float) -> dict:
    start = draw(_finite(lo, hi))
    end = draw(_finite(start, hi))
    return {"beta_start": start, "beta_end": end}


@st.composite
def _schedules(draw):
    name = draw(st.sampled_from(["linear", "cosine", "scaled_linear", "sigmoid"]))
    if name == "linear":  # betas are scaled by 1000 / T: beta_end < T / 1000 with T >= 25
        candidates = _beta_range(1e-5, 0.02)
    elif name == "cosine":
        candidates = st.fixed_dictionaries({"s": _finite(0.0, 0.05), "max_beta": _finite(0.5, 1.0)})
    else:
        candidates = _beta_range(1e-5, 0.05)
    options = draw(candidates)
    if name != "cosine" and draw(st.booleans()):
        options = {}  # beta_start and beta_end only make sense together: keep both or neither
    elif name == "cosine":
        keep = draw(st.sets(st.sampled_from(sorted(options))))
        options = {k: v for k, v in options.items() if k in keep}
    if draw(st.booleans()):
        options["rescale_zero_terminal_snr"] = draw(st.booleans())
    return _spec(name, options)


@st.composite
def _losses(draw):
    name = draw(st.sampled_from(["mse", "rescaled_mse", "kl", "rescaled_kl"]))
    options = {}
    if name.endswith("mse") and draw(st.booleans()):
        options["min_snr_gamma"] = draw(_finite(0.1, 20.0))
    return _spec(name, options)


@st.composite
def _timestep_samplers(draw):
    name = draw(st.sampled_from(["uniform", "loss_second_moment"]))
    options = {}
    if name == "loss_second_moment":
        options = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "history_per_term": st.integers(1, 20),
                    "uniform_prob": _finite(0.0, 1.0),
                },
            )
        )
    return _spec(name, options)


config_dicts = st.fixed_dictionaries(
    {
        "schedule": _schedules(),
        "num_timesteps": st.integers(25, 2000),
        "parameterization": st.sampled_from(["eps", "x0", "v"]),
        "variance": st.sampled_from(["fixed_small", "fixed_large", "learned", "learned_range"]),
        "loss": _losses(),
        "timestep_sampler": _timestep_samplers(),
    }
)

PROPERTY = settings(max_examples=30, deadline=None)


@PROPERTY
@given(config_dicts)
def test_property_config_from_registered_names_round_trips_through_json(data):
    cfg = DiffusionConfig.from_dict(data)
    assert DiffusionConfig.from_json(cfg.to_json()) == cfg
    assert DiffusionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@PROPERTY
@given(config_dicts)
def test_property_config_from_registered_names_round_trips_through_toml(data):
    cfg = DiffusionConfig.from_dict(data)
    assert DiffusionConfig.from_toml(cfg.to_toml()) == cfg


@PROPERTY
@given(config_dicts)
def test_property_config_from_registered_names_builds_a_diffusion(data):
    cfg = DiffusionConfig.from_dict(data)
    diffusion = Diffusion.from_config(cfg)
    assert diffusion.num_timesteps == cfg.num_timesteps
    assert diffusion.config == cfg
    assert diffusion.betas.shape == (cfg.num_timesteps,)


# -- hostile configuration text -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (DiffusionConfig.from_json, "[" * 100_000 + "]" * 100_000),
        (DiffusionConfig.from_toml, "a = " + "[" * 100_000 + "]" * 100_000),
        (DiffusionConfig.from_toml, "a = " + "{b = " * 5_000 + "1" + "}" * 5_000),
    ],
)
def test_deeply_nested_text_is_a_config_error(parse, text):
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse(text)


def test_deeply_nested_option_values_are_refused():
    value: list = []
    for _ in range(40):
        value = [value]
    with pytest.raises(ConfigError, match="nested more than 32 levels"):
        ComponentSpec("cosine", {"x": value})


@pytest.mark.parametrize("version", [0, -1, -(10**30)])
def test_format_version_below_one_names_the_value(version):
    with pytest.raises(ConfigError, match=rf"format_version must be an int >= 1, got {version}"):
        DiffusionConfig.from_dict({"format_version": version})


def test_a_non_utf8_toml_file_is_named_with_the_offending_byte(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes('schedule = "cosine"\n# caf\xe9\n'.encode("latin-1"))  # 20 + 5 bytes before it
    with pytest.raises(ConfigError, match=r"'.*c\.toml' is not UTF-8 text \(byte 0xe9 at offset 25\)"):
        DiffusionConfig.from_toml_file(path)


def test_a_toml_file_round_trips(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(DiffusionConfig.from_dict(DESIGN_EXAMPLE).to_toml(), encoding="utf-8")
    assert DiffusionConfig.from_toml_file(path) == DiffusionConfig.from_dict(DESIGN_EXAMPLE)


# -- sampling defaults chosen from the data --------------------------------------------------------


def test_sampling_defaults_clip_only_images_within_minus_one_one():
    import torch

    from diffreg.config import SamplingConfig
    from diffreg.data import load_digits, toy_2d

    digits, _ = load_digits()
    moons, _ = toy_2d("moons")
    assert float(moons.abs().max()) > 1.2  # the 2-D toys reach beyond [-1, 1]
    assert SamplingConfig.for_data(digits).clip is True
    assert SamplingConfig.for_data(moons).clip is False
    assert SamplingConfig.for_data(torch.full((2, 1, 4, 4), 1.5)).clip is False  # images beyond the range
    assert SamplingConfig.for_data(torch.zeros(3, 2)).clip is False  # vectors: never
