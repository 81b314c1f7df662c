"""The generation interfaces: ``cfkit.load(...)`` pipelines and the ``cfkit sample`` and
``cfkit edit`` commands, on a checkpoint whose tokenizer decodes to images and on a converted
official checkpoint (latents only); a sample set is the same in any batch size and under
torchrun (2 gloo processes write exactly the files of 1)."""

import io
import re
import sys

import numpy as np
import pytest
import torch
from conftest import assert_rc, perturbed_checkpoint, torchrun_cfkit
from generation_plugins import install_third_party
from PIL import Image
from refdata import missing, reference_files

import cfkit
from cfkit import config as configs
from cfkit.cli import main
from cfkit.convert import convert_official
from cfkit.generate import GenerationError
from cfkit.tokenizers import to_uint8

OPTIONS = ["--ar-steps", "2", "--steps", "4", "--cfg", "2", "--seed", "3", "--no-progress"]
API_OPTIONS = dict(ar_steps=2, steps=4, cfg=2.0, seed=3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pixels_checkpoint(tmp_path_factory):
    """A tiny 4x4 RGB model whose tokenizer (pixels, 3 channels) decodes its latents."""
    experiment = configs.validate({
        "name": "tiny-rgb", "method": {"name": "causalfusion"},
        "model": {"input_size": 4, "latent_channels": 3, "hidden_size": 32, "depth": 2,
                  "num_heads": 2, "num_classes": 5},
        "data": {"dataset": {"name": "digits"}, "tokenizer": {"name": "pixels", "channels": 3}},
    })
    return perturbed_checkpoint(experiment, tmp_path_factory.mktemp("rgb") / "ckpt")


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    """The reference's tiny model, converted: 4 latent channels that no tokenizer decodes."""
    found = reference_files("official_tiny_*.pt")
    if not found:
        pytest.skip(missing("official_tiny_*.pt"))
    return convert_official(found[0], tmp_path_factory.mktemp("official") / "ckpt")


def cli(*args) -> int:
    return main([str(a) for a in args])


def test_load_gives_a_pipeline_generating_reproducible_images(pixels_checkpoint):
    pipe = cfkit.load(pixels_checkpoint)
    images = pipe.generate([1, 4], order="random", **API_OPTIONS)
    assert images.shape == (2, 3, 4, 4) and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(pipe.generate([1, 4], order="random", **API_OPTIONS), images,
                               atol=0, rtol=0)
    latents = pipe.generate_latents([1, 4], **API_OPTIONS).latents
    torch.testing.assert_close(pipe.decode(latents), images, atol=0, rtol=0)
    assert not torch.equal(pipe.generate([1, 4], **{**API_OPTIONS, "seed": 4}), images)


@pytest.mark.reference
def test_without_an_image_tokenizer_the_pipeline_returns_latents(official_checkpoint):
    pipe = cfkit.load(official_checkpoint)
    assert pipe.tokenizer is None
    latents = pipe.generate([0, 3, 6], **API_OPTIONS)
    config = pipe.model.config
    assert latents.shape == (3, config.latent_channels, config.input_size, config.input_size)
    assert latents.abs().max() > 1  # raw latents, not clamped images
    with pytest.raises(GenerationError, match="generate returns latents, not images"):
        pipe.to_pil(latents)


def test_to_pil_gives_the_generated_images_as_pil_images_to_save(pixels_checkpoint, tmp_path):
    pipe = cfkit.load(pixels_checkpoint)
    images = pipe.generate([1, 4], **API_OPTIONS)  # float (N, C, H, W) in [-1, 1]
    pictures = pipe.to_pil(images)
    assert [(p.mode, p.size) for p in pictures] == [("RGB", (4, 4))] * 2
    pictures[1].save(tmp_path / "one.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one.png")), to_uint8(images)[1])
    with pytest.raises(GenerationError, match=r"images must be \(N, 3, 4, 4\) for this checkpoint, "
                       r"got \(2, 1, 4, 4\)"):
        pipe.to_pil(images[:, :1])


def test_pipeline_edit_keeps_the_kept_region(pixels_checkpoint):
    pipe = cfkit.load(pixels_checkpoint)
    images = pipe.generate([1, 2], **API_OPTIONS)
    edited = pipe.edit(images, "top", 4, ar_steps=2, steps=4, seed=5)
    torch.testing.assert_close(edited[..., :2, :], images[..., :2, :], atol=0, rtol=0)
    assert not torch.equal(edited[..., 2:, :], images[..., 2:, :])


def test_cli_sample_writes_npz_pngs_and_a_grid_equal_to_the_api(pixels_checkpoint, tmp_path, capsys):
    out = tmp_path / "samples"
    assert cli("sample", pixels_checkpoint, "--class", 1, 2, "--num", 3, *OPTIONS, "--out", out) == 0
    assert "wrote 3 sample(s)" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "grid.png", "samples.npz"]
    saved = np.load(out / "samples.npz")
    assert saved["labels"].tolist() == [1, 2, 1]
    images = cfkit.load(pixels_checkpoint).generate([1, 2, 1], **API_OPTIONS)
    np.testing.assert_array_equal(saved["arr_0"], to_uint8(images))
    assert saved["arr_0"].shape == (3, 4, 4, 3) and saved["latents"].shape == (3, 3, 4, 4)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{i:06d}.png")), saved["arr_0"][i])
    # 2 x 2 cells, the last one empty; the 4x4 images upscaled 16 times, 2 grey pixels around each
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * 68, 2 * 68, 3)
    tile = np.kron(saved["arr_0"][2], np.ones((16, 16, 1), np.uint8))
    np.testing.assert_array_equal(grid[68 + 2:68 + 66, 2:66], tile)
    frame = np.ones(grid.shape[:2], bool)
    for top, left in ((2, 2), (2, 70), (70, 2)):
        frame[top:top + 64, left:left + 64] = False
    assert (grid[frame] == 96).all()  # the gaps and the empty cell


def test_cli_sample_with_dpm_solver_pp_in_20_steps_equals_the_api(pixels_checkpoint, tmp_path):
    out = tmp_path / "samples"
    assert cli("sample", pixels_checkpoint, "--class", 1, 2, "--sampler", "dpm-solver++",
               "--steps", 20, "--ar-steps", 2, "--seed", 3, "--no-progress", "--out", out) == 0
    images = cfkit.load(pixels_checkpoint).generate([1, 2], sampler="dpm-solver++", steps=20,
                                                     ar_steps=2, seed=3)
    np.testing.assert_array_equal(np.load(out / "samples.npz")["arr_0"], to_uint8(images))


def test_a_sample_set_is_the_same_in_any_batch_size(pixels_checkpoint, tmp_path):
    """Image i is drawn from (seed, i): batches of 1 give the images of one batch of 5 (up to
    float32 rounding, which may move a pixel by one level), and one batch is the API's call."""
    saved = {}
    for batch_size in (1, 2, 5):
        out = tmp_path / f"batch-{batch_size}"
        assert cli("sample", pixels_checkpoint, "--class", 1, 2, 3, "--num", 5, "--batch-size",
                   batch_size, *OPTIONS, "--out", out) == 0
        saved[batch_size] = np.load(out / "samples.npz")
    expected = cfkit.load(pixels_checkpoint).generate_latents([1, 2, 3, 1, 2], **API_OPTIONS).latents
    np.testing.assert_array_equal(saved[5]["latents"], expected.numpy())
    for batch_size in (1, 2):
        np.testing.assert_allclose(saved[batch_size]["latents"], saved[5]["latents"], atol=1e-4, rtol=1e-5)
        levels = np.abs(saved[batch_size]["arr_0"].astype(int) - saved[5]["arr_0"])
        assert levels.max() <= 1 and levels.mean() < 0.05
    # the seed + b per batch it replaced gave batches of 1 five copies of one draw
    assert not np.allclose(saved[1]["latents"][0], saved[1]["latents"][3])


def test_two_torchrun_processes_write_exactly_the_samples_of_one(pixels_checkpoint, tmp_path,
                                                                 monkeypatch):
    """5 images in batches of 2: rank 0 generates batches 0 and 2, rank 1 batch 1 (and
    nothing in the last round); rank 0 gathers and writes them in order."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a gloo group on the CPU
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ("sample", pixels_checkpoint, "--class", 1, 2, 3, "--num-samples", 5, "--batch-size", 2, *OPTIONS)
    assert cli(*args, "--out", tmp_path / "one") == 0
    done = torchrun_cfkit(*map(str, args), "--out", str(tmp_path / "two"))
    assert_rc(done, 0)
    assert done.stdout.count("wrote 5 sample(s)") == 1  # rank 0 alone writes and says so
    one, two = (sorted((tmp_path / name).iterdir()) for name in ("one", "two"))
    assert [p.name for p in two] == [p.name for p in one]  # no staging folder left behind
    for a, b in zip(one, two, strict=True):
        if a.suffix == ".png":
            assert a.read_bytes() == b.read_bytes(), a.name
    first, second = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert sorted(second.files) == sorted(first.files) == ["arr_0", "labels", "latents"]
    for key in first.files:
        np.testing.assert_array_equal(second[key], first[key])


def test_cli_sample_without_an_image_tokenizer_writes_latents_only(official_checkpoint, tmp_path):
    out = tmp_path / "latents"
    assert cli("sample", official_checkpoint, "--class", 3, *OPTIONS, "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["samples.npz"]
    saved = np.load(out / "samples.npz")
    assert sorted(saved.files) == ["labels", "latents"]
    expected = cfkit.load(official_checkpoint).generate([3], **API_OPTIONS)
    np.testing.assert_array_equal(saved["latents"], expected.numpy())


def test_cli_edit_encodes_the_png_and_keeps_the_region(pixels_checkpoint, tmp_path):
    source = to_uint8(cfkit.load(pixels_checkpoint).generate([0], **API_OPTIONS))[0]
    png = tmp_path / "in.png"
    Image.fromarray(source).save(png)
    out = tmp_path / "edited"
    assert cli("edit", pixels_checkpoint, "--image", png, "--keep", "bottom", "--class", 4,
               *OPTIONS, "--out", out) == 0
    edited = np.load(out / "samples.npz")
    assert edited["labels"].tolist() == [4]
    np.testing.assert_array_equal(edited["arr_0"][0, 2:], source[2:])
    assert (edited["arr_0"][0, :2] != source[:2]).any()


def test_third_party_components_work_by_name_in_the_cli_and_the_api(pixels_checkpoint, tmp_path,
                                                                  monkeypatch):
    install_third_party(monkeypatch)
    out = tmp_path / "third-party"
    assert cli("sample", pixels_checkpoint, "--class", 2, "--order", "reverse-raster",
               "--schedule", "halves", "--steps", 4, "--no-progress", "--out", out) == 0
    pipe = cfkit.load(pixels_checkpoint)
    result = pipe.generate_latents([2], order="reverse-raster", schedule="halves", steps=4)
    assert result.order.tolist() == [list(range(15, -1, -1))]
    assert result.step_sizes.tolist() == [8, 8]
    np.testing.assert_array_equal(np.load(out / "samples.npz")["latents"], result.latents.numpy())


BAD_SAMPLES = {
    "class out of range": (["--class", 5], "class 5 is out of range; this model has 5 classes: "
                                          "allowed 0..4"),
    "unknown order": (["--class", 1, "--order", "zigzag"],
                      "unknown orderings name 'zigzag'; known: block-raster, dilated, random, raster"),
    "unknown sampler": (["--class", 1, "--sampler", "euler"], "unknown samplers name 'euler'; known: "),
    "one diffusion step": (["--class", 1, "--steps", 1], "allowed: an int N >= 2, 'ddimN'"),
    "cfg below 1": (["--class", 1, "--cfg", "0.5"], "cfg scale must be >= 1"),
    "too many AR steps": (["--class", 1, "--ar-steps", 17], "ar_steps must be in 1..16"),
    "eta for ddpm": (["--class", 1, "--eta", "0.5"], "samplers 'ddpm' with options {'eta': 0.5}"),
}


@pytest.mark.parametrize("args,message", BAD_SAMPLES.values(), ids=BAD_SAMPLES.keys())
def test_cli_sample_bad_input_exits_2_naming_what_is_allowed(pixels_checkpoint, tmp_path, capsys,
                                                           args, message):
    out = tmp_path / "never"
    assert cli("sample", pixels_checkpoint, *args, "--no-progress", "--out", out) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_edit_bad_input_exits_2(pixels_checkpoint, official_checkpoint, tmp_path, capsys):
    png = tmp_path / "big.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(png)
    assert cli("edit", pixels_checkpoint, "--image", png, "--keep", "top", "--class", 1,
               "--out", tmp_path / "x") == 2
    assert "images must be (N, 3, 4, 4) for this checkpoint, got (1, 3, 8, 8)" in capsys.readouterr().err
    assert cli("edit", official_checkpoint, "--image", png, "--keep", "top", "--class", 1,
               "--out", tmp_path / "x") == 2
    assert "PNG cannot be encoded" in capsys.readouterr().err
    assert cli("sample", tmp_path / "missing", "--class", 1, "--out", tmp_path / "x") == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [[], ["--no-progress"]])
def test_cli_sample_logs_every_diffusion_step_in_a_line_off_a_terminal(pixels_checkpoint, tmp_path,
                                                                      capsys, flags):
    assert cli("sample", pixels_checkpoint, "--class", 1, "--steps", 3, "--ar-steps", 2,
               "--out", tmp_path / "bar", *flags) == 0
    err = capsys.readouterr().err
    # T x S diffusion steps; stderr is no terminal here: no bar's carriage returns
    assert re.fullmatch(r"diffusion steps: 6/6 steps, [\d.]+ steps/s, in 00:00\n", err)


def test_cli_sample_draws_a_bar_on_a_terminal_unless_no_progress(pixels_checkpoint, tmp_path,
                                                                  monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for flags, bar in (([], True), (["--no-progress"], False)):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert cli("sample", pixels_checkpoint, "--class", 1, "--steps", 3, "--ar-steps", 2,
                   "--out", tmp_path / str(bar), *flags) == 0
        assert ("\r" in terminal.getvalue()) == bar and "diffusion steps: 6/6 steps, " in terminal.getvalue()
