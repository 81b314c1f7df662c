"""The reference set that sample metrics compare with: a dataset split or a reference file.

``SplitReference``: the images of a dataset split, their features extracted once and cached
per dataset, split and feature network. ``FileReference`` (``cfkit eval --reference-stats
FILE``): an ``.npz`` of pytorch-fid's statistics (``mu``, ``sigma``), of ``cfkit fid
--save-stats``' (with sFID's ``mu_s``, ``sigma_s`` from a network with spatial features) or
an ADM reference batch (``arr_0`` uint8 images ``(N, H, W, 3)``, with or without its stored
``mu``/``sigma`` and ``mu_s``/``sigma_s``). Stored statistics are used as they are, as the ADM
evaluator uses them; the images' features (cached by the file's digest and the feature
network) serve the metrics that need features (KID, precision/recall) and the statistics the
file does not store.

Both answer ``features()`` (``Extracted``), ``statistics(spatial)`` (``Statistics`` of the
pool or spatial features), ``unavailable(need)`` (why ``"features"`` or ``"spatial"`` cannot
be had, or None) and ``describe()`` (what the report says of the reference).
"""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import numpy as np

from cfkit.metrics import (
    IMAGE_KEY,
    POOL_KEYS,
    SPATIAL_KEYS,
    Extracted,
    MetricError,
    Statistics,
    cached_features,
    extract,
    file_digest,
    open_npz,
    read_images,
)

NEEDS = ("features", "spatial")



def feature_statistics(extracted: Extracted, spatial: bool) -> Statistics:
    """Statistics of the pool (or ``spatial``) features of ``extracted``."""
    return Statistics.of(extracted.spatial if spatial else extracted.features)

class SplitReference:
    """A dataset split of an evaluation's ``context`` (``cfkit.evaluate.EvalContext``)."""

    def __init__(self, context, split: str):
        self.context, self.split = context, split

    @functools.cache  # noqa: B019 (one reference per evaluation)
    def features(self) -> Extracted:
        """Features of the split's images, cached on disk."""
        context, split = self.context, self.split
        network = context.network
        key = {"dataset": context.dataset_spec.model_dump(), "split": split, "network": network.identity()}

        def compute() -> Extracted:
            images = context.dataset_images(split)[0]
            return extract(network, images, context.batch_size,
                           context.progress(len(images), f"reference features ({split})"))

        return cached_features(key, compute, f"{context.dataset_name}-{split}-{network.name}")

    @functools.cache  # noqa: B019
    def statistics(self, spatial: bool = False) -> Statistics:
        """Statistics of the split's pool (or ``spatial``) features."""
        return feature_statistics(self.features(), spatial)

    def unavailable(self, need: str) -> str | None:
        """Nothing is: a split's images give any features the network has."""
        check_need(need)
        return None

    def describe(self) -> dict:
        """The split and its size; extracts its features, so that a network that does not take
        the dataset's images fails before any sampling."""
        return {"split": self.split, "num": len(self.features())}


class FileReference:
    """A reference file at ``path`` for the feature ``network``; its images (if any) are
    extracted ``batch_size`` at a time with ``progress(total, desc)`` bars. The file is
    checked when made: it holds statistics or images, and stored statistics fit ``network``."""

    def __init__(self, path, network, batch_size: int = 250, progress=None):
        self.path, self.network, self.batch_size, self.progress = Path(path), network, batch_size, progress
        if not self.path.is_file():
            raise FileNotFoundError(f"no such reference statistics file: {self.path}")
        with open_npz(self.path) as data:
            self.keys = set(data.files)
        if not (set(POOL_KEYS) <= self.keys or IMAGE_KEY in self.keys):
            keys = ", ".join(sorted(self.keys))
            raise MetricError(
                f"{self.path}: no reference statistics or images in it (keys: {keys}); give "
                "pytorch-fid's statistics (mu, sigma) or an ADM reference batch (arr_0 uint8 images "
                "(N, H, W, 3), with or without mu, sigma, mu_s, sigma_s)")
        self.stored = {spatial: load_statistics(self.path, network, spatial)
                       for spatial, keys in ((False, POOL_KEYS), (True, SPATIAL_KEYS))
                       if set(keys) <= self.keys and (not spatial or spatial_features(network))}

    @functools.cache  # noqa: B019 (one reference per evaluation)
    def features(self) -> Extracted:
        """Features of the file's images (``arr_0``), cached on disk."""
        reason = self.unavailable("features")
        if reason is not None:
            raise MetricError(reason)
        network = self.network
        key = {"file": self.digest, "network": network.identity()}

        def compute() -> Extracted:
            images, desc = read_images(self.path), f"reference features ({self.path.name})"
            bar = None if self.progress is None else self.progress(len(images), desc)
            return extract(network, images, self.batch_size, bar)

        return cached_features(key, compute, f"{self.path.stem}-{network.name}")

    @functools.cache  # noqa: B019
    def statistics(self, spatial: bool = False) -> Statistics:
        """The stored statistics of the pool (or ``spatial``) features, else those of the
        file's images."""
        if spatial in self.stored:
            return self.stored[spatial]
        reason = self.unavailable("spatial" if spatial else "features")
        if reason is not None:
            raise MetricError(reason)
        return feature_statistics(self.features(), spatial)

    def unavailable(self, need: str) -> str | None:
        """Why the file cannot give ``need`` (``features``: per-image features, which it has
        only with images; ``spatial``: sFID's statistics), or None."""
        check_need(need)
        if IMAGE_KEY in self.keys or (need == "spatial" and True in self.stored):
            return None
        if need == "features":
            return (f"the reference {self.path.name} holds statistics only (no arr_0 images): this "
                    "metric needs the reference images' features (an ADM reference batch, or a "
                    "dataset split without --reference-stats)")
        return f"the reference {self.path.name} holds no sFID statistics (mu_s, sigma_s) and no arr_0 images"

    def describe(self) -> dict:
        """The file, its digest, the arrays it holds and its number of images (None when it
        holds statistics only and no ``num``)."""
        if IMAGE_KEY in self.keys:
            num = stored_shape(self.path, IMAGE_KEY)[0]
        else:
            num = self.stored[False].num if "num" in self.keys else None
        held = [key for key in (*POOL_KEYS, *SPATIAL_KEYS, IMAGE_KEY) if key in self.keys]
        return {"file": str(self.path), "sha256": self.digest, "holds": held, "num": num}

    @functools.cached_property
    def digest(self) -> str:
        """The file's SHA-256 (its first 16 hex digits): it keys the cache of its images' features."""
        return file_digest(self.path)


def spatial_features(network) -> int | None:
    """The size of ``network``'s spatial features (sFID's), None when it has none."""
    return getattr(network, "num_spatial_features", None)


def check_need(need: str) -> None:
    if need not in NEEDS:
        raise ValueError(f"unknown reference need {need!r}; allowed: {', '.join(NEEDS)}")


def load_statistics(path, network, spatial: bool = False) -> Statistics:
    """The statistics stored in ``path`` (``mu``/``sigma``, or with ``spatial`` ``mu_s``/
    ``sigma_s``), checked to come from the feature ``network``: a MetricError says which
    network made them or how many features they have."""
    statistics, meta = Statistics.load(path, SPATIAL_KEYS if spatial else POOL_KEYS)
    made_by = meta.get("feature_network")
    if made_by is not None and made_by != network.name:
        raise MetricError(f"{path} holds statistics of feature network {made_by}, not "
                          f"{network.name}: give --features {made_by}")
    expected = spatial_features(network) if spatial else network.num_features
    if statistics.mean.size != expected:
        what = "spatial features" if spatial else "features"
        raise MetricError(f"{path} holds statistics of {statistics.mean.size} {what}; "
                          f"{network.name} gives {expected}")
    return statistics


def stored_shape(path, key: str) -> tuple[int, ...]:
    """The shape of array ``key`` of an ``.npz``, from its header (the array is not read)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as file:
            version = np.lib.format.read_magic(file)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            return tuple(read_header(file)[0])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise MetricError(f"{path}: array {key!r} cannot be read ({error})") from None
