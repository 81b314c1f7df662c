"""Text tokenizers (bytes, hf, bpe, open-clip), BPE training on caption files and
``cfkit tokenizer train``."""

import json
import sys

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from cfkit import cli, plugins
from cfkit.plugins import Registry, plugin_manager
from cfkit.tokenizers import frame, read_captions, train_bpe, unframe

CAPTIONS = [
    "a photo of a cat sitting on a red sofa",
    "a photo of a dog running on the grass",
    "two cats and a dog on the sofa",
    "a close-up photo of a tabby cat's face",
    "a café sign, written in chalk: «ouvert» ☕",
]
UNSEEN = ["zebra crossing at night, 3 cyclists", "日本語のキャプション 🦓", "  leading and trailing spaces  "]


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe(CAPTIONS * 4, vocab_size=320).save(str(path))
    return path


@pytest.fixture(scope="module")
def llama_like_file(tmp_path_factory):
    """A byte-level BPE tokenizer.json laid out like LLaMA-3's: <|begin_of_text|> / <|end_of_text|>
    special tokens, no pad token, and a post-processor that prepends bos."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CAPTIONS, trainer)
    tokenizer.add_special_tokens(specials)
    bos = specials[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def build(name: str, **options):
    return plugins.build("text_tokenizers", name, **options)


def assert_round_trips(tokenizer, texts):
    for text in texts:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert not {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id} & set(ids), text
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(frame(tokenizer, text, len(ids) + 6)) == text


# --- bytes ------------------------------------------------------------------------------------------


def test_bytes_are_utf8_with_specials_after_the_byte_range():
    tokenizer = build("bytes")
    specials = (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    assert specials == (259, 256, 257, 258)
    assert tokenizer.encode("é!") == [0xC3, 0xA9, 0x21]
    assert_round_trips(tokenizer, CAPTIONS + UNSEEN)


# --- frame / unframe --------------------------------------------------------------------------------


def test_frame_adds_bos_eos_and_pads_to_the_length_truncating_the_text():
    tokenizer = build("bytes")
    assert frame(tokenizer, "ab", 6) == [256, 97, 98, 257, 258, 258]
    assert frame(tokenizer, "abcdef", 5) == [256, 97, 98, 99, 257]
    assert tokenizer.decode(frame(tokenizer, "abcdef", 5)) == "abc"
    with pytest.raises(ValueError, match="length >= 2"):
        frame(tokenizer, "ab", 1)


def test_unframe_drops_a_leading_bos_and_cuts_at_the_first_eos():
    assert unframe([1, 5, 6, 2, 0, 0], bos_id=1, eos_id=2) == [5, 6]
    assert unframe([5, 1, 6], bos_id=1, eos_id=2) == [5, 1, 6]
    assert unframe([], bos_id=1, eos_id=2) == []


# --- bpe --------------------------------------------------------------------------------------------


def test_bpe_round_trips_seen_and_unseen_text(bpe_file):
    tokenizer = build("bpe", path=str(bpe_file))
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert 259 < tokenizer.vocab_size <= 320
    assert_round_trips(tokenizer, CAPTIONS + UNSEEN)


def test_bpe_merges_frequent_words_into_fewer_tokens_than_bytes(bpe_file):
    tokenizer = build("bpe", path=str(bpe_file))
    text = "a photo of a cat"
    assert len(tokenizer.encode(text)) < len(text.encode()) // 2
    assert len(tokenizer.encode("zqxj")) == 4  # never seen: one byte-level token per byte


def test_train_bpe_needs_room_for_the_bytes_and_the_specials():
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        train_bpe(CAPTIONS, vocab_size=100)


def test_bpe_refuses_a_tokenizer_json_without_its_special_tokens(llama_like_file):
    with pytest.raises(ValueError, match=r"no bos token <bos>; its special tokens are \['<\|begin_of_text"):
        build("bpe", path=str(llama_like_file))


# --- hf ---------------------------------------------------------------------------------------------


def test_hf_finds_llama_specials_and_encodes_without_them(llama_like_file):
    raw = Tokenizer.from_file(str(llama_like_file))
    tokenizer = build("hf", path=str(llama_like_file))
    assert tokenizer.bos_id == raw.token_to_id("<|begin_of_text|>")
    assert tokenizer.eos_id == tokenizer.pad_id == raw.token_to_id("<|end_of_text|>")  # LLaMA-3: no pad
    assert tokenizer.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    assert raw.encode(CAPTIONS[0]).ids[0] == tokenizer.bos_id  # the file's post-processor adds bos ...
    assert tokenizer.encode(CAPTIONS[0]) == raw.encode(CAPTIONS[0]).ids[1:]  # ... encode leaves it out
    assert_round_trips(tokenizer, CAPTIONS + UNSEEN)


def test_hf_takes_specials_from_options_as_tokens_or_ids(llama_like_file):
    raw = Tokenizer.from_file(str(llama_like_file))
    reserved = raw.token_to_id("<|reserved_special_token_0|>")
    tokenizer = build("hf", path=str(llama_like_file), pad="<|reserved_special_token_0|>", eos=7)
    assert (tokenizer.pad_id, tokenizer.eos_id) == (reserved, 7)
    with pytest.raises(ValueError, match="pad id 100000 is outside the vocabulary"):
        build("hf", path=str(llama_like_file), pad=100000)
    with pytest.raises(ValueError, match="no eos token <nope>"):
        build("hf", path=str(llama_like_file), eos="<nope>")


def test_hf_errors_name_a_missing_or_broken_file(tmp_path):
    with pytest.raises(ValueError, match="tokenizer file not found: .*absent.json"):
        build("hf", path=str(tmp_path / "absent.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="broken.json: not a tokenizer.json"):
        build("hf", path=str(broken))


# --- open-clip ----------------------------------------------------------------------------------------


def fake_open_clip(root, tokenizer_source: str):
    package = root / "open_clip"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tokenizer.py").write_text(tokenizer_source)


def test_open_clip_is_registered_only_when_open_clip_is_installed(tmp_path, monkeypatch):
    monkeypatch.setattr("cfkit_plugins.text_tokenizers.find_spec", lambda name: None)
    assert "open-clip" not in Registry(plugin_manager()).names("text_tokenizers")
    monkeypatch.undo()
    # an installed but broken open_clip (as with a torchvision built for another torch)
    fake_open_clip(tmp_path, "raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(tmp_path)
    names = ("open_clip", "open_clip.tokenizer")
    real = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    try:
        registry = Registry(plugin_manager())
        assert "open-clip" in registry.names("text_tokenizers")
        with pytest.raises(ValueError, match="open_clip is installed but does not import: .*nms"):
            registry.build("text_tokenizers", "open-clip")
    finally:  # the fake must not outlive this test
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(real)


def test_open_clip_round_trips_lower_case_words():
    pytest.importorskip("open_clip", exc_type=ImportError)
    tokenizer = build("open-clip")
    specials = (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    assert specials == (49408, 49406, 49407, 0)
    words = [c for c in CAPTIONS if c.isascii() and c.replace(" ", "").isalnum()]  # CLIP splits punctuation
    assert len(words) == 3
    assert_round_trips(tokenizer, words)
    assert tokenizer.decode(tokenizer.encode("A Cat!")) == "a cat !"


# --- caption files and `cfkit tokenizer train` ---------------------------------------------------------


def write_caption_files(folder):
    text = folder / "captions.txt"
    text.write_text("\n".join(CAPTIONS[:2]) + "\n\n")
    listed = folder / "captions.json"
    listed.write_text(json.dumps([CAPTIONS[2], [CAPTIONS[3], CAPTIONS[4]]]))
    lines = folder / "captions.jsonl"
    lines.write_text("\n".join(json.dumps(item) for item in
                               [{"caption": UNSEEN[0]}, {"captions": [UNSEEN[1]]}, {"text": "x"}, "y"]))
    return [text, listed, lines]


def test_read_captions_takes_text_json_and_jsonl(tmp_path):
    assert read_captions(write_caption_files(tmp_path)) == CAPTIONS + UNSEEN[:2] + ["x", "y"]


def test_read_captions_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions file not found: .*absent.txt"):
        read_captions([tmp_path / "absent.txt"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"url": "x.jpg"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: an object without a caption"):
        read_captions([bad])
    bad.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl: a caption must be a string, got 1"):
        read_captions([bad])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no captions in .*empty.txt"):
        read_captions([tmp_path / "empty.txt"])


def test_cli_trains_a_loadable_bpe_tokenizer(tmp_path, capsys):
    files = write_caption_files(tmp_path)
    out = tmp_path / "out" / "tokenizer.json"
    rc = cli.main(["tokenizer", "train", "--captions", *map(str, files), "--vocab-size", "300",
                   "--out", str(out)])
    assert rc == 0 and f"wrote {out}" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    tokenizer = build("bpe", path=str(out))
    assert tokenizer.vocab_size <= 300
    assert_round_trips(tokenizer, CAPTIONS + UNSEEN)


def test_cli_reports_a_missing_captions_file(tmp_path, capsys):
    out = tmp_path / "tokenizer.json"
    rc = cli.main(["tokenizer", "train", "--captions", str(tmp_path / "absent.txt"), "--vocab-size", "300",
                   "--out", str(out)])
    assert rc == 2 and "captions file not found" in capsys.readouterr().err
    assert not out.exists()
