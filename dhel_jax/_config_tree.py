"""Nested configs as flat dotted keys (``{'loss': {'tau': 0.2}}`` -> ``{'loss.tau': 0.2}``), for
comparing a run's stored config with a new one: the workdir check of ``dhel-train``
(``dhel_jax.checkpointing``) and the sweep's runs (``dhel_jax.sweep``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every leaf of the nested mapping ``tree`` under its dotted path, prefixed by ``prefix``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
