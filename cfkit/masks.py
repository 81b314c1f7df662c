"""The generalised causal mask: one rule, three products.

Every token of the training sequence has a kind (condition, clean, noisy), the AR step it
belongs to and, for noisy tokens, the noised copy it belongs to. ``may_attend`` is the single
rule of who sees whom; the dense mask (reference layout), the batched per-sample masks and
the FlexAttention ``mask_mod``/BlockMask are all evaluations of it.

Official layout: ``[cond (C) | clean tokens of steps 1..S-1 | noisy tokens of steps 1..S]``;
with K noised copies the noisy block is repeated K times, all copies sharing one clean context.
Masks are boolean with True = may attend (the reference stores the opposite).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from cfkit.schedules import check_step_sizes, step_index

COND, CLEAN, NOISY = 0, 1, 2
BLOCK_MASK_CACHE = 32  # BlockMasks kept (``Layout.block_mask``)
_BLOCK_MASKS: OrderedDict = OrderedDict()


def may_attend(q_kind, q_step, q_copy, k_kind, k_step, k_copy):
    """The rule, elementwise over broadcastable tensors.

    Every token sees the condition tokens; condition tokens see only them. A clean token of
    step s sees clean tokens of steps <= s. A noisy token of step s sees clean tokens of
    steps < s and the noisy tokens of step s in its own copy.

    Written as two comparisons of per-token keys so that, for a dense (T, T) mask, all the
    case analysis happens on the T tokens and only two compares run on T x T: a key is seen
    when its clean rank is within the query's clean horizon, or when it is a noisy token of
    the query's own (step, copy) group.
    """
    return (_clean_rank(k_kind, k_step) <= _clean_horizon(q_kind, q_step)) | (
        _noisy_group(k_kind, k_step, k_copy, absent=-1)
        == _noisy_group(q_kind, q_step, q_copy, absent=-2)
    )


_NEVER = 2**62


def _clean_rank(kind, step):
    """Condition keys -2 (seen by all), clean keys their step, noisy keys never."""
    return torch.where(kind == COND, -2, torch.where(kind == CLEAN, step, _NEVER))


def _clean_horizon(kind, step):
    """The last clean step a query sees: condition -1 (none), clean s, noisy s - 1."""
    return torch.where(kind == COND, -1, torch.where(kind == CLEAN, step, step - 1))


def _noisy_group(kind, step, copy, absent: int):
    """(step, copy) of a noisy token as one integer; ``absent`` for other tokens."""
    return torch.where(kind == NOISY, step * 2**20 + copy, absent)


@dataclass(frozen=True)
class Layout:
    """Per-token attributes of a sequence, each ``(..., T)`` long: kind, AR step, copy."""

    kind: torch.Tensor
    step: torch.Tensor
    copy: torch.Tensor

    @property
    def length(self) -> int:
        return self.kind.shape[-1]

    def __getitem__(self, index) -> Layout:
        """The sub-layout of the token positions ``index`` (a slice along T)."""
        return Layout(self.kind[..., index], self.step[..., index], self.copy[..., index])

    def dense(self, keys: Layout | None = None) -> torch.Tensor:
        """``(..., T, T_keys)`` bool, True = may attend; keys default to the queries."""
        keys = self if keys is None else keys
        q = (self.kind.unsqueeze(-1), self.step.unsqueeze(-1), self.copy.unsqueeze(-1))
        k = (keys.kind.unsqueeze(-2), keys.step.unsqueeze(-2), keys.copy.unsqueeze(-2))
        return may_attend(*q, *k)

    def mask_mod(self):
        """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` over a batched layout ``(B, T)``."""
        kind, step, copy = self.kind, self.step, self.copy

        def mod(b, h, q_idx, kv_idx):
            return may_attend(
                kind[b, q_idx], step[b, q_idx], copy[b, q_idx],
                kind[b, kv_idx], step[b, kv_idx], copy[b, kv_idx],
            )

        return mod

    def block_mask(self, block_size: int = 128, device=None):
        """A FlexAttention BlockMask for a batched layout ``(B, T)`` on ``device`` (default the
        layout's). Building one evaluates the rule over every block, so the last
        ``BLOCK_MASK_CACHE`` are kept, keyed by the layout's values: a plan of the same split
        and copies (any order, any noise) reuses its mask."""
        from torch.nn.attention.flex_attention import create_block_mask

        device = torch.device(device) if device is not None else self.kind.device
        key = (str(device), block_size, self.digest())
        mask = _BLOCK_MASKS.pop(key, None)
        if mask is None:
            layout = self.to(device)
            batch, length = self.kind.shape
            mask = create_block_mask(layout.mask_mod(), batch, None, length, length,
                                     device=device, BLOCK_SIZE=block_size)
        _BLOCK_MASKS[key] = mask  # the most recently used last
        while len(_BLOCK_MASKS) > BLOCK_MASK_CACHE:
            _BLOCK_MASKS.popitem(last=False)
        return mask

    def digest(self) -> str:
        """A hash of the layout's shape and values."""
        h = hashlib.blake2b(digest_size=16)
        for values in (self.kind, self.step, self.copy):
            h.update(str(tuple(values.shape)).encode())
            h.update(values.detach().to("cpu", torch.long).contiguous().numpy().tobytes())
        return h.hexdigest()

    def to(self, device) -> Layout:
        return Layout(self.kind.to(device), self.step.to(device), self.copy.to(device))


def batch_layout(cond_len: int, step: torch.Tensor, copies: int = 1, clean_len=None) -> Layout:
    """Layout for per-position steps ``(B, L)``: cond, the first ``clean_len`` clean tokens
    (default: all but the last step's, which needs the split shared by the batch), then
    ``copies`` noisy blocks of L tokens. Returns ``(B, T)`` attributes."""
    batch, num_tokens = step.shape
    if clean_len is None:
        last = step[:, -1:]
        shared = bool((step == step[:1]).all())
        if not shared:
            raise ValueError("per-sample splits need an explicit clean_len (e.g. L)")
        clean_len = num_tokens - int((step[0] == last[0]).sum())

    def block(kind, steps, copy):
        return kind * torch.ones_like(steps), steps, copy * torch.ones_like(steps)

    cond = torch.zeros(batch, cond_len, dtype=torch.long)
    parts = [(cond, cond - 1, cond - 1), block(CLEAN, step[:, :clean_len], -1)]
    parts += [block(NOISY, step, c) for c in range(copies)]
    return Layout(*(torch.cat([p[i] for p in parts], dim=1) for i in range(3)))


def multimodal_layout(cond_len: int, step: torch.Tensor, text_len: int, text_first,
                      copies: int = 1) -> Layout:
    """Layout ``(B, T)`` of ``[cond | text (text_len) | clean (all L) | noisy x copies]`` for
    image steps ``(B, L)`` and a caption per sample, with ``T = cond_len + text_len + (1 +
    copies) L``. The rule needs no text case: a text token is a clean token of an AR step of
    its own, so text is causal. ``text_first`` ``(B,)`` bool puts a sample's text steps
    before its image steps (text-to-image: the image sees the caption) or after them
    (captioning: the caption sees every clean image token, never a noisy one). All L clean
    tokens are kept so that a caption after the image sees the whole image."""
    batch, num_tokens = step.shape
    first = torch.as_tensor(text_first, dtype=torch.bool).reshape(-1, 1).expand(batch, 1)
    position = torch.arange(text_len).expand(batch, -1)
    text_step = torch.where(first, position, num_tokens + position)
    image = batch_layout(cond_len, step + torch.where(first, text_len, 0), copies, num_tokens)
    text = Layout(torch.full_like(text_step, CLEAN), text_step, torch.full_like(text_step, -1))
    parts = (image[:cond_len], text, image[cond_len:])
    return Layout(*(torch.cat([getattr(p, name) for p in parts], dim=1)
                    for name in ("kind", "step", "copy")))


def sequence_layout(cond_len: int, step_sizes, copies: int = 1) -> Layout:
    """Layout ``(T,)`` of the official sequence for one split given by ``step_sizes``."""
    sizes = torch.as_tensor(step_sizes, dtype=torch.long)
    step = step_index(check_step_sizes(sizes, int(sizes.sum()))).unsqueeze(0)
    layout = batch_layout(cond_len, step, copies)
    return Layout(layout.kind[0], layout.step[0], layout.copy[0])


def generalized_causal_mask(cond_len: int, step_sizes, copies: int = 1) -> torch.Tensor:
    """Dense ``(T, T)`` bool mask (True = may attend) in the reference layout, with
    ``T = cond_len + (L - step_sizes[-1]) + copies * L``."""
    return sequence_layout(cond_len, step_sizes, copies).dense()


KIND_LETTERS = {COND: "C", CLEAN: "c", NOISY: "n"}  # the heads of a drawn mask's rows and columns


def draw(layout: Layout) -> list[str]:
    """One sample's layout ``(T,)`` as text lines: a legend, then its dense mask (row: query,
    column: key; ``#`` = may attend), each row and column headed by its token's kind and
    ``|`` / ``-`` rules where a block of condition, clean or noisy tokens (a noised copy) begins."""
    kinds, copies = layout.kind.tolist(), layout.copy.tolist()
    starts = {i for i in range(1, len(kinds)) if (kinds[i], copies[i]) != (kinds[i - 1], copies[i - 1])}
    letters = [KIND_LETTERS[k] for k in kinds]

    def row(head: str, cells: list[str], rule: str = "|") -> str:
        return f"{head} " + "".join((rule if j in starts else "") + cell for j, cell in enumerate(cells))

    lines = ["row: query, column: key, # = may attend; C condition, c clean, n noisy tokens; "
             "| and - where each block begins", row(" ", letters)]
    for i, allowed in enumerate(layout.dense().tolist()):
        if i in starts:
            lines.append(row(" ", ["-"] * len(kinds), "+"))
        lines.append(row(letters[i], ["#" if a else "." for a in allowed]))
    return lines
