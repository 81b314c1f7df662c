"""Built-in text tokenizers: bytes, hf (a local ``tokenizer.json``, e.g. LLaMA-3's), bpe (one
trained by ``cfkit tokenizer train``) and, only with the ``clip`` extra installed, open-clip."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from tokenizers import Tokenizer

from cfkit import hookimpl
from cfkit.tokenizers import BPE_BOS, BPE_EOS, BPE_PAD, unframe

# Special tokens looked up by name when a tokenizer.json's bos / eos / pad are not given.
BOS_NAMES = ("<|begin_of_text|>", "<s>", BPE_BOS, "<|startoftext|>", "[CLS]")
EOS_NAMES = ("<|end_of_text|>", "</s>", BPE_EOS, "<|endoftext|>", "[SEP]")
PAD_NAMES = (BPE_PAD, "[PAD]", "<|finetune_right_pad_id|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then bos, eos and pad as 256, 257 and 258."""

    vocab_size, bos_id, eos_id, pad_id = 259, 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        content = bytes(i for i in unframe(ids, self.bos_id, self.eos_id) if i < 256)
        return content.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` read with the tokenizers library. ``bos``, ``eos``, ``pad``
    are token strings or ids; by default they are found among the tokenizer's special tokens by
    their usual names (LLaMA-3's ``<|begin_of_text|>`` ...), pad falling back to eos."""

    def __init__(self, path: str, bos: str | int | None = None, eos: str | int | None = None,
                 pad: str | int | None = None):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file not found: {path}")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises a bare Exception on bad files
            raise ValueError(f"{path}: not a tokenizer.json: {error}") from None
        self.path = path
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id("bos", bos, BOS_NAMES)
        self.eos_id = self._special_id("eos", eos, EOS_NAMES)
        self.pad_id = self._special_id("pad", pad, PAD_NAMES, default=self.eos_id)

    def _special_id(self, role: str, given: str | int | None, names: tuple[str, ...],
                    default: int | None = None) -> int:
        if isinstance(given, int):
            if not 0 <= given < self.vocab_size:
                raise ValueError(f"{role} id {given} is outside the vocabulary of {self.vocab_size}")
            return given
        candidates = names if given is None else (given,)
        found = [i for i in map(self.tokenizer.token_to_id, candidates) if i is not None]
        if found:
            return found[0]
        if given is None and default is not None:
            return default
        specials = sorted(t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special)
        raise ValueError(f"{self.path}: no {role} token {given or ' / '.join(names)}; its special tokens "
                         f"are {specials}; give {role}= a token or an id")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(unframe(ids, self.bos_id, self.eos_id), skip_special_tokens=True)


def bpe(path: str) -> HFTokenizer:
    """A BPE tokenizer trained by ``cfkit tokenizer train`` (``cfkit.tokenizers.train_bpe``)."""
    return HFTokenizer(path, bos=BPE_BOS, eos=BPE_EOS, pad=BPE_PAD)


class OpenCLIPTokenizer:
    """open_clip's CLIP BPE (lower-cased, 49,408 ids); start/end of text as bos/eos, pad 0 as
    ``open_clip.tokenize`` pads."""

    pad_id = 0

    def __init__(self):
        try:  # a slow import, needed by this tokenizer only
            from open_clip.tokenizer import SimpleTokenizer
        except (ImportError, RuntimeError) as error:  # e.g. a torchvision built for another torch
            raise ValueError(f"open-clip: open_clip is installed but does not import: {error}") from None
        self.tokenizer = SimpleTokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        self.bos_id, self.eos_id = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(unframe(ids, self.bos_id, self.eos_id)).strip()


@hookimpl
def register_text_tokenizers(register):
    register("bytes", ByteTokenizer)
    register("hf", HFTokenizer)
    register("bpe", bpe)
    # find_spec, not import: importing open_clip (torchvision, timm) would slow every registry build.
    if find_spec("open_clip") is not None:
        register("open-clip", OpenCLIPTokenizer)
