"""The plugin registry: discovery through hooks and entry points, failure isolation, environment
switches, name resolution, option checking, and temporary plugins.

Third-party plugins here are real distributions written to a temporary ``sys.path`` entry (see
``plugin_fixtures.py``) and found through ``importlib.metadata`` like a pip-installed package.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import types
import warnings
from pathlib import Path

import pytest
from plugin_fixtures import plugin_dist, registering_source  # noqa: F401  (fixture)

import diffreg
from diffreg import hookspecs, registry
from diffreg.builtin import DEFAULT_PLUGINS
from diffreg.builtin.samplers import DDIM
from diffreg.builtin.schedules import CosineSchedule
from diffreg.errors import (
    AmbiguousComponentError,
    ComponentOptionError,
    MissingProviderError,
    PluginError,
    PluginWarning,
    UnknownComponentError,
)
from diffreg.hookspecs import KIND_HOOKS
from diffreg.registry import PluginFailure, Registry

# -- helpers ---------------------------------------------------------------------------------------


def fresh(**env: str) -> Registry:
    """A registry that reads entry points but only the given environment (not os.environ)."""
    return Registry(env=env)


def build_quietly(reg: Registry) -> Registry:
    """Force discovery, swallowing PluginWarnings (for tests whose subject is something else)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        reg.plugins()
    return reg


@pytest.fixture(scope="module")
def builtins_only() -> Registry:
    return Registry(entry_points=False, env={})


@pytest.fixture
def myplug(plugin_dist):  # noqa: F811
    """The plugin of the brief: module ``myplug``, distribution ``myplug-dist`` 1.2.3."""
    return plugin_dist(
        "myplug",
        registering_source("mysampler", order=1),
        distribution="myplug-dist",
        version="1.2.3",
    )


# -- built-ins -------------------------------------------------------------------------------------

BUILTIN_NAMES = {
    "schedule": {"linear", "cosine", "scaled_linear", "sigmoid", "explicit"},
    "parameterization": {"eps", "x0", "v"},
    "variance": {"fixed_small", "fixed_large", "learned", "learned_range"},
    "sampler": {"ddpm", "ddim"},
    "loss": {"mse", "rescaled_mse", "kl", "rescaled_kl"},
    "timestep_sampler": {"uniform", "loss_second_moment"},
    "model": {"unet", "mlp"},
    "grid": {"leading", "trailing", "linspace", "karras", "exponential", "lambda_uniform", "explicit"},
    "guidance": {"cfg", "cfg_rescale", "interval", "apg", "cfg_zero_star", "cfgpp", "autoguidance"},
}


def test_every_kind_has_a_hook_and_builtins_cover_every_kind():
    assert set(BUILTIN_NAMES) == set(KIND_HOOKS) == set(registry.KINDS)


@pytest.mark.parametrize("kind", sorted(BUILTIN_NAMES))
def test_process_wide_names_include_the_builtins(kind):
    assert BUILTIN_NAMES[kind] <= set(registry.names(kind))


def test_names_are_sorted():
    names = registry.names("schedule")
    assert names == sorted(names)


def test_builtin_component_record_names_diffreg_distribution_and_version():
    component = registry.get("sampler", "ddim")
    assert component.kind == "sampler"
    assert component.name == "ddim"
    assert component.plugin == "diffreg"
    assert component.distribution == "diffreg"
    assert component.version == diffreg.__version__
    assert component.builtin
    assert component.factory is DDIM


def test_builtin_component_keeps_registration_metadata():
    assert registry.get("sampler", "ddim").metadata["order"] == 1
    assert registry.get("sampler", "ddim").metadata["nfe_per_step"] == 1


def test_qualified_builtin_name_resolves_to_the_builtin():
    component = registry.get("sampler", "diffreg:ddim")
    assert component == registry.get("sampler", "ddim")
    assert component.qualified_name == "diffreg:ddim"


def test_builtin_components_are_exactly_what_the_builtin_hooks_register(builtins_only):
    # Call every built-in module's hook implementations with a recording ``register``: the registry
    # must hold exactly those components, so the built-ins go through the public hooks.
    registered = set()
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        for kind, hook in KIND_HOOKS.items():
            impl = getattr(module, hook, None)
            if impl is not None:
                impl(register=lambda name, factory, kind=kind, **meta: registered.add((kind, name, factory)))
    held = {(c.kind, c.name, c.factory) for c in builtins_only.components() if c.builtin}
    assert held == registered


def test_builtins_are_one_diffreg_plugin_holding_every_builtin_component(builtins_only):
    (info,) = builtins_only.plugins()
    assert (info.name, info.distribution, info.version) == (
        "diffreg",
        "diffreg",
        diffreg.__version__,
    )
    assert set(info.components) == set(builtins_only.components())


def test_registry_without_entry_points_holds_only_builtins(builtins_only):
    assert all(c.builtin for c in builtins_only.components())
    assert builtins_only.failures() == []


# -- a real entry-point plugin ---------------------------------------------------------------------


def test_entry_point_plugin_component_is_discovered(myplug):
    assert "mysampler" in fresh().names("sampler")


def test_entry_point_plugin_component_records_distribution_and_version(myplug):
    component = fresh().get("sampler", "mysampler")
    assert component.plugin == "myplug"
    assert component.distribution == "myplug-dist"
    assert component.version == "1.2.3"
    assert not component.builtin
    assert component.factory is sys.modules["myplug"].Component0
    # order / nfe_per_step / stochastic come from the class (DDIM's attributes), with what register got
    assert component.metadata == {"order": 1, "nfe_per_step": 1, "stochastic": False}


def test_entry_point_plugin_is_listed_in_plugins(myplug):
    info = next(p for p in fresh().plugins() if p.name == "myplug")
    assert (info.distribution, info.version, info.module) == ("myplug-dist", "1.2.3", "myplug")
    assert [c.qualified_name for c in info.components] == ["myplug:mysampler"]


def test_qualified_name_by_entry_point_name_resolves(myplug):
    assert fresh().get("sampler", "myplug:mysampler").distribution == "myplug-dist"


def test_qualified_name_by_distribution_name_resolves(myplug):
    assert fresh().get("sampler", "myplug-dist:mysampler").plugin == "myplug"


def test_qualified_distribution_name_is_normalized(myplug):
    assert fresh().get("sampler", "MyPlug_Dist:mysampler").plugin == "myplug"


def test_create_builds_the_plugin_component_with_options(myplug):
    sampler = fresh().create("sampler", "myplug:mysampler", eta=0.5)
    assert isinstance(sampler, sys.modules["myplug"].Component0)
    assert sampler.eta == 0.5


def test_registry_without_entry_points_does_not_import_plugins(myplug):
    reg = Registry(entry_points=False, env={})
    assert "mysampler" not in reg.names("sampler")
    assert not myplug.was_imported()


def test_entry_point_plugins_are_discovered_lazily_on_first_use(myplug):
    reg = fresh()
    assert not myplug.was_imported()
    reg.names("sampler")
    assert myplug.was_imported()


def test_reset_makes_the_process_wide_registry_rediscover_plugins(myplug, monkeypatch):
    for key in ("DIFFREG_LOAD_PLUGINS", "DIFFREG_DISABLE_PLUGINS", "DIFFREG_STRICT_PLUGINS"):
        monkeypatch.delenv(key, raising=False)
    registry.reset()
    try:
        assert registry.get("sampler", "mysampler").distribution == "myplug-dist"
    finally:
        registry.reset()  # the next user rediscovers without this test's sys.path


# -- broken plugins are skipped whole --------------------------------------------------------------

# Each broken plugin first registers (or tries to register) ``brokensampler``, so "registers
# nothing" is a real check. The second element is a fragment the reason must contain.
BROKEN = {
    "import_error": (
        """
        raise RuntimeError("boom at import")
        """,
        "import failed: RuntimeError: boom at import",
    ),
    "misspelled_hook": (
        """
        import diffreg
        from diffreg.builtin.samplers import DDIM

        @diffreg.hookimpl
        def diffreg_register_sampler(register):
            register("brokensampler", DDIM)
        """,
        "unknown hook 'diffreg_register_sampler'; did you mean 'diffreg_register_samplers'?",
    ),
    "wrong_argument_name": (
        """
        import diffreg
        from diffreg.builtin.samplers import DDIM

        @diffreg.hookimpl
        def diffreg_register_samplers(registrar):
            registrar("brokensampler", DDIM)
        """,
        "registrar",
    ),
    "hook_raises": (
        """
        import diffreg
        from diffreg.builtin.samplers import DDIM

        @diffreg.hookimpl
        def diffreg_register_samplers(register):
            register("brokensampler", DDIM)
            raise ValueError("kaboom in hook")
        """,
        "hook diffreg_register_samplers raised ValueError: kaboom in hook",
    ),
    "duplicate_name": (
        """
        import diffreg
        from diffreg.builtin.samplers import DDIM, DDPM

        @diffreg.hookimpl
        def diffreg_register_samplers(register):
            register("brokensampler", DDIM)
            register("brokensampler", DDPM)
        """,
        "registered sampler 'brokensampler' twice",
    ),
}


@pytest.fixture(params=sorted(BROKEN))
def broken(request, plugin_dist):  # noqa: F811
    """A broken plugin (``brokenplug``, ``broken-dist`` 0.9) between two healthy ones."""
    source, reason = BROKEN[request.param]
    plugin_dist("alphaplug", registering_source("alphasampler"), distribution="alpha-dist")
    dist = plugin_dist("brokenplug", source, distribution="broken-dist", version="0.9")
    plugin_dist("zetaplug", registering_source("zetasampler"), distribution="zeta-dist")
    return types.SimpleNamespace(dist=dist, reason=reason)


def test_broken_plugin_warns_naming_distribution_and_reason(broken):
    reg = fresh()
    with pytest.warns(PluginWarning) as record:
        reg.names("sampler")
    messages = [str(w.message) for w in record if issubclass(w.category, PluginWarning)]
    assert len(messages) == 1
    assert "'brokenplug'" in messages[0]
    assert "broken-dist 0.9" in messages[0]
    assert broken.reason in messages[0]


def test_broken_plugin_is_listed_in_failures(broken):
    failures = build_quietly(fresh()).failures()
    assert len(failures) == 1
    failure = failures[0]
    assert (failure.name, failure.distribution, failure.version) == (
        "brokenplug",
        "broken-dist",
        "0.9",
    )
    assert broken.reason in failure.reason


def test_broken_plugin_registers_no_components(broken):
    reg = build_quietly(fresh())
    assert "brokensampler" not in reg.names("sampler")
    assert all(c.plugin != "brokenplug" for c in reg.components())
    assert "brokenplug" not in {p.name for p in reg.plugins()}


def test_broken_plugin_leaves_builtins_working(broken):
    reg = build_quietly(fresh())
    assert BUILTIN_NAMES["sampler"] <= set(reg.names("sampler"))
    assert isinstance(reg.create("sampler", "ddim"), DDIM)


def test_broken_plugin_leaves_plugins_before_and_after_it_working(broken):
    reg = build_quietly(fresh())
    assert reg.get("sampler", "alphasampler").distribution == "alpha-dist"
    assert reg.get("sampler", "zetasampler").distribution == "zeta-dist"


def test_second_failing_registration_does_not_leave_the_first_registered(plugin_dist):  # noqa: F811
    plugin_dist(
        "halfplug",
        """
        import diffreg
        from diffreg.builtin.samplers import DDIM

        @diffreg.hookimpl
        def diffreg_register_samplers(register):
            register("first_ok", DDIM)
            register("second_bad", "not callable")
        """,
    )
    reg = build_quietly(fresh())
    assert "first_ok" not in reg.names("sampler")
    assert "factory that is not callable" in reg.failures()[0].reason


def test_failing_second_hook_does_not_leave_the_first_hooks_components(plugin_dist):  # noqa: F811
    plugin_dist(
        "twohookplug",
        """
        import diffreg
        from diffreg.builtin.schedules import CosineSchedule

        @diffreg.hookimpl
        def diffreg_register_schedules(register):
            register("twohook_schedule", CosineSchedule)

        @diffreg.hookimpl
        def diffreg_register_samplers(register):
            raise RuntimeError("second hook fails")
        """,
    )
    reg = build_quietly(fresh())
    assert "twohook_schedule" not in reg.names("schedule")
    assert [f.name for f in reg.failures()] == ["twohookplug"]


def test_invalid_component_name_skips_the_plugin(plugin_dist):  # noqa: F811
    plugin_dist("badnameplug", registering_source("Bad Name"))
    reg = build_quietly(fresh())
    assert "invalid sampler name 'Bad Name'" in reg.failures()[0].reason
    assert "Bad Name" not in reg.names("sampler")


def test_name_already_registered_by_the_same_plugin_name_is_skipped(plugin_dist):  # noqa: F811
    # Two distributions exposing the same entry-point name: the second may not re-register a
    # (kind, name) the first already holds under that plugin name.
    plugin_dist("samename_a", registering_source("clash"), distribution="a-dist", entry_point="samename")
    plugin_dist("samename_b", registering_source("clash"), distribution="b-dist", entry_point="samename")
    reg = build_quietly(fresh())
    assert [(f.name, f.distribution) for f in reg.failures()] == [("samename", "b-dist")]
    assert reg.get("sampler", "samename:clash").distribution == "a-dist"


# -- strict mode -----------------------------------------------------------------------------------


def test_strict_mode_raises_plugin_error_naming_distribution_and_reason(broken):
    reg = fresh(DIFFREG_STRICT_PLUGINS="1")
    with pytest.raises(PluginError) as info:
        reg.names("sampler")
    assert "broken-dist 0.9" in str(info.value)
    assert broken.reason in str(info.value)


def test_strict_mode_keeps_raising_on_later_use(plugin_dist):  # noqa: F811
    plugin_dist("brokenplug", "raise RuntimeError('boom')\n", distribution="broken-dist")
    reg = fresh(DIFFREG_STRICT_PLUGINS="1")
    with pytest.raises(PluginError):
        reg.names("sampler")
    with pytest.raises(PluginError):
        reg.names("sampler")


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_strict_mode_off_values_warn_instead_of_raising(plugin_dist, value):  # noqa: F811
    plugin_dist("brokenplug", "raise RuntimeError('boom')\n", distribution="broken-dist")
    reg = fresh(DIFFREG_STRICT_PLUGINS=value)
    with pytest.warns(PluginWarning, match="broken-dist"):
        reg.names("sampler")


def test_strict_mode_accepts_healthy_plugins(myplug):
    reg = fresh(DIFFREG_STRICT_PLUGINS="1")
    assert reg.get("sampler", "mysampler").plugin == "myplug"
    assert reg.failures() == []


# -- allow and deny lists --------------------------------------------------------------------------


@pytest.fixture
def otherplug(plugin_dist):  # noqa: F811
    return plugin_dist("otherplug", registering_source("othersampler"), distribution="other-dist")


def test_disabled_plugin_is_never_imported(myplug):
    reg = fresh(DIFFREG_DISABLE_PLUGINS="myplug")
    assert "mysampler" not in reg.names("sampler")
    assert not myplug.was_imported()
    assert "myplug" not in sys.modules


def test_disable_list_accepts_distribution_names(myplug):
    reg = fresh(DIFFREG_DISABLE_PLUGINS="myplug-dist")
    assert "mysampler" not in reg.names("sampler")
    assert not myplug.was_imported()


def test_disable_list_leaves_other_plugins_loaded(myplug, otherplug):
    reg = fresh(DIFFREG_DISABLE_PLUGINS="myplug")
    assert reg.get("sampler", "othersampler").plugin == "otherplug"


def test_disabled_broken_plugin_is_not_a_failure(plugin_dist):  # noqa: F811
    dist = plugin_dist("brokenplug", "raise RuntimeError('boom')\n", distribution="broken-dist")
    reg = fresh(DIFFREG_DISABLE_PLUGINS="brokenplug")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        assert reg.failures() == []
    assert not dist.was_imported()


def test_disable_list_with_several_names(myplug, otherplug):
    reg = fresh(DIFFREG_DISABLE_PLUGINS="myplug,other-dist")
    assert not {"mysampler", "othersampler"} & set(reg.names("sampler"))
    assert not myplug.was_imported() and not otherplug.was_imported()


def test_disable_list_ignores_spaces_after_commas(myplug, otherplug):
    reg = fresh(DIFFREG_DISABLE_PLUGINS="otherplug, myplug")
    reg.names("sampler")
    assert not myplug.was_imported()


def test_allow_list_by_entry_point_name_loads_only_that_plugin(myplug, otherplug):
    reg = fresh(DIFFREG_LOAD_PLUGINS="myplug")
    assert reg.get("sampler", "mysampler").plugin == "myplug"
    assert "othersampler" not in reg.names("sampler")
    assert not otherplug.was_imported()


def test_allow_list_by_distribution_name_loads_only_that_plugin(myplug, otherplug):
    reg = fresh(DIFFREG_LOAD_PLUGINS="other-dist")
    assert reg.get("sampler", "othersampler").plugin == "otherplug"
    assert "mysampler" not in reg.names("sampler")
    assert not myplug.was_imported()


def test_blank_allow_list_loads_no_third_party_plugins(myplug, otherplug):
    reg = fresh(DIFFREG_LOAD_PLUGINS="")
    assert all(c.builtin for c in reg.components())
    assert {p.name for p in reg.plugins()} == {"diffreg"}
    assert not myplug.was_imported() and not otherplug.was_imported()


def test_blank_allow_list_keeps_builtins(myplug):
    reg = fresh(DIFFREG_LOAD_PLUGINS="")
    assert BUILTIN_NAMES["schedule"] <= set(reg.names("schedule"))


# -- name resolution -------------------------------------------------------------------------------


@pytest.fixture
def two_plugins_sharing_a_name(plugin_dist):  # noqa: F811
    plugin_dist("pluga", registering_source("shared"), distribution="pluga-dist")
    plugin_dist("plugb", registering_source("shared"), distribution="plugb-dist")


def test_ambiguous_bare_name_raises_listing_both_qualified_names(two_plugins_sharing_a_name):
    with pytest.raises(AmbiguousComponentError) as info:
        fresh().get("sampler", "shared")
    assert info.value.candidates == ["pluga:shared", "plugb:shared"]
    assert "pluga:shared" in str(info.value) and "plugb:shared" in str(info.value)


def test_ambiguous_name_resolves_when_qualified(two_plugins_sharing_a_name):
    reg = fresh()
    assert reg.get("sampler", "pluga:shared").distribution == "pluga-dist"
    assert reg.get("sampler", "plugb:shared").distribution == "plugb-dist"


def test_ambiguous_name_is_listed_once_in_names(two_plugins_sharing_a_name):
    assert fresh().names("sampler").count("shared") == 1


@pytest.fixture
def plugin_shadowing_cosine(plugin_dist):  # noqa: F811
    return plugin_dist(
        "shadowplug",
        registering_source(
            "cosine",
            hook="diffreg_register_schedules",
            base="diffreg.builtin.schedules.CosineSchedule",
        ),
    )


def test_bare_name_shared_with_a_builtin_resolves_to_the_builtin(plugin_shadowing_cosine):
    reg = fresh()
    component = reg.get("schedule", "cosine")
    assert component.builtin
    assert component.factory is CosineSchedule


def test_qualified_name_reaches_a_plugin_component_shadowed_by_a_builtin(plugin_shadowing_cosine):
    component = fresh().get("schedule", "shadowplug:cosine")
    assert component.plugin == "shadowplug"
    assert component.factory is sys.modules["shadowplug"].Component0


def test_third_party_entry_point_named_diffreg_is_refused(plugin_dist):  # noqa: F811
    # the name 'diffreg' is reserved for the built-ins: an impostor must not take their precedence
    plugin_dist("impostor", registering_source("impostor_sampler"), entry_point="diffreg")
    reg = fresh()
    with pytest.warns(PluginWarning, match="reserved for the built-ins"):
        assert "impostor_sampler" not in reg.names("sampler")
    assert reg.failures()[0].distribution == "impostor-dist"
    assert all(c.distribution == "diffreg" for c in reg.components() if c.builtin)


def test_unknown_name_raises_unknown_component_error_which_is_a_key_error(builtins_only):
    with pytest.raises(UnknownComponentError) as info:
        builtins_only.get("schedule", "nonexistent")
    assert isinstance(info.value, KeyError)
    assert (info.value.kind, info.value.name) == ("schedule", "nonexistent")


def test_unknown_name_message_names_the_kind_and_lists_known_names(builtins_only):
    with pytest.raises(KeyError) as info:
        builtins_only.get("schedule", "nonexistent")
    message = str(info.value)
    assert message.startswith("unknown schedule 'nonexistent'")
    assert "cosine, edm, explicit, linear, rectified_flow, scaled_linear, sigmoid, vp" in message


def test_unknown_name_message_suggests_the_closest_name(builtins_only):
    with pytest.raises(UnknownComponentError, match=r"did you mean 'cosine'\?"):
        builtins_only.get("schedule", "cosin")


def test_unknown_plugin_in_qualified_name_raises_unknown_component_error(builtins_only):
    with pytest.raises(UnknownComponentError, match="diffreg:cosine"):
        builtins_only.get("schedule", "nosuchplugin:cosine")


def test_unknown_kind_raises_value_error(builtins_only):
    with pytest.raises(ValueError, match=r"unknown component kind 'schedul'.*did you mean 'schedule'"):
        builtins_only.get("schedul", "cosine")


def test_unknown_kind_in_names_raises_value_error(builtins_only):
    with pytest.raises(ValueError, match="unknown component kind"):
        builtins_only.names("scheduler_typo_kind")


def test_non_string_name_raises_type_error(builtins_only):
    with pytest.raises(TypeError):
        builtins_only.get("schedule", 3)


# -- option checking in create ---------------------------------------------------------------------


def test_create_passes_valid_options_to_the_factory(builtins_only):
    schedule = builtins_only.create("schedule", "cosine", 100, max_beta=0.5)
    assert isinstance(schedule, CosineSchedule)
    assert schedule.max_beta == 0.5
    assert schedule.betas.max() <= 0.5


def test_create_unknown_option_names_component_and_lists_accepted_options(builtins_only):
    with pytest.raises(ComponentOptionError) as info:
        builtins_only.create("schedule", "cosine", 100, max_bta=0.5)
    message = str(info.value)
    assert "schedule 'cosine'" in message
    assert "'max_bta'" in message
    assert "accepted: s, max_beta, rescale_zero_terminal_snr" in message
    assert "did you mean 'max_beta'?" in message


def test_create_wrong_option_type_raises_component_option_error(builtins_only):
    with pytest.raises(ComponentOptionError, match=r"option 'max_beta' must be float, got str: 'x'"):
        builtins_only.create("schedule", "cosine", 100, max_beta="x")


def test_create_bool_for_float_option_raises_component_option_error(builtins_only):
    with pytest.raises(ComponentOptionError, match="max_beta"):
        builtins_only.create("schedule", "cosine", 100, max_beta=True)


def test_create_out_of_range_option_raises_with_the_factorys_message(builtins_only):
    with pytest.raises(ComponentOptionError, match=r"schedule 'cosine': max_beta must be in \(0, 1\], got 2"):
        builtins_only.create("schedule", "cosine", 100, max_beta=2)


def test_component_option_error_is_both_value_error_and_type_error(builtins_only):
    with pytest.raises(ValueError):
        builtins_only.create("schedule", "cosine", 100, max_beta=2)
    with pytest.raises(TypeError):
        builtins_only.create("schedule", "cosine", 100, max_beta="x")


def test_process_wide_create_checks_options():
    with pytest.raises(ComponentOptionError, match="sampler 'ddim' has no option 'etta'"):
        registry.create("sampler", "ddim", etta=0.0)


# -- temporary plugins: Registry.plugin ------------------------------------------------------------


class _TempSampler(DDIM):
    pass


class ClassPlugin:
    @diffreg.hookimpl
    def diffreg_register_samplers(self, register):
        register("temp_sampler", _TempSampler, order=1)


def _namespace_plugin() -> types.SimpleNamespace:
    @diffreg.hookimpl
    def diffreg_register_samplers(register):
        register("temp_sampler", _TempSampler)

    return types.SimpleNamespace(diffreg_register_samplers=diffreg_register_samplers)


def _module_plugin() -> types.ModuleType:
    module = types.ModuleType("temp_module_plugin")
    module.diffreg_register_samplers = _namespace_plugin().diffreg_register_samplers
    return module


PLUGIN_OBJECTS = {
    "class_instance": ClassPlugin,
    "simple_namespace": _namespace_plugin,
    "module": _module_plugin,
}


@pytest.fixture(params=sorted(PLUGIN_OBJECTS))
def plugin_object(request):
    return PLUGIN_OBJECTS[request.param]()


def test_plugin_context_registers_the_plugin_inside_the_block(plugin_object):
    reg = Registry(entry_points=False, env={})
    with reg.plugin(plugin_object, "tempplug") as info:
        component = reg.get("sampler", "temp_sampler")
        assert component.plugin == "tempplug"
        assert component.factory is _TempSampler
        assert [c.qualified_name for c in info.components] == ["tempplug:temp_sampler"]


def test_plugin_context_removes_the_plugin_after_the_block(plugin_object):
    reg = Registry(entry_points=False, env={})
    with reg.plugin(plugin_object, "tempplug"):
        pass
    assert "temp_sampler" not in reg.names("sampler")
    assert "tempplug" not in {p.name for p in reg.plugins()}
    with pytest.raises(UnknownComponentError):
        reg.get("sampler", "tempplug:temp_sampler")


def test_plugin_context_removes_the_plugin_when_the_block_raises():
    reg = Registry(entry_points=False, env={})
    with pytest.raises(RuntimeError, match="inside"), reg.plugin(ClassPlugin(), "tempplug"):
        raise RuntimeError("inside")
    assert "temp_sampler" not in reg.names("sampler")


def test_plugin_context_name_can_be_reused_after_the_block():
    reg = Registry(entry_points=False, env={})
    with reg.plugin(ClassPlugin(), "tempplug"):
        pass
    with reg.plugin(_namespace_plugin(), "tempplug"):
        assert reg.get("sampler", "tempplug:temp_sampler").factory is _TempSampler


def test_plugin_context_component_has_no_distribution():
    reg = Registry(entry_points=False, env={})
    with reg.plugin(ClassPlugin(), "tempplug"):
        component = reg.get("sampler", "temp_sampler")
        assert (component.distribution, component.version) == (None, None)
        assert component.metadata == {"order": 1, "nfe_per_step": 1, "stochastic": False}


def test_process_wide_plugin_context_registers_and_removes():
    with registry.plugin(ClassPlugin(), "tempplug-process"):
        assert registry.get("sampler", "tempplug-process:temp_sampler").factory is _TempSampler
    assert "tempplug-process" not in {p.name for p in registry.plugins()}
    with pytest.raises(UnknownComponentError):
        registry.get("sampler", "tempplug-process:temp_sampler")


def test_plugin_context_rejects_a_broken_plugin_with_plugin_error():
    class Raising:
        @diffreg.hookimpl
        def diffreg_register_samplers(self, register):
            raise RuntimeError("nope")

    reg = Registry(entry_points=False, env={})
    with pytest.warns(PluginWarning), pytest.raises(PluginError, match="RuntimeError: nope"):
        with reg.plugin(Raising(), "rejected"):
            pytest.fail("the block must not run")
    assert reg.failures() == [
        PluginFailure("rejected", None, None, "hook diffreg_register_samplers raised RuntimeError: nope")
    ]


def test_plugin_context_rejects_a_misspelled_hook_on_an_object():
    class Misspelled:
        @diffreg.hookimpl
        def diffreg_register_sampler(self, register):
            register("never", _TempSampler)

    reg = Registry(entry_points=False, env={})
    with pytest.warns(PluginWarning), pytest.raises(PluginError, match="diffreg_register_samplers"):
        with reg.plugin(Misspelled(), "misspelled"):
            pass
    assert "never" not in reg.names("sampler")


def test_plugin_context_name_is_reusable_after_a_rejected_plugin():
    def bad(registrar):
        pass

    reg = Registry(entry_points=False, env={})
    bad_plugin = types.SimpleNamespace(diffreg_register_samplers=diffreg.hookimpl(bad))
    with pytest.warns(PluginWarning), pytest.raises(PluginError):
        with reg.plugin(bad_plugin, "tempplug"):
            pass
    with reg.plugin(ClassPlugin(), "tempplug"):
        assert reg.get("sampler", "temp_sampler").plugin == "tempplug"


def test_add_plugin_refuses_a_name_already_loaded():
    reg = Registry(entry_points=False, env={})
    with reg.plugin(ClassPlugin(), "tempplug"):
        with pytest.raises(ValueError, match="already loaded"):
            reg.add_plugin(_namespace_plugin(), "tempplug")


# -- plugins never break the host (issue 12) -------------------------------------------------------

NOT_UTF8 = b"Metadata-Version: 2.1\nName: %s\nVersion: 2.0\nAuthor: Jos\xe9 M\xfcller\n"


@pytest.fixture
def unreadable_neighbours(plugin_dist):  # noqa: F811
    """Unrelated distributions whose METADATA / entry_points.txt are Latin-1, not UTF-8."""
    plugin_dist("latin_meta", "", distribution="latin-meta", group="console_scripts", metadata=NOT_UTF8 % b"latin-meta")
    plugin_dist("latin_eps", "", distribution="latin-eps", entry_points_text=b"[console_scripts]\ncaf\xe9 = x\n")


def test_unrelated_distribution_with_non_utf8_metadata_breaks_nothing(unreadable_neighbours, myplug):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning: it is not a plugin
        reg = fresh()
        assert reg.get("sampler", "mysampler").distribution == "myplug-dist"
        assert reg.failures() == []


def test_cli_commands_work_beside_a_non_utf8_distribution(unreadable_neighbours, myplug, monkeypatch):
    from click.testing import CliRunner

    from diffreg.cli import main

    for key in ("DIFFREG_LOAD_PLUGINS", "DIFFREG_DISABLE_PLUGINS", "DIFFREG_STRICT_PLUGINS"):
        monkeypatch.delenv(key, raising=False)
    registry.reset()
    try:
        for args in (["list"], ["plugins"], ["list", "sampler", "--json"], ["plugins", "--json"]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
            assert "myplug" in result.output
    finally:
        registry.reset()


@pytest.fixture
def latin_plugin(plugin_dist):  # noqa: F811
    """A diffreg plugin whose own METADATA is not UTF-8."""
    return plugin_dist(
        "latinplug", registering_source("latinsampler"), distribution="latin-plug", metadata=NOT_UTF8 % b"latin-plug"
    )


def test_plugin_with_non_utf8_metadata_loads_named_after_its_folder(latin_plugin):
    component = fresh().get("sampler", "latinsampler")
    assert (component.plugin, component.distribution, component.version) == ("latinplug", "latin_plug", "1.0.0")


@pytest.mark.parametrize("name", ["latinplug", "latin-plug", "latin_plug"])
def test_deny_list_excludes_a_plugin_with_non_utf8_metadata(latin_plugin, name):
    reg = fresh(DIFFREG_DISABLE_PLUGINS=name)
    assert "latinsampler" not in reg.names("sampler")
    assert not latin_plugin.was_imported()


def test_allow_list_excludes_a_plugin_with_non_utf8_metadata(latin_plugin, myplug):
    reg = fresh(DIFFREG_LOAD_PLUGINS="myplug")
    assert "latinsampler" not in reg.names("sampler")
    assert not latin_plugin.was_imported()


BASE_EXCEPTIONS = ["SystemExit(0)", "SystemExit(3)", "KeyboardInterrupt()", "GeneratorExit()"]


@pytest.mark.parametrize("exc", BASE_EXCEPTIONS)
@pytest.mark.parametrize("where", ["import", "hook"])
def test_plugin_raising_a_base_exception_is_skipped_not_fatal(plugin_dist, exc, where):  # noqa: F811
    raise_it = f"raise {exc}"
    source = (
        f"{raise_it}\n"
        if where == "import"
        else f"import diffreg\n@diffreg.hookimpl\ndef diffreg_register_samplers(register):\n    {raise_it}\n"
    )
    plugin_dist("exitplug", source, distribution="exit-dist")
    plugin_dist("afterplug", registering_source("aftersampler"))
    reg = fresh()
    with pytest.warns(PluginWarning, match=type(eval(exc)).__name__):
        names = reg.names("sampler")  # the host survives, and so do the other plugins
    assert "aftersampler" in names
    assert [f.name for f in reg.failures()] == ["exitplug"]


def test_sys_exit_in_a_hook_does_not_end_a_command(plugin_dist, monkeypatch):  # noqa: F811
    from click.testing import CliRunner

    from diffreg.cli import main

    plugin_dist("exitplug", "import diffreg, sys\n@diffreg.hookimpl\ndef diffreg_register_samplers(register):\n    sys.exit(0)\n")
    monkeypatch.delenv("DIFFREG_STRICT_PLUGINS", raising=False)
    registry.reset()
    try:
        result = CliRunner().invoke(main, ["list", "sampler"])
    finally:
        registry.reset()
    assert result.exit_code == 0
    assert "diffreg:ddim" in result.output


def test_a_real_ctrl_c_while_a_plugin_imports_still_stops_the_program(plugin_dist):  # noqa: F811
    # SIGINT delivered by the OS (not raised by the plugin): KeyboardInterrupt must reach the caller
    import signal

    plugin_dist("slowplug", "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(10)\n")
    reg = fresh()
    # a process started in the background by a shell ignores SIGINT (as it should, and so does the
    # registry): give this test the interactive default, Python's KeyboardInterrupt handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            reg.names("sampler")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert reg._built is False  # nothing half-built: the next use starts over


REENTRANT = {
    "import": "from diffreg import registry\nregistry.names('sampler')\n",
    "hook": (
        "import diffreg\nfrom diffreg import registry\n@diffreg.hookimpl\n"
        "def diffreg_register_samplers(register):\n    registry.create('sampler', 'ddim')\n"
    ),
}


@pytest.mark.parametrize("where", sorted(REENTRANT))
def test_plugin_using_the_registry_while_plugins_load_is_skipped_with_a_clear_reason(plugin_dist, monkeypatch, where):  # noqa: F811
    plugin_dist("reentrant", REENTRANT[where], distribution="reentrant-dist")
    plugin_dist("afterplug", registering_source("aftersampler"))
    for key in ("DIFFREG_LOAD_PLUGINS", "DIFFREG_DISABLE_PLUGINS", "DIFFREG_STRICT_PLUGINS"):
        monkeypatch.delenv(key, raising=False)
    registry.reset()  # the plugin calls the process-wide registry while it is being built
    try:
        with pytest.warns(PluginWarning, match="used the diffreg registry while plugins were loading"):
            loaded = registry.plugins()
        failures = registry.failures()
    finally:
        registry.reset()
    assert [p.name for p in loaded].count("diffreg") == 1
    assert "afterplug" in [p.name for p in loaded]
    assert [f.name for f in failures] == ["reentrant"]
    assert "\n" not in failures[0].reason


def test_debug_names_each_plugin_before_importing_it(plugin_dist, capfd):  # noqa: F811
    plugin_dist("hangplug", "raise RuntimeError('stands in for a hang')\n", distribution="hang-dist", version="0.1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        fresh(DIFFREG_DEBUG="1").names("sampler")
    assert "diffreg: importing plugin 'hangplug' (hang-dist 0.1, hangplug)" in capfd.readouterr().err


def test_no_debug_output_without_diffreg_debug(myplug, capfd):
    fresh().names("sampler")
    assert "importing plugin" not in capfd.readouterr().err


def test_third_party_distribution_named_diffreg_is_refused_before_import(plugin_dist):  # noqa: F811
    dist = plugin_dist("fakediffreg", registering_source("fake_sampler"), distribution="diffreg", entry_point="fakeplug")
    reg = fresh()
    with pytest.warns(PluginWarning, match="reserved for the built-ins"):
        assert "fake_sampler" not in reg.names("sampler")
    assert not dist.was_imported()
    with pytest.raises(UnknownComponentError):
        reg.get("sampler", "diffreg:fake_sampler")


def test_skipped_plugin_warning_says_its_code_ran(broken):
    with pytest.warns(PluginWarning, match="its code ran before it failed, and skipping it cannot undo"):
        fresh().names("sampler")


def test_refusal_before_import_does_not_claim_code_ran(plugin_dist):  # noqa: F811
    plugin_dist("impostor", registering_source("impostor_sampler"), entry_point="diffreg")
    with pytest.warns(PluginWarning) as record:
        fresh().names("sampler")
    assert all("code ran" not in str(w.message) for w in record)


@pytest.mark.parametrize("command", [["list"], ["plugins"], ["plugins", "--json"]])
def test_cli_strict_mode_prints_one_line_not_a_traceback(plugin_dist, monkeypatch, command):  # noqa: F811
    from click.testing import CliRunner

    from diffreg.cli import main

    plugin_dist("brokenplug", "raise RuntimeError('boom')\n", distribution="broken-dist")
    monkeypatch.setenv("DIFFREG_STRICT_PLUGINS", "1")
    monkeypatch.delenv("DIFFREG_DEBUG", raising=False)
    registry.reset()
    try:
        result = CliRunner().invoke(main, command)
    finally:
        registry.reset()
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: diffreg skipped plugin 'brokenplug'")


def test_hook_function_without_hookimpl_marker_is_reported(plugin_dist):  # noqa: F811
    plugin_dist(
        "unmarked",
        "from diffreg.builtin.samplers import DDIM\n"
        "def diffreg_register_samplers(register):\n    register('unmarked_sampler', DDIM)\n",
    )
    reg = fresh()
    with pytest.warns(PluginWarning, match="'diffreg_register_samplers' is not marked @diffreg.hookimpl"):
        assert "unmarked_sampler" not in reg.names("sampler")


def test_unmarked_hook_method_on_an_object_is_reported():
    class Unmarked:
        def diffreg_register_samplers(self, register):
            register("never", _TempSampler)

    reg = Registry(entry_points=False, env={})
    with pytest.warns(PluginWarning), pytest.raises(PluginError, match="not marked @diffreg.hookimpl"):
        with reg.plugin(Unmarked(), "unmarked"):
            pass


def test_two_distributions_with_one_entry_point_name_are_not_merged(plugin_dist):  # noqa: F811
    first = plugin_dist("samename_a", registering_source("from_a"), distribution="a-dist", entry_point="samename")
    second = plugin_dist("samename_b", registering_source("from_b"), distribution="b-dist", entry_point="samename")
    reg = fresh()
    with pytest.warns(PluginWarning, match="'samename' is already taken by a-dist 1.0.0"):
        names = reg.names("sampler")
    assert "from_a" in names and "from_b" not in names
    assert first.was_imported() and not second.was_imported()
    (info,) = [p for p in reg.plugins() if p.name == "samename"]
    assert info.distribution == "a-dist"
    assert [c.name for c in info.components] == ["from_a"]


def test_one_module_behind_two_entry_points_keeps_both_names(plugin_dist):  # noqa: F811
    plugin_dist("twonames", registering_source("twosampler"), entry_point="first", more_entry_points=("second",))
    reg = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = reg.get("sampler", "first:twosampler")
    assert reg.get("sampler", "second:twosampler") is first
    (info,) = [p for p in reg.plugins() if p.distribution == "twonames-dist"]
    assert (info.name, info.aliases) == ("first", ("second",))
    assert reg.failures() == []


@pytest.mark.parametrize("bad", ["trailing\n", "trailing ", " leading", "two words", "tab\tname"])
def test_component_names_with_whitespace_are_refused(plugin_dist, bad):  # noqa: F811
    plugin_dist("wsplug", registering_source(bad))
    reg = fresh()
    with pytest.warns(PluginWarning, match="invalid sampler name"):
        reg.names("sampler")
    assert bad not in reg.names("sampler") and bad.strip() not in reg.names("sampler")


@pytest.mark.parametrize("bad", ["trailing\n", "trailing ", "", "has:colon", 3])
def test_plugin_names_with_whitespace_are_refused(bad):
    reg = Registry(entry_points=False, env={})
    with pytest.raises(ValueError, match="invalid plugin name"):
        reg.add_plugin(ClassPlugin(), bad)


def test_unknown_name_among_ten_thousand_does_not_list_them_all(plugin_dist):  # noqa: F811
    plugin_dist(
        "manyplug",
        "import diffreg\nfrom diffreg.builtin.samplers import DDIM\n@diffreg.hookimpl\n"
        "def diffreg_register_samplers(register):\n    for i in range(10_000):\n"
        "        register(f'sampler{i:05d}', DDIM)\n",
    )
    reg = fresh()
    with pytest.raises(UnknownComponentError) as info:
        reg.get("sampler", "sampler00042x")
    message = str(info.value)
    assert len(message) < 400
    assert f"{len(reg.names('sampler'))} known" in message
    assert len(reg.names("sampler")) >= 10_002  # the plugin's and the two built-ins
    assert "closest: sampler00042," in message
    assert "`diffreg list sampler`" in message


def test_unknown_name_suggestion_ignores_case(builtins_only):
    with pytest.raises(UnknownComponentError, match=r"did you mean 'ddim'\?"):
        builtins_only.get("sampler", "DDIM")


@pytest.mark.parametrize("pattern", ["*", "my*", "*-dist"])
def test_allow_list_accepts_shell_patterns(myplug, otherplug, pattern):
    reg = fresh(DIFFREG_LOAD_PLUGINS=pattern)
    assert "mysampler" in reg.names("sampler")
    assert ("othersampler" in reg.names("sampler")) == (pattern != "my*")


def test_deny_list_star_disables_every_third_party_plugin(myplug):
    reg = fresh(DIFFREG_DISABLE_PLUGINS="*")
    assert all(c.builtin for c in reg.components())
    assert not myplug.was_imported()


@pytest.mark.parametrize("var", ["DIFFREG_DISABLE_PLUGINS", "DIFFREG_LOAD_PLUGINS"])
def test_name_in_env_lists_matching_no_installed_plugin_warns(myplug, var):
    reg = fresh(**{var: "myplugg"})
    with pytest.warns(PluginWarning, match=rf"{var} names 'myplugg', which matches no installed plugin.*did you mean 'myplug'"):
        reg.names("sampler")


# -- the documented plugin and its test snippet run as written (issue 15) ---------------------------

DOCS = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()


def _python_block_after(marker: str) -> str:
    rest = DOCS[DOCS.index(marker) :]
    start = rest.index("```python\n") + len("```python\n")
    return rest[start : rest.index("```", start)]


@pytest.fixture(params=["installed", "not installed"])
def docs_package(request, plugin_dist, monkeypatch, tmp_path):  # noqa: F811
    """The docs' ``diffreg_quadratic`` package, installed (a dist-info with its entry point) or only
    importable, and the process-wide registry rebuilt to see it."""
    source = _python_block_after("`diffreg_quadratic/__init__.py`:")
    if request.param == "installed":
        plugin_dist("diffreg_quadratic", source, distribution="diffreg-quadratic", version="0.1.0", entry_point="quadratic")
    else:
        (tmp_path / "bare" / "diffreg_quadratic").mkdir(parents=True)
        (tmp_path / "bare" / "diffreg_quadratic" / "__init__.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path / "bare"))
    for key in ("DIFFREG_LOAD_PLUGINS", "DIFFREG_DISABLE_PLUGINS", "DIFFREG_STRICT_PLUGINS"):
        monkeypatch.delenv(key, raising=False)
    registry.reset()
    yield request.param
    registry.reset()
    sys.modules.pop("diffreg_quadratic", None)


def test_docs_test_snippet_runs_as_written(docs_package):
    namespace: dict = {}
    exec(compile(_python_block_after("## Testing your plugin"), "docs/plugins.md", "exec"), namespace)
    namespace["test_quadratic_schedule_builds"]()
    # the block removed only what it added: an installed plugin is still there
    assert ("quadratic" in registry.names("schedule")) == (docs_package == "installed")


def test_register_plugin_of_an_installed_package_does_not_raise(docs_package):
    import diffreg_quadratic

    from diffreg.pytest_plugin import PluginRegistrar

    with PluginRegistrar() as register_plugin:
        info = register_plugin(diffreg_quadratic, name="mine")
        assert registry.get("sampler", "mine:plain_ddim").factory is diffreg_quadratic.PlainDDIM
        assert "mine" in info.aliases or info.name == "mine"
    with pytest.raises(UnknownComponentError):
        registry.get("sampler", "mine:plain_ddim")


def test_docs_sampler_metadata_is_read_from_its_class(docs_package):
    import diffreg_quadratic

    with registry.plugin(diffreg_quadratic, name="mine"):
        component = registry.get("sampler", "mine:plain_ddim")
    assert {k: component.metadata[k] for k in ("order", "nfe_per_step", "stochastic")} == {
        "order": 1,
        "nfe_per_step": 1,
        "stochastic": False,
    }


# -- provenance, product check, class metadata, collisions (issue 15) ------------------------------


def test_locate_prefers_the_recorded_provider_over_a_builtin(plugin_shadowing_cosine):
    reg = fresh()
    assert reg.get("schedule", "cosine").builtin
    component = reg.locate("schedule", "cosine", provider="shadowplug-dist", version="1.0.0")
    assert component.distribution == "shadowplug-dist" and not component.builtin


def test_locate_without_provider_is_get(builtins_only):
    assert builtins_only.locate("schedule", "cosine") == builtins_only.get("schedule", "cosine")


def test_locate_a_provider_that_is_not_installed_says_what_to_install(builtins_only):
    with pytest.raises(MissingProviderError) as info:
        builtins_only.locate("schedule", "edm", provider="diffreg-edm", version="0.2.0")
    assert str(info.value) == (
        "schedule 'edm' was provided by 'diffreg-edm 0.2.0', which is not installed (or is disabled); "
        "pip install 'diffreg-edm==0.2.0'"
    )
    assert isinstance(info.value, UnknownComponentError) and info.value.provider == "diffreg-edm"


def test_locate_a_provider_that_no_longer_registers_the_name(myplug):
    with pytest.raises(MissingProviderError, match=r"the installed myplug-dist 1.2.3 does not register it"):
        fresh().locate("sampler", "gone", provider="myplug-dist", version="0.9")


def test_locate_a_provider_that_failed_to_load_gives_the_reason(plugin_dist):  # noqa: F811
    plugin_dist("brokenplug", "raise RuntimeError('boom')\n", distribution="broken-dist")
    reg = build_quietly(fresh())
    with pytest.raises(MissingProviderError, match="installed but failed to load: import failed: RuntimeError: boom"):
        reg.locate("sampler", "x", provider="broken-dist")


def test_a_recorded_provider_is_not_replaced_by_another_plugin_with_the_name(myplug, plugin_dist):  # noqa: F811
    plugin_dist("otherprov", registering_source("mysampler"), distribution="otherprov-dist")
    reg = fresh()
    assert reg.locate("sampler", "mysampler", provider="myplug-dist").distribution == "myplug-dist"
    with pytest.raises(AmbiguousComponentError):
        reg.get("sampler", "mysampler")


def test_factory_returning_the_wrong_type_fails_at_create():
    class NotASampler:
        pass

    class WrongProduct:
        @diffreg.hookimpl
        def diffreg_register_samplers(self, register):
            register("wrong", NotASampler)

    reg = Registry(entry_points=False, env={})
    with reg.plugin(WrongProduct(), "wrongplug"):
        with pytest.raises(PluginError, match=r"sampler 'wrongplug:wrong' \(no distribution\) made a .*NotASampler, not a .*Sampler"):
            reg.create("sampler", "wrong")


@pytest.mark.parametrize("kind", sorted(BUILTIN_NAMES))
def test_every_builtin_product_passes_the_product_check(builtins_only, kind):
    product = hookspecs.KINDS[kind].product_type()
    args = (100,) if kind in ("schedule", "timestep_sampler") else ()
    checked = 0
    for component in builtins_only.components(kind):
        params = list(inspect.signature(component.factory).parameters.values())[len(args) :]
        if any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            continue  # needs options with no default (explicit tables, a foreign config)
        try:
            built = builtins_only.create(kind, component.name, *args)
        except ComponentOptionError:
            continue  # needs an option (the explicit grid: times= or sigmas=); a wrong type is a PluginError
        assert isinstance(built, product)
        checked += 1
    assert checked >= 1


def test_metadata_that_contradicts_the_class_skips_the_plugin(plugin_dist):  # noqa: F811
    plugin_dist("liar", registering_source("liar_sampler", order=3))
    reg = fresh()
    with pytest.warns(PluginWarning, match=r"with order=3, but its class says 1"):
        assert "liar_sampler" not in reg.names("sampler")


def test_adding_a_kind_is_one_row_of_the_table(monkeypatch):
    row = hookspecs.Kind("widget", "diffreg_register_widgets", "builtins:tuple", "0.2", "Widgets.")
    monkeypatch.setattr(hookspecs, "COMPONENT_KINDS", (*hookspecs.COMPONENT_KINDS, row))
    monkeypatch.setattr(hookspecs, "KINDS", {**hookspecs.KINDS, "widget": row})
    monkeypatch.setattr(hookspecs, "KIND_HOOKS", {**hookspecs.KIND_HOOKS, "widget": row.hook})
    monkeypatch.setattr(hookspecs, row.hook, hookspecs._make_hookspec(row), raising=False)
    monkeypatch.setattr(registry, "KINDS", (*registry.KINDS, "widget"))

    class WidgetPlugin:
        @diffreg.hookimpl
        def diffreg_register_widgets(self, register):
            register("counting", lambda n: tuple(range(n)))
            register("listing", lambda n: list(range(n)))

    reg = Registry(entry_points=False, env={})
    with reg.plugin(WidgetPlugin(), "widgetplug"):
        assert reg.create("widget", "counting", 3) == (0, 1, 2)
        with pytest.raises(PluginError, match=r"made a builtins.list, not a builtins.tuple"):
            reg.create("widget", "listing", 3)


def test_collisions_list_names_registered_by_several_plugins(two_plugins_sharing_a_name, plugin_shadowing_cosine):
    found = fresh().collisions()
    assert [c.qualified_name for c in found[("sampler", "shared")]] == ["pluga:shared", "plugb:shared"]
    assert [c.qualified_name for c in found[("schedule", "cosine")]] == ["diffreg:cosine", "shadowplug:cosine"]
    assert ("sampler", "ddim") not in found


def test_cli_plugins_flags_name_collisions(two_plugins_sharing_a_name, monkeypatch):
    from click.testing import CliRunner

    from diffreg.cli import main

    for key in ("DIFFREG_LOAD_PLUGINS", "DIFFREG_DISABLE_PLUGINS", "DIFFREG_STRICT_PLUGINS"):
        monkeypatch.delenv(key, raising=False)
    registry.reset()
    try:
        text = CliRunner().invoke(main, ["plugins"]).output
        data = json.loads(CliRunner().invoke(main, ["plugins", "--json"]).output)
    finally:
        registry.reset()
    assert "sampler 'shared': pluga:shared, plugb:shared" in text.split("name collisions")[1]
    assert {"kind": "sampler", "name": "shared", "qualified_names": ["pluga:shared", "plugb:shared"]} in data["collisions"]
