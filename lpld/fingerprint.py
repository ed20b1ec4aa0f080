"""Short content hashes that tie artifacts together (teacher -> stats -> images -> labels).

Each artifact records the fingerprints of what it was made from, so a later stage can refuse a
file that belongs to another teacher or dataset instead of silently mixing them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def file_sha256(path: str | Path, chunk: int = 8 << 20) -> str:
    """sha256 of a file of any size in constant memory: large reads into one reused buffer, and
    hashlib releases the GIL while it digests them, so threads can hash several files at once.
    The buffer is no larger than the file: a bank's 20 KB images must not each zero 8 MiB."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        buffer = memoryview(bytearray(max(1, min(chunk, os.fstat(handle.fileno()).st_size))))
        while size := handle.readinto(buffer):
            digest.update(buffer[:size])
    return digest.hexdigest()


def tensors_sha256(named: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes, independent of dict order and device."""
    digest = hashlib.sha256()
    for name in sorted(named):
        tensor = named[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
