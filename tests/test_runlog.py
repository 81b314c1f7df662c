"""A run's trackers: TensorBoard and W&B (offline) hold each logged metric at its step, a
resumed run continues its W&B run, and a run that turns on a tracker whose package (extra) is
missing stops before its first step naming the extra to install, while its config still
validates (the ImageNet configs turn TensorBoard on and are checked on machines without it).

Each tracker's own test skips where its package is not installed (CI installs ``.[test]``
only); the missing-package test needs neither."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from cfkit import checkpoint, plugins, runlog, train
from cfkit import config as configs
from cfkit import data as cfdata
from cfkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "configs" / "digits-tiny.toml"
TINY = ("model.hidden_size=32", "model.depth=2", "train.batch_size=8", "train.max_steps=3",
        "train.log_every=1", "train.ckpt_every=2")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """The digits train shards, written once (the runs then need no cache)."""
    folder = tmp_path_factory.mktemp("shards")
    cfdata.write_shards(plugins.build("datasets", "digits"), folder, "train", prefix="digits")
    return f'data.shards="{folder}"'


def experiment(shards: str, *extra: str) -> configs.Experiment:
    return configs.load(CONFIG, [*TINY, shards, *extra])


def logged(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as {metric: [(step, value)]}."""
    rows = runlog.read_metrics(run / "metrics.csv")
    return {name: [(int(row["step"]), row[name]) for row in rows] for name in runlog.METRICS[1:]}


def assert_same_metrics(tracked: dict, run: Path) -> None:
    """``tracked`` ({metric: [(step, value)]}) holds metrics.csv's rows (written rounded)."""
    for name, rows in logged(run).items():
        assert [step for step, _ in tracked[name]] == [step for step, _ in rows], name
        assert [value for _, value in tracked[name]] == pytest.approx([v for _, v in rows], rel=1e-3), name


def test_tensorboard_holds_each_logged_metric_at_its_step(tmp_path, shards):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train.train(experiment(shards, "train.tensorboard=true"), run, progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert_same_metrics({name: [(e.step, e.value) for e in events.Scalars(name)]
                         for name in runlog.METRICS[1:]}, run)


BLOCK = 32768  # W&B's .wandb file: LevelDB's log format (7-byte record headers in 32 KiB blocks)


def wandb_records(path: Path):
    """The protobuf ``Record``s of a W&B ``.wandb`` run file."""
    from wandb.proto import wandb_internal_pb2

    raw, position, pending = path.read_bytes(), 7, b""  # after the file's ':W&B' header
    assert raw[:4] == b":W&B"
    while position + 7 <= len(raw):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        pending += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last part
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def wandb_history(run: Path) -> tuple[set[str], dict[str, list[tuple[int, float]]]]:
    """The W&B run ids of the offline runs in ``run/wandb`` and their logged metrics by name."""
    ids, history = set(), {}
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        ids.add(path.stem.removeprefix("run-"))
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                items = {item.key or ".".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                for name in runlog.METRICS[1:]:
                    history.setdefault(name, []).append((items["_step"], items[name]))
    return ids, history


@pytest.fixture
def wandb_offline(monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's capture of stdout alone
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    wandb.teardown()


def test_wandb_offline_holds_each_logged_metric_and_a_resumed_run_continues_it(
        tmp_path, shards, wandb_offline):
    run = tmp_path / "run"
    train.train(experiment(shards, "train.wandb=true", "train.max_steps=2"), run, progress=False)
    train.train(train.resume_experiment(run, ["train.max_steps=3"]), run, resume=True, progress=False)
    ids, history = wandb_history(run)
    assert ids == {(run / "wandb-id").read_text()}  # two offline runs of one W&B run
    assert len(list(run.glob("wandb/offline-run-*"))) == 2
    assert_same_metrics(history, run)


@pytest.mark.parametrize("tracker", runlog.TRACKERS)
def test_a_tracker_without_its_package_stops_the_run_before_its_first_step_naming_the_extra(
        monkeypatch, capsys, tmp_path, shards, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import tracker` now fails, as when absent
    for path in sorted((ROOT / "benchmarks" / "imagenet").glob("*.toml")):
        configs.load(path, [f"train.{tracker}=true"])  # a config still validates
    run = tmp_path / "run"
    rc = main(["train", str(CONFIG), "--out", str(run), "--no-progress",
               *[arg for text in (*TINY, shards, f"train.{tracker}=true") for arg in ("--set", text)]])
    err = capsys.readouterr().err
    assert rc == 2
    assert (f"error: train.{tracker} = true needs the {tracker} package, which is not installed: "
            f"pip install 'cfkit[{tracker}]'") in err
    assert not (run / "config.json").exists() and not checkpoint.checkpoints(run)


def test_the_extras_named_are_the_extras_pyproject_declares():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for tracker in runlog.TRACKERS:
        assert [spec.split(">")[0] for spec in extras[tracker]] == [tracker]
