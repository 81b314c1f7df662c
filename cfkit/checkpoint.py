"""cfkit checkpoints: a folder with safetensors weights and a JSON config.

``config.json`` holds the experiment config that rebuilds the method; ``model.safetensors``
the weights and, for training runs, ``ema.safetensors`` the EMA weights (preferred when
loading for inference). Every file is written to a temporary name and renamed, so a crash
never leaves a half-written checkpoint; a file damaged later (truncated, or a config that
does not fit the weights) is a ``CheckpointError`` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "cfkit-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or imported; the message names the file and why."""


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
        try:  # the writer may have made a folder; a failed clean-up never hides its error
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass
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


def read_json(path) -> dict:
    """A JSON object file; CheckpointError when it is not one."""
    try:
        value = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON (truncated or corrupt?): {error}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_weights(path, device="cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; CheckpointError when it is missing or unreadable."""
    if not Path(path).exists():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or "
                              f"corrupt?): {error}") from None


def check_fits(module: torch.nn.Module, state: dict, path, config_path) -> None:
    """CheckpointError unless ``state`` (read from ``path``) has exactly the keys and shapes
    of ``module``, the model that ``config_path`` builds."""
    expected = {name: tuple(value.shape) for name, value in module.state_dict().items()}
    problems = [f"{name} is missing" for name in expected if name not in state]
    problems += [f"{name} is not in the model" for name in state if name not in expected]
    problems += [f"{name} is {tuple(state[name].shape)} in the weights but {shape} in the model"
                 for name, shape in expected.items() if name in state and tuple(state[name].shape) != shape]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{path} does not fit the model of {config_path}: {problems[0]}{more}")


def read_config(directory) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"not a cfkit checkpoint (no config.json): {directory}")
    config = read_json(path)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {config.get('format')!r}; "
                              f"expected {FORMAT!r}")
    if not isinstance(config.get("experiment"), dict):
        raise CheckpointError(f"{path}: no experiment config")
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
    path = directory / "config.json"
    experiment = read_config(directory)["experiment"]
    try:
        method = configs.validate(experiment).build_method()
    except ValueError as error:  # a ConfigError, or a model the config cannot build
        raise CheckpointError(f"{path}: {error}") from None
    weights = directory / "ema.safetensors"
    if not (prefer_ema and weights.exists()):
        weights = directory / "model.safetensors"
    state = read_weights(weights, device)
    check_fits(method.model, state, weights, path)
    method.model.load_state_dict(state)
    method.model.to(device).eval()
    return method
