"""Frozen features of an image source, extracted batch by batch over a ``('data',)`` mesh.

:func:`extract_features` encodes every image under the evaluation transform and
:func:`extract_view_features` two augmented views of each (for ``alignment``); both shard each
batch over the mesh, pad the last one and read the source a few batches ahead, so that host
memory holds the outputs and a few batches (``docs/evaluation_memory.md``). Used by
:func:`dhel_jax.evaluate.evaluate` and its baselines.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dhel_jax import augment, data, parallel
from dhel_jax._validation import check_int

Array = jax.Array

OUTPUTS = ("features", "projections")


@functools.partial(jax.jit, static_argnames=("model", "transform"))
def _eval_outputs(
    variables: Any,
    images: Array,
    sizes: Array | None,
    index: Array,
    *,
    model: Any,
    transform: tuple,
) -> dict[str, Array]:
    del index
    x = augment.eval_transform(images, sizes=sizes, **dict(transform))
    return model.apply(variables, x, train=False)


@functools.partial(jax.jit, static_argnames=("model", "view_kwargs", "seed"))
def _view_outputs(
    variables: Any,
    images: Array,
    sizes: Array | None,
    index: Array,
    *,
    model: Any,
    view_kwargs: tuple,
    seed: int,
) -> dict[str, Array]:
    kwargs = dict(view_kwargs)
    base = jax.random.key(seed)
    # One key pair per example, from its index in the split: the views do not depend on the
    # batch size, the padding or the number of devices.
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(base, i)))(index)

    if sizes is None:

        def one_view(image: Array, key: Array) -> Array:
            return augment.augment(image[None], key, **kwargs)[0]

        v1 = jax.vmap(one_view)(images, keys[:, 0])
        v2 = jax.vmap(one_view)(images, keys[:, 1])
    else:

        def one_view_in(image: Array, size: Array, key: Array) -> Array:
            return augment.augment(image[None], key, sizes=size[None], **kwargs)[0]

        v1 = jax.vmap(one_view_in)(images, sizes, keys[:, 0])
        v2 = jax.vmap(one_view_in)(images, sizes, keys[:, 1])
    # Interleaved (rows 2i, 2i + 1: the views of image i), so every row stays on the device of
    # its image: no cross-device traffic (a concatenation would move half the rows).
    b = images.shape[0]
    views = jnp.stack([v1, v2], axis=1).reshape((2 * b, *v1.shape[1:]))
    out = model.apply(variables, views, train=False)
    return {
        f"{name}_{v + 1}": out[name].reshape((b, 2, -1))[:, v] for name in OUTPUTS for v in (0, 1)
    }


def default_mesh(mesh: Mesh | None) -> Mesh:
    """``mesh``, or a ``('data',)`` mesh of every local device when it is None."""
    return parallel.data_mesh(jax.local_devices()) if mesh is None else mesh


def _map_batches(
    fn: Callable[[Any, Array, Array | None, Array], dict[str, Array]],
    variables: Any,
    source: Any,
    *,
    batch_size: int,
    mesh: Mesh,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``fn(variables, images[batch], sizes[batch], indices[batch])`` over the whole source,
    batch-sharded (``sizes``: the batch's ``'size'``, None when the source has none).

    The batch is rounded up to a multiple of the devices of ``mesh``; the last batch is padded
    with zero images (full canvas sizes, index 0) and the padding dropped from the outputs.
    Batches are read from ``source`` in order, a few ahead (``data.iter_batches``), and every
    output is copied into one preallocated host array: host memory is the outputs plus a few
    batches.

    Returns:
      ``(outputs, labels)``: the outputs of every image, and the labels ``source`` read.
    """
    n = len(source)
    devices = mesh.devices.size
    batch = -(-min(batch_size, n) // devices) * devices
    shard = parallel.batch_sharding(mesh)
    variables = jax.device_put(variables, parallel.replicated(mesh))
    starts = range(0, n, batch)
    reads = data.iter_batches(source, (np.arange(s, min(s + batch, n)) for s in starts))
    labels = np.empty((n,), np.int32)
    host: dict[str, np.ndarray] = {}
    in_flight: list[tuple[int, dict[str, Array]]] = []

    def fetch(start: int, out: Mapping[str, Array]) -> None:
        out = jax.device_get(out)
        for key, value in out.items():
            if key not in host:
                host[key] = np.empty((n, *value.shape[1:]), value.dtype)
            rows = min(batch, n - start)
            host[key][start : start + rows] = value[:rows]

    for start, (_, read) in zip(starts, reads, strict=True):
        x, sizes = read["image"], read.get("size")
        labels[start : start + len(x)] = read["label"]
        index = np.arange(start, start + len(x), dtype=np.int32)
        if len(x) < batch:
            pad = batch - len(x)
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            index = np.concatenate([index, np.zeros(pad, np.int32)])
            if sizes is not None:
                sizes = np.concatenate(
                    [sizes, np.tile(np.asarray(x.shape[1:3], np.int32), (pad, 1))]
                )
        if sizes is not None:
            sizes = jax.device_put(sizes, shard)
        # Dispatch is asynchronous: the next batch is read while this one runs; outputs are
        # fetched two batches behind so that the device never waits for the host.
        in_flight.append(
            (start, fn(variables, jax.device_put(x, shard), sizes, jax.device_put(index, shard)))
        )
        if len(in_flight) > 2:
            fetch(*in_flight.pop(0))
    for pending in in_flight:
        fetch(*pending)
    return host, labels


def extract_features(
    model: Any,
    variables: Mapping[str, Any],
    images: Any,
    *,
    batch_size: int = 1024,
    mesh: Mesh | None = None,
    transform_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Frozen features and projections of ``images`` under the evaluation transform.

    ``model.apply(variables, eval_transform(x, **transform_kwargs), train=False)`` (BatchNorm
    statistics from ``variables``), jitted with each batch sharded over the ``'data'`` axis of
    ``mesh`` (default: every local device).

    Args:
      model: a ``models.ContrastiveModel`` (``builders.build_model(config)``).
      variables: ``{"params": ..., "batch_stats": ...}``.
      images: uint8 (N, H, W, C), or an image source (``data.open_split``) read batch by
        batch in order: host memory then holds the features and a few batches, not the images.
      batch_size: images per step, rounded up to a multiple of the device count.
      transform_kwargs: keyword arguments of ``augment.eval_transform``
        (``builders.eval_transform_kwargs(config)``).

    Returns:
      ``{"features": (N, F), "projections": (N, P)}`` float32 NumPy arrays.
    """
    return extract_with_labels(
        model,
        variables,
        images,
        batch_size=batch_size,
        mesh=mesh,
        transform_kwargs=transform_kwargs,
        fn="extract_features",
    )[0]


def extract_with_labels(
    model: Any,
    variables: Mapping[str, Any],
    images: Any,
    *,
    batch_size: int,
    mesh: Mesh | None,
    transform_kwargs: Mapping[str, Any] | None,
    fn: str = "extract_features",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """:func:`extract_features` and the labels read with the images."""
    source = data.as_source(images, fn)
    check_int(batch_size, "batch_size", fn=fn)
    transform = tuple(sorted((transform_kwargs or {}).items()))
    apply = functools.partial(_eval_outputs, model=model, transform=transform)
    return _map_batches(apply, variables, source, batch_size=batch_size, mesh=default_mesh(mesh))


def extract_view_features(
    model: Any,
    variables: Mapping[str, Any],
    images: Any,
    *,
    augment_kwargs: Mapping[str, Any],
    seed: int = 0,
    batch_size: int = 1024,
    mesh: Mesh | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Features and projections of two augmented views of every image (for ``alignment``).

    Example i's views are ``augment.augment(images[i:i+1], k, **augment_kwargs)`` for the two
    keys ``k`` of ``jax.random.split(jax.random.fold_in(jax.random.key(seed), i))``, so they
    depend on neither the batch size nor the devices. Model as in :func:`extract_features`.

    Returns:
      ``(view1, view2)``, each ``{"features": (N, F), "projections": (N, P)}``.
    """
    fn = "extract_view_features"
    source = data.as_source(images, fn)
    check_int(batch_size, "batch_size", fn=fn)
    kwargs = tuple(sorted(dict(augment_kwargs).items()))
    apply = functools.partial(_view_outputs, model=model, view_kwargs=kwargs, seed=int(seed))
    out, _ = _map_batches(apply, variables, source, batch_size=batch_size, mesh=default_mesh(mesh))
    return tuple({name: out[f"{name}_{v}"] for name in OUTPUTS} for v in (1, 2))  # type: ignore[return-value]
