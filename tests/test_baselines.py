"""Baseline samplers: their images come from the right train images, independent pixels have
the class's per-pixel means, and scored like a model's samples the real images beat the
structureless ones."""

import pytest
import torch

from cfkit import baselines, evaluate, plugins
from cfkit import config as configs
from cfkit.evaluate import EvalContext
from cfkit.metrics import dataset_images

pytestmark = pytest.mark.usefixtures("one_thread")

MNIST = {"name": "mnist", "image_size": 8}


@pytest.fixture(scope="module")
def mnist():
    dataset = plugins.build("datasets", **MNIST)
    return dataset, *dataset_images(dataset, "train")


@pytest.mark.parametrize("name", baselines.BASELINES)
def test_baselines_are_class_balanced_uint8_images_of_the_dataset(mnist, name):
    dataset, train, _ = mnist
    samples = baselines.baseline_samples(name, dataset, 23, ar_steps=4, seed=1)
    assert samples.images.shape == (23, 1, 8, 8) and samples.images.dtype == torch.uint8
    assert torch.equal(samples.labels, torch.arange(23) % 10)
    assert samples.ar_steps == (4 if name == "context-blind-ar" else None)
    again = baselines.baseline_samples(name, dataset, 23, ar_steps=4, seed=1)
    assert torch.equal(again.images, samples.images)
    assert not torch.equal(baselines.baseline_samples(name, dataset, 23, ar_steps=4, seed=2).images,
                           samples.images)


def test_real_train_samples_are_train_images_of_their_class(mnist):
    dataset, train, train_labels = mnist
    samples = baselines.baseline_samples("real-train", dataset, 30)
    for image, label in zip(samples.images, samples.labels, strict=True):
        matches = (train == image).flatten(1).all(dim=1)
        assert (train_labels[matches] == label).any()


@pytest.mark.parametrize("patch_size", [1, 2])
def test_each_context_blind_ar_step_is_copied_from_a_different_train_image_of_the_class(mnist, patch_size):
    dataset, train, train_labels = mnist
    members = baselines.ClassMembers.of(train_labels, 10)
    labels = torch.arange(20) % 10
    generator = torch.Generator().manual_seed(0)
    images, step, sources = baselines.context_blind_ar(train, members, labels, generator, ar_steps=4,
                                                       patch_size=patch_size)
    length = (8 // patch_size) ** 2
    assert step.shape == (20, length) and sources.shape == (20, 4)
    assert (torch.stack([torch.bincount(row, minlength=4) for row in step]) == length // 4).all()
    assert (train_labels[sources] == labels[:, None]).all()
    assert all(len(set(row.tolist())) == 4 for row in sources)  # a different image per step
    pixel_step = step.view(20, 1, 8 // patch_size, 8 // patch_size)
    pixel_step = pixel_step.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    for n in range(20):
        for k in range(4):
            group = pixel_step[n] == k
            assert torch.equal(images[n][group], train[sources[n, k]][group])
    samples = baselines.baseline_samples("context-blind-ar", dataset, 20, ar_steps=4, patch_size=patch_size)
    assert torch.equal(samples.images, images)


def test_independent_pixels_have_the_per_pixel_means_of_their_class(mnist):
    dataset, train, train_labels = mnist
    samples = baselines.baseline_samples("independent-pixels", dataset, 5000)
    for label in range(10):
        drawn = samples.images[samples.labels == label].double().mean(0)
        real = train[train_labels == label].double().mean(0)
        assert (drawn - real).abs().mean() < 4 and (drawn - real).abs().max() < 30  # 500 draws


def test_a_bad_baseline_name_lists_the_allowed_ones(mnist):
    with pytest.raises(ValueError, match="allowed: real-train, independent-pixels, context-blind-ar"):
        baselines.baseline_samples("noise", mnist[0], 10)


def test_scored_against_the_val_reference_real_images_beat_independent_pixels(mnist, cache):
    """Baselines beat nothing they should not: real train images are closer to the val
    images than per-pixel noise with the right marginals, by FID and KID on mnist-cnn."""
    experiment = configs.validate({"data": {"dataset": MNIST}})
    context = EvalContext.for_experiment(experiment, reference_split="val", show_progress=False)
    scores = {}
    for name in ("real-train", "independent-pixels"):
        samples = baselines.baseline_samples(name, mnist[0], 300)
        records = evaluate.score_samples(context, ["fid", "kid", "class-accuracy"], samples)
        assert {r.ar_steps for r in records} == {None}
        scores[name] = {r.name: r.value for r in records}
    real, pixels = scores["real-train"], scores["independent-pixels"]
    assert real["FID-300 (mnist-cnn)"] < pixels["FID-300 (mnist-cnn)"] / 3
    assert real["KID-300 (mnist-cnn)"] < pixels["KID-300 (mnist-cnn)"]
    assert real["class accuracy (mnist-cnn)"] > 0.9
    with pytest.raises(evaluate.MetricError, match="do not score samples"):
        evaluate.score_samples(context, ["fid", "probe"], samples)
    with pytest.raises(evaluate.MetricError, match="has no model"):
        context.method  # noqa: B018
