"""Torch files from other projects, read without running their code.

Every torch file lpld imports (upstream's checkpoints and soft-label batches) goes through
``load_plain``: ``torch.load(weights_only=True)`` with only the few extra globals a format needs
allowed (numpy's int64 scalar and dtype for upstream's CutMix box; ``argparse.Namespace`` for the
``args`` entry of a torchvision-reference training checkpoint). Anything else in a file is refused
with a UserError before any of it is built.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import UserError


def numpy_int64_globals() -> list:
    """What unpickling a numpy int64 scalar needs: the scalar constructor (under numpy 2's module
    name and the numpy 1.x name upstream's files carry), ``numpy.dtype`` and its int64 class."""
    scalar = np.dtype(np.int64).type(0).__reduce__()[0]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, type(np.dtype(np.int64))]


def load_plain(path: str | Path, extra_globals=()) -> object:
    """``torch.load(weights_only=True)`` with only ``extra_globals`` allowed beyond torch's defaults.

    A file holding anything but tensors and plain values is refused before any of it is built.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "allowlisted" in line), "")
        raise UserError(f"{path} holds something other than tensors and plain values, so it is refused "
                        f"without running it ({reason or 'unsupported pickle content'})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"{path} is not a readable torch file ({first_line})") from None
