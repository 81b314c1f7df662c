"""cfkit checkpoints: a folder with safetensors weights and a JSON config.

``config.json`` holds the experiment config that rebuilds the method; ``model.safetensors``
the weights and, for training runs, ``ema.safetensors`` the EMA weights (preferred when
loading for inference). Every file is written to a temporary name and renamed, so a crash
never leaves a half-written checkpoint; a file damaged later (truncated, or a config that
does not fit the weights) is a ``CheckpointError`` naming the file and what is wrong.

A training run keeps its checkpoints in ``checkpoints/step-NNNNNNN/``, each also holding
``optimizer.safetensors`` and ``state.json`` (step, scheduler, optimizer settings); a new
one is written to a temp folder renamed when complete, then all but the last ``keep_last``
are removed. One that resume found corrupt is set aside as ``corrupt-step-NNNNNNN``.
"""

from __future__ import annotations

import contextlib
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


def misfits(expected: dict[str, tuple], state: dict) -> list[str]:
    """Why ``state`` cannot load into a model of parameter shapes ``expected`` (name -> shape):
    one line per key missing from it, key not in the model, and shape that differs."""
    problems = [f"{name} is missing" for name in expected if name not in state]
    problems += [f"{name} is not in the model" for name in state if name not in expected]
    problems += [f"{name} is {tuple(state[name].shape)} in the weights but {shape} in the model"
                 for name, shape in expected.items() if name in state and tuple(state[name].shape) != shape]
    return problems


def shapes(module: torch.nn.Module) -> dict[str, tuple]:
    """The shape of each tensor of ``module``'s state dict, by name."""
    return {name: tuple(value.shape) for name, value in module.state_dict().items()}


def check_fits(module: torch.nn.Module, state: dict, path, config_path) -> None:
    """CheckpointError unless ``state`` (read from ``path``) has exactly the keys and shapes
    of ``module``, the model that ``config_path`` builds."""
    problems = misfits(shapes(module), state)
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
    weights = weights_file(directory, prefer_ema)
    state = read_weights(weights, device)
    check_fits(method.model, state, weights, path)
    method.model.load_state_dict(state)
    method.model.to(device).eval()
    return method


def weights_file(folder: Path, prefer_ema: bool = True) -> Path:
    """A checkpoint folder's weights: ``ema.safetensors`` when preferred and present, else
    ``model.safetensors``."""
    ema = folder / "ema.safetensors"
    return ema if prefer_ema and ema.exists() else folder / "model.safetensors"


# -- a training run's checkpoints --------------------------------------------------------------
def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run folder (those with a ``state.json``), oldest first."""
    folder = run_dir / "checkpoints"
    found = [p for p in folder.glob("step-*") if (p / "state.json").exists()] if folder.is_dir() else []
    return sorted(found)


def _name(step: int) -> str:
    return f"step-{step:07d}"


def is_last(run_dir: Path, step: int) -> bool:
    """Whether the last checkpoint of the run in ``run_dir`` is that of ``step``."""
    found = checkpoints(run_dir)
    return bool(found) and found[-1].name == _name(step)


def write_step(run_dir: Path, step: int, experiment, model: dict, ema: dict, optimizer: dict,
               state: dict) -> Path:
    """Write ``checkpoints/step-N`` of a run (a temp folder renamed when complete, replacing
    one of the same step): the weights, the ``optimizer`` tensors and ``state.json``."""
    final = run_dir / "checkpoints" / _name(step)
    with temp_folder(final.with_name(f".{final.name}.tmp")) as tmp:
        save(tmp, experiment, model, ema)
        write_weights(tmp / "optimizer.safetensors", optimizer)
        write_json(tmp / "state.json", state)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    return final


def keep_last(run_dir: Path, count: int) -> None:
    """Remove all but the last ``count`` checkpoints of a run."""
    for old in checkpoints(run_dir)[:-count]:
        shutil.rmtree(old)


@contextlib.contextmanager
def temp_folder(tmp: Path):
    """``tmp``, emptied, for a block that fills it and renames it into place; removed again
    when the block fails (a full disk leaves no half-written folder behind)."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def set_aside(folder: Path) -> Path:
    """Rename a checkpoint to ``corrupt-step-N`` (``-2``, ``-3`` when taken), kept to look at
    where neither resume nor sampling picks it; returns the new path."""
    target, count = folder.with_name(f"corrupt-{folder.name}"), 1
    while target.exists():
        count += 1
        target = folder.with_name(f"corrupt-{folder.name}-{count}")
    folder.rename(target)
    return target


def optimizer_tensors(state: dict, names: list[str] | None = None) -> tuple[dict, dict]:
    """An optimizer state dict as flat tensors plus a JSON part (param groups, non-tensor
    values), keyed by parameter index. ``names`` maps index -> name where the state dict is
    keyed by parameter names (FSDP's full state dict), so every run writes the same format."""
    index = {name: i for i, name in enumerate(names)} if names else {}
    tensors, scalars = {}, {}
    for param, values in state["state"].items():
        for name, value in values.items():
            target = tensors if torch.is_tensor(value) else scalars
            target[f"{index.get(param, param)}.{name}"] = value
    groups = [{**g, "params": [index.get(p, p) for p in g["params"]]} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state(tensors: dict, meta: dict, names: list[str] | None = None) -> dict:
    """The optimizer state dict of ``optimizer_tensors``' output, keyed by parameter index
    or, given ``names``, by parameter name."""
    key = (lambda i: names[i]) if names else (lambda i: i)
    state: dict = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = flat.split(".", 1)
        state.setdefault(key(int(index)), {})[name] = value
    groups = [{**g, "params": [key(i) for i in g["params"]]} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# -- starting a run from existing weights (fine-tuning) ---------------------------------------
def init_weights_file(path) -> Path:
    """The safetensors file ``train.init_from`` names: the file itself, or a checkpoint folder's
    (a run folder's latest checkpoint's) EMA weights, else its model weights."""
    path = Path(path)
    allowed = "give a cfkit checkpoint or run folder, or a .safetensors file"
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"train.init_from {path}: not a .safetensors file; {allowed} (a "
                                  "checkpoint of another implementation is imported with `cfkit convert`)")
        return path
    if not path.is_dir():
        raise CheckpointError(f"train.init_from {path}: not found; {allowed}")
    folder = resolve(path)
    weights = weights_file(folder)
    if weights.exists():
        return weights
    raise CheckpointError(f"train.init_from {path}: no ema.safetensors or model.safetensors in {folder}; "
                          f"{allowed}")


def skipped(name: str, skip) -> bool:
    """Whether ``skip`` (keys, or prefixes ending at a "." boundary) names the key ``name``."""
    return any(name == prefix or name.startswith(prefix.rstrip(".") + ".") for prefix in skip)


def covering_prefixes(names: set[str], keys: set[str]) -> list[str]:
    """The shortest prefixes (at "." boundaries) that name ``names`` and no other of ``keys``,
    e.g. ``blocks.2`` for every key of a block the weights lack."""
    found = set()
    for name in names:
        parts = name.split(".")
        found.add(next(prefix for prefix in (".".join(parts[:n]) for n in range(1, len(parts) + 1))
                       if all(key in names for key in keys if skipped(key, [prefix]))))
    return sorted(found)


def init_weights(module: torch.nn.Module, path, skip=(), device="cpu") -> list[str]:
    """Load ``train.init_from``'s weights into ``module``, but the keys ``skip`` names, which keep
    their fresh initialisation; returns those keys. Weights that do not fit (a key missing,
    one the model lacks, a shape that differs) are a CheckpointError listing every one."""
    file = init_weights_file(path)
    state = read_weights(file, device)
    expected = shapes(module)
    unmatched = [p for p in skip if not any(skipped(key, [p]) for key in (*expected, *state))]
    if unmatched:
        tops = sorted({key.split(".")[0] for key in expected})
        raise CheckpointError(f"train.init_skip: {', '.join(unmatched)} match(es) no key of the model or of "
                              f"{file}; the model's keys start with: {', '.join(tops)}")
    kept = {key: value for key, value in state.items() if not skipped(key, skip)}
    problems = misfits({k: v for k, v in expected.items() if not skipped(k, skip)}, kept)
    if problems:
        bad = covering_prefixes({line.split(" ", 1)[0] for line in problems}, {*expected, *state})
        raise CheckpointError(
            f"train.init_from {file} does not fit the model:\n  " + "\n  ".join(problems)
            + f"\nto leave these at their fresh initialisation: train.init_skip = {json.dumps(bad)}")
    module.load_state_dict(kept, strict=False)  # what is left out is exactly the skipped keys
    return [key for key in expected if skipped(key, skip)]
