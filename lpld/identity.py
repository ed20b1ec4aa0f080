"""Artifact identity: what made an artifact and from which inputs, as one comparable record.

Every artifact a stage reuses or resumes carries one: the teacher's training checkpoint, a
statistics pass's checkpoint, the distilled folder's manifest, a label store's header, a student's
checkpoint. An identity is a flat dict of plain JSON values: the recipe sections that shape the
artifact (``Recipe.settings``) and the fingerprints of its inputs (``models.model_fingerprint``,
the image bank's fingerprint, a label store's). Before an artifact is reused, its recorded
identity is compared with the one the current run would write, and a difference stops the run
naming the parts that differ, so "is this artifact mine, and is it current?" has one answer and
one message everywhere. The image bank needs no such check: it is a cache of its folder and
rebuilds itself when the folder changes (``lpld.bank``).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def of(**parts) -> dict:
    """The identity as it reads back from a file: tuples become lists, keys sorted, so a fresh
    identity compares equal to a stored one."""
    return json.loads(json.dumps(parts, sort_keys=True))


def check(found, expected: dict, artifact: str | Path, remedy: str) -> None:
    """Refuse ``artifact`` when its recorded identity ``found`` differs from ``expected`` in any
    part of ``expected`` (in all of them when ``found`` is no identity at all); parts only
    ``found`` has are ignored: an artifact may record more."""
    found = found if isinstance(found, dict) else {}
    changed = sorted(key for key in expected if found.get(key, ...) != expected[key])
    if changed:
        raise UserError(f"{artifact} was made with other {', '.join(changed)}; {remedy}")
