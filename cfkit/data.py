"""Data: datasets written to WebDataset shards, and a reproducible streaming shard loader.

A dataset plugin is built as ``factory(**options)`` and has ``num_classes``, ``channels``,
``image_size`` and ``samples(split)`` yielding ``Sample``s. ``write_shards`` turns it into tar
shards readable by plain ``webdataset.WebDataset`` (``png``, ``cls``, ``json`` captions,
``__key__``), or, with a tokenizer, pre-encoded fp16 latents (``latent.npy`` and the
horizontally flipped ``latent_flip.npy``) so training skips the VAE.

The loader streams shards as global batches: every global batch is the same whatever the
number of processes and workers (each process takes its block of rows, each worker whole
batches), which makes runs reproducible across world sizes and exactly resumable. Every
process and worker reads every shard, so reading must be cheap: ``read_tar`` parses the tar
headers itself (about 20x faster than the ``tarfile`` module) and only a process's own rows
are decoded.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import logging
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from cfkit.checkpoint import atomic_write
from cfkit.tokenizers import from_uint8

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


@dataclass
class Sample:
    """One item: ``image`` uint8 ``(H, W, C)``, optional class ``label`` and ``captions``."""

    key: str
    image: np.ndarray
    label: int | None = None
    captions: list[str] | None = None


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    return split


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def read_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 ``(H, W, C)``, C = 1 (grey) or 3 (anything else, e.g. palette or RGBA)."""
    with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
        image = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
    return image[..., None] if image.ndim == 2 else image


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def read_npy(data: bytes) -> np.ndarray:
    """``.npy`` bytes -> a read-only array viewing them. Only the header is parsed by numpy, once
    per distinct header (``np.load`` parses every one with ``ast``: ~10x the cost of a latent)."""
    if data[:6] != b"\x93NUMPY" or data[6] not in (1, 2):
        raise ValueError(f"not a version 1 or 2 .npy array (it starts {bytes(data[:8])!r})")
    width = 2 if data[6] == 1 else 4
    offset = 8 + width + int.from_bytes(data[8:8 + width], "little")
    shape, fortran, dtype = _npy_header(bytes(data[:offset]))
    array = np.frombuffer(data, dtype, count=math.prod(shape), offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    if header[6] == 1:
        return np.lib.format.read_array_header_1_0(io.BytesIO(header[8:]), max_header_size=len(header))
    return np.lib.format.read_array_header_2_0(io.BytesIO(header[8:]), max_header_size=len(header))


def dataset_captions(dataset, split: str = "train") -> list[str]:
    """Every caption of ``dataset``'s ``split``, in order (what ``cfkit tokenizer train`` learns)."""
    captions = [c for sample in dataset.samples(check_split(split)) for c in sample.captions or ()]
    if not captions:
        raise ValueError(f"dataset {type(dataset).__name__.lower()} has no captions in its {split} split")
    return captions


def write_shards(dataset, out_dir, split: str = "train", shard_size: int = 1000,
                 tokenizer=None, prefix: str | None = None, batch_size: int = 64) -> list[Path]:
    """Write ``dataset``'s ``split`` as tar shards ``{prefix}-{split}-{i:06d}.tar``; each shard
    is written to a temp name and renamed. With ``tokenizer``, latents replace pixels."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    prefix = prefix or type(dataset).__name__.lower()
    paths, chunk = [], []
    for sample in dataset.samples(check_split(split)):
        if not sample.key or "." in sample.key or "/" in sample.key:
            # webdataset splits a member name at the first dot of its base name
            raise ValueError(f"sample key {sample.key!r}: a key must be non-empty, without '.' or '/'")
        chunk.append(sample)
        if len(chunk) == shard_size:
            paths.append(_write_shard(out_dir / f"{prefix}-{split}-{len(paths):06d}.tar", chunk,
                                      tokenizer, batch_size))
            chunk = []
    if chunk:
        paths.append(_write_shard(out_dir / f"{prefix}-{split}-{len(paths):06d}.tar", chunk,
                                  tokenizer, batch_size))
    return paths


def _write_shard(path: Path, samples: list[Sample], tokenizer, batch_size: int) -> Path:
    latents = _encode(samples, tokenizer, batch_size) if tokenizer is not None else None

    def write(tmp):
        # A fixed integer mtime: byte-identical shards, and no per-file pax header (a float
        # mtime adds one, doubling the headers a reader parses).
        with wds.TarWriter(str(tmp), mtime=0) as sink:
            for i, sample in enumerate(samples):
                record = {"__key__": sample.key}
                if latents is None:
                    record["png"] = png_bytes(sample.image)
                else:
                    record["latent.npy"] = npy_bytes(latents[0][i])
                    record["latent_flip.npy"] = npy_bytes(latents[1][i])
                if sample.label is not None:
                    record["cls"] = str(sample.label).encode()
                if sample.captions is not None:
                    record["json"] = json.dumps(sample.captions).encode()
                sink.write(record)

    atomic_write(path, write)
    return path


@torch.no_grad()
def _encode(samples: list[Sample], tokenizer, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Posterior-mean latents (fp16) of the images and of their horizontal flips."""
    plain, flipped = [], []
    for start in range(0, len(samples), batch_size):
        images = from_uint8(np.stack([s.image for s in samples[start:start + batch_size]]))
        plain.append(tokenizer.encode(images).half().numpy())
        flipped.append(tokenizer.encode(images.flip(-1)).half().numpy())
    channels = plain[0].shape[1]
    if channels != tokenizer.channels:  # e.g. pixels left at channels = 1 on RGB images
        raise ValueError(f"the image tokenizer declares {tokenizer.channels} latent channel(s) but "
                         f"its latents of these {images.shape[1]}-channel images have {channels}; give "
                         f"it options that match the dataset (pixels: channels = {images.shape[1]})")
    return np.concatenate(plain), np.concatenate(flipped)


BLOCK = 512
END_BLOCK = bytes(BLOCK)
# webdataset's split of a file name: key = folder + base name up to its first dot, suffix = the rest
MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def read_tar(path) -> Iterator[dict]:
    """The samples of a tar shard grouped as ``webdataset`` groups them: ``{"__key__": key,
    suffix: bytes, ...}`` from consecutive files ``key.suffix``; ``path`` is a file or any URL
    webdataset opens (``pipe:``, ``http://``...). A damaged archive (no tar header where one
    should be, a truncated file, no end-of-archive block) raises ValueError after yielding the
    complete samples before the damage; the sample it was reading is dropped."""
    sample = None
    for name, data in _tar_files(path):
        match = MEMBER.match(name)
        if match is None:
            continue
        key, suffix = match.group(1), match.group(2).lower()
        if sample is not None and key != sample["__key__"]:
            yield sample
            sample = None
        if sample is None:
            sample = {"__key__": key}
        sample[suffix] = data
    if sample is not None:
        yield sample


def _tar_files(path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a tar archive: ustar, GNU long names, pax paths."""
    with wds.gopen(str(path), "rb") as file:
        long_name = None
        while True:
            header = file.read(BLOCK)
            if header == END_BLOCK:
                return
            if len(header) < BLOCK:
                raise ValueError(f"{path}: truncated: it ends without the end-of-archive block")
            # the ustar magic marks a header (cheap); a header without it must sum right (v7 tar)
            if header[257:262] != b"ustar" and not _checksum_ok(header):
                raise ValueError(f"{path}: not a tar archive (no tar header at byte {file.tell() - BLOCK})")
            size = _octal(header[124:136])
            data = file.read(size)
            if len(data) < size:
                raise ValueError(f"{path}: truncated inside a file of {size} bytes")
            file.read(-size % BLOCK)
            kind = header[156:157]
            if kind == b"L":  # GNU long name of the next file
                long_name = data.rstrip(b"\0").decode()
            elif kind == b"x":  # pax header of the next file
                long_name = _pax_path(data)
            elif kind in (b"0", b"\0", b"7"):  # a regular file
                yield long_name or _ustar_name(header), data
                long_name = None


def _octal(field: bytes) -> int:
    return int(field.replace(b"\0", b" ").strip() or b"0", 8)


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _octal(header[148:156])
    except ValueError:
        return False
    return stored == sum(header) - sum(header[148:156]) + 8 * ord(" ")


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    return (prefix + b"/" + name if prefix else name).decode()


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of pax extended-header records ``"LENGTH KEY=VALUE\\n"``."""
    start = 0
    while start < len(data) and data[start:start + 1] != b"\0":
        length = int(data[start:data.index(b" ", start)])
        key, _, value = data[data.index(b" ", start) + 1:start + length - 1].partition(b"=")
        if key == b"path":
            return value.decode()
        start += length
    return None


def shard_paths(spec) -> list[str]:
    """Shard files from a folder, a glob, a brace pattern or a list."""
    if isinstance(spec, (list, tuple)):
        return [str(p) for p in spec]
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
    elif any(c in spec for c in "*?["):
        found = sorted(glob.glob(spec))
    else:
        found = list(wds.shardlists.expand_urls(spec))
    if not found:
        raise FileNotFoundError(f"no shards found at {spec}")
    return found


@dataclass
class ErrorCount:
    """Corrupt shards and samples skipped so far."""

    shards: int = 0
    samples: int = 0
    last: list[str] = field(default_factory=list)

    def shard(self, error: Exception) -> bool:
        self.shards += 1
        self._note(f"skipped a corrupt shard ({self.shards} so far): {error}")
        return True

    def sample(self, key: str, error: Exception) -> None:
        self.samples += 1
        self._note(f"skipped corrupt sample {key} ({self.samples} so far): {error}")

    def _note(self, message: str) -> None:
        self.last = (self.last + [message])[-5:]
        log.warning(message)


class LoaderErrors:
    """The skip counts of a stream whose DataLoader workers each keep their own ``ErrorCount``:
    every batch carries its worker's counts. Every worker reads every shard, so a corrupt
    shard counts once (the largest count of a worker); a sample is decoded by one worker
    only, so corrupt samples add up."""

    def __init__(self):
        self.latest: dict[int, tuple[int, int]] = {}

    def update(self, item: dict) -> None:
        worker, shards, samples = item["errors"]
        self.latest[worker] = (shards, samples)

    @property
    def shards(self) -> int:
        return max((s for s, _ in self.latest.values()), default=0)

    @property
    def samples(self) -> int:
        return sum(n for _, n in self.latest.values())


def _shuffled(items: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """Buffer shuffle: fill ``buffer`` items, then emit a random one per new item."""
    pool = []
    for item in items:
        pool.append(item)
        if len(pool) >= buffer:
            i = rng.randrange(len(pool))
            pool[i], pool[-1] = pool[-1], pool[i]  # pop the last: O(1)
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


def _coin(text: str) -> bool:
    """A fair coin fixed by ``text`` (hashing is ~10x cheaper than seeding a ``random.Random``)."""
    return hashlib.blake2b(text.encode(), digest_size=1).digest()[0] < 128


class ShardStream(torch.utils.data.IterableDataset):
    """Endless reproducible stream of batches from shards.

    Epoch ``e`` visits the shards in an order and shuffles samples with a buffer, both from
    ``random.Random(f"{seed}-{e}")``; consecutive ``batch_size * world_size`` samples form a
    global batch (across epoch ends: the stream never pauses), of which process ``rank`` takes
    its block of ``batch_size`` rows. DataLoader workers take whole batches in turn.
    ``skip_batches`` resumes mid-stream without decoding the skipped samples. A corrupt shard
    or sample is skipped and counted in ``errors`` (a batch is then short of that sample).
    Items are dicts: ``images`` or ``latents`` ``(B, C, H, W)`` float, ``labels`` ``(B,)`` (-1
    when absent), ``captions`` (list of lists), ``keys``, ``index`` (global batch number),
    ``errors`` (worker id, corrupt shards and samples that worker skipped so far).
    """

    def __init__(self, shards, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 1000, flip: bool = True, skip_batches: int = 0,
                 epochs: int | None = None):
        self.shards = shard_paths(shards)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.flip = shuffle_buffer, flip
        self.skip_batches, self.epochs = skip_batches, epochs
        self.errors = ErrorCount()

    def raw_samples(self) -> Iterator[tuple[int, dict]]:
        """(epoch, raw tar sample) forever (or for ``epochs``), shuffled."""
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            rng = random.Random(f"{self.seed}-{epoch}")
            shards = list(self.shards)
            rng.shuffle(shards)
            count = 0
            for sample in _shuffled(self._read(shards), self.shuffle_buffer, rng):
                count += 1
                yield epoch, sample
            if count == 0:
                raise RuntimeError(f"no readable samples in {len(self.shards)} shard(s)")
            epoch += 1

    def _read(self, shards: list[str]) -> Iterator[dict]:
        for shard in shards:
            try:
                yield from read_tar(shard)
            except (OSError, ValueError) as error:  # a corrupt shard is skipped and counted
                self.errors.shard(error)

    def global_batches(self) -> Iterator[tuple[int, list[tuple[int, dict]]]]:
        size = self.batch_size * self.world_size
        batch, index = [], 0
        for item in self.raw_samples():
            batch.append(item)
            if len(batch) == size:
                yield index, batch
                batch, index = [], index + 1

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for index, batch in self.global_batches():
            if index < self.skip_batches or (index - self.skip_batches) % workers != worker_id:
                continue
            decoded = [self.decode(epoch, raw) for epoch, raw in batch[rows]]
            item = self.collate(index, [d for d in decoded if d is not None])
            item["errors"] = (worker_id, self.errors.shards, self.errors.samples)  # see LoaderErrors
            yield item

    def decode(self, epoch: int, raw: dict) -> dict | None:
        """One raw sample -> ``images`` uint8 ``(H, W, C)`` or ``latents`` ``(C, H, W)``
        arrays, flipped or not (the coin depends on seed, epoch and key only)."""
        key = raw.get("__key__", "?")
        try:
            flip = self.flip and _coin(f"{self.seed}-{epoch}-{key}")
            item = {"key": key, "label": int(raw["cls"]) if "cls" in raw else -1,
                    "captions": json.loads(raw["json"]) if "json" in raw else None}
            if "latent.npy" in raw:
                name = "latent_flip.npy" if flip and "latent_flip.npy" in raw else "latent.npy"
                item["latents"] = read_npy(raw[name])
            else:
                image = read_png(raw["png"])
                item["images"] = image[:, ::-1] if flip else image
            return item
        except Exception as error:  # a corrupt sample is skipped and counted, never fatal
            self.errors.sample(key, error)
            return None

    @staticmethod
    def collate(index: int, items: list[dict]) -> dict:
        """Decoded samples -> one batch; arrays are stacked first and converted once."""
        kind = "latents" if items and "latents" in items[0] else "images"
        if not items:
            stacked = torch.empty(0)
        elif kind == "images":
            stacked = from_uint8(np.stack([item[kind] for item in items]))
        else:
            stacked = torch.from_numpy(np.stack([item[kind] for item in items])).float()
        return {
            kind: stacked,
            "labels": torch.tensor([item["label"] for item in items], dtype=torch.long),
            "captions": [item["captions"] for item in items],
            "keys": [item["key"] for item in items],
            "index": index,
        }


def loader(stream: ShardStream, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over a ShardStream (batches are made by the stream)."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                       persistent_workers=num_workers > 0)
