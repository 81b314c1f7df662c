"""Latent caching at scale (``cfkit shards --encode``): batches of ``--batch-size`` on
``--device``, progress as a bar on a terminal and plain lines in a log, a stopped write that
continues where it stopped, under torchrun each process encoding its share with the same bytes
as one process, and existing WebDataset shards (``webdataset`` dataset) as the source."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from cfkit_plugins.datasets import centre_crop
from conftest import free_port
from PIL import Image
from test_data import TINY_VAE, tiny_vae  # noqa: F401  (a fixture: the tiny MAR VAE checkpoint)

from cfkit import cli, data, plugins
from cfkit.tokenizers import from_uint8

ROOT = Path(__file__).resolve().parents[1]


def shapes(size: int = 10):
    return plugins.build("datasets", "shapes", size=size, image_size=8)


class Spy:
    """The pixels tokenizer, recording each batch's size and device."""

    channels, downsample = 3, 1

    def __init__(self):
        self.inner = plugins.build("image_tokenizers", "pixels", channels=3)
        self.batches: list[tuple[int, str]] = []

    def encode(self, images, generator=None):
        self.batches.append((len(images), images.device.type))
        return self.inner.encode(images)


class StopsAfter:
    """``dataset``'s samples until ``count`` of them, then the machine 'goes away'."""

    def __init__(self, dataset, count: int):
        self.dataset, self.count = dataset, count

    def samples(self, split):
        for i, sample in enumerate(self.dataset.samples(split)):
            if i == self.count:
                raise OSError("preempted")
            yield sample


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_encode_goes_in_batches_of_batch_size_on_the_device_within_each_shard(tmp_path):
    spy = Spy()
    data.write_shards(shapes(10), tmp_path / "a", shard_size=4, tokenizer=spy, batch_size=3, device="cpu")
    # shards of 4, 4, 2 samples; each encoded as plain and flipped batches of at most 3
    assert [n for n, _ in spy.batches] == [3, 3, 1, 1, 3, 3, 1, 1, 2, 2]
    assert {device for _, device in spy.batches} == {"cpu"}
    data.write_shards(shapes(10), tmp_path / "b", shard_size=4, tokenizer=spy.inner, batch_size=64)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")  # batching changes no bit


def test_a_stopped_encode_continues_where_it_stopped_and_ends_as_one_write(tmp_path):
    whole = data.write_shards(shapes(10), tmp_path / "whole", shard_size=3, tokenizer=Spy().inner)
    out, work = tmp_path / "out", tmp_path / ".out.partial"
    with pytest.raises(OSError, match="preempted"):
        data.write_shards(StopsAfter(shapes(10), 7), out, shard_size=3, tokenizer=Spy(), resume=True,
                          prefix="shapes")
    assert not out.exists() and sorted(p.name for p in work.glob("*.tar")) == [
        "shapes-train-000000.tar", "shapes-train-000001.tar"]  # the complete shards are kept
    spy = Spy()
    data.write_shards(shapes(10), out, shard_size=3, tokenizer=spy, resume=True)
    assert sum(n for n, _ in spy.batches) == 2 * 4  # only the last 4 samples (plain and flipped)
    assert folder_bytes(out) == {p.name: p.read_bytes() for p in whole} and not work.exists()


def test_an_unfinished_write_of_other_settings_is_refused_until_force(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(OSError):
        data.write_shards(StopsAfter(shapes(10), 4), out, shard_size=3, resume=True, prefix="shapes",
                          identity={"options": {"size": 10}})
    args = ["shards", "shapes", "--out", str(out), "--option", "size=10", "--option", "image_size=8",
            "--shard-size", "3", "--no-progress"]
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert "holds an unfinished write with other settings" in error and "--force" in error, error
    assert cli.main([*args, "--force"]) == 0, capsys.readouterr().err
    assert len(list(out.glob("*.tar"))) == 4 and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("flags", [[], ["--no-progress"]])
def test_the_cli_reports_progress_and_the_shards_it_wrote(tmp_path, capsys, flags):
    rc = cli.main(["shards", "shapes", "--out", str(tmp_path / "s"), "--option", "size=10",
                   "--option", "image_size=8", "--shard-size", "4", "--encode", "pixels",
                   "--tokenizer-option", "channels=3", "--batch-size", "2", *flags])
    out = capsys.readouterr()
    assert rc == 0, out.err
    # off a terminal (and with --no-progress) a line, never a bar's carriage returns
    assert "shards of shapes train: 10 images, 3 shard(s) in all, " in out.err and "\r" not in out.err
    assert "wrote 3 shard(s)" in out.out


def test_existing_webdataset_shards_are_cropped_and_encoded(tmp_path, capsys):
    source = tmp_path / "wds"
    source.mkdir()
    samples = list(shapes(6).samples("train"))
    rng, bigs = np.random.default_rng(0), []
    with wds.ShardWriter(str(source / "in-%03d.tar"), maxcount=4, verbose=0) as sink:
        for i, sample in enumerate(samples):  # 24x40: the ADM crop makes them 8x8
            bigs.append(np.kron(sample.image, np.ones((3, 5, 1), np.uint8)))
            sink.write({"__key__": f"k{i}.JPEG", "png": data.png_bytes(bigs[-1]),
                        "cls": str(sample.label).encode(), "txt": sample.captions[0].encode()})
        sink.write({"__key__": "bad", "png": b"not a png", "cls": b"1"})
        sink.write({"__key__": "noise", "jpg": data.png_bytes(rng.integers(0, 255, (8, 8, 3), np.uint8))})
    rc = cli.main(["shards", "webdataset", f"{source}/in-{{000..001}}.tar", "--out", str(tmp_path / "out"),
                   "--option", "image_size=8", "--encode", "pixels", "--tokenizer-option", "channels=3",
                   "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    shard = tmp_path / "out" / "webdataset-train-000000.tar"
    got = list(wds.WebDataset(str(shard), shardshuffle=False).decode())
    assert [s["__key__"] for s in got] == [f"k{i}" for i in range(6)]
    assert [s["cls"] for s in got] == [s.label for s in samples]
    assert [s["json"] for s in got] == [[s.captions[0]] for s in samples]
    cropped = from_uint8(np.stack([centre_crop(Image.fromarray(big), 8) for big in bigs])).half().numpy()
    np.testing.assert_array_equal(np.stack([s["latent.npy"] for s in got]), cropped)


def test_tar_members_under_dot_slash_and_folders_become_plain_keys(tmp_path, capsys):
    # `tar -cf in.tar .` writes ./KEY.png; a folder in a member name ends up in the key
    source = tmp_path / "tree"
    (source / "sub").mkdir(parents=True)
    samples = list(shapes(2).samples("train"))
    for name, sample in zip(["000001", "sub/000002"], samples, strict=True):
        (source / f"{name}.png").write_bytes(data.png_bytes(sample.image))
        (source / f"{name}.cls").write_text(str(sample.label))
    with tarfile.open(tmp_path / "in.tar", "w") as tar:
        for path in sorted(source.rglob("*.*")):
            tar.add(path, arcname=f"./{path.relative_to(source)}")
    rc = cli.main(["shards", "webdataset", str(tmp_path / "in.tar"), "--out", str(tmp_path / "out"),
                   "--option", "image_size=8", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    shard = str(tmp_path / "out" / "webdataset-train-000000.tar")
    got = [(s["__key__"], s["cls"]) for s in wds.WebDataset(shard, shardshuffle=False).decode()]
    assert got == [("000001", samples[0].label), ("sub_000002", samples[1].label)]


@pytest.mark.parametrize("name, key", [("./a/b.c", "a_b_c"), ("././x", "x"), ("n01.JPEG", "n01_JPEG"),
                                       ("k", "k")])
def test_sample_keys_have_no_dot_or_slash(name, key):
    assert data.sample_key(name) == key


def one_and_two_processes(args: list[str], tmp_path: Path) -> dict[str, str]:
    """Run ``cfkit ARGS`` at once as one process (``--out tmp_path/one``) and under torchrun as
    two gloo processes (``tmp_path/two``); each run's output (stdout and stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "cfkit"]
    jobs = {"one": [sys.executable, "-m", "cfkit", *args, "--out", str(tmp_path / "one")],
            "two": [*torchrun, *args, "--out", str(tmp_path / "two")]}
    running = {name: subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True) for name, command in jobs.items()}
    outputs = {name: process.communicate(timeout=300)[0] for name, process in running.items()}
    for name, process in running.items():
        assert process.returncode == 0, f"{name}:\n{outputs[name]}"
    return outputs


def test_two_gloo_processes_write_the_bytes_of_one(tmp_path, tiny_vae):  # noqa: F811
    vae = [a for k, v in {"path": tiny_vae, **TINY_VAE}.items() for a in ("--tokenizer-option", f"{k}={v}")]
    args = ["shards", "shapes", "--option", "size=10", "--option", "image_size=16", "--shard-size", "3",
            "--encode", "mar-vae", *vae, "--batch-size", "2"]
    outputs = one_and_two_processes(args, tmp_path)
    # rank 0 of 2 encoded shards 0 and 2 (3 + 3 of the 10 images); rank 1 the others
    assert "shards of shapes train (rank 0 of 2): 6 images" in outputs["two"], outputs["two"]
    one, two = folder_bytes(tmp_path / "one"), folder_bytes(tmp_path / "two")
    assert len(one) == 4 and one == two
    latents = [s["latent.npy"] for s in wds.WebDataset(str(tmp_path / "two" / "shapes-train-000001.tar"),
                                                        shardshuffle=False).decode()]
    assert len(latents) == 3 and latents[0].shape == (4, 8, 8) and np.abs(latents[0]).sum() > 0
    assert torch.tensor(np.stack(latents)).isfinite().all()


def test_under_torchrun_each_process_reads_only_the_images_of_its_own_shards(tmp_path):
    root = tmp_path / "images"
    for name, count in (("cat", 3), ("dog", 2)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((12, 10, 3), 40 * i + 7, np.uint8)).save(root / name / f"{i}.png")
    # cat/1 is damaged past its header: only decoding it fails
    (root / "cat" / "1.png").unlink()
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)).save(jpeg, "JPEG")
    (root / "cat" / "1.jpg").write_bytes(jpeg.getvalue()[:400])
    args = ["shards", "imagefolder", str(root), "--option", "image_size=8", "--shard-size", "2",
            "--no-progress"]
    outputs = one_and_two_processes(args, tmp_path)
    # shards [cat-0, cat-1], [cat-2, dog-0], [dog-1]: cat-1 is rank 0's, and read by it alone
    for name, output in outputs.items():  # the warning names the file once: one process read it
        assert output.count("1.jpg: ") == 1 and "skipped sample cat-1: damaged" in output, \
            f"{name}:\n{output}"
    one, two = folder_bytes(tmp_path / "one"), folder_bytes(tmp_path / "two")
    assert len(one) == 3 and one == two  # three shards
    first = data.read_tar(tmp_path / "two" / "imagefolder-train-000000.tar")
    assert [s["__key__"] for s in first] == ["cat-0"]


@pytest.mark.parametrize("option, message", [
    ("labl=3", "webdataset: labl: unknown key .*allowed keys: images, label, label_field, caption"),
    ("image_size=8", r"2 of the 2 shard\(s\) of .* do not exist"),
])
def test_a_write_that_fails_before_any_shard_leaves_nothing(tmp_path, capsys, option, message):
    rc = cli.main(["shards", "webdataset", f"{tmp_path}/in/{{0..1}}.tar", "--out", str(tmp_path / "out"),
                   "--option", option, "--no-progress"])
    assert rc == 2 and re.search(message, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
