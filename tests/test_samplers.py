"""Diffusion samplers: DDPM equals the reference's ancestral step, DDPM, DDIM and DPM-Solver++
equal diffusers' schedulers on the same inputs and noise, respacing from ``steps``, and
per-sample generators whose draws do not depend on the batch."""

import numpy as np
import pytest
import torch
from refdata import reference_params

from cfkit import plugins
from cfkit.diffusion import GaussianDiffusion
from cfkit.samplers import SampleGenerators, noise_like, respaced, sample_seed, shared_generator

BASE = GaussianDiffusion.named("linear", 1000)


def reference_steps():
    """(file, respacing) for every ``p_step_t_<respacing>`` of every diffusion*.npz."""

    def respacings(path) -> list[str]:
        with np.load(path) as npz:
            return [key.removeprefix("p_step_t_") for key in npz.files if key.startswith("p_step_t_")]

    return reference_params("diffusion*.npz", respacings)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def inputs(seed: int = 1, shape=(4, 5, 8)):
    g = seeded(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.reference
@pytest.mark.parametrize("path,respacing", reference_steps())
def test_ddpm_step_equals_the_reference_ancestral_step_given_the_same_noise(path, respacing):
    d = np.load(path)
    diffusion = BASE.respace(respacing)
    x_t, eps, t = (torch.from_numpy(d[f"p_step_{k}_{respacing}"]) for k in ("xn", "eps", "t"))
    x_prev = plugins.build("samplers", "ddpm").step(diffusion, eps, x_t, t, "eps", seeded(5))
    noise = torch.randn(x_t.shape, generator=seeded(5))
    mean = torch.from_numpy(d[f"p_step_mean_{respacing}"])
    sigma = torch.from_numpy(d[f"p_step_log_variance_{respacing}"]).mul(0.5).exp()
    expected = mean + (t != 0).float()[:, None, None] * sigma * noise
    torch.testing.assert_close(x_prev, expected, atol=1e-5, rtol=1e-5)
    assert (t == 0).any(), "the vectors should include the last step (no noise)"


def test_ddpm_adds_no_noise_at_the_last_step():
    x_t, eps = inputs()
    sampler = plugins.build("samplers", "ddpm")
    last = torch.zeros(4, dtype=torch.long)
    a = sampler.step(BASE, eps, x_t, last, "eps", seeded(1))
    b = sampler.step(BASE, eps, x_t, last, "eps", seeded(2))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    mean, _, _ = BASE.p_mean_variance(eps, x_t, last)
    torch.testing.assert_close(a, mean, atol=0, rtol=0)
    middle = torch.full((4,), 500)
    assert not torch.equal(sampler.step(BASE, eps, x_t, middle, "eps", seeded(1)),
                           sampler.step(BASE, eps, x_t, middle, "eps", seeded(2)))


DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def diffusers_scheduler(name: str, **options):
    schedulers = pytest.importorskip("diffusers", reason="diffusers is not installed "
                                     "(pip install -c constraints.txt diffusers)")
    return getattr(schedulers, name)(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                     beta_schedule="linear", clip_sample=False, **options)


@pytest.mark.parametrize("variance", ["fixed-large", "fixed-small"])
@pytest.mark.parametrize("respacing", ["1000", "25"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddpm_step_equals_diffusers_ddpm_scheduler(variance, respacing, prediction):
    scheduler = diffusers_scheduler("DDPMScheduler", variance_type=variance.replace("-", "_"),
                                    prediction_type=DIFFUSERS_PREDICTION[prediction])
    diffusion = BASE.respace(respacing)
    network_t = diffusion.timestep_map
    if respacing != "1000":  # diffusers takes a respacing as its list of kept timesteps
        scheduler.set_timesteps(timesteps=network_t.flip(0).tolist())
    sampler = plugins.build("samplers", "ddpm", variance=variance)
    x_t, output = inputs()
    last = diffusion.num_timesteps - 1
    for index in (last, last // 2, 1, 0):
        t = torch.full((4,), index)
        ours = sampler.step(diffusion, output, x_t, t, prediction, seeded(index))
        theirs = scheduler.step(output, int(network_t[index]), x_t, generator=seeded(index)).prev_sample
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4, msg=f"index {index}")


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_step_equals_diffusers_ddim_scheduler(eta, prediction):
    scheduler = diffusers_scheduler("DDIMScheduler", set_alpha_to_one=True,
                                    prediction_type=DIFFUSERS_PREDICTION[prediction])
    scheduler.set_timesteps(50)
    diffusion = respaced(BASE, "ddim50")
    network_t = diffusion.timestep_map
    assert scheduler.timesteps.tolist() == network_t.flip(0).tolist()
    sampler = plugins.build("samplers", "ddim", eta=eta)
    x_t, output = inputs()
    for index in (49, 25, 1, 0):
        t = torch.full((4,), index)
        ours = sampler.step(diffusion, output, x_t, t, prediction, seeded(index))
        theirs = scheduler.step(output, int(network_t[index]), x_t, eta=eta,
                                generator=seeded(index)).prev_sample
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4, msg=f"index {index}")


def test_ddim_with_eta_0_is_deterministic_and_eta_1_is_not():
    x_t, eps = inputs()
    t = torch.full((4,), 500)
    deterministic = plugins.build("samplers", "ddim")
    generator = seeded(3)
    first = deterministic.step(BASE, eps, x_t, t, "eps", generator)
    assert torch.equal(generator.get_state(), seeded(3).get_state()), "eta 0 drew noise"
    torch.testing.assert_close(first, deterministic.step(BASE, eps, x_t, t, "eps", seeded(4)))
    noisy = plugins.build("samplers", "ddim", eta=1.0)
    assert not torch.equal(noisy.step(BASE, eps, x_t, t, "eps", seeded(3)),
                           noisy.step(BASE, eps, x_t, t, "eps", seeded(4)))


def test_ddim_with_eta_1_has_the_ddpm_posterior_variance():
    """σ_t(η = 1) is the posterior variance β̃_t: the DDIM and fixed-small DDPM steps agree."""
    diffusion = respaced(BASE, 20)
    x_t, eps = inputs()
    t = torch.full((4,), 12)
    ddim = plugins.build("samplers", "ddim", eta=1.0).step(diffusion, eps, x_t, t, "eps", seeded(7))
    ddpm = plugins.build("samplers", "ddpm", variance="fixed-small")
    torch.testing.assert_close(ddim, ddpm.step(diffusion, eps, x_t, t, "eps", seeded(7)),
                               atol=1e-5, rtol=1e-5)


def dpm_solver_scheduler(diffusion, prediction: str):
    """diffusers' DPM-Solver++(2M) on ``BASE``'s betas at the kept steps of ``diffusion``."""
    schedulers = pytest.importorskip("diffusers", reason="diffusers is not installed "
                                     "(pip install -c constraints.txt diffusers)")
    scheduler = schedulers.DPMSolverMultistepScheduler(
        num_train_timesteps=BASE.num_timesteps, trained_betas=BASE.betas.numpy(),
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero",
        prediction_type=DIFFUSERS_PREDICTION[prediction])
    scheduler.set_timesteps(timesteps=diffusion.timestep_map.flip(0).tolist())
    return scheduler


# diffusers' set_timesteps calls np.array on a tensor, which numpy 2 warns about
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.parametrize("steps", [20, "ddim10", "3,5"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_dpm_solver_pp_equals_diffusers_dpm_solver_multistep_at_every_step(steps, prediction):
    """Both are fed the same x_t and network output at every step of a whole reverse process
    (diffusers keeps its own history of outputs); the states agree to float32 rounding."""
    diffusion = respaced(BASE, steps)
    scheduler = dpm_solver_scheduler(diffusion, prediction)
    sampler = plugins.build("samplers", "dpm-solver++")
    x, _ = inputs()
    g = seeded(11)
    for index in reversed(range(diffusion.num_timesteps)):
        output = torch.randn(x.shape, generator=g)
        ours = sampler.step(diffusion, output, x, torch.full((4,), index), prediction)
        theirs = scheduler.step(output, int(diffusion.timestep_map[index]), x).prev_sample
        # diffusers keeps ᾱ in float32 (a cumprod of 1000 float32 betas: ~1e-5 relative
        # error), and 2M divides by the log-SNR gap of the step before, tiny across a comma
        # list's sections (499 -> 500): the tolerance is relative to the state's size.
        scale = float(theirs.abs().max())
        torch.testing.assert_close(ours, theirs, atol=1e-4 * scale, rtol=0, msg=f"index {index}")
        x = ours


def test_dpm_solver_pp_is_first_order_ddim_unless_it_continues_its_last_step():
    """A step that does not follow the sampler's last one (a new reverse process, another
    diffusion or shape) is DDIM with η 0; a continued step is not (its second-order term)."""
    diffusion = respaced(BASE, 10)
    x_t, _ = inputs()
    sampler = plugins.build("samplers", "dpm-solver++")
    ddim = plugins.build("samplers", "ddim")
    g = seeded(3)

    def both(index, d=diffusion, x=x_t):  # a new network output at every call
        t, eps = torch.full((x.shape[0],), index), torch.randn(x.shape, generator=g)
        return sampler.step(d, eps, x, t), ddim.step(d, eps, x, t)

    def assert_first_order(pair):
        torch.testing.assert_close(*pair, atol=1e-5, rtol=1e-5)

    assert_first_order(both(9))  # the first step of a process
    ours, first_order = both(8)
    assert (ours - first_order).abs().max() > 1e-2, "the continued step should be second order"
    assert_first_order(both(8))  # t 8 again: not a continuation
    both(5)
    assert_first_order(both(4, d=respaced(BASE, 10)))  # another diffusion
    both(5)
    assert_first_order(both(4, x=x_t[:2]))  # another batch


def test_dpm_solver_pp_sampler_reused_for_two_processes_equals_fresh_ones():
    diffusion = respaced(BASE, 6)
    reused = plugins.build("samplers", "dpm-solver++")

    def process(sampler, seed):
        x, _ = inputs(seed)
        g = seeded(seed)
        for index in reversed(range(diffusion.num_timesteps)):
            x = sampler.step(diffusion, torch.randn(x.shape, generator=g), x, torch.full((4,), index))
        return x

    for seed in (1, 2):
        torch.testing.assert_close(process(reused, seed),
                                   process(plugins.build("samplers", "dpm-solver++"), seed),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("steps,kept", [
    (4, [0, 333, 666, 999]), ("4", [0, 333, 666, 999]), ("ddim4", [0, 250, 500, 750]),
    ("2,2", [0, 499, 500, 999]), (1000, list(range(1000))),
])
def test_respaced_takes_an_int_ddim_n_or_sections(steps, kept):
    assert respaced(BASE, steps).timestep_map.tolist() == kept


@pytest.mark.parametrize("steps", [1, "1", 0, "abc", "ddim1", 1001, "ddim", 2.5])
def test_bad_steps_raise_value_error_saying_what_is_allowed(steps):
    with pytest.raises(ValueError, match=r"steps .*allowed: an int N >= 2, 'ddimN' or a comma list"):
        respaced(BASE, steps)


def test_bad_sampler_options_name_the_problem():
    with pytest.raises(ValueError, match="allowed: fixed-large, fixed-small"):
        plugins.build("samplers", "ddpm", variance="learned")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        plugins.build("samplers", "ddim", eta=-0.1)


# -- per-sample generators --------------------------------------------------------------------
def test_each_sample_draws_the_same_noise_in_any_batch():
    whole = noise_like(torch.empty(5, 3, 2), SampleGenerators(7, range(5)))
    split = [noise_like(torch.empty(len(rows), 3, 2), SampleGenerators(7, rows))
             for rows in (range(0, 2), range(2, 3), range(3, 5))]
    assert torch.equal(torch.cat(split), whole)
    alone = SampleGenerators(7, [3]).randn((1, 3, 2))
    assert torch.equal(alone[0], whole[3])
    assert not torch.equal(SampleGenerators(8, [3]).randn((1, 3, 2)), alone)  # another seed


def test_sample_seeds_differ_for_neighbouring_seeds_and_indices():
    seeds = {sample_seed(seed, index) for seed in range(20) for index in range(20)}
    assert len(seeds) == 400
    assert sample_seed(0) not in seeds and sample_seed(0) == sample_seed(0)  # the shared one
    assert all(0 <= s < 2**64 for s in seeds)


def test_draws_every_sample_shares_come_from_the_shared_generator():
    generators = SampleGenerators(3, [4, 9])
    assert shared_generator(generators) is generators.shared
    one = torch.Generator()
    assert shared_generator(one) is one and shared_generator(None) is None
    expected = torch.Generator().manual_seed(sample_seed(3))
    assert torch.equal(torch.rand(4, generator=generators.shared), torch.rand(4, generator=expected))


def test_sample_generators_refuse_another_number_of_rows():
    with pytest.raises(ValueError, match="2 sample generators cannot draw 3 rows"):
        SampleGenerators(0, [0, 1]).randn((3, 4))
