"""Write-then-rename: an interrupted run never leaves half a file where a finished one is expected.

Every artifact that resume logic trusts (teacher, statistics, checkpoints, manifests, label-store
meta) is written through ``write_atomically``, so "the file exists" always means "the file is whole".
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(partial)`` on a sibling file, then rename it over ``path`` (creating parents)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)
    return path
