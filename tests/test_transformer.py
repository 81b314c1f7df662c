"""The causal transformer: backends agree, the mask is respected, the KV cache equals the
full forward, presets match the official constructors."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cfkit import plugins, precision
from cfkit.masks import batch_layout
from cfkit.plan import Planner
from cfkit.schedules import step_index
from cfkit.transformer import (
    PRESETS,
    CausalTransformer,
    Mlp,
    SplitMask,
    TransformerConfig,
    fused_linear_gelu,
    patchify,
    preset,
    split_attend,
    unpatchify,
)
from tests.strategies import splits

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def perturbed(config: TransformerConfig, seed: int = 0) -> CausalTransformer:
    """A model whose zero-initialised parts are perturbed so every path matters."""
    torch.manual_seed(seed)
    model = CausalTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def draw(per_sample=False, copies=1, batch=3, grid=(4, 4), seed=1, sampler="per-step"):
    g = torch.Generator().manual_seed(seed)
    planner = Planner(
        plugins.build("schedules", "exp-decay", gamma=0.9), plugins.build("orderings", "random"),
        plugins.build("timestep_samplers", sampler), copies=copies, per_sample=per_sample,
    )
    plan = planner.draw(batch, grid, 1000, g)
    length = grid[0] * grid[1]
    x_start = torch.randn(batch, length, 2, generator=g)
    return plan, x_start, torch.randn(batch, copies, length, 2, generator=g)


def run(model, plan, x_start, x_t):
    labels = torch.arange(x_start.shape[0]) % model.config.num_classes
    with torch.no_grad():
        return model(x_start, x_t, plan.t_per_token(), labels, plan)


def tiny(**options):
    base = dict(input_size=4, latent_channels=2, hidden_size=32, depth=2, num_heads=2)
    return TransformerConfig(**{**base, **options})


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("copies", [1, 3])
@pytest.mark.parametrize("timestep", ["add", "token"])
def test_attention_backends_agree_in_fp32(per_sample, copies, timestep):
    plan, x_start, x_t = draw(per_sample, copies)
    outs = {
        backend: run(perturbed(tiny(attention=backend, timestep=timestep, cond_repeat=2)),
                     plan, x_start, x_t)
        for backend in ("eager", "sdpa", "flex")
    }
    torch.testing.assert_close(outs["sdpa"], outs["eager"], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs["flex"], outs["eager"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("copies", [1, 3])
def test_sdpa_and_eager_give_the_same_gradients(copies):
    plan, x_start, x_t = draw(copies=copies)
    labels = torch.arange(x_start.shape[0]) % 10
    grads = {}
    for backend in ("eager", "sdpa"):
        model = perturbed(tiny(attention=backend, class_dropout=0.0)).train()
        model(x_start, x_t, plan.t_per_token(), labels, plan).square().mean().backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert grads["eager"].abs().sum() > 0
    torch.testing.assert_close(grads["sdpa"], grads["eager"], rtol=1e-4, atol=1e-6)


def test_the_last_block_computes_only_the_noisy_rows_the_output_layer_reads():
    plan, x_start, x_t = draw(copies=2)
    model = perturbed(tiny())
    rows = []
    for block in model.blocks:
        block.mlp.register_forward_pre_hook(lambda module, inputs: rows.append(inputs[0].shape[1]))
    run(model, plan, x_start, x_t)
    noisy = 2 * x_start.shape[1]
    assert rows[0] > noisy and rows[-1] == noisy  # the first block also runs the context


@st.composite
def layouts(draw):
    """A ``[cond | clean | K copies]`` layout of 1-3 samples sharing a split or not."""
    length, batch = draw(st.integers(1, 24)), draw(st.integers(1, 3))
    shared = draw(st.booleans())
    rows = [draw(splits(length)) for _ in range(1 if shared else batch)]
    step = torch.stack([step_index(torch.tensor(sizes)) for sizes in rows]).expand(batch, -1)
    cond, copies = draw(st.integers(0, 3)), draw(st.integers(1, 3))
    layout = batch_layout(cond, step, copies, None if shared else length)
    return layout, layout.length - copies * length, copies


@settings(max_examples=60, deadline=None)
@given(case=layouts(), seed=st.integers(0, 2**16))
def test_split_attention_equals_dense_masked_attention(case, seed):
    layout, context_len, copies = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(layout.kind.shape[0], 2, layout.length, 4, generator=g) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense().unsqueeze(1))
    split = split_attend(q, k, v, SplitMask.from_layout(layout, context_len, copies))
    torch.testing.assert_close(split, dense, atol=1e-5, rtol=0)


def test_timestep_as_token_differs_from_added_timestep():
    plan, x_start, x_t = draw()
    added = run(perturbed(tiny(timestep="add")), plan, x_start, x_t)
    token = run(perturbed(tiny(timestep="token")), plan, x_start, x_t)
    assert not torch.allclose(added, token, atol=1e-3)


def test_noisy_tokens_of_later_steps_do_not_change_earlier_predictions():
    plan, x_start, x_t = draw(batch=1, seed=3)
    step = plan.step[0]
    if int(step[-1]) == 0:
        pytest.skip("draw gave a single AR step")
    model = perturbed(tiny())
    before = run(model, plan, x_start, x_t)
    later = step == step[-1]
    changed = x_t.clone()
    changed[0, 0, later] += 5.0
    after = run(model, plan, x_start, changed)
    torch.testing.assert_close(after[0, 0, ~later], before[0, 0, ~later], atol=1e-6, rtol=0)
    assert not torch.allclose(after[0, 0, later], before[0, 0, later])


def test_copies_are_independent_given_the_clean_context():
    plan, x_start, x_t = draw(batch=2, copies=3, seed=5)
    model = perturbed(tiny())
    before = run(model, plan, x_start, x_t)
    changed = x_t.clone()
    changed[:, 1] += 3.0
    after = run(model, plan, x_start, changed)
    torch.testing.assert_close(after[:, [0, 2]], before[:, [0, 2]], atol=1e-6, rtol=0)


def test_kv_cached_steps_equal_the_full_forward():
    """Pushing condition and clean tokens of steps < s and running step s's noisy tokens
    against the cache equals the training forward's prediction for step s."""
    plan, x_start, x_t = draw(batch=2, seed=7)
    model = perturbed(tiny())
    full = run(model, plan, x_start, x_t)
    order, step = plan.order, plan.step[0]
    labels = torch.arange(2) % model.config.num_classes
    t = plan.t_per_token()[:, 0]
    for s in range(int(step[-1]) + 1):
        cache = model.new_cache()
        ahead = order[:, step < s]
        here = step == s
        with torch.no_grad():
            model.push_condition(cache, labels)
            if ahead.shape[1]:
                model.push_clean(cache, torch.gather(x_start, 1, ahead[..., None].expand(-1, -1, 2)), ahead)
            out = model.forward_cached(cache, x_t[:, 0, here], order[:, here], t[:, here][:, 0])
        torch.testing.assert_close(out, full[:, 0, here], atol=1e-5, rtol=0)


def test_bf16_autocast_runs_on_cpu():
    plan, x_start, x_t = draw()
    model = perturbed(tiny())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, plan, x_start, x_t)
    reference = run(model, plan, x_start, x_t)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.1)


def test_cond_repeat_repeats_class_tokens_with_their_own_positions():
    model = CausalTransformer(tiny(cond_tokens=2, cond_repeat=3))
    cond = model.condition(torch.tensor([1]))
    assert cond.shape == (1, 6, 32)
    table = model.class_embedder(torch.tensor([1]))
    torch.testing.assert_close(cond - model.cond_pos_embed, table.repeat(1, 3, 1))
    assert model.class_embedder.table.weight.shape == (11, 64)


def test_label_dropout_maps_to_the_null_class():
    model = CausalTransformer(tiny(class_dropout=0.5))
    labels = torch.zeros(2000, dtype=torch.long)
    dropped = model.class_embedder.drop(labels, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, model.config.num_classes}
    assert 0.45 < (dropped == model.config.num_classes).float().mean() < 0.55


@pytest.mark.parametrize("name,hidden,depth,heads", [
    ("CausalFusion-L", 1024, 24, 16), ("CausalFusion-XL", 1280, 32, 20),
    ("CausalFusion-H", 1408, 48, 22),
])
def test_system_presets_match_the_official_constructors(name, hidden, depth, heads):
    config = preset(name)
    assert (config.hidden_size, config.depth, config.num_heads) == (hidden, depth, heads)
    assert (config.patch_size, config.latent_channels, config.cond_tokens) == (1, 16, 64)
    assert config.pos_embed == "learned"


def test_causalfusion_l_has_the_papers_parameter_count():
    """368M for CausalFusion-L on 256px ImageNet (16x16 MAR latents): counted from shapes."""
    with torch.device("meta"):
        model = CausalTransformer(preset("CausalFusion-L", input_size=16, num_classes=1000))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - 368) < 368 * 0.03, count


def test_patchify_round_trips_and_uses_the_reference_layout():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 4, 12)
    # token 1 is the top-right patch; its first value is channel 0 at (row 0, col 2)
    assert tokens[0, 1, 0] == x[0, 0, 0, 2]
    torch.testing.assert_close(unpatchify(tokens, 2, 3), x)


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match="patch_size 3 does not divide input_size 8"):
        TransformerConfig(input_size=8, patch_size=3).check()
    with pytest.raises(ValueError, match="unknown preset 'X'; allowed: .*CausalFusion-L"):
        preset("X")
    assert set(PRESETS) >= {"CausalFusion-L", "CausalFusion-XL", "CausalFusion-H",
                            "CausalFusion-S", "CausalFusion-tiny"}


def test_gradient_checkpointing_gives_the_same_gradients():
    plan, x_start, x_t = draw()
    labels = torch.arange(x_start.shape[0]) % 10
    grads = []
    for recompute in (False, True):
        model = perturbed(tiny(class_dropout=0.0)).train()
        model.grad_checkpoint = recompute
        model(x_start, x_t, plan.t_per_token(), labels, plan).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_a_network_without_gradient_checkpointing_refuses_it(tmp_path):
    from cfkit import config as configs
    from cfkit import train

    root = Path(__file__).resolve().parents[1]
    experiment = configs.load(root / "benchmarks" / "configs" / "digits-tiny.toml",
                              ["method.name=dit", "model.preset=DiT-tiny", "train.grad_checkpoint=true"])
    with pytest.raises(ValueError, match="train.grad_checkpoint.*does not support it"):
        train.Trainer(experiment, tmp_path / "run")


def test_cpu_inference_with_avx512_fuses_the_mlp_gelu_and_matches_the_unfused_mlp(monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(32, 128)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        for capability in ("AVX2", "DEFAULT"):  # there the fused kernel ran slower
            monkeypatch.setattr(precision, "cpu_capability", lambda capability=capability: capability)
            assert not fused_linear_gelu(x, mlp.fc1)
        monkeypatch.setattr(precision, "cpu_capability", lambda: "AVX512")
        assert fused_linear_gelu(x, mlp.fc1) == torch.backends.mkldnn.is_available()
        fused = mlp(x)
        mlp.fused = False
        plain = mlp(x)
        mlp.fused = True
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused, mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh")).detach())
    # training needs the backward, autocast its own precision: both keep the two kernels
    assert not fused_linear_gelu(x, mlp.fc1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_linear_gelu(x, mlp.fc1)
    with torch.no_grad():
        assert not fused_linear_gelu(x.double(), mlp.fc1)


@pytest.mark.parametrize(("attention", "fused"), [("sdpa", True), ("flex", True), ("eager", False)])
def test_only_the_eager_backend_the_reference_kernels_keeps_the_mlp_unfused(attention, fused):
    mlps = [m for m in CausalTransformer(tiny(attention=attention)).modules() if isinstance(m, Mlp)]
    assert len(mlps) == 2 and all(m.fused == fused for m in mlps)
