"""Import of facebookresearch/DiT checkpoints (``cfkit convert dit``): a tiny DiT written in the
reference's key layout, with random weights, predicts through cfkit's ``dit`` network the ε
half of the reference's forward, which is re-implemented here from its ``models.py``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cfkit_plugins.dit import DiT, DiTConfig, network_config
from cfkit_plugins.dit_convert import KEY_MAP, cfkit_layout, infer_config, load_dit, num_heads

from cfkit import checkpoint
from cfkit.checkpoint import CheckpointError, check_fits
from cfkit.cli import main
from cfkit.convert import convert_state, converter

# The tiny DiT of dit_shapes' defaults, and its heads (which the weights do not show)
TINY = dict(heads=4, input_size=8, channels=4, classes=10)


def dit_sincos(dim: int, side: int) -> np.ndarray:
    """The reference's ``get_2d_sincos_pos_embed``: meshgrid(w, h), its first half from grid[0]."""
    grid_h, grid_w = np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, side, side)

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(dim // 2, grid[0]), one_axis(dim // 2, grid[1])], axis=1)


def dit_shapes(learn_sigma=True, depth=2, hidden=64, input_size=8, patch=2, channels=4,
               classes=10) -> dict[str, tuple]:
    """Key -> shape of the reference's ``DiT(...).state_dict()`` (1 + ``classes`` label rows:
    the null class of label dropout)."""
    def linear(name, out, fan_in):
        return {f"{name}.weight": (out, fan_in), f"{name}.bias": (out,)}

    out_channels = 2 * channels if learn_sigma else channels
    shapes = {"x_embedder.proj.weight": (hidden, channels, patch, patch), "x_embedder.proj.bias": (hidden,),
              **linear("t_embedder.mlp.0", hidden, 256), **linear("t_embedder.mlp.2", hidden, hidden),
              "y_embedder.embedding_table.weight": (classes + 1, hidden),
              "pos_embed": (1, (input_size // patch) ** 2, hidden)}
    for i in range(depth):
        shapes.update({**linear(f"blocks.{i}.attn.qkv", 3 * hidden, hidden),
                       **linear(f"blocks.{i}.attn.proj", hidden, hidden),
                       **linear(f"blocks.{i}.mlp.fc1", 4 * hidden, hidden),
                       **linear(f"blocks.{i}.mlp.fc2", hidden, 4 * hidden),
                       **linear(f"blocks.{i}.adaLN_modulation.1", 6 * hidden, hidden)})
    return {**shapes, **linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden),
            **linear("final_layer.linear", patch * patch * out_channels, hidden)}


def dit_state(seed=0, learn_sigma=True) -> dict:
    """A tiny DiT's state dict in the reference's layout: random weights scaled by
    1/sqrt(fan-in) (no layer zero, as a trained one), the fixed sin-cos positions."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in dit_shapes(learn_sigma).items():
        if key == "pos_embed":
            state[key] = torch.from_numpy(dit_sincos(shape[-1], math.isqrt(shape[1]))).float()[None]
        elif key.endswith("bias"):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return state


def dit_forward(state: dict, x, t, y, heads: int) -> torch.Tensor:
    """The reference ``DiT.forward(x, t, y)`` ``(N, C, H, W)`` -> ``(N, out_channels, H, W)`` on
    its state dict: conv patch embedding + sin-cos positions, the 256-frequency cos|sin timestep
    MLP plus the label row, adaLN-Zero blocks (timm attention with qkv bias, tanh-GELU MLP),
    the adaLN final layer and ``unpatchify``."""
    def linear(name, v):
        return F.linear(v, state[f"{name}.weight"], state[f"{name}.bias"])

    def modulate(v, shift, scale):
        return v * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def norm(v):
        return F.layer_norm(v, v.shape[-1:], eps=1e-6)

    def attention(i, v):
        n, length, dim = v.shape
        qkv = linear(f"blocks.{i}.attn.qkv", v).reshape(n, length, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return linear(f"blocks.{i}.attn.proj", a.transpose(1, 2).reshape(n, length, dim))

    conv = state["x_embedder.proj.weight"]
    patch = conv.shape[-1]
    h = F.conv2d(x, conv, state["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    h = h + state["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype)
    c = linear("t_embedder.mlp.2", F.silu(linear("t_embedder.mlp.0", t_freq)))
    c = c + state["y_embedder.embedding_table.weight"][y]
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    for i in range(depth):
        mods = linear(f"blocks.{i}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        h = h + mods[2].unsqueeze(1) * attention(i, modulate(norm(h), mods[0], mods[1]))
        mlp_in = modulate(norm(h), mods[3], mods[4])
        mlp = linear(f"blocks.{i}.mlp.fc2", F.gelu(linear(f"blocks.{i}.mlp.fc1", mlp_in), approximate="tanh"))
        h = h + mods[5].unsqueeze(1) * mlp
    shift, scale = linear("final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    out = linear("final_layer.linear", modulate(norm(h), shift, scale))
    n, length, _ = out.shape
    side, channels = math.isqrt(length), out.shape[-1] // patch**2
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(n, side, side, patch, patch, channels))
    return out.reshape(n, channels, side * patch, side * patch)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, TINY["channels"], TINY["input_size"], TINY["input_size"], generator=g)
    return x.double(), torch.tensor([0, 417, 999]), torch.tensor([3, 9, TINY["classes"]])  # a null label


def assert_predicts_the_eps_half(model: DiT, state: dict):
    x, t, y = inputs()
    want = dit_forward({k: v.double() for k, v in state.items()}, x, t, y, TINY["heads"])
    with torch.no_grad():
        got = model.double()(x, t, y)
    torch.testing.assert_close(got, want[:, :TINY["channels"]], atol=1e-10, rtol=1e-10)


@pytest.fixture
def saved(tmp_path):
    def save(checkpoint_object, name="DiT-tiny.pt"):
        path = tmp_path / name
        torch.save(checkpoint_object, path)
        return path
    return save


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_converted_dit_predicts_the_eps_half_of_the_reference_forward(saved, learn_sigma):
    state = dit_state(learn_sigma=learn_sigma)
    model, config = load_dit(saved(state), {"num_heads": 4})
    assert (config.hidden_size, config.depth, config.num_heads, config.patch_size) == (64, 2, 4, 2)
    assert (config.input_size, config.latent_channels, config.num_classes) == (8, 4, 10)
    assert model.null_label == 10 and config.qkv_bias
    assert_predicts_the_eps_half(model, state)


def test_cfkit_sincos_positions_are_the_reference_buffer():
    fresh = DiT(DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=4))
    np.testing.assert_allclose(fresh.pos_embed[0].numpy(), dit_sincos(64, 4), atol=1e-7, rtol=0)


def test_a_train_py_checkpoint_gives_its_ema_weights(saved):
    ema, online = dit_state(seed=0), dit_state(seed=1)
    args = argparse.Namespace(model="DiT-tiny", num_classes=10, image_size=64)
    path = saved({"model": online, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": args})
    model, config = load_dit(path)  # the heads from args.model (cfkit's DiT-tiny: 4)
    assert config.num_heads == 4
    assert_predicts_the_eps_half(model, ema)


def test_cli_convert_dit_writes_a_checkpoint_that_reloads_and_samples(saved, tmp_path, capsys):
    state = dit_state()
    kwargs = tmp_path / "kwargs.json"
    kwargs.write_text(json.dumps({"num_heads": 4}))
    out = tmp_path / "ckpt"
    assert main(["convert", "dit", str(saved(state)), "--out", str(out), "--kwargs", str(kwargs)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert checkpoint.read_config(out)["source"] == "dit:DiT-tiny.pt"
    method = checkpoint.load(out)
    assert type(method.model) is DiT
    assert_predicts_the_eps_half(method.model, state)
    samples = tmp_path / "samples"
    assert main(["sample", str(out), "--class", "3", "--steps", "5", "--sampler", "dpm-solver++",
                 "--cfg", "2", "--no-progress", "--out", str(samples)]) == 0
    latents = np.load(samples / "samples.npz")["latents"]
    assert latents.shape == (1, 4, 8, 8) and np.isfinite(latents).all()


def test_the_heads_come_from_kwargs_the_model_name_or_the_papers_sizes():
    assert num_heads(1152, 28, {}, None) == 16  # DiT-XL-2-256.pt: a bare state dict
    assert num_heads(64, 2, {}, "DiT-B/2") == 12
    assert num_heads(1152, 28, {"num_heads": 8}, "DiT-XL/2") == 8
    with pytest.raises(CheckpointError, match=r"hidden size 64, depth 2.*--kwargs FILE with \{\"num_heads\""):
        num_heads(64, 2, {}, None)


def test_the_dit_xl_2_256_layout_maps_every_key_onto_the_papers_dit_xl_2():
    """The released DiT-XL-2-256.pt's keys and shapes (a bare EMA state dict, no args), on the
    meta device: the inferred config is the paper's DiT-XL/2 and every tensor fits."""
    state = {key: torch.empty(shape, device="meta") for key, shape in dit_shapes(
        depth=28, hidden=1152, input_size=32, patch=2, channels=4, classes=1000).items()}
    config, learned_sigma = infer_config(state)
    paper = network_config({"preset": "DiT-XL", "patch_size": 2, "input_size": 32,
                            "latent_channels": 4, "num_classes": 1000})
    assert learned_sigma and config == dataclasses.replace(paper, qkv_bias=True)
    with torch.device("meta"):
        model = DiT(config)
    mapped = convert_state(cfkit_layout(state, config, learned_sigma), model, KEY_MAP)
    check_fits(model, mapped, "DiT-XL-2-256.pt", "DiT-XL/2")


class Payload:
    """Not a tensor: torch.load(weights_only=True) must refuse to build it."""


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("blocks.1.mlp.fc2.bias"), r"missing \['blocks.1.mlp.fc2.bias'\]"),
    (lambda s: s.update({"blocks.0.attn.q_norm.weight": torch.ones(16)}),
     r"unexpected \['blocks.0.attn.q_norm.weight'\]"),
    (lambda s: s.update({"final_layer.linear.weight": torch.zeros(12, 64)}),
     "final_layer.linear outputs 12 values per token; .* outputs 16 or, learning Σ, 32"),
    (lambda s: s.pop("pos_embed"), r"not a DiT state dict: missing \['pos_embed'\]"),
    (lambda s: s.update({"y_embedder.embedding_table.weight": torch.zeros(11, 64, 1)}),
     "does not fit"),
])
def test_a_checkpoint_that_is_not_a_dit_is_an_error_naming_the_keys(saved, change, message):
    state = dit_state()
    change(state)
    with pytest.raises(CheckpointError, match=message):
        load_dit(saved(state), {"num_heads": 4})


@pytest.mark.parametrize("kwargs, message", [
    ({"num_heads": 4, "patch_size": 4}, "patch_size is 4 in the given kwargs but 2 in the weights"),
    ({"num_heads": 4, "learn_sigma": False}, "learn_sigma is False in the given kwargs but True"),
    ({"num_heads": 4, "qk_norm": True}, r"unknown DiT constructor kwargs \['qk_norm'\]; allowed: input_size"),
    ({"num_heads": 5}, "num_heads 5 does not divide hidden_size 64"),
])
def test_constructor_kwargs_must_be_dits_and_agree_with_the_weights(saved, kwargs, message):
    path = saved(dit_state())
    with pytest.raises(CheckpointError, match=message):
        load_dit(path, kwargs)
    load_dit(path, {"num_heads": 4, "patch_size": 2, "in_channels": 4, "learn_sigma": True})


def test_a_pickled_object_is_refused_not_run(saved, tmp_path):
    path = saved({**dit_state(), "extra": Payload()})
    with pytest.raises(CheckpointError, match="refused"):
        converter("dit")(path, tmp_path / "out", {"num_heads": 4})
    assert not (tmp_path / "out").exists()
