"""Precision: ``auto`` takes bf16 only where the CPU has native bf16 and the probe shows it pays
(or on a bf16 CUDA device), says why, caches its probe per machine and width, and training,
sampling and evaluation run in what it chose."""

import pytest
import torch

from cfkit import config as configs
from cfkit import precision
from cfkit.diffusion import GaussianDiffusion
from cfkit.generate import GenerationError, SamplingOptions, generate
from cfkit.transformer import CausalTransformer, TransformerConfig


@pytest.fixture(autouse=True)
def unforced(monkeypatch):
    """``auto`` decided by the machine, not by the suite's CFKIT_PRECISION=fp32 (conftest)."""
    monkeypatch.delenv(precision.ENVIRONMENT, raising=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CFKIT_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("asked", ["fp32", "bf16"])
def test_an_explicit_precision_is_kept_whatever_the_machine(asked, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: set())
    chosen = precision.resolve(asked, "cpu")
    assert chosen.name == asked and "asked for" in chosen.reason


def test_an_unknown_precision_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown precision 'fp16'; allowed: auto, fp32, bf16"):
        precision.resolve("fp16", "cpu")
    with pytest.raises(GenerationError, match="allowed: auto, fp32, bf16"):
        SamplingOptions(precision="fp16")
    with pytest.raises(configs.ConfigError, match="train.precision"):
        configs.validate({"train": {"precision": "fp16"}})


def test_auto_is_fp32_on_a_cpu_without_native_bf16_and_says_so(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(precision, "probe", lambda width: pytest.fail("no probe without native bf16"))
    chosen = precision.resolve("auto", "cpu", 384)
    assert chosen.name == "fp32"
    assert "without native bf16" in chosen.reason and "avx512_bf16" in chosen.reason


@pytest.mark.parametrize(("speedup", "expected"), [(3.0, "bf16"), (1.0, "fp32")])
def test_auto_on_a_native_bf16_cpu_follows_the_probe(speedup, expected, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(precision, "probe", lambda width: speedup)
    chosen = precision.resolve("auto", "cpu", 384)
    assert chosen.name == expected
    assert "avx512_bf16" in chosen.reason and f"{speedup:.2f}x" in chosen.reason


@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_cfkit_precision_says_what_auto_means_whatever_the_probe(forced, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(precision, "probe", lambda width: {"fp32": 10.0, "bf16": 0.1}[forced])
    monkeypatch.setenv("CFKIT_PRECISION", forced)
    chosen = precision.resolve("auto", "cpu", 384)
    assert chosen.name == forced and chosen.reason == f"auto: CFKIT_PRECISION={forced}"
    assert precision.resolve("fp32" if forced == "bf16" else "bf16", "cpu").name != forced
    monkeypatch.setenv("CFKIT_PRECISION", "fp16")
    with pytest.raises(ValueError, match="CFKIT_PRECISION: unknown precision 'fp16'"):
        precision.resolve("auto", "cpu")


def test_auto_keeps_a_float64_network_in_float64(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})
    monkeypatch.setattr(precision, "probe", lambda width: 10.0)
    assert precision.resolve("auto", "cpu", 384, torch.float64).name == "fp32"


def test_the_probe_runs_once_per_width_and_is_read_back_from_the_cache(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(precision, "_best_time", lambda mlp, x, bf16, repeats: calls.append(bf16) or
                        (2.0 if not bf16 else 1.0))
    assert precision.probe(16) == 2.0 and len(calls) == 2
    assert precision.probe(16) == 2.0 and len(calls) == 2  # cached
    assert len(list((cache / "precision").glob("*.json"))) == 1
    precision.probe(24)
    assert len(calls) == 4


def test_the_probe_measures_a_real_mlp_inside_no_grad(cache):
    with torch.no_grad():
        speedup = precision.probe(16, repeats=1)
    assert speedup > 0


def tiny_model() -> CausalTransformer:
    torch.manual_seed(0)
    config = TransformerConfig(input_size=4, latent_channels=2, hidden_size=32, depth=2, num_heads=2,
                               num_classes=5)
    model = CausalTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_sampling_runs_the_network_in_the_precision_chosen_and_reports_it():
    model, diffusion = tiny_model(), GaussianDiffusion.named("linear", 1000)

    def run(asked):
        return generate(model, diffusion, [0, 3], SamplingOptions(steps=4, precision=asked),
                        generator=torch.Generator().manual_seed(0))

    fp32, bf16 = run("fp32"), run("bf16")
    assert (fp32.precision.name, bf16.precision.name) == ("fp32", "bf16")
    assert fp32.tokens.dtype == bf16.tokens.dtype == torch.float32  # the sampler's maths stays fp32
    difference = (fp32.tokens - bf16.tokens).abs().max()
    assert 0 < difference < 0.1 * fp32.tokens.abs().max()


def test_training_defaults_to_auto():
    assert configs.validate({}).train.precision == "auto"
