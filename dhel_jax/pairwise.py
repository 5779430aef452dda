"""Pairwise row reductions: the engine shared by every loss and metric.

Every contrastive loss in docs/spec.md is built from per-anchor reductions over a
set of candidates, for anchor rows ``a`` (m, d) and candidate rows ``b`` (n, d):

* ``reduce="lse"``: ``LSE_j f(a_i . b_j)`` (InfoNCE family; ``f = s / tau``),
* ``reduce="sum"``: ``sum_j f(|a_i - b_j|^2)`` (kernel energies),

optionally excluding given columns per row (the anchor itself, its positive),
named by their global column ids. Three execution modes share one definition:

* **dense** (``block_size=None``): the (m, n) matrix is formed and XLA
  differentiates it. For self-similarity (``b=None``) the Gram matrix has a
  custom VJP, ``dG -> (dG + dG^T) x``: one matmul instead of two.
* **tiled** (``block_size=B``): a two-level scan over (B, B) tiles with an
  online log-sum-exp, under a ``jax.custom_vjp`` whose backward pass
  recomputes each tile. Peak memory is O((m + n) d + B^2), independent of the
  (m, n) product. A custom VJP rather than ``jax.checkpoint`` around a scan:
  autodiff of a nested scan saves every tile's sliced inputs as residuals
  (O(m n d / B) memory), the custom backward saves only ``a``, ``b`` and the
  per-row statistics.
* **sharded**: the losses pass local anchor rows and all-gathered candidates,
  with the anchors' global ids offset by ``axis_index * m_local``; each device
  does O(m_local * M) work and XLA's transpose of ``all_gather`` (a reduce-scatter) routes the
  candidate gradients back to their owners.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
PyTree = Any
Reduce = Literal["lse", "sum"]
Argument = Literal["dot", "sqdist"]

_NORM_EPS = 1e-12
# Value substituted for excluded/padded entries before ``f`` is applied, so
# that kernels singular at r = 0 (Riesz, log) never see a zero distance there
# and produce no NaN cotangents through the mask.
_SAFE_SQDIST = 1.0


def l2_normalize(x: Array, eps: float = _NORM_EPS) -> Array:
    """Rows ``x_i / max(|x_i|, eps)`` (docs/spec.md, Notation), in ``x.dtype``.

    The norm is computed in float32 (or float64) and the square root is taken
    of ``max(|x_i|^2, eps^2)``, so a zero row maps to zero with a finite
    gradient, as ``torch.nn.functional.normalize`` does.
    """
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(acc)
    inv = lax.rsqrt(jnp.maximum(jnp.sum(xf * xf, axis=-1, keepdims=True), eps * eps))
    return (xf * inv).astype(x.dtype)


def accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for low-precision inputs, float64 stays float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _dot_nt(a: Array, b: Array) -> Array:
    """``a @ b.T`` accumulated in at least float32, at full float32 precision."""
    acc = accumulation_dtype(a.dtype)
    precision = lax.Precision.HIGHEST if a.dtype in (jnp.float32, jnp.float64) else None
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=acc
    )


def _dot_nn(g: Array, b: Array) -> Array:
    """``g @ b`` in the accumulation dtype (g is already float32/64)."""
    precision = lax.Precision.HIGHEST if g.dtype in (jnp.float32, jnp.float64) else None
    return lax.dot_general(g, b.astype(g.dtype), (((1,), (0,)), ((), ())), precision=precision)


def sq_norms(x: Array) -> Array:
    """Squared row norms ``|x_i|^2`` in the accumulation dtype, shape (n,)."""
    xf = x.astype(accumulation_dtype(x.dtype))
    return jnp.sum(xf * xf, axis=-1)


def _tile_input(s, sa, sb, argument, mask):
    """The argument of ``f`` on a tile: dot products or clipped squared distances, with a safe
    dummy at excluded entries. Also returns the unclipped squared distances (or None)."""
    if argument == "dot":
        return jnp.where(mask, s, 0.0), None
    r2_raw = sa[:, None] + sb[None, :] - 2.0 * s
    return jnp.where(mask, jnp.maximum(r2_raw, 0.0), _SAFE_SQDIST), r2_raw


def _mask(cols: Array, exclude: tuple[Array, ...], row_valid=None, col_valid=None) -> Array:
    """(rows, cols) boolean mask: False where column id equals an excluded id of the row."""
    n_rows = (
        exclude[0].shape[0] if exclude else (row_valid.shape[0] if row_valid is not None else 1)
    )
    mask = jnp.ones((n_rows, cols.shape[0]), dtype=bool)
    for ids in exclude:
        mask = mask & (ids[:, None] != cols[None, :])
    if row_valid is not None:
        mask = mask & row_valid[:, None]
    if col_valid is not None:
        mask = mask & col_valid[None, :]
    return mask


def _row_weights(vals, mask, reduce, red, g, axis):
    """Cotangent reaching ``vals`` from the row reductions ``red`` with cotangent ``g``;
    ``axis=1`` for the tile's rows, ``axis=0`` for its columns (the transposed entries of a
    symmetric matrix)."""
    expand = (lambda v: v[:, None]) if axis == 1 else (lambda v: v[None, :])
    if reduce == "lse":
        w = expand(g) * jnp.exp(vals - expand(red))
    else:
        w = jnp.broadcast_to(expand(g), vals.shape)
    return jnp.where(mask, w, 0.0)


def _tile_cotangent(x, r2_raw, f, params, w, acc):
    """Elementwise ``f'(x) * w`` (the cotangent of the tile's argument), zero where squared
    distances were clipped, and the cotangent of ``params``: ``sum w * df/dparams``."""
    fx = lambda t, p: f(t, p).astype(acc)
    _, fprime = jax.jvp(lambda t: fx(t, params), (x,), (jnp.ones_like(x),))
    x_bar = fprime * w
    if r2_raw is not None:
        x_bar = jnp.where(r2_raw > 0.0, x_bar, 0.0)
    return x_bar


def _params_cotangent(x, f, params, w, acc):
    _, vjp = jax.vjp(lambda p: f(x, p).astype(acc), params)
    return vjp(w)[0]


def _reduce_rows(vals, mask, reduce):
    if reduce == "lse":
        masked = jnp.where(mask, vals, -jnp.inf)
        return jax.nn.logsumexp(masked, axis=1), jnp.max(masked, axis=1)
    return jnp.sum(jnp.where(mask, vals, 0.0), axis=1), jnp.zeros(vals.shape[:1], vals.dtype)


# --------------------------------------------------------------------------- dense


def _dense(a, b, f, params, reduce, argument, exclude):
    """Candidates ``b`` distinct from the anchors: XLA differentiates the (m, n) tile."""
    s = _dot_nt(a, b)
    mask = _mask(jnp.arange(b.shape[0]), exclude, row_valid=jnp.ones((a.shape[0],), bool))
    sa, sb = (sq_norms(a), sq_norms(b)) if argument == "sqdist" else (None, None)
    x, _ = _tile_input(s, sa, sb, argument, mask)
    red, rowmax = _reduce_rows(f(x, params), mask, reduce)
    return red, (lax.stop_gradient(rowmax) if reduce == "lse" else None)


def _dense_self_forward(a, params, exclude, f, reduce, argument):
    acc = accumulation_dtype(a.dtype)
    s = _dot_nt(a, a)
    mask = _mask(jnp.arange(a.shape[0]), exclude, row_valid=jnp.ones((a.shape[0],), bool))
    sa = sq_norms(a) if argument == "sqdist" else None
    x, r2_raw = _tile_input(s, sa, sa, argument, mask)
    vals = f(x, params).astype(acc)
    return _reduce_rows(vals, mask, reduce), (s, mask, x, r2_raw, vals)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _dense_self(a, params, exclude, f, reduce, argument):
    (red, rowmax), _ = _dense_self_forward(a, params, exclude, f, reduce, argument)
    return red, rowmax


def _dense_self_fwd(a, params, exclude, f, reduce, argument):
    (red, rowmax), (s, *_) = _dense_self_forward(a, params, exclude, f, reduce, argument)
    return (red, rowmax), (a, params, exclude, red, s)


def _dense_self_bwd(f, reduce, argument, res, cts):
    """Self-similarity ``x x^T`` is symmetric, and so is the exclusion mask (the anchor
    itself, its positive), so the two cotangents reaching a_i (as row i and as column i) add
    up entrywise: ``Q_ij = f'(x_ij) (w_ij + w_ji)`` with ``w_ji`` computed from row j's
    statistics on the same entry. One fused elementwise pass and one matmul ``Q a``, instead
    of autodiff's two matmuls and an (M, M) transpose."""
    a, params, exclude, red, s = res
    g, _ = cts  # the row maximum is a statistic for logging: no gradient.
    acc = accumulation_dtype(a.dtype)
    mask = _mask(jnp.arange(a.shape[0]), exclude, row_valid=jnp.ones((a.shape[0],), bool))
    sa = sq_norms(a) if argument == "sqdist" else None
    x, r2_raw = _tile_input(s, sa, sa, argument, mask)
    vals = f(x, params).astype(acc)
    g = g.astype(acc)
    w_rows = _row_weights(vals, mask, reduce, red, g, axis=1)
    w_cols = _row_weights(vals, mask, reduce, red, g, axis=0)
    q = _tile_cotangent(x, r2_raw, f, params, w_rows + w_cols, acc)
    p_bar = _params_cotangent(x, f, params, w_rows, acc)
    a_f = a.astype(acc)
    if argument == "dot":
        ga = _dot_nn(q, a_f)
    else:
        ga = 2.0 * (jnp.sum(q, axis=1)[:, None] * a_f - _dot_nn(q, a_f))
    return ga.astype(a.dtype), p_bar, tuple(None for _ in exclude)


_dense_self.defvjp(_dense_self_fwd, _dense_self_bwd)


# --------------------------------------------------------------------------- tiled


def vma_zero(*trees, dtype) -> Array:
    """A scalar 0 carrying the union of the inputs' varying mesh axes.

    Inside ``shard_map`` scan carries must be typed as varying over the same
    mesh axes as the values the body adds to them; adding this to a fresh
    ``zeros`` gives it exactly that type (and is a no-op outside shard_map).
    """
    zero = jnp.zeros((), dtype)
    for leaf in jax.tree.leaves(trees):
        zero = zero + jnp.sum(jnp.reshape(leaf, (-1,))[:0]).astype(dtype)
    return zero


def _common_varying(trees, *others):
    """``trees`` with every leaf cast to the union of the varying mesh axes of ``trees`` and
    ``others`` (a no-op outside ``shard_map``), by adding :func:`vma_zero`.

    The tiled path casts its inputs so before its custom VJP: inside it every primal then has
    one type, and JAX transposes the casts outside it (a ``psum`` of the cotangent of a
    replicated input such as a temperature). Public API only: no varying-axes type is read.
    """
    return jax.tree.map(lambda x: x + vma_zero(trees, *others, dtype=x.dtype), trees)


def _as_varying_as(ct: Array, primal: Array) -> Array:
    """Gives a cotangent at least the varying axes of its primal (a cotangent computed only
    from invariant values, such as zeros, is cast to varying)."""
    return ct + vma_zero(primal, dtype=ct.dtype)


def _tiles(x: Array, block: int) -> Array:
    """(n, ...) -> (n_blocks, block, ...), zero-padded."""
    pad = (-x.shape[0]) % block
    if pad:
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape((x.shape[0] // block, block) + x.shape[1:])


def _tiled_forward(a, b, params, exclude, f, reduce, argument, block):
    m, n = a.shape[0], b.shape[0]
    acc = accumulation_dtype(a.dtype)
    a_t, b_t = _tiles(a, block), _tiles(b, block)
    sa_t, sb_t = _tiles(sq_norms(a), block), _tiles(sq_norms(b), block)
    ex_t = tuple(_tiles(ids, block) for ids in exclude)
    local = jnp.arange(block)

    def row_block(args):
        ia, a_blk, sa_blk, ex_blk = args
        row_valid = ia * block + local < m

        def col_step(carry, cargs):
            jb, b_blk, sb_blk = cargs
            cols = jb * block + local
            mask = _mask(cols, ex_blk, row_valid, cols < n)
            x, _ = _tile_input(_dot_nt(a_blk, b_blk), sa_blk, sb_blk, argument, mask)
            vals = f(x, params).astype(acc)
            if reduce == "sum":
                return carry + jnp.sum(jnp.where(mask, vals, 0.0), axis=1), None
            masked = jnp.where(mask, vals, -jnp.inf)
            mx, se = carry
            new_mx = jnp.maximum(mx, jnp.max(masked, axis=1))
            safe = jnp.where(jnp.isfinite(new_mx), new_mx, 0.0)
            se = se * jnp.exp(mx - safe) + jnp.sum(jnp.exp(masked - safe[:, None]), axis=1)
            return (new_mx, se), None

        xs = (jnp.arange(b_t.shape[0]), b_t, sb_t)
        zero = vma_zero(a_blk, b_t, params, ex_blk, dtype=acc)
        if reduce == "sum":
            out, _ = lax.scan(col_step, jnp.zeros((block,), acc) + zero, xs)
            return out, jnp.zeros((block,), acc) + zero
        init = (jnp.full((block,), -jnp.inf, acc) + zero, jnp.zeros((block,), acc) + zero)
        (mx, se), _ = lax.scan(col_step, init, xs)
        return jnp.log(se) + jnp.where(jnp.isfinite(mx), mx, 0.0), mx

    red, rowmax = lax.map(row_block, (jnp.arange(a_t.shape[0]), a_t, sa_t, ex_t))
    return red.reshape(-1)[:m], rowmax.reshape(-1)[:m]


def _tiled_backward(a, b, params, exclude, red, g, f, reduce, argument, block, symmetric):
    """Recomputes each tile. With ``symmetric`` (b is a, symmetric exclusions) the tile's
    cotangent already holds both the row and the column contribution to a (see
    ``_dense_self_bwd``), so each tile needs one matmul instead of two and b gets none."""
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    acc = accumulation_dtype(a.dtype)
    a_t, b_t = _tiles(a, block), _tiles(b, block)
    sa_t, sb_t = _tiles(sq_norms(a), block), _tiles(sq_norms(b), block)
    ex_t = tuple(_tiles(ids, block) for ids in exclude)
    red_t, g_t = _tiles(red, block), _tiles(g.astype(acc), block)
    local = jnp.arange(block)
    zero = vma_zero(a, b, params, exclude, g, dtype=acc)
    p_zero = jax.tree.map(lambda p: jnp.zeros_like(p) + zero.astype(p.dtype), params)

    def row_step(carry, rargs):
        gb_acc, p_acc = carry
        ia, a_blk, sa_blk, ex_blk, red_blk, g_blk = rargs
        row_valid = ia * block + local < m
        a_f = a_blk.astype(acc)

        def col_step(ccarry, cargs):
            ga_acc, pc_acc = ccarry
            jb, b_blk, sb_blk, red_col, g_col = cargs
            cols = jb * block + local
            mask = _mask(cols, ex_blk, row_valid, cols < n)
            x, r2_raw = _tile_input(_dot_nt(a_blk, b_blk), sa_blk, sb_blk, argument, mask)
            vals = f(x, params).astype(acc)
            w = _row_weights(vals, mask, reduce, red_blk, g_blk, axis=1)
            pc_acc = jax.tree.map(jnp.add, pc_acc, _params_cotangent(x, f, params, w, acc))
            if symmetric:
                w = w + _row_weights(vals, mask, reduce, red_col, g_col, axis=0)
            x_bar = _tile_cotangent(x, r2_raw, f, params, w, acc)
            b_f = b_blk.astype(acc)
            if argument == "dot":
                ga = _dot_nn(x_bar, b_f)
                gb = None if symmetric else _dot_nn(x_bar.T, a_f)
            else:  # r2 = |a|^2 + |b|^2 - 2 a.b
                ga = 2.0 * (jnp.sum(x_bar, axis=1)[:, None] * a_f - _dot_nn(x_bar, b_f))
                gb = (
                    None
                    if symmetric
                    else 2.0 * (jnp.sum(x_bar, axis=0)[:, None] * b_f - _dot_nn(x_bar.T, a_f))
                )
            return (ga_acc + ga, pc_acc), gb

        # Column statistics are only read in the symmetric case (then b is a).
        col_stats = (red_t, g_t) if symmetric else (sb_t, sb_t)
        (ga_blk, p_acc), gb_tiles = lax.scan(
            col_step,
            (jnp.zeros((block, d), acc) + zero, p_acc),
            (jnp.arange(b_t.shape[0]), b_t, sb_t, *col_stats),
        )
        if not symmetric:
            gb_acc = gb_acc + gb_tiles.reshape(-1, d)
        return (gb_acc, p_acc), ga_blk

    gb_init = jnp.zeros((0 if symmetric else b_t.shape[0] * block, d), acc) + zero
    (gb_full, p_bar), ga_tiles = lax.scan(
        row_step, (gb_init, p_zero), (jnp.arange(a_t.shape[0]), a_t, sa_t, ex_t, red_t, g_t)
    )
    ga = ga_tiles.reshape(-1, d)[:m].astype(a.dtype)
    gb = jnp.zeros_like(b) if symmetric else gb_full[:n].astype(b.dtype)
    return ga, gb, p_bar


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _tiled(a, b, params, exclude, f, reduce, argument, block, symmetric):
    return _tiled_forward(a, b, params, exclude, f, reduce, argument, block)


def _tiled_fwd(a, b, params, exclude, f, reduce, argument, block, symmetric):
    red, rowmax = _tiled_forward(a, b, params, exclude, f, reduce, argument, block)
    return (red, rowmax), (a, b, params, exclude, red)


def _tiled_bwd(f, reduce, argument, block, symmetric, res, cts):
    a, b, params, exclude, red = res
    g, _ = cts  # the row maximum is a statistic for logging: no gradient.
    ga, gb, p_bar = _tiled_backward(
        a, b, params, exclude, red, g, f, reduce, argument, block, symmetric
    )
    p_bar = jax.tree.map(_as_varying_as, p_bar, params)
    return _as_varying_as(ga, a), _as_varying_as(gb, b), p_bar, tuple(None for _ in exclude)


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


# --------------------------------------------------------------------------- API


def pairwise_reduce(
    a: Array,
    b: Array | None,
    f: Callable[[Array, PyTree], Array],
    params: PyTree = (),
    *,
    reduce: Reduce,
    argument: Argument = "dot",
    exclude: tuple[Array, ...] = (),
    block_size: int | None = None,
) -> tuple[Array, Array | None]:
    """Per-row reduction over candidate columns of an elementwise function.

    Args:
      a: anchor rows, shape (m, d).
      b: candidate rows, shape (n, d); ``None`` means ``b = a`` (self-similarity), which
        requires a symmetric exclusion pattern (j excluded from row i iff i from row j, true
        for the anchor itself and its positive) and enables a cheaper backward pass.
      f: elementwise ``f(x, params)`` applied to ``x_ij = a_i . b_j``
        (``argument="dot"``) or to ``x_ij = |a_i - b_j|^2``
        (``argument="sqdist"``); differentiable and NaN-free at ``x = 1``.
      params: pytree of arrays used by ``f`` (temperatures, kernel widths);
        gradients flow to them in every mode.
      reduce: ``"lse"`` (log-sum-exp over j) or ``"sum"``.
      exclude: int arrays of shape (m,): column ``ids[i]`` is dropped from
        row ``i`` (the anchor itself, its positive).
      block_size: ``None`` for the dense computation, else the tile edge.

    Returns:
      ``(red, rowmax)``: the reductions, shape (m,) in the accumulation dtype,
      and for ``"lse"`` the (gradient-free) row maxima of ``f``, else ``None``.
    """
    exclude = tuple(jnp.asarray(ids, jnp.int32) for ids in exclude)
    symmetric = b is None
    if block_size is None:
        if not symmetric:
            return _dense(a, b, f, params, reduce, argument, exclude)
        red, rowmax = _dense_self(a, params, exclude, f, reduce, argument)
    else:
        b = a if symmetric else b
        a, b, params = _common_varying((a, b, params), exclude)
        red, rowmax = _tiled(a, b, params, exclude, f, reduce, argument, int(block_size), symmetric)
    return red, (lax.stop_gradient(rowmax) if reduce == "lse" else None)


# --------------------------------------------------------------------------- sharding


def _explicit_mesh(args) -> object | None:
    """The abstract mesh with Explicit axes that the inputs live on, if any: the ambient mesh
    (``jax.set_mesh``) or the mesh of an input's sharding."""
    mesh: Any = jax.sharding.get_abstract_mesh()
    if getattr(mesh, "explicit_axes", ()):
        return mesh
    for leaf in jax.tree.leaves(args):
        sharding = getattr(jax.typeof(leaf), "sharding", None) if hasattr(leaf, "shape") else None
        mesh = getattr(sharding, "mesh", None)
        mesh = getattr(mesh, "abstract_mesh", mesh)
        if getattr(mesh, "explicit_axes", ()):
            return mesh
    return None


def partition_explicit_axes(fn: Callable) -> Callable:
    """Lets a global-batch loss or metric take arrays sharded over *Explicit* mesh axes.

    With Explicit axes (``jax.make_mesh``'s default), JAX refuses to infer the
    layout of an (M, M) product of two row-sharded operands. The wrapped
    function runs those axes in Auto mode instead, so XLA partitions the
    similarity blocks exactly as it does for ``jax.jit`` on ``NamedSharding``
    inputs, and returns replicated outputs; gradients keep the inputs'
    sharding. Without Explicit axes (including inside ``shard_map``) it is a
    plain call.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        mesh = _explicit_mesh(args)
        if mesh is None:
            return fn(*args, **kwargs)
        call = lambda *a: fn(*a, **kwargs)
        with jax.sharding.use_abstract_mesh(mesh):
            return jax.sharding.auto_axes(
                call, axes=tuple(mesh.explicit_axes), out_sharding=jax.sharding.PartitionSpec()
            )(*args)

    return wrapper


AxisName = Hashable | tuple[Hashable, ...] | None


def axis_size(axis_name: AxisName) -> int:
    """Number of devices along ``axis_name`` (1 when ``None``)."""
    if axis_name is None:
        return 1
    return lax.axis_size(axis_name)


def gather_candidates(x: Array, axis_name: AxisName) -> tuple[Array | None, Array]:
    """All-gathers the rows of ``x`` over ``axis_name``.

    Returns ``(x_all, ids)``: ``x_all`` is ``None`` without an axis (the caller
    then uses self-similarity) and else the (M_global, d) stack in device
    order; ``ids`` (m,) are the global row ids of this device's rows. The
    gradient of ``all_gather`` is a reduce-scatter, so candidate cotangents
    reach the device that owns each row.
    """
    local = jnp.arange(x.shape[0], dtype=jnp.int32)
    if axis_name is None:
        return None, local
    x_all = lax.all_gather(x, axis_name, axis=0, tiled=True)
    return x_all, lax.axis_index(axis_name).astype(jnp.int32) * x.shape[0] + local


def global_logsumexp(x: Array, axis_name: AxisName) -> Array:
    """``log sum exp(x)`` over this device's entries and every device along ``axis_name``.

    Uses ``pmax`` and ``psum`` (not an all-gather), so the result is typed as
    replicated inside ``shard_map`` and its gradient is the local softmax.
    """
    if axis_name is None:
        return jax.nn.logsumexp(x)
    top = lax.pmax(lax.stop_gradient(jnp.max(x)), axis_name)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    return top + jnp.log(lax.psum(jnp.sum(jnp.exp(x - top)), axis_name))


def global_sum(x: Array, axis_name: AxisName) -> Array:
    """``sum(x)`` over this device's entries and every device along ``axis_name``."""
    total = jnp.sum(x)
    return total if axis_name is None else lax.psum(total, axis_name)
