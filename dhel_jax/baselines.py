"""Reference points for a pretrained encoder, scored with the evaluation's own probes.

``dhel-eval --baselines`` (:func:`dhel_jax.evaluate.evaluate` with ``baselines=True``) puts two
numbers beside the pretrained encoder's linear-probe and kNN accuracies, so that a reader sees
what pretraining added:

* ``random_init``: the same encoder at the run's own initialisation (the parameters
  ``dhel-train`` starts from for ``config.seed``), with its BatchNorm statistics re-estimated on
  training images (:func:`precise_batch_stats`). A randomly initialised ResNet is already a fair
  feature extractor; what contrastive pretraining adds is the difference.
* ``pixels``: the raw pixel intensities ``x / 255`` of the evaluation images at the dataset's
  native resolution, flattened (:func:`pixel_features`). Datasets whose flattened images exceed
  ``max_pixel_features`` values (STL-10, ImageNet-100) are first resized (bilinear,
  antialiased) to the largest square that fits, and the size used is recorded.

Both go through exactly the probes of the main evaluation (the ``fast`` linear probe, the kNN
monitor) with the same settings.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dhel_jax import augment, models, parallel, sources

Array = jax.Array

#: Flattened pixel vectors longer than this are downsampled (the probe's standardisation forms
#: an F x F covariance, and kNN holds the train features in memory).
MAX_PIXEL_FEATURES = 4096


def _with_bn_momentum(model: models.ContrastiveModel, momentum: float) -> Any:
    return model.clone(
        encoder=model.encoder.clone(bn_momentum=momentum),
        head=model.head.clone(bn_momentum=momentum),
    )


@functools.partial(jax.jit, static_argnames=("model", "transform"))
def _batch_moments(
    variables: Any, images: Array, sizes: Array | None, *, model: Any, transform: tuple
) -> Any:
    """Per BatchNorm layer, the batch mean and mean square of its input (train mode)."""
    x = augment.eval_transform(images, sizes=sizes, **dict(transform))
    # With momentum 0 the updated running averages are this batch's mean and (biased) variance.
    _, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return jax.tree.map(
        lambda stats: {"mean": stats["mean"], "square": stats["var"] + stats["mean"] ** 2},
        mutated["batch_stats"],
        is_leaf=lambda node: isinstance(node, Mapping) and set(node) == {"mean", "var"},
    )


def precise_batch_stats(
    model: models.ContrastiveModel,
    variables: Mapping[str, Any],
    images: Any,
    *,
    transform_kwargs: Mapping[str, Any],
    batch_size: int = 1024,
    mesh: Mesh | None = None,
) -> Any:
    """BatchNorm statistics of ``model`` over ``images``, as "precise BN" estimates them.

    Every batch runs in training mode (each BatchNorm normalises with its batch's statistics,
    as during pretraining); the population mean and variance of each layer's input are then
    pooled over the batches: ``mean = E_b[mean_b]``, ``var = E_b[var_b + mean_b^2] - mean^2``
    (Wu & Johnson, 2021). Only whole batches are used: ``floor(N / batch) * batch`` images.

    Args:
      model: the encoder + head (its ``bn_momentum`` does not matter).
      variables: ``{"params": ..., "batch_stats": ...}``; the statistics are replaced.
      images: uint8 (N, H, W, C) training images, or an image source (``data.open_split``)
        read batch by batch.
      transform_kwargs: ``augment.eval_transform`` keywords (the evaluation's inputs).
      batch_size: images per batch, at most N, rounded down to a multiple of the devices.
      mesh: ``('data',)`` mesh to shard each batch over (default: every local device).

    Returns:
      ``(batch_stats, num_images)``: a tree of the structure of ``variables["batch_stats"]``,
      and the number of images it was estimated on.
    """
    source = sources.as_source(images, "precise_batch_stats")
    mesh = parallel.data_mesh(jax.local_devices()) if mesh is None else mesh
    devices = mesh.devices.size
    n = len(source)
    batch = (min(batch_size, n) // devices) * devices
    if batch < 2:
        raise ValueError(
            f"precise_batch_stats: needs at least 2 images per batch over {devices} devices; "
            f"got {n} images and batch_size = {batch_size}."
        )
    probe_model = _with_bn_momentum(model, 0.0)
    transform = tuple(sorted(dict(transform_kwargs).items()))
    shard = parallel.batch_sharding(mesh)
    variables = jax.device_put(dict(variables), parallel.replicated(mesh))
    total = None
    num_batches = n // batch
    starts = range(0, num_batches * batch, batch)
    for _, read in sources.iter_batches(source, (np.arange(s, s + batch) for s in starts)):
        moments = _batch_moments(
            variables,
            jax.device_put(read["image"], shard),
            None if "size" not in read else jax.device_put(read["size"], shard),
            model=probe_model,
            transform=transform,
        )
        if total is not None:
            # At most one batch in flight: the host never queues (and holds) more images.
            jax.block_until_ready(total)
        total = moments if total is None else jax.tree.map(jnp.add, total, moments)
    pooled = jax.tree.map(lambda v: np.asarray(v, np.float64) / num_batches, total)
    stats = jax.tree.map(
        lambda m: {
            "mean": m["mean"].astype(np.float32),
            "var": np.maximum(m["square"] - m["mean"] ** 2, 0.0).astype(np.float32),
        },
        pooled,
        is_leaf=lambda node: isinstance(node, Mapping) and set(node) == {"mean", "square"},
    )
    return stats, num_batches * batch


def random_init_variables(
    model: models.ContrastiveModel,
    seed: int,
    images: Any,
    *,
    view_shape: Sequence[int],
    transform_kwargs: Mapping[str, Any],
    batch_size: int = 1024,
    num_examples: int = 10_240,
    mesh: Mesh | None = None,
) -> tuple[dict[str, Any], int]:
    """The run's initial parameters with BatchNorm statistics re-estimated on ``images``.

    The parameters are those ``dhel-train`` initialises for ``config.seed = seed`` (the first
    half of ``jax.random.split(jax.random.key(seed))``); the statistics come from
    :func:`precise_batch_stats` over the first ``num_examples`` of a fixed permutation (seeded
    by ``seed``) of ``images``.

    Returns:
      ``({"params": ..., "batch_stats": ...}, number of images the statistics came from)``.
    """
    init_key, _ = jax.random.split(jax.random.key(seed))
    variables = models.init_variables(model, init_key, view_shape)
    source = sources.as_source(images, "random_init_variables")
    order = np.random.default_rng(seed).permutation(len(source))[:num_examples]
    stats, used = precise_batch_stats(
        model,
        variables,
        sources.SubsetSource(source, np.sort(order)),
        transform_kwargs=transform_kwargs,
        batch_size=batch_size,
        mesh=mesh,
    )
    return {"params": variables["params"], "batch_stats": flax.core.unfreeze(stats)}, used


def pixel_size(image_shape: Sequence[int], max_features: int = MAX_PIXEL_FEATURES) -> int:
    """Side of the square images whose flattened pixels :func:`pixel_features` returns: the
    native side when ``H * W * C <= max_features``, else the largest side that fits."""
    height, width, channels = image_shape
    if height * width * channels <= max_features:
        return height if height == width else max(height, width)
    return max(1, math.isqrt(max_features // channels))


def pixel_features(
    images: Any, *, max_features: int = MAX_PIXEL_FEATURES, batch_size: int = 4096
) -> np.ndarray:
    """Raw pixels ``x / 255`` flattened to (N, H * W * C) float32, at native resolution when
    that is at most ``max_features`` values per image, else resized (bilinear, antialiased)
    to the square of :func:`pixel_size`. ``images``: uint8 (N, H, W, C), or an image source
    (``data.open_split``) read ``batch_size`` images at a time. Images stored in canvases
    (batches with ``'size'``: ImageNet-100) give the centre square of their shorter side,
    resized to that square."""
    if not hasattr(images, "read") and getattr(images, "ndim", None) != 4:
        raise ValueError(
            f"pixel_features: images must be uint8 (N, H, W, C); got shape "
            f"{getattr(images, 'shape', None)}."
        )
    source = sources.as_source(images, "pixel_features")
    n = len(source)
    height, width, channels = source.image_shape
    side = pixel_size((height, width, channels), max_features)
    native = height * width * channels <= max_features
    if native and isinstance(source, sources.ArraySource) and source.sizes is None:
        return (np.asarray(source.images, np.float32) / 255.0).reshape(n, -1)
    resize = jax.jit(
        lambda x: jax.image.resize(
            x.astype(jnp.float32) / 255.0,
            (x.shape[0], side, side, channels),
            "linear",
            antialias=True,
        )
    )
    out: np.ndarray | None = None
    starts = range(0, n, batch_size)
    batches = (np.arange(s, min(s + batch_size, n)) for s in starts)
    for start, (_, read) in zip(starts, sources.iter_batches(source, batches), strict=True):
        x = read["image"]
        chunk: Any
        if "size" in read:
            chunk = augment.eval_transform(
                jnp.asarray(x), sizes=jnp.asarray(read["size"]), out_size=side
            )
        elif native:
            chunk = np.asarray(x, np.float32) / 255.0
        else:
            chunk = resize(jnp.asarray(x))
        chunk = np.asarray(chunk).reshape(len(x), -1)
        if out is None:
            out = np.empty((n, chunk.shape[1]), np.float32)
        out[start : start + len(chunk)] = chunk
    assert out is not None  # n >= 1
    return out
