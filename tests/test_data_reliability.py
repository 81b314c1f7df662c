"""Data reliability: shards never run commands unless whoever runs cfkit opts in, a bad record
is skipped and counted (by reason, with its shard and key) and never stops training, only
"no usable sample at all" is an error, and rewriting shards replaces the whole set."""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from cfkit import cli, data, plugins

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "configs" / "digits-tiny.toml"
TINY = ["model.hidden_size=32", "model.depth=2", "train.batch_size=8", "train.max_steps=2",
        "train.ckpt_every=2", "train.log_every=1", "train.warmup_steps=0"]
SHAPE = (8, 8, 1)  # digits: 8x8 grey
DIGITS_TRAIN = 1437
OPT_IN = "CFKIT_ALLOW_REMOTE_SHARDS"  # the environment variable of the opt-in


def digit(value: int = 0, shape=SHAPE) -> bytes:
    return data.png_bytes(np.full(shape, value, np.uint8))


def write_tar(path: Path, records: list[dict]) -> Path:
    with open(path, "wb") as file, wds.TarWriter(file) as sink:  # a path string could be a URL
        for record in records:
            sink.write(record)
    return path


def good(i: int, label: int = 1) -> dict:
    return {"__key__": f"good{i}", "png": digit(i), "cls": str(label).encode()}


def keys_of(items: list[dict]) -> list[str]:
    return [key for item in items for key in item["keys"]]


def train_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(["train", *argv, "--no-progress"])
    return rc, capsys.readouterr().err


def sets(*overrides: str) -> list[str]:
    return [arg for text in [*TINY, *overrides] for arg in ("--set", text)]


@pytest.fixture(autouse=True)
def no_opt_in(monkeypatch, tmp_path):
    """No test inherits the opt-in (``cfkit train --allow-remote-shards`` sets it in-process),
    and no run builds shards outside its own folder."""
    monkeypatch.delenv(OPT_IN, raising=False)
    monkeypatch.setenv("CFKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("digits") / "shards"
    data.write_shards(plugins.build("datasets", "digits"), folder, shard_size=500, prefix="digits")
    return folder


# --- 1. shards are data: pipe: and URLs need the opt-in of whoever runs cfkit ------------------


@pytest.mark.parametrize("url", ["pipe:touch {marker}; cat x.tar", "http://example.com/a.tar",
                                 "https://example.com/a-{{000..001}}.tar", "gs://bucket/a.tar",
                                 "s3://bucket/a.tar", "hf://datasets/a/b.tar", "sftp://host/a.tar", "-"])
def test_pipe_and_url_shards_are_refused_without_the_opt_in_and_run_nothing(tmp_path, url):
    marker = tmp_path / "PWNED"
    url = url.format(marker=marker)
    for read in (lambda: data.ShardStream(url, 2), lambda: list(data.read_tar(url)),
                 lambda: data.ShardStream([url], 2), lambda: data.shard_paths(url)):
        with pytest.raises(data.DataError) as error:
            read()
        message = str(error.value)
        assert "\n" not in message and "--allow-remote-shards" in message, message
        assert f"{OPT_IN}=1" in message
    assert not marker.exists()


def test_a_pipe_in_a_config_runs_nothing_and_says_how_to_opt_in(capsys, tmp_path):
    marker = tmp_path / "PWNED"
    rc, err = train_cli(capsys, str(CONFIG), "--out", str(tmp_path / "run"),
                        *sets(f'data.shards="pipe:touch {marker}; cat shard.tar"'))
    assert rc == 2 and not marker.exists()
    assert re.fullmatch(r"error: shard 'pipe:touch .*' is not a local file .*--allow-remote-shards.*"
                        r"CFKIT_ALLOW_REMOTE_SHARDS=1.*\n", err), err


def test_the_opt_in_reads_a_pipe_but_an_edited_run_folder_cannot_run_one(
        capsys, tmp_path, digits_shards, monkeypatch):
    shard = sorted(digits_shards.glob("*.tar"))[0]
    run = tmp_path / "run"
    rc, err = train_cli(capsys, str(CONFIG), "--out", str(run), "--allow-remote-shards",
                        *sets(f'data.shards="pipe:cat {shard}"'))
    assert rc == 0, err
    monkeypatch.delenv(OPT_IN)  # the flag set it in this process
    marker = tmp_path / "PWNED"
    config = json.loads((run / "config.json").read_text())
    config["experiment"]["data"]["shards"] = f"pipe:touch {marker}; cat {shard}"
    (run / "config.json").write_text(json.dumps(config))
    rc, err = train_cli(capsys, "--resume", str(run), "--set", "train.max_steps=4")
    assert rc == 2 and not marker.exists()
    assert err.count("\n") == 1 and "--allow-remote-shards" in err, err


def test_the_environment_opt_in_reads_pipes_and_local_names_never_run(tmp_path, monkeypatch):
    shard = write_tar(tmp_path / "a.tar", [good(i) for i in range(4)])
    monkeypatch.setenv(OPT_IN, "1")
    assert keys_of(list(data.ShardStream(f"pipe:cat {shard}", 4, epochs=1))) != []
    monkeypatch.delenv(OPT_IN)
    assert [s["__key__"] for s in data.read_tar(f"file://{shard}")] == [f"good{i}" for i in range(4)]
    # files found on disk are files, whatever their names look like, even with the opt-in
    monkeypatch.chdir(tmp_path)
    folder = Path("pipe:touch PWNED; cat")
    folder.mkdir()
    write_tar(folder / "b.tar", [good(i) for i in range(4)])
    for spec in (str(folder), "pipe:touch PWNED; cat/*.tar"):
        stream = data.ShardStream(spec, 4, epochs=1, allow_remote=True)
        assert stream.shards == ["./pipe:touch PWNED; cat/b.tar"]
        assert len(keys_of(list(stream))) == 4
    assert not Path("PWNED").exists()


# --- 2. a bad record is skipped and counted; only "no usable sample" stops ----------------------


def test_bad_labels_are_skipped_and_counted_with_their_shard_and_key(tmp_path, caplog):
    records = [good(i, label=i) for i in range(10)] + [
        {"__key__": "ten", "png": digit(), "cls": b"10"},
        {"__key__": "negative", "png": digit(), "cls": b"-1"},
        {"__key__": "missing", "png": digit()},
        {"__key__": "word", "png": digit(), "cls": b"seven"},
        {"__key__": "huge", "png": digit(), "cls": b"9" * 5000},
        {"__key__": "captions", "png": digit(), "cls": b"1", "json": b'{"caption": ["a", 3]}'},
        {"__key__": "nested", "png": digit(), "cls": b"1", "json": b"[" * 100_000},
    ]
    write_tar(tmp_path / "a.tar", records)
    stream = data.ShardStream(tmp_path, 2, num_classes=10, epochs=1, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING, logger="cfkit.data"):
        items = list(stream)
    labels = [label for item in items for label in item["labels"].tolist()]
    assert sorted(labels) == list(range(10))  # every batch whole: bad ones never reach a batch
    assert stream.errors.screened == {"label": 5, "captions": 2}
    assert f"skipped corrupt sample ten of {tmp_path / 'a.tar'}" in caplog.text
    assert "cls b'10' is not an integer in 0..9" in caplog.text
    assert "missing" in caplog.text and "no cls file" in caplog.text


def test_images_of_another_size_or_channel_count_are_skipped_never_stacked(tmp_path, caplog):
    broken = bytearray(digit(3))
    broken[40:50] = bytes(10)  # a sound header, damaged pixel data: fails only when decoded
    records = [good(i) for i in range(6)] + [
        {"__key__": "taller", "png": digit(shape=(9, 8, 1)), "cls": b"1"},
        {"__key__": "colour", "png": digit(shape=(8, 8, 3)), "cls": b"1"},
        {"__key__": "broken", "png": bytes(broken), "cls": b"1"},
        {"__key__": "nothing", "cls": b"1", "txt": b"no image"},
    ]
    write_tar(tmp_path / "a.tar", records)
    stream = data.ShardStream(tmp_path, 8, epochs=1, flip=False)
    with caplog.at_level(logging.WARNING, logger="cfkit.data"):
        [item] = list(stream)
    assert stream.spec.shape == SHAPE  # the most common shape of the first samples
    assert item["images"].shape == (6, 1, 8, 8)  # the batch is short of the two that failed to decode
    assert sorted(item["keys"]) == [f"good{i}" for i in range(6)]
    assert stream.errors.screened == {"shape": 1, "image": 1}  # from the headers, before batching
    assert stream.errors.decoded == {"shape": 1, "image": 1}  # the colour PNG, the damaged pixels
    assert "skipped corrupt sample colour of" in caplog.text and "(8, 8, 3)" in caplog.text
    assert "skipped corrupt sample taller of" in caplog.text and "9x8 pixels" in caplog.text


def huge_member_tar(path: Path, size_field: bytes) -> Path:
    """A tar whose one member declares ``size_field`` (12 octal digits) as its size."""
    info = tarfile.TarInfo("k0.png")
    info.size = 5
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    header[124:136] = size_field
    header[148:156] = b"%06o\0 " % (sum(header[:148]) + sum(header[156:]) + 8 * ord(" "))
    path.write_bytes(bytes(header) + b"x" * 1024)
    return path


def test_a_member_declaring_a_huge_size_is_a_damaged_shard_not_a_memory_error(tmp_path):
    huge = huge_member_tar(tmp_path / "huge.tar", b"777777777777")  # 64 GiB
    with pytest.raises(ValueError, match="declares a file of 68719476735 bytes"):
        list(data.read_tar(huge))
    big = huge_member_tar(tmp_path / "big.tar", b"%011o\0" % (1 << 29))  # allowed, but not there
    with pytest.raises(ValueError, match="truncated inside a file of 536870912 bytes"):
        list(data.read_tar(big))
    write_tar(tmp_path / "good.tar", [good(i) for i in range(4)])
    stream = data.ShardStream(tmp_path, 4, epochs=1)
    assert len(keys_of(list(stream))) == 4
    assert sorted(stream.errors.bad_shards) == [str(big), str(huge)]


def test_a_bad_shard_and_sample_count_once_however_many_epochs_reread_them(tmp_path):
    (tmp_path / "garbage.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    write_tar(tmp_path / "a.tar", [good(i) for i in range(7)] + [{"__key__": "bad", "png": b"nope"}])
    stream = data.ShardStream(tmp_path, 7, epochs=3)
    assert len(list(stream)) == 3
    assert (stream.errors.shards, stream.errors.samples) == (1, 1)


def test_loader_workers_count_screened_samples_once_and_add_up_decoding_failures(tmp_path):
    broken = bytearray(digit(3))
    broken[40:50] = bytes(10)
    records = [good(i) for i in range(8)]
    records[2] = {"__key__": "label", "png": digit(), "cls": b"99"}  # screened by every worker
    records[5] = {"__key__": "pixels", "png": bytes(broken), "cls": b"1"}  # decoded by one
    records[7] = {"__key__": "pixels2", "png": bytes(broken), "cls": b"1"}
    write_tar(tmp_path / "a.tar", records)
    errors = data.LoaderErrors()
    stream = data.ShardStream(tmp_path, 1, num_classes=10, shuffle_buffer=1, flip=False, epochs=1)
    for item in data.loader(stream, 2):
        errors.update(item)
    assert errors.by_reason == {"label": 1, "image": 2}
    assert (errors.shards, errors.samples) == (0, 3)


@pytest.mark.parametrize("files", [
    {"a.tar": b""},  # an empty file
    {"a.tar": bytes(1024)},  # an empty archive
    {"a.tar": b"x" * 3000, "b.tar": np.random.default_rng(1).bytes(5000)},  # garbage
    {"a.tar": [{"__key__": "k", "png": digit(), "cls": b"12"}]},  # every sample bad
    {"a.tar": [{"__key__": "k", "latent.npy": b"\x93NUMPY garbage", "cls": b"1"}]},
])
def test_no_usable_sample_at_all_is_a_one_line_error(tmp_path, files):
    for name, content in files.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        else:
            write_tar(tmp_path / name, content)
    with pytest.raises(data.DataError) as error:
        data.ShardStream(tmp_path, 2, num_classes=10)
    message = str(error.value)
    assert message.startswith(f"no usable sample in {len(files)} shard(s): ") and "\n" not in message


def test_pickled_latents_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "UNPICKLED"
    payload = np.array([Unpickle(str(marker))], dtype=object)
    buffer = io.BytesIO()
    np.save(buffer, payload, allow_pickle=True)
    latent = data.npy_bytes(np.zeros((2, 4, 4), np.float16))
    write_tar(tmp_path / "a.tar", [{"__key__": f"k{i}", "latent.npy": latent, "cls": b"1"} for i in range(3)]
              + [{"__key__": "pickle", "latent.npy": buffer.getvalue(), "cls": b"1"}])
    stream = data.ShardStream(tmp_path, 3, epochs=1)
    assert [item["latents"].shape for item in stream] == [(3, 2, 4, 4)]
    assert stream.errors.screened == {"latent": 1} and not marker.exists()


class Unpickle:
    """Touches ``path`` when unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return Path(self.path).touch, ()


def test_training_skips_every_kind_of_bad_record_and_finishes(capsys, caplog, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "good.tar", [good(i, label=i % 10) for i in range(20)])
    write_tar(folder / "bad.tar", [
        {"__key__": "out-of-range", "png": digit(), "cls": b"10"},
        {"__key__": "negative", "png": digit(), "cls": b"-3"},
        {"__key__": "unlabelled", "png": digit()},
        {"__key__": "bigger", "png": digit(shape=(16, 16, 1)), "cls": b"1"},
        {"__key__": "rgb", "png": digit(shape=(8, 8, 3)), "cls": b"1"},
    ])
    huge_member_tar(folder / "huge.tar", b"777777777777")
    (folder / "empty.tar").write_bytes(b"")
    (folder / "garbage.tar").write_bytes(b"garbage" * 500)
    with caplog.at_level(logging.WARNING):
        rc, err = train_cli(capsys, str(CONFIG), "--out", str(tmp_path / "run"),
                            *sets(f'data.shards="{folder}"', "train.max_steps=3", "train.ckpt_every=3"))
    assert rc == 0, err
    assert (tmp_path / "run" / "checkpoints" / "step-0000003").is_dir()
    for name in ("huge.tar", "empty.tar", "garbage.tar", "out-of-range", "negative", "unlabelled",
                 "bigger", "rgb"):
        assert name in caplog.text, name
    # the totals, an event --no-progress keeps, on stderr
    assert re.search(r"^warning: skipped \d+ corrupt shard\(s\) and \d+ corrupt sample\(s\)$", err, re.M), err


def test_a_run_on_shards_without_a_usable_sample_ends_in_one_line(capsys, tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"x" * 2048)
    rc, err = train_cli(capsys, str(CONFIG), "--out", str(tmp_path / "run"),
                        *sets(f'data.shards="{tmp_path / "shards"}"'))
    assert rc == 2 and err.startswith("error: no usable sample in 1 shard(s)") and err.count("\n") == 1, err


def test_imagefolder_skips_unreadable_files_and_counts_them_by_reason(tmp_path, capsys, caplog, monkeypatch):
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((12, 10, 3), 7, np.uint8)).save(root / name / "fine.png")
    (root / "cat" / "fake.png").write_bytes(b"not a png")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)).save(jpeg, "JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(jpeg.getvalue()[:400])
    Image.new("L", (100, 100)).save(root / "dog" / "bomb.png")
    (root / "dog" / "folder.png").mkdir()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # bomb.png's 10,000 pixels pass it
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING):
        rc = cli.main(["shards", "imagefolder", str(root), "--out", str(out), "--option", "image_size=8"])
    assert rc == 0, capsys.readouterr().err
    written = data.read_tar(out / "imagefolder-train-000000.tar")
    assert [s["__key__"] for s in written] == ["cat-fine", "dog-fine"]
    assert "4 unreadable sample(s) skipped" in caplog.text
    for reason in ("1 not an image", "1 damaged", "1 too large", "1 not a file"):
        assert reason in caplog.text
    for key, name in (("cat-fake", "fake.png"), ("cat-truncated", "truncated.jpg"),
                      ("dog-bomb", "bomb.png"), ("dog-folder", "folder.png")):
        assert re.search(rf"skipped sample {key}: .*{name}: ", caplog.text), caplog.text


# --- 11. rewriting shards replaces the whole set ------------------------------------------------


def test_rewriting_shards_needs_force_and_then_replaces_the_whole_set(tmp_path, capsys):
    out = tmp_path / "D"
    out.mkdir()  # an existing empty folder is fine
    assert cli.main(["shards", "digits", "--shard-size", "200", "--out", str(out)]) == 0
    assert len(list(out.glob("*.tar"))) == 8
    capsys.readouterr()
    assert cli.main(["shards", "digits", "--shard-size", "500", "--out", str(out)]) == 2
    assert "already holds 8 shard file(s); replace the whole set with --force" in capsys.readouterr().err
    assert len(list(out.glob("*.tar"))) == 8
    assert cli.main(["shards", "digits", "--shard-size", "500", "--out", str(out), "--force"]) == 0
    assert len(list(out.glob("*.tar"))) == 3
    keys = keys_of(list(data.ShardStream(out, 1, epochs=1, shuffle_buffer=1)))
    assert len(keys) == len(set(keys)) == DIGITS_TRAIN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D"]  # no temp folder left


def test_force_never_deletes_a_folder_holding_other_files(tmp_path, capsys):
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("mine")
    rc = cli.main(["shards", "digits", "--out", str(tmp_path), "--force"])
    assert rc == 2 and "holds files other than shards (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "notes.txt"]


class FailsMidway:
    """A dataset whose samples fail after ``good`` of them."""

    def __init__(self, good: int):
        self.good = good

    def samples(self, split):
        for i in range(self.good):
            yield data.Sample(f"s{i}", np.zeros(SHAPE, np.uint8), 1)
        raise OSError("the disk went away")


def test_a_failed_rewrite_leaves_the_old_set_whole(tmp_path):
    out = tmp_path / "D"
    old = data.write_shards(plugins.build("datasets", "digits"), out, shard_size=500)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OSError, match="the disk went away"):
        data.write_shards(FailsMidway(5), out, shard_size=2, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and len(old) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D"]


# --- fuzz: random bytes and random tar members ---------------------------------------------------

GOOD_PNG = digit(5)
CONTENTS = {
    "png": st.sampled_from([GOOD_PNG, GOOD_PNG, digit(shape=(9, 8, 1)), digit(shape=(8, 8, 3)),
                            GOOD_PNG[:40], b"\x89PNG\r\n\x1a\n"]),
    "cls": st.one_of(st.integers(0, 9), st.integers(-3, 13)).map(lambda n: str(n).encode())
    | st.binary(max_size=8),
    "json": st.sampled_from([b'["a caption"]', b"[1, 2]", b"{", b'"text"']),
    "latent.npy": st.sampled_from([data.npy_bytes(np.zeros((1, 8, 8), np.float16)), b"\x93NUMPY\x01\x00"]),
    "txt": st.binary(max_size=64),
}


@st.composite
def members(draw) -> list[tuple[str, bytes]]:
    """The files of one sample (a good one, or a random mix of files), or a stray file."""
    kind = draw(st.sampled_from(["stray", "good", "mix", "mix"]))
    if kind == "stray":
        return [(draw(st.sampled_from(["k", "k.4.png", "dir/", "dir/k.cls"])), draw(st.binary(max_size=64)))]
    key = draw(st.sampled_from(["k0", "k1", "k2", "k3", "k4", "dir/k5"]))
    if kind == "good":
        return [(f"{key}.png", GOOD_PNG), (f"{key}.cls", str(draw(st.integers(0, 9))).encode())]
    suffixes = draw(st.lists(st.sampled_from(list(CONTENTS)), min_size=1, max_size=3, unique=True))
    return [(f"{key}.{suffix}", draw(CONTENTS[suffix])) for suffix in suffixes]


@st.composite
def shard_bytes(draw) -> bytes:
    """A shard: random bytes, or a tar of random members (ustar, GNU or pax), maybe damaged."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=3000))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=draw(st.sampled_from(
            [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))) as tar:
        for name, content in [file for group in draw(st.lists(members(), max_size=8)) for file in group]:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            if draw(st.integers(0, 3)) == 0:
                info.pax_headers = {"comment": "x" * draw(st.integers(0, 200))}
            tar.addfile(info, io.BytesIO(content))
    raw = bytearray(buffer.getvalue())
    damage = draw(st.sampled_from(["none", "none", "truncate", "overwrite"]))
    if damage == "truncate":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif damage == "overwrite":
        start = draw(st.integers(0, len(raw)))
        patch = draw(st.binary(min_size=1, max_size=16))
        raw[start:start + len(patch)] = patch
    return bytes(raw)


@given(st.lists(shard_bytes(), min_size=1, max_size=4), st.booleans())
def test_the_shard_reader_yields_only_declared_samples_or_says_no_usable_sample(shards, declared):
    with tempfile.TemporaryDirectory() as folder:
        for i, content in enumerate(shards):
            Path(folder, f"{i}.tar").write_bytes(content)
        try:
            stream = data.ShardStream(folder, 2, num_classes=10, shape=SHAPE if declared else None,
                                      shuffle_buffer=2, epochs=3)
            items = list(stream)
        except data.DataError as error:
            assert str(error).startswith("no usable sample in ") and "\n" not in str(error)
            event("no usable sample")
            return
        event(f"{sum(len(item['keys']) for item in items)} sample(s), {stream.errors.samples} bad")
        shape = stream.spec.shape
        if declared:
            assert shape == SHAPE
        for item in items:
            kind = stream.spec.kind
            arrays = item[kind]
            want = (shape[2], *shape[:2]) if kind == "images" else shape
            assert arrays.shape[1:] == want and len(arrays) <= 2
            assert all(0 <= label < 10 for label in item["labels"].tolist())
