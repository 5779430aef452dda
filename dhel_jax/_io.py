"""Atomic file writes for the files other programs read while a run goes on (``eval.json``,
plots, sweep results and records)."""

from __future__ import annotations

import os

from etils import epath


def write_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Writes ``payload`` to a temporary file beside ``path`` and renames it over ``path`` (new
    or existing), so a reader sees the old file or the new one, never a partial one; the parent
    directories are created, and a failed write leaves no temporary file behind."""
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        tmp.write_bytes(payload)
        tmp.replace(target)  # Over an existing file too (epath's rename refuses to).
    finally:
        if tmp.exists():
            tmp.unlink()
