"""Write-then-rename, and one process at a time: how files shared between runs and ranks are written.

Every artifact that resume logic trusts (teacher, statistics, checkpoints, manifests, label-store
meta) is written through ``write_atomically``, so "the file exists" always means "the file is whole".
``exclusive`` serializes the processes that would each make the same derived file (the image bank,
a listing cache): the first makes it, the others wait on the lock and then find it made.
``sole_writer`` keeps a second run off an artifact that one run is writing (two ``lpld train --name
dup``, a requeued job whose old copy still runs): it stops at once, naming the holder. Both are
``flock`` locks, which the kernel drops with the process that held them: a killed run never blocks.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(partial)`` on a sibling file, then rename it over ``path`` (creating parents)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)
    return path


def write_json(path: str | Path, value) -> Path:
    """``value`` as indented, key-sorted JSON, written atomically."""
    return write_atomically(path, lambda partial: partial.write_text(json.dumps(value, indent=1, sort_keys=True)))


@contextlib.contextmanager
def exclusive(lock: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``lock`` (created if missing) for the block; waiting
    here involves no collective, so no process-group timeout runs while another process works."""
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def lock_file(artifact: str | Path) -> Path:
    """The lock beside a file or folder artifact: ``runs/x/students/r0`` -> ``runs/x/students/r0.lock``."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".lock")


@contextlib.contextmanager
def sole_writer(artifact: str | Path) -> Iterator[None]:
    """Hold ``artifact``'s write lock for the block, or raise a ``UserError`` at once naming the
    process that holds it (its pid, host and start, written into the lock file)."""
    lock = lock_file(artifact)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{artifact} is being written by {holder}: two runs writing one artifact would mix "
                            f"their results; wait for that run to end (or stop it), or write elsewhere "
                            f"(another --name, --out or --workdir)") from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} (since {started})")
        handle.flush()
        yield
