"""Gradient caching: the exact gradient of a global-batch contrastive loss in k chunks.

Plain gradient accumulation is wrong for contrastive losses (each micro-batch would see only
its own negatives). Gradient caching (Gao et al., 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup") splits the gradient of ``L(z(theta))``, with
``z = (z_1, ..., z_k)`` the embeddings of the k chunks, as ``sum_c J_c^T dL/dz_c``:

1. embed the views chunk by chunk, keeping no activations (``jax.lax.map``, no ``vjp``);
2. the loss of the global batch and its cotangent ``dL/dz`` (a (2B, P) array);
3. for each chunk again, the forward under ``jax.vjp`` and its backward with that chunk's
   cotangent, summing the parameter gradients (``jax.lax.scan``).

Only one chunk's activations are alive at a time, so the step's temporaries fall roughly as
1/k, for the price of a second forward pass. The loops must stay loops: unrolled, XLA schedules
the chunks side by side and the memory saving is lost. On XLA:CPU a loop body is fast only
with convolutions in NHWC/HWIO form, which ``dhel_jax.models.conv_general_dilated`` gives the
gradients too (docs/large_batches.md, "Time"). Chunk c holds rows ``[c m, (c + 1) m)`` of
*every* device's rows (m = rows per device / k), so each chunk stays spread over the whole
mesh and no rows move between devices. BatchNorm normalises each chunk with its own
statistics ("ghost BatchNorm", over the chunk's 2B/k views on all devices); the new running
statistics are the mean over chunks of each chunk's update. The result equals, up to
round-off, one differentiated pass that applies the model to each chunk separately.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Array = jax.Array


def _num_shards(sharding: NamedSharding | None) -> int:
    if sharding is None or not sharding.spec or sharding.spec[0] is None:
        return 1
    axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
    n = 1
    for axis in axes:
        n *= sharding.mesh.shape[axis]
    return n


def _chunk_sharding(sharding: NamedSharding | None) -> NamedSharding | None:
    if sharding is None:
        return None
    return NamedSharding(sharding.mesh, P(None, *sharding.spec))


def _constrain(x: Array, sharding: NamedSharding | None) -> Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def chunk_rows(x: Array, num_chunks: int, num_shards: int = 1) -> Array:
    """(N, ...) -> (k, N / k, ...): chunk c is rows ``[c m, (c + 1) m)`` of each of the
    ``num_shards`` consecutive shards of N / num_shards rows (m = N / (num_shards k))."""
    n = x.shape[0]
    if n % (num_shards * num_chunks):
        raise ValueError(
            f"chunk_rows: {n} rows do not split into {num_chunks} chunks of each of "
            f"{num_shards} shards; use a multiple of {num_shards * num_chunks}."
        )
    m = n // (num_shards * num_chunks)
    rest = x.shape[1:]
    x = x.reshape((num_shards, num_chunks, m, *rest))
    return jnp.swapaxes(x, 0, 1).reshape((num_chunks, num_shards * m, *rest))


def unchunk_rows(x: Array, num_shards: int = 1) -> Array:
    """The inverse of :func:`chunk_rows`: (k, N / k, ...) -> (N, ...) in the original order."""
    k, n_chunk, *rest = x.shape
    m = n_chunk // num_shards
    x = x.reshape((k, num_shards, m, *rest))
    return jnp.swapaxes(x, 0, 1).reshape((k * n_chunk, *rest))


def contrastive_gradients(
    params: Any,
    batch_stats: Any,
    views: Array,
    *,
    model: nn.Module,
    loss_fn: Callable[..., Any],
    num_chunks: int,
    sharding: NamedSharding | None = None,
) -> tuple[tuple[Array, dict[str, Array]], dict[str, Array], Any, Any]:
    """Loss, embeddings, parameter gradients and BatchNorm statistics by gradient caching.

    Args:
      params, batch_stats: the model's variables.
      views: (2B, H, W, C) interleaved views (rows 2i and 2i + 1 are the views of image i),
        sharded by ``sharding`` (or unsharded: ``None``).
      model: a ``models.ContrastiveModel``.
      loss_fn: ``loss_fn(z1, z2, return_aux=True) -> (loss, aux)`` on (B, P) projections.
      num_chunks: k >= 1; every shard's 2B / D rows must split into k chunks of whole pairs
        (B divisible by D k). k = 1 is the plain one-pass gradient, BatchNorm over the whole
        batch.
      sharding: the batch sharding of ``views`` (its leading axis over the mesh).

    Returns:
      ``((loss, aux), outputs, grads, new_batch_stats)``: ``outputs`` holds the (2B, F)
      ``features`` and (2B, P) ``projections`` in the order of ``views``; ``grads`` the
      gradient of the global-batch loss with respect to ``params``.
    """
    n = views.shape[0]
    shards = _num_shards(sharding)
    if num_chunks < 1 or n % (2 * shards * num_chunks):
        raise ValueError(
            f"contrastive_gradients: {n // 2} images on {shards} devices do not split into "
            f"num_chunks = {num_chunks} chunks of whole pairs per device; use a batch that is "
            f"a multiple of {shards * max(num_chunks, 1)}."
        )
    if num_chunks == 1:
        # One pass: BatchNorm over the whole batch, activations kept for the backward pass.
        def objective(p: Any) -> tuple[Array, Any]:
            out, mutated = model.apply(
                {"params": p, "batch_stats": batch_stats},
                views,
                train=True,
                mutable=["batch_stats"],
            )
            z = out["projections"].reshape((n // 2, 2, -1))
            loss, aux = loss_fn(z[:, 0], z[:, 1], return_aux=True)
            return loss, (aux, out, mutated["batch_stats"])

        (loss, (aux, outputs, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
            params
        )
        return (loss, aux), outputs, grads, new_stats

    chunk_sharding = _chunk_sharding(sharding)
    chunks = _constrain(chunk_rows(views, num_chunks, shards), chunk_sharding)

    def embed(p: Any, x: Array) -> tuple[dict[str, Array], Any]:
        out, mutated = model.apply(
            {"params": p, "batch_stats": batch_stats},
            _constrain(x, sharding),
            train=True,
            mutable=["batch_stats"],
        )
        return out, mutated["batch_stats"]

    # Pass 1: embeddings only; nothing is differentiated, so no activation outlives its chunk.
    frozen = jax.lax.stop_gradient(params)
    outputs, stats = jax.lax.map(lambda x: embed(frozen, x), chunks)
    new_batch_stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)
    outputs = {k: _constrain(unchunk_rows(v, shards), sharding) for k, v in outputs.items()}

    # The global loss and its cotangent with respect to the (2B, P) projections.
    def global_loss(z: Array) -> tuple[Array, dict[str, Array]]:
        pairs = z.reshape((n // 2, 2, -1))
        return loss_fn(pairs[:, 0], pairs[:, 1], return_aux=True)

    (loss, aux), dz = jax.value_and_grad(global_loss, has_aux=True)(outputs["projections"])
    dz_chunks = _constrain(chunk_rows(dz, num_chunks, shards), chunk_sharding)

    # Pass 2: each chunk's forward again under vjp, pulled back with its cotangent.
    def backward(acc: Any, chunk: tuple[Array, Array]) -> tuple[Any, None]:
        x, dz_c = chunk
        _, pullback = jax.vjp(lambda p: embed(p, x)[0]["projections"], params)
        (g,) = pullback(_constrain(dz_c, sharding))
        return jax.tree.map(jnp.add, acc, g), None

    grads, _ = jax.lax.scan(backward, jax.tree.map(jnp.zeros_like, params), (chunks, dz_chunks))
    return (loss, aux), outputs, grads, new_batch_stats
