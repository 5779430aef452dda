"""Nested configs as flat dotted keys (``{'loss': {'tau': 0.2}}`` -> ``{'loss.tau': 0.2}``), for
comparing a run's stored config with a new one: the workdir check of ``dhel-train``
(``dhel_jax.checkpointing``) and the sweep's runs (``dhel_jax.sweep``)."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

_ABSENT = object()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every leaf of the nested mapping ``tree`` under its dotted path, prefixed by ``prefix``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def as_json(value: Any) -> Any:
    """``value`` as a ``config.json`` holds it once read back (tuples become lists)."""
    return json.loads(json.dumps(value))


def differing_keys(
    stored: Mapping[str, Any], given: Mapping[str, Any], ignore: Collection[str] = ()
) -> list[str]:
    """The dotted keys, sorted, whose leaves differ between two nested configs (or that only
    one of them has), leaving out every key under a top-level field in ``ignore``."""
    old, new = flatten(stored), flatten(given)
    return sorted(
        key
        for key in old.keys() | new.keys()
        if key.split(".")[0] not in ignore and old.get(key, _ABSENT) != new.get(key, _ABSENT)
    )
