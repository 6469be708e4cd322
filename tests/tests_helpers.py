"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
