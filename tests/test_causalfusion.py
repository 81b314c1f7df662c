"""The causalfusion and incontext-dit methods: the dual-factorised loss on a batch."""

import numpy as np
import pytest
import torch
from refdata import reference_params

from cfkit import config
from cfkit.methods import Batch
from cfkit.plan import Plan
from cfkit.schedules import step_index
from cfkit.transformer import patchify

TINY = {"preset": "CausalFusion-tiny", "input_size": 4, "latent_channels": 2, "hidden_size": 32,
        "depth": 2, "num_heads": 2}


def method(name="causalfusion", **sections):
    return config.validate({"method": {"name": name}, "model": TINY, **sections}).build_method()


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 10, (n,), generator=g))


@pytest.mark.reference
@pytest.mark.parametrize("npz", reference_params("official_tiny_*.npz"))
def test_plan_loss_equals_the_official_loss(npz, tmp_path):
    """With the recorded order, split, t, noise and dropped labels, the method's weighted
    loss is the official one (AR weights linear 2 -> 1)."""
    from cfkit import checkpoint
    from cfkit.convert import convert_official

    d = np.load(npz)
    m = checkpoint.load(convert_official(npz.with_suffix(".pt"), tmp_path / "c"))
    m.model.double()
    x = torch.from_numpy(d["x"]).double()
    n = x.shape[0]
    order = torch.from_numpy(d["ids_shuffle"])
    step = step_index(torch.from_numpy(d["step_sizes"])).expand(n, -1)
    t = torch.from_numpy(d["t"])
    plan = Plan(order, step, t[:, None, None].expand(n, 1, int(step[0, -1]) + 1))
    noise = patchify(torch.from_numpy(d["noise"]).double(), m.config.patch_size)
    noise = torch.gather(noise, 1, order[..., None].expand(-1, -1, noise.shape[-1]))[:, None]
    with torch.no_grad():
        out = m.plan_loss(x, torch.from_numpy(d["y_effective"]), plan, noise)
    assert abs(out.loss.item() - float(d["loss"])) < 1e-5
    np.testing.assert_allclose(out.per_token[:, 0].numpy(), d["mse"].mean(-1), atol=1e-5)


@pytest.mark.parametrize("copies,per_sample", [(1, False), (3, True)])
def test_loss_falls_on_a_fixed_batch(copies, per_sample):
    m = method(factorisation={"copies": copies, "per_sample": per_sample})
    opt = torch.optim.AdamW(m.model.parameters(), lr=3e-3)
    data, g = batch(), torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        out = m.loss(data, g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert out.per_token.shape == (4, copies, 16)
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])


def test_incontext_dit_is_one_ar_step_with_unit_weights():
    m = method("incontext-dit")
    out = m.loss(batch(), torch.Generator().manual_seed(0))
    assert (out.plan.num_steps == 1).all()
    torch.testing.assert_close(out.loss, out.per_token.mean())
    assert type(m).__name__ == "CausalFusion"  # the same code, configured


def test_ar_weights_scale_the_loss_of_early_steps():
    m = method(factorisation={"schedule": {"name": "fixed", "steps": 4}})
    out = m.loss(batch(), torch.Generator().manual_seed(0))
    w = 2.0 - (torch.arange(16) // 4 * 4) / 16  # linear 2 -> 1 over starts 0, 4, 8, 12
    torch.testing.assert_close(out.loss, (out.per_token * w).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_prediction_targets(prediction):
    m = method(diffusion={"prediction": prediction})
    torch.nn.init.zeros_(m.model.final_layer.linear.weight)  # network output is 0
    data = batch()
    g = torch.Generator().manual_seed(3)
    out = m.loss(data, g)
    # with a zero output the per-token error is the target's mean square
    g = torch.Generator().manual_seed(3)
    plan = m.planner.draw(4, m.config.grid, 1000, g)
    noise = torch.randn(4, 1, 16, 2, generator=g)
    x0 = torch.gather(patchify(data.latents, 1), 1, plan.order[..., None].expand(-1, -1, 2))[:, None]
    target = m.diffusion.target(prediction, x0, plan.t_per_token(), noise)
    torch.testing.assert_close(out.per_token, target.pow(2).mean(-1), rtol=1e-5, atol=1e-6)


def test_unknown_model_options_are_a_config_error():
    with pytest.raises(config.ConfigError, match=r"model: unknown model option\(s\) \['width'\]; "
                                                 r"allowed: preset, .*hidden_size"):
        config.validate({"model": {"width": 3}})
