"""Bad input never ends in a traceback: FID statistics with NaN (3), ``[model]`` fields (6), the
environment (8: device, output folders, full disk, unreadable files), a plugin clash (9) and a
plugin's bad ordering in training (10) each exit 2 with one line naming what is wrong and what
is allowed. Most run the CLI in this process; a crash (FID's segfault) or an import-time
failure (the clash) runs in a fresh interpreter with the third-party plugin added."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cfkit
from cfkit import checkpoint, plugins
from cfkit import config as configs
from cfkit.cli import main
from cfkit.generate import GenerationError, generation_order

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "benchmarks" / "configs" / "digits-tiny.toml")
TINY = ("model.hidden_size=32", "model.depth=2", "train.batch_size=8", "train.max_steps=1",
        "train.log_every=1")

# `cfkit ARGV` for each ARGV of a JSON list, with one third-party plugin installed first (as its
# entry point would be): "features", a network of 128 features (as many as digits-cnn's, where
# NaN made LAPACK crash), or "clash", a second schedule "fixed". Prints [rc, stdout, stderr]
# per ARGV.
LAUNCHER = """
import contextlib, io, json, sys, types
import torch
import cfkit
from cfkit import plugins

class TinyFeatures:
    name, num_features = "tiny-features", 128
    def to(self, device):
        return self
    def identity(self):
        return {"name": self.name}
    def __call__(self, images):
        from cfkit.metrics import Extracted
        return Extracted(images.float().flatten(1).mean(1, keepdim=True).expand(-1, 128), None)

kind, name, factory = {"features": ("feature_networks", "tiny-features", TinyFeatures),
                       "clash": ("schedules", "fixed", object)}[sys.argv[1]]
extra = types.ModuleType("third-party")
setattr(extra, f"register_{kind}", cfkit.hookimpl(lambda register: register(name, factory)))
make = plugins.plugin_manager
plugins.plugin_manager = lambda extra_plugins=(): make((*extra_plugins, extra))
from cfkit.cli import main  # after the plugin: importing the CLI must not need the registry
for argv in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exit:
            rc = exit.code
    print(json.dumps([rc, out.getvalue(), err.getvalue()]), flush=True)
"""


def with_plugin(cfkit_cli, plugin: str, *argvs: list[str]) -> list[tuple[int, str, str]]:
    """``(rc, stdout, stderr)`` of each ``cfkit ARGV`` in one fresh interpreter with ``plugin``."""
    result = cfkit_cli(plugin, json.dumps([[str(a) for a in argv] for argv in argvs]),
                       python=("-c", LAUNCHER))
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == len(argvs), (
        f"rc {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return [tuple(json.loads(line)) for line in lines]


def cli(capsys, *argv) -> tuple[int, str]:
    """``cfkit ARGV`` in this process: (exit status, stderr)."""
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The message of a one-line ``error: ...`` (no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


def sets(*overrides: str) -> list[str]:
    return [arg for text in overrides for arg in ("--set", text)]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny digits checkpoint."""
    experiment = configs.load(CONFIG, ["model.hidden_size=32", "model.depth=2"])
    return checkpoint.save(tmp_path_factory.mktemp("tiny") / "ckpt", experiment,
                           experiment.build_method().model)


# -- 3: FID statistics ------------------------------------------------------------------------
def statistics(path: Path, mu, sigma) -> Path:
    np.savez(path, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))
    return path


@pytest.fixture(scope="module")
def fid_runs(tmp_path_factory, cfkit_cli):
    """``cfkit fid`` of good statistics against each bad input (one interpreter for all)."""
    folder = tmp_path_factory.mktemp("fid")
    features = np.random.default_rng(0).normal(size=(300, 128))
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    good = statistics(folder / "good.npz", mu, sigma)
    nan_sigma, inf_mu = sigma.copy(), mu.copy()
    nan_sigma[0, 0], inf_mu[1] = np.nan, np.inf
    bad = {
        "NaN in sigma": statistics(folder / "nan-sigma.npz", mu, nan_sigma),
        "Inf in mu": statistics(folder / "inf-mu.npz", inf_mu, sigma),
        "NaN everywhere": statistics(folder / "all-nan.npz", mu * np.nan, sigma * np.nan),
        "sigma not (F, F)": statistics(folder / "shape.npz", mu, sigma[:3]),
        "not an npz": folder / "garbage.npz",
    }
    bad["not an npz"].write_bytes(b"no zip here")
    images = folder / "images"  # item 8: a file that is not an image in a set's folder
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    (images / "notes.png").write_text("not an image")
    bad["non-image file in a folder"] = images / "notes.png"
    argvs = [["fid", good, path if path.suffix == ".npz" else images, "--features", "tiny-features",
              "--no-progress"] for path in bad.values()]
    good_run, *runs = with_plugin(cfkit_cli, "features", ["fid", good, good, "--features",
                                                          "tiny-features", "--json"], *argvs)
    assert good_run[0] == 0 and abs(json.loads(good_run[1])["value"]) < 1e-6, good_run
    return dict(zip(bad, zip(runs, bad.values(), strict=True), strict=True))


@pytest.mark.parametrize("case", ["NaN in sigma", "Inf in mu", "NaN everywhere", "sigma not (F, F)",
                                  "not an npz"])
def test_fid_of_bad_statistics_exits_2_naming_the_file_instead_of_crashing(fid_runs, case):
    (rc, _, err), path = fid_runs[case]
    assert rc == 2, err
    message = one_error_line(err)
    assert message.startswith(f"{path}: ")
    words = {"NaN in sigma": "sigma holds 1 NaN", "Inf in mu": "mu holds 0 NaN and 1 infinite",
             "NaN everywhere": "mu holds 128 NaN", "sigma not (F, F)": "sigma (F, F)",
             "not an npz": "not a readable .npz"}
    assert words[case] in message


# -- 6: [model] fields ------------------------------------------------------------------------
@pytest.mark.parametrize("override, field, value, allowed", [
    ("model.depth=four", "model.depth", "'four'", "an integer >= 1"),
    ("model.depth=0", "model.depth", "0", "an integer >= 1"),
    ("model.depth=true", "model.depth", "True", "an integer >= 1"),
    ("model.num_heads=0", "model.num_heads", "0", "an integer >= 1"),
    ("model.patch_size=0", "model.patch_size", "0", "an integer >= 1"),
    ("model.input_size=-8", "model.input_size", "-8", "an integer >= 1"),
    ("model.class_dropout=5", "model.class_dropout", "5", "a finite number >= 0 and <= 1"),
    ("model.mlp_ratio=nan", "model.mlp_ratio", "nan", "a finite number > 0"),
    ("model.attention=fast", "model.attention", "'fast'", "sdpa, flex, eager"),
    ("model.qk_norm=1", "model.qk_norm", "1", "true or false"),
    ("train.lr=inf", "train.lr", "inf", "finite"),
])
def test_model_fields_are_typed_and_range_checked_naming_field_value_and_allowed(
        capsys, override, field, value, allowed):
    rc, err = cli(capsys, "config", "validate", CONFIG, "--set", override)
    assert rc == 2
    message = one_error_line(err)
    assert message.startswith(f"{field}: ") and f"got {value}" in message and allowed in message


@pytest.mark.parametrize("method", [["method.name=dit", "model.preset=DiT-tiny"],
                                    ["method.name=incontext-dit"]])
def test_every_method_checks_its_model_fields(capsys, method):
    rc, err = cli(capsys, "config", "validate", CONFIG, *sets(*method, "model.depth=0"))
    assert rc == 2 and one_error_line(err) == "model.depth: got 0; allowed: an integer >= 1"


@pytest.mark.parametrize("override, message", [
    ("model.hidden_size=65", "model: num_heads 4 does not divide hidden_size 65; allowed: "
                             "hidden_size a multiple of num_heads (e.g. 64) or num_heads a divisor of 65"),
    ("model.patch_size=3", "model: patch_size 3 does not divide input_size 8; allowed: "
                           "input_size a multiple of patch_size (e.g. 6) or patch_size a divisor of 8"),
])
def test_fields_that_do_not_fit_together_say_how_to_fix_them(capsys, override, message):
    rc, err = cli(capsys, "config", "validate", CONFIG, "--set", override)
    assert rc == 2 and one_error_line(err) == message


def test_train_checks_model_fields_before_making_the_run_folder(capsys, tmp_path):
    rc, err = cli(capsys, "train", CONFIG, "--out", tmp_path / "run", "--set", "model.depth=four",
                  "--no-progress")
    assert rc == 2 and one_error_line(err) == "model.depth: got 'four'; allowed: an integer >= 1"
    assert not (tmp_path / "run").exists()


# -- 8: the environment -----------------------------------------------------------------------
@pytest.fixture
def read_only(tmp_path):
    """A folder nobody may write in: mode 555, or immutable for root (else skip)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = os.access(folder, os.W_OK) and shutil.which("chattr") is not None
    if immutable:
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    try:
        (folder / "probe").touch()
    except OSError:
        yield folder
    else:
        pytest.skip("cannot make a read-only folder here")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def test_eval_checks_its_output_folder_is_writable_before_evaluating(capsys, monkeypatch,
                                                                        tiny_checkpoint, read_only):
    from cfkit import evaluate

    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    rc, err = cli(capsys, "eval", tiny_checkpoint, "--metrics", "fid", "--out", read_only)
    assert rc == 2
    message = one_error_line(err)
    assert message.startswith(f"--out {read_only}: cannot write in {read_only}")


@pytest.mark.parametrize("device, words", [
    ("gpu", ["--device 'gpu' is not a device name", "allowed here: cpu"]),
    ("cuda", ["--device cuda: CUDA is not available", "allowed here: cpu"]),
    ("cuda:7", ["--device cuda:7:", "allowed here: cpu"]),
])
def test_a_device_this_machine_lacks_is_named_with_the_ones_it_has(capsys, tmp_path, tiny_checkpoint,
                                                                   device, words):
    if device != "gpu" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, err = cli(capsys, "sample", tiny_checkpoint, "--class", "1", "--steps", "2", "--device", device,
                  "--out", tmp_path / "samples", "--no-progress")
    assert rc == 2
    message = one_error_line(err)
    assert all(word in message for word in words), message
    assert not (tmp_path / "samples").exists()


def test_an_output_folder_that_is_a_file_is_named(capsys, tmp_path, tiny_checkpoint):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for out, expected in [(taken, f"--out {taken} is a file; give a folder"),
                          (taken / "sub", f"--out {taken / 'sub'}: {taken} is a file")]:
        rc, err = cli(capsys, "sample", tiny_checkpoint, "--class", "1", "--steps", "2", "--out", out,
                      "--no-progress")
        assert rc == 2 and one_error_line(err).startswith(expected)
    rc, err = cli(capsys, "train", CONFIG, "--out", taken, "--no-progress")
    assert rc == 2 and one_error_line(err).startswith(f"--out {taken} is a file")


@pytest.mark.parametrize("scale", ["nan", "inf"])
def test_a_cfg_scale_that_is_not_a_finite_number_is_an_error(capsys, tmp_path, tiny_checkpoint, scale):
    rc, err = cli(capsys, "sample", tiny_checkpoint, "--class", "1", "--steps", "2", "--cfg", scale,
                  "--out", tmp_path, "--no-progress")
    assert rc == 2
    assert one_error_line(err) == f"cfg scale must be >= 1 (1 = no guidance) and finite, got {scale}"


def test_unreadable_config_paths_are_named(capsys, tmp_path):
    rc, err = cli(capsys, "config", "validate", tmp_path)
    assert rc == 2 and one_error_line(err) == f"{tmp_path} is a folder; give a TOML config file"
    (tmp_path / "latin1.toml").write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    rc, err = cli(capsys, "train", tmp_path / "latin1.toml", "--out", tmp_path / "run")
    assert rc == 2 and one_error_line(err).startswith(f"{tmp_path / 'latin1.toml'}: not UTF-8 text")


def test_a_non_image_file_in_a_fid_folder_is_named(fid_runs):
    (rc, _, err), path = fid_runs["non-image file in a folder"]
    assert rc == 2 and one_error_line(err).startswith(f"{path}: not a readable image")


@pytest.mark.parametrize("content", [b'{"format": ', b"\xff\xfe{}"])
def test_a_checkpoint_config_that_is_not_json_is_named(capsys, tmp_path, tiny_checkpoint, content):
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    (broken / "config.json").write_bytes(content)
    rc, err = cli(capsys, "sample", broken, "--class", "1", "--steps", "2", "--out", tmp_path / "s",
                  "--no-progress")
    assert rc == 2 and one_error_line(err).startswith(f"{broken / 'config.json'}: ")


def test_a_full_disk_is_one_line_and_leaves_no_temp_files(capsys, monkeypatch, tmp_path, cache,
                                                          one_thread):
    def fill_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "save_file", fill_disk)
    run = tmp_path / "run"
    rc, err = cli(capsys, "train", CONFIG, "--out", run, *sets(*TINY), "--no-progress")
    assert rc == 2 and "Traceback" not in err
    message = one_error_line(err.splitlines()[-1])  # after the log lines of the step that ran
    assert message.endswith(": No space left on device; free some space or write elsewhere")
    assert str(run / "checkpoints") in message
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


def test_atomic_write_removes_a_temp_folder_its_writer_made(tmp_path):
    def writer(tmp):
        Path(tmp).mkdir()
        (Path(tmp) / "part").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left"):
        checkpoint.atomic_write(tmp_path / "out", writer)
    assert list(tmp_path.iterdir()) == []


# -- 9: a plugin clash ------------------------------------------------------------------------
def test_a_plugin_clash_is_one_line_and_leaves_help_and_plugins_working(cfkit_cli):
    (help_rc, help_out, _), (list_rc, listing, warning), (rc, _, err) = with_plugin(
        cfkit_cli, "clash", ["--help"], ["plugins"], ["config", "validate", CONFIG])
    assert help_rc == 0 and "usage: cfkit" in help_out
    assert list_rc == 0
    rows = [line.split() for line in listing.splitlines()]
    assert ["schedules", "fixed", "cfkit:schedules", "CONFLICT"] in rows
    assert ["schedules", "fixed", "third-party", "CONFLICT"] in rows
    assert ["orderings", "raster", "cfkit:orderings"] in rows
    assert rc == 2
    message = one_error_line(err)
    assert message == one_error_line(warning.replace("warning: ", "error: "))
    assert message.startswith("schedules name 'fixed' is registered twice: by 'cfkit:schedules' "
                              "and by 'third-party'; remove one of the two plugins, or rename")


def test_a_clash_between_installed_packages_names_the_package_to_uninstall():
    class Shadow:
        @staticmethod
        @cfkit.hookimpl
        def register_schedules(register):
            register("fixed", object)

    manager = plugins.plugin_manager()
    manager.register(Shadow, name="cfkit-shadow:schedules")  # as an entry point is named
    with pytest.raises(plugins.DuplicateComponentError, match="; pip uninstall cfkit-shadow, or rename"):
        plugins.Registry(manager)


# -- 10: a plugin's ordering in training --------------------------------------------------------
class NotAPermutation:
    def __call__(self, batch_size, grid, generator=None):
        return torch.zeros(batch_size, grid[0] * grid[1], dtype=torch.long)


class BadOrderingPlugin:
    @staticmethod
    @cfkit.hookimpl
    def register_orderings(register):
        register("not-a-permutation", NotAPermutation)


@pytest.fixture
def bad_ordering(monkeypatch):
    """The process registry with the ordering "not-a-permutation" (zeros) added."""
    registry = plugins.Registry(plugins.plugin_manager((BadOrderingPlugin,)))
    monkeypatch.setattr(plugins, "registry", lambda: registry)
    with pytest.raises(GenerationError) as rejected:  # as cfkit sample rejects it
        generation_order("not-a-permutation", 8, (8, 8))
    return str(rejected.value)


def test_plan_rejects_an_ordering_that_is_not_a_permutation_as_sample_does(capsys, bad_ordering):
    rc, err = cli(capsys, "plan", CONFIG, "--batch", "8", "--set",
                  "factorisation.ordering=not-a-permutation")
    assert rc == 2 and one_error_line(err) == bad_ordering


def test_training_rejects_it_at_the_first_plan(capsys, tmp_path, bad_ordering, cache, one_thread):
    run = tmp_path / "run"
    rc, err = cli(capsys, "train", CONFIG, "--out", run, "--no-progress",
                  *sets(*TINY, "factorisation.ordering=not-a-permutation"))
    assert rc == 2 and one_error_line(err) == bad_ordering
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
