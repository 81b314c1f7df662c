"""The evaluation harness and its commands: ``cfkit eval`` (several S_eval in one call,
eval.json and eval.md, skips with reasons), ``cfkit fid`` (the pytorch-fid workflow, agreeing
with the harness), ``cfkit cider`` (agreeing with pycocoevalcap) and the held-out loss per
S_eval (against the loss written out; the same inputs for every method)."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_rc, perturbed_checkpoint, torchrun_cfkit

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
         "known: digits-cnn, inception, mnist-cnn, shapes-cnn"),
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
        (record,) = report.results
        assert record.name == "linear probe top-1 (t=10)" and report.method == method
        values[method] = record.value
    assert all(0.3 < v <= 1 for v in values.values())  # 10 classes: chance is 0.1


def test_dit_is_evaluated_in_one_ar_step_and_several_are_an_error(checkpoints, capsys, tmp_path):
    assert cli("eval", checkpoints["dit"], "--metrics", "fid", "--num", 4, "--steps", 2,
               "--out", tmp_path, "--no-progress") == 0
    assert json.loads((tmp_path / "eval.json").read_text())["results"][0]["ar_steps"] == 1
    err = capsys.readouterr().err  # --no-progress keeps a line per phase; no bar's \r
    assert "sampling S=1: 4/4 images, " in err and "features S=1: 4/4 images, " in err and "\r" not in err
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


def test_two_torchrun_processes_evaluate_exactly_the_samples_of_one(checkpoints, tmp_path, monkeypatch):
    """The FID-50k command at toy size: 2 gloo processes share the sampling (6 images in
    batches of 4: rank 1 has the last 2) against an ADM reference batch of the train images;
    rank 0 gathers, scores and writes exactly what one process writes."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a gloo group on the CPU
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    images, _ = metrics.dataset_images(plugins.build("datasets", "digits"), "train")
    np.savez(tmp_path / "batch.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    args = ["eval", checkpoints["causalfusion"], "--metrics", "fid,kid", "--num-samples", 6,
            "--batch-size", 4, "--ar-steps", 1, 2, "--steps", 3, "--reference-stats",
            tmp_path / "batch.npz", "--save-samples", "--no-progress"]
    assert cli(*args, "--out", tmp_path / "one") == 0
    done = torchrun_cfkit(*map(str, args), "--out", str(tmp_path / "two"))
    assert_rc(done, 0)
    assert done.stdout.count("wrote ") == 1  # rank 0 alone reports
    for s in (1, 2):
        one, two = (np.load(tmp_path / name / f"samples-S{s}.npz") for name in ("one", "two"))
        for key in ("arr_0", "labels"):
            np.testing.assert_array_equal(two[key], one[key])
    one, two = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("one", "two"))
    assert two["results"] == one["results"] and len(one["results"]) == 6  # FID, KID, KID std x 2
    assert two["reference"] == one["reference"]
    assert one["reference"]["holds"] == ["arr_0"] and one["reference"]["num"] == 1437
    summary = (tmp_path / "two" / "eval.md").read_text()
    assert f"reference: {tmp_path / 'batch.npz'} (1437 images; arr_0)." in summary


def test_a_bad_reference_file_fails_before_sampling(checkpoints, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(evaluate, "sample", lambda *a, **k: pytest.fail("sampled"))
    np.savez(tmp_path / "other.npz", features=np.zeros(3))
    np.savez(tmp_path / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    cases = {"other.npz": "no reference statistics or images in it (keys: features)",
             "inception.npz": "holds statistics of 2048 features; digits-cnn gives 128",
             "absent.npz": "no such reference statistics file"}
    for name, message in cases.items():
        assert cli("eval", checkpoints["causalfusion"], "--metrics", "fid,kid", "--reference-stats",
                   tmp_path / name, "--out", tmp_path / "out", "--no-progress") == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "eval.json").exists()


def test_a_run_on_shards_alone_is_evaluated_against_a_reference_file(tmp_path, cache, capsys):
    experiment = configs.validate({
        "name": "shards", "method": {"name": "causalfusion"}, "model": TINY,
        "data": {"shards": str(tmp_path / "absent-{000..001}.tar"),
                 "tokenizer": {"name": "pixels", "channels": 1}},
    })
    ckpt = perturbed_checkpoint(experiment, tmp_path / "ckpt")
    options = ("--metrics", "fid,class-accuracy", "--features", "digits-cnn", "--num-samples", 4,
               "--steps", 2, "--no-progress", "--out", tmp_path / "out")
    assert cli("eval", ckpt, *options) == 2
    assert "(sample metrics: give --reference-stats FILE)" in capsys.readouterr().err
    images, _ = metrics.dataset_images(plugins.build("datasets", "digits"), "val")
    np.savez(tmp_path / "batch.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    assert cli("eval", ckpt, *options, "--reference-stats", tmp_path / "batch.npz") == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["dataset"] is None and report["reference"]["num"] == 360
    assert [r["name"] for r in report["results"]] == ["FID-4 (digits-cnn)"]
    assert "this run names no dataset" in report["skipped"]["class-accuracy"]


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


# -- the held-out loss ----------------------------------------------------------------------
HELDOUT = {"num": 6, "draws": 2, "seed": 3}


def heldout(path, **options):
    """A model context of checkpoint ``path`` and the heldout-loss metric built with ``options``."""
    context = EvalContext(checkpoint.load(path), show_progress=False)
    return context, plugins.build("metrics", "heldout-loss", **{**HELDOUT, **options})


def test_heldout_loss_is_the_eps_mse_of_each_ar_step_given_the_clean_earlier_ones(checkpoints):
    """The metric against the loss written out: q_sample of the raster tokens at the draw's t,
    the network given them in generation order, squared error to the noise."""
    from cfkit.plan import Plan
    from cfkit.schedules import step_index
    from cfkit.transformer import patchify

    context, metric = heldout(checkpoints["causalfusion"])
    values = metric(context, ar_steps=4)
    method = context.method
    images, labels, drawn = metric.inputs(context)
    tokens = patchify(images.float() / 127.5 - 1, 1)  # pixels tokenizer, patch 1: (N, 64, 1)
    step = step_index(torch.tensor([16, 16, 16, 16]))
    errors = torch.empty(6, 2, 64)
    with torch.no_grad():
        for i, d in np.ndindex(6, 2):
            order, t, noise = drawn.order[i, d], drawn.t[i, d], drawn.noise[i, d]
            x_t = method.diffusion.q_sample(tokens[i], t, noise)  # raster
            plan = Plan(order[None], step[None], t.view(1, 1, 1).expand(1, 1, 4))
            network_t = method.diffusion.timestep_map[t].expand(1, 1, 64)
            out = method.model(tokens[i:i + 1], x_t[order][None, None], network_t, labels[i:i + 1], plan)
            errors[i, d] = (out[0, 0] - noise[order]).pow(2).mean(-1)
    assert values["held-out ε-MSE"] == pytest.approx(float(errors.mean()), rel=1e-5)
    for k in range(4):
        expected = float(errors[..., 16 * k:16 * (k + 1)].mean())
        assert values[f"held-out ε-MSE, AR step {k + 1}/4"] == pytest.approx(expected, rel=1e-5)
    per_image = errors.double().mean(dim=(1, 2))
    assert values["held-out ε-MSE ±95%"] == pytest.approx(1.96 * float(per_image.std()) / 6 ** 0.5, rel=1e-5)
    assert len(values) == 2 + 4


def test_dits_heldout_loss_at_one_ar_step_is_its_denoising_loss_on_the_raster_tokens(checkpoints):
    from cfkit.transformer import patchify

    context, metric = heldout(checkpoints["dit"])
    values = metric(context, ar_steps=1)
    method = context.method
    images, labels, drawn = metric.inputs(context)
    tokens = patchify(images.float() / 127.5 - 1, 1)[:, None].expand(-1, 2, -1, -1)  # (N, D, L, 1)
    x_t = method.diffusion.q_sample(tokens, drawn.t, drawn.noise)
    with torch.no_grad():
        out = method.model(x_t.flatten(0, 1), drawn.t.flatten(), labels.repeat_interleave(2))
    per_image = (out.view_as(x_t) - drawn.noise).pow(2).mean(dim=(1, 2, 3)).double()
    assert values["held-out ε-MSE"] == pytest.approx(float(per_image.mean()), rel=1e-5)
    assert values["held-out ε-MSE ±95%"] == pytest.approx(1.96 * float(per_image.std()) / 6 ** 0.5, rel=1e-5)


def test_heldout_inputs_are_common_random_numbers_and_dit_sees_the_x_t_of_incontext_dit(checkpoints):
    """Every method sees the same images, orders, t and raster noise; at S = 1 DiT's network
    gets exactly In-context DiT's noisy tokens (put back in raster order) and timesteps."""
    found, seen = {}, {}
    for name in ("causalfusion", "incontext-dit", "dit"):
        context, metric = heldout(checkpoints[name])
        found[name] = metric.inputs(context)
        model = context.method.model
        seen[name] = []
        model.register_forward_pre_hook(lambda _, args, name=name: seen[name].append(args))
        metric(context, ar_steps=1)
    images, labels, drawn = found["causalfusion"]
    assert drawn.order.shape == (6, 2, 64) and drawn.t.shape == (6, 2) and drawn.noise.shape == (6, 2, 64, 1)
    assert ((drawn.t >= 0) & (drawn.t < 1000)).all()
    assert (drawn.t[:, 0] < 500).all() and (drawn.t[:, 1] >= 500).all()  # stratified
    for other in ("incontext-dit", "dit"):
        o_images, o_labels, o_drawn = found[other]
        assert torch.equal(o_images, images) and torch.equal(o_labels, labels)
        for field in ("order", "t", "noise"):
            assert torch.equal(getattr(o_drawn, field), getattr(drawn, field)), (other, field)
    (x_start, x_t, network_t, _, plan), = seen["incontext-dit"]
    raster = torch.empty_like(x_t[:, 0]).scatter_(1, plan.order[..., None].expand(-1, -1, 1), x_t[:, 0])
    (dit_x_t, dit_t, _), = seen["dit"]
    assert torch.equal(dit_x_t, raster)
    assert torch.equal(dit_t, network_t[:, 0, 0]) and (network_t == network_t[..., :1]).all()


def test_dit_has_no_heldout_loss_at_several_ar_steps_a_skipped_record_says_why(checkpoints, capsys):
    report = evaluate.evaluate(checkpoints["dit"], ["heldout-loss"], ar_steps=[2, 1],
                               metric_options={"heldout-loss": HELDOUT}, progress=False)
    by_s = {s: [r for r in report.results if r.ar_steps == s] for s in (1, 2)}
    assert [r.name for r in by_s[1]] == ["held-out ε-MSE", "held-out ε-MSE ±95%",
                                         "held-out ε-MSE, AR step 1/1"]
    (skipped,) = by_s[2]
    assert skipped.as_dict() == {"metric": "heldout-loss", "name": None, "value": None, "ar_steps": 2,
                                 "skipped": "method dit denoises the whole image at once: it has no AR "
                                            "steps to condition on"}
    json.dumps(report.as_dict(), allow_nan=False)
    assert "heldout-loss at S_eval 2: skipped (method dit denoises" in evaluate.summary(report)


def test_heldout_loss_per_step_values_average_token_weighted_to_the_mean(checkpoints):
    context, metric = heldout(checkpoints["causalfusion"], order="raster")
    values = metric(context, ar_steps=3)  # 64 tokens: steps of 22, 21, 21
    per_step = [values[f"held-out ε-MSE, AR step {k}/3"] for k in (1, 2, 3)]
    assert np.dot(per_step, [22, 21, 21]) / 64 == pytest.approx(values["held-out ε-MSE"], rel=1e-6)


def test_heldout_loss_is_evaluated_per_s_eval_and_other_model_metrics_once(checkpoints):
    report = evaluate.evaluate(checkpoints["incontext-dit"], ["heldout-loss", "probe"], ar_steps=[1, 2],
                               metric_options={"heldout-loss": HELDOUT}, progress=False)
    assert {(r.metric, r.ar_steps) for r in report.results} == {
        ("heldout-loss", 1), ("heldout-loss", 2), ("probe", None)}
    assert "| 1 | " in evaluate.summary(report) and "AR step 2/2 (S_eval 2)" in evaluate.summary(report)


def test_text_conditioned_methods_have_no_heldout_loss():
    experiment = configs.validate({
        "method": {"name": "causalfusion-multimodal"},
        "model": {"input_size": 4, "latent_channels": 1, "hidden_size": 32, "depth": 1, "num_heads": 2,
                  "max_text_len": 8},
        "data": {"dataset": {"name": "shapes"}, "text_tokenizer": {"name": "bytes"},
                 "tokenizer": {"name": "pixels", "channels": 1}},
    })
    context = EvalContext(experiment.build_method(), show_progress=False)
    with pytest.raises(metrics.MetricSkipped, match="conditions on captions"):
        plugins.build("metrics", "heldout-loss").check(context)
