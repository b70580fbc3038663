"""Replacing a small state file so that a crash leaves the old one or the new one, whole."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["replace_file"]


def replace_file(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path``: a temporary file beside it, fsynced, then renamed over it."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
