"""dhel_jax._io.write_atomic: the writes of eval.json, plots and sweep results."""

from __future__ import annotations

from pathlib import Path

import pytest
from etils import epath

from dhel_jax._io import write_atomic


@pytest.mark.parametrize("kind", [Path, epath.Path, str])
def test_write_atomic_creates_and_replaces(tmp_path, kind):
    path = tmp_path / "new" / "dir" / "eval.json"
    write_atomic(kind(path), b"first")
    assert path.read_bytes() == b"first"
    write_atomic(kind(path), b"second")  # a rerun overwrites its earlier output
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval.json"]  # no temporary left


def test_write_atomic_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "eval.json"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]
