"""The trainer: resume continues bitwise, a non-finite step stops with the last good checkpoint
intact, SIGTERM saves before exiting, a SIGKILLed run resumes onto the uninterrupted curve,
DDP and FSDP (2 gloo processes) follow the one-process curve, and the run folder holds the
metrics columns, loss.png and the last N checkpoints, each written as temp + rename.

Runs are a tiny digits CausalFusion (hidden 32, depth 2, batch 8, 20 steps) compared with one
shared uninterrupted run (``reference``). Subprocesses cover what needs a real process:
signals and torchrun.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

from cfkit import checkpoint, plugins, runlog, train
from cfkit import config as configs
from cfkit import data as cfdata
from cfkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "configs" / "digits-tiny.toml"
TINY = ("model.hidden_size=32", "model.depth=2", "train.batch_size=8", "train.max_steps=20",
        "train.ckpt_every=5", "train.keep_last=2", "train.log_every=1", "train.warmup_steps=5")
WEIGHTS = ("model", "ema", "optimizer")
# 2 processes vs 1 sum the loss and the gradients in another order, so they agree to rounding:
# observed 1e-6 on the CSV's 6-decimal losses (its rounding) and 1.2e-7 on the weights.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6
# QK-norm's key bias shifts every logit of a query equally, which softmax ignores: its
# gradient is zero up to rounding, and AdamW (eps 1e-15) turns that rounding into +-lr steps.
GRADIENT_FREE = re.compile(r"attn\.k_norm\.bias$")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """The digits train shards, written once (the runs then need no cache)."""
    folder = tmp_path_factory.mktemp("shards")
    cfdata.write_shards(plugins.build("datasets", "digits"), folder, "train", prefix="digits")
    return f'data.shards="{folder}"'


def overrides(shards: str, *extra: str) -> list[str]:
    """The tiny run on ``shards``, then ``extra`` overrides."""
    return [*TINY, shards, *extra]


def sets(shards: str, *extra: str) -> list[str]:
    """``overrides`` as ``--set`` arguments."""
    return [arg for text in overrides(shards, *extra) for arg in ("--set", text)]


def cli_train(capsys, *argv: str) -> tuple[int, str]:
    """``cfkit train ARGV`` in this process: (exit status, stderr)."""
    rc = main(["train", *argv, "--no-progress"])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> Path:
    """An uninterrupted 20-step run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train.train(configs.load(CONFIG, overrides(shards)), run, progress=False)
    return run


def losses(run: Path) -> list[tuple[str, str]]:
    """(step, loss) of metrics.csv as written, for bitwise comparison."""
    return [(row["step"], row["loss"]) for row in read_rows(run)]


def read_rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def step_of(folder: Path) -> int:
    return json.loads((folder / "state.json").read_text())["step"]


def saved(run: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:07d}" / f"{name}.safetensors")


def assert_same_checkpoint(run: Path, other: Path, step: int) -> None:
    for name in WEIGHTS:
        mine, theirs = saved(run, step, name), saved(other, step, name)
        assert mine.keys() == theirs.keys()
        different = [k for k in mine if not torch.equal(mine[k], theirs[k])]
        assert not different, f"{name} at step {step} differs in {different}"


def max_weight_difference(run: Path, other: Path, step: int) -> float:
    """Largest |difference| of the model weights, gradient-free parameters left out."""
    mine, theirs = saved(run, step, "model"), saved(other, step, "model")
    assert mine.keys() == theirs.keys()
    return max((mine[k] - theirs[k]).abs().max().item() for k in mine if not GRADIENT_FREE.search(k))


def all_finite(run: Path, step: int) -> bool:
    return all(torch.isfinite(t).all() for name in WEIGHTS for t in saved(run, step, name).values())


# -- resume -----------------------------------------------------------------------------------
def test_resumed_10_plus_10_steps_equal_20_steps_bitwise(capsys, tmp_path, shards, reference):
    run = tmp_path / "run"
    rc, err = cli_train(capsys, str(CONFIG), "--out", str(run), *sets(shards, "train.max_steps=10"))
    assert rc == 0, err
    assert step_of(checkpoint.checkpoints(run)[-1]) == 10
    rc, err = cli_train(capsys, "--resume", str(run), "--set", "train.max_steps=20")
    assert rc == 0, err
    assert losses(run) == losses(reference)
    assert [s for s, _ in losses(run)] == [str(s) for s in range(1, 21)]
    assert_same_checkpoint(run, reference, 20)


def test_resume_with_a_new_learning_rate_trains_at_that_rate(capsys, tmp_path, shards, reference):
    run = tmp_path / "run"
    rc, err = cli_train(capsys, str(CONFIG), "--out", str(run), *sets(shards, "train.max_steps=10"))
    assert rc == 0, err
    rc, err = cli_train(capsys, "--resume", str(run), "--set", "train.max_steps=12",
                        "--set", "train.lr=1e-5")
    assert rc == 0, err
    rows = read_rows(run)
    assert [float(r["lr"]) for r in rows[10:]] == [1e-5, 1e-5]
    assert float(rows[9]["lr"]) == 2e-3
    assert losses(run)[:11] == losses(reference)[:11]  # step 11 ran before the new rate acts
    assert losses(run)[11] != losses(reference)[11]


def test_resume_without_a_checkpoint_is_an_error(capsys, tmp_path, shards):
    run = tmp_path / "run"
    experiment = configs.load(CONFIG, overrides(shards))
    checkpoint.write_json(run / "config.json", {"experiment": experiment.model_dump(mode="json")})
    rc, err = cli_train(capsys, "--resume", str(run))
    assert rc == 2
    assert "nothing to resume" in err


# -- logs -------------------------------------------------------------------------------------
LOG_LINE = re.compile(r"^train run: (\d+)/(\d+) steps, loss \d+\.\d{4}, [\d.]+ images/s, [\d.]+ steps/s, "
                      r"(ETA|in) \d\d:\d\d$", re.M)


@pytest.mark.parametrize("flags", [[], ["--no-progress"]])
def test_off_a_terminal_train_logs_a_line_every_log_every_steps_and_its_events(
    capsys, tmp_path, shards, flags
):
    """stderr is no terminal here: no bar, and --no-progress changes nothing."""
    run = tmp_path / "run"
    rc = main(["train", str(CONFIG), "--out", str(run), *flags,
               *sets(shards, "train.max_steps=6", "train.log_every=2", "train.ckpt_every=3")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "\r" not in err
    assert LOG_LINE.findall(err) == [("2", "6", "ETA"), ("4", "6", "ETA"), ("6", "6", "in")]
    lines = err.splitlines()
    saved = [lines.index(f"saved checkpoint {run / 'checkpoints' / name}")
             for name in ("step-0000003", "step-0000006")]
    logged = [i for i, line in enumerate(lines) if LOG_LINE.match(line)]
    assert logged[0] < saved[0] < logged[1] < logged[2] < saved[1]  # in the order they happened
    assert re.fullmatch(rf"finished: {re.escape(str(run))} at step 6 \(\d+ s\)", lines[-1])
    rc = main(["train", "--resume", str(run), "--set", "train.max_steps=8", *flags])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.splitlines()[0] == f"resumed from {run / 'checkpoints' / 'step-0000006'} at step 6"
    assert LOG_LINE.findall(err) == [("8", "8", "in")] and "finished: " in err


def test_on_a_terminal_train_draws_a_bar_and_writes_its_events_above_it(
    capsys, monkeypatch, tmp_path, shards
):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run = tmp_path / "run"
    assert main(["train", str(CONFIG), "--out", str(run),
                 *sets(shards, "train.max_steps=4", "train.log_every=2", "train.ckpt_every=4")]) == 0
    shown = terminal.getvalue()
    assert "\r" in shown and "loss " in shown  # the bar, with the loss on it
    assert not LOG_LINE.search(shown)  # instead of log lines
    # the bar's line cleared (\r), the event on a line of its own, then the bar again below it
    assert f"\rsaved checkpoint {run / 'checkpoints' / 'step-0000004'}\n" in shown


# -- non-finite steps -------------------------------------------------------------------------
@pytest.mark.parametrize("lr, what", [
    ("1e30", "loss"),  # weights of 1e30 overflow the forward pass
    ("1e5", "gradient norm"),  # a finite loss (~1e12) whose backward overflows
])
def test_non_finite_step_stops_naming_it_and_keeps_the_last_good_checkpoint(
        capsys, tmp_path, shards, lr, what):
    run = tmp_path / "run"
    rc, err = cli_train(capsys, str(CONFIG), "--out", str(run),
                        *sets(shards, f"train.lr={lr}", "train.warmup_steps=0", "train.ckpt_every=1"))
    assert rc == 2
    found = re.search(r"error: (loss|gradient norm) is (nan|inf|-inf) at step (\d+)", err)
    assert found, err
    step = int(found[3])
    last = checkpoint.checkpoints(run)[-1]
    assert (last.name, step_of(last)) == (f"step-{step:07d}", step)
    assert f"Last good checkpoint: {last}" in err
    assert all_finite(run, step)
    assert found[1] == what
    assert checkpoint.load(run) is not None
    assert read_rows(run)[-1]["step"] == str(step)  # the failed step logged nothing


# -- signals ----------------------------------------------------------------------------------
def start(run: Path, shards: str, *extra: str, processes: int = 1) -> subprocess.Popen:
    """A new tiny run into ``run`` with ``extra`` overrides; see ``launch``."""
    return launch(run, [str(CONFIG), "--out", str(run), *sets(shards, *extra)], processes)


def launch(run: Path, argv: list[str], processes: int = 1) -> subprocess.Popen:
    """``cfkit train ARGV`` (under torchrun for ``processes`` > 1) in a fresh process group,
    its output in ``run``'s sibling ``.log`` file."""
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                f"--master_port={free_port()}"] if processes > 1 else []
    command = [sys.executable, *launcher, "-m", "cfkit", "train", *argv, "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CFKIT_CACHE"] = str(run.parent / "cache")
    with (run.parent / f"{run.name}.log").open("w") as log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def output(run: Path) -> str:
    return (run.parent / f"{run.name}.log").read_text()


def wait_until(condition, process: subprocess.Popen, run: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"exited {process.returncode} too early:\n{output(run)}"
        assert time.monotonic() < deadline, f"timed out:\n{output(run)}"
        time.sleep(0.005)


def logged_steps(run: Path) -> int:
    path = run / "metrics.csv"
    return len(path.read_text().splitlines()) - 1 if path.exists() else 0


def finish(process: subprocess.Popen, run: Path) -> int:
    """The exit status; a hung run is killed with its torchrun workers (own sessions)."""
    try:
        return process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        for pid in [*workers(process).values(), process.pid]:
            os.killpg(pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"did not exit:\n{output(run)}")


def test_sigterm_saves_the_step_it_stopped_at_then_exits_cleanly(tmp_path, shards):
    run = tmp_path / "run"
    process = start(run, shards, "train.max_steps=1000", "train.ckpt_every=1000")
    wait_until(lambda: logged_steps(run) >= 1, process, run)
    process.send_signal(signal.SIGTERM)
    assert finish(process, run) == 0, output(run)
    assert_stopped_with_one_checkpoint(run, world_size=1)


def test_sigterm_to_one_ddp_process_stops_both_at_one_saved_step(tmp_path, shards):
    run = tmp_path / "run"
    process = start(run, shards, "train.max_steps=1000", "train.ckpt_every=1000", processes=2)
    wait_until(lambda: logged_steps(run) >= 1, process, run)
    # rank 1, which does not write checkpoints: rank 0 must learn of the signal to save
    os.kill(workers(process)[1], signal.SIGTERM)
    assert finish(process, run) == 0, output(run)
    assert_stopped_with_one_checkpoint(run, world_size=2)


def workers(launcher: subprocess.Popen) -> dict[int, int]:
    """torchrun's worker processes as {rank: pid} (from Linux's /proc)."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            parent = re.search(r"^PPid:\s+(\d+)", status.read_text(), re.MULTILINE)
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        rank = [v[5:] for v in environ if v.startswith(b"RANK=")]
        if int(parent[1]) == launcher.pid and rank:
            found[int(rank[0])] = int(status.parent.name)
    return found


def assert_stopped_with_one_checkpoint(run: Path, world_size: int) -> None:
    """One checkpoint, at the last logged step (no step trained after it), loadable."""
    assert re.search(r"SIGTERM: saved step \d+, exiting", output(run)), output(run)
    found = checkpoint.checkpoints(run)
    assert len(found) == 1, output(run)
    step = step_of(found[0])
    assert 1 <= step < 1000
    assert found[0].name == f"step-{step:07d}"
    assert int(read_rows(run)[-1]["step"]) == step
    assert json.loads((found[0] / "state.json").read_text())["world_size"] == world_size
    assert checkpoint.load(run) is not None
    assert all_finite(run, step)


def test_sigkilled_run_resumes_onto_the_uninterrupted_curve(capsys, tmp_path, shards, reference):
    run = tmp_path / "run"
    process = start(run, shards)
    wait_until(lambda: bool(checkpoint.checkpoints(run)), process, run)
    process.send_signal(signal.SIGKILL)
    assert finish(process, run) == -signal.SIGKILL
    killed_at = step_of(checkpoint.checkpoints(run)[-1])
    assert killed_at < 20, "the run finished before it was killed"
    rc, err = cli_train(capsys, "--resume", str(run))
    assert rc == 0, err
    assert losses(run) == losses(reference)  # rows after the checkpoint rewritten, not doubled
    assert_same_checkpoint(run, reference, 20)


# -- distributed ------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_with_half_batches_follow_the_one_process_curve(
        tmp_path, shards, reference, strategy):
    run = tmp_path / "run"
    process = start(run, shards, f'train.distributed="{strategy}"', processes=2)
    assert finish(process, run) == 0, output(run)
    assert [s for s, _ in losses(run)] == [s for s, _ in losses(reference)]
    np.testing.assert_allclose([float(v) for _, v in losses(run)],
                               [float(v) for _, v in losses(reference)], rtol=LOSS_RTOL, atol=0)
    last = checkpoint.checkpoints(run)[-1]
    assert (last.name, json.loads((last / "state.json").read_text())["world_size"]) == (
        "step-0000020", 2)
    assert max_weight_difference(run, reference, 20) <= WEIGHT_ATOL
    for name in WEIGHTS:  # one checkpoint format for every world size and strategy
        assert saved(run, 20, name).keys() == saved(reference, 20, name).keys()


@pytest.mark.slow
def test_fsdp_resumes_a_one_process_checkpoint_onto_its_curve(tmp_path, shards, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "step-0000020")  # resume from step 15
    process = launch(run, ["--resume", str(run), "--set", 'train.distributed="fsdp"'], processes=2)
    assert finish(process, run) == 0, output(run)
    assert json.loads((run / "checkpoints" / "step-0000020" / "state.json").read_text())[
        "world_size"] == 2
    np.testing.assert_allclose([float(v) for _, v in losses(run)],
                               [float(v) for _, v in losses(reference)], rtol=LOSS_RTOL, atol=0)
    assert max_weight_difference(run, reference, 20) <= WEIGHT_ATOL


# -- the run folder ---------------------------------------------------------------------------
def test_run_folder_has_metrics_columns_a_loss_plot_and_the_last_n_checkpoints(reference):
    with (reference / "metrics.csv").open() as handle:
        assert handle.readline().strip() == "step,loss,lr,grad_norm,images_per_s"
    rows = runlog.read_metrics(reference / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["images_per_s"] > 0
               for r in rows)
    lrs = [r["lr"] for r in rows]
    assert lrs[:5] == sorted(set(lrs[:5])) and lrs[5:] == [2e-3] * 15  # warmup 5 steps to lr
    assert (reference / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # saved at 5, 10, 15 and 20; keep_last 2; no temp folder left behind
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == [
        "step-0000015", "step-0000020"]


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_last(
        monkeypatch, tmp_path, shards, reference):
    run = tmp_path / "run"
    write_json = checkpoint.write_json

    def failing(path, value):
        if Path(path).name == "state.json" and "0000010" in str(path):
            raise OSError("disk full")
        write_json(path, value)

    monkeypatch.setattr(checkpoint, "write_json", failing)
    experiment = configs.load(CONFIG, overrides(shards))
    with pytest.raises(OSError, match="disk full"):
        train.train(experiment, run, progress=False)
    assert not (run / "checkpoints" / "step-0000010").exists()
    assert [step_of(p) for p in checkpoint.checkpoints(run)] == [5]
    assert checkpoint.resolve(run).name == "step-0000005"  # what `cfkit sample RUN` would load
    monkeypatch.setattr(checkpoint, "write_json", write_json)
    train.train(experiment, run, resume=True, progress=False)
    assert losses(run) == losses(reference)
    assert_same_checkpoint(run, reference, 20)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_learning_rate_warms_up_linearly_then_follows_its_schedule(schedule):
    experiment = configs.load(CONFIG, ["train.warmup_steps=10", "train.max_steps=110",
                                       f'train.lr_schedule="{schedule}"'])
    factor = train.lr_factor(experiment.train)
    assert [factor(s) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    after = [factor(s) for s in (10, 35, 60, 85, 110, 200)]
    if schedule == "constant":
        assert after == [1.0] * 6
    else:  # a half cosine from 1 at the warmup's end to 0 at max_steps, and 0 after it
        assert after == pytest.approx([1.0, 0.5 + 0.5 ** 0.5 / 2, 0.5, 0.5 - 0.5 ** 0.5 / 2, 0.0, 0.0])


# -- gradient accumulation --------------------------------------------------------------------
@pytest.mark.parametrize("micro", [2, 4])
def test_a_batch_in_k_micro_batches_follows_the_one_step_curve(monkeypatch, tmp_path, shards, reference,
                                                               micro):
    sizes = []
    train_step = train.Trainer.train_step

    def recording(self, micro_batches):
        sizes.append([len(batch.latents) for batch in micro_batches])
        return train_step(self, micro_batches)

    monkeypatch.setattr(train.Trainer, "train_step", recording)
    run = tmp_path / "run"
    train.train(configs.load(CONFIG, overrides(shards, f"train.grad_accum_steps={micro}")), run,
                progress=False)
    assert sizes == [[8 // micro] * micro] * 20  # the batch of 8 did run in micro-batches
    np.testing.assert_allclose([float(v) for _, v in losses(run)],
                               [float(v) for _, v in losses(reference)], rtol=LOSS_RTOL, atol=0)
    assert max_weight_difference(run, reference, 20) <= WEIGHT_ATOL


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_with_two_micro_batches_each_follow_the_one_process_curve(
        tmp_path, shards, reference, strategy):
    # the processes' gradients are all-reduced once, in the last micro-batch: one left out leaves this curve
    run = tmp_path / "run"
    process = start(run, shards, f'train.distributed="{strategy}"', "train.grad_accum_steps=2",
                    processes=2)
    assert finish(process, run) == 0, output(run)
    np.testing.assert_allclose([float(v) for _, v in losses(run)],
                               [float(v) for _, v in losses(reference)], rtol=LOSS_RTOL, atol=0)
    assert max_weight_difference(run, reference, 20) <= WEIGHT_ATOL


def test_ddp_all_reduces_the_gradients_in_the_last_micro_batch_only(monkeypatch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(3, 2))
        reduced = []

        def hook(state, bucket):  # DDP's all-reduce of one bucket of gradients
            reduced.append(bucket.index())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        ddp.register_comm_hook(None, hook)
        trainer = SimpleNamespace(sharded=False, ddp=ddp)  # what _gradient_sync reads of a Trainer
        for last in (False, False, True):
            with train.Trainer._gradient_sync(trainer, last):
                ddp(torch.randn(4, 3)).sum().backward()
        assert reduced == [0]  # one bucket, once
    finally:
        dist.destroy_process_group()


def test_a_batch_not_divisible_into_processes_times_micro_batches_is_named(capsys, tmp_path, shards):
    rc, err = cli_train(capsys, str(CONFIG), "--out", str(tmp_path / "run"),
                        *sets(shards, "train.batch_size=6", "train.grad_accum_steps=4"))
    assert rc == 2
    assert "train: batch_size 6 is not divisible by grad_accum_steps 4" in err
    assert not (tmp_path / "run" / "config.json").exists()  # refused before the run started


# -- fine-tuning: init_from -------------------------------------------------------------------
def initialised(shards: str, tmp_path: Path, *extra: str) -> train.Trainer:
    """A trainer of the tiny run with ``extra`` overrides, made (no step taken)."""
    return train.Trainer(configs.load(CONFIG, overrides(shards, *extra)), tmp_path / "run", progress=False)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("source", ["run", "checkpoint", "model.safetensors"])
def test_init_from_starts_from_the_weights_with_a_fresh_optimizer(tmp_path, shards, reference, source):
    last = checkpoint.checkpoints(reference)[-1]
    path = {"run": reference, "checkpoint": last, "model.safetensors": last / "model.safetensors"}[source]
    expected = saved(reference, 20, "model" if source == "model.safetensors" else "ema")  # EMA preferred
    trainer = initialised(shards, tmp_path, f'train.init_from="{path}"')
    for name, module in (("model", trainer.net), ("EMA", trainer.ema)):
        got = weights(module)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    assert trainer.step == 0 and not trainer.optimizer.state
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0  # warming up from step 0 again


def test_init_skip_leaves_the_named_weights_at_their_fresh_initialisation(tmp_path, shards, reference,
                                                                            caplog):
    fresh = weights(initialised(shards, tmp_path).net)
    caplog.set_level("INFO", logger="cfkit.train")
    trainer = initialised(shards, tmp_path, f'train.init_from="{reference}"',
                          'train.init_skip=["class_embedder", "blocks.1.mlp.fc2.bias"]')
    got, trained = weights(trainer.net), saved(reference, 20, "ema")
    skipped = {"class_embedder.table.weight", "blocks.1.mlp.fc2.bias"}
    assert all(torch.equal(got[k], (fresh if k in skipped else trained)[k]) for k in got)
    assert not all(torch.equal(fresh[k], trained[k]) for k in skipped)  # the two differ there
    assert "left at their fresh initialisation: class_embedder.table.weight, blocks.1.mlp.fc2.bias" in (
        caplog.text)


def test_weights_that_do_not_fit_are_listed_with_the_init_skip_that_takes_them(
        capsys, tmp_path, shards, reference):
    # 12 classes instead of 10 and a third block: a shape that differs and keys the weights lack
    argv = [str(CONFIG), "--out", str(tmp_path / "run"),
            *sets(shards, f'train.init_from="{reference}"', "model.num_classes=12", "model.depth=3",
                  "train.max_steps=1")]
    rc, err = cli_train(capsys, *argv)
    assert rc == 2
    assert "class_embedder.table.weight is (11, 128) in the weights but (13, 128) in the model" in err
    assert "blocks.2.attn.qkv.weight is missing" in err
    assert 'train.init_skip = ["blocks.2", "class_embedder"]' in err
    assert not (tmp_path / "run" / "config.json").exists()  # refused before the run started
    rc, err = cli_train(capsys, *argv, "--set", 'train.init_skip=["class_embedder", "blocks.2"]')
    assert rc == 0, err
    assert step_of(checkpoint.checkpoints(tmp_path / "run")[-1]) == 1


@pytest.mark.parametrize("extra, words", [
    (('train.init_from="{missing}"',), ["train.init_from", "not found", "give a cfkit checkpoint"]),
    (('train.init_from="{reference}"', 'train.init_skip=["class_embeder"]'),
     ["train.init_skip: class_embeder match(es) no key", "start with: blocks, class_embedder"]),
    (('train.init_skip=["class_embedder"]',), ["train: init_skip names weights of init_from"]),
])
def test_a_bad_init_from_or_init_skip_is_named(capsys, tmp_path, shards, reference, extra, words):
    extra = [e.format(missing=tmp_path / "missing", reference=reference) for e in extra]
    rc, err = cli_train(capsys, str(CONFIG), "--out", str(tmp_path / "run"), *sets(shards, *extra))
    assert rc == 2
    assert all(word in err for word in words), err


def test_a_resumed_run_keeps_its_own_weights_whatever_init_from_says(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    experiment = train.resume_experiment(run, [f'train.init_from="{tmp_path / "missing"}"'])
    trainer = train.Trainer(experiment, run, resume=True, progress=False)
    assert trainer.step == 20
    expected = saved(reference, 20, "model")
    assert all(torch.equal(v, expected[k]) for k, v in weights(trainer.net).items())
