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
    except OSError as e:
        if e.filename is not None:
            raise
        # A failed write() (a full disk) names no file: name the one being written.
        raise OSError(e.errno, e.strerror, os.fspath(path)) from e
    finally:
        if tmp.exists():
            tmp.unlink()


def refused_write_message(error: OSError, where: str, unchanged: str) -> str:
    """The one-line message of a CLI whose write the file system refused: what could not be
    written and why, what to do about ``where`` (the flag naming the directory), and what is
    ``unchanged``. ``[Errno 28] No space left on device: 'runs/x/metrics.jsonl'`` becomes
    ``cannot write runs/x/metrics.jsonl: No space left on device. Free space ...``."""
    what = f" {error.filename}" if error.filename is not None else f" in the {where}"
    return (
        f"cannot write{what}: {error.strerror or error}. Free space or make it writable, or "
        f"choose another {where}; {unchanged} unchanged."
    )
