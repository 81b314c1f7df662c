"""Nothing is lost around a run: an output folder is held by one process at a time (the lock
of a killed holder is taken over), ``cfkit sample`` holds one batch in memory however many
images it writes, and a corrupt checkpoint is a one-line error naming the file, or, when
resuming, a warning and the complete checkpoint before it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturbed_checkpoint
from refdata import missing, reference_files

from cfkit import checkpoint, plugins, runlock, runlog
from cfkit import config as configs
from cfkit import data as cfdata
from cfkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "configs" / "digits-tiny.toml"
TINY = ("model.hidden_size=32", "model.depth=2", "train.batch_size=8", "train.log_every=1",
        "train.warmup_steps=2")
WEIGHTS = ("model", "ema", "optimizer")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """The digits train shards, written once (the runs then need no cache)."""
    folder = tmp_path_factory.mktemp("shards")
    cfdata.write_shards(plugins.build("datasets", "digits"), folder, "train", prefix="digits")
    return f'data.shards="{folder}"'


def train_args(run: Path, shards: str, *extra: str) -> list[str]:
    """``cfkit train`` of the tiny digits run into ``run`` with ``extra`` overrides."""
    sets = [arg for text in (*TINY, shards, *extra) for arg in ("--set", text)]
    return ["train", str(CONFIG), "--out", str(run), *sets, "--no-progress"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained (perturbed) 8x8 grey digits model whose tokenizer decodes its latents."""
    experiment = configs.validate({
        "name": "tiny-digits", "method": {"name": "causalfusion"},
        "model": {"input_size": 8, "patch_size": 1, "latent_channels": 1, "hidden_size": 32,
                  "depth": 2, "num_heads": 2, "num_classes": 10},
        "data": {"dataset": {"name": "digits"}, "tokenizer": {"name": "pixels", "channels": 1}},
    })
    return perturbed_checkpoint(experiment, tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture
def processes():
    """Start background processes (``start(argv, **popen)``); each is killed at the end."""
    started: list[subprocess.Popen] = []

    def start(argv: list, **options) -> subprocess.Popen:
        started.append(subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, **options))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def error_line(capsys) -> str:
    """stderr of a failed command, checked to be one ``error:`` line."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# -- 4: one process per output folder ---------------------------------------------------------
def hold(processes, folder: Path) -> subprocess.Popen:
    """Another process holding ``folder`` until it is killed."""
    code = ("import sys, time\nfrom cfkit import runlock\nwith runlock.hold(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(600)")
    holder = processes(["-c", code, folder], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_train_into_a_live_runs_folder_exits_2_naming_its_pid_and_takes_over_a_killed_ones(
        processes, tmp_path, shards, capsys, caplog):
    run = tmp_path / "run"
    first = processes(["-m", "cfkit", *train_args(run, shards, "train.max_steps=100000",
                                                  "train.ckpt_every=100000")],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / "metrics.csv").exists():  # then it holds the folder and trains
        assert first.poll() is None and time.monotonic() < deadline, "the first run did not train"
        time.sleep(0.05)
    for argv in (train_args(run, shards, "train.max_steps=2"), ["train", "--resume", str(run)]):
        assert main(argv) == 2
        assert f"{run} is in use by another cfkit process (pid {first.pid} on " in error_line(capsys)
    first.kill()
    first.wait()
    assert main(train_args(run, shards, "train.max_steps=2")) == 0
    assert f"taking over the lock of a process that ended without releasing it (killed?): pid {first.pid}" \
        in caplog.text
    assert [row["step"] for row in runlog.read_metrics(run / "metrics.csv")] == [1, 2]  # its own only


def test_eval_and_bench_into_a_held_folder_exit_2_naming_the_holder(processes, tmp_path,
                                                                     tiny_checkpoint, capsys):
    out = tmp_path / "out"
    holder = hold(processes, out)
    assert main(["eval", str(tiny_checkpoint), "--metrics", "fid", "--num", "2", "--no-progress",
                 "--out", str(out)]) == 2
    assert f"(pid {holder.pid} on " in error_line(capsys)
    bench = tmp_path / "bench.toml"
    bench.write_text(f'name = "held"\nbase = "{CONFIG}"\n[evaluation]\nmetrics = ["fid"]\n'
                     '[[grids]]\ntable = "6b"\n[grids.axes.method]\ncausalfusion = []\n')
    assert main(["bench", str(bench), "--out", str(out), "--no-progress"]) == 2
    assert f"(pid {holder.pid} on " in error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == [".cfkit.lock"]  # nothing written


def test_under_torchrun_only_rank_0_holds_the_folder(processes, tmp_path, monkeypatch):
    hold(processes, tmp_path)
    monkeypatch.setenv("RANK", "1")
    with runlock.hold(tmp_path):  # rank 0 of its own job holds it for the job
        pass
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(runlock.FolderInUse, match="is in use by another cfkit process"):
        with runlock.hold(tmp_path):
            pass


# -- 5: cfkit sample writes as it goes --------------------------------------------------------
def sample_peak_rss(checkpoint_dir: Path, out: Path, num: int) -> int:
    """Peak resident memory (bytes) of ``cfkit sample --num NUM`` in batches of 64."""
    command = [sys.executable, "-m", "cfkit", "sample", str(checkpoint_dir), "--class", "1", "2",
               "--num", str(num), "--batch-size", "64", "--steps", "2", "--no-progress",
               "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny batches run far faster on one thread
    with (out.parent / f"{out.name}.log").open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, (out.parent / f"{out.name}.log").read_text()
    return usage.ru_maxrss * 1024  # kilobytes on Linux


def test_cli_sample_memory_is_flat_in_num_and_image_i_draws_from_seed_and_i(tmp_path,
                                                                             tiny_checkpoint):
    small = sample_peak_rss(tiny_checkpoint, tmp_path / "small", 64)
    large = sample_peak_rss(tiny_checkpoint, tmp_path / "large", 1024)
    # One 1024-image batch peaks ~130 MB above one of 64; batches of 64 stay within a few MB.
    assert large - small < 40 * 2**20, f"peak RSS {small / 2**20:.0f} MB -> {large / 2**20:.0f} MB"
    few, many = (np.load(tmp_path / name / "samples.npz") for name in ("small", "large"))
    assert many["arr_0"].shape == (1024, 8, 8, 1) and many["latents"].shape == (1024, 1, 8, 8)
    assert many["labels"].tolist() == [1, 2] * 512
    np.testing.assert_array_equal(many["arr_0"][:64], few["arr_0"])  # images 0..63: the same seeds
    assert not np.array_equal(many["arr_0"][64:128], few["arr_0"])
    names = sorted(p.name for p in (tmp_path / "large").iterdir())
    assert names == [f"{i:06d}.png" for i in range(1024)] + ["grid.png", "samples.npz"]


# -- 7: corrupt checkpoints -------------------------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def wider_model(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["experiment"]["model"]["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))


CORRUPTIONS = {  # what is done to the checkpoint -> what the error says, {} its folder
    "truncated weights": (lambda f: truncate(f / "model.safetensors"),
                          "{}/model.safetensors: not a readable safetensors file (truncated or corrupt?)"),
    "config of other shapes": (wider_model, "{0}/model.safetensors does not fit the model of "
                               "{0}/config.json: cond_pos_embed is (1, 4, 32) in the weights but "
                               "(1, 4, 64) in the model (and 41 more)"),
    "truncated config": (lambda f: truncate(f / "config.json"),
                         "{}/config.json: not valid JSON (truncated or corrupt?)"),
}


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize("corrupt,message", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, tiny_checkpoint, capsys,
                                                                   command, corrupt, message):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    corrupt(folder)
    options = {"sample": ["--class", "1", "--steps", "2"], "eval": ["--metrics", "fid", "--num", "2"]}
    assert main([command, str(folder), *options[command], "--no-progress",
                 "--out", str(tmp_path / "out")]) == 2
    assert message.format(folder) in error_line(capsys)


OFFICIAL = reference_files("official_tiny_*.pt")


@pytest.mark.reference
@pytest.mark.skipif(not OFFICIAL, reason=missing("official_tiny_*.pt"))
def test_convert_of_a_truncated_checkpoint_or_kwargs_of_other_shapes_is_a_one_line_error(
        tmp_path, capsys):
    source, out = tmp_path / "official.pt", tmp_path / "out"
    shutil.copy(OFFICIAL[0], source)
    kwargs = json.loads(OFFICIAL[0].with_suffix(".json").read_text())["official_constructor_kwargs"]
    sidecar = source.with_suffix(".json")
    sidecar.write_text(json.dumps({"official_constructor_kwargs": {**kwargs, "num_classes": 3}}))
    assert main(["convert", "official", str(source), "--out", str(out)]) == 2
    assert (f"{source} does not fit the model of {sidecar}: class_embedder.table.weight is "
            f"({kwargs['num_classes'] + 1}, ") in error_line(capsys)
    truncate(source)
    assert main(["convert", "official", str(source), "--out", str(out)]) == 2
    assert f"{source}: not a readable torch checkpoint (truncated or corrupt?)" in error_line(capsys)
    assert not out.exists()


def test_resume_warns_of_a_corrupt_last_checkpoint_and_continues_bitwise_from_the_one_before(
        tmp_path, shards, capsys, caplog):
    run = tmp_path / "run"
    assert main(train_args(run, shards, "train.max_steps=4", "train.ckpt_every=2",
                           "train.keep_last=2")) == 0
    last, intact = run / "checkpoints" / "step-0000004", tmp_path / "step-4"
    shutil.copytree(last, intact)
    truncate(last / "optimizer.safetensors")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert (f"checkpoint {last} is corrupt: {last}/optimizer.safetensors: not a readable "
            "safetensors file (truncated or corrupt?)") in caplog.text
    assert "resuming from step-0000002 instead" in caplog.text
    for name in WEIGHTS:  # step 4 trained again, exactly
        before, again = (checkpoint.read_weights(f / f"{name}.safetensors") for f in (intact, last))
        assert all(torch.equal(again[key], value) for key, value in before.items())
    kept = run / "checkpoints" / "corrupt-step-0000004"  # set aside, not deleted
    assert (kept / "optimizer.safetensors").stat().st_size < (last / "optimizer.safetensors").stat().st_size
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step-0000002", "step-0000004"]

    for folder in checkpoint.checkpoints(run):
        truncate(folder / "ema.safetensors")
    capsys.readouterr()  # the logs of the runs above
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    *warnings, error = capsys.readouterr().err.splitlines()  # the error says "see the warnings above"
    assert error.startswith("error: nothing to resume: every checkpoint in")
    assert len(warnings) == 2 and all(w.startswith("warning: checkpoint ") for w in warnings), warnings
