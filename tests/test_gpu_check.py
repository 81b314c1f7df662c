"""The prepared GPU check: it refuses to run without CUDA unless asked for the CPU, its flex and
sdpa networks agree, and on the CPU every check (``train.compile`` with inductor included) passes."""

import json

import pytest
import torch

from cfkit.perf import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_check_says_what_to_do():
    with pytest.raises(SystemExit, match="no CUDA device here; allowed: .* --device cpu"):
        gpu_check.main([])


def test_flex_and_sdpa_networks_agree_on_the_cpu():
    args = gpu_check.parser().parse_args(["--device", "cpu", "--size", "tiny"])
    result = gpu_check.attention_agreement(args)
    assert result["ok"] and 0 < result["relative_error_loss_per_token"] < 1e-4


@pytest.mark.slow
def test_every_check_passes_on_the_cpu_compiled_training_included(tmp_path, capsys):
    out = tmp_path / "gpu-check.json"
    assert gpu_check.main(["--device", "cpu", "--size", "tiny", "--steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    checks = report["checks"]
    assert set(checks) == {"attention agreement", "training step", "sampling", "compiled training"}
    compiled = checks["compiled training"]
    assert compiled["ok"] and len(compiled["losses_compiled"]) == 2
    assert checks["training step"]["speedup_vs_reference"] > 0
