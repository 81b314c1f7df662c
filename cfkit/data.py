"""Data: datasets written to WebDataset shards, and a reproducible streaming shard loader.

A dataset plugin is built as ``factory(**options)`` and has ``num_classes``, ``channels``,
``image_size`` and ``samples(split)`` yielding ``Sample``s. ``write_shards`` turns it into tar
shards readable by plain ``webdataset.WebDataset`` (``png``, ``cls``, ``json`` captions,
``__key__``), or, with a tokenizer, pre-encoded fp16 latents (``latent.npy`` and the
horizontally flipped ``latent_flip.npy``) so training skips the VAE.

The loader streams shards as global batches: every global batch is the same whatever the
number of processes and workers (each process takes its block of rows, each worker whole
batches), which makes runs reproducible across world sizes and exactly resumable.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

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
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def read_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 ``(H, W, C)``."""
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(data)))
    return image[..., None] if image.ndim == 2 else image[..., :3]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def read_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


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
        with wds.TarWriter(str(tmp)) as sink:
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
    return np.concatenate(plain), np.concatenate(flipped)


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


def _shuffled(items: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """Buffer shuffle: fill ``buffer`` items, then emit a random one per new item."""
    pool = []
    for item in items:
        pool.append(item)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool


class ShardStream(torch.utils.data.IterableDataset):
    """Endless reproducible stream of batches from shards.

    Epoch ``e`` visits the shards in an order and shuffles samples with a buffer, both from
    ``random.Random(f"{seed}-{e}")``; consecutive ``batch_size * world_size`` samples form a
    global batch, of which process ``rank`` takes its block of ``batch_size`` rows. DataLoader
    workers take whole batches in turn. ``skip_batches`` resumes mid-stream without decoding
    the skipped samples. Items are dicts: ``images`` or ``latents`` ``(B, C, H, W)`` float,
    ``labels`` ``(B,)`` (-1 when absent), ``captions`` (list of lists), ``index`` (global batch
    number).
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
            samples = wds.tarfile_samples(({"url": u} for u in shards), handler=self.errors.shard)
            count = 0
            for sample in _shuffled(samples, self.shuffle_buffer, rng):
                count += 1
                yield epoch, sample
            if count == 0:
                raise RuntimeError(f"no readable samples in {len(self.shards)} shard(s)")
            epoch += 1

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
            yield self.collate(index, [d for d in decoded if d is not None])

    def decode(self, epoch: int, raw: dict) -> dict | None:
        key = raw.get("__key__", "?")
        try:
            flip = self.flip and random.Random(f"{self.seed}-{epoch}-{key}").random() < 0.5
            item = {"key": key, "label": int(raw["cls"]) if "cls" in raw else -1,
                    "captions": json.loads(raw["json"]) if "json" in raw else None}
            if "latent.npy" in raw:
                name = "latent_flip.npy" if flip and "latent_flip.npy" in raw else "latent.npy"
                item["latents"] = torch.from_numpy(read_npy(raw[name]).astype(np.float32))
            else:
                image = from_uint8(read_png(raw["png"])[None])[0]
                item["images"] = image.flip(-1) if flip else image
            return item
        except Exception as error:  # a corrupt sample is skipped and counted, never fatal
            self.errors.sample(key, error)
            return None

    @staticmethod
    def collate(index: int, items: list[dict]) -> dict:
        kind = "latents" if items and "latents" in items[0] else "images"
        return {
            kind: torch.stack([item[kind] for item in items]) if items else torch.empty(0),
            "labels": torch.tensor([item["label"] for item in items], dtype=torch.long),
            "captions": [item["captions"] for item in items],
            "keys": [item["key"] for item in items],
            "index": index,
        }


def loader(stream: ShardStream, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over a ShardStream (batches are made by the stream)."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                       persistent_workers=num_workers > 0)
