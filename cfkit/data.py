"""Data: datasets written to WebDataset shards, and a reproducible streaming shard loader.

A dataset plugin is built as ``factory(**options)`` and has ``num_classes``, ``channels``,
``image_size`` and ``samples(split)`` yielding ``Sample``s, or ``DeferredSample``s where reading
an image is costly (files, foreign shards): those are read only by the process that writes
them (``dataset_samples`` reads them all). ``write_shards`` turns it into tar
shards readable by plain ``webdataset.WebDataset`` (``png``, ``cls``, ``json`` captions,
``__key__``), or, with a tokenizer, pre-encoded fp16 latents (``latent.npy`` and the
horizontally flipped ``latent_flip.npy``) so training skips the VAE. A config that names a
dataset but no shards trains on its shards cached in ``$CFKIT_CACHE/shards/`` (``dataset_shards``).

The loader streams shards as global batches: every global batch is the same whatever the
number of processes and workers (each process takes its block of rows, each worker whole
batches), which makes runs reproducible across world sizes and exactly resumable. Every
process and worker reads every shard, so reading must be cheap: ``read_tar`` parses the tar
headers itself (about 20x faster than the ``tarfile`` module) and only a process's own rows
are decoded. It reads the shards others write too, by the suffixes of ``config.SampleKeys``:
img2dataset's (``jpg``, ``txt`` captions, ``json`` metadata), the ImageNet ``*-wds`` sets'
(``jpg`` / ``jpeg`` / ``webp``, ``cls``, keys with dots); files of no kind it knows are ignored.

Shards are data, never code: only local files are read unless whoever runs cfkit opts in to
``pipe:`` and URL shards (``--allow-remote-shards`` or ``CFKIT_ALLOW_REMOTE_SHARDS=1``), since
webdataset reads those by running a command. Bad data never stops a run: a damaged shard and
a bad sample (a label out of range or missing, an image of another size, a file too large to
be real) are skipped and counted by reason with their shard and key; only shards without a
single usable sample are an error (``DataError``).
"""

from __future__ import annotations

import errno
import functools
import glob
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from cfkit import config as configs
from cfkit.checkpoint import atomic_write, write_json
from cfkit.distributed import barrier
from cfkit.tokenizers import from_uint8

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
DEFAULT_KEYS = configs.SampleKeys()


@dataclass
class Sample:
    """One item: ``image`` uint8 ``(H, W, C)``, optional class ``label`` and ``captions``."""

    key: str
    image: np.ndarray
    label: int | None = None
    captions: list[str] | None = None


@dataclass(frozen=True)
class DeferredSample:
    """A sample read only when it is needed: its ``key``, and ``load()`` returning the
    ``Sample`` or raising ``UnreadableSample``. The processes of a shared shard write (torchrun)
    count every dataset item to cut the shards alike but read only their own shards' samples;
    a shard is one sample short for each that cannot be read."""

    key: str
    load: Callable[[], Sample]


class UnreadableSample(ValueError):
    """Why a sample cannot be read: ``reason`` (a short category: "damaged", "not an
    image", ...), then the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason} ({detail})")
        self.reason = reason


def loaded(items: Iterable[Sample | DeferredSample], unreadable: Counter) -> Iterator[Sample]:
    """The ``Sample``s of a dataset's items, deferred ones read; one that cannot be read is
    skipped with a warning and counted by reason in ``unreadable``."""
    for item in items:
        if isinstance(item, DeferredSample):
            try:
                item = item.load()
            except UnreadableSample as error:
                log.warning("skipped sample %s: %s", item.key, error)
                unreadable[error.reason] += 1
                continue
        yield item


def unreadable_summary(unreadable: Counter) -> str:
    """``"N unreadable sample(s) skipped (2 damaged, 1 not an image)"``."""
    reasons = ", ".join(f"{count} {reason}" for reason, count in unreadable.most_common())
    return f"{sum(unreadable.values())} unreadable sample(s) skipped ({reasons})"


def dataset_samples(dataset, split: str) -> Iterator[Sample]:
    """Every readable ``Sample`` of ``dataset``'s ``split``, in order (``loaded``), with one
    warning at the end counting those that could not be read."""
    unreadable = Counter()
    yield from loaded(dataset.samples(check_split(split)), unreadable)
    if unreadable:
        log.warning("%s %s: %s", type(dataset).__name__.lower(), split, unreadable_summary(unreadable))


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    return split


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


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
    captions = [c for sample in dataset_samples(dataset, split) for c in sample.captions or ()]
    if not captions:
        raise ValueError(f"dataset {type(dataset).__name__.lower()} has no captions in its {split} split")
    return captions


@dataclass(frozen=True)
class Encoder:
    """Latent caching: ``tokenizer`` encodes ``batch_size`` images at a time on ``device``."""

    tokenizer: object
    batch_size: int = 64
    device: str = "cpu"


def write_shards(dataset, out_dir, split: str = "train", shard_size: int = 1000,
                 tokenizer=None, prefix: str | None = None, batch_size: int = 64,
                 force: bool = False, device: str = "cpu", progress: bool = False,
                 resume: bool = False, identity: dict | None = None,
                 group: tuple[int, int] = (0, 1)) -> list[Path]:
    """Write ``dataset``'s ``split`` as tar shards ``{prefix}-{split}-{i:06d}.tar`` in ``out_dir``
    (``shard_size`` samples each); with ``tokenizer``, latents encoded ``batch_size`` images at a
    time on ``device`` replace pixels. The set is written in a work folder beside ``out_dir``,
    which then replaces it: a reader finds the old set or the new one, never a mix. An
    ``out_dir`` holding shards is replaced only with ``force``; one holding anything else never
    is. ``progress``: a bar of the images written on a terminal (else lines, ``cfkit.progress``).

    Without ``resume`` a failed write leaves nothing. With it the work folder is
    ``.{name}.partial`` and every shard there is complete (temp file + rename), so a write that
    stopped (killed, preempted, failed) continues when run again, skipping those; the folder
    records what it is for (``identity``, e.g. the dataset's and tokenizer's options) and
    refuses other settings until ``force``. ``group`` (rank, world size, e.g. a
    ``cfkit.distributed.Distributed``'s): each process writes shards rank, rank + world, ... (a
    ``resume`` write), and the set is byte-identical to one process's."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    rank, world = group
    if world > 1 and not resume:
        raise ValueError("processes share a write of shards only with resume=True (one work folder)")
    target = Path(out_dir).resolve()
    _check_replaceable(target, force)
    prefix = prefix or type(dataset).__name__.lower()
    about = {"prefix": prefix, "split": split, "shard_size": shard_size, "latents": tokenizer is not None,
             **(identity or {})}
    work = target.with_name(f".{target.name}.partial" if resume
                            else f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if rank == 0:
            _open_work_folder(work, about, force)
        _group_barrier(world)
        encoder = Encoder(tokenizer, batch_size, device) if tokenizer is not None else None
        names = _write_set(dataset, work, split, shard_size, encoder, prefix, group,
                           _progress(prefix, split, progress, rank, world))
        _group_barrier(world)
        if rank == 0:
            _finish_work_folder(work, names)
            _replace_folder(work, target)
        _group_barrier(world)
    except BaseException:
        if not resume or (rank == 0 and not any(work.glob("*.tar"))):  # nothing to continue from
            shutil.rmtree(work, ignore_errors=True)
        raise
    return [Path(out_dir) / name for name in names]


def _group_barrier(world: int) -> None:
    if world > 1:
        barrier()


def _progress(prefix: str, split: str, bar: bool, rank: int, world: int):
    """The images written, rank 0's: a bar (``bar``, on a terminal) or a line every 30 s."""
    from cfkit.progress import Progress

    ranks = f" (rank 0 of {world})" if world > 1 else ""
    return Progress(f"shards of {prefix} {split}{ranks}", "images", bar=bar, show=rank == 0)


WORK_FILE = "cfkit-write.json"  # in a work folder: what its shards are of


def _open_work_folder(work: Path, about: dict, force: bool) -> None:
    """Make the work folder, or keep the one a stopped write of the same ``about`` left (its
    complete shards are skipped); one of other settings is an error, or with ``force`` removed."""
    if work.is_dir():
        try:
            before = json.loads((work / WORK_FILE).read_text())
        except (OSError, ValueError):
            before = None  # a writer killed before it wrote the file: nothing of it to keep
        if before != about and not (force or before is None):
            changed = sorted(k for k in {*about, *before} if about.get(k) != before.get(k))
            raise ValueError(f"{work} holds an unfinished write with other settings ({', '.join(changed)} "
                             f"differ): run the same command again to finish it, or start over with "
                             "--force (force=True)")
        if before != about:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / WORK_FILE, about)


def _finish_work_folder(work: Path, names: list[str]) -> None:
    """Check every shard of ``names`` is in ``work``; drop the temp files of killed writers and
    the work record, leaving only the shards."""
    missing = [name for name in names if not (work / name).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} of {len(names)} shard(s) missing in {work} (e.g. {missing[0]}): "
                         "a process stopped early; run the same command again to finish")
    for path in work.iterdir():
        if path.name not in names:
            path.unlink()


def _write_set(dataset, folder: Path, split: str, shard_size: int, encoder: Encoder | None, prefix: str,
               group: tuple[int, int], progress) -> list[str]:
    """Cut ``dataset``'s ``split`` into shards and write this process's (``group``: rank, world
    size) into ``folder``, but for those already there; every shard's name."""
    rank, world = group
    names, skipped, unreadable = [], 0, Counter()
    for index, chunk in enumerate(_chunks(dataset, split, shard_size)):
        names.append(f"{prefix}-{split}-{index:06d}.tar")
        if index % world != rank:
            continue  # another process's shard: its deferred samples are never read here
        if (folder / names[-1]).is_file():  # written whole (temp + rename) before a stop
            skipped += 1
            continue
        _write_shard(folder / names[-1], list(loaded(chunk, unreadable)), encoder)
        progress.update(len(chunk))
    if not names:
        raise ValueError(f"dataset {prefix} has no {split} samples: no shards to write")
    done = [f"{skipped} were complete already"] if skipped else []
    if unreadable:  # this process's: each read only its own shards' samples
        log.warning("%s %s: %s", prefix, split, unreadable_summary(unreadable))
    progress.close(f"{len(names)} shard(s) in all", *done)
    return names


def sample_key(name: str) -> str:
    """A shard sample key made from a file or tar member ``name`` (``./a/b.c`` -> ``a_b_c``):
    leading ``./`` dropped, then each ``/`` and ``.`` made ``_``, since webdataset ends a key at
    a folder's ``/`` and at the first dot of a base name."""
    while name.startswith("./"):
        name = name[2:]
    return name.replace("/", "_").replace(".", "_")


def _chunks(dataset, split: str, shard_size: int) -> Iterator[list[Sample | DeferredSample]]:
    """``dataset``'s ``split`` items in consecutive lists of ``shard_size`` (the last shorter),
    deferred ones not yet read."""
    chunk = []
    for sample in dataset.samples(check_split(split)):
        if not sample.key or "." in sample.key or "/" in sample.key:
            # webdataset splits a member name at the first dot of its base name
            raise ValueError(f"sample key {sample.key!r}: a key must be non-empty, without '.' or '/'")
        chunk.append(sample)
        if len(chunk) == shard_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _is_shard_file(name: str) -> bool:
    """A shard, or the temp file of one that a killed writer left."""
    return name.endswith(".tar") or (name.startswith(".") and name.endswith(".tmp"))


def _check_replaceable(folder: Path, force: bool) -> None:
    """Refuse to replace a folder of shards without ``force``, and a folder holding anything
    else at all (a mistaken ``--out`` must not delete other files)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file; shards are written to a folder")
    entries = sorted(p.name for p in folder.iterdir())
    others = [name for name in entries if not _is_shard_file(name)]
    if others:
        raise ValueError(f"{folder} holds files other than shards ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}); write shards to a new or empty folder")
    if entries and not force:
        raise ValueError(f"{folder} already holds {len(entries)} shard file(s); replace the whole "
                         "set with --force (force=True), or write to a new or empty folder")


def _replace_folder(new: Path, folder: Path) -> None:
    """Put folder ``new`` in ``folder``'s place: one atomic rename when ``folder`` is missing or
    empty, else the old folder is renamed aside first (a reader meanwhile finds no folder,
    never a mix of the two sets) and then deleted."""
    try:
        os.rename(new, folder)
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    old = new.with_suffix(".old")
    os.rename(folder, old)
    os.rename(new, folder)
    shutil.rmtree(old)


def _write_shard(path: Path, samples: list[Sample], encoder: Encoder | None) -> Path:
    # no samples: none of the shard's could be read, and it is written empty
    latents = _encode(samples, encoder) if encoder is not None and samples else None

    def write(tmp):
        # A fixed integer mtime: byte-identical shards, and no per-file pax header (a float
        # mtime adds one, doubling the headers a reader parses).
        with open(tmp, "wb") as file, wds.TarWriter(file, mtime=0) as sink:  # a name is no URL
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
def _encode(samples: list[Sample], encoder: Encoder) -> tuple[np.ndarray, np.ndarray]:
    """Posterior-mean latents (fp16) ``(N, C, h, w)`` of the images and of their horizontal flips."""
    plain, flipped, tokenizer, size = [], [], encoder.tokenizer, encoder.batch_size
    for start in range(0, len(samples), size):
        images = from_uint8(np.stack([s.image for s in samples[start:start + size]])).to(encoder.device)
        plain.append(tokenizer.encode(images).half().cpu().numpy())
        flipped.append(tokenizer.encode(images.flip(-1)).half().cpu().numpy())
    channels = plain[0].shape[1]
    if channels != tokenizer.channels:  # e.g. pixels left at channels = 1 on RGB images
        raise ValueError(f"the image tokenizer declares {tokenizer.channels} latent channel(s) but "
                         f"its latents of these {images.shape[1]}-channel images have {channels}; give "
                         f"it options that match the dataset (pixels: channels = {images.shape[1]})")
    return np.concatenate(plain), np.concatenate(flipped)


def cache_dir() -> Path:
    """cfkit's cache: ``$CFKIT_CACHE``, by default ``~/.cache/cfkit``."""
    return Path(os.environ.get("CFKIT_CACHE", "~/.cache/cfkit")).expanduser()


def digest(value) -> str:
    """A short stable hash of a JSON value (it names a cached shard set, seeds a training step)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def dataset_shards(experiment: configs.Experiment, split: str = "train", is_main: bool = True) -> str:
    """The shards of ``split``: the configured ones, or the dataset's cached shards, built on
    first use into ``$CFKIT_CACHE/shards/`` (a temp folder renamed when complete)."""
    spec = experiment.data
    given = spec.shards if split == "train" else spec.val_shards
    if given:
        return given
    if spec.dataset is None:
        raise configs.ConfigError(f"data: no {split} shards and no dataset to build them from")
    identity = {"dataset": spec.dataset.model_dump(), "shard_size": spec.shard_size}
    if spec.encoded:
        identity["tokenizer"] = spec.tokenizer.model_dump()
    folder = cache_dir() / "shards" / f"{spec.dataset.name}-{digest(identity)}" / split
    if is_main and not folder.is_dir():
        tokenizer = spec.tokenizer.build() if spec.encoded else None
        try:  # write_shards writes the set beside the folder and renames it into place
            write_shards(spec.dataset.build(), folder, split, spec.shard_size, tokenizer,
                         prefix=spec.dataset.name)
        except ValueError:
            if not folder.is_dir():
                raise
            # else another process finished the same set first
    barrier()
    return str(folder)


BLOCK = 512
END_BLOCK = bytes(BLOCK)
CHUNK = 1 << 24
MAX_MEMBER = 1 << 30  # no sample's file is this large: a larger size field is damage
# webdataset's split of a file name: key = folder + base name up to its first dot, suffix = the rest
MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def read_tar(path, allow_remote: bool | None = None) -> Iterator[dict]:
    """The samples of a tar shard grouped as ``webdataset`` groups them: ``{"__key__": key,
    suffix: bytes, ...}`` from consecutive files ``key.suffix``. ``path`` is a file or, when
    ``allow_remote`` (default: ``remote_shards_allowed()``), any URL webdataset opens
    (``pipe:``, ``http://``...). A damaged archive (no tar header where one should be, a file
    size no file has, a truncated file, no end-of-archive block) raises ValueError after
    yielding the complete samples before the damage; the sample it was reading is dropped."""
    sample = None
    for name, data in _tar_files(path, allow_remote):
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


def _tar_files(path, allow_remote: bool | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a tar archive: ustar, GNU long names, pax paths."""
    with open_shard(str(path), allow_remote) as file:
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
            if not 0 <= size <= MAX_MEMBER:
                raise ValueError(f"{path}: a tar header declares a file of {size} bytes (allowed: "
                                 f"0 to {MAX_MEMBER}); the archive is damaged")
            data = _read(file, size)
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


def _read(file, size: int) -> bytes:
    """Up to ``size`` bytes of ``file``, in chunks: a damaged size field then costs no more
    memory than the bytes really there (``read(size)`` allocates ``size`` bytes first)."""
    if size <= CHUNK:
        return file.read(size)
    parts = []
    while size > 0 and (part := file.read(min(size, CHUNK))):
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


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
        space = data.index(b" ", start)
        length = int(data[start:space])
        if length <= space + 1 - start:  # a record holds its length, a space and more
            raise ValueError(f"a pax record of length {length} at byte {start}")
        key, _, value = data[space + 1:start + length - 1].partition(b"=")
        if key == b"path":
            return value.decode()
        start += length
    return None


class DataError(ValueError):
    """Shards that cannot be read at all: a source not allowed, or not one usable sample."""


ALLOW_REMOTE_SHARDS = "CFKIT_ALLOW_REMOTE_SHARDS"


def remote_shards_allowed() -> bool:
    """Whether whoever runs cfkit opted in to ``pipe:`` and URL shards (the environment
    variable ``CFKIT_ALLOW_REMOTE_SHARDS=1``, which ``cfkit train --allow-remote-shards`` sets):
    a config or a run folder may come from someone else, the environment may not."""
    return os.environ.get(ALLOW_REMOTE_SHARDS, "") not in ("", "0")


def is_local(url: str) -> bool:
    """A plain path or ``file:`` URL: reading it runs nothing. webdataset hands every other
    scheme to a program (``pipe:`` to a shell; http(s), gs, s3, hf, ... to curl, gsutil, aws)
    and ``-`` means standard input."""
    return url != "-" and urlparse(url).scheme in ("", "file")


def check_sources(urls: list[str], allow_remote: bool | None = None) -> list[str]:
    """``urls``, when each is local or remote shards are allowed (default: the environment)."""
    if allow_remote is None:
        allow_remote = remote_shards_allowed()
    remote = [url for url in urls if not is_local(url)]
    if remote and not allow_remote:
        raise DataError(
            f"shard {remote[0]!r} is not a local file ({len(remote)} of {len(urls)} shard(s)): pipe: "
            "and URL shards (http(s)://, gs://, s3://, ...) are read by running a command, so "
            "whoever runs cfkit must opt in: cfkit train --allow-remote-shards, or the environment "
            f"variable {ALLOW_REMOTE_SHARDS}=1 (a local file with a colon in its name: ./NAME)")
    return urls


def open_shard(url: str, allow_remote: bool | None = None):
    """A binary file object of shard ``url``: a local file directly (no URL rewriting, no
    program), anything else through webdataset once ``check_sources`` allows it."""
    if is_local(url):
        return open(local_path(url), "rb")
    check_sources([url], allow_remote)
    return wds.gopen(url, "rb")


def local_path(url: str) -> str:
    """The file a local shard ``url`` (a path or ``file:`` URL) names."""
    parsed = urlparse(url)
    return url2pathname(parsed.path) if parsed.scheme else url


def _file_url(path: str) -> str:
    """A file found on disk, spelled so that no reader takes it for a URL (``pipe:x.tar``)."""
    return path if is_local(path) else f"./{path}"


def shard_paths(spec, allow_remote: bool | None = None) -> list[str]:
    """Shard files from a folder, a glob, a brace pattern or a list; ``pipe:`` and URL shards
    only when ``allow_remote`` (default: ``remote_shards_allowed()``), else DataError."""
    if isinstance(spec, (list, tuple)):
        return check_sources([str(p) for p in spec], allow_remote)
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        found = sorted(_file_url(str(p)) for p in path.glob("*.tar"))
    elif any(c in spec for c in "*?["):
        found = sorted(_file_url(p) for p in glob.glob(spec))
    else:  # a name, or webdataset's brace notation: train-{000000..000146}.tar
        found = check_sources(list(wds.shardlists.expand_urls(spec)), allow_remote)
        missing = [url for url in found if is_local(url) and not os.path.exists(local_path(url))]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(found)} shard(s) of {spec} do not exist, "
                                    f"e.g. {missing[0]}")
    if not found:
        raise FileNotFoundError(f"no shards found at {spec}")
    return found


class BadSample(ValueError):
    """Why a sample cannot be used: ``reason``, one word (label, captions, image, latent, kind,
    shape), then the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 1 << 26  # no training image is this large: an image declaring more is a decompression bomb
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}  # suffix -> PIL format


def member(raw: dict, suffix: str) -> bytes | None:
    """The file of a raw sample with ``suffix``, or None. A key with dots (``n01440764_10026.JPEG``)
    puts its extra part in front of every suffix (webdataset splits at the first dot:
    ``jpeg.cls``), so a suffix ending in ``.SUFFIX`` counts too, as webdataset's decoders go by
    the last extension."""
    if suffix in raw:
        return raw[suffix]
    tail = f".{suffix}"
    return next((data for name, data in raw.items() if name.endswith(tail)), None)


def png_size(data: bytes) -> tuple[int, int]:
    """(height, width) that a PNG's header declares, read without decoding the pixels."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
        raise BadSample("image", f"not a PNG (it starts {bytes(data[:8])!r})")
    return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")


def image_size(data: bytes, suffix: str) -> tuple[int, int]:
    """(height, width) that an image file's header declares (PIL reads only the header)."""
    if suffix == "png":
        return png_size(data)
    try:
        with Image.open(io.BytesIO(data), formats=(IMAGE_FORMATS[suffix],)) as image:
            return image.height, image.width
    except Exception:  # PIL raises many types on damaged data
        raise BadSample("image", f"{suffix} file is not a {IMAGE_FORMATS[suffix]} image (it starts "
                        f"{bytes(data[:8])!r})") from None


def read_image(data: bytes, suffix: str = "png") -> np.ndarray:
    """Image bytes -> uint8 ``(H, W, C)``, C = 1 (grey) or 3 (anything else: palette, RGBA, CMYK)."""
    with Image.open(io.BytesIO(data), formats=(IMAGE_FORMATS[suffix],)) as image:
        image = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
    return image[..., None] if image.ndim == 2 else image


def sample_image(raw: dict, keys: configs.SampleKeys) -> tuple[str, bytes] | None:
    """(suffix, bytes) of the first of ``keys.images`` the raw sample has, or None."""
    for suffix in keys.images:
        data = member(raw, suffix)
        if data is not None:
            return suffix, data
    return None


def sample_json(raw: dict) -> object:
    """The parsed ``json`` file of a raw sample, or None when it has none."""
    data = member(raw, "json")
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:
        raise BadSample("captions", f"json file is not JSON ({type(error).__name__})") from None


def sample_label(raw: dict, num_classes: int | None, keys: configs.SampleKeys = DEFAULT_KEYS) -> int:
    """The label of a raw sample (its ``keys.label`` file, else the ``keys.label_field`` of its
    json): an integer in ``0..num_classes-1``, or when ``num_classes`` is None any non-negative
    integer, or -1 when absent."""
    allowed = "a non-negative integer" if num_classes is None else f"an integer in 0..{num_classes - 1}"
    data = member(raw, keys.label)
    if data is not None:
        text = bytes(data).strip()
        label = int(text) if text.isdigit() and len(text) < 20 else -1
        shown = f"{keys.label} {text[:20]!r}"
    else:
        value = sample_json(raw)
        value = value.get(keys.label_field) if isinstance(value, dict) else None
        if value is None:
            if num_classes is None:
                return -1
            raise BadSample("label", f"no {keys.label} file or json {keys.label_field!r} field; a "
                            f"label must be {allowed}")
        label = value if isinstance(value, int) and not isinstance(value, bool) else -1
        shown = f"json {keys.label_field!r} {str(value)[:20]!r}"
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise BadSample("label", f"{shown} is not {allowed}")
    return label


def sample_captions(raw: dict, keys: configs.SampleKeys = DEFAULT_KEYS) -> list[str] | None:
    """The captions of a raw sample (see ``SampleKeys``): a list of strings, or None when absent."""
    data = member(raw, keys.caption)
    if data is not None:
        try:
            return [bytes(data).decode("utf-8").strip()]
        except UnicodeDecodeError:
            raise BadSample("captions", f"{keys.caption} file is not UTF-8 text") from None
    captions = sample_json(raw)
    if isinstance(captions, dict):  # metadata, e.g. img2dataset's: the caption is one field
        captions = captions.get(keys.caption_field)
        captions = [captions] if isinstance(captions, str) else captions
        where = f"json {keys.caption_field!r} field"
    else:
        where = "json file"
    listed = isinstance(captions, list) and all(isinstance(c, str) for c in captions)
    if captions is not None and not listed:
        raise BadSample("captions", f"{where} is not a caption or a list of caption strings")
    return captions


def sample_kind(raw: dict, keys: configs.SampleKeys = DEFAULT_KEYS) -> str | None:
    """``latents`` (a ``latent.npy`` file, preferred) or ``images`` (one of ``keys.images``);
    None for a sample of none of the files ``keys`` name (someone else's files: ignored)."""
    if member(raw, "latent.npy") is not None:
        return "latents"
    if sample_image(raw, keys) is not None:
        return "images"
    if all(member(raw, suffix) is None for suffix in (keys.label, keys.caption, "json", "latent_flip.npy")):
        return None
    files = ", ".join(sorted(k for k in raw if not k.startswith("__"))) or "none"
    raise BadSample("image", f"no {', '.join(keys.images)} or latent.npy file (its files: {files})")


def sample_latent(data: bytes, name: str) -> np.ndarray:
    """A ``(C, H, W)`` float latent from ``.npy`` bytes (never a pickle: object arrays fail)."""
    try:
        array = read_npy(data)
    except Exception as error:  # numpy raises several types on a damaged header
        raise BadSample("latent", f"{name} is not a .npy array ({error})") from None
    if array.dtype.kind != "f" or array.ndim != 3:
        raise BadSample("latent", f"{name} holds {array.dtype} {array.shape}; a latent is a float "
                        "(C, H, W) array")
    return array


@dataclass(frozen=True)
class SampleSpec:
    """What a usable sample is: ``kind`` ``images`` (an image file, decoded uint8 ``(H, W, C)``)
    or ``latents`` (``latent.npy``, float ``(C, H, W)``), None for either; the ``shape`` of that
    array (None: any); labels in ``0..num_classes-1`` (None: any or none, see
    ``sample_label``); which files hold the image, label and captions: ``keys``."""

    kind: str | None = None
    shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    keys: configs.SampleKeys = DEFAULT_KEYS

    def screen(self, raw: dict) -> bool:
        """Whether the raw sample is one at all (False: none of the files ``keys`` name, e.g.
        someone else's files in the shard); BadSample unless its label, captions, kind and
        size are right, as far as its files tell without decoding pixels (cheap: every worker
        screens every sample)."""
        kind = sample_kind(raw, self.keys)
        if kind is None:
            return False
        sample_label(raw, self.num_classes, self.keys)
        sample_captions(raw, self.keys)
        if self.kind is not None and kind != self.kind:
            raise BadSample("kind", f"a sample of {kind}; these shards hold {self.kind}")
        if kind == "latents":
            for name in ("latent.npy", "latent_flip.npy"):
                if (data := member(raw, name)) is not None:
                    self.check_shape(sample_latent(data, name).shape, name)
            return True
        suffix, data = sample_image(raw, self.keys)
        height, width = image_size(data, suffix)
        if height * width > MAX_PIXELS:
            raise BadSample("image", f"{suffix} of {width}x{height} pixels (allowed: up to {MAX_PIXELS})")
        if self.shape is not None and (height, width) != self.shape[:2]:
            raise BadSample("shape", f"{suffix} of {height}x{width} pixels; these shards' images are "
                            f"{self.shape[0]}x{self.shape[1]}")
        return True

    def decode(self, raw: dict, flip: bool = False) -> dict:
        """A screened raw sample -> ``key``, ``label``, ``captions`` and its ``images`` or
        ``latents`` array, horizontally flipped when ``flip``; BadSample."""
        item = {"key": raw["__key__"], "label": sample_label(raw, self.num_classes, self.keys),
                "captions": sample_captions(raw, self.keys)}
        if sample_kind(raw, self.keys) == "latents":
            name = "latent_flip.npy" if flip and member(raw, "latent_flip.npy") is not None else "latent.npy"
            item["latents"] = array = sample_latent(member(raw, name), name)
        else:
            name, data = sample_image(raw, self.keys)
            try:
                array = read_image(data, name)
            except Exception as error:  # PIL raises many types on damaged data
                raise BadSample("image", f"{name} does not decode ({error})") from None
            item["images"] = array = array[:, ::-1] if flip else array
        self.check_shape(array.shape, name)
        return item

    def check_shape(self, shape: tuple[int, ...], name: str) -> None:
        if self.shape is not None and shape != self.shape:
            raise BadSample("shape", f"{name} of shape {shape}; these shards' are {self.shape}")


@dataclass
class ErrorCount:
    """The bad data one reader (a process, or one of its DataLoader workers) skipped so far,
    each distinct shard and sample once, however many epochs re-read it. Samples count by
    reason (``BadSample.reason``): ``screened`` ones were rejected before batching (every
    worker screens every sample), ``decoded`` ones failed in this reader's own rows."""

    quiet: bool = False  # count without logging
    bad_shards: dict[str, str] = field(default_factory=dict)  # shard -> its error
    bad_samples: set[tuple[str, str]] = field(default_factory=set)  # (shard, key)
    screened: Counter = field(default_factory=Counter)
    decoded: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> its first sample

    @property
    def shards(self) -> int:
        return len(self.bad_shards)

    @property
    def samples(self) -> int:
        return len(self.bad_samples)

    def shard(self, shard: str, error: Exception) -> None:
        if shard not in self.bad_shards:
            self.bad_shards[shard] = str(error).removeprefix(f"{shard}: ")
            self._note(f"skipped corrupt shard {shard} ({self.shards} so far): {self.bad_shards[shard]}")

    def sample(self, shard: str, key: str, error: BadSample, decoded: bool = False) -> None:
        if (shard, key) in self.bad_samples:
            return
        self.bad_samples.add((shard, key))
        (self.decoded if decoded else self.screened)[error.reason] += 1
        self.examples.setdefault(error.reason, f"{key} of {shard}: {error}")
        self._note(f"skipped corrupt sample {key} of {shard} ({self.samples} so far): {error}")

    def counts(self) -> tuple[int, dict[str, int], dict[str, int]]:
        """(corrupt shards, screened and decoded samples by reason): what a batch carries."""
        return self.shards, dict(self.screened), dict(self.decoded)

    def summary(self) -> str:
        """One line: the damaged shards and bad samples by reason, with an example of each."""
        parts = []
        if self.bad_shards:
            shard, error = next(iter(self.bad_shards.items()))
            parts.append(f"{self.shards} damaged shard(s), e.g. {shard}: {error}")
        for reason, count in (self.screened + self.decoded).most_common():
            parts.append(f"{count} sample(s) with a bad {reason}, e.g. {self.examples[reason]}")
        return "; ".join(parts) or "no samples at all"

    def _note(self, message: str) -> None:
        if not self.quiet:
            log.warning(message)


class LoaderErrors:
    """The skip counts of a stream whose DataLoader workers each keep their own ``ErrorCount``:
    every batch carries its worker's ``counts()``. Every worker reads every shard and screens
    every sample, so those count once (the largest count of a worker); a sample is decoded by
    one worker only, so decoding failures add up."""

    def __init__(self):
        self.latest: dict[int, tuple[int, dict[str, int], dict[str, int]]] = {}

    def update(self, item: dict) -> None:
        worker, *counts = item["errors"]
        self.latest[worker] = tuple(counts)

    @property
    def shards(self) -> int:
        return max((s for s, _, _ in self.latest.values()), default=0)

    @property
    def by_reason(self) -> Counter:
        """Bad samples by reason, over all workers."""
        reasons = {r for _, screened, decoded in self.latest.values() for r in (*screened, *decoded)}
        return Counter({r: max((s.get(r, 0) for _, s, _ in self.latest.values()), default=0)
                        + sum(d.get(r, 0) for _, _, d in self.latest.values()) for r in reasons})

    @property
    def samples(self) -> int:
        return sum(self.by_reason.values())


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


def screened(shard: str, spec: SampleSpec, errors: ErrorCount, allow_remote: bool | None = None
             ) -> Iterator[dict]:
    """The samples of ``shard`` that ``spec`` screens in, each with its ``__url__``; a damaged
    shard (after its good samples) and screened-out samples go to ``errors``; files of no
    sample kind are passed over."""
    try:
        for raw in read_tar(shard, allow_remote):
            raw["__url__"] = shard
            try:
                if not spec.screen(raw):
                    continue  # not a sample: other files share the shard
            except BadSample as error:
                errors.sample(shard, raw["__key__"], error)
                continue
            yield raw
    except (OSError, ValueError) as error:
        errors.shard(shard, error)


PROBE_SAMPLES, PROBE_PER_SHARD = 32, 8


class ShardStream(torch.utils.data.IterableDataset):
    """Endless reproducible stream of batches from shards.

    Epoch ``e`` visits the shards in an order and shuffles samples with a buffer, both from
    ``random.Random(f"{seed}-{e}")``; consecutive ``batch_size * world_size`` samples form a
    global batch (across epoch ends: the stream never pauses), of which process ``rank`` takes
    its block of ``batch_size`` rows. DataLoader workers take whole batches in turn.
    ``skip_batches`` resumes mid-stream without decoding the skipped samples.

    Samples must fit a ``SampleSpec``: their image, label and captions in the files that
    ``keys`` (a ``config.SampleKeys``) names (a sample of other files only is ignored), labels
    in ``0..num_classes-1`` when given, one kind and shape, ``shape`` when given, else the most
    common among the first samples (found when
    the stream is made, the same in every process and worker). A damaged shard and a sample
    that does not fit are skipped and counted in ``errors``: most before batching (a batch is
    whole), pixels that fail to decode in a process's rows (that batch is short of them).
    Shards without one usable sample raise ``DataError``; ``pipe:`` and URL shards need
    ``allow_remote`` (default: ``remote_shards_allowed()``).

    Items are dicts: ``images`` or ``latents`` ``(B, C, H, W)`` float, ``labels`` ``(B,)`` (-1
    when absent), ``captions`` (list of lists), ``keys``, ``index`` (global batch number),
    ``errors`` (worker id and its ``ErrorCount.counts()``, see ``LoaderErrors``).
    """

    def __init__(self, shards, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 1000, flip: bool = True, skip_batches: int = 0,
                 epochs: int | None = None, num_classes: int | None = None,
                 shape: tuple[int, ...] | None = None, allow_remote: bool | None = None,
                 keys: configs.SampleKeys = DEFAULT_KEYS):
        self.allow_remote = remote_shards_allowed() if allow_remote is None else allow_remote
        self.shards = shard_paths(shards, self.allow_remote)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.flip = shuffle_buffer, flip
        self.skip_batches, self.epochs = skip_batches, epochs
        self.errors = ErrorCount()
        self.spec = self._probe(SampleSpec(shape=None if shape is None else tuple(shape),
                                           num_classes=num_classes, keys=keys))

    def _probe(self, spec: SampleSpec) -> SampleSpec:
        """``spec`` with the kind and (unless given) shape of the most common of the first
        ``PROBE_SAMPLES`` usable samples, taken from the shards in order; DataError if none."""
        errors, found = ErrorCount(quiet=True), Counter()
        for shard in self.shards:
            usable = 0
            for raw in screened(shard, spec, errors, self.allow_remote):
                try:
                    item = spec.decode(raw)
                except BadSample as error:
                    errors.sample(shard, raw["__key__"], error, decoded=True)
                    continue
                kind = "latents" if "latents" in item else "images"
                found[kind, item[kind].shape] += 1
                usable += 1
                if usable == PROBE_PER_SHARD:
                    break
            if sum(found.values()) >= PROBE_SAMPLES:
                break
        if not found:
            raise DataError(f"no usable sample in {len(self.shards)} shard(s): {errors.summary()}")
        kind, shape = found.most_common(1)[0][0]
        return replace(spec, kind=kind, shape=shape)

    def raw_samples(self) -> Iterator[tuple[int, dict]]:
        """(epoch, screened raw tar sample) forever (or for ``epochs``), shuffled."""
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            rng = random.Random(f"{self.seed}-{epoch}")
            shards = list(self.shards)
            rng.shuffle(shards)
            count = 0
            read = (raw for shard in shards
                    for raw in screened(shard, self.spec, self.errors, self.allow_remote))
            for sample in _shuffled(read, self.shuffle_buffer, rng):
                count += 1
                yield epoch, sample
            if count == 0:  # the shards changed since the stream was made
                raise DataError(f"no usable sample in {len(self.shards)} shard(s) in epoch {epoch}: "
                                f"{self.errors.summary()}")
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
            item = self.collate(index, [d for d in decoded if d is not None])
            item["errors"] = (worker_id, *self.errors.counts())  # see LoaderErrors
            yield item

    def decode(self, epoch: int, raw: dict) -> dict | None:
        """One screened raw sample -> ``images`` uint8 ``(H, W, C)`` or ``latents`` ``(C, H, W)``
        arrays, flipped or not (the coin depends on seed, epoch and key only); None (counted)
        when it does not decode to the stream's ``spec``."""
        key = raw["__key__"]
        try:
            return self.spec.decode(raw, self.flip and _coin(f"{self.seed}-{epoch}-{key}"))
        except BadSample as error:  # a bad sample is skipped and counted, never fatal
            self.errors.sample(raw["__url__"], key, error, decoded=True)
            return None

    def collate(self, index: int, items: list[dict]) -> dict:
        """Decoded samples -> one batch; arrays are stacked first and converted once."""
        kind = self.spec.kind
        if items:
            arrays = np.stack([item[kind] for item in items])
        else:  # every row was bad: an empty batch of the stream's shape
            arrays = np.empty((0, *self.spec.shape), np.uint8 if kind == "images" else np.float32)
        return {
            kind: from_uint8(arrays) if kind == "images" else torch.from_numpy(arrays).float(),
            "labels": torch.tensor([item["label"] for item in items], dtype=torch.long),
            "captions": [item["captions"] for item in items],
            "keys": [item["key"] for item in items],
            "index": index,
        }


def loader(stream: ShardStream, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over a ShardStream (batches are made by the stream)."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                       persistent_workers=num_workers > 0)
