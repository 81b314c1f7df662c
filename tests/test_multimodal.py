"""Multimodal CausalFusion and Transfusion: the text extension of the generalised causal mask
(checked against a by-hand construction of the rule), KV-cached captioning and text-to-image
equal the training forward, decoding strategies, the loss, and a short training run on
``shapes`` whose greedy captions name the image's colour."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_masks import expected_mask, official_case, sees

from cfkit import config
from cfkit.captioning import CaptioningError, caption, sample
from cfkit.config import ConfigError
from cfkit.diffusion import GaussianDiffusion
from cfkit.generate import GenerationError, text_to_image
from cfkit.masks import batch_layout, multimodal_layout
from cfkit.methods import Batch
from cfkit.multimodal import MultimodalTransformer, caption_loss
from cfkit.plan import Plan
from cfkit.schedules import step_index
from cfkit.transformer import TransformerConfig

step_sizes = st.lists(st.integers(1, 4), min_size=1, max_size=5)
cond_lens = st.integers(0, 3)
text_lens = st.integers(0, 4)
copies = st.integers(0, 2)

TINY = {"preset": "CausalFusion-tiny", "input_size": 4, "latent_channels": 2, "hidden_size": 32,
        "depth": 2, "num_heads": 2, "max_text_len": 8}
METHODS = ["causalfusion-multimodal", "transfusion"]
BYTES = {"dataset": {"name": "shapes"}, "text_tokenizer": {"name": "bytes"}}


pytestmark = pytest.mark.usefixtures("one_thread")


# -- the mask --------------------------------------------------------------------------------
def multimodal_tokens(cond_len, step, text_len, num_copies):
    """``[cond | text | clean (all L) | noisy x copies]`` as (kind, step or text position, copy)."""
    tokens = [("cond", None, None)] * cond_len + [("text", i, None) for i in range(text_len)]
    tokens += [("clean", s, None) for s in step]
    return tokens + [("noisy", s, c) for c in range(num_copies) for s in step]


def sees_with_text(query, key, text_first):
    """The paper's rule with a caption: text is causal; a caption before the image is seen
    by every image token; a caption after the image sees its clean tokens, never noisy ones."""
    if key[0] == "cond" or query[0] == "cond":
        return key[0] == "cond"
    if query[0] == "text":
        return key[1] <= query[1] if key[0] == "text" else key[0] == "clean" and not text_first
    if key[0] == "text":
        return text_first
    return sees(query, key)


def case(cond_len, sizes, text_len, num_copies, text_first):
    step = [s for s, size in enumerate(sizes) for _ in range(size)]
    layout = multimodal_layout(cond_len, torch.tensor([step]), text_len, text_first, num_copies)
    return layout.dense()[0], multimodal_tokens(cond_len, step, text_len, num_copies), step


@given(cond_lens, step_sizes, text_lens, copies, st.booleans())
def test_multimodal_mask_is_the_rule_with_causal_text_before_or_after_the_image(c, sizes, n, k, first):
    mask, tokens, _ = case(c, sizes, n, k, first)
    expected = torch.tensor([[sees_with_text(q, key, first) for key in tokens] for q in tokens])
    assert torch.equal(mask, expected)


@given(cond_lens, step_sizes, text_lens, copies, st.booleans())
def test_image_tokens_see_each_other_as_without_text(c, sizes, n, k, first):
    mask, tokens, step = case(c, sizes, n, k, first)
    image = [i for i, token in enumerate(tokens) if token[0] != "text"]
    image_only = batch_layout(c, torch.tensor([step]), k, clean_len=len(step)).dense()[0]
    assert torch.equal(mask[image][:, image], image_only)


@given(cond_lens, step_sizes, st.integers(1, 3))
def test_the_image_only_mask_is_unchanged(c, sizes, k):
    mask, tokens = official_case(c, sizes, k)
    assert torch.equal(mask, expected_mask(tokens))


def test_each_sample_of_a_batch_has_its_own_order():
    step = step_index(torch.tensor([2, 3, 1])).expand(2, -1)
    both = multimodal_layout(1, step, 4, torch.tensor([True, False]), 2).dense()
    for row, first in enumerate((True, False)):
        alone = multimodal_layout(1, step[:1], 4, first, 2).dense()[0]
        assert torch.equal(both[row], alone)


# -- networks --------------------------------------------------------------------------------
def build(name="causalfusion-multimodal", model=None, method=None, data=None):
    return config.validate({"method": {"name": name, **(method or {})}, "model": {**TINY, **(model or {})},
                            "data": {**BYTES, **(data or {})}}).build_method()


def perturbed(name, seed=0):
    """A float64 method whose zero-initialised parts (image and text heads) are perturbed."""
    torch.manual_seed(seed)
    m = build(name)
    m.model.eval().double()
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture(scope="module", params=METHODS)
def tiny(request):
    return perturbed(request.param)


def image_first_logits(model, tokens, text):
    """Text logits of the training forward for image-then-text rows: one AR step, the image
    given clean (Transfusion: noised at t = 0)."""
    n, length, _ = tokens.shape
    plan = Plan(torch.arange(length).expand(n, -1), torch.zeros(n, length, dtype=torch.long),
                torch.zeros(n, 1, 1, dtype=torch.long))
    t = torch.zeros(n, 1, length, dtype=torch.long)
    return model(tokens, tokens[:, None], t, text, plan, torch.zeros(n, dtype=torch.bool))[1]


def inputs(seed=1, n=3, length=16):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, length, 2, generator=g, dtype=torch.float64)
    return tokens, torch.randint(0, 256, (n, TINY["max_text_len"]), generator=g)


def test_kv_cached_caption_logits_equal_the_training_forward(tiny):
    tokens, text = inputs()
    expected = image_first_logits(tiny.model, tokens, text)
    cache = tiny.model.new_cache()
    tiny.model.push_image(cache, tokens)
    whole = tiny.model.push_text(cache.select(torch.arange(3)), text, 0)
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-10)
    one_by_one = torch.cat([tiny.model.push_text(cache, text[:, i:i + 1], i)
                            for i in range(text.shape[1])], dim=1)
    torch.testing.assert_close(one_by_one, expected, rtol=0, atol=1e-10)


def test_greedy_captions_follow_the_argmax_of_the_training_forward(tiny):
    tokens, _ = inputs(2)
    tokenizer = tiny.text_tokenizer
    ids = caption(tiny.model, tokens, tokenizer)
    assert ids.shape == (3, TINY["max_text_len"])
    assert (ids[:, 0] == tokenizer.bos_id).all()
    argmax = image_first_logits(tiny.model, tokens, ids).argmax(-1)
    for row, logits_argmax in zip(ids.tolist(), argmax.tolist(), strict=True):
        end = row.index(tokenizer.eos_id)
        assert row[1:end] == logits_argmax[:end - 1]
        if end < len(row) - 1:  # decoded, not forced at the last position
            assert logits_argmax[end - 1] == tokenizer.eos_id
        assert set(row[end + 1:]) <= {tokenizer.pad_id}


def test_one_beam_and_top_k_one_are_greedy(tiny):
    tokens, _ = inputs(3)
    greedy = caption(tiny.model, tokens, tiny.text_tokenizer)
    assert torch.equal(caption(tiny.model, tokens, tiny.text_tokenizer, beams=1), greedy)
    top1 = caption(tiny.model, tokens, tiny.text_tokenizer, top_k=1,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, greedy)


def test_beam_search_over_every_caption_finds_the_most_likely_one():
    """With as many beams as captions, beam search is exhaustive: 5 ids, 3 free positions."""
    import itertools

    eos, pad = 1, 2
    tokenizer = SimpleNamespace(vocab_size=5, bos_id=0, eos_id=eos, pad_id=pad)
    torch.manual_seed(0)
    config_ = TransformerConfig(input_size=4, latent_channels=2, hidden_size=32, depth=2, num_heads=2,
                                num_classes=1, cond_tokens=1, class_dropout=0.0)
    model = MultimodalTransformer(config_, 5, max_text_len=5, pad_id=pad).eval().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        model.text_head.linear.bias[eos] -= 6  # an early eos would win: make captions long
    tokens, _ = inputs(4, n=6)
    found = caption(model, tokens, tokenizer, beams=125)

    def framed(free):  # bos, the free ids up to the first eos, eos (forced last), pad
        ids = list(free[:free.index(eos) + 1]) if eos in free else [*free, eos]
        return [0, *ids] + [pad] * (4 - len(ids))

    candidates = sorted({tuple(framed(free)) for free in itertools.product(range(5), repeat=3)})

    def score(image, ids):
        logp = image_first_logits(model, image, torch.tensor([ids])).log_softmax(-1)[0]
        end = ids.index(eos)  # the ids up to eos are chosen; a last-position eos is forced
        chosen = range(1, end + 1) if end < len(ids) - 1 else range(1, end)
        return sum(logp[i - 1, ids[i]].item() for i in chosen)

    for row in range(len(tokens)):
        best = max(candidates, key=lambda ids, row=row: score(tokens[row:row + 1], ids))
        assert found[row].tolist() == list(best)


def test_top_k_and_top_p_sample_only_inside_their_sets():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(400, -1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, None, 0.5, 1.0, g).tolist()) == {0}
    assert set(sample(logits, None, 0.7, 1.0, g).tolist()) == {0, 1}
    assert set(sample(logits, 3, None, 1.0, g).tolist()) == {0, 1, 2}
    assert set(sample(logits, 3, 0.85, 1.0, g).tolist()) == {0, 1, 2}


@pytest.mark.parametrize("options", [dict(beams=0), dict(top_k=0), dict(top_p=1.5),
                                     dict(beams=2, top_k=3), dict(temperature=0)])
def test_bad_decoding_options_say_what_is_allowed(tiny, options):
    with pytest.raises(CaptioningError, match="must|not both"):
        caption(tiny.model, inputs()[0], tiny.text_tokenizer, **options)


def test_cached_text_to_image_predictions_equal_the_training_forward(tiny):
    """Condition tokens and caption, then the clean tokens of the first AR step, in the cache:
    the prediction for the noisy tokens of the second step is the training forward's."""
    model, n, length = tiny.model, 2, 16
    tokens, text = inputs(5, n=n)
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(length, generator=g) for _ in range(n)])
    sizes = [16] if tiny.experiment.method.name == "transfusion" else [6, 10]
    step = step_index(torch.tensor(sizes)).expand(n, -1)
    t = torch.tensor([[[700] * len(sizes)], [[300] * len(sizes)]])
    plan = Plan(order, step, t)
    x_t = torch.randn(n, 1, length, 2, generator=g, dtype=torch.float64)
    network_t = plan.t_per_token()
    expected = model(tokens, x_t, network_t, text, plan, torch.ones(n, dtype=torch.bool))[0][:, 0]
    cache = model.new_cache()
    model.push_condition(cache, text)
    first = sizes[0] if len(sizes) > 1 else 0
    if first:
        ahead = order[:, :first]
        model.push_clean(cache, torch.gather(tokens, 1, ahead[..., None].expand(-1, -1, 2)), ahead)
    got = model.forward_cached(cache, x_t[:, 0, first:], order[:, first:], t[:, 0, -1])
    torch.testing.assert_close(got, expected[:, first:], rtol=0, atol=1e-10)


def test_probe_features_see_the_null_caption(tiny):
    """The linear probe's features: the image as one AR step after the null caption."""
    tokens, _ = inputs(6, n=2)
    latents = tokens.reshape(2, 4, 4, 2).permute(0, 3, 1, 2)  # patch 1: raster tokens
    t = torch.tensor([0, 100])
    null = torch.full((2, TINY["max_text_len"]), tiny.model.pad_id)
    plan = Plan(torch.arange(16).expand(2, -1), torch.zeros(2, 16, dtype=torch.long), t[:, None, None])
    features = tiny.model.hidden_states(latents, t)
    assert features.shape == (2, 16, 32)
    expected = tiny.model(tokens, tokens[:, None], t[:, None, None].expand(2, 1, 16), null, plan,
                          torch.ones(2, dtype=torch.bool))[0][:, 0]
    torch.testing.assert_close(tiny.model.final_layer(features), expected, rtol=0, atol=1e-10)


DIFFUSION = GaussianDiffusion.named("linear", 1000)


@pytest.mark.parametrize("ar_steps", [1, 3])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_text_to_image_generates_in_any_number_of_ar_steps(tiny, ar_steps, cfg):
    text = tiny.frame(["a red circle in the top left", "a blue square"])

    def run(seed):
        return text_to_image(tiny.model, DIFFUSION, text, ar_steps=ar_steps, cfg=cfg, steps=3,
                             generator=torch.Generator().manual_seed(seed))

    out = run(0)
    assert out.tokens.shape == (2, 16, 2) and out.step_sizes.numel() == ar_steps
    assert torch.isfinite(out.tokens).all()
    assert torch.equal(run(0).tokens, out.tokens)
    assert not torch.equal(run(1).tokens, out.tokens)


def test_class_conditional_generation_and_editing_point_to_text_to_image(tiny):
    from cfkit.generate import edit, generate

    with pytest.raises(GenerationError, match="generates from captions"):
        generate(tiny.model, DIFFUSION, [0], steps=3)
    with pytest.raises(GenerationError, match="generates from captions"):
        edit(tiny.model, DIFFUSION, torch.zeros(1, 2, 4, 4, dtype=torch.float64), "top", [0], steps=3)


def test_text_to_image_checks_its_captions(tiny):
    with pytest.raises(GenerationError, match=r"framed ids \(N, 8\)"):
        text_to_image(tiny.model, DIFFUSION, torch.zeros(2, 5, dtype=torch.long), steps=3)
    class_model = config.validate({"model": {k: v for k, v in TINY.items() if k != "max_text_len"}})
    with pytest.raises(GenerationError, match="not text-conditioned"):
        text_to_image(class_model.build_method().model, DIFFUSION, torch.zeros(1, 8, dtype=torch.long))


# -- the loss --------------------------------------------------------------------------------
def test_caption_loss_targets_run_from_after_bos_to_the_first_eos():
    eos, vocab = 1, 6
    text = torch.tensor([[0, 4, 5, eos, 2, 2]])
    logits = torch.zeros(1, 6, vocab)
    assert caption_loss(logits, text, eos).item() == pytest.approx(np.log(vocab))
    after = logits.clone()
    after[0, 3:] = torch.randn(3, vocab)  # predictions after eos: not targets
    assert caption_loss(after, text, eos).item() == pytest.approx(np.log(vocab))
    right = logits.clone()
    right[0, torch.arange(3), text[0, 1:4]] = 50.0  # 4, 5 and eos predicted surely
    assert caption_loss(right, text, eos).item() == pytest.approx(0.0, abs=1e-6)


def captioned_batch(n=6, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    captions = [[f"a shape number {i}", f"shape {i}"] for i in range(n)]
    return Batch(torch.randn(n, 2, 4, 4, generator=g), torch.zeros(n, dtype=torch.long),
                 captions=captions, **kwargs)


@pytest.mark.parametrize("name", METHODS)
def test_loss_is_the_image_loss_plus_the_weighted_caption_loss(name):
    only_images = build(name, method={"t2i_probability": 1.0}).loss(captioned_batch(),
                                                                   torch.Generator().manual_seed(0))
    assert only_images.terms["caption"].item() == 0
    assert only_images.loss.item() == pytest.approx(only_images.terms["image"].item())
    out = build(name, method={"t2i_probability": 0.0, "caption_weight": 0.5}).loss(
        captioned_batch(), torch.Generator().manual_seed(0))
    assert out.terms["caption"].item() == pytest.approx(np.log(259), rel=1e-4)  # zero text head
    assert out.loss.item() == pytest.approx(out.terms["image"].item() + 0.5 * out.terms["caption"].item())


@pytest.mark.parametrize("name", METHODS)
def test_two_processes_halves_average_to_the_one_process_loss(name):
    m = build(name, method={"t2i_probability": 0.5})
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    whole = captioned_batch(8)
    full = m.loss(whole, torch.Generator().manual_seed(3))
    halves = [m.loss(Batch(whole.latents[r], whole.labels[r], offset=r.start, global_size=8,
                           captions=whole.captions[r]), torch.Generator().manual_seed(3))
              for r in (slice(0, 4), slice(4, 8))]
    assert (halves[0].loss + halves[1].loss).item() / 2 == pytest.approx(full.loss.item(), rel=1e-5)


def test_a_batch_without_captions_says_the_method_needs_them():
    with pytest.raises(ValueError, match="needs captions"):
        build().loss(Batch(torch.randn(2, 2, 4, 4), torch.zeros(2, dtype=torch.long)))


@pytest.mark.parametrize("change,message", [
    ({"method": {"name": "causalfusion-multimodal", "ratio": 1}},
     "unknown method option.*allowed: t2i_probability, caption_weight, caption_dropout"),
    ({"method": {"name": "causalfusion-multimodal", "caption_max_t": 500}}, "unknown method option"),
    ({"method": {"name": "transfusion", "caption_max_t": 0}}, "caption_max_t must be an int in 1..1000"),
    ({"method": {"name": "transfusion", "t2i_probability": 1.5}}, "t2i_probability must be in"),
    ({"data": {"dataset": {"name": "shapes"}}}, "needs data.text_tokenizer"),
    ({"model": {**TINY, "max_text_len": 1}}, "max_text_len must be an int >= 2"),
    ({"model": {**TINY, "timestep": "token"}}, "allowed: add"),
])
def test_bad_multimodal_configs_name_the_problem(change, message):
    raw = {"method": {"name": "causalfusion-multimodal"}, "model": TINY, "data": BYTES, **change}
    with pytest.raises(ConfigError, match=message):
        config.validate(raw)


# -- training on shapes --------------------------------------------------------------------------
SHAPES_MODEL = {"preset": "CausalFusion-tiny", "input_size": 16, "patch_size": 4, "latent_channels": 3,
                "hidden_size": 64, "depth": 2, "num_heads": 4, "max_text_len": 32}
# The paper's mix makes captioning 10% of the rows at weight 0.01: too little signal for a
# few hundred CPU steps, so this run captions half of the rows at full weight. Transfusion's
# noise limit keeps the image of captioning rows readable (t < 100): its captions see the
# noised image, which a few hundred steps do not learn to read at any t.
SHAPES_METHODS = {"causalfusion-multimodal": {"t2i_probability": 0.5, "caption_weight": 1.0},
                  "transfusion": {"t2i_probability": 0.5, "caption_weight": 1.0, "caption_max_t": 100}}
SHIPPED = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "shapes-multimodal.toml"


def shapes_experiment(name, steps):
    return config.validate({
        "name": f"shapes-{name}", "method": {"name": name, **SHAPES_METHODS[name]},
        "model": SHAPES_MODEL,
        "data": {"dataset": {"name": "shapes", "size": 1000, "image_size": 16},
                 "tokenizer": {"name": "pixels", "channels": 3}, "text_tokenizer": {"name": "bytes"},
                 "flip": False, "shard_size": 500},
        "train": {"max_steps": steps, "batch_size": 32, "lr": 2e-3, "warmup_steps": 20, "ema": 0.9,
                  "ckpt_every": steps, "log_every": 50},
    })


def held_out(count=96):
    from cfkit import plugins
    from cfkit.tokenizers import from_uint8

    samples = list(plugins.build("datasets", "shapes", size=1000, image_size=16).samples("val"))[:count]
    return from_uint8(np.stack([s.image for s in samples])), [s.captions for s in samples]


def held_out_losses(method, model, images, captions):
    """(caption loss with every caption after its image, image loss with every caption before
    its image) on fixed held-out rows, plan and noise."""
    batch = Batch(images, torch.zeros(len(images), dtype=torch.long), captions=captions)
    plan, noise = method.draw(batch, torch.Generator().manual_seed(0))
    text = method.frame([c[0] for c in captions])
    first = torch.ones(len(images), dtype=torch.bool)
    with torch.no_grad():
        caption_term = method.multimodal_loss(images, text, ~first, plan, noise, model).terms["caption"]
        image_term = method.multimodal_loss(images, text, first, plan, noise, model).terms["image"]
    return caption_term.item(), image_term.item()


def mentions(captions, truths, position):
    """Fraction of captions naming the word at ``position`` of the first true caption
    ("a {colour} {shape} in the {place}")."""
    return float(np.mean([truth[0].split()[position] in text.split()
                          for text, truth in zip(captions, truths, strict=True)]))


def train_and_check(experiment, run, monkeypatch, capsys):
    """Train ``experiment`` into ``run``: the held-out caption and image losses at least
    halve, and the EMA model's greedy captions name the colour (chance 1/4) or the shape
    (chance 1/3) of held-out images far above chance."""
    from cfkit import train

    monkeypatch.setenv("CFKIT_CACHE", str(run.parent / "cache"))
    images, captions = held_out()
    trainer = train.Trainer(experiment, run, progress=False)
    before = held_out_losses(trainer.method, trainer.net, images, captions)
    trainer.run()
    trainer.method.model.load_state_dict(trainer.ema.state_dict())
    trainer.method.model.eval()
    after = held_out_losses(trainer.method, trainer.method.model, images, captions)
    greedy = trainer.method.caption(images)
    colour, shape = mentions(greedy, captions, 1), mentions(greedy, captions, 2)
    with capsys.disabled():  # the measured numbers, shown with pytest -s
        print(f"\n{experiment.method.name}, {experiment.train.max_steps} steps: caption loss "
              f"{before[0]:.3f} -> {after[0]:.3f}, image loss {before[1]:.3f} -> {after[1]:.3f}, "
              f"greedy captions name the colour {colour:.2f} (chance 0.25), the shape {shape:.2f} "
              f"(chance 0.33); e.g. {greedy[0]!r} for {captions[0][0]!r}")
    assert after[0] < 0.5 * before[0]
    assert after[1] < 0.5 * before[1]
    assert colour >= 0.6 or shape >= 0.7


@pytest.mark.parametrize("name", METHODS)
def test_training_on_shapes_lowers_both_losses_and_captions_name_the_colour(name, tmp_path, monkeypatch,
                                                                             capsys):
    from cfkit.cli import main

    run = tmp_path / name
    train_and_check(shapes_experiment(name, 300), run, monkeypatch, capsys)
    assert main(["sample", str(run), "--prompt", "a red circle in the top left", "--num", "2",
                 "--ar-steps", "2", "--steps", "5", "--cfg", "2", "--out", str(tmp_path / "t2i"),
                 "--no-progress"]) == 0
    stored = np.load(tmp_path / "t2i" / "samples.npz")
    assert stored["arr_0"].shape == (2, 16, 16, 3)
    assert list(stored["prompts"]) == ["a red circle in the top left"] * 2
    capsys.readouterr()
    assert main(["caption", str(run), "--image", str(tmp_path / "t2i" / "000000.png"),
                 str(tmp_path / "t2i" / "000001.png"), "--beams", "2", "--json"]) == 0
    captioned = json.loads(capsys.readouterr().out)
    assert [Path(c["image"]).name for c in captioned] == ["000000.png", "000001.png"]
    assert all(isinstance(c["caption"], str) for c in captioned)
    assert main(["eval", str(run), "--metrics", "cider", "--num", "24", "--metric-option",
                 "cider.tokenizer=simple", "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    (cider,) = report["results"]
    assert cider["name"].startswith("CIDEr-D") and cider["value"] > 50  # templated captions
    assert report["captioning"]["num"] == 24


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_the_shipped_config_learns_to_caption_with_the_papers_mix(name, tmp_path, monkeypatch, capsys):
    """benchmarks/configs/shapes-multimodal.toml as shipped (2000 steps; Transfusion with its
    noise limit): several minutes on 2 CPU cores."""
    overrides = [] if name == "causalfusion-multimodal" else [
        "method.name=transfusion", "method.caption_max_t=100"]
    train_and_check(config.load(SHIPPED, overrides), tmp_path / name, monkeypatch, capsys)
