"""Captioning: next-token decoding of a caption after a given image, over a KV cache.

The condition tokens and the image's tokens (one AR step of clean tokens) go into the cache
first; the caption then grows from bos one id at a time, each new id run against the cache
(``MultimodalTransformer.push_text``). Greedy decoding takes the most likely id; sampling
draws from the ``top_k`` most likely ids and/or the smallest ``top_p`` nucleus (after
``temperature``); beam search keeps the ``beams`` most likely captions of each image (sum of
log-probabilities), moving the cache rows with their beams. Every caption comes back framed,
``[bos, ids..., eos, pad...]`` of ``max_text_len`` ids (eos forced at the last position).
"""

from __future__ import annotations

import math

import torch


class CaptioningError(ValueError):
    """Decoding options that cannot work; the message says what is allowed."""


def check_decoding(top_k: int | None, top_p: float | None, temperature: float, beams: int) -> None:
    if beams < 1:
        raise CaptioningError(f"beams must be >= 1, got {beams}")
    if beams > 1 and (top_k is not None or top_p is not None):
        raise CaptioningError("beam search is deterministic: give beams or top_k/top_p, not both")
    if top_k is not None and top_k < 1:
        raise CaptioningError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise CaptioningError(f"top_p must be in (0, 1], got {top_p}")
    if temperature <= 0:
        raise CaptioningError(f"temperature must be > 0, got {temperature}")


@torch.no_grad()
def caption(model, tokens: torch.Tensor, tokenizer, *, top_k: int | None = None,
            top_p: float | None = None, temperature: float = 1.0, beams: int = 1,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Framed caption ids ``(N, max_text_len)`` of images given as tokens ``(N, L, d)`` in
    raster order: greedy by default, sampled with ``top_k`` / ``top_p`` (from
    ``generator``), or beam search with ``beams`` > 1."""
    check_decoding(top_k, top_p, temperature, beams)
    cache = model.new_cache()
    model.push_image(cache, tokens)
    if beams > 1:
        return _beam_search(model, cache, len(tokens), tokenizer, beams)
    sampling = top_k is not None or top_p is not None
    n = len(tokens)
    ids = torch.full((n, 1), tokenizer.bos_id, dtype=torch.long, device=tokens.device)
    finished = torch.zeros(n, dtype=torch.bool, device=tokens.device)
    for position in range(1, model.max_text_len):
        if position == model.max_text_len - 1:
            chosen = torch.full_like(finished, tokenizer.eos_id, dtype=torch.long)
        else:
            logits = model.push_text(cache, ids[:, -1:], position - 1)[:, -1].float()
            chosen = (sample(logits, top_k, top_p, temperature, generator) if sampling
                      else logits.argmax(-1))
        chosen = torch.where(finished, tokenizer.pad_id, chosen)
        finished |= chosen == tokenizer.eos_id
        ids = torch.cat([ids, chosen[:, None]], dim=1)
        if bool(finished.all()):
            break
    return _pad(ids, model.max_text_len, tokenizer.pad_id)


def sample(logits: torch.Tensor, top_k: int | None, top_p: float | None, temperature: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row ``(N,)`` drawn from logits ``(N, V)`` restricted to the ``top_k`` ids
    and to the smallest set of ids whose probability reaches ``top_p`` (the most likely id is
    always kept)."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None:
        ranked, index = logits.sort(dim=-1, descending=True)
        probs = ranked.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before this id already reaches p
        logits = logits.masked_fill(outside.scatter(1, index, outside), -math.inf)
    probs = logits.softmax(-1).cpu()  # drawn on the CPU so a seed gives the same ids everywhere
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


def _beam_search(model, cache, n: int, tokenizer, beams: int) -> torch.Tensor:
    device = cache.keys[0].device
    rows = torch.arange(n, device=device).repeat_interleave(beams)
    cache = cache.select(rows)
    ids = torch.full((n * beams, 1), tokenizer.bos_id, dtype=torch.long, device=device)
    scores = torch.zeros(n, beams, device=device)
    scores[:, 1:] = -math.inf  # every beam starts as the same bos: expand the first only
    finished = torch.zeros(n * beams, dtype=torch.bool, device=device)
    for position in range(1, model.max_text_len - 1):
        logp = model.push_text(cache, ids[:, -1:], position - 1)[:, -1].float().log_softmax(-1)
        # a finished caption goes on with pad at no cost
        logp[finished] = -math.inf
        logp[finished, tokenizer.pad_id] = 0
        vocab = logp.shape[-1]
        total = (scores.reshape(-1, 1) + logp).reshape(n, beams * vocab)
        scores, best = total.topk(beams, dim=-1)
        parents = (torch.arange(n, device=device)[:, None] * beams + best // vocab).reshape(-1)
        chosen = (best % vocab).reshape(-1)
        ids = torch.cat([ids[parents], chosen[:, None]], dim=1)
        finished = finished[parents] | (chosen == tokenizer.eos_id)
        if bool(finished.all()):
            break
        cache = cache.select(parents)
    winners = torch.arange(n, device=device) * beams + scores.argmax(-1)
    ids, finished = ids[winners], finished[winners]
    if not bool(finished.all()):  # the last position ends every unfinished caption
        ids = torch.cat([ids, torch.where(finished, tokenizer.pad_id, tokenizer.eos_id)[:, None]], 1)
    return _pad(ids, model.max_text_len, tokenizer.pad_id)


def _pad(ids: torch.Tensor, length: int, pad_id: int) -> torch.Tensor:
    return torch.cat([ids, ids.new_full((len(ids), length - ids.shape[1]), pad_id)], dim=1)
