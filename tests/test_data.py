"""Data: datasets (mnist, digits, shapes, imagefolder), ``cfkit shards`` (pixels and pre-encoded
latents) read back with plain webdataset, the shard loader (ranks, workers, epochs, corrupt
data) and ``cfkit tokenizer train`` on a dataset's captions."""

import io
import logging
import re
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from cfkit_plugins.vae import KLAutoencoder, VAEConfig
from PIL import Image

from cfkit import cli, data, plugins
from cfkit.tokenizers import from_uint8

DIGITS = 1797  # scikit-learn's digits; every fifth is validation
TINY_VAE = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, embed_dim=4, encoder_attn_resolutions=[16],
                structural_resolution=32)


def dataset(name: str, **options):
    return plugins.build("datasets", name, **options)


def shards_of(folder) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.tar"))


def webdataset_samples(folder) -> list[dict]:
    """The shards read with plain webdataset only (no cfkit code), in order; ``png`` as bytes."""
    return list(wds.WebDataset(shards_of(folder), shardshuffle=False).decode())


def stream_keys(stream: data.ShardStream, batches: int | None = None, workers: int = 0) -> list[list[str]]:
    out = []
    for item in data.loader(stream, workers):
        out.append(item["keys"])
        if batches is not None and len(out) == batches:
            break
    return out


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    data.write_shards(dataset("digits"), folder, "train", shard_size=300, prefix="digits")
    return folder


# --- datasets -----------------------------------------------------------------------------------


def test_digits_split_is_fixed_disjoint_and_covers_every_image():
    digits = dataset("digits")
    train, val = list(digits.samples("train")), list(digits.samples("val"))
    assert len(train) + len(val) == DIGITS and len(val) == (DIGITS + 4) // 5
    assert not {s.key for s in train} & {s.key for s in val}
    again = list(dataset("digits").samples("val"))
    assert [s.key for s in again] == [s.key for s in val]
    assert all(np.array_equal(a.image, b.image) and a.label == b.label
               for a, b in zip(again, val, strict=True))
    assert val[0].image.shape == (8, 8, 1) and val[0].image.dtype == np.uint8
    with pytest.raises(ValueError, match="unknown split 'test'; allowed: train, val"):
        next(digits.samples("test"))


def test_mnist_split_is_450_train_and_50_val_per_class_disjoint_and_fixed():
    mnist = dataset("mnist")
    train, val = list(mnist.samples("train")), list(mnist.samples("val"))
    assert np.bincount([s.label for s in train]).tolist() == [450] * 10
    assert np.bincount([s.label for s in val]).tolist() == [50] * 10
    assert not {s.key for s in train} & {s.key for s in val}
    assert [s.key for s in dataset("mnist").samples("val")] == [s.key for s in val]
    assert val[0].image.shape == (28, 28, 1) and val[0].image.dtype == np.uint8
    assert max(int(s.image.max()) for s in val[:20]) == 255  # real 0..255 strokes, not 0..16


def test_mnist_resizes_by_area_and_rejects_sizes_it_cannot_make():
    native = next(dataset("mnist").samples("val")).image[..., 0].astype(float)
    small = next(dataset("mnist", image_size=14).samples("val")).image[..., 0].astype(float)
    assert small.shape == (14, 14)
    pooled = native.reshape(14, 2, 14, 2).mean(axis=(1, 3))  # an exact 2x area average
    assert np.abs(small - pooled).max() <= 1
    for bad in (2, 29):
        with pytest.raises(ValueError, match="image_size must be in 4..28"):
            dataset("mnist", image_size=bad)


def test_shapes_is_deterministic_from_its_seed_at_any_size_with_paraphrased_captions():
    def drawn(seed, size=7, split="train"):
        return list(dataset("shapes", size=size, image_size=8, seed=seed).samples(split))

    first, again, other = drawn(1), drawn(1), drawn(2)
    assert len(first) == 7 and len(drawn(1, split="val")) == 1 and len(drawn(1, size=1)) == 1
    assert [s.key for s in first] == [s.key for s in again]
    assert all(np.array_equal(a.image, b.image) and a.captions == b.captions
               for a, b in zip(first, again, strict=True))
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(first, other, strict=True))
    for sample in first:
        assert sample.image.shape == (8, 8, 3)
        assert len(set(sample.captions)) >= 3  # several paraphrases of one scene
        shape = next(name for name in ("circle", "square", "triangle") if name in sample.captions[0])
        assert all(shape in caption for caption in sample.captions)
        assert sample.label // 4 == ("circle", "square", "triangle").index(shape)


def adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion's ``center_crop_arr`` (image_datasets.py), verbatim: the oracle."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An ImageNet-layout folder: train/ and val/ with class sub-folders of PNGs of odd sizes."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    files = {("train", "dog"): [(40, 24), (17, 13)], ("train", "cat"): [(9, 30)], ("val", "cat"): [(12, 12)],
             ("val", "dog"): [(50, 64)]}
    for (split, name), sizes in files.items():
        (root / split / name).mkdir(parents=True)
        for i, (width, height) in enumerate(sizes):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / name / f"img.{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_reads_class_folders_with_adm_centre_crop(image_folder):
    folder = dataset("imagefolder", path=str(image_folder), image_size=8)
    assert folder.num_classes == 2 and folder.classes == ["cat", "dog"]
    train = list(data.dataset_samples(folder, "train"))
    assert [(s.key, s.label) for s in train] == [("cat-img_0", 0), ("dog-img_0", 1), ("dog-img_1", 1)]
    val = data.dataset_samples(folder, "val")
    assert [(s.key, s.label) for s in val] == [("cat-img_0", 0), ("dog-img_0", 1)]
    for split in ("train", "val"):  # sizes below, between and above 2x the target: every ADM path
        for sample in data.dataset_samples(folder, split):
            name, index = sample.key.split("-img_")
            with Image.open(image_folder / split / name / f"img.{index}.png") as image:
                want = adm_center_crop_arr(image.convert("RGB"), 8)
            assert sample.image.shape == (8, 8, 3)
            np.testing.assert_array_equal(sample.image, want)


# --- cfkit shards, read back with plain webdataset ------------------------------------------


@pytest.mark.parametrize("name, options, split, count", [
    ("digits", {}, "val", (DIGITS + 4) // 5),
    ("shapes", {"size": 30, "image_size": 8, "seed": 3}, "train", 30),
])
def test_shards_are_read_back_by_plain_webdataset(tmp_path, capsys, name, options, split, count):
    out = tmp_path / "shards"
    args = [a for k, v in options.items() for a in ("--option", f"{k}={v}")]
    rc = cli.main(["shards", name, "--out", str(out), "--split", split, "--shard-size", "8", *args])
    assert rc == 0, capsys.readouterr().err
    assert len(shards_of(out)) == -(-count // 8)
    got = webdataset_samples(out)
    want = list(data.dataset_samples(dataset(name, **options), split))
    assert len(got) == len(want) == count
    for sample, expected in zip(got, want, strict=True):
        assert sample["__key__"] == expected.key
        image = np.asarray(Image.open(io.BytesIO(sample["png"])))
        np.testing.assert_array_equal(image.reshape(expected.image.shape), expected.image)
        assert sample["cls"] == expected.label
        assert sample.get("json") == expected.captions  # a JSON list of captions, or absent


def test_shards_are_byte_identical_when_written_again(tmp_path):
    shapes = dataset("shapes", size=12, image_size=8)
    first = data.write_shards(shapes, tmp_path / "a", shard_size=5)
    second = data.write_shards(shapes, tmp_path / "b", shard_size=5)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_imagefolder_images_are_read_only_when_written_and_each_once(tmp_path, image_folder, monkeypatch):
    folder = dataset("imagefolder", path=str(image_folder), image_size=8)
    read = []
    original = type(folder).read
    monkeypatch.setattr(type(folder), "read", lambda self, path, key, label: read.append(key) or
                        original(self, path, key, label))
    items = list(folder.samples("train"))
    assert [item.key for item in items] == ["cat-img_0", "dog-img_0", "dog-img_1"] and read == []
    data.write_shards(folder, tmp_path / "shards", shard_size=2)
    assert read == ["cat-img_0", "dog-img_0", "dog-img_1"]


def test_imagefolder_shards_from_the_cli(tmp_path, image_folder, capsys):
    out = tmp_path / "shards"
    rc = cli.main(["shards", "imagefolder", str(image_folder), "--out", str(out), "--option", "image_size=8"])
    assert rc == 0, capsys.readouterr().err
    assert [(s["__key__"], s["cls"]) for s in webdataset_samples(out)] == [
        ("cat-img_0", 0), ("dog-img_0", 1), ("dog-img_1", 1)]


# --- cfkit shards --encode --------------------------------------------------------------------


def test_encode_writes_fp16_latents_and_their_flips_instead_of_pixels(tmp_path, capsys):
    out = tmp_path / "latents"
    rc = cli.main(["shards", "shapes", "--out", str(out), "--option", "size=6", "--option", "image_size=8",
                   "--encode", "pixels", "--tokenizer-option", "channels=3",
                   "--tokenizer-option", "scale=0.5"])
    assert rc == 0, capsys.readouterr().err
    got = webdataset_samples(out)
    want = list(dataset("shapes", size=6, image_size=8).samples("train"))
    assert len(got) == 6
    for sample, expected in zip(got, want, strict=True):
        assert "png" not in sample and sample["cls"] == expected.label
        latent, flipped = sample["latent.npy"], sample["latent_flip.npy"]
        assert latent.dtype == flipped.dtype == np.float16 and latent.shape == (3, 8, 8)
        image = from_uint8(expected.image[None])[0].numpy()
        np.testing.assert_array_equal(latent, (0.5 * image).astype(np.float16))
        np.testing.assert_array_equal(flipped, latent[..., ::-1])


@pytest.mark.parametrize("args, message", [
    (["--encode", "pixels", "--tokenizer-option", "chanels=3"],
     "image_tokenizers 'pixels' has no option 'chanels'; allowed: channels, scale"),
    (["--encode", "pixels", "--tokenizer-option", "channels"], "--set expects KEY=VALUE"),
    (["--encode", "pixels", "--tokenizer-option", "channels=2"], "pixels: channels must be 1 or 3, got 2"),
    (["--encode", "pixels"], "declares 1 latent channel.*3-channel images.*pixels: channels = 3"),
    (["--encode", "mar-vae"], "image_tokenizers 'mar-vae' needs option 'path'; allowed: path, ch, "),
    (["--encode", "no-such"], "unknown image_tokenizers name 'no-such'; known: .*pixels"),
    (["--tokenizer-option", "channels=3"], "--tokenizer-option needs --encode TOKENIZER"),
    (["--option", "sise=4"], "datasets 'shapes' has no option 'sise'; allowed: size, image_size, seed"),
])
def test_bad_shard_options_say_what_is_wrong_and_what_is_allowed(tmp_path, capsys, args, message):
    rc = cli.main(["shards", "shapes", "--out", str(tmp_path / "out"), "--option", "image_size=8",
                   "--option", "size=2", *args])
    assert rc == 2
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A randomly initialised two-level VAE saved as MAR ships its VAE (as tests/test_vae.py)."""
    torch.manual_seed(0)
    config = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_VAE.items()})
    model = KLAutoencoder(config)
    path = tmp_path_factory.mktemp("vae") / "tiny.ckpt"
    torch.save({"model": model.state_dict()}, path)
    return path


def test_encode_with_mar_vae_from_a_local_checkpoint(tmp_path, capsys, tiny_vae):
    options = [f"path={tiny_vae}"] + [f"{k}={v}" for k, v in TINY_VAE.items()]
    out = tmp_path / "latents"
    rc = cli.main(["shards", "shapes", "--out", str(out), "--option", "size=3", "--option", "image_size=16",
                   "--encode", "mar-vae", *[a for o in options for a in ("--tokenizer-option", o)]])
    assert rc == 0, capsys.readouterr().err
    tokenizer = plugins.build("image_tokenizers", "mar-vae", path=str(tiny_vae), **TINY_VAE)
    shapes = dataset("shapes", size=3, image_size=16)
    images = from_uint8(np.stack([s.image for s in shapes.samples("train")]))
    want = tokenizer.encode(images).half().numpy()
    got = webdataset_samples(out)
    assert [s["latent.npy"].shape for s in got] == [(4, 8, 8)] * 3
    np.testing.assert_array_equal(np.stack([s["latent.npy"] for s in got]), want)
    np.testing.assert_array_equal(np.stack([s["latent_flip.npy"] for s in got]),
                                  tokenizer.encode(images.flip(-1)).half().numpy())


# --- the loader -------------------------------------------------------------------------------


def test_read_tar_groups_files_as_webdataset_does(tmp_path, digits_shards):
    for shard in shards_of(digits_shards)[:2]:
        plain = [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
                 for s in wds.WebDataset(shard, shardshuffle=False)]
        assert list(data.read_tar(shard)) == plain
    # a pax header (float mtime), a GNU long name and a ustar prefix, as other writers make them
    long = "d" * 60 + "/" + "e" * 60 + "/sample-1"
    path = tmp_path / "other.tar"
    formats = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}
    for name, format in formats.items():
        with tarfile.open(path, "w", format=format) as tar:
            for file, content in ((f"{long}.cls", b"3"), (f"{long}.json", b'["a"]'), ("short.cls", b"4")):
                info = tarfile.TarInfo(file)
                info.size, info.mtime = len(content), 1.5 if name == "pax" else 1
                tar.addfile(info, io.BytesIO(content))
        assert list(data.read_tar(path)) == [{"__key__": long, "cls": b"3", "json": b'["a"]'},
                                             {"__key__": "short", "cls": b"4"}], name


def test_two_ranks_see_disjoint_halves_of_each_global_batch(digits_shards):
    options = dict(seed=5, shuffle_buffer=200, flip=True)
    whole = data.loader(data.ShardStream(digits_shards, 16, **options))
    halves = [data.loader(data.ShardStream(digits_shards, 8, rank=rank, world_size=2, **options))
              for rank in (0, 1)]
    for _, full, first, second in zip(range(6), whole, *halves, strict=False):  # endless streams
        assert not set(first["keys"]) & set(second["keys"])
        assert first["keys"] + second["keys"] == full["keys"]
        torch.testing.assert_close(torch.cat([first["images"], second["images"]]), full["images"])
        assert first["index"] == second["index"] == full["index"]


def test_epochs_continue_past_the_end_of_the_data_reshuffled(digits_shards):
    count = DIGITS - (DIGITS + 4) // 5
    batches = stream_keys(data.ShardStream(digits_shards, 25, shuffle_buffer=300), -(-2 * count // 25))
    keys = [key for batch in batches for key in batch]
    first, second = keys[:count], keys[count:2 * count]
    assert len(set(first)) == len(set(second)) == count and set(first) == set(second)
    assert first != second  # each epoch draws its own order
    assert len(stream_keys(data.ShardStream(digits_shards, 25, epochs=1))) == count // 25


def test_two_workers_give_the_same_stream_without_duplicates(digits_shards):
    count = DIGITS - (DIGITS + 4) // 5
    one = stream_keys(data.ShardStream(digits_shards, 32, seed=1, shuffle_buffer=300, epochs=1))
    two = stream_keys(data.ShardStream(digits_shards, 32, seed=1, shuffle_buffer=300, epochs=1), workers=2)
    keys = [key for batch in two for key in batch]
    assert len(keys) == len(set(keys)) == count // 32 * 32
    assert two == one


def test_corrupt_shards_and_samples_are_skipped_and_counted(tmp_path, caplog):
    shapes = dataset("shapes", size=30, image_size=8)
    samples = list(shapes.samples("train"))
    data.write_shards(shapes, tmp_path, shard_size=10)
    truncated = tmp_path / "shapes-train-000001.tar"
    with tarfile.open(truncated) as tar:
        png = tar.getmembers()[8]  # the third sample's png (cls, json, png a sample)
    truncated.write_bytes(truncated.read_bytes()[:png.offset_data + png.size // 2])
    with pytest.raises(ValueError, match="truncated inside a file"):
        list(data.read_tar(truncated))
    kept = [s["__key__"] for s in _until_error(data.read_tar(truncated))]
    assert kept == [s.key for s in samples[10:12]]
    (tmp_path / "garbage.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    with wds.TarWriter(str(tmp_path / "png.tar")) as sink:
        sink.write({"__key__": "fine", "png": data.png_bytes(samples[0].image), "cls": b"1"})
        sink.write({"__key__": "broken", "png": b"\x89PNG\r\n\x1a\n not really", "cls": b"1"})
    stream = data.ShardStream(tmp_path, 1, shuffle_buffer=10, epochs=1)
    with caplog.at_level(logging.WARNING, logger="cfkit.data"):
        keys = [key for batch in stream_keys(stream) for key in batch]
    assert (stream.errors.shards, stream.errors.samples) == (2, 1)
    assert sorted(keys) == sorted([s.key for s in samples[:10] + samples[20:]] + kept + ["fine"])
    assert "skipped corrupt sample broken" in caplog.text and "garbage.tar" in caplog.text


def test_corrupt_samples_add_up_across_loader_workers(tmp_path):
    shapes = dataset("shapes", size=12, image_size=8)
    with wds.TarWriter(str(tmp_path / "png.tar")) as sink:
        for i, sample in enumerate(shapes.samples("train")):
            png = b"\x89PNG not really" if i in (2, 9) else data.png_bytes(sample.image)
            sink.write({"__key__": f"k{i}", "png": png, "cls": b"1"})
    errors, keys = data.LoaderErrors(), []
    for item in data.loader(data.ShardStream(tmp_path, 2, shuffle_buffer=1, flip=False, epochs=1), 2):
        errors.update(item)
        keys += item["keys"]
    assert {worker for worker in errors.latest} == {0, 1}
    assert (errors.shards, errors.samples) == (0, 2) and len(keys) == 10


def _until_error(samples):
    try:
        yield from samples
    except ValueError:
        return


def test_a_stream_of_only_corrupt_shards_is_an_error(tmp_path):
    (tmp_path / "garbage.tar").write_bytes(b"x" * 2048)
    with pytest.raises(data.DataError, match="no usable sample in 1 shard.*garbage.tar: not a tar"):
        next(iter(data.ShardStream(tmp_path, 2)))


# --- cfkit tokenizer train on a dataset's captions ----------------------------------------------


def test_tokenizer_train_on_shapes_captions_round_trips_through_bpe(tmp_path, capsys):
    out = tmp_path / "tokenizer.json"
    rc = cli.main(["tokenizer", "train", "--dataset", "shapes", "--option", "size=100", "--vocab-size", "300",
                   "--out", str(out)])
    assert rc == 0 and "from 500 captions" in capsys.readouterr().out  # five per image
    bpe = plugins.build("text_tokenizers", "bpe", path=str(out))
    captions = [c for s in dataset("shapes", size=50, seed=9).samples("val") for c in s.captions]
    for caption in captions + ["an unseen caption: ünïcødé ☕"]:
        ids = bpe.encode(caption)
        assert bpe.decode([bpe.bos_id, *ids, bpe.eos_id, bpe.pad_id]) == caption
    # merges were learned: far fewer ids than bytes
    assert sum(len(bpe.encode(c)) for c in captions) < sum(len(c.encode()) for c in captions) / 2


def test_tokenizer_train_needs_a_dataset_with_captions(tmp_path, capsys):
    rc = cli.main(["tokenizer", "train", "--dataset", "digits", "--vocab-size", "300",
                   "--out", str(tmp_path / "t.json")])
    assert rc == 2 and "dataset digits has no captions in its train split" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()
