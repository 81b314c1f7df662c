"""Metrics: the Fréchet distance against an independent SciPy one, KID against an independent
NumPy MMD, IS, precision/recall, sFID (the Inception's mixed_6/conv features, stored or
computed reference statistics), image reading, the feature networks (dataset classifiers, the
FID Inception), the linear probe and the networks' feature entry points, CIDEr-D against
pycocoevalcap."""

import json
import shutil
import sys
import types
from importlib.machinery import ModuleSpec

import numpy as np
import pytest
import scipy.linalg
import torch
from cfkit_plugins import metrics as builtin
from cfkit_plugins.dit import DiT, DiTConfig
from cfkit_plugins.inception import FIDInceptionV3
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from cfkit import evaluate, metrics, plugins
from cfkit.evaluate import EvalContext, SampleSet, score_samples
from cfkit.metrics import Extracted, MetricError, Statistics, frechet_distance
from cfkit.plan import Plan
from cfkit.transformer import CausalTransformer, TransformerConfig, patchify

JAVA = shutil.which("java") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_cnn(cache):
    return plugins.build("feature_networks", "digits-cnn")


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The pytorch-fid formula, written independently with NumPy and SciPy."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid(a, b) -> float:
    return frechet_distance(Statistics.of(a), Statistics.of(b))


# -- the Fréchet distance -------------------------------------------------------------------
@given(st.integers(0, 2**31), st.integers(1, 12), st.floats(0.1, 3.0))
def test_fid_equals_an_independent_scipy_frechet_distance(seed, dim, shift):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(64, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(shift, 1.5, size=(80, dim))
    assert fid(a, b) == pytest.approx(scipy_fid(a, b), rel=1e-6, abs=1e-8)


@given(st.integers(0, 2**31), st.integers(1, 12))
def test_fid_of_a_set_against_itself_is_zero_and_fid_is_symmetric(seed, dim):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(50, dim)), rng.gamma(2.0, size=(70, dim))
    scale = np.trace(np.atleast_2d(np.cov(a, rowvar=False)))
    assert abs(fid(a, a)) < 1e-6 * scale
    assert fid(a, b) == pytest.approx(fid(b, a), rel=1e-9)


def test_fid_equals_torchmetrics_fed_the_features_directly():
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(0.5, 2.0, size=(30, 6))
    direct = FrechetInceptionDistance(feature=metrics._Given(6))
    direct.update(torch.from_numpy(a), real=True)
    direct.update(torch.from_numpy(b), real=False)
    assert fid(a, b) == pytest.approx(float(direct.compute()), rel=1e-9)


def test_fid_grows_with_the_distance_between_means():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 4))
    values = [fid(a, rng.normal(shift, 1, size=(200, 4))) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[-1] > 4 * 4 * 0.8  # ~ |shift|^2 * dim


def test_statistics_round_trip_and_read_pytorch_fid_files(tmp_path):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(30, 5)), rng.normal(1, 1, size=(30, 5))
    Statistics.of(a).save(tmp_path / "a.npz", feature_network="digits-cnn")
    loaded, meta = Statistics.load(tmp_path / "a.npz")
    assert loaded.num == 30 and meta == {"feature_network": "digits-cnn"}
    stats_b = Statistics.of(b)
    np.savez(tmp_path / "b.npz", mu=stats_b.mean, sigma=stats_b.cov)  # pytorch-fid's layout
    assert metrics.is_statistics_file(tmp_path / "b.npz")
    assert frechet_distance(loaded, Statistics.load(tmp_path / "b.npz")[0]) == pytest.approx(
        scipy_fid(a, b), rel=1e-6)


def test_fid_of_different_feature_sizes_or_one_sample_is_an_error():
    with pytest.raises(MetricError, match="3 and 4 features"):
        fid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(MetricError, match="N >= 2"):
        Statistics.of(np.zeros((1, 3)))


# -- KID --------------------------------------------------------------------------------------
def numpy_kid(a: np.ndarray, b: np.ndarray) -> float:
    """The unbiased MMD² under the kernel (x·y / F + 1)³, written independently."""
    m, dim = len(a), a.shape[1]
    k_aa, k_bb, k_ab = ((x @ y.T / dim + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    off = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(off - 2 * k_ab.mean())


def test_kid_of_whole_sets_equals_an_independent_numpy_mmd():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(0.5, 1.2, size=(40, 6))
    mean, std = metrics.kernel_inception_distance(torch.from_numpy(a), torch.from_numpy(b), subsets=3,
                                                  subset_size=40)
    assert mean == pytest.approx(numpy_kid(a, b), rel=1e-9) and std == pytest.approx(0, abs=1e-9)


def test_kid_of_a_set_against_itself_is_about_zero_and_of_different_sets_positive():
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.normal(size=(400, 16)))
    b = torch.from_numpy(rng.normal(0.5, 1.0, size=(400, 16)))
    same, _ = metrics.kernel_inception_distance(a, a, subsets=20, subset_size=100)
    different, std = metrics.kernel_inception_distance(a, b, subsets=20, subset_size=100)
    assert abs(same) < different / 20 and different > 5 * std > 0
    with pytest.raises(MetricError, match="subset_size must be in 2..400"):
        metrics.kernel_inception_distance(a, b, subset_size=401)


def test_the_kid_metric_reads_fids_features_and_names_the_count_and_network():
    rng = np.random.default_rng(2)
    real = Extracted(torch.from_numpy(rng.normal(size=(300, 8))).float())
    fake = Extracted(torch.from_numpy(rng.normal(1, 1, size=(50, 8))).float())
    context = types.SimpleNamespace(reference=types.SimpleNamespace(features=lambda: real),
                                    features=lambda samples: fake,
                                    network=types.SimpleNamespace(name="net"))
    values = plugins.build("metrics", "kid", subsets=5)(context, samples=range(50))
    assert list(values) == ["KID-50 (net)", "KID-50 std (net)"]
    expected = metrics.kernel_inception_distance(real.features, fake.features, 5, 25)  # half of 50
    assert tuple(values.values()) == pytest.approx(expected) and values["KID-50 (net)"] > 0


def test_every_metric_declares_whether_lower_or_higher_is_better():
    registry = plugins.registry()
    better = {name: registry.component("metrics", name).factory.better for name in registry.names("metrics")}
    assert set(better.values()) <= set(metrics.BETTER)
    assert {n for n, b in better.items() if b == "lower"} >= {"fid", "sfid", "kid", "heldout-loss"}
    assert {n for n, b in better.items() if b == "higher"} >= {
        "is", "precision-recall", "class-accuracy", "probe", "clip-score", "cider"}


# -- IS, precision/recall, class accuracy ---------------------------------------------------
def test_inception_score_is_one_for_one_prediction_and_k_for_k_confident_balanced_classes():
    assert metrics.inception_score(torch.zeros(100, 5))[0] == pytest.approx(1.0)
    logits = 50 * torch.eye(4).repeat(500, 1)
    mean, std = metrics.inception_score(logits, splits=10)
    assert mean == pytest.approx(4.0, abs=0.05) and std < 0.05
    with pytest.raises(MetricError, match="2 samples per split"):
        metrics.inception_score(torch.zeros(15, 3), splits=10)


def brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int):
    def inside(manifold, queries):
        d = np.linalg.norm(manifold[:, None] - manifold[None], axis=-1)
        radii = np.sort(d, axis=1)[:, k]
        dq = np.linalg.norm(queries[:, None] - manifold[None], axis=-1)
        return float((dq <= radii[None]).any(axis=1).mean())

    return inside(real, fake), inside(fake, real)


@given(st.integers(0, 2**31), st.integers(1, 5))
def test_precision_recall_equal_a_brute_force_knn_manifold(seed, k):
    rng = np.random.default_rng(seed)
    real, fake = rng.normal(size=(40, 3)), rng.normal(0.7, 0.6, size=(30, 3))
    ours = metrics.precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k)
    assert ours == pytest.approx(brute_precision_recall(real, fake, k))


def test_precision_recall_of_mode_collapse_keep_precision_and_lose_recall():
    real = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    collapsed = real[:20] * 0.1 + real[0]  # every sample near one real point
    precision, recall = metrics.precision_recall(real, collapsed, k=3)
    assert precision == 1.0 and recall < 0.1
    assert metrics.precision_recall(real, real, k=3) == (1.0, 1.0)
    with pytest.raises(MetricError, match="k must be in 1..19"):
        metrics.precision_recall(real, collapsed, k=20)


def test_count_labels_and_class_accuracy():
    assert [metrics.count_label(n) for n in (500, 1000, 1500, 50000)] == ["500", "1k", "1500", "50k"]
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert metrics.class_accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


# -- reading images -------------------------------------------------------------------------
def write_pngs(folder, images: np.ndarray):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f"{i:03d}.png")


def test_images_read_alike_from_a_folder_an_npz_and_a_sample_folder(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    write_pngs(tmp_path / "pngs", images)
    np.savez(tmp_path / "images.npz", arr_0=images)
    (tmp_path / "sampled").mkdir()
    np.savez(tmp_path / "sampled" / "samples.npz", arr_0=images, latents=np.zeros(1))
    Image.new("L", (40, 40)).save(tmp_path / "sampled" / "grid.png")  # as cfkit sample writes
    expected = torch.from_numpy(images).permute(0, 3, 1, 2)
    for path in ("pngs", "images.npz", "sampled"):
        assert torch.equal(metrics.read_images(tmp_path / path), expected)


def test_unreadable_image_sets_are_errors_that_say_why(tmp_path):
    write_pngs(tmp_path / "mixed", np.zeros((2, 8, 8, 1), np.uint8))
    Image.new("L", (16, 16)).save(tmp_path / "mixed" / "big.png")
    with pytest.raises(MetricError, match="differ in size.*000.png is 8x8 grey, big.png is 16x16 grey"):
        metrics.read_images(tmp_path / "mixed")
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(MetricError, match="arr_0 must be uint8"):
        metrics.read_images(tmp_path / "floats.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetricError, match="no image files"):
        metrics.read_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        metrics.read_images(tmp_path / "absent")


# -- feature networks -----------------------------------------------------------------------
def test_digits_cnn_trains_once_classifies_held_out_digits_and_is_cached(digits_cnn, monkeypatch):
    assert digits_cnn.held_out_accuracy > 0.95
    images, labels = metrics.dataset_images(plugins.build("datasets", "digits"), "val")
    out = digits_cnn(images)
    assert out.features.shape == (len(images), digits_cnn.num_features)
    assert metrics.class_accuracy(out.logits, labels) == pytest.approx(digits_cnn.held_out_accuracy)
    monkeypatch.setattr(builtin.DatasetClassifier, "_train", lambda self: pytest.fail("retrained"))
    again = plugins.build("feature_networks", "digits-cnn")
    assert torch.equal(again(images).features, out.features)
    assert again.identity() == digits_cnn.identity()


def test_feature_networks_reject_images_of_another_shape(digits_cnn):
    with pytest.raises(MetricError, match=r"digits-cnn \(trained on digits images\) takes images "
                                          r"\(N, 1, 8, 8\), got \(N, 3, 16, 16\)"):
        digits_cnn(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(MetricError, match="uint8"):
        digits_cnn(torch.zeros(2, 1, 8, 8))


def test_shapes_cnn_takes_the_image_size_of_its_dataset_options(cache, monkeypatch):
    monkeypatch.setitem(builtin.CLASSIFIER_RECIPE, "steps", 5)  # the plumbing, not the accuracy
    network = plugins.build("feature_networks", "shapes-cnn", size=60, image_size=12)
    assert network(torch.zeros(3, 3, 12, 12, dtype=torch.uint8)).logits.shape == (3, 12)
    with pytest.raises(MetricError, match=r"\(N, 3, 12, 12\)"):
        network(torch.zeros(3, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(MetricError, match="shapes-cnn: dataset 'shapes' with options"):
        plugins.build("feature_networks", "shapes-cnn", colour="red")


def test_unknown_feature_network_lists_the_known_ones():
    known = "known: digits-cnn, inception, mnist-cnn, shapes-cnn"
    with pytest.raises(plugins.UnknownComponentError, match=known):
        plugins.build("feature_networks", "vgg")


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised FID Inception state dict in the standard layout, as .pth."""
    torch.manual_seed(0)
    state = FIDInceptionV3().state_dict()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    return path


def test_the_fid_inception_has_the_standard_weights_layout():
    state = FIDInceptionV3().state_dict()
    params = sum(p.numel() for p in FIDInceptionV3().parameters())
    assert params == 23_850_960  # torchvision's Inception3 without AuxLogits, 1008 classes
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert state["fc.weight"].shape == (1008, 2048)


def test_inception_loads_local_weights_from_the_environment_or_an_option(inception_weights, tmp_path,
                                                                          monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("CFKIT_INCEPTION_WEIGHTS", str(inception_weights))
    network = plugins.build("feature_networks", "inception")
    out = network(torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8))  # grey, any size
    assert out.features.shape == (1, 2048) and out.logits.shape == (1, 1008)
    safetensors = tmp_path / "inception.safetensors"
    save_file(torch.load(inception_weights, weights_only=True), safetensors)
    monkeypatch.delenv("CFKIT_INCEPTION_WEIGHTS")
    other = plugins.build("feature_networks", "inception", weights=str(safetensors))
    assert other.identity()["weights"] != network.identity()["weights"]  # a file digest
    for name, param in other.model.state_dict().items():
        assert torch.equal(param, network.model.state_dict()[name])


def test_inception_without_weights_or_with_wrong_ones_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("CFKIT_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(MetricError, match="CFKIT_INCEPTION_WEIGHTS=PATH.*weights=PATH.*digits-cnn"):
        plugins.build("feature_networks", "inception")
    with pytest.raises(MetricError, match="weights file not found"):
        plugins.build("feature_networks", "inception", weights=str(tmp_path / "absent.pth"))
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(MetricError, match=r"471 missing key\(s\)"):
        plugins.build("feature_networks", "inception", weights=str(tmp_path / "wrong.pth"))
    torch.save({"fc.weight": types.SimpleNamespace(a=1)}, tmp_path / "pickle.pth")
    with pytest.raises(MetricError, match="torch can read safely"):
        plugins.build("feature_networks", "inception", weights=str(tmp_path / "pickle.pth"))


# -- sFID -----------------------------------------------------------------------------------
def test_spatial_features_are_the_first_7_channels_of_mixed_6_conv_in_tensorflow_order():
    """As the ADM evaluator takes them: TensorFlow's mixed_6/conv is the 1x1 branch of
    Mixed_6d (17x17); its first 7 channels, flattened in (H, W, C) order, are 2023 features."""
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    seen = []
    model.Mixed_6d.branch1x1.register_forward_hook(lambda module, inputs, output: seen.append(output))
    with torch.no_grad():
        _, _, spatial = model(torch.rand(2, 3, 20, 24))
    (branch,) = seen
    assert branch.shape == (2, 192, 17, 17) and spatial.shape == (2, 2023)
    assert torch.equal(spatial, branch[:, :7].permute(0, 2, 3, 1).reshape(2, 2023))
    assert torch.equal(spatial.view(2, 17, 17, 7)[:, 3, 5], branch[:, :7, 3, 5])
    assert spatial.abs().sum() > 0


class SpatialStandIn:
    """A feature network of 3 pool and 5 spatial features of (3, 2, 2) images: cheap enough
    to check what sFID compares."""

    name, num_features, num_spatial_features, classes = "stand-in", 3, 5, None

    def __call__(self, images: torch.Tensor) -> Extracted:
        x = images.double().flatten(1)
        return Extracted(x[:, :3], None, x[:, 3:8] + x[:, :5].sqrt())

    def identity(self) -> dict:
        return {"name": self.name}

    def to(self, device):
        return self


def test_sfid_compares_the_spatial_features_with_stored_statistics_else_the_images(tmp_path):
    network, rng = SpatialStandIn(), np.random.default_rng(0)
    real = rng.integers(0, 256, (40, 2, 2, 3), dtype=np.uint8)
    fake = torch.from_numpy(rng.integers(0, 128, (30, 3, 2, 2), dtype=np.uint8))
    real_spatial = network(torch.from_numpy(real).permute(0, 3, 1, 2)).spatial.numpy()
    fake_spatial = network(fake).spatial.numpy()
    other = rng.normal(size=(50, 5))
    np.savez(tmp_path / "batch.npz", arr_0=real)  # an ADM reference batch of images alone
    stored = Statistics.of(other)
    np.savez(tmp_path / "stored.npz", arr_0=real, mu_s=stored.mean, sigma_s=stored.cov)
    Statistics.of(real_spatial[:, :3]).save(tmp_path / "pool.npz")

    def sfid(name: str):
        context = EvalContext(None, show_progress=False, reference_stats=tmp_path / name)
        context.network = network
        (record,) = score_samples(context, ["sfid"], SampleSet(fake, torch.zeros(30), ar_steps=1))
        return record

    assert sfid("batch.npz").name == "sFID-30 (stand-in)"
    assert sfid("batch.npz").value == pytest.approx(scipy_fid(real_spatial, fake_spatial), rel=1e-6)
    assert sfid("stored.npz").value == pytest.approx(scipy_fid(other, fake_spatial), rel=1e-6)
    assert sfid("pool.npz").skipped == ("the reference pool.npz holds no sFID statistics (mu_s, sigma_s) "
                                        "and no arr_0 images")


def test_saved_statistics_of_a_network_with_spatial_features_hold_sfids_too(tmp_path):
    spatial = Statistics.of(np.random.default_rng(1).normal(size=(9, 4)))
    Statistics.of(np.eye(3)).save(tmp_path / "stats.npz", spatial, feature_network="x")
    saved = np.load(tmp_path / "stats.npz")
    assert sorted(saved.files) == ["feature_network", "mu", "mu_s", "num", "sigma", "sigma_s"]
    loaded, meta = Statistics.load(tmp_path / "stats.npz", metrics.SPATIAL_KEYS)
    assert np.array_equal(loaded.cov, spatial.cov) and meta == {"feature_network": "x"}
    Statistics.of(np.eye(3)).save(tmp_path / "pool.npz")
    with pytest.raises(MetricError, match="no mu_s and sigma_s in it"):
        Statistics.load(tmp_path / "pool.npz", metrics.SPATIAL_KEYS)


@pytest.mark.slow
def test_the_fid_inception_scores_fid_sfid_and_kid_against_an_adm_batch(inception_weights, tmp_path):
    """End to end with the real architecture (random weights): an ADM batch of images and
    the statistics ``cfkit fid --save-stats`` writes of it give the same FID and sFID."""
    rng, options = np.random.default_rng(0), {"weights": str(inception_weights)}
    np.savez(tmp_path / "batch.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    evaluate.save_statistics(tmp_path / "batch.npz", tmp_path / "stats.npz", features="inception",
                             feature_options=options, show_progress=False)
    assert np.load(tmp_path / "stats.npz")["mu_s"].shape == (2023,)
    fake = SampleSet(torch.from_numpy(rng.integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)),
                     torch.zeros(5), ar_steps=1)
    scored = {}
    for name in ("batch.npz", "stats.npz"):
        context = EvalContext(None, "inception", options, show_progress=False,
                              reference_stats=tmp_path / name)
        records = score_samples(context, ["fid", "sfid", "kid"], fake)
        scored[name] = {r.name or r.metric: r.value for r in records}
    assert set(scored["batch.npz"]) == {"FID-5 (inception)", "sFID-5 (inception)", "KID-5 (inception)",
                                        "KID-5 std (inception)"}
    for name in ("FID-5 (inception)", "sFID-5 (inception)"):
        assert scored["stats.npz"][name] == pytest.approx(scored["batch.npz"][name], rel=1e-6)
        assert scored["batch.npz"][name] > 0
    assert scored["stats.npz"]["kid"] is None  # statistics alone: skipped


# -- the linear probe and the networks' features ---------------------------------------------
def test_linear_probe_scores_held_out_labels():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 4
    separable = torch.nn.functional.one_hot(labels, 4).float() + 0.1 * torch.randn(400, 4, generator=g)
    assert builtin.linear_probe(separable[:300], labels[:300], separable[300:], labels[300:]) == 1.0
    noise = torch.randn(400, 4, generator=g)
    assert builtin.linear_probe(noise[:300], labels[:300], noise[300:], labels[300:]) < 0.5


def perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("timestep", ["add", "token"])
def test_causal_transformer_hidden_states_are_the_one_step_forward_before_its_output_layer(timestep):
    config = TransformerConfig(input_size=4, latent_channels=2, hidden_size=32, depth=2, num_heads=2,
                               timestep=timestep)
    model = perturbed(CausalTransformer(config))
    latents = torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 10, 500])
    tokens = patchify(latents, 1)
    n, length = tokens.shape[:2]
    step = torch.zeros(n, length, dtype=torch.long)  # one AR step, raster order
    plan = Plan(torch.arange(length).expand(n, -1), step, t[:, None, None])
    null = torch.full((n,), config.num_classes)
    with torch.no_grad():
        expected = model(tokens, tokens[:, None], t[:, None, None].expand(-1, 1, length), null, plan)[:, 0]
        hidden = model.hidden_states(latents, t)
    assert hidden.shape == (3, 16, 32)
    torch.testing.assert_close(model.final_layer(hidden), expected, atol=1e-5, rtol=1e-5)


def test_dit_hidden_states_are_the_forward_before_its_output_layer():
    model = perturbed(DiT(DiTConfig(input_size=4, latent_channels=2, hidden_size=32, depth=2, num_heads=2)))
    latents, t = torch.randn(3, 2, 4, 4), torch.tensor([0, 10, 500])
    null = torch.full((3,), model.config.num_classes)
    with torch.no_grad():
        hidden = model.hidden_states(latents, t)
        out = model.final_layer(hidden, model.condition(t, null))
        torch.testing.assert_close(out, patchify(model(latents, t, null), 1))


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_hidden_states_are_unconditional(dropout):
    """Without a null class the condition is left out, never a real label."""
    config = TransformerConfig(input_size=4, latent_channels=2, hidden_size=32, depth=2, num_heads=2,
                               class_dropout=dropout)
    model = perturbed(CausalTransformer(config))
    latents, t = torch.randn(2, 2, 4, 4), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        unconditional = model.hidden_states(latents, t)
        for label in range(3):
            conditional = model.hidden_states(latents, t, torch.full((2,), label))
            assert not torch.allclose(unconditional, conditional)


# -- CIDEr-D ----------------------------------------------------------------------------------
CAPTIONS = {
    1: ["a red circle in the top left", "there is a red circle in the top left corner.",
        "top left: one red circle on a dark background"],
    2: ["a blue square at the bottom right of the image", "A picture of a blue square, bottom right!"],
    3: ["a green triangle in the top right", "The triangle's colour is green (top right)."],
}
PREDICTIONS = {1: "a red circle in the top left corner", 2: "a blue square in the top left",
               3: "a yellow circle"}


@pytest.mark.skipif(not JAVA, reason="pycocoevalcap's PTB tokenizer needs java")
def test_cider_d_equals_pycocoevalcap_called_directly():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in cs] for i, cs in CAPTIONS.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in PREDICTIONS.items()})
    direct, _ = Cider().compute_score(gts, res)
    (name, ours), = plugins.build("metrics", "cider").score(PREDICTIONS, CAPTIONS).items()
    assert name == "CIDEr-D (ptb tokenizer)"
    assert ours == pytest.approx(100 * direct, rel=1e-9) and ours > 0


@pytest.mark.skipif(not JAVA, reason="pycocoevalcap's PTB tokenizer needs java")
def test_the_fallback_tokenizer_agrees_with_ptb_on_captions():
    captions = {i: cs for i, cs in CAPTIONS.items()}
    captions[4] = ["It's a dog's toy, isn't it?", "two-tone \"quoted\" words; 3.5 cm...",
                   "a [bracket] {curly} dogs' bones -- fine: ok - yes"]
    ptb = builtin.CiderD("ptb").tokenize(captions)
    assert builtin.CiderD("simple").tokenize(captions) == ptb


def test_cider_tokenizer_choice_is_checked(monkeypatch):
    with pytest.raises(MetricError, match="allowed: auto, ptb, simple"):
        builtin.CiderD("spacy")
    monkeypatch.setattr(builtin.shutil, "which", lambda name: None)
    assert builtin.CiderD().tokenizer == "simple"
    with pytest.raises(MetricError, match="needs java"):
        builtin.CiderD("ptb")


def test_caption_files_in_coco_formats_are_read_and_checked(tmp_path):
    results = [{"image_id": i, "caption": c} for i, c in PREDICTIONS.items()]
    annotations = {"images": [{"id": i} for i in CAPTIONS],
                   "annotations": [{"image_id": i, "id": 10 * i + j, "caption": c}
                                   for i, cs in CAPTIONS.items() for j, c in enumerate(cs)]}
    (tmp_path / "res.json").write_text(json.dumps(results))
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    assert metrics.read_caption_results(tmp_path / "res.json") == PREDICTIONS
    assert metrics.read_caption_annotations(tmp_path / "ann.json") == CAPTIONS
    (tmp_path / "twice.json").write_text(json.dumps(results + results[:1]))
    with pytest.raises(MetricError, match="more than one caption"):
        metrics.read_caption_results(tmp_path / "twice.json")
    with pytest.raises(MetricError, match="image_id 9"):
        metrics.paired_captions({9: "a cat"}, CAPTIONS)


# -- CLIP score -------------------------------------------------------------------------------
def test_clip_score_is_skipped_with_the_reason_when_open_clip_does_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(metrics.MetricSkipped, match="pip install 'cfkit\\[clip\\]'"):
        builtin.ClipScore().check(types.SimpleNamespace())


def test_clip_score_with_a_stand_in_open_clip(monkeypatch, tmp_path):
    """The plumbing, with an open_clip whose image and text embeddings are set by the test."""
    fake = types.ModuleType("open_clip")
    fake.__spec__ = ModuleSpec("open_clip", None)

    class Model:
        def eval(self):
            return self

        def encode_image(self, x):  # the mean brightness as the direction's first coordinate
            return torch.stack([x.mean(dim=(1, 2, 3)), torch.ones(len(x))], dim=1)

        def encode_text(self, ids):
            return ids

    fake.create_model_and_transforms = lambda name, pretrained: (
        Model(), None, lambda picture: torch.from_numpy(np.asarray(picture, np.float32) / 255))
    fake.get_tokenizer = lambda name: lambda texts: torch.tensor([[0.0, 1.0] for _ in texts])
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    (tmp_path / "clip.bin").write_bytes(b"")
    metric = builtin.ClipScore(weights=str(tmp_path / "clip.bin"), template="a digit {label}")
    dataset = plugins.build("datasets", "digits")
    context = types.SimpleNamespace(dataset=dataset)
    metric.check(context)
    dark = types.SimpleNamespace(images=torch.zeros(4, 1, 8, 8, dtype=torch.uint8),
                                 labels=torch.arange(4))
    assert metric(context, dark) == {"CLIP score (ViT-B-32)": pytest.approx(100.0)}
    with pytest.raises(MetricError, match="no class_names"):
        builtin.ClipScore().prompt(dataset, 0)


def test_clip_score_is_the_clipped_cosine_times_100():
    images = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    assert builtin.clip_score(images, texts) == pytest.approx(100 * (1 + 2**-0.5 + 0) / 3)


def test_extract_batches_and_reports_progress(digits_cnn):
    images = torch.zeros(7, 1, 8, 8, dtype=torch.uint8)
    seen = []
    out = metrics.extract(digits_cnn, images, batch_size=3, progress=seen.append)
    assert seen == [3, 3, 1] and isinstance(out, Extracted) and out.logits.shape == (7, 10)
    assert torch.allclose(out.features, digits_cnn(images).features)


def test_cfkit_exposes_the_metric_kinds():
    assert {"fid", "sfid", "kid", "is", "precision-recall", "class-accuracy", "probe", "heldout-loss",
            "clip-score", "cider"} <= set(plugins.registry().names("metrics"))
