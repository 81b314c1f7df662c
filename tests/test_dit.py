"""The DiT baseline plugin: presets, adaLN-Zero initialisation, loss, config checks, sampling."""

from __future__ import annotations

import pytest
import torch
from cfkit_plugins.dit import DiT, LabelEmbedder, network_config

from cfkit import config as configs
from cfkit import plugins
from cfkit.cli import main
from cfkit.generate import GenerationError, reverse_process
from cfkit.methods import Batch
from cfkit.pipeline import Pipeline
from cfkit.samplers import SampleGenerators, noise_like, respaced
from cfkit.transformer import guide, patchify, unpatchify

TINY = {"preset": "DiT-tiny", "input_size": 8, "patch_size": 2, "num_classes": 10}


def experiment(model=TINY, **fields):
    return configs.validate({"method": {"name": "dit"}, "model": dict(model), **fields})


def randomise(model: DiT, seed: int = 0) -> DiT:
    """Perturb every parameter so zero-initialised layers no longer hide the computation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


@pytest.mark.parametrize(
    "name, millions", [("DiT-S", 33), ("DiT-B", 130), ("DiT-L", 458), ("DiT-XL", 675)]
)
def test_preset_at_patch_2_has_the_papers_parameter_count(name, millions):
    config = network_config(
        {"preset": name, "patch_size": 2, "input_size": 32, "latent_channels": 4,
         "num_classes": 1000}
    )
    with torch.device("meta"):  # real modules, no memory: XL would take seconds to initialise
        model = DiT(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - millions) <= 0.05 * millions


def test_blocks_are_identity_and_output_is_zero_at_init():
    model = DiT(network_config(TINY))
    x = torch.randn(3, 16, model.config.hidden_size)
    c = torch.randn(3, model.config.hidden_size)
    for block in model.blocks:
        torch.testing.assert_close(block(x, c), x, rtol=0, atol=0)
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10]))
    assert out.shape == (3, 4, 8, 8)
    assert torch.count_nonzero(out) == 0


def test_forward_on_latents_equals_forward_on_raster_tokens():
    model = randomise(DiT(network_config(TINY)))
    latents = torch.randn(2, 4, 8, 8)
    t, labels = torch.tensor([3, 700]), torch.tensor([4, 10])
    from_latents = model(latents, t, labels)
    from_tokens = model(patchify(latents, 2), t, labels)
    torch.testing.assert_close(patchify(from_latents, 2), from_tokens)
    assert from_tokens.abs().sum() > 0


def test_eager_attention_matches_sdpa():
    sdpa = randomise(DiT(network_config(TINY)))
    eager = DiT(network_config({**TINY, "attention": "eager"}))
    eager.load_state_dict(sdpa.state_dict())
    args = torch.randn(2, 4, 8, 8), torch.tensor([10, 20]), torch.tensor([0, 1])
    torch.testing.assert_close(eager(*args), sdpa(*args), rtol=1e-4, atol=1e-5)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    method = experiment().build_method()
    batch = Batch(torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 3]))
    optimizer = torch.optim.Adam(method.model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        out = method.loss(batch, torch.Generator().manual_seed(1))  # same t, noise, dropout
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert out.per_token.shape == (4, 1, 16)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_is_the_weighted_mean_of_per_token_errors(prediction):
    method = experiment(
        diffusion={"prediction": prediction},
        factorisation={"diffusion_weighting": {"name": "min-snr", "gamma": 5.0}},
    ).build_method()
    randomise(method.model)
    batch = Batch(torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2]))
    out = method.loss(batch, torch.Generator().manual_seed(0))
    assert out.per_token.shape == (3, 1, 16)
    # min-snr gives weights < 1 at small t, so the weighted loss is below the plain mean.
    assert 0 < out.loss.item() < out.per_token.mean().item()


def test_label_dropout_maps_to_the_null_class():
    embedder = LabelEmbedder(num_classes=10, hidden_size=8, dropout=1.0)
    labels = torch.arange(10)
    assert (embedder.drop(labels) == 10).all()
    assert embedder(embedder.drop(labels)).shape == (10, 8)  # the null class has a row
    half = LabelEmbedder(num_classes=10, hidden_size=8, dropout=0.5)
    dropped = half.drop(labels.repeat(100), torch.Generator().manual_seed(0))
    kept = dropped != 10
    assert 0.4 < 1 - kept.float().mean().item() < 0.6
    assert (dropped[kept] == labels.repeat(100)[kept]).all()


def test_training_loss_drops_labels():
    method = experiment({**TINY, "class_dropout": 1.0}).build_method()
    randomise(method.model)
    latents = torch.randn(2, 4, 8, 8)
    a = method.loss(Batch(latents, torch.tensor([0, 1])), torch.Generator().manual_seed(0))
    b = method.loss(Batch(latents, torch.tensor([5, 7])), torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.loss, b.loss)


@pytest.mark.parametrize(
    "model, words",
    [
        ({"preset": "DiT-S", "cond_tokens": 4}, ["cond_tokens", "allowed: preset,", "patch_size"]),
        ({"preset": "DiT-XXL"}, ["DiT-XXL", "DiT-S", "DiT-tiny"]),
        ({"attention": "flex"}, ["flex", "sdpa, eager"]),
        ({"patch_size": 3}, ["patch_size 3", "input_size 8"]),
    ],
)
def test_check_rejects_bad_options_naming_the_allowed_ones(model, words):
    with pytest.raises(configs.ConfigError) as error:
        experiment(model)
    for word in words:
        assert word in str(error.value)


def test_cli_validates_a_dit_config(tmp_path, capsys):
    path = tmp_path / "dit.toml"
    path.write_text(
        '[method]\nname = "dit"\n\n[model]\npreset = "DiT-S"\npatch_size = 2\ninput_size = 32\n'
        "latent_channels = 4\nnum_classes = 10\n"
    )
    assert main(["config", "validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["config", "validate", str(path), "--set", "model.depths=3"]) == 2
    assert "depths" in capsys.readouterr().err



def test_generation_is_the_guided_reverse_process_of_the_whole_image():
    method = experiment().build_method()
    randomise(method.model)
    pipe = Pipeline(method)
    labels = torch.tensor([3, 7])
    got = pipe.generate_latents(labels, order="raster", steps=4, cfg=3.0, seed=5).latents

    generator = SampleGenerators(5, range(2))  # image i of a pipeline call draws from (5, i)
    both = torch.cat([labels, torch.full_like(labels, method.model.null_label)])

    def predict(x, t):  # CFG of the conditional and null-class forwards of the whole image
        return guide(*method.model(x.repeat(2, 1, 1), t.repeat(2), both).chunk(2), t, 3.0, (0, 1000))

    x = noise_like(torch.empty(2, 16, 16), generator)
    with torch.no_grad():  # as generation runs: the same kernels (CPU inference fuses the MLP's GELU)
        want = reverse_process(predict, respaced(method.diffusion, 4), plugins.build("samplers", "ddpm"),
                               x, "eps", generator)
    torch.testing.assert_close(got, unpatchify(want, 2, 4), rtol=0, atol=1e-6)


def test_generation_in_several_ar_steps_or_editing_is_refused():
    pipe = Pipeline(experiment().build_method())
    with pytest.raises(GenerationError, match="1 AR step from nothing given, got 2 AR steps"):
        pipe.generate_latents([1], ar_steps=2, steps=4)
    with pytest.raises(GenerationError, match="editing needs a causal model"):
        pipe.edit_latents(torch.zeros(1, 4, 8, 8), "centre", 1, steps=4)
