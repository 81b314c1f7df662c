"""Where the official implementation's vectors are: CFKIT_REFERENCE_DIR, by default
``../shared/reference`` next to the project. A parity test without its files is skipped with
a reason naming the folder it looked in (``missing``), never pytest's "got empty parameter set"."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    return Path(os.environ.get("CFKIT_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))


def reference_files(pattern: str) -> list[Path]:
    """Every file of one kind (a glob) in the reference folder, sorted; [] when absent."""
    folder = reference_dir()
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def missing(pattern: str) -> str:
    """Why there is nothing to check for ``pattern``: the skip reason, naming the folder."""
    folder = reference_dir()
    if not folder.is_dir():
        return f"no reference folder {folder} (set CFKIT_REFERENCE_DIR)"
    return f"no {pattern} in the reference folder {folder} (CFKIT_REFERENCE_DIR)"


def reference_params(pattern: str, cases=None) -> list:
    """``pytest.param(file)`` for every file matching ``pattern`` (id: its name) or, with
    ``cases(file)`` listing case names, ``pytest.param(file, case)`` for each (id
    ``name-case``); when there is none, one param skipped with the reason ``missing``."""
    params, files = [], reference_files(pattern)
    for path in files:
        if cases is None:
            params.append(pytest.param(path, id=path.name))
        else:
            params += [pytest.param(path, case, id=f"{path.name}-{case}") for case in cases(path)]
    if params:
        return params
    reason = f"no cases in the {pattern} files of {reference_dir()}" if files else missing(pattern)
    values = (None,) if cases is None else (None, None)
    return [pytest.param(*values, id=f"no-{pattern}", marks=pytest.mark.skip(reason=reason))]
