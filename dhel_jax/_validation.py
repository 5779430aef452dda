"""Trace-time input checks shared by losses and metrics.

Every check runs on static shapes and Python scalars, so errors surface when a
function is traced (before any compute), with the offending value and what is
accepted.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp


def check_embeddings(x: Any, name: str = "x", *, fn: str) -> None:
    """Checks that ``x`` is a floating ``(M, d)`` array."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(
            f"{fn}: {name} must be a JAX or NumPy array of shape (M, d); got {type(x)!r}."
        )
    if len(shape) != 2:
        raise ValueError(
            f"{fn}: {name} must have rank 2, shape (M, d) with M examples of dimension d; "
            f"got shape {tuple(shape)} (rank {len(shape)})."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{fn}: {name} must have a floating dtype (float32, bfloat16, float16 or float64); "
            f"got {dtype}."
        )
    if shape[1] < 1:
        raise ValueError(
            f"{fn}: {name} must have embedding dimension d >= 1; got shape {tuple(shape)}."
        )


def check_pair(z1: Any, z2: Any, *, fn: str) -> None:
    """Checks two views ``z1``, ``z2`` of matching floating ``(M, d)`` shape."""
    check_embeddings(z1, "z1", fn=fn)
    check_embeddings(z2, "z2", fn=fn)
    if tuple(z1.shape) != tuple(z2.shape):
        raise ValueError(
            f"{fn}: z1 and z2 must have the same shape (M, d), row i of z2 being the positive of "
            f"row i of z1; got z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)}."
        )


def check_global_batch(global_m: int, *, fn: str, minimum: int = 2) -> None:
    """Checks the global number of examples ``M`` (after any all-gather)."""
    if global_m < minimum:
        raise ValueError(
            f"{fn}: needs a batch of M >= {minimum} examples (negatives come from the other "
            f"examples); got M = {global_m}."
        )


def check_positive(value: Any, name: str, *, fn: str) -> None:
    """Checks ``value > 0`` when it is a concrete Python number (traced values pass)."""
    if isinstance(value, numbers.Real) and not float(value) > 0:
        raise ValueError(f"{fn}: {name} must be > 0; got {name} = {value!r}.")


def check_choice(value: Any, name: str, accepted: Sequence[str], *, fn: str) -> None:
    """Checks that ``value`` is one of ``accepted``."""
    if value not in accepted:
        raise ValueError(
            f"{fn}: unknown {name} {value!r}; accepted values are {', '.join(map(repr, accepted))}."
        )


def check_block_size(block_size: Any, *, fn: str) -> None:
    """Checks ``block_size`` is ``None`` or a positive ``int``."""
    if block_size is None:
        return
    if (
        not isinstance(block_size, numbers.Integral)
        or isinstance(block_size, bool)
        or block_size < 1
    ):
        raise ValueError(
            f"{fn}: block_size must be None (dense) or a positive integer; got {block_size!r}."
        )
