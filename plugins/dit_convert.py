"""Import of facebookresearch/DiT checkpoints (``cfkit convert dit DiT-XL-2-256.pt``): its
released EMA state dicts and the checkpoints of its ``train.py`` (``model``, ``ema``, ``opt``,
``args``; EMA weights taken), read with ``torch.load(weights_only=True)`` and mapped key by key
onto the ``dit`` network of ``cfkit_plugins.dit``.

The two networks compute the same function (adaLN-Zero blocks with modulate = x (1 + scale) +
shift, tanh-GELU MLP, 256 cos|sin timestep frequencies, fixed sin-cos positions, qkv with a
bias, LayerNorm eps 1e-6); the weights differ in layout only:

- DiT's patch embedding is a stride-p conv: its kernel ``(D, C, p, p)`` becomes cfkit's linear
  map of patchified tokens ``(D, p*p*C)`` (tokens hold a patch's pixels row-major, channels last);
- DiT learns Σ: its last layer outputs 2C channels per pixel, ε then the variance interpolation.
  The ε half is kept; the variance half is dropped, as cfkit's samplers use fixed variances.
"""

from __future__ import annotations

import math
from pathlib import Path

from cfkit_plugins.dit import PRESETS, DiT, DiTConfig

from cfkit import convert
from cfkit.checkpoint import CheckpointError, check_fits

SOURCE = "dit"

# DiT key pattern -> cfkit key template
KEY_MAP = [
    (r"x_embedder\.proj\.(weight|bias)", r"patch_embed.\1"),
    (r"t_embedder\.mlp\.(0|2)\.(weight|bias)", r"timestep_embedder.mlp.\1.\2"),
    (r"y_embedder\.embedding_table\.weight", r"label_embedder.table.weight"),
    (r"pos_embed", r"pos_embed"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", r"blocks.\1.modulation.1.\2"),
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", r"final_layer.modulation.1.\1"),
    (r"final_layer\.linear\.(weight|bias)", r"final_layer.linear.\1"),
]
# The constructor kwargs the weights do not show (DiT's defaults: a null class, dropout 0.1).
TOLD = ("num_heads", "num_classes", "class_dropout_prob")
NEEDED = ["x_embedder.proj.weight", "y_embedder.embedding_table.weight", "pos_embed",
          "blocks.0.mlp.fc1.weight", "final_layer.linear.weight"]


def dit_state(checkpoint, path) -> dict:
    """The DiT state dict in a checkpoint: the file itself (a released model) or its EMA
    weights (a ``train.py`` checkpoint)."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    if "x_embedder.proj.weight" in checkpoint:
        state = checkpoint
    elif isinstance(checkpoint.get("ema"), dict):
        state = checkpoint["ema"]
    else:
        raise CheckpointError(f"{path}: neither a DiT state dict nor a DiT train.py checkpoint "
                              f"(no x_embedder.proj.weight, no 'ema'); keys: {sorted(checkpoint)[:8]}")
    absent = [key for key in NEEDED if key not in state]
    if absent:
        raise CheckpointError(f"{path}: not a DiT state dict: missing {absent}")
    return state


def num_heads(hidden: int, depth: int, known: dict, model_name: str | None) -> int:
    """Attention heads, which the weights do not show: the constructor kwargs, the ``train.py``
    model name (``DiT-XL/2``) or the paper's model of this width and depth."""
    if "num_heads" in known:
        return int(known["num_heads"])
    name = (model_name or "").split("/")[0]
    if name in PRESETS:
        return PRESETS[name]["num_heads"]
    for size in PRESETS.values():
        if (size["hidden_size"], size["depth"]) == (hidden, depth):
            return size["num_heads"]
    raise CheckpointError(
        f"the number of attention heads cannot be told from the weights (hidden size {hidden}, "
        f"depth {depth}: no DiT model of that size); pass the constructor kwargs: --kwargs FILE "
        f'with {{"num_heads": H}}')


def infer_config(state: dict, args=None, kwargs: dict | None = None) -> tuple[DiTConfig, bool]:
    """(the cfkit DiT config, whether the checkpoint learns Σ) from the state-dict shapes, the
    heads from ``num_heads``, the classes and label dropout from ``kwargs`` or ``args`` (DiT's
    defaults: a null class row, dropout 0.1)."""
    known = dict(kwargs or {})
    hidden, channels, patch, patch_w = state["x_embedder.proj.weight"].shape
    if patch != patch_w:
        raise CheckpointError(f"x_embedder.proj.weight: a {patch}x{patch_w} patch; DiT's are square")
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    out_dim = state["final_layer.linear.weight"].shape[0]
    token_dim = patch * patch * channels
    if out_dim not in (token_dim, 2 * token_dim):
        raise CheckpointError(f"final_layer.linear outputs {out_dim} values per token; a DiT of "
                              f"{channels} channels and patch {patch} outputs {token_dim} or, "
                              f"learning Σ, {2 * token_dim}")
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    dropout = float(known.get("class_dropout_prob", 0.1))
    classes = known.get("num_classes", getattr(args, "num_classes", rows - int(dropout > 0)))
    config = DiTConfig(
        input_size=math.isqrt(state["pos_embed"].shape[1]) * patch, patch_size=patch,
        latent_channels=channels, hidden_size=hidden, depth=depth,
        num_heads=num_heads(hidden, depth, known, getattr(args, "model", None)),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden, num_classes=int(classes),
        class_dropout=dropout, qkv_bias=True,
    )
    try:
        config.check()
    except ValueError as error:
        raise CheckpointError(f"the DiT checkpoint's architecture: {error}") from None
    learned_sigma = out_dim == 2 * token_dim
    check_kwargs(known, config, learned_sigma)
    return config, learned_sigma


def check_kwargs(known: dict, config: DiTConfig, learned_sigma: bool) -> None:
    """CheckpointError unless every constructor kwarg is DiT's (or ``cfkit convert``'s
    ``latent_channels``) and those the weights show agree with them."""
    shown = {"input_size": config.input_size, "patch_size": config.patch_size,
             "in_channels": config.latent_channels, "latent_channels": config.latent_channels,
             "hidden_size": config.hidden_size, "depth": config.depth,
             "mlp_ratio": config.mlp_ratio, "learn_sigma": learned_sigma}
    allowed = [*shown, *TOLD]
    unknown = sorted(set(known) - set(allowed))
    if unknown:
        raise CheckpointError(f"unknown DiT constructor kwargs {unknown}; allowed: {', '.join(allowed)}")
    for name, value in known.items():
        if name in shown and value != shown[name]:
            raise CheckpointError(f"{name} is {value!r} in the given kwargs but {shown[name]!r} in "
                                  "the weights")


def cfkit_layout(state: dict, config: DiTConfig, learned_sigma: bool) -> dict:
    """DiT's tensors in cfkit's layout (the renaming aside): the conv kernel as a linear map
    of patchified tokens, and only the ε half of a learned-Σ output layer."""
    state = dict(state)
    conv = state["x_embedder.proj.weight"]  # (D, C, p, p) -> (D, p*p*C), pixels row-major
    state["x_embedder.proj.weight"] = conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1)
    if learned_sigma:  # per pixel (p, p) DiT outputs 2C channels: ε first
        p, c = config.patch_size, config.latent_channels
        weight, bias = state["final_layer.linear.weight"], state["final_layer.linear.bias"]
        state["final_layer.linear.weight"] = weight.reshape(p, p, 2 * c, -1)[:, :, :c].reshape(p * p * c, -1)
        state["final_layer.linear.bias"] = bias.reshape(p, p, 2 * c)[:, :, :c].reshape(-1)
    return state


def load_dit(path, kwargs: dict | None = None) -> tuple[DiT, DiTConfig]:
    """(model, config) from a facebookresearch/DiT checkpoint; ``kwargs`` are DiT constructor
    kwargs the weights do not show (``num_heads``, ``num_classes``, ``class_dropout_prob``)."""
    checkpoint = convert.read_official(path)
    state = dit_state(checkpoint, path)
    config, learned_sigma = infer_config(state, checkpoint.get("args"), kwargs)
    model = DiT(config)
    mapped = convert.convert_state(cfkit_layout(state, config, learned_sigma), model, KEY_MAP)
    check_fits(model, mapped, path, "the architecture its shapes and the given kwargs imply")
    model.load_state_dict(mapped)
    return model.eval(), config


def dit_checkpoint(path, out, kwargs: dict | None = None) -> Path:
    """A facebookresearch/DiT checkpoint as a cfkit checkpoint folder ``out`` of the dit method."""
    model, config = load_dit(path, kwargs)
    return convert.save_converted(path, out, "dit", model, config, source=SOURCE)
