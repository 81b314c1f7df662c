"""The plugin registry: lookup errors, duplicate names, and a real third-party plugin."""

import ast
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pluggy
import pytest

import cfkit
from cfkit import hookspecs
from cfkit.plugins import (
    DuplicateComponentError,
    NoDefaultError,
    Registry,
    UnknownComponentError,
    plugin_manager,
    registry,
)

SNAKE_PACKAGE = Path(__file__).parent / "thirdparty" / "cfkit-snake-ordering"
BUILT_INS = {
    "orderings": {"raster", "random", "block-raster", "dilated"},
    "schedules": {"fixed", "uniform", "exp-decay", "explicit"},
    "weightings": {"linear", "cosine", "constant", "min-snr"},
    "timestep_samplers": {"shared", "per-step"},
}


class FirstZigzag:
    @staticmethod
    @cfkit.hookimpl
    def register_orderings(register):
        register("zigzag", object)


class SecondZigzag:
    @staticmethod
    @cfkit.hookimpl
    def register_orderings(register):
        register("zigzag", dict)


def module_plugin(name: str, kind: str, component: str) -> types.ModuleType:
    """A plugin module (as an entry point would load) registering one component."""
    module = types.ModuleType(name)

    def register_hook(register):
        register(component, object)

    setattr(module, f"register_{kind}", cfkit.hookimpl(register_hook))
    return module


@pytest.mark.parametrize("kind", hookspecs.KINDS)
def test_every_kind_is_queryable(kind):
    names = registry().names(kind)
    assert names == sorted(names)
    assert BUILT_INS.get(kind, set()) <= set(names)
    for name in names:
        component = registry().component(kind, name)
        assert (component.kind, component.name) == (kind, name) and component.provider
    with pytest.raises(UnknownComponentError, match=f"unknown {kind} name 'no-such-thing'"):
        registry().component(kind, "no-such-thing")


@pytest.mark.parametrize("kind", sorted(BUILT_INS))
def test_unknown_name_error_lists_the_known_names_of_that_kind(kind):
    with pytest.raises(UnknownComponentError) as error:
        cfkit.build(kind, "no-such-thing")
    message = str(error.value)
    assert "'no-such-thing'" in message
    known = message.split("known: ", 1)[1].split(", ")
    assert known == registry().names(kind)
    others = set().union(*(BUILT_INS[k] for k in BUILT_INS if k != kind)) - BUILT_INS[kind]
    assert not others & set(known)


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(UnknownComponentError) as error:
        registry().names("colours")
    assert all(kind in str(error.value) for kind in hookspecs.KINDS)
    assert isinstance(error.value, KeyError)


def test_an_extra_plugin_adds_components():
    extra = Registry(plugin_manager(extra_plugins=(FirstZigzag, module_plugin("mod", "metrics", "fad"))))
    assert extra.component("orderings", "zigzag").provider == "FirstZigzag"
    assert extra.component("metrics", "fad").provider == "mod"
    assert set(extra.names("orderings")) == set(registry().names("orderings")) | {"zigzag"}
    assert "zigzag" not in registry().names("orderings")  # the process registry is untouched


def test_two_plugins_registering_one_name_raise_naming_both_providers():
    with pytest.raises(DuplicateComponentError) as error:
        Registry(plugin_manager(extra_plugins=(FirstZigzag, SecondZigzag)))
    message = str(error.value)
    assert "orderings" in message and "'zigzag'" in message
    assert "'FirstZigzag'" in message and "'SecondZigzag'" in message


def test_a_plugin_reusing_a_built_in_name_raises_naming_both_providers():
    with pytest.raises(DuplicateComponentError) as error:
        Registry(plugin_manager(extra_plugins=(module_plugin("shadow", "schedules", "fixed"),)))
    message = str(error.value)
    assert "'fixed'" in message and "'shadow'" in message
    assert registry().component("schedules", "fixed").provider in message


def test_built_ins_are_entry_point_plugins_of_cfkit():
    for kind, names in BUILT_INS.items():
        for name in names:
            assert registry().component(kind, name).provider == f"cfkit:{kind}"


def parse_plugins_table(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.strip()]


def test_cfkit_plugins_prints_kind_name_and_plugin_of_every_component(cfkit_cli):
    result = cfkit_cli("plugins", check_rc=0)
    header, *rows = parse_plugins_table(result.stdout)
    assert header == ["kind", "name", "plugin"]
    expected = [[c.kind, c.name, c.provider] for c in registry().components()]
    assert sorted(rows) == sorted(expected)
    assert ["orderings", "raster", "cfkit:orderings"] in rows


# --- a third-party package, installed for real -------------------------------------------

SNAKE_CHECK = """
import sys
from cfkit import config
experiment = config.load(sys.argv[1])
order = experiment.factorisation.ordering.build()(2, (3, 3))
assert order.tolist() == [[0, 1, 2, 5, 4, 3, 6, 7, 8]] * 2, order.tolist()
print("snake order ok")
"""


@pytest.fixture(scope="module")
def snake_site(tmp_path_factory) -> Path:
    """A folder with cfkit-snake-ordering installed (offline, no build isolation)."""
    root = tmp_path_factory.mktemp("snake")
    source = shutil.copytree(SNAKE_PACKAGE, root / "src")  # the build writes next to the source
    target = root / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--no-cache-dir", "--disable-pip-version-check", "--quiet",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (target / "cfkit_snake" / "__init__.py").is_file()
    return target


@pytest.fixture(scope="module")
def snake_config(demo_config, tmp_path_factory) -> Path:
    """The demo config with the snake ordering."""
    path = tmp_path_factory.mktemp("snake-config") / "snake.toml"
    path.write_text(demo_config.read_text().replace(
        'ordering = { name = "random" }', 'ordering = { name = "snake" }'
    ))
    assert 'ordering = { name = "snake" }' in path.read_text()
    return path


@pytest.fixture(scope="module")
def snake_runs(cfkit_cli_together, snake_site, snake_config):
    """The CLI runs the snake tests look at, with and without the plugin on PYTHONPATH."""
    site, config = str(snake_site), str(snake_config)
    return cfkit_cli_together({
        "validate": (("config", "validate", config), {"pythonpath": site}),
        "plugins": (("plugins",), {"pythonpath": site}),
        "build": ((config,), {"pythonpath": site, "python": ("-c", SNAKE_CHECK)}),
        "validate without plugin": (("config", "validate", config), {}),
    })


def test_installed_snake_plugin_validates_a_config_using_it(snake_runs, cli_rc):
    cli_rc(snake_runs["validate"], 0)
    assert "valid" in snake_runs["validate"].stdout


def test_installed_snake_plugin_is_listed_with_its_provider(snake_runs, cli_rc):
    cli_rc(snake_runs["plugins"], 0)
    rows = parse_plugins_table(snake_runs["plugins"].stdout)
    assert ["orderings", "snake", "cfkit-snake-ordering:snake"] in rows


def test_installed_snake_plugin_builds_the_boustrophedon_order(snake_runs, cli_rc):
    cli_rc(snake_runs["build"], 0)
    assert "snake order ok" in snake_runs["build"].stdout


def test_without_the_snake_plugin_the_config_fails_listing_allowed_orderings(snake_runs, cli_rc):
    result = snake_runs["validate without plugin"]
    cli_rc(result, 2)
    assert "factorisation.ordering" in result.stderr and "'snake'" in result.stderr
    allowed = result.stderr.split("allowed: ", 1)[1].splitlines()[0].split(", ")
    assert allowed == registry().names("orderings")
    assert BUILT_INS["orderings"] <= set(allowed)


class HelloCommand:
    @staticmethod
    @cfkit.hookimpl
    def register_commands(subparsers):
        p = subparsers.add_parser("hello", help="greet")
        p.add_argument("--name", required=True)
        p.set_defaults(run=lambda args: print(f"hello {args.name}") or 3)


def test_a_plugin_adds_a_subcommand_through_register_commands(monkeypatch, capsys):
    from cfkit import cli
    from cfkit import plugins as cfplugins

    assert "hello" not in cli.parser().format_help()
    extra = Registry(plugin_manager(extra_plugins=(HelloCommand,)), allow_conflicts=True)
    monkeypatch.setattr(cfplugins, "_installed", lambda: extra)
    assert "hello" in cli.parser().format_help()
    assert cli.main(["hello", "--name", "world"]) == 3
    assert capsys.readouterr().out == "hello world\n"


def test_every_method_declares_known_capabilities():
    from cfkit.methods import CAPABILITIES

    for name in registry().names("methods"):
        declared = getattr(registry().component("methods", name).factory, "capabilities", None)
        assert isinstance(declared, frozenset), f"method {name!r} declares no capabilities"
        assert declared <= set(CAPABILITIES), (name, declared)


def test_built_in_methods_declare_what_they_can_do():
    from cfkit.methods import AR_PLANS, CAPTIONING, NOISE_PREDICTION, SAMPLING, TEXT_CONDITIONING

    def declared(name):
        return registry().component("methods", name).factory.capabilities

    assert declared("causalfusion") == declared("incontext-dit") == {SAMPLING, AR_PLANS, NOISE_PREDICTION}
    assert declared("dit") == {SAMPLING, NOISE_PREDICTION}
    for name in ("causalfusion-multimodal", "transfusion"):
        assert declared(name) == {SAMPLING, AR_PLANS, CAPTIONING, TEXT_CONDITIONING}


def test_can_asks_the_declaration_and_refuses_unknown_capabilities():
    from cfkit.methods import CAUSAL_GENERATION, can
    from cfkit.transformer import CausalTransformer

    assert can(CausalTransformer, CAUSAL_GENERATION)
    assert not can(object(), CAUSAL_GENERATION)  # declares nothing: can do nothing
    with pytest.raises(ValueError, match="unknown capability 'kv-cache'; allowed: sampling"):
        can(CausalTransformer, "kv-cache")


# --- config defaults: set by the plugins, never named by the core ----------------------------

CORE = Path(cfkit.__file__).parent
# Two core words that a plugin also registers: `cfkit fid` is the core's own command (FID
# between two sample sets, cfkit.metrics), and "official" is the reference checkpoint layout
# that cfkit.convert reads (the causalfusion plugin registers its converter under that constant).
CORE_NAMES = {("cli.py", "fid"), ("convert.py", "official")}


class RasterDefaults:
    @staticmethod
    @cfkit.hookimpl
    def register_defaults(register):
        register("sampling.order", "raster")
        register("factorisation.ordering", "raster")


def core_vocabulary() -> set[str]:
    """The core's own words that happen to be component names too: the β schedules, the
    learning-rate schedules and ADM's strided respacing."""
    from cfkit import config, diffusion

    return {*diffusion.BETA_SCHEDULES, *config.LR_SCHEDULES, diffusion.STRIDED}


def named_components(path: Path, names: set[str]) -> set[str]:
    """The string constants of the Python file ``path`` that are one of ``names``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names}


def bare_registry(*extra) -> Registry:
    """A registry of ``extra`` plugins only: no entry point, so no built-in."""
    manager = pluggy.PluginManager("cfkit")
    manager.add_hookspecs(hookspecs)
    for plugin in extra:
        manager.register(plugin, name=getattr(plugin, "__name__", None))
    return Registry(manager)


def components_of(module: types.ModuleType) -> types.ModuleType:
    """A plugin with the component hooks of the plugin ``module`` and not its defaults."""
    plugin = types.ModuleType(f"{module.__name__}.components")
    for hook in (f"register_{kind}" for kind in hookspecs.KINDS):
        if hasattr(module, hook):
            setattr(plugin, hook, getattr(module, hook))
    return plugin


def test_the_core_names_no_registered_component():
    # cfkit.perf is the performance suite, packaged so that an installed cfkit runs it: it
    # measures the built-in methods by name, as the benchmarks do, and the engine never imports it.
    names = {c.name for c in registry().components()} - core_vocabulary()
    engine = [path for path in sorted(CORE.rglob("*.py")) if path.relative_to(CORE).parts[0] != "perf"]
    named = {(path.relative_to(CORE).as_posix(), name)
             for path in engine for name in named_components(path, names)}
    assert named - CORE_NAMES == set()


def test_the_engine_never_imports_the_perf_suite():
    engine = [path for path in sorted(CORE.rglob("*.py")) if path.relative_to(CORE).parts[0] != "perf"]
    text = {path.name: path.read_text(encoding="utf-8") for path in engine if path.name != "cli.py"}
    importers = [name for name, code in text.items()  # cli.py's cfkit bench --perf runs it
                 if "from cfkit.perf" in code or "import cfkit.perf" in code]
    assert importers == []


def test_importing_the_core_loads_no_plugin():
    code = ("import sys, cfkit.config, cfkit.generate, cfkit.bench.schema, cfkit.cli; "
            "print([m for m in sys.modules if m.startswith('cfkit_plugins')])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=CORE.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_built_in_plugins_set_the_defaults_of_an_experiment():
    from cfkit import config

    experiment = config.validate({"data": {"shards": "shards/"}})
    factorisation = experiment.factorisation.model_dump()
    assert factorisation["schedule"] == registry().default("factorisation.schedule")
    assert experiment.method.name == registry().default("method")
    assert experiment.data.tokenizer.name == registry().default("data.tokenizer")
    providers = {d.key: d.provider for d in registry().defaults()}
    assert providers["factorisation.ordering"] == providers["method"] == "cfkit:causalfusion"
    assert providers["sampling.order"] == "cfkit:orderings"
    assert providers["sampling.sampler"] == "cfkit:samplers"


def test_a_default_is_a_copy_free_to_change():
    registry().default("evaluation.metrics").append("changed")
    assert "changed" not in registry().default("evaluation.metrics")


def test_a_plugin_default_reaches_the_config_and_the_sampling_options(monkeypatch):
    from cfkit_plugins import orderings, schedules, timestep_samplers, weightings

    from cfkit import config
    from cfkit import plugins as cfplugins
    from cfkit.generate import SamplingOptions

    built_ins = (orderings, schedules, weightings, timestep_samplers)
    only = bare_registry(*map(components_of, built_ins), RasterDefaults)
    monkeypatch.setattr(cfplugins, "_installed", lambda: only)
    assert SamplingOptions(sampler=object()).order == "raster"
    given = {"schedule": {"name": "fixed", "steps": 2}, "ar_weighting": "linear",
             "diffusion_weighting": "constant", "timesteps": "shared"}
    assert config.validate(given, config.Factorisation).ordering.name == "raster"
    with pytest.raises(config.ConfigError, match="^factorisation.schedule: required, as no installed "
                                                 "plugin sets a default"):
        config.validate({}, config.Factorisation)


def test_a_second_plugin_setting_a_default_clashes_naming_both_providers():
    with pytest.raises(DuplicateComponentError) as error:
        Registry(plugin_manager(extra_plugins=(RasterDefaults,)))
    message = str(error.value)
    assert message.startswith("the default of 'sampling.order' is registered twice: by "
                              "'cfkit:orderings' and by 'RasterDefaults'")
    clashing = Registry(plugin_manager(extra_plugins=(RasterDefaults,)), allow_conflicts=True)
    assert clashing.default("sampling.order") == registry().default("sampling.order")


def test_an_unset_default_is_an_error_naming_the_key():
    with pytest.raises(NoDefaultError, match="no.such.key: required, as no installed plugin sets a "
                                             "default for it"):
        registry().default("no.such.key")


def test_with_no_plugin_every_default_naming_a_component_is_required(monkeypatch):
    from cfkit import config
    from cfkit import plugins as cfplugins
    from cfkit.generate import GenerationError, SamplingOptions

    monkeypatch.setattr(cfplugins, "_installed", bare_registry)
    with pytest.raises(config.ConfigError, match="^method: required"):
        config.validate({"data": {"shards": "shards/"}})
    with pytest.raises(GenerationError, match="^sampling.order: required"):
        SamplingOptions()
    assert SamplingOptions(order="snake", sampler=object()).order == "snake"


def test_sampling_help_shows_the_plugin_default(capsys):
    from cfkit import cli

    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"a registered ordering (default {registry().default('sampling.order')})" in help_text
    assert f"a registered sampler (default {registry().default('sampling.sampler')})" in help_text
