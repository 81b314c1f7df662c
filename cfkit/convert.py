"""Import of official CausalFusion checkpoints (the reference trainer's ``.pt`` layout), and
the lookup of the checkpoint converters plugins register (``register_converters``): the
causalfusion plugin registers the one for this layout, ``official``.

The file is read with ``torch.load(weights_only=True)``; the only non-tensor type allowed is
``argparse.Namespace`` (the trainer's ``args``), so a file carrying any other pickled object
is refused. Every key is mapped; missing or unexpected keys are an error listing them.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch

from cfkit import plugins
from cfkit.checkpoint import CheckpointError, check_fits, read_json
from cfkit.transformer import PRESETS, CausalTransformer, TransformerConfig, sincos_pos_embed

# official key pattern -> cfkit key template
KEY_MAP = [
    (r"x_proj\.(weight|bias)", r"patch_embed.\1"),
    (r"t_embedder\.mlp\.(0|2)\.(weight|bias)", r"timestep_embedder.mlp.\1.\2"),
    (r"y_embedder\.embedding_table\.weight", r"class_embedder.table.weight"),
    (r"pos_embed", r"pos_embed"),
    (r"cond_pos_embed", r"cond_pos_embed"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"blocks\.(\d+)\.attn\.(q_norm|k_norm)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"final_layer\.0\.(weight|bias)", r"final_layer.norm.\1"),
    (r"final_layer\.1\.(weight|bias)", r"final_layer.linear.\1"),
]

# The converter source of the reference trainer's checkpoints: the layout this module reads.
OFFICIAL = "official"
# The reference's model names -> cfkit presets (they fix patch size and latent channels).
OFFICIAL_MODELS = {"CausalFusion-L", "CausalFusion-XL", "CausalFusion-H"}


def read_official(path) -> dict:
    """The checkpoint dict, unpickling nothing but tensors, containers and Namespace."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused: it carries a pickled object other than tensors and "
            f"argparse.Namespace ({str(error).splitlines()[0]})"
        ) from None
    except (EOFError, OSError, RuntimeError) as error:  # what torch.load makes of a cut file
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?)"
                              f"{': ' + str(error).splitlines()[0] if str(error) else ''}") from None


def map_key(key: str, key_map=KEY_MAP) -> str | None:
    """The cfkit key of ``key`` under ``key_map`` ((pattern, template) pairs), or None."""
    for pattern, template in key_map:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    return None


def infer_config(state: dict, args=None, kwargs: dict | None = None) -> TransformerConfig:
    """Architecture from the state-dict shapes plus what shapes cannot tell (patch size and
    latent channels; learned or fixed positions) from the constructor kwargs, the official
    model name in ``args``, or the position table itself."""
    needed = ["x_proj.weight", "blocks.0.attn.q_norm.weight", "y_embedder.embedding_table.weight",
              "pos_embed", "blocks.0.mlp.fc1.weight"]
    absent = [key for key in needed if key not in state]
    if absent:
        raise CheckpointError(f"not an official CausalFusion state dict: missing {absent}")
    hidden, token_dim = state["x_proj.weight"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
    table = state["y_embedder.embedding_table.weight"]
    cond_tokens = table.shape[1] // hidden
    num_tokens = state["pos_embed"].shape[1]
    known = dict(kwargs or {})
    model_name = getattr(args, "model", None)
    if model_name in OFFICIAL_MODELS:
        known.setdefault("patch_size", PRESETS[model_name]["patch_size"])
        known.setdefault("latent_channels", PRESETS[model_name]["latent_channels"])
        known.setdefault("trainable_pos", True)
    if "patch_size" not in known or "latent_channels" not in known:
        raise CheckpointError(
            "patch size and latent channels cannot be told from the weights "
            f"(token dim {token_dim}); pass them (e.g. --patch-size 1 --latent-channels 16) "
            "or the constructor kwargs JSON"
        )
    patch = int(known["patch_size"])
    side = math.isqrt(num_tokens)
    if "trainable_pos" in known:
        learned = bool(known["trainable_pos"])
    else:
        fixed = torch.from_numpy(sincos_pos_embed(hidden, side)).float()
        learned = not torch.allclose(state["pos_embed"][0], fixed, atol=1e-6)
    num_classes = int(known.get("num_classes", getattr(args, "num_classes", table.shape[0] - 1)))
    return TransformerConfig(
        input_size=side * patch, patch_size=patch, latent_channels=int(known["latent_channels"]),
        hidden_size=hidden, depth=depth, num_heads=hidden // head_dim,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=num_classes, class_dropout=float(known.get("class_dropout_prob", 0.1)),
        cond_tokens=cond_tokens, pos_embed="learned" if learned else "sincos",
    ).check()


def convert_state(state: dict, model: torch.nn.Module, key_map=KEY_MAP) -> dict:
    """Official state dict -> cfkit state dict of ``model`` (keys renamed by ``key_map``, the
    official CausalFusion layout by default), every key mapped and every key filled."""
    mapped, unexpected = {}, []
    for key, value in state.items():
        new = map_key(key, key_map)
        if new is None:
            unexpected.append(key)
        else:
            mapped[new] = value
    expected = set(model.state_dict())
    missing = sorted(expected - set(mapped))
    unexpected += sorted(set(mapped) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint keys do not match the model: missing {missing or 'none'}; "
            f"unexpected {unexpected or 'none'}"
        )
    return mapped


def load_official(path, kwargs: dict | None = None, prefer_ema: bool = True):
    """(model, config) from an official checkpoint; EMA weights when present."""
    checkpoint = read_official(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    key = "ema" if prefer_ema and "ema" in checkpoint else "model"
    if key not in checkpoint:
        raise CheckpointError(f"{path}: no 'ema' or 'model' weights; keys: {sorted(checkpoint)}")
    state = checkpoint[key]
    source = "the given constructor kwargs"
    sidecar = Path(path).with_suffix(".json")
    if kwargs is None and sidecar.exists():
        kwargs, source = read_json(sidecar).get("official_constructor_kwargs"), sidecar
    config = infer_config(state, checkpoint.get("args"), kwargs)
    model = CausalTransformer(config)
    mapped = convert_state(state, model)
    check_fits(model, mapped, path, source)
    model.load_state_dict(mapped)
    return model.eval(), config


def save_converted(path, out, method: str, model: torch.nn.Module, config, source: str) -> Path:
    """Write ``model`` (of the network config dataclass ``config``, read from the file ``path``)
    as a cfkit checkpoint folder ``out`` of the training method ``method``; ``source`` names
    the converter; returns ``out``."""
    from dataclasses import asdict

    from cfkit import checkpoint
    from cfkit import config as configs

    experiment = configs.validate({
        "name": Path(path).stem, "method": {"name": method}, "model": asdict(config),
    })
    return checkpoint.save(out, experiment, model, extra={"source": f"{source}:{Path(path).name}"})


def converter(source: str) -> Callable[[Path | str, Path | str, dict | None], Path]:
    """The converter a plugin registers for checkpoints from ``source``
    (``register_converters``); an UnknownComponentError lists the known sources."""
    return plugins.registry().component("converters", source).factory


def convert_official(path, out, kwargs: dict | None = None) -> Path:
    """Write a cfkit checkpoint folder from an official checkpoint (the reference trainer's
    layout, read by ``load_official``) with the converter registered for it; returns the folder."""
    return converter(OFFICIAL)(path, out, kwargs)
