"""Parity with the official CausalFusion implementation's recorded vectors.

Every file of each kind found in CFKIT_REFERENCE_DIR (default ``../shared/reference`` next to
the project) is checked, so other vector sets dropped in must pass too. Test ids carry the
file name and the case, e.g. ``masks.npz-case3``.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from refdata import reference_params
from scipy.stats import chi2_contingency

import cfkit
from cfkit.diffusion import GaussianDiffusion
from cfkit.masks import generalized_causal_mask
from cfkit.schedules import step_index, step_start

pytestmark = pytest.mark.reference


def cases(pattern: str, keys) -> list:
    """``pytest.param(file, case)`` for every case ``keys(npz)`` lists in every file matching
    ``pattern``; a single skipped param names the folder when there is nothing to check."""

    def listed(path: Path) -> list[str]:
        with np.load(path) as npz:
            return keys(npz)

    return reference_params(pattern, listed)


def numbered(prefix: str):
    """Case names ``case{i}`` for the keys ``{prefix}{i}`` of a file."""

    def keys(npz) -> list[str]:
        found = (re.fullmatch(rf"{prefix}(\d+)", key) for key in npz.files)
        return [f"case{i}" for i in sorted(int(m.group(1)) for m in found if m)]

    return keys


@functools.cache
def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


def index(case: str) -> int:
    return int(case.removeprefix("case"))


# --- generalised causal masks ------------------------------------------------------------


@pytest.mark.parametrize("path, case", cases("masks*.npz", numbered("mask_")))
def test_mask_equals_the_official_mask(path, case):
    data, i = load(path), index(case)
    sizes = data[f"sizes_{i}"].tolist()
    ours = generalized_causal_mask(int(data[f"cond_len_{i}"]), sizes)
    official_may_attend = data[f"mask_{i}"] == 0  # the reference stores 1 = may NOT attend
    assert ours.shape == official_may_attend.shape
    mismatches = np.argwhere(ours.numpy() != official_may_attend)
    assert len(mismatches) == 0, f"{len(mismatches)} entries differ, first at {mismatches[:5]}"


# --- AR-axis loss weights ----------------------------------------------------------------


@pytest.mark.parametrize("path, case", cases("ar_weights*.npz", numbered("weights_")))
def test_ar_weights_equal_the_official_weights(path, case):
    data, i = load(path), index(case)
    sizes = torch.as_tensor(data[f"sizes_{i}"])
    weighting = cfkit.build("weightings", str(data[f"schedule_{i}"]),
                            w_max=float(data[f"max_{i}"]), w_min=float(data[f"min_{i}"]))
    weights = weighting.ar(step_start(step_index(sizes)), int(sizes.sum()))
    np.testing.assert_allclose(weights.numpy(), data[f"weights_{i}"], rtol=0, atol=1e-6)


# --- diffusion schedules and one ancestral step ------------------------------------------


def base_length(files) -> int:
    """T of a file's base (unrespaced) linear schedule, from its ``alphas_cumprod_{T}``."""
    (length,) = [int(k.rsplit("_", 1)[1]) for k in files if re.fullmatch(r"alphas_cumprod_\d+", k)]
    return length


def schedule_keys(npz) -> list[str]:
    """``betas_T``, ``alphas_cumprod_T``, ``posterior_variance_T`` of the base schedule and
    ``respaced_X`` for each ``timestep_map_X``."""
    base = base_length(npz.files)
    names = [f"{name}_{base}" for name in ("betas", "alphas_cumprod", "posterior_variance")
             if f"{name}_{base}" in npz.files]
    found = (re.fullmatch(r"timestep_map_(\w+)", key) for key in npz.files)
    return sorted(names + [f"respaced_{m.group(1)}" for m in found if m])


def respaced(data, spacing: str) -> GaussianDiffusion:
    """The file's base schedule respaced by ``spacing`` ("250", "ddim50", or T itself)."""
    return GaussianDiffusion.named("linear", base_length(data)).respace(spacing)


@pytest.mark.parametrize("path, case", cases("diffusion*.npz", schedule_keys))
def test_diffusion_schedule_equals_the_official_schedule(path, case):
    data = load(path)
    if case.startswith("respaced_"):
        spacing = case.removeprefix("respaced_")
        ours = respaced(data, spacing)
        assert ours.timestep_map.tolist() == data[f"timestep_map_{spacing}"].tolist()
        assert f"betas_{spacing}" in data, f"{path.name} has no betas_{spacing}"
        np.testing.assert_allclose(ours.betas.numpy(), data[f"betas_{spacing}"], rtol=0,
                                   atol=1e-6)
    else:
        name, length = case.rsplit("_", 1)
        ours = GaussianDiffusion.named("linear", int(length))
        np.testing.assert_allclose(getattr(ours, name).numpy(), data[case], rtol=0, atol=1e-6)


def p_step_keys(npz) -> list[str]:
    return sorted(k.removeprefix("p_step_xn_") for k in npz.files if k.startswith("p_step_xn_"))


@pytest.mark.parametrize("path, case", cases("diffusion*.npz", p_step_keys))
def test_p_step_equals_the_official_step(path, case):
    """One ancestral step with a fixed ε: mean, "fixed large" log-variance and x̂0."""
    data = load(path)
    diffusion = respaced(data, case)
    x_t = torch.from_numpy(data[f"p_step_xn_{case}"])
    eps = torch.from_numpy(data[f"p_step_eps_{case}"])
    t = torch.from_numpy(data[f"p_step_t_{case}"])
    mean, log_variance, pred_xstart = diffusion.p_mean_variance(eps, x_t, t)
    for name, ours in [("mean", mean), ("log_variance", log_variance),
                       ("pred_xstart", pred_xstart)]:
        # float32 outputs up to |x̂0| ~ 1e3: 1e-6 relative is about one float32 ulp
        torch.testing.assert_close(ours, torch.from_numpy(data[f"p_step_{name}_{case}"]),
                                   rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# --- the random AR-step sampler, as distributions ----------------------------------------

DRAWS = 5_000  # ~0.8 s per (L, gamma); gamma off by 0.05 still gives p < 1e-40
P_MIN_SAME = 1e-3
P_MAX_OFF = 1e-6
TV_NOISE_FACTOR = 3.5  # measured over 12 seeds: right sampler <= 2.4x the noise, gamma +-0.05 >= 6x


def split_keys(npz) -> list[str]:
    found = (re.fullmatch(r"num_steps_hist_(L\d+_g[\d.]+)", key) for key in npz.files)
    return sorted(m.group(1) for m in found if m)


def parse_split_key(key: str) -> tuple[int, float]:
    m = re.fullmatch(r"L(\d+)_g([\d.]+)", key)
    return int(m.group(1)), float(m.group(2))


@functools.cache
def sampled_histograms(num_tokens: int, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """(S histogram, step-size histogram) of DRAWS splits from our exp-decay schedule."""
    gamma = round(gamma, 6)
    schedule = (cfkit.build("schedules", "uniform") if gamma == 1.0
                else cfkit.build("schedules", "exp-decay", gamma=gamma))
    generator = torch.Generator().manual_seed(num_tokens * 1_000_003 + int(gamma * 1e6))
    num_steps = np.zeros(num_tokens + 1, dtype=np.int64)
    step_sizes = np.zeros(num_tokens + 1, dtype=np.int64)
    for _ in range(DRAWS):
        sizes = schedule(num_tokens, generator).numpy()
        num_steps[len(sizes)] += 1
        np.add.at(step_sizes, sizes, 1)
    return num_steps, step_sizes


def merged_table(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """A 2 x k contingency table of two histograms, adjacent bins merged until every expected
    count is >= 5 (the chi-square approximation's rule of thumb)."""
    smaller_share = min(ours.sum(), theirs.sum()) / (ours.sum() + theirs.sum())
    columns, pending = [], np.zeros(2, dtype=np.int64)
    for a, b in zip(ours, theirs, strict=True):
        pending += (a, b)
        if pending.sum() * smaller_share >= 5:
            columns.append(pending)
            pending = np.zeros(2, dtype=np.int64)
    if pending.sum():
        if columns:
            columns[-1] = columns[-1] + pending
        else:
            columns.append(pending)
    return np.array(columns).T


def num_steps_p_value(ours: np.ndarray, theirs: np.ndarray) -> float:
    table = merged_table(ours, theirs)
    if table.shape[1] < 2:  # everything in one bin (e.g. L = 1): nothing to tell apart
        return 1.0
    return float(chi2_contingency(table)[1])


def total_variation(ours: np.ndarray, theirs: np.ndarray) -> float:
    return 0.5 * float(np.abs(ours / ours.sum() - theirs / theirs.sum()).sum())


def tv_noise(theirs: np.ndarray, count: int) -> float:
    """Mean total variation between the reference distribution and samples of ``count``
    observations from it: what pure sampling noise gives."""
    rng = np.random.default_rng(0)
    p = theirs / theirs.sum()
    return float(np.mean([total_variation(rng.multinomial(count, p), theirs) for _ in range(200)]))


def reference_histograms(path, key):
    data = load(path)
    return data[f"num_steps_hist_{key}"], data[f"step_size_hist_{key}"]


SPLIT_CASES = cases("split_stats*.npz", split_keys)


@pytest.mark.parametrize("path, case", SPLIT_CASES)
def test_number_of_steps_follows_the_official_distribution(path, case):
    num_tokens, gamma = parse_split_key(case)
    ours, _ = sampled_histograms(num_tokens, gamma)
    theirs, _ = reference_histograms(path, case)
    assert num_steps_p_value(ours, theirs) > P_MIN_SAME


@pytest.mark.parametrize("path, case", SPLIT_CASES)
def test_step_sizes_follow_the_official_distribution(path, case):
    num_tokens, gamma = parse_split_key(case)
    _, ours = sampled_histograms(num_tokens, gamma)
    _, theirs = reference_histograms(path, case)
    distance = total_variation(ours, theirs)
    assert distance < TV_NOISE_FACTOR * tv_noise(theirs, int(ours.sum()))


def off_by_005(params):
    """(file, key) params expanded with gamma - 0.05 and gamma + 0.05 (when <= 1)."""
    out = []
    for param in params:
        path, case = param.values
        if path is None:
            out.append(pytest.param(*param.values, None, id=param.id, marks=param.marks))
            continue
        _, gamma = parse_split_key(case)
        for wrong in (gamma - 0.05, gamma + 0.05):
            if 0 <= wrong <= 1:
                out.append(pytest.param(path, case, round(wrong, 6),
                                        id=f"{param.id}-gamma{round(wrong, 6)}"))
    return out


@pytest.mark.parametrize("path, case, wrong_gamma", off_by_005(SPLIT_CASES))
def test_the_distribution_checks_reject_gamma_off_by_005(path, case, wrong_gamma):
    """The two checks above can fail: a sampler with the wrong gamma is rejected by both."""
    num_tokens, _ = parse_split_key(case)
    ours_steps, ours_sizes = sampled_histograms(num_tokens, wrong_gamma)
    theirs_steps, theirs_sizes = reference_histograms(path, case)
    assert num_steps_p_value(ours_steps, theirs_steps) < P_MAX_OFF
    distance = total_variation(ours_sizes, theirs_sizes)
    assert distance > TV_NOISE_FACTOR * tv_noise(theirs_sizes, int(ours_sizes.sum()))


# --- without the reference folder --------------------------------------------------------


def test_without_the_vectors_every_parity_test_is_skipped_naming_the_folder(tmp_path, request):
    """pytest -m reference -rs with CFKIT_REFERENCE_DIR missing, then empty: every parity test
    is skipped and each reason names the folder (not "got empty parameter set")."""
    assert "CFKIT_CHECKING_SKIPS" not in os.environ, "ran inside itself: --deselect missed it"
    root = Path(__file__).resolve().parents[1]
    files = sorted(str(path.relative_to(root)) for path in (root / "tests").glob("test_*.py")
                   if "from refdata import" in path.read_text())
    for folder in (tmp_path / "absent", tmp_path):
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "reference", "-rs", "-q",
             f"--deselect={request.node.nodeid}", *files],  # not this test itself
            capture_output=True, text=True, cwd=root, timeout=120,
            env={**os.environ, "CFKIT_REFERENCE_DIR": str(folder), "CFKIT_CHECKING_SKIPS": "1"})
        summary = re.search(r"^(\d+) skipped, \d+ deselected in ", result.stdout, re.M)
        assert result.returncode == 0 and summary, result.stdout + result.stderr  # nothing ran
        reasons = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
        assert len(reasons) >= 10 and all(str(folder) in line for line in reasons), "\n".join(reasons)
