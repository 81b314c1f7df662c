"""Tokenizer interfaces: images <-> latents, and text <-> token ids.

An image tokenizer has ``channels`` (latent channels), ``downsample`` (pixels per latent
cell), ``encode(images)`` mapping ``(N, 3|1, H, W)`` images in [-1, 1] to scaled latents
``(N, C, H/f, W/f)`` (the posterior mean unless a generator is given, then a sample) and
``decode(latents)`` back to images in [-1, 1].

A text tokenizer has ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``, ``encode(text) ->
list[int]`` (the text's ids only, no bos/eos: ``frame`` adds them) and ``decode(ids) -> str``
(the text of a plain or framed sequence: a leading bos is dropped and everything from the
first eos on, padding included, is cut).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# The special tokens of a BPE tokenizer trained by ``train_bpe``, which get ids 0, 1, 2.
BPE_PAD, BPE_BOS, BPE_EOS = "<pad>", "<bos>", "<eos>"


class ImageTokenizer(Protocol):
    channels: int
    downsample: int

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class TextTokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] ``(N, C, H, W)`` -> uint8 ``(N, H, W, C)`` (the ADM ``arr_0`` layout)."""
    out = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return out.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` -> float images in [-1, 1] ``(N, C, H, W)``."""
    return torch.from_numpy(np.array(array)).permute(0, 3, 1, 2).float() / 127.5 - 1  # a writable copy


def frame(tokenizer: TextTokenizer, text: str, length: int) -> list[int]:
    """``[bos, ids of text..., eos, pad, ...]`` of exactly ``length`` ids (the text truncated to fit)."""
    if length < 2:
        raise ValueError(f"a framed sequence needs length >= 2 (bos and eos), got {length}")
    ids = tokenizer.encode(text)[: length - 2]
    return [tokenizer.bos_id, *ids, tokenizer.eos_id] + [tokenizer.pad_id] * (length - 2 - len(ids))


def unframe(ids: Sequence[int], bos_id: int, eos_id: int) -> list[int]:
    """The text's ids of a plain or framed sequence: a leading bos dropped, cut at the first eos."""
    ids = list(ids)
    if ids and ids[0] == bos_id:
        ids = ids[1:]
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def train_bpe(captions: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (any text round-trips exactly) trained on ``captions``, with
    ``<pad>``, ``<bos>``, ``<eos>`` as ids 0, 1, 2 and at most ``vocab_size`` ids in all."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 3:
        raise ValueError(f"vocab_size must be >= {len(alphabet) + 3} (256 bytes and 3 special tokens), "
                         f"got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_PAD, BPE_BOS, BPE_EOS],
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(captions, trainer)
    return tokenizer


def read_captions(paths: Iterable[str | Path]) -> list[str]:
    """Every caption in caption files: ``.json`` (a list), ``.jsonl`` (one item a line) or text
    (one caption a line). An item is a caption, a list of captions, or an object with a
    ``caption``, ``captions`` or ``text`` field."""
    paths, captions = [Path(p) for p in paths], []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"captions file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".json":
                items = json.loads(text)
                if not isinstance(items, list):
                    raise ValueError(f"{path}: expected a JSON list, got {type(items).__name__}")
            elif path.suffix == ".jsonl":
                items = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                items = [line.strip() for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from None
        captions.extend(caption for item in items for caption in _captions_of(item, path))
    if not captions:
        raise ValueError(f"no captions in {', '.join(map(str, paths))}")
    return captions


def _captions_of(item, path: Path) -> Iterator[str]:
    if isinstance(item, dict):
        fields = [key for key in ("caption", "captions", "text") if key in item]
        if not fields:
            raise ValueError(f"{path}: an object without a caption, captions or text field: {item}")
        item = item[fields[0]]
    items = item if isinstance(item, list) else [item]
    for caption in items:
        if not isinstance(caption, str):
            raise ValueError(f"{path}: a caption must be a string, got {caption!r}")
        yield caption
