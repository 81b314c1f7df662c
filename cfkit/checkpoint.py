"""cfkit checkpoints: a folder with safetensors weights and a JSON config.

``config.json`` holds the experiment config that rebuilds the method; ``model.safetensors``
the weights and, for training runs, ``ema.safetensors`` the EMA weights (preferred when
loading for inference). Every file is written to a temporary name and renamed, so a crash
never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "cfkit-checkpoint/1"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # some writers create 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def write_weights(path: Path, module_or_state) -> None:
    state = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))


def save(directory, experiment, model, ema=None, extra: dict | None = None) -> Path:
    """Write a checkpoint folder: weights (and EMA) first, the config last."""
    directory = Path(directory)
    write_weights(directory / "model.safetensors", model)
    if ema is not None:
        write_weights(directory / "ema.safetensors", ema)
    config = {"format": FORMAT, "experiment": experiment.model_dump(mode="json"), **(extra or {})}
    write_json(directory / "config.json", config)
    return directory


def read_config(directory) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"not a cfkit checkpoint (no config.json): {directory}")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {config.get('format')!r}; "
                         f"expected {FORMAT!r}")
    return config


def resolve(directory) -> Path:
    """A checkpoint folder, or a training run folder's latest checkpoint."""
    directory = Path(directory)
    steps = sorted(p for p in (directory / "checkpoints").glob("step-*") if (p / "config.json").exists())
    return steps[-1] if steps else directory


def load(directory, prefer_ema: bool = True, device="cpu"):
    """The method of a checkpoint folder (or a run folder's latest checkpoint) with its weights
    loaded (EMA when present)."""
    from cfkit import config as configs

    directory = resolve(directory)
    experiment = configs.validate(read_config(directory)["experiment"])
    method = experiment.build_method()
    weights = directory / "ema.safetensors"
    if not (prefer_ema and weights.exists()):
        weights = directory / "model.safetensors"
    method.model.load_state_dict(load_file(weights, device=str(device)))
    method.model.to(device).eval()
    return method


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
