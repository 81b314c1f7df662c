"""Multimodal CausalFusion: captions and images in one decoder-only sequence.

Training sequence: ``[cond | text (max_text_len) | clean image (L) | noisy image (K L)]``
(``cfkit.masks.multimodal_layout``). A text token is a clean token of an AR step of its own,
so the generalised causal mask needs no new case: text is causal, and its steps come before
the image's (text-to-image: every image token sees the caption) or after them (captioning:
the caption sees the image's clean tokens, never its noisy ones). Text tokens carry a
learnable text position embedding; images the image position embedding, as before.

Captions are framed ``[bos, ids..., eos, pad...]`` to ``max_text_len`` ids
(``cfkit.tokenizers.frame``); the null caption of classifier-free guidance (caption dropout)
is all pad. Text gets a next-token cross-entropy loss (``caption_loss``), images the
dual-factorised diffusion loss. The condition tokens (one by default) hold a single learned
class: a start-of-sequence token every token sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cfkit.masks import Layout, multimodal_layout
from cfkit.methods import CAUSAL_GENERATION, TEXT_CONDITIONING, Batch
from cfkit.tokenizers import frame
from cfkit.transformer import CausalTransformer, KVCache, TransformerConfig, patchify

# [model] options of a multimodal network beyond TransformerConfig's, with their defaults.
TEXT_OPTIONS = {"max_text_len": 35}
# The image backbone's defaults: one condition token of one class, no label dropout.
START_TOKEN = {"num_classes": 1, "cond_tokens": 1, "class_dropout": 0.0}


class TextEmbedder(nn.Module):
    """Caption ids -> tokens: a token table plus a learnable text position embedding."""

    def __init__(self, vocab_size: int, hidden_size: int, max_text_len: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_text_len, hidden_size))
        nn.init.normal_(self.table.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``ids`` ``(N, n)`` at text positions ``start..start+n-1`` -> ``(N, n, D)``."""
        return self.table(ids) + self.pos_embed[:, start:start + ids.shape[1]]


class TextHead(nn.Module):
    """LayerNorm then a linear map to next-token logits; zero-initialised like the image
    output layer, so training starts from the uniform distribution."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, vocab_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class MultimodalTransformer(CausalTransformer):
    """The causal diffusion transformer with caption tokens in its sequence and a text head."""

    capabilities = frozenset({CAUSAL_GENERATION, TEXT_CONDITIONING})

    def __init__(self, config: TransformerConfig, vocab_size: int, max_text_len: int = 35,
                 pad_id: int = 0):
        super().__init__(check_network(config, max_text_len))
        self.vocab_size, self.max_text_len, self.pad_id = vocab_size, max_text_len, pad_id
        self.text_embedder = TextEmbedder(vocab_size, config.hidden_size, max_text_len)
        self.text_head = TextHead(config.hidden_size, vocab_size)

    @property
    def null_label(self) -> int:
        """The null caption of CFG is all pad."""
        return self.pad_id

    def check_text(self, text) -> torch.Tensor:
        """Framed caption ids as a LongTensor ``(N, max_text_len)`` inside the vocabulary."""
        text = torch.as_tensor(text, dtype=torch.long)
        if text.dim() != 2 or text.shape[0] == 0 or text.shape[1] != self.max_text_len:
            raise ValueError(f"captions must be framed ids (N, {self.max_text_len}) with N >= 1, "
                             f"got shape {tuple(text.shape)}")
        if bool(((text < 0) | (text >= self.vocab_size)).any()):
            raise ValueError(f"caption ids must be in 0..{self.vocab_size - 1}")
        return text

    # -- pieces of the sequence ------------------------------------------------------------
    def start(self, n: int) -> torch.Tensor:
        """The condition tokens ``(n, C, D)``: the start-of-sequence class."""
        return self.condition(torch.zeros(n, dtype=torch.long, device=self.pos_embed.device))

    def image_context(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Image tokens ``(N, n, d)`` at raster ``positions`` that later tokens attend to:
        CausalFusion's clean tokens."""
        return self.embed(tokens, positions)

    # -- training forward ------------------------------------------------------------------
    def forward(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                text: torch.Tensor, plan, text_first: torch.Tensor):
        """``(image prediction (N, K, L, d) in generation order, text logits (N, n, V))``.

        As ``CausalTransformer.forward`` with caption ids ``text`` ``(N, n <= max_text_len)``
        in place of class labels and ``text_first`` ``(N,)`` bool: the caption precedes
        (text-to-image) or follows (captioning) the image. The logits at text position i
        predict the id at i + 1.
        """
        config = self.config
        n, copies, length, _ = x_t.shape
        text_len = text.shape[1]
        order = plan.order.to(x_start.device)
        clean = torch.gather(x_start, 1, order[..., None].expand(-1, -1, x_start.shape[-1]))
        noisy = self.embed(x_t.reshape(n, copies * length, -1), order.repeat(1, copies))
        noisy = noisy + self.timestep_embedder(t.reshape(n, copies * length))
        pieces = [self.start(n), self.text_embedder(text), self.image_context(clean, order), noisy]
        layout = multimodal_layout(config.cond_len, plan.step, text_len, text_first.cpu(), copies)
        context_len = config.cond_len + text_len + length
        x = self.run(torch.cat(pieces, dim=1),
                     self.attention_mask(layout.to(x_start.device), context_len, copies))
        image = self.final_layer(x[:, context_len:]).reshape(n, copies, length, -1)
        return image, self.text_head(x[:, config.cond_len:config.cond_len + text_len])

    # -- KV-cached inference ---------------------------------------------------------------
    def push_condition(self, cache: KVCache, text: torch.Tensor) -> None:
        """Put the condition tokens and the caption ``text`` ``(N, max_text_len)`` into
        ``cache``: the prefix of text-to-image generation."""
        layout = multimodal_layout(self.config.cond_len, torch.zeros(1, 0, dtype=torch.long),
                                   text.shape[1], True, copies=0)
        x = torch.cat([self.start(text.shape[0]), self.text_embedder(text)], dim=1)
        self.run(x, self._prefix_mask(layout, cache), cache, update_cache=True)

    def push_clean(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        self.run(self.image_context(tokens, positions), cache=cache, update_cache=True)

    def hidden_states(self, latents: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        """As ``CausalTransformer.hidden_states``, after the null caption (there are no
        classes: ``labels`` must be None)."""
        if labels is not None:
            raise ValueError("a multimodal network has no classes: its features are unconditional")
        tokens = patchify(latents, self.config.patch_size)
        n, length, _ = tokens.shape
        cache = self.new_cache()
        self.push_condition(cache, torch.full((n, self.max_text_len), self.pad_id, device=tokens.device))
        positions = torch.arange(length, device=tokens.device).expand(n, -1)
        return self.step_hidden_states(cache, tokens, positions, t)

    def push_image(self, cache: KVCache, tokens: torch.Tensor) -> None:
        """Put the condition tokens and a whole image's tokens ``(N, L, d)`` (raster, one AR
        step) into ``cache``: the prefix of captioning."""
        n, length, _ = tokens.shape
        positions = torch.arange(length, device=tokens.device).expand(n, -1)
        layout = multimodal_layout(self.config.cond_len, torch.zeros(1, length, dtype=torch.long),
                                   0, False, copies=0)
        x = torch.cat([self.start(n), self.image_context(tokens, positions)], dim=1)
        self.run(x, self._prefix_mask(layout, cache), cache, update_cache=True)

    def push_text(self, cache: KVCache, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Put caption ids ``(N, n)`` at text positions ``start..`` into ``cache`` (each sees
        the cache and the ids before it); returns their next-token logits ``(N, n, V)``."""
        layout = multimodal_layout(0, torch.zeros(1, 0, dtype=torch.long), ids.shape[1], True, 0)
        x = self.run(self.text_embedder(ids, start), self._prefix_mask(layout, cache), cache,
                     update_cache=True)
        return self.text_head(x)

    def _prefix_mask(self, layout: Layout, cache: KVCache) -> torch.Tensor:
        """``(1, 1, T, cache + T)``: the cache holds only tokens that every later token sees;
        the T new tokens of ``layout`` ``(1, T)`` see each other by the rule."""
        new = layout.dense().to(self.pos_embed.device)
        seen = torch.ones(*new.shape[:-1], cache.length, dtype=torch.bool, device=new.device)
        return torch.cat([seen, new], dim=-1).unsqueeze(1)


def check_network(config: TransformerConfig, max_text_len: int) -> TransformerConfig:
    """``config`` when it can carry text of ``max_text_len`` ids, else a ValueError."""
    if config.timestep != "add":
        raise ValueError(f"timestep {config.timestep!r}: a multimodal network adds t to the "
                         "noisy tokens; allowed: add")
    if not isinstance(max_text_len, int) or max_text_len < 2:
        raise ValueError(f"max_text_len must be an int >= 2 (bos and eos), got {max_text_len!r}")
    return config


def split_model_options(options: dict) -> tuple[dict, dict]:
    """A multimodal ``[model]`` table -> (image backbone options with the start-token
    defaults, text options with their defaults)."""
    options = dict(options)
    text = {name: options.pop(name, default) for name, default in TEXT_OPTIONS.items()}
    return {**START_TOKEN, **options}, text


def choose_captions(batch: Batch, generator: torch.Generator | None = None) -> list[str]:
    """One of each row's captions, uniformly, drawn for the global batch (so that any number
    of processes draws the same, as every draw of a method's loss)."""
    if batch.captions is None or any(not captions for captions in batch.captions):
        raise ValueError("this method trains on image + caption data: every sample needs "
                         "captions (shards with a json captions list, e.g. dataset shapes)")
    u = torch.rand(batch.total, generator=generator)[batch.rows]
    return [captions[int(v * len(captions))] for v, captions in zip(u.tolist(), batch.captions,
                                                                     strict=True)]


def frame_captions(tokenizer, captions: list[str], length: int) -> torch.Tensor:
    """Framed ids ``(N, length)`` of ``captions`` (``[bos, ids, eos, pad...]``, truncated)."""
    return torch.tensor([frame(tokenizer, caption, length) for caption in captions], dtype=torch.long)


def caption_loss(logits: torch.Tensor, text: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per-caption mean next-token cross-entropy ``(N,)`` of logits ``(N, n, V)`` for framed
    ids ``(N, n)``: the targets are the ids after bos up to and including the first eos."""
    targets = text[:, 1:]
    is_eos = (targets == eos_id).long()
    valid = (is_eos.cumsum(1) - is_eos) == 0  # no eos before the target
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return (losses * valid).sum(1) / valid.sum(1).clamp(min=1)
