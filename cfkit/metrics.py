"""Evaluation metrics: feature networks, feature statistics, the Fréchet distance and its kin.

A feature network (``register_feature_networks``) maps uint8 images ``(N, C, H, W)`` to
features ``(N, F)`` and, when it is a classifier, to logits ``(N, K)`` too, and, when it has
them, to spatial features ``(N, S)`` (sFID's: Inception's ``mixed_6/conv``); its
``identity()`` says what its features depend on (name, weights), which keys the cache of a
dataset's reference features. Every metric on images works on extracted features, so that
they are computed once per sample set and cached once per dataset:

- FID through torchmetrics' ``FrechetInceptionDistance``, fed the sufficient statistics it
  accumulates (count, sum, sum of outer products) of the two feature sets, and sFID: the same
  distance on the spatial features;
- Inception Score through torchmetrics' ``InceptionScore`` on the logits;
- precision and recall of the k-NN manifolds (Kynkäänniemi et al., 2019);
- KID through torchmetrics' ``KernelInceptionDistance`` on the same features;
- class accuracy: how often the classifier agrees with the requested class.

On the model, the held-out loss: the ε-MSE of validation images split into S equal AR steps,
with inputs (orders, timesteps, noise) that do not depend on the model, so that every method
sees the same ones (common random numbers).

A metric plugin (``register_metrics``) has ``needs`` (``"samples"``: called once per sample
set; ``"model"``: once per evaluation, or once per S_eval as ``metric(context, ar_steps=S)``
when it declares ``per_ar_steps = True``; ``"captions"``: scores captions with ``score``),
``better`` (``"lower"`` or ``"higher"``: which values are better) and ``__call__(context,
samples=None) -> {label: value}`` (see ``cfkit.evaluate``). A metric that does not apply
raises ``MetricSkipped`` with the reason, which reports record. One metric may declare
``headline = True``: the headline of an image table (``headline_metric``).

A feature network factory may declare ``classifier_of = DATASET``: it is that dataset's own classifier,
the default feature network of its evaluations (built with the dataset's options); one may
declare ``default = True``: the feature network of any other images (``default_feature_network``).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from cfkit import checkpoint, data, plugins

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
NEEDS = ("samples", "model", "captions")
BETTER = ("lower", "higher")
# The arrays of a statistics .npz (pytorch-fid's names; sFID's as the ADM evaluator's) and of
# an image .npz (the ADM reference batch's and cfkit sample's)
POOL_KEYS, SPATIAL_KEYS, IMAGE_KEY = ("mu", "sigma"), ("mu_s", "sigma_s"), "arr_0"


class MetricError(ValueError):
    """Inputs a metric cannot score; the message says what is wrong and what is allowed."""


class MetricSkipped(Exception):
    """A metric that does not apply to this evaluation; the message is the reason."""


@dataclass(frozen=True)
class Extracted:
    """``features`` ``(N, F)``, from a classifier ``logits`` ``(N, K)`` and from a network with
    spatial features ``spatial`` ``(N, S)`` (each None otherwise)."""

    features: torch.Tensor
    logits: torch.Tensor | None = None
    spatial: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]


class FeatureNetwork(Protocol):
    """``network(images)`` maps uint8 ``(N, C, H, W)`` to ``Extracted``; it raises
    ``MetricError`` naming the shapes it takes when given others."""

    name: str  # as reports name it: "FID-10k (digits-cnn)"
    num_features: int
    num_spatial_features: int | None  # the size of sFID's spatial features; None: none
    classes: str | None  # the dataset whose class labels the logits predict, if any

    def __call__(self, images: torch.Tensor) -> Extracted: ...

    def identity(self) -> dict:
        """JSON-able description of what the features depend on (name, weights digest)."""
        ...

    def to(self, device) -> FeatureNetwork:
        """The network on ``device`` (it returns its outputs there; ``extract`` moves them)."""
        ...


class Metric(Protocol):
    needs: str  # one of NEEDS
    better: str  # one of BETTER

    def __call__(self, context, samples=None) -> dict[str, float]: ...


def declaring(kind: str, attribute: str, value) -> list[str]:
    """The names of the ``kind`` components whose factory declares ``attribute = value``."""
    registry = plugins.registry()
    return [name for name in registry.names(kind)
            if getattr(registry.component(kind, name).factory, attribute, None) == value]


def headline_metric() -> str | None:
    """The metric a plugin declares the headline of image tables (``headline = True``): the one
    a trained row must beat the baselines on and that the bench plots against S_eval; the
    first by name when several do, None when none does."""
    return next(iter(declaring("metrics", "headline", True)), None)


def default_feature_network(dataset: str | None = None) -> str:
    """The feature network for images of ``dataset`` when none is given: the dataset's own
    classifier (a network declaring ``classifier_of``), else the one declared ``default`` (the first
    by name); an UnknownComponentError when no plugin declares one."""
    own = declaring("feature_networks", "classifier_of", dataset) if dataset is not None else []
    found = own or declaring("feature_networks", "default", True)
    if not found:
        known = ", ".join(plugins.registry().names("feature_networks")) or "(none)"
        raise plugins.UnknownComponentError(
            f"no feature network declares itself the default; give one of: {known}")
    return found[0]


def own_classifier(network: str) -> str | None:
    """The dataset whose own classifier the feature network ``network`` is, if any."""
    factory = plugins.registry().component("feature_networks", network).factory
    return getattr(factory, "classifier_of", None)


# -- images ---------------------------------------------------------------------------------
def check_images(images: torch.Tensor, shapes: Iterable[tuple[int, int, int]] | None, who: str) -> None:
    """``images`` must be uint8 ``(N, C, H, W)``, with ``(C, H, W)`` one of ``shapes`` (any
    when None)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise MetricError(f"{who} takes uint8 images (N, C, H, W), got {got}")
    shapes = None if shapes is None else [tuple(s) for s in shapes]
    if shapes is not None and tuple(images.shape[1:]) not in shapes:
        allowed = " or ".join(f"(N, {', '.join(map(str, s))})" for s in shapes)
        got = ", ".join(map(str, images.shape[1:]))
        raise MetricError(f"{who} takes images {allowed}, got (N, {got})")


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


def dataset_images(dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a dataset split as uint8 ``(N, C, H, W)`` and its labels ``(N,)``."""
    images, labels = [], []
    for sample in data.dataset_samples(dataset, split):
        images.append(sample.image)
        labels.append(-1 if sample.label is None else sample.label)
    if not images:
        raise MetricError(f"dataset split {split!r} is empty")
    array = np.stack(images)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


@torch.no_grad()
def extract(network: FeatureNetwork, images: torch.Tensor, batch_size: int = 250,
            progress: Callable[[int], None] | None = None) -> Extracted:
    """``network`` over ``images`` in batches; ``progress(n)`` after each batch of n."""
    if len(images) == 0:
        raise MetricError("no images to extract features from")
    parts: dict[str, list[torch.Tensor]] = {"features": [], "logits": [], "spatial": []}
    for start in range(0, len(images), batch_size):
        out = network(images[start:start + batch_size])
        for name, found in parts.items():
            value = getattr(out, name)
            if value is not None:
                found.append(value.float().cpu())
        if progress is not None:
            progress(len(out.features))
    return Extracted(**{name: torch.cat(found) if found else None for name, found in parts.items()})


def read_images(path) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` images of a folder of image files (or, for a folder written by
    ``cfkit sample``, of its ``samples.npz``) or of an ``.npz`` whose ``arr_0`` is uint8
    ``(N, H, W, C)`` (the ADM and ``cfkit sample`` layout)."""
    path = Path(path)
    if path.is_dir() and (path / "samples.npz").is_file():
        path = path / "samples.npz"
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.suffix != ".npz":
        raise MetricError(f"{path}: give a folder of images or an .npz file")
    with open_npz(path) as data:
        if IMAGE_KEY not in data:
            raise MetricError(f"{path}: no arr_0 images in it (keys: {', '.join(data.files)}); an "
                              "image .npz holds arr_0 uint8 (N, H, W, C)")
        array = read_array(data, IMAGE_KEY, path)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise MetricError(f"{path}: arr_0 must be uint8 (N, H, W, 1|3), got {array.dtype} {array.shape}")
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _read_folder(folder: Path) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MetricError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for file in files:
        try:
            with Image.open(file) as image:
                grey = image.mode in ("1", "L", "LA", "I", "I;16", "F")
                array = np.asarray(image.convert("L" if grey else "RGB"))
        except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise MetricError(f"{file}: not a readable image ({error}); a folder of a set holds "
                              f"only image files ({', '.join(IMAGE_SUFFIXES)})") from None
        arrays.append(array[..., None] if array.ndim == 2 else array)
        if arrays[-1].shape != arrays[0].shape:
            raise MetricError(f"{folder}: images differ in size: {files[0].name} is "
                              f"{_hwc(arrays[0])}, {file.name} is {_hwc(arrays[-1])}; a set "
                              "must hold one image size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def open_npz(path):
    """The arrays of an ``.npz`` file (``np.load``, no pickles), or a MetricError naming it."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise MetricError(f"{path}: not a readable .npz file ({error})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise MetricError(f"{path}: holds one .npy array, not the named arrays of an .npz file")
    return data


def read_array(data, key: str, path) -> np.ndarray:
    """Array ``key`` of an open ``.npz``, or a MetricError naming the file when it is damaged."""
    try:
        return data[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise MetricError(f"{path}: array {key!r} cannot be read ({error})") from None


def _hwc(array: np.ndarray) -> str:
    h, w, c = array.shape
    return f"{w}x{h} {'grey' if c == 1 else 'RGB'}"


# -- statistics and the Fréchet distance ----------------------------------------------------
@dataclass(frozen=True)
class Statistics:
    """Gaussian statistics of a feature set: ``num`` samples, ``mean`` ``(F,)`` and
    (unbiased) ``cov`` ``(F, F)``, float64."""

    num: int
    mean: np.ndarray
    cov: np.ndarray

    @classmethod
    def of(cls, features) -> Statistics:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise MetricError(f"statistics need features (N >= 2, F), got shape {x.shape}")
        return cls(x.shape[0], x.mean(0), np.atleast_2d(np.cov(x, rowvar=False)))

    def save(self, path, spatial: Statistics | None = None, **meta: str) -> None:
        """An ``.npz`` with ``mu`` and ``sigma`` (as pytorch-fid's), with the ``spatial``
        statistics as ``mu_s`` and ``sigma_s`` (as the ADM evaluator's), ``num`` and ``meta``."""
        arrays = {"mu": self.mean, "sigma": self.cov, "num": np.int64(self.num),
                  **{k: np.str_(v) for k, v in meta.items()}}
        if spatial is not None:
            arrays.update(mu_s=spatial.mean, sigma_s=spatial.cov)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        checkpoint.atomic_write(Path(path), write)

    @classmethod
    def load(cls, path, keys: tuple[str, str] = POOL_KEYS) -> tuple[Statistics, dict[str, str]]:
        """Statistics of an ``.npz`` with a mean ``(F,)`` and a covariance ``(F, F)``, both
        finite, under ``keys`` (``mu``, ``sigma``; sFID's: ``mu_s``, ``sigma_s``), and the
        strings saved with it; anything else is a MetricError naming the file. An ADM
        reference batch's images (``arr_0``) are not read."""
        with open_npz(path) as data:
            if not set(keys) <= set(data.files):
                raise MetricError(f"{path}: no {' and '.join(keys)} in it (keys: {', '.join(data.files)})")
            others = {IMAGE_KEY, *POOL_KEYS, *SPATIAL_KEYS} - set(keys)
            arrays = {key: read_array(data, key, path) for key in data.files if key not in others}
        mean, cov = (_finite(arrays[key], key, path) for key in keys)
        if mean.ndim != 1 or mean.size == 0 or cov.shape != (mean.size, mean.size):
            raise MetricError(f"{path}: {keys[0]} must be (F,) and {keys[1]} (F, F) with F >= 1, got "
                              f"{mean.shape}, {cov.shape}")
        num = arrays.get("num", np.int64(2))  # any n >= 2: FID needs only mu and sigma
        if num.shape != () or num.dtype.kind not in "iu" or num < 2:
            raise MetricError(f"{path}: num must be one integer >= 2 (the sample count), got "
                              f"{num.dtype} {num.tolist()}")
        meta = {key: str(value) for key, value in arrays.items() if value.dtype.kind == "U"}
        return cls(int(num), mean, cov), meta


def _finite(array: np.ndarray, key: str, path) -> np.ndarray:
    """``array`` as float64 when it holds finite numbers, else a MetricError naming the file
    (LAPACK, under the Fréchet distance, may crash on NaN)."""
    if array.dtype.kind not in "biuf":
        raise MetricError(f"{path}: {key} must hold numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        bad = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        raise MetricError(f"{path}: {key} holds {bad[0]} NaN and {bad[1]} infinite values; "
                          "statistics must be finite numbers")
    return array


def is_statistics_file(path) -> bool:
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    with open_npz(path) as data:
        return set(POOL_KEYS) <= set(data.files)


# torchmetrics' metrics sync their states across an initialised process group when they
# compute; under torchrun rank 0 alone scores the gathered samples, so they must not
LOCAL = {"sync_on_compute": False}


class _Given(nn.Identity):
    """Features that are already extracted, as torchmetrics' custom feature extractor."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """FID ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2)`` by torchmetrics'
    FrechetInceptionDistance, given the sufficient statistics it accumulates."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    dim = a.mean.size
    for side in (a, b):  # LAPACK, under torchmetrics' sqrtm, may crash on NaN
        if not (np.isfinite(side.mean).all() and np.isfinite(side.cov).all()):
            raise MetricError("FID needs finite statistics; a feature set holds NaN or infinity")
    if b.mean.size != dim:
        raise MetricError(f"the feature sets have {dim} and {b.mean.size} features: statistics of "
                          "different feature networks cannot be compared")
    metric = FrechetInceptionDistance(feature=_Given(dim), **LOCAL)
    metric.update(torch.empty(0, dim, dtype=torch.float64), real=True)  # sets the dtype; adds nothing
    metric.merge_state({**_sums("real", a), **_sums("fake", b)})
    return float(metric.compute())


def _sums(side: str, s: Statistics) -> dict[str, torch.Tensor]:
    outer = s.cov * (s.num - 1) + s.num * np.outer(s.mean, s.mean)
    return {f"{side}_features_sum": torch.from_numpy(s.mean * s.num),
            f"{side}_features_cov_sum": torch.from_numpy(outer),
            f"{side}_features_num_samples": torch.tensor(s.num)}


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` of exp(E KL(p(y|x) || p(y))), by
    torchmetrics' InceptionScore on ``logits`` ``(N, K)``; ``seed`` fixes its shuffle."""
    from torchmetrics.image.inception import InceptionScore

    if splits < 2 or len(logits) < 2 * splits:
        raise MetricError(f"inception score: need splits >= 2 and at least 2 samples per split, "
                          f"got {len(logits)} samples in {splits} splits")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=_Given(logits.shape[1]), splits=splits, **LOCAL)
    metric.update(logits.double())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al., 2018) of features ``(N, F)`` by torchmetrics'
    KernelInceptionDistance: the unbiased MMD² under the kernel ``(x·y / F + 1)³`` of random
    subsets of ``subset_size`` of each set; mean and standard deviation over ``subsets``
    subsets (drawn from ``seed``)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    if not 2 <= subset_size <= min(len(real), len(fake)) or subsets < 1:
        raise MetricError(f"KID: subset_size must be in 2..{min(len(real), len(fake))} (the smaller "
                          f"set's size) and subsets >= 1, got subset_size {subset_size}, subsets {subsets}")
    if real.shape[1] != fake.shape[1]:
        raise MetricError(f"the feature sets have {real.shape[1]} and {fake.shape[1]} features: "
                          "features of different feature networks cannot be compared")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets, **LOCAL,
                                         subset_size=subset_size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) of features ``(N, F)``: the
    share of fake samples inside the real manifold (the union of balls around each real
    sample reaching its k-th nearest real neighbour), and of real samples inside the fake one."""
    if k < 1 or k >= min(len(real), len(fake)):
        raise MetricError(f"precision/recall: k must be in 1..{min(len(real), len(fake)) - 1} "
                          f"(fewer than each set's size), got {k}")
    real, fake = real.double(), fake.double()
    return _inside(real, fake, k), _inside(fake, real, k)


def _inside(manifold: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 1024) -> float:
    radii = torch.cat([torch.cdist(manifold[i:i + chunk], manifold).kthvalue(k + 1, dim=1).values
                       for i in range(0, len(manifold), chunk)])  # k + 1: the nearest is itself
    inside = torch.cat([(torch.cdist(queries[i:i + chunk], manifold) <= radii).any(dim=1)
                        for i in range(0, len(queries), chunk)])
    return float(inside.double().mean())


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose most likely class is their label."""
    return float((logits.argmax(dim=1) == labels.to(logits.device)).double().mean())


def count_label(num: int) -> str:
    """1000 -> "1k", 50000 -> "50k", 1500 -> "1500" (as in "FID-50k")."""
    return f"{num // 1000}k" if num >= 1000 and num % 1000 == 0 else str(num)


# -- the held-out loss ---------------------------------------------------------------------
@dataclass(frozen=True)
class HeldOutInputs:
    """The held-out loss's random inputs for ``N`` images and ``D`` draws each: the generation
    ``order`` ``(N, D, L)``, one diffusion timestep ``t`` ``(N, D)`` for every AR step, and
    ``noise`` ``(N, D, L, d)`` per raster token."""

    order: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor


def heldout_inputs(num: int, draws: int, grid: tuple[int, int], token_dim: int, num_timesteps: int,
                   ordering, seed: int = 0) -> HeldOutInputs:
    """Inputs drawn in a fixed sequence from ``seed`` alone, so every method on the same token
    grid sees the same ones: ``ordering(num * draws, grid, generator)``, then t stratified
    over ``[0, num_timesteps)`` (draw d of an image at quantile ``(d + u) / draws``, u
    uniform), then the noise."""
    generator = torch.Generator().manual_seed(seed)
    length = grid[0] * grid[1]
    order = ordering(num * draws, grid, generator).view(num, draws, length)
    quantile = (torch.arange(draws) + torch.rand(num, draws, generator=generator)) / draws
    t = (quantile * num_timesteps).long().clamp(max=num_timesteps - 1)
    noise = torch.randn(num, draws, length, token_dim, generator=generator)
    return HeldOutInputs(order, t, noise)


def heldout_errors(method, latents: torch.Tensor, labels: torch.Tensor, inputs: HeldOutInputs,
                   step: torch.Tensor) -> torch.Tensor:
    """Squared error of ``method``'s noise prediction (``predict_noise``), mean over token
    values, ``(N, D, L)`` in generation order: latents ``(N, C, H, W)``, labels ``(N,)``,
    the inputs of those N images, ``step`` ``(L,)`` the AR step of each generation position."""
    from cfkit.plan import Plan

    n, draws, length = inputs.order.shape
    rows, device = n * draws, latents.device
    order = inputs.order.reshape(rows, length)
    t = inputs.t.reshape(rows, 1, 1).expand(-1, -1, int(step[-1]) + 1)
    plan = Plan(order, step.expand(rows, -1), t)
    noise = inputs.noise.reshape(rows, length, -1)
    noise = torch.gather(noise, 1, order[..., None].expand_as(noise))[:, None].to(device)
    labels = labels.repeat_interleave(draws).to(device)
    eps = method.predict_noise(latents.repeat_interleave(draws, 0), labels, plan, noise)
    return (eps.float() - noise).pow(2).mean(-1).view(n, draws, length).cpu()


def heldout_summary(errors: torch.Tensor, step: torch.Tensor) -> dict[str, float]:
    """The held-out loss of errors ``(N, D, L)`` (generation order; ``step`` ``(L,)``): the
    mean, the half-width of its 95% confidence interval over images (normal, from the
    per-image means) and the mean of each AR step's tokens."""
    per_image = errors.double().mean(dim=(1, 2))
    steps = int(step[-1]) + 1
    values = {"held-out ε-MSE": float(per_image.mean()),
              "held-out ε-MSE ±95%": 1.96 * float(per_image.std()) / math.sqrt(len(per_image))}
    for k in range(steps):
        values[f"held-out ε-MSE, AR step {k + 1}/{steps}"] = float(errors[..., step == k].double().mean())
    return values


# -- caches ---------------------------------------------------------------------------------
def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def cache_root() -> Path:
    from cfkit.data import cache_dir

    return cache_dir()


def cached_features(key: dict, compute: Callable[[], Extracted], prefix: str) -> Extracted:
    """``compute()``, cached in ``$CFKIT_CACHE/features/{prefix}-{digest(key)}.npz``."""
    path = cache_root() / "features" / f"{prefix}-{digest(key)}.npz"
    names = [f.name for f in fields(Extracted)]
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return Extracted(**{name: torch.from_numpy(data[name]) for name in names if name in data.files})
    out = compute()
    arrays = {name: getattr(out, name).numpy() for name in names if getattr(out, name) is not None}
    arrays["key"] = np.str_(json.dumps(key, sort_keys=True))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    checkpoint.atomic_write(path, write)
    return out


# -- captions -------------------------------------------------------------------------------
def read_caption_results(path) -> dict[Any, str]:
    """COCO caption results ``[{"image_id": ..., "caption": ...}, ...]``: one caption per image."""
    items = _read_json(path)
    if isinstance(items, dict) and "annotations" in items:
        items = items["annotations"]
    if not isinstance(items, list):
        raise MetricError(f"{path}: COCO results are a JSON list of {{image_id, caption}}")
    results: dict[Any, str] = {}
    for item in items:
        image_id, caption = _caption_item(item, path)
        if image_id in results:
            raise MetricError(f"{path}: image_id {image_id!r} has more than one caption; "
                              "give one prediction per image")
        results[image_id] = caption
    if not results:
        raise MetricError(f"{path}: no predictions")
    return results


def read_caption_annotations(path) -> dict[Any, list[str]]:
    """COCO caption annotations ``{"annotations": [{"image_id", "caption"}, ...]}`` (or just
    that list): every reference caption of every image."""
    data = _read_json(path)
    items = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise MetricError(f"{path}: COCO annotations are {{\"annotations\": [{{image_id, caption}}, "
                          "...]}} or that list")
    references: dict[Any, list[str]] = {}
    for item in items:
        image_id, caption = _caption_item(item, path)
        references.setdefault(image_id, []).append(caption)
    if not references:
        raise MetricError(f"{path}: no annotations")
    return references


def paired_captions(predictions: dict, references: dict) -> tuple[dict, dict]:
    """Predictions and the references of the predicted images (as COCO's evaluation, which
    scores the images of the results); every predicted image must have references."""
    missing = [i for i in predictions if i not in references]
    if missing:
        raise MetricError(f"{len(missing)} predicted image(s) have no reference captions, e.g. "
                          f"image_id {missing[0]!r}; the references hold {len(references)} images")
    return predictions, {i: references[i] for i in predictions}


def _read_json(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MetricError(f"{path}: not valid JSON: {error}") from None


def _caption_item(item, path) -> tuple[Any, str]:
    if not (isinstance(item, dict) and "image_id" in item and isinstance(item.get("caption"), str)):
        raise MetricError(f"{path}: each entry needs an image_id and a caption string, got {item!r}")
    return item["image_id"], item["caption"]
