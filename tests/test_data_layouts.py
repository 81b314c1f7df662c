"""Community shard layouts: shards written by webdataset's own ``ShardWriter`` as img2dataset
writes them (``jpg``, ``txt``, ``json`` metadata with a ``caption``, ``.parquet`` and stats files
beside the tars) and as the ImageNet ``*-wds`` sets are (``jpg`` / ``jpeg`` / ``webp`` images,
``cls`` labels, keys with dots such as ``n01440764_10026.JPEG``), read in brace notation, with
the keys of ``data.keys``; class-conditional and multimodal methods train on them."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from cfkit import config, data, plugins, runlog, train
from cfkit.config import ConfigError

SIZE = 16  # shapes images: 16x16 RGB, 12 classes, five captions each
FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}
MODEL = {"preset": "CausalFusion-tiny", "input_size": SIZE, "patch_size": 4, "latent_channels": 3,
         "hidden_size": 32, "depth": 1, "num_heads": 2}
TRAIN = {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "ckpt_every": 2, "log_every": 1, "ema": 0.9}


def shapes(count: int = 12) -> list[data.Sample]:
    return list(plugins.build("datasets", "shapes", size=count, image_size=SIZE).samples("train"))


def encoded(image: np.ndarray, suffix: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=FORMATS[suffix])
    return buffer.getvalue()


def decoded(content: bytes) -> np.ndarray:
    """What PIL decodes: the loader must give exactly this (lossy formats included)."""
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def img2dataset_shards(folder: Path, samples: list[data.Sample]) -> list[dict]:
    """img2dataset's output: ``00000.tar`` ... (``jpg``, ``txt``, ``json`` with the caption and
    download metadata), each with a ``.parquet`` and ``_stats.json`` beside it; the records."""
    records = []
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=5, verbose=0) as sink:
        for i, sample in enumerate(samples):
            meta = {"url": f"https://example.com/{i}.jpg", "key": f"{i:09d}", "status": "success",
                    "caption": sample.captions[0], "width": SIZE, "height": SIZE, "exif": "{}"}
            records.append({"__key__": f"{i:09d}", "jpg": encoded(sample.image, "jpg"),
                            "txt": sample.captions[0].encode(), "json": json.dumps(meta).encode()})
            sink.write(records[-1])
    for shard in folder.glob("*.tar"):
        shard.with_suffix(".parquet").write_bytes(b"PAR1 not read")
        (folder / f"{shard.stem}_stats.json").write_text('{"count": 5}')
    return records


def imagenet_wds_shards(folder: Path, samples: list[data.Sample]) -> list[dict]:
    """An ImageNet-wds style set: keys that keep the file name's ``.JPEG``, images in ``jpg``,
    ``jpeg`` or ``webp``, the class in ``cls`` and a ``json`` with the class name; and a
    foreign file of no sample kind (``notes.md``) that must be ignored, not counted as bad."""
    records = []
    with wds.ShardWriter(str(folder / "imagenet-train-%06d.tar"), maxcount=4, verbose=0) as sink:
        for i, sample in enumerate(samples):
            suffix = ("jpg", "jpeg", "webp")[i % 3]
            key = f"n0144076{sample.label % 10}_{1000 + i}.JPEG"
            records.append({"__key__": key, suffix: encoded(sample.image, suffix),
                            "cls": str(sample.label).encode(),
                            "json": json.dumps({"filename": key, "label": sample.label}).encode()})
            sink.write(records[-1])
        sink.write({"__key__": "notes", "md": b"# what these shards are"})
    return records


def image_of(record: dict) -> bytes:
    return next(v for k, v in record.items() if k in FORMATS)


def read_all(shards, **options) -> tuple[data.ShardStream, dict]:
    """Every sample of one epoch in order, by key: (stream, {key: (image, label, captions)})."""
    stream = data.ShardStream(shards, 1, shuffle_buffer=1, flip=False, epochs=1, **options)
    out = {}
    for item in stream:
        image = ((item["images"][0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        out[item["keys"][0]] = (image, int(item["labels"][0]), item["captions"][0])
    return stream, out


def test_img2dataset_shards_read_jpg_txt_captions_and_ignore_the_files_beside_them(tmp_path, caplog):
    records = img2dataset_shards(tmp_path, shapes(12))
    with caplog.at_level(logging.WARNING, logger="cfkit.data"):
        stream, got = read_all(f"{tmp_path}/{{00000..00002}}.tar")
    assert (stream.errors.shards, stream.errors.samples) == (0, 0) and not caplog.text
    assert sorted(got) == [r["__key__"] for r in records]
    for record in records:
        image, label, captions = got[record["__key__"]]
        np.testing.assert_array_equal(image, decoded(record["jpg"]))
        assert label == -1 and captions == [record["txt"].decode()]


def test_imagenet_wds_keys_with_dots_group_as_webdataset_groups_them(tmp_path, caplog):
    samples = shapes(12)
    records = imagenet_wds_shards(tmp_path, samples)
    plain = {s["__key__"]: s for s in wds.WebDataset(f"{tmp_path}/imagenet-train-{{000000..000003}}.tar",
                                                      shardshuffle=False)}
    first = records[0]["__key__"]  # n014407.._1000.JPEG, in jpg: files KEY.jpg and KEY.cls
    assert plain[first.split(".")[0]].keys() >= {"jpeg.jpg", "jpeg.cls"}
    with caplog.at_level(logging.WARNING, logger="cfkit.data"):
        stream, got = read_all(f"{tmp_path}/imagenet-train-{{000000..000003}}.tar", num_classes=12)
    assert (stream.errors.shards, stream.errors.samples) == (0, 0) and not caplog.text  # notes.md ignored
    assert sorted(got) == sorted(k for k in plain if k != "notes")  # webdataset's keys: up to the first dot
    for record, sample in zip(records, samples, strict=True):
        image, label, captions = got[record["__key__"].split(".")[0]]
        np.testing.assert_array_equal(image, decoded(image_of(record)))
        assert label == sample.label and captions is None  # the json has no caption field


@pytest.mark.parametrize("raw, keys, label, captions", [
    ({"cls": b"3", "json": b'{"label": 5, "caption": "c"}'}, {}, 3, ["c"]),  # cls before json
    ({"json": b'{"label": 5, "caption": ["a", "b"]}'}, {}, 5, ["a", "b"]),
    ({"txt": b"from txt\n", "json": b'{"caption": "from json"}'}, {}, -1, ["from txt"]),
    ({"json": b'["cfkit", "list"]'}, {}, -1, ["cfkit", "list"]),  # the shards cfkit writes
    ({"json": b'{"url": "u", "caption": null}'}, {}, -1, None),
    ({"label.txt": b"7", "text": b"mine", "json": b'{"label": 1}'},
     {"label": "label.txt", "caption": "text"}, 7, ["mine"]),
    ({"json": b'{"y": 2, "prompt": "p", "label": 9, "caption": "c"}'},
     {"label_field": "y", "caption_field": "prompt"}, 2, ["p"]),
    ({"jpeg.cls": b"4", "jpeg.txt": b"dotted"}, {}, 4, ["dotted"]),  # key n0.JPEG: suffix jpeg.cls
])
def test_labels_and_captions_come_from_the_configured_files_or_json_fields(raw, keys, label, captions):
    keys = config.SampleKeys(**keys)
    assert data.sample_label(raw, None, keys) == label
    assert data.sample_captions(raw, keys) == captions


@pytest.mark.parametrize("raw, reason, message", [
    ({"jpg": b"not a jpeg", "cls": b"1"}, "image", "jpg file is not a JPEG image"),
    ({"webp": encoded(np.zeros((4, 4, 3), np.uint8), "png"), "cls": b"1"}, "image", "not a WEBP image"),
    ({"jpg": encoded(np.zeros((4, 4, 3), np.uint8), "jpg"), "json": b'{"label": "cat"}'},
     "label", "json 'label' 'cat' is not an integer in 0..9"),
    ({"jpg": encoded(np.zeros((4, 4, 3), np.uint8), "jpg"), "cls": b"1", "txt": b"\xff\xfe"},
     "captions", "txt file is not UTF-8 text"),
    ({"cls": b"1", "txt": b"a caption, no image"}, "image", "no png, jpg, jpeg, webp or latent.npy file"),
])
def test_bad_community_samples_are_screened_out_by_reason(raw, reason, message):
    with pytest.raises(data.BadSample, match=message) as error:
        data.SampleSpec(num_classes=10).screen({"__key__": "k", **raw})
    assert error.value.reason == reason


def test_a_sample_of_foreign_files_only_is_not_a_sample():
    assert data.SampleSpec(num_classes=10).screen({"__key__": "k", "parquet": b"x", "mp4": b"y"}) is False


@pytest.mark.parametrize("keys, message", [
    ({"images": ["gif"]}, r"data.keys.images.0: Input should be 'png', 'jpg', 'jpeg' or 'webp'; got 'gif'"),
    ({"images": []}, "must list image suffixes once each"),
    ({"label": "txt"}, "data.keys.caption 'txt' names a file that holds something else"),
    ({"caption": "json"}, "data.keys.caption 'json' names a file that holds something else"),
    ({"label": "CLS"}, "data.keys.label: String should match pattern"),
    ({"caption_field": ""}, "data.keys.caption_field: String should have at least 1 character"),
    ({"labels": "cls"}, "data.keys.labels: unknown key.*allowed keys: images, label, label_field, caption"),
])
def test_bad_data_keys_name_the_field_and_what_is_allowed(keys, message):
    with pytest.raises(ConfigError, match=message):
        config.validate({"data": {"shards": "x", "keys": keys}})


def test_a_brace_pattern_with_missing_shards_names_them(tmp_path):
    img2dataset_shards(tmp_path, shapes(6))  # 00000.tar and 00001.tar
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 shard\(s\) of .* do not exist, e.g. .*00002"):
        data.shard_paths(f"{tmp_path}/{{00000..00002}}.tar")


# -- training on community shards through the normal cfkit.train path ---------------------------


def experiment(method: dict, data_config: dict, model: dict | None = None) -> config.Experiment:
    return config.validate({
        "method": method, "model": {**MODEL, **(model or {})}, "train": TRAIN,
        "data": {"tokenizer": {"name": "pixels", "channels": 3}, "shuffle_buffer": 8, **data_config},
    })


def trained(run: Path) -> None:
    """A finished 2-step run: its checkpoint, and a finite loss logged at each step."""
    assert (run / "checkpoints" / "step-0000002").is_dir()
    rows = runlog.read_metrics(run / "metrics.csv")
    assert [row["step"] for row in rows] == [1, 2] and all(np.isfinite(row["loss"]) for row in rows)


def test_class_conditional_causalfusion_trains_on_imagenet_wds_shards(tmp_path, monkeypatch):
    monkeypatch.setenv("CFKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "wds").mkdir()
    imagenet_wds_shards(tmp_path / "wds", shapes(12))
    run = train.train(experiment({"name": "causalfusion"},
                                 {"shards": f"{tmp_path}/wds/imagenet-train-{{000000..000003}}.tar"},
                                 {"num_classes": 12}), tmp_path / "run", progress=False)
    trained(run)


@pytest.mark.parametrize("name", ["causalfusion-multimodal", "transfusion"])
def test_multimodal_methods_train_on_img2dataset_captions(tmp_path, monkeypatch, name):
    monkeypatch.setenv("CFKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "wds").mkdir()
    img2dataset_shards(tmp_path / "wds", shapes(12))
    # the method refuses a batch without captions: training at all shows they arrived
    spec = {"shards": f"{tmp_path}/wds/{{00000..00002}}.tar", "text_tokenizer": {"name": "bytes"}}
    run = train.train(experiment({"name": name}, spec, {"max_text_len": 16}), tmp_path / "run",
                      progress=False)
    trained(run)
