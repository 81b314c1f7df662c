"""KL-autoencoder image tokenizers: mar-vae parity with MAR's VAE vectors, shapes, scaling and
checkpoint checks; sd-vae against diffusers' own encode/decode.

Every ``mar_vae_*.npz`` in CFKIT_REFERENCE_DIR is used with the ``.ckpt`` and ``.json``
(architecture) next to it; the npz holds the raw (unscaled) posterior and decoder outputs.
"""

import argparse
import inspect
import json

import numpy as np
import pytest
import torch
from cfkit_plugins.vae import MAR_SCALE, KLAutoencoder, VAEConfig, mar_vae
from refdata import reference_params

from cfkit import plugins
from cfkit.convert import CheckpointError

ARCH_OPTIONS = set(inspect.signature(mar_vae).parameters) - {"path", "scale"}
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, embed_dim=4, encoder_attn_resolutions=(16,),
            structural_resolution=32)  # two levels (32, 16 px); the encoder attends at the second


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions: on a loaded 2-core machine OpenMP's thread syncs cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A randomly initialised two-level VAE saved as MAR ships its VAE: ``{"model": state_dict}``."""
    torch.manual_seed(0)
    model = KLAutoencoder(VAEConfig(**TINY))
    path = tmp_path_factory.mktemp("vae") / "tiny.ckpt"
    torch.save({"model": model.state_dict()}, path)
    return path


def save_state(path, state):
    torch.save({"model": state}, path)
    return path


# --- mar-vae: parity with the reference -------------------------------------------------------


@pytest.mark.reference
@pytest.mark.parametrize("npz", reference_params("mar_vae_*.npz"))
def test_mar_vae_matches_the_reference_posterior_and_decoder(npz):
    spec = json.loads(npz.with_suffix(".json").read_text())
    vectors = np.load(npz)
    tokenizer = plugins.build("image_tokenizers", "mar-vae", path=str(npz.with_suffix(".ckpt")),
                              **{k: v for k, v in spec.items() if k in ARCH_OPTIONS})
    image, z = torch.from_numpy(vectors["image"]), torch.from_numpy(vectors["z"])
    with torch.no_grad():
        mean, std = tokenizer.model.posterior(image)
        decoded = tokenizer.model.decode(z)
    want = {name: torch.from_numpy(vectors[name]) for name in ("mean", "std", "decoded")}
    for name, got in (("mean", mean), ("std", std), ("decoded", decoded)):
        assert got.shape == want[name].shape, name
        error = (got - want[name]).abs().max().item()
        assert error < 1e-4, f"{npz.name}: {name} max abs error {error:.2e}"


# --- mar-vae: architecture, shapes, scaling ------------------------------------------------------


def test_attention_sits_at_the_structural_resolution_whatever_the_input_size():
    config = VAEConfig(ch=32)  # MAR's KL-16 layout: levels at 256, 128, 64, 32, 16 px
    assert config.level_resolutions() == [256, 128, 64, 32, 16] and config.downsample == 16
    model = KLAutoencoder(config)
    assert [len(level.attn) for level in model.encoder.down] == [0, 0, 0, 0, 2]
    assert [len(level.attn) for level in model.decoder.up] == [0, 0, 0, 0, 0]
    with torch.no_grad():
        mean, std = model.posterior(images(1, 32))  # 32 px in: attention still at the last level
    assert mean.shape == std.shape == (1, 16, 2, 2) and (std > 0).all()


def test_an_attention_resolution_that_is_no_level_is_refused():
    with pytest.raises(ValueError, match=r"encoder_attn_resolutions \[24\].*\[256, 128, 64, 32, 16\]"):
        VAEConfig(encoder_attn_resolutions=(24,))


def test_mar_vae_shapes_scale_and_grey_images(tiny_ckpt):
    tokenizer = plugins.build("image_tokenizers", "mar-vae", path=str(tiny_ckpt), **TINY)
    assert (tokenizer.channels, tokenizer.downsample, tokenizer.scale) == (4, 2, 0.2325)
    x = images(2, 8)
    latents = tokenizer.encode(x)
    assert latents.shape == (2, 4, 4, 4)
    with torch.no_grad():
        mean, _ = tokenizer.model.posterior(x)
        raw = tokenizer.model.decode(latents / 0.2325)
    torch.testing.assert_close(latents, mean * 0.2325)
    decoded = tokenizer.decode(latents)
    assert decoded.shape == (2, 3, 8, 8) and decoded.abs().max() <= 1
    torch.testing.assert_close(decoded, raw.clamp(-1, 1))
    grey = x[:, :1]
    torch.testing.assert_close(tokenizer.encode(grey), tokenizer.encode(grey.expand(-1, 3, -1, -1)))


def test_mar_vae_samples_the_posterior_with_the_given_generator(tiny_ckpt):
    tokenizer = mar_vae(str(tiny_ckpt), **TINY)
    x = images(2, 8)
    sample = tokenizer.encode(x, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mean, std = tokenizer.model.posterior(x)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample, (mean + std * noise) * MAR_SCALE)
    assert not torch.allclose(sample, tokenizer.encode(x))


def test_the_posterior_log_variance_is_clamped_to_minus_30_and_20(tiny_ckpt):
    model = mar_vae(str(tiny_ckpt), **TINY).model
    logvar_bias = model.quant_conv.bias[4:]  # moments are (mean, logvar) along channels
    with torch.no_grad():
        logvar_bias.fill_(1e3)
        _, high = model.posterior(images(1, 8))
        logvar_bias.fill_(-1e3)
        _, low = model.posterior(images(1, 8))
    torch.testing.assert_close(high, torch.full_like(high, torch.exp(torch.tensor(10.0)).item()))
    torch.testing.assert_close(low, torch.full_like(low, torch.exp(torch.tensor(-15.0)).item()))


def test_an_image_size_that_is_no_multiple_of_the_downsampling_is_refused(tiny_ckpt):
    with pytest.raises(ValueError, match=r"\(7, 7\) is not a multiple of 2"):
        mar_vae(str(tiny_ckpt), **TINY).encode(images(1, 7))


# --- mar-vae: checkpoint checks --------------------------------------------------------------


def test_a_checkpoint_with_missing_and_unexpected_keys_names_them(tiny_ckpt, tmp_path):
    state = torch.load(tiny_ckpt, weights_only=True)["model"]
    state.pop("encoder.down.1.attn.0.q.weight")
    state["loss.logvar"] = torch.zeros(())
    path = save_state(tmp_path / "bad.ckpt", state)
    with pytest.raises(CheckpointError) as error:
        mar_vae(str(path), **TINY)
    message = str(error.value)
    assert "missing keys: encoder.down.1.attn.0.q.weight" in message
    assert "unexpected keys: loss.logvar" in message


def test_a_checkpoint_for_another_architecture_lists_the_mismatches(tiny_ckpt):
    with pytest.raises(CheckpointError, match="wrong shapes: .*decoder.conv_in.weight") as error:
        mar_vae(str(tiny_ckpt), **{**TINY, "embed_dim": 8})
    assert "missing keys" not in str(error.value)
    with pytest.raises(CheckpointError, match="missing keys: .*encoder.down.0.attn.0"):
        mar_vae(str(tiny_ckpt), **{**TINY, "encoder_attn_resolutions": (32, 16)})


def test_a_checkpoint_carrying_pickled_objects_is_refused(tiny_ckpt, tmp_path):
    state = torch.load(tiny_ckpt, weights_only=True)["model"]
    path = tmp_path / "pickled.ckpt"
    torch.save({"model": state, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        mar_vae(str(path), **TINY)


def test_a_missing_checkpoint_or_a_bare_state_dict_is_a_clear_error(tiny_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="VAE checkpoint not found: .*absent.ckpt"):
        mar_vae(str(tmp_path / "absent.ckpt"), **TINY)
    bare = tmp_path / "bare.ckpt"
    torch.save(torch.load(tiny_ckpt, weights_only=True)["model"], bare)
    with pytest.raises(CheckpointError, match=r"expected a dict \{'model': state_dict\}"):
        mar_vae(str(bare), **TINY)


# --- sd-vae ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    """A tiny randomly initialised diffusers AutoencoderKL saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                        layers_per_block=1, latent_channels=4, sample_size=16).eval()
    folder = tmp_path_factory.mktemp("sd-vae")
    vae.save_pretrained(folder)
    return vae, folder


def test_sd_vae_matches_diffusers_encode_and_decode(diffusers_vae):
    vae, folder = diffusers_vae
    tokenizer = plugins.build("image_tokenizers", "sd-vae", path=str(folder))
    assert (tokenizer.channels, tokenizer.downsample, tokenizer.scale, tokenizer.shift) == (4, 2, 0.18215, 0)
    x = images(2, 16)
    latents = tokenizer.encode(x)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        want_latents = posterior.mean * 0.18215
        want_images = vae.decode(want_latents / 0.18215).sample.clamp(-1, 1)
        want_sample = posterior.sample(torch.Generator().manual_seed(5)) * 0.18215
    assert latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(latents, want_latents)
    torch.testing.assert_close(tokenizer.decode(latents), want_images)
    assert want_images.shape == x.shape
    torch.testing.assert_close(tokenizer.encode(x, torch.Generator().manual_seed(5)), want_sample)


def test_sd_vae_takes_scale_and_shift_from_the_folder_unless_given(diffusers_vae, tmp_path):
    vae, _ = diffusers_vae
    vae.register_to_config(scaling_factor=1.5, shift_factor=0.25)
    try:
        vae.save_pretrained(tmp_path)
    finally:
        vae.register_to_config(scaling_factor=0.18215, shift_factor=None)
    tokenizer = plugins.build("image_tokenizers", "sd-vae", path=str(tmp_path))
    assert (tokenizer.scale, tokenizer.shift) == (1.5, 0.25)
    x = images(1, 16)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    latents = tokenizer.encode(x)
    torch.testing.assert_close(latents, (mean - 0.25) * 1.5)
    with torch.no_grad():
        want = vae.decode(latents / 1.5 + 0.25).sample.clamp(-1, 1)
    torch.testing.assert_close(tokenizer.decode(latents), want)
    assert plugins.build("image_tokenizers", "sd-vae", path=str(tmp_path), scale=0.5).scale == 0.5


def test_sd_vae_without_a_local_folder_or_its_config_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="sd-vae: no such folder: .*nowhere"):
        plugins.build("image_tokenizers", "sd-vae", path=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="has no config.json"):
        plugins.build("image_tokenizers", "sd-vae", path=str(tmp_path))
