"""Representation geometry of embeddings: the paper's metrics (docs/spec.md Metrics) of one
set of test embeddings, jitted, with the pair metrics tiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dhel_jax import metrics
from dhel_jax._validation import check_int

Array = jax.Array

_effective_rank = jax.jit(metrics.effective_rank)
_rank = jax.jit(metrics.rank, static_argnames=("tol",))
_alignment = jax.jit(metrics.alignment)
_uniformity = jax.jit(metrics.uniformity, static_argnames=("block_size",))
_wasserstein = jax.jit(metrics.wasserstein_uniformity, static_argnames=("block_size",))


def geometry(
    features: np.ndarray | Array,
    views: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    pair_examples: int = 5000,
    rank_tol: float = 1e-5,
    block_size: int | None = 1024,
) -> dict[str, float]:
    """Representation geometry of (N, d) embeddings (docs/spec.md Metrics; rows L2-normalised).

    * ``effective_rank``, ``rank`` (``tol = rank_tol``): of all N rows;
    * ``uniformity`` (t = 2), ``wasserstein_uniformity``: over all pairs of the first
      ``n = min(pair_examples, N)`` rows (exact, no sampling);
    * ``alignment`` (alpha = 2): ``mean_i |v1_i - v2_i|^2`` of the two (n', d) ``views`` of the
      same examples; absent when ``views`` is None.

    ``block_size`` tiles the pair metrics (O(n * block_size) memory). Returns Python floats
    (``rank`` an int) and ``pair_examples``, the n used.
    """
    fn = "geometry"
    if getattr(features, "ndim", None) != 2 or features.shape[0] < 2:
        raise ValueError(
            f"{fn}: features must be an (N, d) array with N >= 2; got shape "
            f"{getattr(features, 'shape', None)}."
        )
    check_int(pair_examples, "pair_examples", fn=fn, minimum=2)
    x = jnp.asarray(features)
    n = min(int(pair_examples), x.shape[0])
    pairs = x[:n]
    tile = None if block_size is None or block_size >= n else block_size
    out: dict[str, float] = {
        "effective_rank": float(_effective_rank(x)),
        "rank": int(_rank(x, tol=rank_tol)),
        "uniformity": float(_uniformity(pairs, block_size=tile)),
        "wasserstein_uniformity": float(_wasserstein(pairs, block_size=tile)),
    }
    if views is not None:
        v1, v2 = (jnp.asarray(v) for v in views)
        out["alignment"] = float(_alignment(v1, v2))
    out["pair_examples"] = n
    return out
