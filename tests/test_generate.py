"""Generation: the KV-cached AR sampler equals the uncached full forward, S = 1 is plain
in-context diffusion sampling, seeds reproduce, per-sample generators make an image
independent of its batch, editing keeps its tokens, bad options say what is allowed, and
third-party orderings and schedules are found by name."""

import pytest
import torch
from generation_plugins import install_third_party

from cfkit import plugins
from cfkit.diffusion import GaussianDiffusion
from cfkit.generate import GenerationError, SamplingOptions, ar_step_sizes, edit, generate, keep_mask
from cfkit.samplers import SampleGenerators
from cfkit.transformer import CausalTransformer, TransformerConfig, patchify

DIFFUSION = GaussianDiffusion.named("linear", 1000)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **options) -> CausalTransformer:
    """A 4x4-token model in float64 whose zero-initialised parts are perturbed: every path
    matters, and the random network's large outputs stay exact enough to compare at 1e-4."""
    base = dict(input_size=4, latent_channels=2, hidden_size=32, depth=2, num_heads=2,
                num_classes=5)
    torch.manual_seed(seed)
    model = CausalTransformer(TransformerConfig(**{**base, **options})).eval().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def run(model, labels=(0, 3), seed=0, **options):
    options = {"steps": 4, **options}
    return generate(model, DIFFUSION, list(labels), generator=torch.Generator().manual_seed(seed),
                    **options)


@pytest.mark.parametrize("ar_steps", [1, 2, 4])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_cached_generation_equals_the_uncached_full_forward(model, ar_steps, cfg):
    options = dict(ar_steps=ar_steps, order="random", cfg=cfg, cfg_interval=(0, 600))
    cached = run(model, **options)
    uncached = run(model, cached=False, **options)
    assert torch.equal(cached.order, uncached.order)
    assert cached.step_sizes.tolist() == uncached.step_sizes.tolist()
    assert cached.step_sizes.numel() == ar_steps
    torch.testing.assert_close(cached.tokens, uncached.tokens, atol=1e-4, rtol=0)


def test_cached_generation_equals_the_uncached_with_timestep_tokens():
    model = tiny_model(timestep="token")
    options = dict(step_sizes=[5, 11], cfg=2.0, sampler="ddim")
    torch.testing.assert_close(run(model, **options).tokens,
                               run(model, cached=False, **options).tokens, atol=1e-4, rtol=0)


def test_dpm_solver_pp_in_4_ar_steps_gives_the_same_images_cached_and_uncached(model):
    """The multistep sampler starts each AR step afresh; its second-order steps over the KV
    cache equal those over the recomputed context, and differ from DDIM's."""
    options = dict(ar_steps=4, order="random", cfg=2.0, sampler="dpm-solver++", steps=6)
    cached = run(model, **options)
    torch.testing.assert_close(cached.latents, run(model, cached=False, **options).latents,
                               atol=1e-4, rtol=0)
    ddim = run(model, **{**options, "sampler": "ddim"})
    assert (cached.latents - ddim.latents).abs().max() > 1e-2


def test_one_ar_step_is_plain_in_context_diffusion_sampling(model):
    """S = 1 in raster order is the reference's loop: condition tokens ``[y; null]`` in the
    cache, all L tokens from noise, then guided ancestral steps over the respaced schedule."""
    labels, scale = torch.tensor([1, 4]), 2.5
    diffusion = DIFFUSION.respace("4")
    generator = torch.Generator().manual_seed(9)
    cache = model.new_cache()
    with torch.no_grad():
        model.push_condition(cache, torch.cat([labels, torch.full_like(labels, 5)]))
        x = torch.randn(2, 16, 2, generator=generator).double()
        positions = torch.arange(16).expand(2, -1)
        for index in reversed(range(4)):
            t = torch.full((2,), index)
            eps = model.guided_cached(cache, x, positions, diffusion.timestep_map[t], scale)
            mean, log_variance, _ = diffusion.p_mean_variance(eps, x, t)
            noise = torch.randn(x.shape, generator=generator).double()
            x = mean + (index > 0) * (0.5 * log_variance).exp() * noise
    ours = run(model, labels.tolist(), seed=9, order="raster", cfg=scale)
    torch.testing.assert_close(ours.tokens, x, atol=1e-10, rtol=0)


def test_a_seed_reproduces_a_generation_and_another_seed_changes_it(model):
    first = run(model, seed=1, ar_steps=2)
    torch.testing.assert_close(run(model, seed=1, ar_steps=2).tokens, first.tokens, atol=0, rtol=0)
    assert not torch.allclose(run(model, seed=2, ar_steps=2).tokens, first.tokens)


@pytest.mark.parametrize("options", [dict(ar_steps=2, cfg=2.0), dict(schedule="uniform")],
                         ids=["ar-steps-cfg", "schedule"])
def test_with_per_sample_generators_an_image_does_not_depend_on_its_batch(model, options):
    """Image i is drawn from (seed, i): its order and noise are the same in any batch (and a
    schedule's split, from the seed alone, in every batch); float64 leaves only rounding."""
    labels, options = [0, 3, 1, 4, 2], {"steps": 4, "order": "random", **options}
    whole = generate(model, DIFFUSION, labels, generator=SampleGenerators(7, range(5)), **options)
    parts = [generate(model, DIFFUSION, labels[rows.start:rows.stop], generator=SampleGenerators(7, rows),
                      **options) for rows in (range(0, 2), range(2, 5))]
    torch.testing.assert_close(torch.cat([p.tokens for p in parts]), whole.tokens, atol=1e-9, rtol=0)
    assert torch.equal(torch.cat([p.order for p in parts]), whole.order)
    assert all(torch.equal(p.step_sizes, whole.step_sizes) for p in parts)
    assert len(set(map(tuple, whole.order.tolist()))) == 5  # each image its own order
    other = generate(model, DIFFUSION, labels, generator=SampleGenerators(8, range(5)), **options)
    assert not torch.allclose(other.tokens, whole.tokens)


def test_earlier_ar_steps_do_not_depend_on_the_later_split(model):
    """AR step 1 is generated before any later token exists: splitting the rest differently
    leaves its tokens unchanged (the same seed draws the same noise for it)."""
    a = run(model, step_sizes=[6, 10])
    b = run(model, step_sizes=[6, 5, 5])
    first = a.order[:, :6]
    gather = lambda r: torch.gather(r.tokens, 1, first[..., None].expand(-1, -1, 2))  # noqa: E731
    torch.testing.assert_close(gather(a), gather(b), atol=0, rtol=0)
    assert not torch.allclose(a.tokens, b.tokens)


def test_generated_tokens_and_latents_have_the_documented_shapes(model):
    result = run(model, labels=(0, 1, 2), ar_steps=3)
    assert result.tokens.shape == (3, 16, 2) and result.latents.shape == (3, 2, 4, 4)
    torch.testing.assert_close(patchify(result.latents, 1), result.tokens, atol=0, rtol=0)
    assert sorted(result.order[0].tolist()) == list(range(16))


@pytest.mark.parametrize("split,total", [(False, 40), (True, 10)])
def test_progress_counts_every_diffusion_step_and_split_steps_shares_t(model, split, total):
    calls = []
    run(model, ar_steps=4, steps=10, split_steps=split, progress=lambda *a: calls.append(a))
    assert calls == [(done, total) for done in range(1, total + 1)]


def test_ar_step_sizes_from_a_count_a_list_or_a_schedule():
    assert ar_step_sizes(16, ar_steps=3).tolist() == [6, 5, 5]
    assert ar_step_sizes(16).tolist() == [16]
    assert ar_step_sizes(16, step_sizes=[1, 15]).tolist() == [1, 15]
    drawn = ar_step_sizes(16, schedule="uniform", generator=torch.Generator().manual_seed(0))
    assert int(drawn.sum()) == 16 and bool((drawn > 0).all())


@pytest.mark.parametrize("keep,rows,cols", [
    ("top", [0, 1], [0, 1, 2, 3]), ("bottom", [2, 3], [0, 1, 2, 3]), ("centre", [1, 2], [1, 2]),
])
def test_keep_regions(keep, rows, cols):
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[torch.tensor(rows)[:, None], torch.tensor(cols)] = True
    assert torch.equal(keep_mask(keep, (4, 4)), expected.flatten())


def test_edit_keeps_the_kept_tokens_and_generates_the_others(model):
    image = run(model, labels=(0, 1)).latents
    grid = torch.zeros(4, 4, dtype=torch.bool)
    grid[0, :] = grid[3, 3] = True
    kept = grid.flatten()
    for keep, mask in (("centre", keep_mask("centre", (4, 4))), (grid, kept)):
        edited = edit(model, DIFFUSION, image, keep, [4], ar_steps=2, steps=4, cfg=2.0,
                      generator=torch.Generator().manual_seed(3))
        before, after = patchify(image, 1), edited.tokens
        torch.testing.assert_close(after[:, mask], before[:, mask], atol=0, rtol=0)
        assert not torch.isclose(after[:, ~mask], before[:, ~mask]).any()
        assert edited.step_sizes.tolist() == [int((~mask).sum()) - int((~mask).sum()) // 2,
                                              int((~mask).sum()) // 2]
        assert torch.equal(edited.order[:, : int(mask.sum())].sort().values,
                           mask.nonzero()[:, 0].expand(2, -1))


def test_edit_context_is_the_same_cached_and_uncached(model):
    image = run(model).latents
    options = dict(ar_steps=2, steps=4, cfg=3.0)
    a = edit(model, DIFFUSION, image, "bottom", [2], generator=torch.Generator().manual_seed(4),
             **options)
    b = edit(model, DIFFUSION, image, "bottom", [2], generator=torch.Generator().manual_seed(4),
             cached=False, **options)
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-4, rtol=0)


def test_edit_keeping_everything_generates_nothing(model):
    image = run(model).latents
    calls = []
    edited = edit(model, DIFFUSION, image, torch.ones(4, 4, dtype=torch.bool), [1],
                  progress=lambda *a: calls.append(a))
    assert calls == [] and edited.step_sizes.numel() == 0
    torch.testing.assert_close(edited.latents, image, atol=0, rtol=0)


def test_edit_keeping_nothing_is_generation(model):
    image = run(model).latents
    options = dict(ar_steps=2, steps=4, cfg=2.0)
    edited = edit(model, DIFFUSION, image, torch.zeros(4, 4, dtype=torch.bool), [3, 1],
                  generator=torch.Generator().manual_seed(6), **options)
    torch.testing.assert_close(edited.tokens, run(model, (3, 1), seed=6, **options).tokens,
                               atol=0, rtol=0)


@pytest.mark.parametrize("options,message", [
    (dict(labels=(0, 5)), r"class 5 is out of range; this model has 5 classes: allowed 0\.\.4"),
    (dict(labels=(-1,)), r"class -1 is out of range"),
    (dict(labels=()), r"no class labels"),
    (dict(cfg=0.5), r"cfg scale must be >= 1"),
    (dict(cfg=2.0, cfg_interval=(600, 100)), r"cfg interval must be 0 <= lo < hi"),
    (dict(ar_steps=17), r"ar_steps must be in 1\.\.16"),
    (dict(ar_steps=2, step_sizes=[8, 8]), r"give one of ar_steps, step_sizes and schedule"),
    (dict(step_sizes=[8, 7]), r"summing to L=16"),
    (dict(steps=1), r"allowed: an int N >= 2, 'ddimN'"),
    (dict(steps="ddim50", split_steps=True), r"split_steps needs an int"),
    (dict(ar_steps=4, steps=6, split_steps=True), r"give at least 8"),
    (dict(order=lambda n, grid, g: torch.zeros(n, 16)), r"each row a permutation of 0\.\.15"),
    (dict(schedule=lambda length, g: [3, 3]), r"summing to L=16"),
])
def test_bad_options_raise_generation_error_saying_what_is_allowed(model, options, message):
    labels = options.pop("labels", (0,))
    with pytest.raises(GenerationError, match=message):
        run(model, labels, **options)


@pytest.mark.parametrize("kind,option", [("orderings", "order"), ("schedules", "schedule"),
                                         ("samplers", "sampler")])
def test_unknown_component_names_list_the_known_ones(model, kind, option):
    with pytest.raises(plugins.UnknownComponentError, match=f"unknown {kind} name 'nope'; known: "):
        run(model, **{option: "nope"})


def test_guidance_needs_a_null_class(model):
    no_null = tiny_model(class_dropout=0.0)
    with pytest.raises(GenerationError, match="no null class"):
        run(no_null, cfg=2.0)
    assert run(no_null, cfg=1.0).tokens.shape == (2, 16, 2)


def test_edit_checks_the_latents_and_the_keep_region(model):
    image = run(model).latents
    with pytest.raises(GenerationError, match=r"image latents must be \(N, 2, 4, 4\)"):
        edit(model, DIFFUSION, image[:, :1], "top", [0])
    with pytest.raises(GenerationError, match="allowed: centre, top, bottom"):
        edit(model, DIFFUSION, image, "left", [0])
    with pytest.raises(GenerationError, match="one class or one per image"):
        edit(model, DIFFUSION, image, "top", [0, 1, 2])


@pytest.fixture
def third_party(monkeypatch):
    return install_third_party(monkeypatch)


def test_third_party_orderings_and_schedules_are_resolved_by_name(model, third_party):
    result = run(model, order="reverse-raster", schedule="halves")
    assert result.order.tolist() == [list(range(15, -1, -1))] * 2
    assert result.step_sizes.tolist() == [8, 8]


def test_sampling_options_passed_whole_equal_the_same_fields_as_keywords(model):
    options = SamplingOptions(ar_steps=2, order="raster", steps=4, cfg=2.0, cfg_interval=(0, 600))
    whole = generate(model, DIFFUSION, [0, 3], options, generator=torch.Generator().manual_seed(1))
    fields = run(model, seed=1, ar_steps=2, order="raster", cfg=2.0, cfg_interval=(0, 600))
    assert torch.equal(whole.tokens, fields.tokens)
    # keywords replace fields of the options given
    replaced = generate(model, DIFFUSION, [0, 3], options, generator=torch.Generator().manual_seed(1),
                        ar_steps=1)
    assert torch.equal(replaced.tokens, run(model, seed=1, ar_steps=1, order="raster", cfg=2.0,
                                            cfg_interval=(0, 600)).tokens)
    assert not torch.equal(replaced.tokens, whole.tokens)


def test_sampling_options_are_frozen_and_name_what_is_allowed():
    options = SamplingOptions()
    with pytest.raises(AttributeError):
        options.cfg = 2.0
    with pytest.raises(GenerationError, match="unknown sampling option 'guidance'; allowed: ar_steps, "):
        SamplingOptions.of(guidance=2.0)
    with pytest.raises(GenerationError, match="batch_size must be an integer >= 1, got 0"):
        SamplingOptions(batch_size=0)
    with pytest.raises(GenerationError, match="seed must be an integer >= 0, got 1.5"):
        SamplingOptions.of(options, seed=1.5)
    with pytest.raises(GenerationError, match="samplers 'ddim' with options {'eta': 'x'}"):
        SamplingOptions(sampler="ddim", sampler_options={"eta": "x"}).built_sampler()
