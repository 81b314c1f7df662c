"""The ``cfkit`` command line: config validate/show and plan (run in-process for speed;
tests/test_plugins.py runs the CLI in fresh interpreters)."""

import json

import pytest

from cfkit import config
from cfkit.cli import main
from cfkit.config import Experiment
from cfkit.plugins import registry


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_config_validate_accepts_the_demo_config(capsys, demo_config):
    rc, out, err = run(capsys, "config", "validate", str(demo_config))
    assert (rc, err) == (0, "")
    assert out == f"{demo_config}: valid\n"


def orderings():
    return registry().names("orderings")


# (--set overrides or extra TOML text, the field, the bad value, the allowed values)
BAD_CONFIGS = {
    "unknown ordering": (
        ["factorisation.ordering.name=zigzag"], "factorisation.ordering", "'zigzag'",
        lambda: "allowed: " + ", ".join(orderings()),
    ),
    "unknown beta schedule": (
        ["diffusion.beta_schedule=quadratic"], "diffusion.beta_schedule", "'quadratic'",
        lambda: "'linear' or 'cosine'",
    ),
    "exp-decay gamma above 1": (
        ["factorisation.schedule.gamma=1.5"], "factorisation.schedule", "1.5",
        lambda: "gamma must be in [0, 1]",
    ),
    "exp-decay gamma below 0": (
        ["factorisation.schedule.gamma=-0.25"], "factorisation.schedule", "-0.25",
        lambda: "gamma must be in [0, 1]",
    ),
    "unknown top-level key": (
        'colour = "red"\n', "colour", "'red'", lambda: "allowed keys: name, seed, method",
    ),
    "AR-only weighting on the diffusion axis": (
        ['factorisation.diffusion_weighting="linear"'], "factorisation.diffusion_weighting",
        "'linear'", lambda: "allowed: constant, min-snr",
    ),
}


def bad_config_args(demo_config, tmp_path, change):
    if isinstance(change, str):  # TOML text put in front of the demo config
        path = tmp_path / "bad.toml"
        path.write_text(change + demo_config.read_text())
        return [str(path)]
    return [str(demo_config), *(arg for override in change for arg in ("--set", override))]


@pytest.mark.parametrize("case", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_config_validate_exits_2_naming_the_field_the_bad_value_and_the_allowed_values(
    capsys, demo_config, tmp_path, case
):
    change, field, value, allowed = case
    rc, out, err = run(capsys, "config", "validate", *bad_config_args(demo_config, tmp_path, change))
    assert rc == 2 and out == ""
    assert err.startswith("error: ")
    line = next(line for line in err.splitlines() if field in line)
    assert line.split("error: ")[-1].startswith(f"{field}: ")
    assert value in line
    assert allowed() in line


def test_unknown_key_error_lists_the_allowed_keys(capsys, demo_config, tmp_path):
    args = bad_config_args(demo_config, tmp_path, 'colour = "red"\n')
    rc, _, err = run(capsys, "config", "validate", *args)
    assert rc == 2
    assert all(key in err for key in Experiment.model_fields)


@pytest.mark.parametrize("overrides", [
    [],
    ['factorisation.schedule={ name = "explicit", sizes = [8, 56] }', "factorisation.copies=2",
     'factorisation.ordering={ name = "block-raster", block = 4 }', "seed=11"],
])
def test_config_show_prints_toml_that_round_trips(capsys, demo_config, tmp_path, overrides):
    sets = [arg for override in overrides for arg in ("--set", override)]
    rc, out, err = run(capsys, "config", "show", str(demo_config), *sets)
    assert (rc, err) == (0, "")
    shown = tmp_path / "shown.toml"
    shown.write_text(out)
    assert config.load(shown) == config.load(demo_config, overrides)
    rc, again, _ = run(capsys, "config", "show", str(shown))
    assert (rc, again) == (0, out)


def plan_json(capsys, demo_config, *args):
    rc, out, err = run(capsys, "plan", str(demo_config), "--json", *args)
    assert (rc, err) == (0, "")
    return json.loads(out)


@pytest.mark.parametrize("args", [
    ("--batch", "3"),
    ("--batch", "4", "--seed", "5", "--set", "factorisation.per_sample=true",
     "--set", "factorisation.copies=2", "--set", 'factorisation.timesteps="per-step"'),
    ("--batch", "1", "--set", 'factorisation.schedule={ name = "fixed", steps = 64 }'),
])
def test_plan_json_gives_splits_of_L_and_permutations(capsys, demo_config, args):
    report = plan_json(capsys, demo_config, *args)
    h, w = report["grid"]
    num_tokens = h * w
    batch = int(args[1])
    assert len(report["samples"]) == batch
    for sample in report["samples"]:
        sizes = sample["step_sizes"]
        assert sum(sizes) == num_tokens and min(sizes) >= 1
        assert sorted(sample["order"]) == list(range(num_tokens))
        assert len(sample["loss_weights"]) == num_tokens
        assert all(len(row) == len(sizes) for row in sample["timesteps"])
    assert 0 < report["mask_density"] < 1


def test_plan_keeps_all_clean_tokens_only_for_per_sample_splits(capsys, demo_config):
    shared = plan_json(capsys, demo_config, "--batch", "2")
    per_sample = plan_json(capsys, demo_config, "--batch", "2", "--set",
                           "factorisation.per_sample=true")
    h, w = shared["grid"]
    last = shared["samples"][0]["step_sizes"][-1]
    assert shared["samples"][0]["step_sizes"] == shared["samples"][1]["step_sizes"]
    assert per_sample["samples"][0]["step_sizes"] != per_sample["samples"][1]["step_sizes"]
    # both have the same condition tokens in front: T = C + clean + L
    assert shared["sequence_length"] - (h * w - last) == per_sample["sequence_length"] - h * w


def test_plan_is_reproducible_from_the_seed(capsys, demo_config):
    first = plan_json(capsys, demo_config, "--seed", "3")
    assert plan_json(capsys, demo_config, "--seed", "3") == first
    assert plan_json(capsys, demo_config, "--seed", "4") != first


def test_plan_prints_a_readable_summary_and_the_mask(capsys, demo_config):
    rc, out, _ = run(capsys, "plan", str(demo_config), "--batch", "1", "--show-mask")
    lines = out.splitlines()
    assert rc == 0 and lines[0].startswith("sample 0: ")
    mask_rows = [line for line in lines if set(line) <= {"#", "."} and line]
    length = int(next(line for line in lines if line.startswith("sequence length T=")).split("=")[1]
                 .split(",")[0])
    assert len(mask_rows) == length and all(len(row) == length for row in mask_rows)


def test_plan_of_a_missing_config_exits_2(capsys, tmp_path):
    rc, _, err = run(capsys, "plan", str(tmp_path / "absent.toml"))
    assert rc == 2 and "not found" in err


def test_a_linear_schedule_too_short_to_build_is_a_config_error(capsys, demo_config):
    override = ("--set", "diffusion.num_timesteps=10")
    rc, _, err = run(capsys, "config", "validate", str(demo_config), *override)
    assert rc == 2 and "num_timesteps > 20, got 10" in err
    override = ("--set", "diffusion.num_timesteps=21")
    assert run(capsys, "config", "validate", str(demo_config), *override)[0] == 0
    assert run(capsys, "plan", str(demo_config), "--json", *override)[0] == 0
