"""Where the official implementation's vectors are: CFKIT_REFERENCE_DIR, by default
``../shared/reference`` next to the project."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    return Path(os.environ.get("CFKIT_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))


def reference_files(pattern: str) -> list[Path]:
    """Every file of one kind (a glob) in the reference folder, sorted; [] when absent."""
    folder = reference_dir()
    return sorted(folder.glob(pattern)) if folder.is_dir() else []
