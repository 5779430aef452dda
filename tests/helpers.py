"""Helpers shared by the training, checkpointing, evaluation and sweep tests."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def hash_tree(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory``, and the set of directories."""
    hashes = {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    hashes.update(
        {str(p.relative_to(directory)): "dir" for p in directory.rglob("*") if p.is_dir()}
    )
    return hashes


def truncate_state_arrays(workdir: Path, step: int, divisor: int) -> None:
    """Corrupts checkpoint ``step``: keeps the first 1/``divisor`` of every array-data file of
    its ``state`` item (Orbax's ``d/`` chunk files). Fails if there are none to corrupt."""
    data_files = [
        p
        for p in (workdir / "checkpoints" / str(step) / "state").rglob("*")
        if p.is_file() and p.parent.name == "d"
    ]
    assert data_files, f"no array-data files under checkpoint {step} of {workdir}"
    for p in data_files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // divisor])


def parse_train_command(*args: str):
    """The config ``dhel-train ARGS`` builds, parsed by the real absl flags of dhel_jax.main."""
    from absl import flags

    from dhel_jax import main

    argv = ["dhel-train", *args]
    old_argv, sys.argv = sys.argv, argv  # config_flags reads the overrides from sys.argv.
    main.define_train_flags()
    try:
        main.parse_flags(argv)
        return flags.FLAGS.config
    finally:
        sys.argv = old_argv
        flags.FLAGS.unparse_flags()
        # config_flags registers one flag per overridden field; forget them for the next parse.
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)
