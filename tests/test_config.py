"""Experiment configs: loading, --set overrides and the TOML written back by dump."""

import tomllib

import pytest

from cfkit import config
from cfkit.config import ConfigError, Experiment


def test_demo_config_validates(demo_config):
    experiment = config.load(demo_config)
    assert isinstance(experiment, Experiment)
    raw = tomllib.loads(demo_config.read_text())
    factorisation = experiment.factorisation
    assert factorisation.schedule.name == raw["factorisation"]["schedule"]["name"]
    assert factorisation.schedule.options == {
        k: v for k, v in raw["factorisation"]["schedule"].items() if k != "name"
    }
    assert factorisation.schedule.kind == "schedules"
    assert factorisation.ordering.kind == "orderings"
    assert experiment.diffusion.num_timesteps == raw["diffusion"]["num_timesteps"]
    assert experiment.diffusion.build().num_timesteps == raw["diffusion"]["num_timesteps"]


@pytest.mark.parametrize("overrides, read, expected", [
    (["seed=7"], lambda e: e.seed, 7),
    (["diffusion.num_timesteps=500"], lambda e: e.diffusion.num_timesteps, 500),
    (["factorisation.schedule.gamma=0.8"], lambda e: e.factorisation.schedule.options, {"gamma": 0.8}),
    (["factorisation.schedule.gamma=0.8"], lambda e: e.factorisation.schedule.build().gamma, 0.8),
    (["name=my-run"], lambda e: e.name, "my-run"),  # not a TOML literal: taken as a string
    (['name="run 2"'], lambda e: e.name, "run 2"),
    (["diffusion.beta_schedule=cosine"], lambda e: e.diffusion.beta_schedule, "cosine"),
    (["factorisation.per_sample=true"], lambda e: e.factorisation.per_sample, True),
    (["factorisation.copies=4", "factorisation.copies=3"], lambda e: e.factorisation.copies, 3),
    (["factorisation.ordering=raster"], lambda e: e.factorisation.ordering.name, "raster"),
    (['factorisation.ordering={ name = "block-raster", block = 2 }'],
     lambda e: (e.factorisation.ordering.name, e.factorisation.ordering.options),
     ("block-raster", {"block": 2})),
    (['factorisation.schedule={ name = "explicit" }', "factorisation.schedule.sizes=[16, 48]"],
     lambda e: e.factorisation.schedule.options, {"sizes": [16, 48]}),
    (["factorisation.ar_weighting.w_max=3"], lambda e: e.factorisation.ar_weighting.build().w_max,
     3.0),
])
def test_set_overrides_one_value_of_any_toml_type(demo_config, overrides, read, expected):
    value = read(config.load(demo_config, overrides))
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text, path, value", [
    ("a=1", ["a"], 1), ("a.b=2.5", ["a", "b"], 2.5), ("a.b.c=[1, 2]", ["a", "b", "c"], [1, 2]),
    ("a=x=y", ["a"], "x=y"), ('a="q"', ["a"], "q"), ("a=false", ["a"], False),
    ("a={ name = 'n' }", ["a"], {"name": "n"}), (" a.b = 3", ["a", "b"], 3),
])
def test_parse_override_reads_toml_literals_and_falls_back_to_strings(text, path, value):
    assert config.parse_override(text) == (path, value)


@pytest.mark.parametrize("override, message", [
    ("seed", "KEY=VALUE"), ("seed.x=1", "'seed' is not a table"),
])
def test_malformed_overrides_raise_config_error(demo_config, override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(demo_config, [override])


def test_missing_and_malformed_files_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "absent.toml")
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(tmp_path / "bad.toml")


ROUND_TRIP_OVERRIDES = [
    [],
    ['factorisation.schedule={ name = "explicit", sizes = [8, 24, 32] }',
     'factorisation.ordering={ name = "dilated", dilation = 2 }',
     'factorisation.diffusion_weighting={ name = "min-snr", gamma = 5.0 }',
     "factorisation.per_sample=true", "factorisation.copies=4", 'name="a \\"quoted\\" name"'],
    ["factorisation.schedule.gamma=0.0", "diffusion.beta_schedule=cosine",
     "diffusion.prediction=v", "seed=-3", 'factorisation.timesteps="per-step"'],
]


@pytest.mark.parametrize("overrides", ROUND_TRIP_OVERRIDES)
def test_dump_round_trips_to_the_same_model(demo_config, tmp_path, overrides):
    experiment = config.load(demo_config, overrides)
    written = tmp_path / "resolved.toml"
    written.write_text(config.dump(experiment))
    again = config.load(written)
    assert again == experiment
    assert again.model_dump() == experiment.model_dump()


def test_dump_round_trips_strings_with_control_characters(tmp_path):
    experiment = config.validate({"name": "two\nlines\tand a tab"})
    written = tmp_path / "resolved.toml"
    written.write_text(config.dump(experiment))
    assert config.load(written) == experiment
