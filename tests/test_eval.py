"""The evaluation harness and its commands: ``cfkit eval`` (several S_eval in one call,
eval.json and eval.md, skips with reasons), ``cfkit fid`` (the pytorch-fid workflow, agreeing
with the harness) and ``cfkit cider`` (agreeing with pycocoevalcap)."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import perturbed_checkpoint

from cfkit import checkpoint, evaluate, metrics, plugins
from cfkit import config as configs
from cfkit.cli import main
from cfkit.evaluate import EvalContext, SampleSet

JAVA = shutil.which("java") is not None
TINY = {"input_size": 8, "latent_channels": 1, "hidden_size": 32, "depth": 2, "num_heads": 2,
        "num_classes": 10}
ALL_METRICS = "fid,class-accuracy,is,precision-recall,probe,clip-score,cider"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, cache):
    """Untrained (perturbed) tiny digits checkpoints of every image method."""
    found = {}
    for method in ("causalfusion", "incontext-dit", "dit"):
        experiment = configs.validate({
            "name": f"tiny-{method}", "method": {"name": method}, "model": TINY,
            "data": {"dataset": {"name": "digits"}, "tokenizer": {"name": "pixels", "channels": 1}},
        })
        found[method] = perturbed_checkpoint(experiment, tmp_path_factory.mktemp(method) / "ckpt")
    return found


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def evaluated(checkpoints, tmp_path_factory):
    """``cfkit eval`` of the CausalFusion checkpoint with every metric at S_eval 1 and 4."""
    out = tmp_path_factory.mktemp("eval")
    assert cli("eval", checkpoints["causalfusion"], "--metrics", ALL_METRICS, "--num", 20,
               "--ar-steps", 1, 4, "--steps", 3, "--out", out, "--save-samples", "--no-progress") == 0
    return out, json.loads((out / "eval.json").read_text(), parse_constant=pytest.fail)  # strict JSON


def test_eval_reports_every_metric_for_every_s_eval_naming_the_feature_network(evaluated):
    _, report = evaluated
    assert report["generation"]["ar_steps"] == [1, 4] and report["generation"]["num"] == 20
    assert report["generation"]["cfg_interval"] == [0.0, "inf"] and report["generation"]["steps"] == 3
    assert report["feature_network"]["name"] == "digits-cnn"
    assert report["feature_network"]["held_out_accuracy"] > 0.95
    assert report["reference"] == {"split": "train", "num": 1437}
    per_s = {"FID-20 (digits-cnn)", "class accuracy (digits-cnn)", "IS (digits-cnn)", "IS std (digits-cnn)",
             "precision (digits-cnn, k=3)", "recall (digits-cnn, k=3)"}
    for s in (1, 4):
        assert {r["name"] for r in report["results"] if r["ar_steps"] == s} == per_s
    (probe,) = [r for r in report["results"] if r["ar_steps"] is None]
    assert probe["name"] == "linear probe top-1 (t=0)" and 0.3 < probe["value"] <= 1
    for record in report["results"]:
        assert np.isfinite(record["value"])
        if record["name"].startswith(("class accuracy", "precision", "recall")):
            assert 0 <= record["value"] <= 1
    assert "cfkit cider" in report["skipped"]["cider"]
    try:
        import open_clip  # noqa: F401
    except (ImportError, RuntimeError):
        assert "open-clip-torch is not installed" in report["skipped"]["clip-score"]


def test_eval_writes_a_markdown_summary_with_a_row_per_s_eval(evaluated):
    out, report = evaluated
    text = (out / "eval.md").read_text()
    assert "| S_eval | FID-20 (digits-cnn) | class accuracy (digits-cnn) |" in text
    fid_of = {r["ar_steps"]: r["value"] for r in report["results"] if r["metric"] == "fid"}
    for s in (1, 4):
        assert f"| {s} | {fid_of[s]:.4g} |" in text
    assert "linear probe top-1 (t=0)" in text and "cider: skipped" in text


def test_cfkit_fid_on_the_saved_samples_reproduces_the_harness(evaluated, capsys):
    out, report = evaluated
    images, _ = metrics.dataset_images(plugins.build("datasets", "digits"), "train")
    np.savez(out / "train.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    fid_of = {r["ar_steps"]: r["value"] for r in report["results"] if r["metric"] == "fid"}
    capsys.readouterr()
    for s in (1, 4):
        assert cli("fid", out / "train.npz", out / f"samples-S{s}.npz", "--features", "digits-cnn",
                   "--json", "--no-progress") == 0
        result = json.loads(capsys.readouterr().out)
        assert result["name"] == "FID (digits-cnn)" and result["num"] == [1437, 20]
        assert result["value"] == pytest.approx(fid_of[s], rel=1e-6)


def test_cfkit_fid_is_zero_on_one_set_symmetric_and_reads_saved_statistics(evaluated, capsys, tmp_path):
    out, _ = evaluated
    a, b = out / "samples-S1.npz", out / "samples-S4.npz"

    def fid(*paths) -> float:
        assert cli("fid", *paths, "--features", "digits-cnn", "--json", "--no-progress") == 0
        return json.loads(capsys.readouterr().out)["value"]

    capsys.readouterr()
    assert abs(fid(a, a)) < 1e-4 * fid(a, b)  # rank-deficient: 20 samples, 128 features
    assert fid(a, b) == pytest.approx(fid(b, a), rel=1e-6)
    assert cli("fid", "--save-stats", a, tmp_path / "a-stats.npz", "--features", "digits-cnn",
               "--no-progress") == 0
    capsys.readouterr()
    assert fid(tmp_path / "a-stats.npz", b) == pytest.approx(fid(a, b), rel=1e-6)


def test_cfkit_fid_bad_inputs_exit_2_saying_what_is_wrong(evaluated, capsys, tmp_path, monkeypatch):
    out, _ = evaluated
    np.savez(tmp_path / "rgb.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    monkeypatch.delenv("CFKIT_INCEPTION_WEIGHTS", raising=False)
    cases = [
        (("fid", out / "samples-S1.npz", tmp_path / "rgb.npz", "--features", "digits-cnn"),
         "takes images (N, 1, 8, 8), got (N, 3, 16, 16)"),
        (("fid", out / "samples-S1.npz", out / "samples-S4.npz", "--features", "vgg"),
         "known: digits-cnn, inception, shapes-cnn"),
        (("fid", out / "samples-S1.npz", out / "samples-S4.npz"), "CFKIT_INCEPTION_WEIGHTS"),
        (("fid", out / "samples-S1.npz", tmp_path / "absent", "--features", "digits-cnn"),
         "no such file or folder"),
    ]
    for args, message in cases:
        assert cli(*args, "--no-progress") == 2
        assert message in capsys.readouterr().err


def test_statistics_of_another_feature_network_are_refused(evaluated, capsys, tmp_path):
    out, _ = evaluated
    metrics.Statistics.of(np.random.default_rng(0).normal(size=(10, 128))).save(
        tmp_path / "other.npz", feature_network="shapes-cnn")
    assert cli("fid", tmp_path / "other.npz", out / "samples-S1.npz", "--features", "digits-cnn") == 2
    assert "give --features shapes-cnn" in capsys.readouterr().err


def test_real_images_score_as_perfect_samples_and_mislabelled_ones_do_not(checkpoints):
    """The harness's metrics on the val split posing as samples: the classifier agrees with
    their labels, FID is far below that of noise, precision and recall are high."""
    context = EvalContext(checkpoint.load(checkpoints["causalfusion"]), show_progress=False)
    images, labels = context.dataset_images("val")
    real = SampleSet(images, labels, ar_steps=1)
    noise = SampleSet(torch.randint(0, 256, images.shape, dtype=torch.uint8), labels, ar_steps=1)
    fid, accuracy, pr = (plugins.build("metrics", name) for name in ("fid", "class-accuracy",
                                                                       "precision-recall"))
    assert accuracy(context, real)["class accuracy (digits-cnn)"] > 0.95
    permutation = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    shuffled = SampleSet(images, labels[permutation], ar_steps=1)
    assert accuracy(context, shuffled)["class accuracy (digits-cnn)"] < 0.3
    label = "FID-360 (digits-cnn)"
    real_fid, noise_fid = fid(context, real)[label], fid(context, noise)[label]
    assert 0 < real_fid < noise_fid / 20
    assert min(pr(context, real).values()) > 0.8


def test_the_probe_works_for_every_image_method(checkpoints):
    values = {}
    for method, path in checkpoints.items():
        report = evaluate.evaluate(path, ["probe"], metric_options={"probe": {"t": 10}}, progress=False)
        (record,) = report["results"]
        assert record["name"] == "linear probe top-1 (t=10)" and report["method"] == method
        values[method] = record["value"]
    assert all(0.3 < v <= 1 for v in values.values())  # 10 classes: chance is 0.1


def test_dit_is_evaluated_in_one_ar_step_and_several_are_an_error(checkpoints, capsys, tmp_path):
    assert cli("eval", checkpoints["dit"], "--metrics", "fid", "--num", 4, "--steps", 2,
               "--out", tmp_path, "--no-progress") == 0
    assert json.loads((tmp_path / "eval.json").read_text())["results"][0]["ar_steps"] == 1
    assert cli("eval", checkpoints["dit"], "--metrics", "fid", "--num", 4, "--ar-steps", 4,
               "--no-progress") == 2
    assert "generates in 1 AR step" in capsys.readouterr().err


def test_eval_bad_options_exit_2_naming_what_is_allowed(checkpoints, capsys, monkeypatch):
    ckpt = checkpoints["causalfusion"]
    monkeypatch.delenv("CFKIT_INCEPTION_WEIGHTS", raising=False)
    cases = [
        (("--metrics", "fid,bleu"), "unknown metrics name 'bleu'; known: cider, class-accuracy"),
        (("--metrics", "fid", "--metric-option", "probe.t=3"), "not evaluated"),
        (("--metrics", "probe", "--metric-option", "probe.t=5000"), "t must be a network timestep in 0..999"),
        (("--metrics", "fid", "--features", "inception"), "CFKIT_INCEPTION_WEIGHTS"),
        (("--metrics", "fid", "--num", 1), "--num must be >= 2"),
        (("--metrics", "fid", "--ar-steps", 65), "ar_steps must be in 1..64"),
    ]
    for args, message in cases:
        assert cli("eval", ckpt, *args, "--steps", 2, "--no-progress") == 2, args
        assert message in capsys.readouterr().err


def test_a_feature_network_of_another_dataset_fails_before_sampling(checkpoints, capsys, monkeypatch):
    from cfkit_plugins import metrics as builtin

    monkeypatch.setitem(builtin.CLASSIFIER_RECIPE, "steps", 2)  # the shapes, not the accuracy
    monkeypatch.setattr(evaluate, "sample", lambda *a, **k: pytest.fail("sampled"))
    assert cli("eval", checkpoints["causalfusion"], "--metrics", "fid,class-accuracy", "--features",
               "shapes-cnn", "--feature-option", "size=20", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "skipped class-accuracy: feature network shapes-cnn does not classify the digits classes" in err
    assert "shapes-cnn (trained on shapes images) takes images (N, 3, 16, 16), got (N, 1, 8, 8)" in err


CAPTIONS = {1: ["a red circle in the top left", "there is a red circle in the top left corner"],
            2: ["a blue square at the bottom right", "a picture of a blue square, bottom right"]}


def write_coco(tmp_path, predictions):
    (tmp_path / "res.json").write_text(json.dumps(
        [{"image_id": i, "caption": c} for i, c in predictions.items()]))
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": [
        {"image_id": i, "id": 10 * i + j, "caption": c} for i, cs in CAPTIONS.items()
        for j, c in enumerate(cs)]}))


@pytest.mark.parametrize("tokenizer", ["ptb", "simple"])
def test_cfkit_cider_equals_pycocoevalcap(tokenizer, tmp_path, capsys):
    from pycocoevalcap.cider.cider import Cider

    if tokenizer == "ptb" and not JAVA:
        pytest.skip("pycocoevalcap's PTB tokenizer needs java")
    predictions = {1: "a red circle in the top left corner", 2: "a red square"}
    write_coco(tmp_path, predictions)
    assert cli("cider", tmp_path / "res.json", tmp_path / "ann.json", "--tokenizer", tokenizer, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    words = {i: [" ".join(c.replace(",", "").split())] for i, c in predictions.items()}
    direct, _ = Cider().compute_score({i: [c.replace(",", "") for c in cs] for i, cs in CAPTIONS.items()},
                                      words)
    assert result == {"name": f"CIDEr-D ({tokenizer} tokenizer)", "value": pytest.approx(100 * direct),
                      "images": 2}


def test_cfkit_cider_rejects_predictions_without_references(tmp_path, capsys):
    write_coco(tmp_path, {1: "a red circle", 7: "a cat"})
    assert cli("cider", tmp_path / "res.json", tmp_path / "ann.json") == 2
    assert "image_id 7" in capsys.readouterr().err
