"""A label store's verified stamp: each array's sha256 next to what ``stat`` says about its file.

Hashing a full-size store takes minutes (ImageNet-21K logits are ~655 GB), so it runs once: the
writer, or the first open, records in verified.json each array's sha256 next to its file's size,
mtime, ctime and inode, and an open whose files still match that stamp skips the hashing.
Rewriting, replacing or copying a file changes its stat and forces the hash again; damage that
stat cannot see (bit rot) takes ``lpld labels verify``, which ignores the stamp.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .atomic import write_json
from .errors import UserError
from .fingerprint import file_sha256

VERIFIED = "verified.json"
STAMP_FORMAT = "lpld-labels-verified/1"


def file_state(file: Path) -> dict:
    """What stat says about a file: any rewrite, replacement or copy (even one keeping the mtime)
    changes one of these, so a stamp that still matches them vouches for the bytes it hashed."""
    stat = file.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def hash_arrays(path: Path, names: list[str]) -> dict[str, tuple[str, float]]:
    """sha256 and hashing seconds of each array file, one thread per file (up to the cores): one
    file hashes at ~1-2 GB/s on one core, and hashlib releases the GIL, so threads overlap."""
    def timed(name: str) -> tuple[str, float]:
        start = time.perf_counter()
        return file_sha256(path / f"{name}.npy"), time.perf_counter() - start

    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(timed, names)))


def write_stamp(path: Path, meta_file: Path, arrays: dict[str, dict]) -> None:
    """Record that the arrays with these file states hash to these sha256s (the meta file's state too).

    A store that cannot be written to (read-only copy) still opens; it is hashed on every open."""
    stamp = {"format": STAMP_FORMAT, meta_file.name: file_state(meta_file), "arrays": arrays}
    try:
        write_json(path / VERIFIED, stamp)
    except OSError as error:
        warnings.warn(f"{path}: cannot write {VERIFIED} ({error}); every open hashes the arrays again "
                      "(make the directory writable once and run `lpld labels verify` on it)", stacklevel=2)


def read_stamp(path: Path, meta_file: Path) -> dict:
    """The stamp's entry per array, or {} when absent, unreadable, or made for another meta file."""
    try:
        stamp = json.loads((path / VERIFIED).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(stamp, dict) or stamp.get("format") != STAMP_FORMAT or \
            stamp.get(meta_file.name) != file_state(meta_file):
        return {}
    return stamp.get("arrays", {}) if isinstance(stamp.get("arrays"), dict) else {}


def stamped_hashes(path: Path, meta_file: Path, meta: dict, trust_stamp: bool) -> dict[str, float]:
    """Hash the arrays the stamp does not vouch for, compare with the meta's sha256, renew the stamp;
    return the seconds spent per array hashed."""
    declared = {name: entry["sha256"] for name, entry in meta["arrays"].items()}
    states = {name: file_state(path / f"{name}.npy") for name in declared}  # before hashing: a later write shows
    stamped = read_stamp(path, meta_file) if trust_stamp else {}
    vouched = {name: dict(states[name], sha256=declared[name]) for name in declared}
    stale = [name for name in declared if stamped.get(name) != vouched[name]]
    hashed = hash_arrays(path, stale)
    for name, (digest, _) in hashed.items():
        if digest != declared[name]:
            raise UserError(f"{path / f'{name}.npy'}: sha256 differs from {meta_file.name} (corrupted or modified); "
                            "re-copy or regenerate the store")
    if stale:
        write_stamp(path, meta_file, vouched)
    return {name: seconds for name, (_, seconds) in hashed.items()}
