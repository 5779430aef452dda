"""Device meshes and global-batch evaluation of the losses.

Two ways to evaluate a loss on a batch sharded over many devices
(docs/scaling.md):

* ``jax.jit`` on arrays with a ``NamedSharding`` over a ``('data',)`` mesh:
  call the loss as if on one device; XLA partitions it and inserts the
  collectives (what ``dhel_jax.train`` does).
* ``sharded_loss(loss_fn, mesh)``: an explicit ``jax.shard_map`` in which
  each device computes only its (M_local x M_global) block against the
  all-gathered embeddings, via the losses' ``axis_name`` argument.

``prefetch_to_device`` places host batches on the mesh ahead of the step that reads them.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis_name,))


def batch_sharding(mesh: Mesh, axis_name: str = DATA_AXIS) -> NamedSharding:
    """Leading (batch) axis split over ``axis_name``; other axes replicated."""
    return NamedSharding(mesh, P(axis_name))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def check_divisible(
    global_batch: int, mesh: Mesh, axis_name: str = DATA_AXIS, *, what: str = "batch"
) -> None:
    """Raises a clear ``ValueError`` unless ``global_batch`` splits evenly over the axis."""
    n = mesh.shape[axis_name]
    if global_batch % n:
        raise ValueError(
            f"the global {what} size {global_batch} does not split evenly over the {n} devices of mesh "
            f"axis {axis_name!r}; use a multiple of {n} (e.g. {(global_batch // n + 1) * n})."
        )


def sharded_loss(
    loss_fn: Callable[..., Any], mesh: Mesh, *, axis_name: str = DATA_AXIS, **hparams: Any
) -> Callable[[jax.Array, jax.Array], Any]:
    """Wraps ``loss_fn(z1, z2, axis_name=..., **hparams)`` in ``jax.shard_map``.

    The returned function takes global (M, d) arrays (sharded over
    ``axis_name``, or placed there on the fly) and returns the loss of the
    global batch, replicated, with the gradient of the global loss. Each device
    computes its (M/n x M) similarity block only.

    Raises:
      ValueError: M is not a multiple of the number of devices on the axis.
    """
    sharding = batch_sharding(mesh, axis_name)
    inner = jax.shard_map(
        lambda z1, z2: loss_fn(z1, z2, axis_name=axis_name, **hparams),
        mesh=mesh,
        in_specs=(P(axis_name), P(axis_name)),
        out_specs=P(),
    )

    def global_loss(z1: jax.Array, z2: jax.Array) -> Any:
        check_divisible(z1.shape[0], mesh, axis_name)
        return inner(
            jax.lax.with_sharding_constraint(z1, sharding),
            jax.lax.with_sharding_constraint(z2, sharding),
        )

    return global_loss


def prefetch_to_device(
    batches: Iterable[Mapping[str, np.ndarray]], sharding: NamedSharding, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Yields each host batch as global arrays placed by ``sharding``, transferred ahead.

    Each batch is this process's part of the global batch
    (``jax.make_array_from_process_local_data``). Up to ``size`` batches are on the devices at
    once: with ``size = 2`` (double buffering) the transfer of batch k + 1 is issued before
    batch k is handed out, so it overlaps step k instead of following it. The source iterator is
    read ``size - 1`` batches ahead of the consumer: a checkpoint of its state taken in between
    would skip those batches.

    Raises:
      ValueError: ``size`` is not an integer >= 1.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"prefetch_to_device: size must be an integer >= 1; got {size!r}.")
    queue: collections.deque[dict[str, jax.Array]] = collections.deque()
    for batch in batches:
        queue.append(
            {
                k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
                for k, v in batch.items()
            }
        )
        if len(queue) == size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
