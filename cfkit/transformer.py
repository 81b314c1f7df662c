"""The causal diffusion transformer: a decoder-only transformer with in-context conditioning.

One sequence holds condition (class) tokens, clean tokens of earlier AR steps and noisy
tokens; who sees whom is the generalised causal mask of ``cfkit.masks``. The same network
serves CausalFusion (any S), In-context DiT (S = 1) and, through its KV cache, generation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import nn
from torch.utils.checkpoint import checkpoint

from cfkit import precision
from cfkit.masks import CLEAN, NOISY, Layout
from cfkit.methods import CAUSAL_GENERATION
from cfkit.plugins import typed

ATTENTION_BACKENDS = ("sdpa", "flex", "eager")

# Allowed values of config fields, as annotations: ``cfkit.plugins.typed`` checks them where a
# ``[model]`` table is read (and rejects NaN and infinity).
Count = Annotated[int, Ge(1)]
Ratio = Annotated[float, Gt(0)]
Probability = Annotated[float, Interval(ge=0, le=1)]


@dataclass(frozen=True)
class TokenGrid:
    """The fields a network of a square token grid has (CausalFusion's transformer, DiT) and
    what follows from them; the annotations are the allowed values."""

    input_size: Count = 8  # latent grid side
    patch_size: Count = 1
    latent_channels: Count = 4
    hidden_size: Count = 256
    depth: Count = 6
    num_heads: Count = 4
    mlp_ratio: Ratio = 4.0
    num_classes: Count = 10
    class_dropout: Probability = 0.1

    @property
    def grid(self) -> tuple[int, int]:
        side = self.input_size // self.patch_size
        return side, side

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def token_dim(self) -> int:
        return self.patch_size**2 * self.latent_channels

    def check_grid(self, sincos: bool) -> None:
        """ValueError unless the fields fit together (``sincos``: a sincos position embedding)."""
        check_divides("patch_size", self.patch_size, "input_size", self.input_size)
        check_divides("num_heads", self.num_heads, "hidden_size", self.hidden_size)
        if sincos and self.hidden_size % 4:
            raise ValueError("sincos position embedding needs hidden_size divisible by 4")


@dataclass(frozen=True)
class TransformerConfig(TokenGrid):
    """Architecture of the causal diffusion transformer (the annotations are the allowed values)."""

    cond_tokens: Count = 4  # distinct class tokens
    cond_repeat: Count = 1  # "4 tokens repeated 16x": cond length = cond_tokens * cond_repeat
    pos_embed: Literal["sincos", "learned"] = "sincos"
    qk_norm: bool = True
    timestep: Literal["add", "token"] = "add"
    attention: Literal["sdpa", "flex", "eager"] = "sdpa"  # eager: the reference's kernels

    @property
    def cond_len(self) -> int:
        return self.cond_tokens * self.cond_repeat

    def check(self) -> TransformerConfig:
        """``self`` when its fields fit together, else a ValueError saying how."""
        self.check_grid(sincos=self.pos_embed == "sincos")
        if self.attention not in ATTENTION_BACKENDS:
            allowed = ", ".join(ATTENTION_BACKENDS)
            raise ValueError(f"unknown attention {self.attention!r}; allowed: {allowed}")
        return self


# The official system presets (the constructors of the reference), then small CPU presets.
PRESETS: dict[str, dict] = {
    "CausalFusion-L": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=1,
                           latent_channels=16, cond_tokens=64, pos_embed="learned"),
    "CausalFusion-XL": dict(hidden_size=1280, depth=32, num_heads=20, patch_size=1,
                            latent_channels=16, cond_tokens=64, pos_embed="learned"),
    "CausalFusion-H": dict(hidden_size=1408, depth=48, num_heads=22, patch_size=1,
                           latent_channels=16, cond_tokens=64, pos_embed="learned"),
    "CausalFusion-S": dict(hidden_size=384, depth=12, num_heads=6, cond_tokens=4),
    "CausalFusion-tiny": dict(hidden_size=128, depth=4, num_heads=4, cond_tokens=4),
}


def check_divides(part: str, part_value: int, whole: str, whole_value: int) -> None:
    """A ValueError unless ``part_value`` divides ``whole_value`` (both config fields)."""
    if whole_value % part_value:
        example = whole_value - whole_value % part_value or part_value
        raise ValueError(f"{part} {part_value} does not divide {whole} {whole_value}; allowed: "
                         f"{whole} a multiple of {part} (e.g. {example}) or {part} a divisor of "
                         f"{whole_value}")


def grid_config(cls: type, presets: dict[str, dict], model_options: dict):
    """A network config ``cls`` (a ``TokenGrid``: ``TransformerConfig``, DiT's) from a
    ``[model]`` table: an optional ``preset`` (a key of ``presets``) plus fields, typed and
    checked."""
    options = dict(model_options)
    name = options.pop("preset", None)
    fields = sorted(cls.__dataclass_fields__)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; allowed: preset, {', '.join(fields)}")
    if name is not None and name not in presets:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(presets)}")
    return typed(cls, {**presets.get(name, {}), **options}, "model").check()


def preset(name: str, **overrides) -> TransformerConfig:
    """The preset ``name`` with fields ``overrides``, checked as a ``[model]`` table."""
    return grid_config(TransformerConfig, PRESETS, {"preset": name, **overrides})


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Latents ``(N, C, H, W)`` -> tokens ``(N, L, p*p*C)``, raster over the patch grid."""
    n, c, h, w = x.shape
    p = patch_size
    x = x.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Tokens ``(N, L, p*p*C)`` raster -> latents ``(N, C, H, W)``."""
    n, length, _ = tokens.shape
    side = math.isqrt(length)
    p = patch_size
    x = tokens.reshape(n, side, side, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, side * p, side * p)


def sincos_pos_embed(dim: int, side: int) -> np.ndarray:
    """2-D sin-cos position embedding ``(side*side, dim)``: first half encodes the row."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))
    return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)


class TimestepEmbedder(nn.Module):
    """Diffusion timestep -> vector: sinusoidal features then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        args = t[..., None].float() * freqs.to(t.device)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` ``(...)`` -> ``(..., D)``."""
        return self.mlp(self.frequencies(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class ClassEmbedder(nn.Module):
    """Class label -> ``cond_tokens`` condition tokens; index ``num_classes`` is the null class."""

    def __init__(self, num_classes: int, hidden_size: int, cond_tokens: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.cond_tokens = cond_tokens
        self.dropout = dropout
        self.table = nn.Embedding(num_classes + int(dropout > 0), hidden_size * cond_tokens)

    @property
    def null_class(self) -> int | None:
        """The null class (``num_classes``) when the table has one (trained with dropout), else None."""
        return self.num_classes if self.table.num_embeddings > self.num_classes else None

    def drop(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace labels by the null class with probability ``dropout`` (for CFG)."""
        u = torch.rand(labels.shape, generator=generator).to(labels.device)
        return torch.where(u < self.dropout, self.num_classes, labels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """``(N,)`` -> ``(N, cond_tokens, D)``."""
        return self.table(labels).reshape(labels.shape[0], self.cond_tokens, -1)


class Attention(nn.Module):
    """Multi-head self-attention with QK-norm and three interchangeable backends; the qkv
    projection has no bias unless ``qkv_bias`` (DiT's has one)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, backend: str, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, mask=None, cache: KVCache | None = None, layer: int = 0,
                update_cache: bool = False, noisy_only: bool = False) -> torch.Tensor:
        """``x`` ``(N, T, D)``; ``mask`` a bool ``(N|1, 1, T, T)`` (True = attend), a
        BlockMask (flex), a SplitMask (sdpa) or None (full attention, e.g. against a KV
        cache). ``noisy_only`` (with a SplitMask): the output of the noisy tokens only,
        ``(N, T - Tc, D)``."""
        n, length, _ = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, T, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            k, v = cache.extend(layer, k, v, update_cache)
        if noisy_only:
            out = split_attend(q, k, v, mask, context=False)
        else:
            out = attend(q, k, v, mask, self.backend)
        return self.proj(out.transpose(1, 2).reshape(n, out.shape[2], -1))


@dataclass(frozen=True)
class SplitMask:
    """The generalised causal mask of ``[context | K noisy copies of L tokens]`` in two dense
    pieces: context-to-context ``(B|1, Tc, Tc)`` and copy-to-(context + same copy)
    ``(B|1, L, Tc + L)``. The rule never lets context see noisy tokens nor a copy see another,
    so attention runs without the (K L)^2 block that a dense mask would still compute."""

    context: torch.Tensor
    noisy: torch.Tensor
    copies: int

    @classmethod
    def from_layout(cls, layout: Layout, context_len: int, copies: int) -> SplitMask:
        length = (layout.length - context_len) // copies
        context = layout[:context_len]
        first_copy = layout[: context_len + length]
        noisy = first_copy[context_len:].dense(first_copy)
        return cls(_one_if_shared(context.dense()), _one_if_shared(noisy), copies)


def _one_if_shared(mask: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` -> ``(1, ...)`` when every sample has the same mask (one split per batch)."""
    return mask[:1] if bool((mask == mask[:1]).all()) else mask


def split_attend(q, k, v, mask: SplitMask, context: bool = True) -> torch.Tensor:
    """Attention of ``[context | copies]`` queries ``(N, H, T, Dh)`` under ``mask``; without
    ``context``, of the noisy queries only ``(N, H, T - Tc, Dh)``."""
    n, heads, length, dim = q.shape
    ctx, copies = mask.context.shape[-1], mask.copies
    size = (length - ctx) // copies

    def per_copy(x):  # (N, H, K*L, Dh) -> (N*K, H, L, Dh)
        return x.reshape(n, heads, copies, size, dim).transpose(1, 2).reshape(-1, heads, size, dim)

    def with_context(full):  # keys/values of the context followed by those of each copy
        if copies == 1:  # already so laid out: no copy
            return full
        shared = full[:, None, :, :ctx].expand(-1, copies, -1, -1, -1).reshape(n * copies, heads, ctx, dim)
        return torch.cat([shared, per_copy(full[:, :, ctx:])], dim=2)

    noisy_mask = mask.noisy.repeat_interleave(copies, 0) if mask.noisy.shape[0] > 1 else mask.noisy
    out = F.scaled_dot_product_attention(
        per_copy(q[:, :, ctx:]), with_context(k), with_context(v), attn_mask=noisy_mask.unsqueeze(1)
    )
    out = out.reshape(n, copies, heads, size, dim).transpose(1, 2).reshape(n, heads, -1, dim)
    if not context:
        return out
    out_ctx = F.scaled_dot_product_attention(
        q[:, :, :ctx], k[:, :, :ctx], v[:, :, :ctx], attn_mask=mask.context.unsqueeze(1)
    )
    return torch.cat([out_ctx, out], dim=2)


def attend(q, k, v, mask, backend: str) -> torch.Tensor:
    if isinstance(mask, SplitMask):
        return split_attend(q, k, v, mask)
    if backend == "eager":
        # The reference's way: dense additive -inf mask and an explicit softmax, in fp32 or not.
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1) @ v
    if backend == "flex" and mask is not None and not isinstance(mask, torch.Tensor):
        return flex_attention(q.is_cuda)(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@functools.cache
def flex_attention(compiled: bool):
    """FlexAttention, compiled where it runs on CUDA: uncompiled it materialises the scores (slow
    on a GPU). On the CPU it stays eager (its compiled CPU kernel has no backward)."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False) if compiled else flex


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU; ``fused``: in CPU inference with AVX512, the
    first layer and the GELU as one kernel (``fused_linear_gelu``), else the reference's two."""

    def __init__(self, dim: int, hidden: int, fused: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.fused = fused

    def forward(self, x):
        if self.fused and fused_linear_gelu(x, self.fc1):
            # one oneDNN kernel: the GELU as the matmul's epilogue. torch's own tanh GELU ran
            # 7x slower than tanh on an AVX512 Xeon, 14% of a sampling step there.
            hidden = torch.ops.mkldnn._linear_pointwise(x, self.fc1.weight, self.fc1.bias, "gelu", [], "tanh")
        else:
            hidden = F.gelu(self.fc1(x), approximate="tanh")
        return self.fc2(hidden)


def fused_linear_gelu(x: torch.Tensor, linear: nn.Linear) -> bool:
    """Whether ``linear`` and the GELU after it run as one oneDNN kernel: CPU inference (the
    kernel has no backward) in the weights' dtype, without autocast (which would run the matmul
    in another precision), where torch has oneDNN and the CPU AVX512. With AVX2 only the fused
    kernel ran slower than MKL's matmul and a separate GELU (the blocks' forward at the issue's
    CFG batch: 0.81-0.96x on a 2-core AMD EPYC, against 1.08-1.34x on an AVX512 Xeon)."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype == linear.weight.dtype
            and x.dtype in (torch.float32, torch.bfloat16) and not torch.is_autocast_enabled("cpu")
            and linear.bias is not None and torch.backends.mkldnn.is_available()
            and precision.cpu_capability() == "AVX512")


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, config.num_heads, config.qk_norm, config.attention)
        self.norm2 = nn.LayerNorm(dim)
        # the eager backend runs the reference's kernels throughout (the benchmarks' baseline)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), fused=config.attention != "eager")

    def forward(self, x, mask=None, cache=None, layer=0, update_cache=False, noisy_only=False):
        """``x`` ``(N, T, D)`` -> ``(N, T, D)``; with ``noisy_only`` (a SplitMask) the rows of
        the noisy tokens only, ``(N, T - Tc, D)``: their keys still see the context's."""
        h = self.attn(self.norm1(x), mask, cache, layer, update_cache, noisy_only)
        if noisy_only:
            x = x[:, x.shape[1] - h.shape[1]:]
        x = x + h
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """LayerNorm then a linear map back to token values."""

    def __init__(self, dim: int, token_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, token_dim)

    def forward(self, x):
        return self.linear(self.norm(x))


class KVCache:
    """Keys and values of every layer for the tokens pushed so far, ``(N, H, T, Dh)`` each."""

    def __init__(self, depth: int):
        self.keys: list[torch.Tensor | None] = [None] * depth
        self.values: list[torch.Tensor | None] = [None] * depth

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor, update: bool):
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        if update:
            self.keys[layer], self.values[layer] = k, v
        return k, v

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache of the batch rows ``rows`` ``(M,)`` (e.g. the surviving beams of a search)."""
        out = KVCache(len(self.keys))
        out.keys = [None if k is None else k[rows] for k in self.keys]
        out.values = [None if v is None else v[rows] for v in self.values]
        return out

    def repeat(self, times: int) -> KVCache:
        """A cache with the batch repeated (e.g. to run several candidates per sample)."""
        out = KVCache(len(self.keys))
        out.keys = [None if k is None else k.repeat(times, 1, 1, 1) for k in self.keys]
        out.values = [None if v is None else v.repeat(times, 1, 1, 1) for v in self.values]
        return out


class CausalTransformer(nn.Module):
    """Decoder-only causal diffusion transformer with in-context class conditioning.
    ``grad_checkpoint``: recompute each block's activations in the backward pass (training
    only; the trainer sets it from ``train.grad_checkpoint``)."""

    capabilities = frozenset({CAUSAL_GENERATION})

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config = config.check()
        self.grad_checkpoint = False
        dim = config.hidden_size
        self.patch_embed = nn.Linear(config.token_dim, dim)
        self.timestep_embedder = TimestepEmbedder(dim)
        self.class_embedder = ClassEmbedder(
            config.num_classes, dim, config.cond_tokens, config.class_dropout
        )
        pos = torch.zeros(1, config.num_tokens, dim)
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", pos)
        self.cond_pos_embed = nn.Parameter(torch.zeros(1, config.cond_len, dim))
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.final_layer = FinalLayer(dim, config.token_dim)
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier linears, unit LayerNorms, sin-cos positions (also the start of learned
        ones), N(0, 0.02) class tokens and positions, zero output layer (as the reference)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        side = self.config.grid[0]
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed(self.config.hidden_size, side)))
        nn.init.normal_(self.class_embedder.table.weight, std=0.02)
        nn.init.normal_(self.cond_pos_embed, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- pieces of the sequence ------------------------------------------------------------
    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        """Condition tokens ``(N, C, D)``: class tokens repeated, plus their positions."""
        tokens = self.class_embedder(labels).repeat(1, self.config.cond_repeat, 1)
        return tokens + self.cond_pos_embed

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token values ``(N, n, d)`` at raster ``positions`` ``(N, n)`` -> ``(N, n, D)``."""
        pos = self.pos_embed[0][positions]
        return self.patch_embed(tokens) + pos

    def run(self, x: torch.Tensor, mask=None, cache=None, update_cache=False,
            outputs_from: int = 0) -> torch.Tensor:
        """The blocks on ``x`` ``(N, T, D)``: the last block's states of rows ``outputs_from:``.
        When those are the noisy rows of a SplitMask, the last block computes no others: the
        context rows' outputs there are read by no one (about 1/depth of the work on them)."""
        last = len(self.blocks) - 1
        skip = isinstance(mask, SplitMask) and outputs_from == mask.context.shape[-1]
        for layer, block in enumerate(self.blocks):
            noisy_only = skip and layer == last
            if self.grad_checkpoint and self.training and cache is None:
                x = checkpoint(block, x, mask, None, layer, False, noisy_only, use_reentrant=False)
            else:
                x = block(x, mask, cache, layer, update_cache, noisy_only)
        return x if skip else x[:, outputs_from:]

    def attention_mask(self, layout: Layout, context_len: int | None = None, copies: int = 1,
                       device=None):
        """The mask for ``layout`` ``(B, T)`` on ``device`` (default the layout's) in the form
        the attention backend takes: a BlockMask (flex, cached per layout), a SplitMask (sdpa on
        ``[context | copies]`` sequences) or a dense ``(B|1, 1, T, T)`` bool mask (eager, the
        reference's way)."""
        if self.config.attention == "flex":
            return layout.block_mask(device=device)
        layout = layout if device is None else layout.to(device)
        if self.config.attention == "sdpa" and context_len is not None:
            return SplitMask.from_layout(layout, context_len, copies)
        return _one_if_shared(layout.dense()).unsqueeze(1)

    # -- training forward ------------------------------------------------------------------
    def forward(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor, plan) -> torch.Tensor:
        """Prediction for every noisy token of ``plan``.

        ``x_start`` ``(N, L, d)`` clean tokens in raster order; ``x_t`` ``(N, K, L, d)`` noisy
        tokens in generation order (``plan.order``); ``t`` ``(N, K, L)`` the network
        timestep of each noisy token; ``labels`` ``(N,)`` (after any CFG dropout, which the
        method draws). Returns ``(N, K, L, d)`` in generation order.
        """
        config = self.config
        n, copies, length, _ = x_t.shape
        layout = plan.layout(config.cond_len)
        clean_len = int((layout.kind[0] == CLEAN).sum())
        order = plan.order.to(x_start.device)
        ahead = order[:, :clean_len]
        clean = torch.gather(x_start, 1, ahead[..., None].expand(-1, -1, x_start.shape[-1]))
        pieces = [self.condition(labels), self.embed(clean, ahead)]
        noisy = self.embed(x_t.reshape(n, copies * length, -1), order.repeat(1, copies))
        context_len = config.cond_len + clean_len
        if config.timestep == "add":
            pieces.append(noisy + self.timestep_embedder(t.reshape(n, copies * length)))
        else:
            pieces.append(noisy)
            t_layout, t_tokens = self._timestep_token_layout(plan, t)
            layout = _concat_layouts(layout, t_layout)
            pieces.append(self.timestep_embedder(t_tokens))
            context_len = None  # timestep tokens break the [context | copies] shape
        mask = self.attention_mask(layout, context_len, copies, x_start.device)
        x = self.run(torch.cat(pieces, dim=1), mask, outputs_from=config.cond_len + clean_len)
        out = self.final_layer(x[:, :copies * length])
        return out.reshape(n, copies, length, -1)

    def _timestep_token_layout(self, plan, t: torch.Tensor):
        """One timestep token per (copy, AR step), behaving as a noisy token of that step."""
        n, copies, _ = t.shape
        steps = plan.t.shape[2]
        step = torch.arange(steps).repeat(copies).expand(n, -1)
        copy = torch.arange(copies).repeat_interleave(steps).expand(n, -1)
        kind = torch.full_like(step, NOISY)
        return Layout(kind, step, copy), plan.t.to(t.device).reshape(n, copies * steps)

    # -- KV-cached inference ---------------------------------------------------------------
    @property
    def null_label(self) -> int | None:
        """The condition of the unconditional branch of CFG: the null class (None without one)."""
        return self.class_embedder.null_class

    def new_cache(self) -> KVCache:
        return KVCache(self.config.depth)

    def push_condition(self, cache: KVCache, labels: torch.Tensor) -> None:
        """Put the condition tokens of ``labels`` ``(N,)`` into ``cache``."""
        self.run(self.condition(labels), cache=cache, update_cache=True)

    def push_clean(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Put clean tokens ``(N, n, d)`` at raster ``positions`` ``(N, n)`` into ``cache``.
        They see the cache and each other (clean tokens of one step see their own step)."""
        self.run(self.embed(tokens, positions), cache=cache, update_cache=True)

    def forward_cached(self, cache: KVCache, x_t: torch.Tensor, positions: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:
        """Prediction ``(N, n, d)`` for noisy tokens ``x_t`` of one AR step at ``positions``,
        network timestep ``t`` ``(N,)``, attending to the cache and to each other."""
        return self.final_layer(self.step_hidden_states(cache, x_t, positions, t))

    def step_hidden_states(self, cache: KVCache, x_t: torch.Tensor, positions: torch.Tensor,
                           t: torch.Tensor) -> torch.Tensor:
        """``forward_cached`` before the output layer: last-block states ``(N, n, D)``."""
        x = self.embed(x_t, positions)
        t_embed = self.timestep_embedder(t)[:, None]
        if self.config.timestep == "add":
            return self.run(x + t_embed, cache=cache)
        return self.run(torch.cat([x, t_embed], dim=1), cache=cache)[:, :-1]

    def hidden_states(self, latents: torch.Tensor, t: torch.Tensor,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
        """Last-block states ``(N, L, D)`` (raster order) of every token of ``latents``
        ``(N, C, H, W)``, given as the one AR step at network timestep ``t`` ``(N,)``: the
        features of a linear probe. ``labels=None`` is unconditional: the null class, or no
        condition tokens for a model trained without one."""
        tokens = patchify(latents, self.config.patch_size)
        n, length, _ = tokens.shape
        cache = self.new_cache()
        if labels is None and self.null_label is not None:
            labels = torch.full((n,), self.null_label, dtype=torch.long, device=tokens.device)
        if labels is not None:
            self.push_condition(cache, labels)
        positions = torch.arange(length, device=tokens.device).expand(n, -1)
        return self.step_hidden_states(cache, tokens, positions, t)

    def guided_cached(self, cache: KVCache, x_t, positions, t, scale: float = 1.0,
                      interval: tuple[float, float] = (0, float("inf"))) -> torch.Tensor:
        """Classifier-free guidance in one batched forward. With ``scale > 1`` the cache holds
        ``[conditional; unconditional]`` (2N rows); guidance applies when
        ``interval[0] <= t < interval[1]``, otherwise the conditional prediction is used."""
        if scale <= 1.0:
            return self.forward_cached(cache, x_t, positions, t)
        both = self.forward_cached(cache, x_t.repeat(2, 1, 1), positions.repeat(2, 1), t.repeat(2))
        return guide(*both.chunk(2), t, scale, interval)


def guide(cond: torch.Tensor, uncond: torch.Tensor, t: torch.Tensor, scale: float,
          interval: tuple[float, float]) -> torch.Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` of predictions ``(N, n, d)``
    where the network timestep ``t`` ``(N,)`` is in ``interval[0] <= t < interval[1]``, else
    the conditional prediction."""
    inside = (t >= interval[0]) & (t < interval[1])
    guided = uncond + scale * (cond - uncond)
    return torch.where(inside[:, None, None], guided, cond)


def _concat_layouts(a: Layout, b: Layout) -> Layout:
    return Layout(*(torch.cat([x, y.to(x.device)], dim=1) for x, y in
                    ((a.kind, b.kind), (a.step, b.step), (a.copy, b.copy))))
