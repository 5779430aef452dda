"""Representation metrics of docs/spec.md as pure JAX functions.

* ``alignment``, ``uniformity`` (Wang & Isola, 2020) and ``hyperspherical_energy``:
  differentiable, so they double as loss terms;
* ``wasserstein_uniformity``: W1 distance of the pair similarities to those of
  uniform points on the sphere, deterministic and sort-free;
* ``effective_rank`` (RankMe) and ``rank`` (of the covariance).

Rows are L2-normalised inside every metric (docs/spec.md, Notation). Every metric
accepts ``axis_name``: inside ``jax.shard_map`` with the batch split over that
axis it returns the value of the global batch. Hyper-parameters and shapes are
checked at trace time.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from dhel_jax import pairwise
from dhel_jax._validation import (
    check_block_size,
    check_embeddings,
    check_global_batch,
    check_int,
    check_pair,
    check_positive,
)
from dhel_jax.kernels import inverse_power, power
from dhel_jax.pairwise import AxisName

Array = jax.Array


@pairwise.partition_explicit_axes
def alignment(x: Array, y: Array, *, alpha: float = 2.0, axis_name: AxisName = None) -> Array:
    """``mean_i |x_i - y_i|^alpha`` of the normalised rows (docs/spec.md ``alignment``).

    Args:
      x, y: (M, d) embeddings; row i of ``y`` is the positive of row i of ``x``.
      alpha: exponent, > 0.
    """
    fn = "alignment"
    check_pair(x, y, fn=fn, names=("x", "y"))
    check_positive(alpha, "alpha", fn=fn)
    acc = pairwise.accumulation_dtype(x.dtype)
    diff = pairwise.l2_normalize(x).astype(acc) - pairwise.l2_normalize(y).astype(acc)
    r2 = jnp.sum(diff * diff, axis=-1)
    per_row = r2 if alpha == 2 else power(r2, jnp.asarray(alpha, acc))
    return pairwise.global_sum(per_row, axis_name) / (x.shape[0] * pairwise.axis_size(axis_name))


def _neg_scaled(r2: Array, t: Array) -> Array:
    return -t * r2


def _over_other_rows(
    u: Array,
    f: Any,
    param: Array,
    reduce: Literal["lse", "sum"],
    axis_name: AxisName,
    block_size: int | None,
) -> Array:
    """Per row i of ``u`` (M, d): the ``reduce`` (``"lse"`` or ``"sum"``) of
    ``f(|u_i - u_j|^2, param)`` over every other row j of the global batch (gathered over
    ``axis_name``); (M,). The pair sums of ``uniformity`` and ``hyperspherical_energy``."""
    u_all, ids = pairwise.gather_candidates(u, axis_name)
    rows, _ = pairwise.pairwise_reduce(
        u,
        u_all,
        f,
        param,
        reduce=reduce,
        argument="sqdist",
        exclude=(ids,),
        block_size=block_size,
    )
    return rows


@pairwise.partition_explicit_axes
def uniformity(
    x: Array, *, t: float = 2.0, axis_name: AxisName = None, block_size: int | None = None
) -> Array:
    """``log mean_{i<j} exp(-t |x_i - x_j|^2)`` of the normalised rows (docs/spec.md).

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
    global_m = x.shape[0] * pairwise.axis_size(axis_name)
    check_global_batch(global_m, fn=fn)
    acc = pairwise.accumulation_dtype(x.dtype)
    row_lse = _over_other_rows(
        pairwise.l2_normalize(x), _neg_scaled, jnp.asarray(t, acc), "lse", axis_name, block_size
    )
    # Mean over ordered pairs i != j equals the mean over i < j.
    return pairwise.global_logsumexp(row_lse, axis_name) - jnp.log(
        jnp.asarray(global_m * (global_m - 1), acc)
    )


# --------------------------------------------------------------------------- helpers


def _unit_rows(x: Array, normalize: bool = True) -> Array:
    """Replicated rows in the accumulation dtype, L2-normalised when ``normalize``.

    Metrics normalise after the cast: a bfloat16 unit vector carries a norm
    error of ~4e-3, which would bias pair statistics near +-1.
    """
    x = _replicated(x)
    xf = x.astype(pairwise.accumulation_dtype(x.dtype))
    return pairwise.l2_normalize(xf) if normalize else xf


def _replicated(x: Array) -> Array:
    """A replicated copy of an input sharded over Explicit mesh axes (``jax.make_mesh``'s default).

    These metrics need all pairs or the whole matrix; under Explicit sharding
    XLA refuses to guess the layout of an (M, M) product of row-sharded
    operands, and the SVD needs unsharded matrix dimensions. Inputs without
    explicit sharding (including local blocks inside ``shard_map``) pass through.
    """
    x = jnp.asarray(x)
    sharding: Any = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(p is None for p in spec):
        return x
    return jax.sharding.reshard(x, sharding.update(spec=jax.P()))


def _check_metric_input(x: Array, fn: str, axis_name: AxisName = None) -> int:
    """Validates an (M, d) input and returns the global number of rows M."""
    check_embeddings(x, "x", fn=fn)
    global_m = x.shape[0] * pairwise.axis_size(axis_name)
    check_global_batch(global_m, fn=fn)
    return global_m


def _gather_rows(x: Array, axis_name: AxisName) -> Array:
    """All rows along ``axis_name``, typed as replicated (so are results derived from them)."""
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True, to="invarying")


# --------------------------------------------------------------------------- spectra


def effective_rank(x: Array, *, normalize: bool = True, axis_name: AxisName = None) -> Array:
    """RankMe effective rank ``exp(-sum_k p_k log p_k)`` (docs/spec.md ``effective_rank``).

    ``p = s / sum(s) + 1e-7`` with ``s`` the min(M, d) singular values of the
    uncentred (M, d) matrix x (Garrido et al., 2023). ``normalize=False`` uses
    the raw rows, as the RankMe paper does; the default normalises them like
    every other metric. Under ``axis_name`` the rows are all-gathered and the
    SVD taken of the global matrix: the eigenvalues of a psum-ed Gram matrix
    would give the small singular values with only half of float32's digits.
    Returns a scalar in the accumulation dtype.
    """
    fn = "effective_rank"
    _check_metric_input(x, fn, axis_name)
    u = _gather_rows(_unit_rows(x, normalize), axis_name)
    s = jnp.linalg.svd(u, compute_uv=False)
    p = s / jnp.sum(s) + 1e-7
    return jnp.exp(-jnp.sum(p * jnp.log(p)))


def rank(
    x: Array, *, tol: float = 1e-5, normalize: bool = True, axis_name: AxisName = None
) -> Array:
    """Rank of the (d, d) covariance of the rows of x (docs/spec.md ``rank``), an int32 scalar.

    The covariance follows ``numpy.cov(x, rowvar=False)`` (rows are
    observations, ddof = 1) and the rank counts its eigenvalues above ``tol``,
    matching ``numpy.linalg.matrix_rank(cov, tol=tol)``. The eigenvalues are
    taken as squared singular values of the centred rows / sqrt(M - 1): a zero
    eigenvalue then comes out at ~(eps s_max)^2 rather than eps s_max^2, so
    float32 does not invent rank for unnormalised features of large norm.
    """
    fn = "rank"
    global_m = _check_metric_input(x, fn, axis_name)
    check_positive(tol, "tol", fn=fn)
    u = _gather_rows(_unit_rows(x, normalize), axis_name)
    centred = (u - jnp.mean(u, axis=0, keepdims=True)) / math.sqrt(global_m - 1)
    singular_values = jnp.linalg.svd(centred, compute_uv=False)
    return jnp.sum(singular_values * singular_values > tol).astype(jnp.int32)


# --------------------------------------------------------------------------- energies


def _log_energy(r2: Array, _: Array) -> Array:
    return -0.5 * jnp.log(r2)


def hyperspherical_energy(
    x: Array, *, s: float, axis_name: AxisName = None, block_size: int | None = None
) -> Array:
    """Mean pairwise energy of the normalised rows (docs/spec.md ``hyperspherical_energy``).

    Riesz s-energy ``mean_{i != j} |x_i - x_j|^(-s)`` for s > 0, log-energy
    ``mean_{i != j} -log |x_i - x_j|`` for s = 0. Coincident rows give +inf,
    the true energy. Differentiable; ``block_size`` tiles the (M, M) pairs.
    Distances come from ``r^2 = 2 - 2 u_i.u_j`` (absolute error ~1e-7 in
    float32), so pairs closer than r ~ 0.03 lose relative accuracy like
    s * 1e-7 / r^2; pass float64 inputs when such pairs dominate.

    Args:
      x: (M, d) embeddings, M >= 2 (globally, under ``axis_name``).
      s: Riesz exponent, a Python number >= 0.
      block_size: tile edge for the O(M * block_size) memory computation.
    """
    fn = "hyperspherical_energy"
    global_m = _check_metric_input(x, fn, axis_name)
    check_block_size(block_size, fn=fn)
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not s >= 0:
        raise ValueError(
            f"{fn}: s must be a real number >= 0 (s > 0: Riesz s-energy, s = 0: log-energy); "
            f"got s = {s!r}."
        )
    acc = pairwise.accumulation_dtype(x.dtype)
    f = _log_energy if s == 0 else inverse_power
    row_sums = _over_other_rows(_unit_rows(x), f, jnp.asarray(s, acc), "sum", axis_name, block_size)
    return pairwise.global_sum(row_sums, axis_name) / (global_m * (global_m - 1))


# --------------------------------------------------------------------------- Wasserstein uniformity
#
# W1 = int_{-1}^{1} |F_emp(s) - F_d(s)| ds, with F_emp the ECDF of the N = M(M-1)/2 pair values
# s_ij = u_i.u_j (i < j) and F_d the CDF of u.v for u, v uniform on the sphere of R^d. Sorting
# N values is the slow part of the obvious algorithm (~0.5 s for 2M float32 values on a CPU), so
# the pair values are instead scatter-added into K uniform bins over the data range [lo, hi]:
# per bin, the count c_k and the sum of the within-bin positions phi in [0, 1].
#
# * Outside [lo, hi] the ECDF is 0 or 1 and the integral is exact: G(lo) + G(-hi), with
#   G(s) = int_{-1}^{s} F_d = s F_d(s) + c_d (1 - s^2)^((d-1)/2) / (d-1) (integration by parts;
#   s f_d(s) has an elementary antiderivative) and the symmetry F_d(-s) = 1 - F_d(s).
# * In bin k the ECDF rises from C_k/N to (C_k + c_k)/N (C_k the counts before it). It is
#   modelled as one jump at the bin's mean position, and F_d as linear between grid nodes, so
#   int |F_emp - F_d| over the bin has a closed form (two trapezoids, split where they cross 0).
#   Where the ECDF's and F_d's ranges over the bin do not overlap the sign is constant and the
#   model integral equals the exact one up to the linear interpolation of F_d. Otherwise moving
#   the c_k points to their mean changes the integral by at most (h/N) sum |phi - mean(phi)|
#   <= h c_k / N (zero when c_k = 1), h = (hi - lo)/K.
# * Hence |error| <= h * (fraction of pairs in crossing bins) + sum_k int_bin |F_d - linear|
#   <= 2h (~1.5e-5 for K = 2^18 over [-1, 1]); in practice far smaller (crossing bins hold few
#   pairs, and the interpolation error is O(h^2) where f_d is smooth), and float32 round-off in
#   the pair values themselves (~1e-7) dominates.
# * F_d is not taken from betainc: XLA's float32 betainc is off by ~5e-5 at d = 128 and 1e-3 at
#   d = 4096 (and costs ~1 s on 2^18 points). In the angle psi = arccos(-s) the law has density
#   c_d sin(psi)^(d-2): bounded and smooth for every d >= 2 (no singularity at s = +-1 for d = 2).
#   F_d at lo and -hi comes from composite Gauss-Legendre quadrature of that density (positive
#   terms: relative accuracy, also deep in the tails), and F_d on the grid from lo plus the
#   cumulative sum of per-cell two-point Gauss-Legendre masses. The cell widths in psi are
#   differences of arccos values; they telescope exactly, so the grid values inherit no more
#   than the arccos round-off (~1e-7 in F_d).

# Bin counts and their cumulative sums are int32.
_MAX_PAIRS = 2**31 - 1
_GL2 = (0.5 - 0.5 / math.sqrt(3.0), 0.5 + 0.5 / math.sqrt(3.0))


def _log_sphere_constant(d: int) -> float:
    """``log c_d``, ``c_d = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2))``: the density of u.v at 0."""
    return math.lgamma(d / 2) - math.lgamma((d - 1) / 2) - 0.5 * math.log(math.pi)


def sphere_cosine_density(s: Any, d: int) -> np.ndarray:
    """Density of ``u . v`` for u, v independent and uniform on the unit sphere of R^d:
    ``c_d (1 - s^2)^((d-3)/2)`` on (-1, 1) (docs/spec.md ``wasserstein_uniformity``), 0 outside;
    NumPy float64 (for plots and references)."""
    if not isinstance(d, numbers.Integral) or d < 2:
        raise ValueError(f"sphere_cosine_density: needs dimension d >= 2; got d = {d!r}.")
    s = np.asarray(s, np.float64)
    inside = np.abs(s) < 1
    safe = np.where(inside, 1 - s * s, 1.0)
    return np.where(inside, np.exp(_log_sphere_constant(d) + 0.5 * (d - 3) * np.log(safe)), 0.0)


def _angle_density(psi: Array, d: int, log_c: float) -> Array:
    """Density ``c_d sin(psi)^(d-2)`` of ``psi = arccos(-u.v)`` on [0, pi]."""
    if d == 2:
        return jnp.full_like(psi, math.exp(log_c))
    # float32(pi) exceeds pi, and sin of it is -8.7e-8: clamp to the true value's sign.
    return jnp.exp(log_c + (d - 2) * jnp.log(jnp.maximum(jnp.sin(psi), 0)))


def _sphere_cdf(s: Array, d: int, log_c: float) -> Array:
    """``F_d(s)`` by composite 8-point Gauss-Legendre quadrature in the angle.

    Across a panel the integrand changes by at most a factor exp((d-2)/panels),
    so ``64 + d/4`` panels keep every panel well resolved for any d.
    """
    panels = 64 + d // 4
    nodes, weights = np.polynomial.legendre.leggauss(8)
    frac = ((np.arange(panels)[:, None] + (nodes[None, :] + 1) / 2) / panels).reshape(-1)
    w = np.tile(weights / (2 * panels), panels)
    theta = jnp.arccos(-s)
    psi = theta[..., None] * frac.astype(s.dtype)
    return theta * jnp.sum(_angle_density(psi, d, log_c) * w.astype(s.dtype), axis=-1)


def _sphere_cdf_integral(s: Array, cdf: Array, d: int, log_c: float) -> Array:
    """``G(s) = int_{-1}^{s} F_d = s F_d(s) + c_d (1 - s^2)^((d-1)/2) / (d-1)``."""
    one_minus_s2 = (1 - s) * (1 + s)
    return s * cdf + jnp.exp(log_c + 0.5 * (d - 1) * jnp.log(one_minus_s2)) / (d - 1)


def _mean_abs_linear(e0: Array, e1: Array) -> Array:
    """Mean of |e| over an interval on which e moves linearly from e0 to e1."""
    same_sign = e0 * e1 >= 0
    denom = jnp.where(same_sign, 1.0, jnp.abs(e0) + jnp.abs(e1))
    return jnp.where(same_sign, jnp.abs(e0 + e1) / 2, (e0 * e0 + e1 * e1) / (2 * denom))


def _two_level_sum(v: Array, width: int = 512) -> Array:
    """Sum whose round-off grows like (width + K/width) eps rather than K eps."""
    pad = (-v.shape[0]) % width
    return jnp.sum(jnp.sum(jnp.pad(v, (0, pad)).reshape(-1, width), axis=1))


def _w1_from_histogram(
    counts: Array, frac_sums: Array, lo: Array, hi: Array, total: int, d: int
) -> Array:
    """W1 between the binned pair values and the sphere law (see the comment above)."""
    num_bins = counts.shape[0]
    dtype = frac_sums.dtype
    log_c = _log_sphere_constant(d)
    h = (hi - lo) / num_bins
    grid = (lo + h * jnp.arange(num_bins + 1, dtype=dtype)).at[-1].set(hi)
    theta = jnp.arccos(-grid)
    dtheta = jnp.diff(theta)
    cell_mass = (
        dtheta
        * (
            _angle_density(theta[:-1] + _GL2[0] * dtheta, d, log_c)
            + _angle_density(theta[:-1] + _GL2[1] * dtheta, d, log_c)
        )
        / 2
    )
    cdf_lo, cdf_neg_hi = _sphere_cdf(jnp.stack([lo, -hi]), d, log_c)
    cdf = cdf_lo + jnp.concatenate([jnp.zeros((1,), dtype), jnp.cumsum(cell_mass)])
    f0, f1 = cdf[:-1], cdf[1:]

    below = jnp.cumsum(counts) - counts
    level0 = below.astype(dtype) / total
    level1 = (below + counts).astype(dtype) / total
    phi = jnp.clip(frac_sums / jnp.maximum(counts, 1).astype(dtype), 0.0, 1.0)
    f_jump = f0 + phi * (f1 - f0)
    per_bin = phi * _mean_abs_linear(level0 - f0, level0 - f_jump) + (1 - phi) * _mean_abs_linear(
        level1 - f_jump, level1 - f1
    )
    tails = _sphere_cdf_integral(lo, cdf_lo, d, log_c) + _sphere_cdf_integral(
        -hi, cdf_neg_hi, d, log_c
    )
    return tails + h * _two_level_sum(per_bin)


def _bin_positions(s: Array, valid: Array, lo: Array, hi: Array, num_bins: int):
    """Bin index (num_bins for invalid entries: dropped by the scatter) and position in the bin."""
    scale = jnp.where(hi > lo, num_bins / jnp.where(hi > lo, hi - lo, 1), 0)
    t = (s - lo) * scale
    k = jnp.clip(jnp.floor(t), 0, num_bins - 1)
    frac = jnp.clip(t - k, 0, 1)
    return jnp.where(valid, k.astype(jnp.int32), num_bins), jnp.where(valid, frac, 0)


def _histogram_add(counts, frac_sums, s, valid, lo, hi):
    idx, frac = _bin_positions(s.reshape(-1), valid.reshape(-1), lo, hi, counts.shape[0])
    return counts.at[idx].add(1, mode="drop"), frac_sums.at[idx].add(frac, mode="drop")


def _pair_block(rows: Array, row_ids: Array, cols: Array, col_ids: Array):
    """Pair values of a block of rows against all columns, valid where col id > row id."""
    s = jax.lax.dot_general(
        rows, cols, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST
    )
    return jnp.clip(s, -1, 1), col_ids[None, :] > row_ids[:, None]


def _masked_min_max(s: Array, valid: Array):
    return jnp.min(jnp.where(valid, s, jnp.inf)), jnp.max(jnp.where(valid, s, -jnp.inf))


def _exact_pair_histogram(u, axis_name, global_m, num_bins, block_size, value_range=None):
    """Histogram of all pairs i < j of the (global) rows; this device handles its own rows.
    The bins span the pairs' range, or ``value_range = (lo, hi)`` when given."""
    u_all, row_ids = pairwise.gather_candidates(u, axis_name)
    cols = u if u_all is None else u_all
    col_ids = jnp.arange(global_m, dtype=jnp.int32)
    # Scan carries inside shard_map must vary over the same mesh axes as u.
    zero = pairwise.vma_zero(u, dtype=u.dtype)
    zeros = (
        jnp.zeros((num_bins,), jnp.int32) + zero.astype(jnp.int32),
        jnp.zeros((num_bins,), u.dtype) + zero,
    )
    if value_range is not None:
        lo, hi = (jnp.asarray(v, u.dtype) + zero for v in value_range)
    if block_size is None:
        s, valid = _pair_block(u, row_ids, cols, col_ids)
        if value_range is None:
            lo, hi = _global_min_max(*_masked_min_max(s, valid), axis_name)
        hist = _histogram_add(*zeros, s, valid, lo, hi)
    else:
        # Two streaming passes (range, then histogram) over row blocks: memory
        # O(block_size * M + num_bins), twice the matmuls of the dense path.
        pad = (-u.shape[0]) % block_size
        row_tiles = jnp.pad(u, ((0, pad), (0, 0))).reshape(-1, block_size, u.shape[1])
        # Padded rows get an id no column exceeds: they hold no valid pair.
        id_tiles = jnp.pad(row_ids, (0, pad), constant_values=global_m).reshape(-1, block_size)

        def range_step(carry, tile):
            lo_blk, hi_blk = _masked_min_max(*_pair_block(tile[0], tile[1], cols, col_ids))
            return (jnp.minimum(carry[0], lo_blk), jnp.maximum(carry[1], hi_blk)), None

        if value_range is None:
            inf = jnp.asarray(jnp.inf, u.dtype) + zero
            (lo, hi), _ = jax.lax.scan(range_step, (inf, -inf), (row_tiles, id_tiles))
            lo, hi = _global_min_max(lo, hi, axis_name)

        def hist_step(carry, tile):
            s, valid = _pair_block(tile[0], tile[1], cols, col_ids)
            return _histogram_add(*carry, s, valid, lo, hi), None

        hist, _ = jax.lax.scan(hist_step, zeros, (row_tiles, id_tiles))
    if axis_name is not None:
        hist = jax.lax.psum(hist, axis_name)
    return hist, lo, hi


def _global_min_max(lo: Array, hi: Array, axis_name: AxisName):
    if axis_name is None:
        return lo, hi
    return jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)


def _sampled_pair_histogram(u, axis_name, global_m, num_bins, num_pairs, key):
    """Histogram of ``num_pairs`` pairs i != j drawn uniformly with replacement."""
    u_all = _gather_rows(u, axis_name)
    key_i, key_j = jax.random.split(key)
    i = jax.random.randint(key_i, (num_pairs,), 0, global_m)
    j = (i + jax.random.randint(key_j, (num_pairs,), 1, global_m)) % global_m
    # Chunked so that only (chunk, d) rows are gathered at a time.
    s = jax.lax.map(
        lambda ij: jnp.sum(u_all[ij[0]] * u_all[ij[1]]), (i, j), batch_size=min(num_pairs, 65536)
    )
    s = jnp.clip(s, -1, 1)
    valid = jnp.ones_like(s, dtype=bool)
    lo, hi = jnp.min(s), jnp.max(s)
    zeros = (jnp.zeros((num_bins,), jnp.int32), jnp.zeros((num_bins,), u.dtype))
    return _histogram_add(*zeros, s, valid, lo, hi), lo, hi


def pair_cosine_histogram(x: Array, *, num_bins: int, block_size: int | None = None) -> Array:
    """Counts of the pair cosines ``{u_i . u_j : i < j}`` (rows L2-normalised) in ``num_bins``
    equal bins over [-1, 1] (the last bin includes 1), as ``wasserstein_uniformity`` bins
    them; ``block_size`` rows at a time (no (M, M) matrix).

    Returns:
      int32 ``(num_bins,)``.
    """
    fn = "pair_cosine_histogram"
    global_m = _check_metric_input(x, fn, None)
    check_int(num_bins, "num_bins", fn=fn, maximum=2**28)
    check_block_size(block_size, fn=fn)
    u = jax.lax.stop_gradient(_unit_rows(x))
    (counts, _), _, _ = _exact_pair_histogram(
        u, None, global_m, num_bins, block_size, value_range=(-1.0, 1.0)
    )
    return counts


def wasserstein_uniformity(
    x: Array,
    *,
    num_bins: int = 2**18,
    num_pairs: int | None = None,
    key: Array | None = None,
    axis_name: AxisName = None,
    block_size: int | None = None,
) -> Array:
    """W1 distance of pair similarities to the sphere law (docs/spec.md ``wasserstein_uniformity``).

    ``W1 = int_{-1}^{1} |F_emp(s) - F_d(s)| ds`` between the ECDF of
    ``{u_i . u_j : i < j}`` (normalised rows) and the law of ``u . v`` for u, v
    independent uniform on the unit sphere of R^d, d = ``x.shape[1]``
    (``(1 + s)/2 ~ Beta((d-1)/2, (d-1)/2)``). Deterministic: no sampling from
    the reference law, no sort. Absolute error <= 2 * (range of the pair
    values) / num_bins, in practice far below the float32 round-off of the pair
    values (~1e-7); see the derivation above. Not differentiable (zero gradient).

    Args:
      x: (M, d) embeddings, M >= 2, d >= 2 (globally, under ``axis_name``).
      num_bins: bins over the range of the pair values.
      num_pairs: if given, use that many pairs drawn uniformly with replacement
        (needs ``key``) instead of all M(M-1)/2; the result then carries
        sampling noise, and an upward bias, of order 1/sqrt(num_pairs).
      key: a ``jax.random`` key, required with ``num_pairs`` and only with it.
      axis_name: inside ``shard_map``, the batch axis: all pairs of the global
        batch (each device bins its own rows against the gathered batch).
      block_size: rows per block for O(block_size * M + num_bins) memory
        (exact pairs only). Exact pairs are counted in int32: M <= 65536.

    Returns:
      scalar in the accumulation dtype (float32 for float32/bfloat16 input).
    """
    fn = "wasserstein_uniformity"
    global_m = _check_metric_input(x, fn, axis_name)
    d = x.shape[1]
    if d < 2:
        raise ValueError(
            f"{fn}: needs embedding dimension d >= 2 (the law of u.v on the sphere of R^d); "
            f"got shape {tuple(x.shape)}."
        )
    check_int(num_bins, "num_bins", fn=fn, maximum=2**28)
    check_block_size(block_size, fn=fn)
    if num_pairs is None:
        if key is not None:
            raise ValueError(f"{fn}: key is only used with num_pairs; got num_pairs = None.")
        total = global_m * (global_m - 1) // 2
        if total > _MAX_PAIRS:
            raise ValueError(
                f"{fn}: M = {global_m} gives {total} pairs, more than {_MAX_PAIRS} (int32 "
                f"counts); pass num_pairs=... and key=... to subsample pairs."
            )
    else:
        check_int(num_pairs, "num_pairs", fn=fn, maximum=_MAX_PAIRS)
        if key is None:
            raise ValueError(
                f"{fn}: num_pairs = {num_pairs} subsamples pairs at random and needs an explicit "
                f"key=jax.random.key(...); got key = None."
            )
        if block_size is not None:
            raise ValueError(
                f"{fn}: block_size applies to exact pairs only; got block_size = {block_size} "
                f"with num_pairs = {num_pairs}."
            )
        total = num_pairs
    u = jax.lax.stop_gradient(_unit_rows(x))
    if num_pairs is None:
        (counts, frac_sums), lo, hi = _exact_pair_histogram(
            u, axis_name, global_m, num_bins, block_size
        )
    else:
        (counts, frac_sums), lo, hi = _sampled_pair_histogram(
            u, axis_name, global_m, num_bins, num_pairs, key
        )
    return _w1_from_histogram(counts, frac_sums, lo, hi, total, d)
