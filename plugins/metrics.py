"""Built-in metrics (fid, sfid, kid, is, precision-recall, class-accuracy, probe, heldout-loss,
clip-score, cider) and
feature networks (mnist-cnn, digits-cnn, shapes-cnn: classifiers cfkit trains on its embedded datasets
and caches, so that FID works offline; inception: the FID Inception from a local file), and the
``cfkit cider`` command."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cfkit import hookimpl, plugins
from cfkit.methods import NOISE_PREDICTION, TEXT_CONDITIONING, can
from cfkit.metrics import (
    Extracted,
    HeldOutInputs,
    MetricError,
    MetricSkipped,
    Statistics,
    cache_root,
    check_images,
    class_accuracy,
    count_label,
    dataset_images,
    digest,
    file_digest,
    frechet_distance,
    heldout_errors,
    heldout_inputs,
    heldout_summary,
    inception_score,
    kernel_inception_distance,
    paired_captions,
    precision_recall,
    read_caption_annotations,
    read_caption_results,
    to_signed,
)
from cfkit.reference_sets import spatial_features

INCEPTION_WEIGHTS_ENV = "CFKIT_INCEPTION_WEIGHTS"
CLIP_WEIGHTS_ENV = "CFKIT_CLIP_WEIGHTS"


# -- feature networks -----------------------------------------------------------------------
class SmallCNN(nn.Module):
    """3x3 conv, batch norm and ReLU stages with a 2x2 max pool before each later stage while
    the side is above 4; features: the last stage averaged over space ``(N, widths[-1])``;
    logits: a linear head on them."""

    def __init__(self, channels: int, image_size: int, num_classes: int, widths: list[int]):
        super().__init__()
        layers, side, width = [], image_size, channels
        for i, out in enumerate(widths):
            if i and side > 4:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            width = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x).mean(dim=(2, 3))
        return features, self.head(features)


# The fixed training recipe of the dataset classifiers; a change retrains (it keys the cache).
CLASSIFIER_RECIPE = {"version": 1, "widths": [32, 64, 128], "steps": 600, "batch_size": 64,
                     "lr": 2e-3, "schedule": "cosine", "weight_decay": 1e-4, "max_shift": 1,
                     "seed": 0}


class DatasetClassifier:
    """A SmallCNN trained with ``CLASSIFIER_RECIPE`` on the train split of an embedded dataset
    (built with ``options``) on first use, cached as safetensors in
    ``$CFKIT_CACHE/feature_networks/`` under a hash of dataset, options and recipe, and
    scored on the val split (``held_out_accuracy``). Takes exactly that dataset's images."""

    def __init__(self, dataset: str, **options):
        try:
            self.dataset = plugins.build("datasets", dataset, **options)
        except (TypeError, ValueError) as error:
            raise MetricError(f"{dataset}-cnn: dataset {dataset!r} with options {options}: {error}") from None
        self.name, self.classes = f"{dataset}-cnn", dataset
        self.num_classes, self.num_spatial_features = self.dataset.num_classes, None
        self.num_features = CLASSIFIER_RECIPE["widths"][-1]
        self.image_shape = (self.dataset.channels, self.dataset.image_size, self.dataset.image_size)
        self.key = {"network": self.name, "dataset": {"name": dataset, **options},
                    "recipe": CLASSIFIER_RECIPE}
        self.folder = cache_root() / "feature_networks" / f"{self.name}-{digest(self.key)}"
        with torch.random.fork_rng():  # initialised from the recipe's seed, whatever the caller's
            torch.manual_seed(CLASSIFIER_RECIPE["seed"])
            self.model = SmallCNN(self.image_shape[0], self.image_shape[1], self.num_classes,
                                  CLASSIFIER_RECIPE["widths"])
        self.info = self._load() if (self.folder / "info.json").is_file() else self._train()
        self.model.eval()

    @property
    def held_out_accuracy(self) -> float:
        return self.info["held_out_accuracy"]

    def to(self, device) -> DatasetClassifier:
        self.model.to(device)
        return self

    def __call__(self, images: torch.Tensor) -> Extracted:
        check_images(images, [self.image_shape], f"{self.name} (trained on {self.classes} images)")
        with torch.no_grad():
            features, logits = self.model(to_signed(images.to(self.model.head.weight.device)))
        return Extracted(features, logits)

    def identity(self) -> dict:
        return {"name": self.name, "dataset": self.key["dataset"],
                "weights": self.info["weights_digest"],
                "held_out_accuracy": self.held_out_accuracy}

    def _load(self) -> dict:
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(self.folder / "weights.safetensors"))
        return json.loads((self.folder / "info.json").read_text())

    def _train(self) -> dict:
        from cfkit.checkpoint import write_json, write_weights

        recipe, started = CLASSIFIER_RECIPE, time.perf_counter()
        print(f"training feature network {self.name} on the {self.classes} train split (first use; "
              f"cached in {self.folder})", file=sys.stderr)
        images, labels = dataset_images(self.dataset, "train")
        x = to_signed(images)
        generator = torch.Generator().manual_seed(recipe["seed"])
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=recipe["lr"],
                                      weight_decay=recipe["weight_decay"])
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe["steps"])
        self.model.train()
        with one_thread():
            for _ in range(recipe["steps"]):
                rows = torch.randint(len(x), (recipe["batch_size"],), generator=generator)
                batch = random_shift(x[rows], recipe["max_shift"], generator)
                loss = F.cross_entropy(self.model(batch)[1], labels[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        self.model.eval()
        val_images, val_labels = dataset_images(self.dataset, "val")
        with torch.no_grad():
            accuracy = class_accuracy(self.model(to_signed(val_images))[1], val_labels)
        write_weights(self.folder / "weights.safetensors", self.model)
        info = {**self.key, "held_out_accuracy": accuracy,
                "weights_digest": file_digest(self.folder / "weights.safetensors"),
                "train_seconds": round(time.perf_counter() - started, 2)}
        write_json(self.folder / "info.json", info)  # last: its presence marks a complete cache
        return info


@contextmanager
def one_thread():
    """Torch on one intra-op thread: convolutions this small gain little from more and, on a
    busy machine, lose several times over to their threads' spin-waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """``x`` ``(N, C, H, W)`` translated by one random offset in -max_shift..max_shift per
    axis, edges replicated."""
    if max_shift == 0:
        return x
    h, w = x.shape[-2:]
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2,), generator=generator)).tolist()
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    return padded[..., dy:dy + h, dx:dx + w]


def dataset_classifier(dataset: str):
    """The factory of ``dataset``'s own classifier, declared as such (``classifier_of``): the
    default feature network of that dataset's evaluations."""
    factory = functools.partial(DatasetClassifier, dataset)
    factory.classifier_of = dataset
    return factory


class Inception:
    """The FID Inception v3 (pool3 features, 2048; unbiased logits, 1008; sFID's spatial
    features, 2023) from a local weights file: the option ``weights`` or
    ``$CFKIT_INCEPTION_WEIGHTS`` (``.pth`` read with ``torch.load(weights_only=True)``, or
    ``.safetensors``); nothing is downloaded. Takes uint8 images of any size, grey (repeated
    to RGB) or RGB; resizes them to 299x299."""

    name, num_features, classes = "inception", 2048, None
    default = True  # the feature network of images without their own classifier

    def __init__(self, weights: str | None = None):
        from cfkit_plugins.inception import NUM_LOGITS, NUM_SPATIAL_FEATURES, FIDInceptionV3

        path = weights or os.environ.get(INCEPTION_WEIGHTS_ENV)
        if not path:
            raise MetricError(
                "inception needs the FID Inception weights (pt_inception-2015-12-05-6726825d.pth, "
                f"as pytorch-fid uses): set {INCEPTION_WEIGHTS_ENV}=PATH or give the feature network "
                "option weights=PATH; nothing is downloaded. Offline, use digits-cnn or shapes-cnn")
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise MetricError(f"inception: weights file not found: {self.path}")
        self.num_classes, self.num_spatial_features = NUM_LOGITS, NUM_SPATIAL_FEATURES
        self.model = FIDInceptionV3()
        load_strict(self.model, read_state_dict(self.path), f"inception: {self.path}")
        self.model.eval()
        self.digest = file_digest(self.path)

    def __call__(self, images: torch.Tensor) -> Extracted:
        check_images(images, None, self.name)
        if images.shape[1] not in (1, 3):
            raise MetricError(f"inception takes grey or RGB images (N, 1|3, H, W), got {tuple(images.shape)}")
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        with torch.no_grad():
            features, logits, spatial = self.model(x.to(self.model.fc.weight.device).float() / 255)
        return Extracted(features, logits, spatial)

    def to(self, device) -> Inception:
        self.model.to(device)
        return self

    def identity(self) -> dict:
        # the spatial features key the reference features cached before sFID apart
        return {"name": self.name, "weights": self.digest, "spatial_features": "mixed_6/conv[:7]"}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pt``/``.pth`` state dict read without
    unpickling arbitrary objects."""
    import pickle

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise MetricError(f"{path}: not a state dict of tensors torch can read safely: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], who: str) -> None:
    """Load ``state`` into ``model``, every key present and no other (batch norms' step counts
    may be absent); a mismatch names the keys."""
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    given = {k for k in state if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise MetricError(f"{who} is not the expected state dict: {len(missing)} missing key(s) "
                          f"{missing[:4]}, {len(unexpected)} unexpected key(s) {unexpected[:4]}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise MetricError(f"{who}: {error}") from None


# -- metrics on samples ---------------------------------------------------------------------
class Fid:
    """FID of the samples against the reference statistics (see cfkit.metrics)."""

    needs, better = "samples", "lower"
    headline = True  # of an image table: plotted against S_eval, the baselines' yardstick

    def __call__(self, context, samples=None) -> dict[str, float]:
        real = context.reference.statistics()
        fake = Statistics.of(context.features(samples).features)
        label = f"FID-{count_label(len(samples))} ({context.network.name})"
        return {label: frechet_distance(real, fake)}


class SpatialFid:
    """sFID (Nash et al., 2021) as the ADM evaluator computes it: the Fréchet distance of the
    feature network's spatial features (Inception's: the first 7 channels of ``mixed_6/conv``,
    7 x 17 x 17 = 2023) against the reference's (an ADM reference batch's ``mu_s``,
    ``sigma_s``)."""

    needs, better = "samples", "lower"

    def check(self, context) -> None:
        if spatial_features(context.network) is None:
            raise MetricSkipped(f"feature network {context.network.name} has no spatial features; "
                                "sFID takes Inception's (--features inception)")
        reason = context.reference.unavailable("spatial")
        if reason is not None:
            raise MetricSkipped(reason)

    def __call__(self, context, samples=None) -> dict[str, float]:
        real = context.reference.statistics(spatial=True)
        fake = Statistics.of(context.features(samples).spatial)
        label = f"sFID-{count_label(len(samples))} ({context.network.name})"
        return {label: frechet_distance(real, fake)}


def needs_reference_features(context) -> None:
    """MetricSkipped when the reference has no per-image features (statistics only)."""
    reason = context.reference.unavailable("features")
    if reason is not None:
        raise MetricSkipped(reason)


class Kid:
    """KID of the samples against the reference images, on FID's features of any feature
    network (see ``cfkit.metrics.kernel_inception_distance``): mean and std over ``subsets``
    random subsets of ``subset_size`` (default: 1000, or half the smaller set's size, so
    that the subsets differ and the std says something). Skipped against a reference of
    statistics only, which has no per-image features."""

    needs, better = "samples", "lower"

    def __init__(self, subsets: int = 50, subset_size: int | None = None, seed: int = 0):
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed

    def check(self, context) -> None:
        needs_reference_features(context)

    def __call__(self, context, samples=None) -> dict[str, float]:
        real, fake = context.reference.features().features, context.features(samples).features
        size = self.subset_size or max(2, min(1000, min(len(fake), len(real)) // 2))
        mean, std = kernel_inception_distance(real, fake, self.subsets, size, self.seed)
        count, name = count_label(len(samples)), context.network.name
        return {f"KID-{count} ({name})": mean, f"KID-{count} std ({name})": std}


class InceptionScore:
    """Inception Score on the feature network's logits (mean and std over ``splits``)."""

    needs, better = "samples", "higher"

    def __init__(self, splits: int = 10):
        self.splits = splits

    def check(self, context) -> None:
        if getattr(context.network, "num_classes", None) is None:
            raise MetricSkipped(f"feature network {context.network.name} has no classifier logits")

    def __call__(self, context, samples=None) -> dict[str, float]:
        mean, std = inception_score(context.features(samples).logits, self.splits)
        name = context.network.name
        return {f"IS ({name})": mean, f"IS std ({name})": std}


class PrecisionRecall:
    """k-NN manifold precision and recall of samples against the reference features."""

    needs, better = "samples", "higher"

    def __init__(self, k: int = 3):
        self.k = k

    def check(self, context) -> None:
        needs_reference_features(context)

    def __call__(self, context, samples=None) -> dict[str, float]:
        precision, recall = precision_recall(context.reference.features().features,
                                             context.features(samples).features, self.k)
        suffix = f"({context.network.name}, k={self.k})"
        return {f"precision {suffix}": precision, f"recall {suffix}": recall}


class ClassAccuracy:
    """Share of samples that the dataset's classifier puts in the class they were sampled for."""

    needs, better = "samples", "higher"

    def check(self, context) -> None:
        network = context.network
        if not context.has_dataset:
            raise MetricSkipped("this run names no dataset (it trains on shards): class-accuracy "
                                "needs a feature network that classifies the dataset's classes")
        if network.classes != context.dataset_name:
            raise MetricSkipped(
                f"feature network {network.name} does not classify the {context.dataset_name} "
                f"classes; class-accuracy needs one that does (e.g. --features {context.dataset_name}-cnn)")

    def __call__(self, context, samples=None) -> dict[str, float]:
        logits = context.features(samples).logits
        return {f"class accuracy ({context.network.name})": class_accuracy(logits, samples.labels)}


class ClipScore:
    """CLIPScore (Hessel et al., 2021; as torchmetrics: 100 * max(cos, 0), averaged) of each
    sample and the prompt of its class, ``template`` formatted with ``{label}`` (the class
    index) and ``{name}`` (the dataset's ``class_names``), by an open_clip ``model`` with
    weights from a local file (``weights`` or ``$CFKIT_CLIP_WEIGHTS``). Needs the ``clip``
    extra; skipped, with the reason, where open_clip does not import."""

    needs, better = "samples", "higher"

    def __init__(self, model: str = "ViT-B-32", weights: str | None = None,
                 template: str = "a photo of a {name}", batch_size: int = 64):
        self.model, self.weights, self.template, self.batch_size = model, weights, template, batch_size

    def check(self, context) -> None:
        try:
            import open_clip  # noqa: F401
        except ImportError:
            raise MetricSkipped("open-clip-torch is not installed (the optional extra: "
                                "pip install 'cfkit[clip]')") from None
        except RuntimeError as error:  # e.g. a torchvision built for another torch
            raise MetricSkipped(f"open_clip is installed but does not import: {error}") from None
        self.prompt(context.dataset, 0)

    def prompt(self, dataset, label: int) -> str:
        names = getattr(dataset, "class_names", None)
        if "{name}" in self.template and names is None:
            raise MetricError(f"clip-score: the {type(dataset).__name__} dataset has no class_names for "
                              f"the template {self.template!r}; give a template with {{label}}, e.g. "
                              "template='a handwritten digit {label}'")
        return self.template.format(label=label, name=None if names is None else names[label])

    def __call__(self, context, samples=None) -> dict[str, float]:
        import open_clip
        from PIL import Image

        path = self.weights or os.environ.get(CLIP_WEIGHTS_ENV)
        if not path or not Path(path).expanduser().is_file():
            raise MetricError(f"clip-score needs the open_clip weights of {self.model} as a local file: "
                              f"option weights=PATH or {CLIP_WEIGHTS_ENV}=PATH (got {path!r})")
        model, _, preprocess = open_clip.create_model_and_transforms(
            self.model, pretrained=str(Path(path).expanduser()))
        model.eval()
        tokenizer = open_clip.get_tokenizer(self.model)
        image_embeds, text_embeds = [], []
        arrays = samples.images.permute(0, 2, 3, 1).numpy()
        with torch.no_grad():
            for start in range(0, len(arrays), self.batch_size):
                chunk = arrays[start:start + self.batch_size]
                pictures = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB")
                            for a in chunk]
                image_embeds.append(model.encode_image(torch.stack([preprocess(p) for p in pictures])))
                labels = samples.labels[start:start + self.batch_size].tolist()
                text_embeds.append(model.encode_text(tokenizer([self.prompt(context.dataset, c)
                                                                for c in labels])))
        score = clip_score(torch.cat(image_embeds), torch.cat(text_embeds))
        return {f"CLIP score ({self.model})": score}


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """Mean of ``100 * max(cos(image_i, text_i), 0)`` over pairs ``(N, D)``."""
    cos = F.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return float((100 * cos.clamp(min=0)).mean())


# -- metrics on the model -------------------------------------------------------------------
class LinearProbe:
    """Top-1 accuracy on the val split of a linear classifier on a model's features, with a
    fixed recipe. Features: each image's tokens, clean, given to the network as one AR step at
    network timestep ``t``, unconditionally (null class); the last block's states averaged
    over tokens. Classifier: features standardised with the train split's mean and std, then
    L2-regularised multinomial logistic regression (``C``, lbfgs, ``max_iter``) on the train
    split. Any method whose network has ``hidden_states(latents, t, labels=None)`` works
    (CausalFusion, In-context DiT, DiT)."""

    needs, better = "model", "higher"

    def __init__(self, t: int = 0, C: float = 1.0, max_iter: int = 1000, batch_size: int = 256):
        self.t, self.C, self.max_iter, self.batch_size = int(t), float(C), int(max_iter), batch_size

    def check(self, context) -> None:
        model, method = context.method.model, context.method
        if not hasattr(model, "hidden_states"):
            raise MetricSkipped(f"the {type(model).__name__} network has no hidden_states(latents, t) "
                                "to take features from")
        steps = method.diffusion.num_timesteps
        if not 0 <= self.t < steps:
            raise MetricError(f"probe: t must be a network timestep in 0..{steps - 1}, got {self.t}")
        context.dataset  # noqa: B018 (the probe needs the run's labelled dataset)

    def __call__(self, context, samples=None) -> dict[str, float]:
        tokenizer = context.experiment.data.tokenizer.build()
        pooled = {}
        for split in ("train", "val"):
            images, labels = context.dataset_images(split)
            bar = context.progress(len(images), f"probe features ({split})")
            pooled[split] = (self.features(context.method.model, tokenizer, images, context.device, bar),
                             labels)
        return {f"linear probe top-1 (t={self.t})": linear_probe(*pooled["train"], *pooled["val"],
                                                                 C=self.C, max_iter=self.max_iter)}

    @torch.no_grad()
    def features(self, model, tokenizer, images, device, progress=None) -> torch.Tensor:
        """Average-pooled last-block states ``(N, D)`` of uint8 images ``(N, C, H, W)``."""
        model.eval()
        weight = next(model.parameters())
        pooled = []
        for start in range(0, len(images), self.batch_size):
            batch = to_signed(images[start:start + self.batch_size]).to(device)
            latents = tokenizer.encode(batch).to(weight)
            t = torch.full((len(batch),), self.t, dtype=torch.long, device=device)
            pooled.append(model.hidden_states(latents, t).mean(dim=1).float().cpu())
            if progress is not None:
                progress(len(batch))
        return torch.cat(pooled)


class HeldOutLoss:
    """The held-out loss: unweighted ε-MSE (mean over token values; lower is better) of the
    first ``num`` validation images, class-conditional with their labels, the model in eval
    mode. Each image's tokens are split into S_eval equal AR steps (the ``fixed`` schedule) in
    the evaluation ``order``, and the model predicts each step's noise from the clean tokens
    of earlier steps, ``draws`` times per image at one stratified t shared by its steps. At
    S_eval > 1 it measures how well a model predicts tokens given earlier AR steps (what the
    paper's Table 2 is about); at S_eval = 1 it is the plain denoising loss. Orders, t and
    noise come from ``seed`` alone (``cfkit.metrics.heldout_inputs``), so every method and
    training seed on one token grid sees the same ones. Values: the mean, its 95% confidence
    half-width over images, and the mean of each AR step's tokens. A method that denoises the
    whole image at once (DiT) is skipped at S_eval > 1; text-conditioned methods are skipped."""

    needs, better, per_ar_steps = "model", "lower", True

    def __init__(self, num: int = 500, draws: int = 4, seed: int = 0, order: str = "random",
                 batch_size: int = 64):
        if num < 2 or draws < 1 or batch_size < 1:
            raise MetricError(f"heldout-loss: need num >= 2, draws >= 1 and batch_size >= 1, got "
                              f"num {num}, draws {draws}, batch_size {batch_size}")
        self.num, self.draws, self.seed, self.batch_size = num, draws, seed, batch_size
        self.order = order
        self.ordering = plugins.build("orderings", order)

    def check(self, context) -> None:
        method = context.method
        if can(method, TEXT_CONDITIONING):
            raise MetricSkipped(f"method {context.experiment.method.name} conditions on captions; the "
                                "held-out loss conditions on class labels")
        if not can(method, NOISE_PREDICTION):
            raise MetricSkipped(f"method {context.experiment.method.name} does not declare the "
                                "noise-prediction capability (cfkit.methods.NoisePredictor)")
        context.dataset  # noqa: B018 (the loss needs the run's validation split)

    def inputs(self, context) -> tuple[torch.Tensor, torch.Tensor, HeldOutInputs]:
        """uint8 images ``(N, C, H, W)``, labels ``(N,)`` and the random inputs for them."""
        images, labels = (x[:self.num] for x in context.dataset_images("val"))
        method = context.method
        config = method.config
        drawn = heldout_inputs(len(images), self.draws, config.grid, config.token_dim,
                               method.diffusion.num_timesteps, self.ordering, self.seed)
        return images, labels, drawn

    def __call__(self, context, samples=None, *, ar_steps: int = 1) -> dict[str, float]:
        from cfkit.generate import denoises_whole_image
        from cfkit.schedules import step_index

        method = context.method
        if ar_steps > 1 and denoises_whole_image(method.model):
            raise MetricSkipped(f"method {context.experiment.method.name} denoises the whole image at "
                                "once: it has no AR steps to condition on")
        images, labels, drawn = self.inputs(context)
        step = step_index(plugins.build("schedules", "fixed", steps=ar_steps)(method.config.num_tokens))
        tokenizer = context.experiment.data.tokenizer.build()
        weight = next(method.model.parameters())
        method.model.eval()
        bar = context.progress(len(images), f"held-out loss S={ar_steps}")
        errors = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                rows = slice(start, start + self.batch_size)
                latents = tokenizer.encode(to_signed(images[rows]).to(weight.device)).to(weight)
                chunk = HeldOutInputs(drawn.order[rows], drawn.t[rows], drawn.noise[rows])
                errors.append(heldout_errors(method, latents, labels[rows], chunk, step))
                bar(len(latents))
        return heldout_summary(torch.cat(errors), step)


def linear_probe(train_x, train_y, val_x, val_y, C: float = 1.0, max_iter: int = 1000) -> float:
    """Val top-1 of standardisation + multinomial logistic regression fitted on train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    classifier.fit(train_x.numpy(), train_y.numpy())
    return float(classifier.score(val_x.numpy(), val_y.numpy()))


# -- captions -------------------------------------------------------------------------------
# PTB's names of brackets, lower-cased as pycocoevalcap's tokenizer leaves them (so they are
# kept: its punctuation list has them upper-cased).
PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


class CiderD:
    """CIDEr-D (Vedantam et al., 2015) by pycocoevalcap's ``Cider`` (n-grams 1..4, sigma 6,
    clipped counts, document frequencies from the references of the scored images), reported
    x100 as papers do. Captions are tokenized by pycocoevalcap's ``PTBTokenizer`` (Stanford
    CoreNLP 3.4.1, run with java) when ``tokenizer`` is ``ptb``, or ``auto`` and java is on
    PATH; otherwise by ``simple_tokenize``, a pure-Python approximation of it."""

    needs, better = "captions", "higher"
    TOKENIZERS = ("auto", "ptb", "simple")

    def __init__(self, tokenizer: str = "auto"):
        if tokenizer not in self.TOKENIZERS:
            allowed = ", ".join(self.TOKENIZERS)
            raise MetricError(f"cider: unknown tokenizer {tokenizer!r}; allowed: {allowed}")
        if tokenizer == "ptb" and shutil.which("java") is None:
            raise MetricError("cider: the PTB tokenizer runs Stanford CoreNLP and needs java on PATH; "
                              "install a Java runtime or use tokenizer=simple")
        self.tokenizer = tokenizer if tokenizer != "auto" else (
            "ptb" if shutil.which("java") else "simple")

    def tokenize(self, captions: dict) -> dict:
        """``{image_id: [caption, ...]}`` -> the same with tokenized, space-joined captions."""
        if self.tokenizer == "ptb":
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            return PTBTokenizer().tokenize({i: [{"caption": c} for c in cs] for i, cs in captions.items()})
        return {i: [" ".join(simple_tokenize(c)) for c in cs] for i, cs in captions.items()}

    def score(self, predictions: dict, references: dict) -> dict[str, float]:
        """CIDEr-D x100 of one caption per image ``{image_id: caption}`` against its references
        ``{image_id: [caption, ...]}`` (the same images)."""
        from pycocoevalcap.cider.cider import Cider

        results = self.tokenize({i: [c] for i, c in predictions.items()})
        score, _ = Cider().compute_score(self.tokenize(references), results)
        return {f"CIDEr-D ({self.tokenizer} tokenizer)": 100 * float(score)}


def simple_tokenize(text: str) -> list[str]:
    """PTB-like tokens of a caption without java: lower-cased, clitics split (``n't``, ``'s``,
    ...), punctuation separated from words, brackets named as PTB names them, then the
    punctuation that pycocoevalcap's PTB tokenizer drops (and double quotes, which PTB turns
    into dropped ones) dropped. Agrees with it on captions of words, numbers and
    ``. , ; : ! ? ' " ( ) [ ] { } -``; abbreviations such as "e.g." differ."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    text = text.lower().replace("\n", " ")
    text = re.sub(r"(\w)(n't)\b", r"\1 \2", text)
    text = re.sub(r"(\w)('s|'re|'ve|'ll|'d|'m)\b", r"\1 \2", text)
    tokens = re.findall(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.]\w+)*|[^\w\s]", text)
    dropped = set(PUNCTUATIONS) | {'"'}
    return [PTB_BRACKETS.get(t, t) for t in tokens if t not in dropped]


# -- cfkit cider ----------------------------------------------------------------------------
def cider(predictions_path, references_path, tokenizer: str = "auto") -> dict:
    """CIDEr-D of COCO caption results against COCO caption annotations."""
    predictions, references = paired_captions(read_caption_results(predictions_path),
                                              read_caption_annotations(references_path))
    (name, value), = CiderD(tokenizer=tokenizer).score(predictions, references).items()
    return {"name": name, "value": value, "images": len(predictions)}


def cmd_cider(args) -> int:
    result = cider(args.predictions, args.references, args.tokenizer)
    print(json.dumps(result) if args.json else
          f"{result['name']}: {result['value']:.2f} over {result['images']} images")
    return 0


@hookimpl
def register_commands(subparsers):
    """``cfkit cider``: its arguments, beside its function."""
    p = subparsers.add_parser("cider", help="CIDEr-D of COCO caption results against COCO annotations")
    p.add_argument("predictions", help="COCO results JSON: [{image_id, caption}, ...]")
    p.add_argument("references", help="COCO captions JSON: {annotations: [{image_id, caption}, ...]}")
    p.add_argument("--tokenizer", default="auto", choices=["auto", "ptb", "simple"],
                   help="ptb: pycocoevalcap's (java); simple: its pure-Python approximation; "
                   "auto: ptb when java is present")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=cmd_cider)


@hookimpl
def register_feature_networks(register):
    for dataset in ("mnist", "digits", "shapes"):
        register(f"{dataset}-cnn", dataset_classifier(dataset))
    register("inception", Inception)


@hookimpl
def register_metrics(register):
    register("fid", Fid)
    register("sfid", SpatialFid)
    register("kid", Kid)
    register("is", InceptionScore)
    register("precision-recall", PrecisionRecall)
    register("class-accuracy", ClassAccuracy)
    register("probe", LinearProbe)
    register("heldout-loss", HeldOutLoss)
    register("clip-score", ClipScore)
    register("cider", CiderD)


@hookimpl
def register_defaults(register):
    """A bench evaluates FID and the class accuracy of a classifier on its samples."""
    register("evaluation.metrics", ["fid", "class-accuracy"])
