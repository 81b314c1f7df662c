"""The ``cfkit`` command line: config validate/show and plan (run in-process for speed;
tests/test_plugins.py runs the CLI in fresh interpreters)."""

import argparse
import json
import re

import pytest
import torch

from cfkit import config
from cfkit.cli import main, parser
from cfkit.config import Experiment
from cfkit.masks import sequence_layout
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


@pytest.mark.parametrize("copies", [1, 2])
def test_plan_prints_a_readable_summary_and_the_mask_marking_where_each_block_begins(
    capsys, demo_config, copies
):
    args = ("--batch", "1", "--seed", "5", "--set", f"factorisation.copies={copies}")
    rc, out, _ = run(capsys, "plan", str(demo_config), *args, "--show-mask")
    lines = out.splitlines()
    assert rc == 0 and lines[0].startswith("sample 0: ")
    heads = next(line for line in lines if line.startswith("  C"))
    rows = [line for line in lines if line[:2] in ("C ", "c ", "n ")]
    drawn = torch.tensor([[cell == "#" for cell in row[2:].replace("|", "")] for row in rows])
    step_sizes = plan_json(capsys, demo_config, *args)["samples"][0]["step_sizes"]
    cond_len = config.load(demo_config).network_config().cond_len
    layout = sequence_layout(cond_len, step_sizes, copies)
    assert torch.equal(drawn, layout.dense())  # the mask the model trains with, row by row
    letters = "C" * cond_len + "c" * (sum(step_sizes) - step_sizes[-1]) + "n" * sum(step_sizes) * copies
    assert heads[2:].replace("|", "") == letters and [row[0] for row in rows] == list(letters)
    # a | before each block's first column, a rule line above its first row: 2 + copies blocks
    assert heads.count("|") == 1 + copies and out.count("\n  -") == 1 + copies


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


# -- help -------------------------------------------------------------------------------------
def subcommands(command: argparse.ArgumentParser, name: str = "cfkit"):
    """(name, parser) of every subcommand: nested ones and those plugins add included."""
    for action in command._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, sub_parser in action.choices.items():
                yield f"{name} {sub}", sub_parser
                yield from subcommands(sub_parser, f"{name} {sub}")


def shown_default(default) -> str:
    return " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


@pytest.mark.parametrize("name, command", [pytest.param(*c, id=c[0]) for c in subcommands(parser())])
def test_every_help_describes_each_argument_and_shows_each_default(name, command):
    text = " ".join(command.format_help().split())  # argparse wraps lines anywhere
    for action in command._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        what = f"{name} {'/'.join(action.option_strings) or action.dest}"
        assert action.help, f"{what}: no help text"
        default = action.default
        if default is None or default is False or default == []:
            continue  # not given: the text says what then, e.g. --num "one per --class"
        assert re.search(rf"\(default:? {re.escape(shown_default(default))}[);]", text), what


def test_sample_help_says_steps_are_per_ar_step_and_train_help_describes_config_and_set(capsys):
    helps = {name: " ".join(command.format_help().split()) for name, command in subcommands(parser())}
    assert "--steps STEPS diffusion steps per AR step" in helps["cfkit sample"]
    assert "(default: 250)" in helps["cfkit sample"]
    assert "config experiment config (TOML)" in helps["cfkit train"]
    assert "--set KEY=VALUE change one config value" in helps["cfkit train"]
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "(default: 0.0 inf)" in " ".join(capsys.readouterr().out.split())  # --cfg-interval
