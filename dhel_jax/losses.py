"""Contrastive losses of docs/spec.md as pure JAX functions.

Every loss takes two views ``z1``, ``z2`` of shape (M, d) (row i of ``z2`` is
the positive of row i of ``z1``), L2-normalises the rows to ``u``, ``v``, and
returns a scalar in float32 (float64 for float64 inputs). Logits never go
through ``exp`` unscaled: every log-partition is a masked log-sum-exp, so tau
down to 0.01 and bfloat16 inputs stay finite.

Common keywords:

* ``axis_name``: inside ``jax.shard_map`` with the batch split over this mesh
  axis, every device holds M_local rows and the result (and its gradient) is
  the loss of the global batch; each device computes only its
  (M_local x M_global) block against the all-gathered embeddings.
* ``block_size``: compute the similarity blocks tile by tile (forward and
  backward) with O(M * d + block_size^2) memory instead of O(M^2).
* ``return_aux``: also return a dict with ``alignment`` and ``energy`` (the two
  terms, ``loss == alignment + energy``), per-view energies where the loss has
  them, and for the log-sum-exp losses ``accuracy``: the fraction of anchors
  whose positive logit exceeds every logit of the anchor's negative set.

``get_loss(name, **hparams)`` returns a configured loss by name.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dhel_jax import kernels as kernels_lib
from dhel_jax import metrics
from dhel_jax._validation import check_block_size, check_global_batch, check_pair, check_positive
from dhel_jax.pairwise import (
    AxisName,
    accumulation_dtype,
    axis_size,
    gather_candidates,
    global_logsumexp,
    global_sum,
    l2_normalize,
    pairwise_reduce,
    partition_explicit_axes,
)

Array = jax.Array
LossOutput = Array | tuple[Array, dict[str, Array]]


# --------------------------------------------------------------------------- shared pieces


def _prepare(z1, z2, axis_name, block_size, fn):
    """Validates and normalises the views; returns (u, v, M_global, accumulation dtype)."""
    check_pair(z1, z2, fn=fn)
    check_block_size(block_size, fn=fn)
    global_m = z1.shape[0] * axis_size(axis_name)
    check_global_batch(global_m, fn=fn)
    return l2_normalize(z1), l2_normalize(z2), global_m, accumulation_dtype(z1.dtype)


def _row_dot(u: Array, v: Array, acc) -> Array:
    return jnp.sum(u.astype(acc) * v.astype(acc), axis=-1)


def _scaled(s: Array, inv_tau: Array) -> Array:
    return s * inv_tau


def _inv_temperature(tau, acc, name: str, fn: str) -> Array:
    check_positive(tau, name, fn=fn)
    return 1.0 / jnp.asarray(tau, acc)


def _negatives_lse(anchors, candidates, exclude, inv_tau, block_size):
    """``LSE_j (a_i . c_j / tau)`` over candidates minus the excluded ids, and row maxima."""
    return pairwise_reduce(
        anchors, candidates, _scaled, inv_tau, reduce="lse", exclude=exclude, block_size=block_size
    )


def _mean(per_anchor: Array, count: int, axis_name: AxisName) -> Array:
    return global_sum(per_anchor, axis_name) / count


def _accuracy(pos_logit, neg_max, count, axis_name, acc):
    return _mean((pos_logit > neg_max).astype(acc), count, axis_name)


def _stacked_negatives(u, v, inv_tau, axis_name, block_size, both_views: bool):
    """Negatives of the NT-Xent family: anchors from ``W = [u; v]`` against all of W
    minus the anchor itself and its positive ``p(a)``.

    Returns ``(lse_neg, neg_max)`` for the anchors ``[u; v]`` (``both_views``) or
    ``u`` only.
    """
    m = u.shape[0]
    w = jnp.concatenate([u, v], axis=0)
    w_all, self_ids = gather_candidates(w, axis_name)
    local = jnp.arange(2 * m, dtype=jnp.int32)
    pos_ids = self_ids + jnp.where(local < m, m, -m)
    if both_views:
        return _negatives_lse(w, w_all, (self_ids, pos_ids), inv_tau, block_size)
    candidates = w if w_all is None else w_all
    return _negatives_lse(u, candidates, (self_ids[:m], pos_ids[:m]), inv_tau, block_size)


def _output(loss, aux, return_aux):
    return (loss, aux) if return_aux else loss


# --------------------------------------------------------------------------- InfoNCE family


@partition_explicit_axes
def info_nce(
    z1: Array,
    z2: Array,
    *,
    tau: float = 0.1,
    symmetric: bool = False,
    axis_name: AxisName = None,
    block_size: int | None = None,
    return_aux: bool = False,
) -> LossOutput:
    """InfoNCE with cross-view candidates (docs/spec.md ``info_nce``).

    ``mean_i [-u_i.v_i / tau + LSE_j (u_i.v_j / tau)]``, positive included in the
    LSE; ``symmetric=True`` averages with the roles of u and v swapped.

    Args:
      z1, z2: (M, d) views; row i of ``z2`` is the positive of row i of ``z1``.
      tau: temperature, > 0.
      symmetric: average the u->v and v->u directions.
    """
    fn = "info_nce"
    u, v, global_m, acc = _prepare(z1, z2, axis_name, block_size, fn)
    inv_tau = _inv_temperature(tau, acc, "tau", fn)
    pos = _row_dot(u, v, acc) * inv_tau
    v_all, ids = gather_candidates(v, axis_name)
    neg_u, max_u = _negatives_lse(u, v if v_all is None else v_all, (ids,), inv_tau, block_size)
    lse = [jnp.logaddexp(neg_u, pos)]
    correct = [pos > max_u]
    if symmetric:
        u_all, _ = gather_candidates(u, axis_name)
        neg_v, max_v = _negatives_lse(v, u if u_all is None else u_all, (ids,), inv_tau, block_size)
        lse.append(jnp.logaddexp(neg_v, pos))
        correct.append(pos > max_v)
    count = global_m * len(lse)
    alignment = -_mean(pos, global_m, axis_name)
    energy = _mean(jnp.concatenate(lse), count, axis_name)
    aux = {
        "alignment": alignment,
        "energy": energy,
        "accuracy": _mean(jnp.concatenate(correct).astype(acc), count, axis_name),
    }
    return _output(alignment + energy, aux, return_aux)


def _nt_xent_family(z1, z2, *, tau, symmetric, axis_name, block_size, fn, kind, sigma=None):
    u, v, global_m, acc = _prepare(z1, z2, axis_name, block_size, fn)
    inv_tau = _inv_temperature(tau, acc, "tau", fn)
    raw_pos = _row_dot(u, v, acc)
    pos = raw_pos * inv_tau
    neg, neg_max = _stacked_negatives(u, v, inv_tau, axis_name, block_size, symmetric)
    n_views = 2 if symmetric else 1
    count = global_m * n_views
    pos_w = jnp.concatenate([pos] * n_views)
    if kind == "dclw":
        check_positive(sigma, "sigma", fn=fn)
        # w_i = 2 - M softmax_i(u_i.v_i / sigma) over the global batch; gradient flows through w.
        logit = raw_pos / jnp.asarray(sigma, acc)
        log_norm = global_logsumexp(logit, axis_name)
        weight = 2.0 - global_m * jnp.exp(logit - log_norm)
        align_terms = jnp.concatenate([weight * pos] * n_views)
    else:
        align_terms = pos_w
    lse = jnp.logaddexp(neg, pos_w) if kind == "simclr" else neg
    alignment = -_mean(align_terms, count, axis_name)
    energy = _mean(lse, count, axis_name)
    aux = {
        "alignment": alignment,
        "energy": energy,
        "accuracy": _accuracy(pos_w, neg_max, count, axis_name, acc),
    }
    return alignment + energy, aux


@partition_explicit_axes
def simclr(
    z1: Array,
    z2: Array,
    *,
    tau: float = 0.5,
    symmetric: bool = True,
    axis_name: AxisName = None,
    block_size: int | None = None,
    return_aux: bool = False,
) -> LossOutput:
    """NT-Xent (SimCLR; docs/spec.md ``simclr``).

    For each anchor ``a`` of ``W = [u; v]`` (2M, d):
    ``-a.p(a)/tau + LSE_{b in W, b != a} (a.b/tau)``, averaged over the 2M
    anchors; ``symmetric=False`` averages over the M anchors ``u_i`` only (the
    paper's mini-batch form).
    """
    loss, aux = _nt_xent_family(
        z1,
        z2,
        tau=tau,
        symmetric=symmetric,
        axis_name=axis_name,
        block_size=block_size,
        fn="simclr",
        kind="simclr",
    )
    return _output(loss, aux, return_aux)


@partition_explicit_axes
def dcl(
    z1: Array,
    z2: Array,
    *,
    tau: float = 0.1,
    symmetric: bool = True,
    axis_name: AxisName = None,
    block_size: int | None = None,
    return_aux: bool = False,
) -> LossOutput:
    """Decoupled contrastive loss (docs/spec.md ``dcl``).

    As ``simclr`` with the positive ``p(a)`` also removed from the LSE set:
    ``-a.p(a)/tau + LSE_{b in W, b not in {a, p(a)}} (a.b/tau)``.
    """
    loss, aux = _nt_xent_family(
        z1,
        z2,
        tau=tau,
        symmetric=symmetric,
        axis_name=axis_name,
        block_size=block_size,
        fn="dcl",
        kind="dcl",
    )
    return _output(loss, aux, return_aux)


@partition_explicit_axes
def dclw(
    z1: Array,
    z2: Array,
    *,
    tau: float = 0.1,
    sigma: float = 0.5,
    symmetric: bool = True,
    axis_name: AxisName = None,
    block_size: int | None = None,
    return_aux: bool = False,
) -> LossOutput:
    """Weighted decoupled contrastive loss (docs/spec.md ``dclw``).

    As ``dcl`` with the positive logit of pair i multiplied by
    ``w_i = 2 - M softmax_i(u_i.v_i / sigma)`` (the same weight for both anchors
    of the pair; the gradient flows through ``w``).
    """
    loss, aux = _nt_xent_family(
        z1,
        z2,
        tau=tau,
        symmetric=symmetric,
        axis_name=axis_name,
        block_size=block_size,
        fn="dclw",
        kind="dclw",
        sigma=sigma,
    )
    return _output(loss, aux, return_aux)


# --------------------------------------------------------------------------- DHEL


@partition_explicit_axes
def dhel(
    z1: Array,
    z2: Array,
    *,
    tau: float = 0.3,
    include_augs: bool = True,
    axis_name: AxisName = None,
    block_size: int | None = None,
    return_aux: bool = False,
) -> LossOutput:
    """Decoupled hyperspherical energy loss (docs/spec.md ``dhel``).

    ``mean_i [-u_i.v_i/tau + LSE_{j != i}(u_i.u_j/tau)
    + [include_augs] LSE_{j != i}(v_i.v_j/tau)]``.

    ``include_augs=False`` is the paper's formula: the positives ``v`` then get
    the alignment gradient only. ``include_augs=True`` (the published
    implementation's default) adds the energy of the positive views.
    """
    fn = "dhel"
    u, v, global_m, acc = _prepare(z1, z2, axis_name, block_size, fn)
    inv_tau = _inv_temperature(tau, acc, "tau", fn)
    pos = _row_dot(u, v, acc) * inv_tau
    u_all, ids = gather_candidates(u, axis_name)
    lse_u, max_u = _negatives_lse(u, u_all, (ids,), inv_tau, block_size)
    alignment = -_mean(pos, global_m, axis_name)
    energy_u = _mean(lse_u, global_m, axis_name)
    aux = {"alignment": alignment, "energy_u": energy_u}
    energy = energy_u
    if include_augs:
        v_all, _ = gather_candidates(v, axis_name)
        lse_v, _ = _negatives_lse(v, v_all, (ids,), inv_tau, block_size)
        aux["energy_v"] = _mean(lse_v, global_m, axis_name)
        energy = energy + aux["energy_v"]
    aux["energy"] = energy
    aux["accuracy"] = _accuracy(pos, max_u, global_m, axis_name, acc)
    return _output(alignment + energy, aux, return_aux)


# --------------------------------------------------------------------------- KCL


def pair_energy(
    x: Array,
    kernel_fn: Callable[[Array, Array], Array],
    t: Any,
    *,
    axis_name: AxisName = None,
    block_size: int | None = None,
) -> Array:
    """``E(x) = mean_{i<j} K(|x_i - x_j|^2, t)`` over the global batch.

    ``x`` must already be normalised; the mean over unordered pairs equals the
    mean over ordered pairs ``i != j`` since K is symmetric.
    """
    global_m = x.shape[0] * axis_size(axis_name)
    x_all, ids = gather_candidates(x, axis_name)
    rows, _ = pairwise_reduce(
        x,
        x_all,
        kernel_fn,
        t,
        reduce="sum",
        argument="sqdist",
        exclude=(ids,),
        block_size=block_size,
    )
    return global_sum(rows, axis_name) / float(global_m * (global_m - 1))


@partition_explicit_axes
def kcl(
    z1: Array,
    z2: Array,
    *,
    kernel: str = "gaussian",
    t: float = 2.0,
    gamma: float = 16.0,
    axis_name: AxisName = None,
    block_size: int | None = None,
    return_aux: bool = False,
) -> LossOutput:
    """Kernel contrastive loss (docs/spec.md ``kcl``).

    ``-2 mean_i K_A(u_i, v_i) + gamma (E(u) + E(v))``, with
    ``E(x) = mean_{i<j} K_U(x_i, x_j)`` (a U-statistic: its expectation does not
    depend on M). Kernels are listed in ``dhel_jax.kernels``.

    Args:
      kernel: ``gaussian``, ``log``, ``imq``, ``riesz`` (s = t < 0) or
        ``gaussian_riesz`` (s = t != 0).
      t: kernel parameter (s for the Riesz kernels).
      gamma: weight of the energy term.
    """
    fn = "kcl"
    kern = kernels_lib.get_kernel(kernel, t)
    u, v, global_m, acc = _prepare(z1, z2, axis_name, block_size, fn)
    t_arr = jnp.asarray(t, acc)
    diff = u.astype(acc) - v.astype(acc)
    align_k = _mean(kern.alignment(jnp.sum(diff * diff, axis=-1), t_arr), global_m, axis_name)
    e_u = pair_energy(u, kern.energy, t_arr, axis_name=axis_name, block_size=block_size)
    e_v = pair_energy(v, kern.energy, t_arr, axis_name=axis_name, block_size=block_size)
    alignment = -2.0 * align_k
    energy = gamma * (e_u + e_v)
    aux = {"alignment": alignment, "energy": energy, "energy_u": e_u, "energy_v": e_v}
    return _output(alignment + energy, aux, return_aux)


# --------------------------------------------------------------------------- Wang & Isola


@partition_explicit_axes
def align_uniform(
    z1: Array,
    z2: Array,
    *,
    alpha: float = 2.0,
    t: float = 2.0,
    lam: float = 1.0,
    axis_name: AxisName = None,
    block_size: int | None = None,
    return_aux: bool = False,
) -> LossOutput:
    """Alignment + uniformity (Wang & Isola 2020; docs/spec.md ``align_uniform``).

    ``alignment(u, v, alpha) + lam (uniformity(u, t) + uniformity(v, t)) / 2``.
    """
    fn = "align_uniform"
    _prepare(z1, z2, axis_name, block_size, fn)
    alignment = metrics.alignment(z1, z2, alpha=alpha, axis_name=axis_name)
    unif_u = metrics.uniformity(z1, t=t, axis_name=axis_name, block_size=block_size)
    unif_v = metrics.uniformity(z2, t=t, axis_name=axis_name, block_size=block_size)
    energy = lam * (unif_u + unif_v) / 2
    aux = {"alignment": alignment, "energy": energy, "uniformity_u": unif_u, "uniformity_v": unif_v}
    return _output(alignment + energy, aux, return_aux)


# --------------------------------------------------------------------------- registry


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "info_nce": info_nce,
    "simclr": simclr,
    "dcl": dcl,
    "dclw": dclw,
    "dhel": dhel,
    "kcl": kcl,
    "align_uniform": align_uniform,
}


def loss_hyperparameters(name: str) -> dict[str, Any]:
    """The keyword hyper-parameters of loss ``name`` with their docs/spec.md defaults."""
    fn = _lookup(name)
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _lookup(name: str) -> Callable[..., LossOutput]:
    if name not in LOSSES:
        raise ValueError(
            f"unknown loss {name!r}; accepted losses are {', '.join(map(repr, LOSSES))}."
        )
    return LOSSES[name]


def get_loss(name: str, **hparams: Any) -> Callable[..., LossOutput]:
    """Returns loss ``name`` with keyword hyper-parameters bound.

    ``get_loss("kcl", kernel="log", t=1.0)(z1, z2)``. Unknown names and
    hyper-parameters raise ``ValueError`` listing the accepted ones; kernel
    names and parameter ranges are checked here too, before any tracing.
    """
    fn = _lookup(name)
    accepted = loss_hyperparameters(name)
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ValueError(
            f"loss {name!r} got unknown hyper-parameter(s) {', '.join(map(repr, unknown))}; "
            f"accepted are {', '.join(map(repr, accepted))}."
        )
    if name == "kcl":
        kernels_lib.get_kernel(
            hparams.get("kernel", accepted["kernel"]), hparams.get("t", accepted["t"])
        )
    for key in ("tau", "sigma"):
        if key in hparams:
            check_positive(hparams[key], key, fn=name)
    check_block_size(hparams.get("block_size"), fn=name)
    return functools.partial(fn, **hparams)
