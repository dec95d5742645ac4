"""Which trained person model belongs to which clip and settings.

A person model is a pure function of its clip and its training settings (seeded training), so a
host that is asked to train the same clip with the same settings again can hand back the model it
already has. The key is a SHA-256 over the clip's bytes and every setting that changes the result;
it is stored in the checkpoint's metadata (``training_key``) when the model is saved, and compared
before any training starts. The same key without the budget names the *run* that ``--resume`` may
continue (a larger budget continues the same run; another clip or preset starts over).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from .errors import CheckpointError

KEY_FIELD = "training_key"
RUN_FIELD = "training_run"
_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def arrays_sha256(*arrays: Any) -> str:
    """Content hash of numpy arrays / tensors (shape and dtype included), e.g. frames held in memory."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _digest(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def training_keys(clip_sha256: str, settings: Mapping[str, Any]) -> tuple[str, str]:
    """(key of the finished model, key of the run it continues): the run key leaves the budget out."""
    full = {"clip": clip_sha256, **settings}
    run = {k: v for k, v in full.items() if k != "budget_minutes"}
    return _digest(full), _digest(run)


def stored_key(checkpoint: str | os.PathLike) -> str | None:
    """The training key in a checkpoint's metadata; None when the file is absent, foreign or unkeyed."""
    from .models.checkpoint import read_metadata

    p = Path(checkpoint)
    if not p.is_file():
        return None
    try:
        return read_metadata(p).get(KEY_FIELD)
    except CheckpointError:
        return None
