"""Write-then-rename, and one process at a time: how files shared between runs and ranks are written.

Every artifact that resume logic trusts (teacher, statistics, checkpoints, manifests, label-store
meta) is written through ``write_atomically``, so "the file exists" always means "the file is whole".
``exclusive`` serializes the processes that would each make the same derived file (the image bank,
a listing cache): the first makes it, the others wait on the lock and then find it made.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Callable, Iterator


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(partial)`` on a sibling file, then rename it over ``path`` (creating parents)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)
    return path


@contextlib.contextmanager
def exclusive(lock: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``lock`` (created if missing) for the block; waiting
    here involves no collective, so no process-group timeout runs while another process works."""
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
