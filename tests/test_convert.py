"""Official checkpoint import and exact parity with the official implementation's vectors.

Every ``official_tiny_*.npz`` in CFKIT_REFERENCE_DIR is used with its ``.pt`` checkpoint
(and ``.json`` constructor kwargs). The reference ran in float32; its own rounding error on
CFG-4 outputs is ~1e-5, so the parity forward runs in float64 and is compared at 1e-5.
"""

import argparse
import datetime
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from cfkit import checkpoint
from cfkit.convert import CheckpointError, infer_config, load_official, read_official
from cfkit.diffusion import GaussianDiffusion
from cfkit.plan import Plan
from cfkit.schedules import step_index
from cfkit.transformer import patchify

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

from refdata import missing, reference_files, reference_params  # noqa: E402

OFFICIAL = reference_files("official_tiny_*.npz")


def official(npz):
    model, config = load_official(npz.with_suffix(".pt"))
    return model.double(), config, np.load(npz)


def gather_tokens(tokens, order):
    return torch.gather(tokens, 1, order[..., None].expand(-1, -1, tokens.shape[-1]))


@pytest.mark.reference
@pytest.mark.parametrize("npz", reference_params("official_tiny_*.npz"))
@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex"])
def test_training_forward_matches_the_official_per_token_error(npz, backend):
    model, config, d = official(npz)
    for block in model.blocks:
        block.attn.backend = backend
    object.__setattr__(model.config, "attention", backend)
    x = torch.from_numpy(d["x"]).double()
    noise = torch.from_numpy(d["noise"]).double()
    t = torch.from_numpy(d["t"])
    xn = GaussianDiffusion.named().q_sample(x, t, noise)
    np.testing.assert_allclose(xn.float().numpy(), d["xn"], atol=1e-6)
    order = torch.from_numpy(d["ids_shuffle"])
    n = x.shape[0]
    step = step_index(torch.from_numpy(d["step_sizes"])).expand(n, -1)
    plan = Plan(order, step, t[:, None, None].expand(n, 1, int(step[0, -1]) + 1))
    tokens = patchify(x, config.patch_size)
    x_t = gather_tokens(patchify(xn, config.patch_size), order)
    eps = gather_tokens(patchify(noise, config.patch_size), order)
    with torch.no_grad():
        out = model(tokens, x_t[:, None], plan.t_per_token(), torch.from_numpy(d["y_effective"]), plan)[:, 0]
    # per-token ε error |ε - ε̂| against the reference's sqrt(mse)
    np.testing.assert_allclose((eps - out).abs().numpy(), np.sqrt(d["mse"]), atol=1e-5, rtol=0)
    ar = torch.from_numpy(d["ar_weights"]).double()
    loss = ((eps - out) ** 2 * ar[None, :, None]).mean()
    assert abs(loss.item() - float(d["loss"])) < 1e-5


def inference_cases():
    """(file, case) for every recorded ``infer_cfg..._z`` of every official_tiny_*.npz."""

    def recorded(path) -> list[str]:
        with np.load(path) as npz:
            return [key[:-2] for key in npz.files if re.fullmatch(r"infer_cfg[\d.]+_lo\d+_hi\d+_t\d+_z", key)]

    return reference_params("official_tiny_*.npz", recorded)


@pytest.mark.reference
@pytest.mark.parametrize("npz,case", inference_cases())
def test_kv_cached_diffusion_matches_the_official_outputs(npz, case):
    model, config, d = official(npz)
    scale, lo, hi, t = re.fullmatch(r"infer_cfg([\d.]+)_lo(\d+)_hi(\d+)_t(\d+)", case).groups()
    scale = float(scale)
    y = torch.from_numpy(d["y"])
    n = len(y)
    labels = torch.cat([y, torch.full_like(y, config.num_classes)]) if scale > 1 else y
    cache = model.new_cache()
    z = torch.from_numpy(d[f"{case}_z"]).double()
    with torch.no_grad():
        model.push_condition(cache, labels)
        positions = torch.arange(config.num_tokens).expand(n, -1)
        out = model.guided_cached(cache, z, positions, torch.full((n,), int(t)), scale,
                                  (int(lo), int(hi)))
    np.testing.assert_allclose(out.numpy(), d[f"{case}_out"], atol=1e-5, rtol=1e-5)


@pytest.mark.reference
@pytest.mark.parametrize("npz", reference_params("official_tiny_*.npz"))
def test_two_step_ar_kv_cache_matches_the_official_output(npz):
    model, config, d = official(npz)
    y = torch.from_numpy(d["y"])
    n = len(y)
    tokens = torch.from_numpy(d["x_tokens"]).double()
    np.testing.assert_array_equal(patchify(torch.from_numpy(d["x"]), config.patch_size).numpy(),
                                  d["x_tokens"])
    first = torch.from_numpy(d["ar_step1_positions"]).expand(n, -1)
    second = torch.from_numpy(d["ar_step2_positions"]).expand(n, -1)
    cache = model.new_cache()
    with torch.no_grad():
        model.push_condition(cache, y)
        model.push_clean(cache, gather_tokens(tokens, first), first)
        out = model.forward_cached(cache, torch.from_numpy(d["ar_step2_z"]).double(), second,
                                   torch.from_numpy(d["ar_step2_t"]))
    np.testing.assert_allclose(out.numpy(), d["ar_step2_out"], atol=1e-5, rtol=1e-5)


@pytest.mark.reference
@pytest.mark.parametrize("npz", reference_params("official_tiny_*.npz"))
def test_convert_cli_writes_a_checkpoint_that_reloads_identically(npz, tmp_path):
    out = tmp_path / "ckpt"
    result = subprocess.run(
        [sys.executable, "-m", "cfkit", "convert", "official", str(npz.with_suffix(".pt")),
         "--out", str(out)], capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    method = checkpoint.load(out)
    model, _ = load_official(npz.with_suffix(".pt"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(method.model.state_dict()[key], value, atol=0, rtol=0)
    kwargs = json.loads(npz.with_suffix(".json").read_text())["official_constructor_kwargs"]
    assert method.config.hidden_size == kwargs["hidden_size"]
    assert method.config.pos_embed == ("learned" if kwargs["trainable_pos"] else "sincos")


def official_layout_checkpoint(path, extra=None, drop=(), add=()):
    """A checkpoint in the reference trainer's layout, made here from a converted model."""
    src = OFFICIAL[0].with_suffix(".pt")
    ckpt = read_official(src)
    state = dict(ckpt["ema"])
    for key in drop:
        state.pop(key)
    for key in add:
        state[key] = torch.zeros(1)
    ckpt["ema"] = state
    if extra is not None:
        ckpt["extra"] = extra
    torch.save(ckpt, path)
    return path


@pytest.mark.reference
@pytest.mark.skipif(not OFFICIAL, reason=missing("official_tiny_*.npz"))
def test_a_checkpoint_with_another_pickled_object_is_refused(tmp_path):
    path = official_layout_checkpoint(tmp_path / "evil.pt", extra=datetime.date(2024, 1, 1))
    with pytest.raises(CheckpointError, match="refused"):
        read_official(path)


@pytest.mark.reference
@pytest.mark.skipif(not OFFICIAL, reason=missing("official_tiny_*.npz"))
def test_missing_and_unexpected_keys_are_listed(tmp_path):
    path = official_layout_checkpoint(
        tmp_path / "odd.pt", drop=("final_layer.1.bias",), add=("blocks.0.attn.rope",)
    )
    kwargs = json.loads(OFFICIAL[0].with_suffix(".json").read_text())["official_constructor_kwargs"]
    with pytest.raises(CheckpointError, match=r"missing \['final_layer.linear.bias'\].*"
                                              r"unexpected \['blocks.0.attn.rope'\]"):
        load_official(path, kwargs)


@pytest.mark.reference
@pytest.mark.skipif(not OFFICIAL, reason=missing("official_tiny_*.npz"))
def test_patch_size_must_be_given_when_the_weights_cannot_tell():
    state = read_official(OFFICIAL[0].with_suffix(".pt"))["ema"]
    with pytest.raises(CheckpointError, match="--patch-size 1 --latent-channels 16"):
        infer_config(state, argparse.Namespace(model="tiny"))
    with pytest.raises(CheckpointError, match=r"missing \['blocks.0.attn.q_norm.weight'"):
        infer_config({k: v for k, v in state.items() if "q_norm" not in k})
