"""Reference sets: an ADM reference batch of the train images scores as the train split,
statistics alone give FID (KID and precision/recall are skipped, saying why), stored statistics
come before the images (as in the ADM evaluator), and bad files are errors naming what is
allowed. The digits val split poses as the samples."""

import numpy as np
import pytest

from cfkit import config as configs
from cfkit import evaluate, metrics
from cfkit.evaluate import EvalContext, SampleSet, score_samples
from cfkit.metrics import MetricError, Statistics
from cfkit.reference_sets import FileReference, stored_shape

EXPERIMENT = configs.validate({
    "name": "tiny", "method": {"name": "causalfusion"},
    "model": {"input_size": 8, "latent_channels": 1, "hidden_size": 32, "depth": 2, "num_heads": 2,
              "num_classes": 10},
    "data": {"dataset": {"name": "digits"}, "tokenizer": {"name": "pixels", "channels": 1}},
})
ON_SAMPLES = ["fid", "kid", "precision-recall", "sfid"]


pytestmark = pytest.mark.usefixtures("one_thread")


def context(**options) -> EvalContext:
    return EvalContext.for_experiment(EXPERIMENT, show_progress=False, **options)


def values(records) -> dict:
    return {r.name: r.value for r in records if r.name is not None}


def skips(records) -> dict:
    return {r.metric: r.skipped for r in records if r.name is None}


@pytest.fixture(scope="module")
def samples(cache) -> SampleSet:
    images, labels = context().dataset_images("val")
    return SampleSet(images, labels, ar_steps=1)


@pytest.fixture(scope="module")
def files(cache, tmp_path_factory):
    """The train images as an ADM reference batch (``arr_0``), their statistics alone (``cfkit
    fid --save-stats``) and the train statistics stored beside the val images."""
    folder = tmp_path_factory.mktemp("references")
    train = context().dataset_images("train")[0].permute(0, 2, 3, 1).numpy()
    np.savez(folder / "batch.npz", arr_0=train)
    evaluate.save_statistics(folder / "batch.npz", folder / "stats.npz", features="digits-cnn",
                             show_progress=False)
    stats = Statistics.load(folder / "stats.npz")[0]
    val = context().dataset_images("val")[0].permute(0, 2, 3, 1).numpy()
    np.savez(folder / "mixed.npz", arr_0=val, mu=stats.mean, sigma=stats.cov)
    return folder


def test_an_adm_batch_of_the_train_images_scores_as_the_train_split(samples, files):
    split, batch = (score_samples(c, ON_SAMPLES, samples)
                    for c in (context(), context(reference_stats=files / "batch.npz")))
    assert values(batch) == pytest.approx(values(split), rel=1e-9)
    assert {"FID-360 (digits-cnn)", "KID-360 (digits-cnn)", "recall (digits-cnn, k=3)"} <= set(values(batch))
    assert skips(batch) == skips(split) == {"sfid": "feature network digits-cnn has no spatial features; "
                                                    "sFID takes Inception's (--features inception)"}
    described = context(reference_stats=files / "batch.npz").reference.describe()
    assert described == {"file": str(files / "batch.npz"), "sha256": metrics.file_digest(files / "batch.npz"),
                         "holds": ["arr_0"], "num": 1437}


def test_statistics_alone_give_fid_and_the_metrics_needing_images_are_skipped_saying_why(samples, files):
    expected = values(score_samples(context(), ["fid"], samples))
    stats = Statistics.load(files / "stats.npz")[0]
    np.savez(files / "pytorch-fid.npz", mu=stats.mean, sigma=stats.cov)  # pytorch-fid's keys alone
    for name in ("stats.npz", "pytorch-fid.npz"):
        records = score_samples(context(reference_stats=files / name), ON_SAMPLES, samples)
        assert values(records) == pytest.approx(expected, rel=1e-6)
        reasons = skips(records)
        for metric in ("kid", "precision-recall"):
            assert f"the reference {name} holds statistics only (no arr_0 images)" in reasons[metric]
    assert context(reference_stats=files / "stats.npz").reference.describe()["num"] == 1437
    assert context(reference_stats=files / "pytorch-fid.npz").reference.describe()["num"] is None


def test_stored_statistics_come_before_the_images_as_in_the_adm_evaluator(samples, files):
    """mixed.npz: the train statistics beside the val images, scoring the val images: FID is
    against the statistics (the train split's), KID against the images (themselves)."""
    fid, kid = "FID-360 (digits-cnn)", "KID-360 (digits-cnn)"
    mixed = values(score_samples(context(reference_stats=files / "mixed.npz"), ["fid", "kid"], samples))
    train = values(score_samples(context(), ["fid"], samples))
    val = values(score_samples(context(reference_split="val"), ["fid", "kid"], samples))
    assert mixed[fid] == pytest.approx(train[fid], rel=1e-9) and mixed[fid] > 1000 * abs(val[fid])
    assert mixed[kid] == pytest.approx(val[kid], rel=1e-9)


def test_bad_reference_files_are_errors_naming_what_is_allowed(files, tmp_path):
    network = context().network
    np.savez(tmp_path / "other.npz", features=np.zeros((3, 4)))
    Statistics.of(np.random.default_rng(0).normal(size=(10, 2048))).save(tmp_path / "inception.npz")
    Statistics.of(np.random.default_rng(0).normal(size=(10, 128))).save(
        tmp_path / "shapes.npz", feature_network="shapes-cnn")
    np.savez(tmp_path / "nan.npz", mu=np.full(128, np.nan), sigma=np.eye(128))
    cases = {
        "other.npz": "no reference statistics or images in it (keys: features); give pytorch-fid's "
                     "statistics (mu, sigma) or an ADM reference batch (arr_0",
        "inception.npz": "holds statistics of 2048 features; digits-cnn gives 128",
        "shapes.npz": "statistics of feature network shapes-cnn, not digits-cnn: give --features shapes-cnn",
        "nan.npz": "mu holds 128 NaN and 0 infinite values",
    }
    for name, message in cases.items():
        with pytest.raises(MetricError) as error:
            FileReference(tmp_path / name, network)
        assert message in str(error.value)
    with pytest.raises(FileNotFoundError, match="no such reference statistics file"):
        FileReference(tmp_path / "absent.npz", network)
    reference = FileReference(files / "stats.npz", network)
    with pytest.raises(MetricError, match="holds statistics only"):
        reference.features()
    with pytest.raises(ValueError, match="unknown reference need 'images'; allowed: features, spatial"):
        reference.unavailable("images")


def test_the_images_of_a_batch_are_counted_from_its_header(files):
    assert stored_shape(files / "batch.npz", "arr_0") == (1437, 8, 8, 1)
    with pytest.raises(MetricError, match="array 'mu' cannot be read"):
        stored_shape(files / "batch.npz", "mu")
