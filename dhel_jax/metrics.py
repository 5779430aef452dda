"""Representation metrics of SPEC.md as pure JAX functions.

Rows are L2-normalised inside every metric (SPEC.md, Notation). ``alignment``
and ``uniformity`` accept ``axis_name`` (global values inside
``jax.shard_map``) and are differentiable, so they double as loss terms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dhel_jax._validation import (
    check_block_size,
    check_embeddings,
    check_global_batch,
    check_positive,
)
from dhel_jax.pairwise import (
    AxisName,
    accumulation_dtype,
    axis_size,
    gather_candidates,
    global_logsumexp,
    global_sum,
    l2_normalize,
    pairwise_reduce,
)

Array = jax.Array


def _safe_power(r2: Array, p: Array) -> Array:
    """``r^p = r2^(p/2)`` with value and gradient 0 at r2 = 0 (p > 0)."""
    pos = r2 > 0
    return jnp.where(pos, jnp.where(pos, r2, 1.0) ** (p / 2), 0.0)


def alignment(x: Array, y: Array, *, alpha: float = 2.0, axis_name: AxisName = None) -> Array:
    """``mean_i |x_i - y_i|^alpha`` of the normalised rows (SPEC.md ``alignment``).

    Args:
      x, y: (M, d) embeddings; row i of ``y`` is the positive of row i of ``x``.
      alpha: exponent, > 0.
    """
    fn = "alignment"
    check_embeddings(x, "x", fn=fn)
    check_embeddings(y, "y", fn=fn)
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(
            f"{fn}: x and y must have the same shape (M, d); got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    check_positive(alpha, "alpha", fn=fn)
    acc = accumulation_dtype(x.dtype)
    diff = l2_normalize(x).astype(acc) - l2_normalize(y).astype(acc)
    r2 = jnp.sum(diff * diff, axis=-1)
    per_row = r2 if alpha == 2 else _safe_power(r2, jnp.asarray(alpha, acc))
    return global_sum(per_row, axis_name) / (x.shape[0] * axis_size(axis_name))


def _neg_scaled(r2: Array, t: Array) -> Array:
    return -t * r2


def uniformity(
    x: Array, *, t: float = 2.0, axis_name: AxisName = None, block_size: int | None = None
) -> Array:
    """``log mean_{i<j} exp(-t |x_i - x_j|^2)`` of the normalised rows (SPEC.md ``uniformity``).

    Computed as a masked log-sum-exp (no underflow for large t or M).

    Args:
      x: (M, d) embeddings, M >= 2.
      t: Gaussian potential scale, > 0.
      block_size: tile edge for the O(M * block_size) memory computation.
    """
    fn = "uniformity"
    check_embeddings(x, "x", fn=fn)
    check_block_size(block_size, fn=fn)
    check_positive(t, "t", fn=fn)
    global_m = x.shape[0] * axis_size(axis_name)
    check_global_batch(global_m, fn=fn)
    acc = accumulation_dtype(x.dtype)
    u = l2_normalize(x)
    u_all, ids = gather_candidates(u, axis_name)
    row_lse, _ = pairwise_reduce(
        u,
        u_all,
        _neg_scaled,
        jnp.asarray(t, acc),
        reduce="lse",
        argument="sqdist",
        exclude=(ids,),
        block_size=block_size,
    )
    # Mean over ordered pairs i != j equals the mean over i < j.
    return global_logsumexp(row_lse, axis_name) - jnp.log(
        jnp.asarray(global_m * (global_m - 1), acc)
    )
