"""Input checks shared by every module: arrays (losses, metrics, probes) and settings.

Every check runs on static shapes and Python scalars, so errors surface when a
function is traced (before any compute), with the offending value and what is
accepted.
"""

from __future__ import annotations

import math
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


def check_pair(z1: Any, z2: Any, *, fn: str, names: tuple[str, str] = ("z1", "z2")) -> None:
    """Checks two views ``z1``, ``z2`` (called ``names``) of matching floating ``(M, d)`` shape."""
    a, b = names
    check_embeddings(z1, a, fn=fn)
    check_embeddings(z2, b, fn=fn)
    if tuple(z1.shape) != tuple(z2.shape):
        raise ValueError(
            f"{fn}: {a} and {b} must have the same shape (M, d), row i of {b} being the positive of "
            f"row i of {a}; got {a} {tuple(z1.shape)} and {b} {tuple(z2.shape)}."
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


# --------------------------------------------------------------------------- Python scalars
#
# Settings (counts, sizes, rates) of every module: data, evaluate, optimizers, probes, metrics
# and the config checks of train. ``fn`` names the function (``None``: ``name`` says it all, as
# ``config.batch_size`` does); ``reason`` explains a bound.


def is_int(value: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _error(fn: str | None, name: str, accepted: str, value: Any, reason: str) -> ValueError:
    where = f"{fn}: " if fn else ""
    why = f" ({reason})" if reason else ""
    return ValueError(f"{where}{name} must be {accepted}{why}; got {name} = {value!r}.")


def _integer(
    value: Any,
    name: str,
    fn: str | None,
    minimum: int,
    maximum: int | None,
    accepted: str,
    reason: str,
) -> int:
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise _error(fn, name, f"{accepted}an integer {bound}", value, reason)
    return int(value)


def check_int(
    value: Any,
    name: str,
    *,
    fn: str | None = None,
    minimum: int = 1,
    maximum: int | None = None,
    reason: str = "",
) -> int:
    """Checks an integer in ``[minimum, maximum]``; returns it as a Python ``int``."""
    return _integer(value, name, fn, minimum, maximum, "", reason)


def check_optional_int(
    value: Any, name: str, *, fn: str | None = None, minimum: int = 1
) -> int | None:
    """Checks ``None`` or an integer ``>= minimum``."""
    return None if value is None else _integer(value, name, fn, minimum, None, "None or ", "")


def check_number(
    value: Any,
    name: str,
    *,
    fn: str | None = None,
    minimum: float = 0.0,
    strict: bool = False,
    reason: str = "",
) -> float:
    """Checks a finite number ``> minimum`` (``strict``) or ``>= minimum``; returns it as a
    Python ``float``."""
    if not is_number(value) or not (value > minimum if strict else value >= minimum):
        accepted = f"a finite number {'>' if strict else '>='} {minimum:g}"
        raise _error(fn, name, accepted, value, reason)
    return float(value)
