"""Evaluation of a pretraining checkpoint: frozen features, probes, geometry, plots.

``dhel-eval --workdir runs/NAME [--step N] [--protocol fast|paper]`` (``dhel_jax.main``) calls
:func:`evaluate`, which

1. restores the run's config, parameters and BatchNorm statistics read-only
   (``checkpointing.restore_for_eval``; nothing under ``<workdir>/checkpoints`` is ever written);
2. extracts frozen encoder features f(x) and projections g(f(x)) of the dataset's train and test
   splits under the deterministic evaluation transform (``augment.eval_transform``: centre crop,
   resize to the training view size, the training normalisation), BatchNorm in inference mode,
   each batch sharded over a ``('data',)`` mesh of the local devices (:func:`extract_features`).
   The splits are image sources (``data.open_split``): small datasets are decoded into host
   memory once; the others (``in_memory=False``: STL-10, ImageNet-100) are read batch by batch,
   in order, a few batches ahead, for the extraction, the paper probe's epochs and the
   baselines alike, so that host memory holds their features, never their images
   (``docs/evaluation_memory.md``);
3. computes
   * the linear-probe top-1 test accuracy, protocol ``fast`` or ``paper`` (below);
   * the weighted kNN top-1 test accuracy on the features (``probes.knn_accuracy``: cosine
     similarity, k = 200 neighbours voting with weight exp(s / 0.1), InstDisc / SimCLR monitor;
     chunked, so the (N_test, N_train) similarity matrix never materialises);
   * the geometry (:func:`geometry`) of the test features and of the test projections (docs/spec.md
     Metrics): ``effective_rank`` and ``rank`` of all test rows; ``uniformity`` and
     ``wasserstein_uniformity`` over all pairs of the first ``geometry_examples`` (5000) test
     images; ``alignment`` between two augmented views (the run's training augmentation) of those
     same images, example i's views drawn from ``jax.random.split(fold_in(key(seed), i))``;
4. writes ``<out_dir>/eval.json`` (default ``out_dir``: the workdir) and three PNG plots under
   ``<out_dir>/plots/``: the singular-value spectrum, the pairwise-cosine histogram against the
   uniform-sphere density, and the training curves of ``<workdir>/metrics.jsonl``. Every file is
   written to a temporary name and renamed, so a reader never sees a partial file.

Linear-probe protocols (hyper-parameters recorded in ``eval.json``):

* ``fast`` (default): multinomial logistic regression on the precomputed (standardised) features,
  full-batch L-BFGS (``probes.fit_linear_probe``), the L2 penalty chosen among
  ``probes.DEFAULT_L2_GRID`` on a held-out 10% of the train split, then refit on the whole train
  split. A minute or less on a CPU for Fashion-MNIST.
* ``paper``: the paper's protocol (:func:`paper_linear_probe`): a linear layer on the frozen
  encoder, trained with SGD (momentum 0.9, learning rate 0.1 with cosine decay to 0, no weight
  decay, batch 256, 100 epochs) on features computed on the fly from randomly cropped
  (the run's ``crop_scale`` / ``crop_ratio``) and flipped train images, tested on the evaluation
  transform. 100 encoder passes over the train split, minutes on a CPU (benchmarks/README.md,
  "Evaluation"); opt-in.

The settings come from the run's ``config.eval`` (``protocol``, ``knn_k``, ``knn_temperature``,
and any other :class:`EvalSettings` field it holds), then from the caller's overrides.

``eval.json`` (NaN and infinities written as null; seconds in ``timings``)::

    workdir, step, protocol, created
    settings      EvalSettings: protocol, knn_k, knn_temperature, knn_chunk_size, batch_size,
                  geometry_examples, rank_tol, seed, fast_probe {l2_grid, val_fraction,
                  max_search_examples, max_steps, tol}, paper_probe {epochs, batch_size,
                  learning_rate, momentum, nesterov, weight_decay}
    run           dataset, model, loss {name, set hyper-parameters}, batch_size, seed
    dataset       name, train_split, test_split, num_classes, num_train, num_test, image_size
    dims          features (F), projections (P)
    linear_probe  protocol, accuracy (test top-1), train_accuracy, and for fast: val_accuracy,
                  l2, num_steps, grad_norm; for paper: train_loss, steps, view_kwargs
    knn           accuracy, k, temperature, on ("features")
    geometry      features / projections: {effective_rank, rank, alignment, uniformity,
                  wasserstein_uniformity}; pair_examples, alignment_examples, rank_examples,
                  alignment_seed
    plots         spectrum, cosine_histogram, training_curves: paths relative to out_dir
                  (null when not written)
    baselines     only with ``with_baselines`` (``dhel-eval --baselines``, :mod:`dhel_jax.baselines`):
                  random_init {linear_probe (the run's protocol), knn, bn_examples},
                  pixels {linear_probe (fast), knn, image_size, dim}
    timings       restore, load_data, extract_features, linear_probe, knn, [baselines,]
                  geometry, plots, total
    devices       platform, count;  versions: dhel_jax, jax, jaxlib, flax, optax, ...

Evaluation runs in one process, over its local devices.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib.metadata
import inspect
import io
import json
import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh

from dhel_jax import augment, baselines, builders, checkpointing, data, metrics, parallel, probes
from dhel_jax._io import write_atomic
from dhel_jax._validation import check_int, check_number

Array = jax.Array

EVAL_FILENAME = "eval.json"
PLOTS_SUBDIR = "plots"
PLOT_FILENAMES = {
    "spectrum": "spectrum.png",
    "cosine_histogram": "cosine_histogram.png",
    "training_curves": "training_curves.png",
}
PROTOCOLS = ("fast", "paper")
OUTPUTS = ("features", "projections")
GEOMETRY_KEYS = ("effective_rank", "rank", "alignment", "uniformity", "wasserstein_uniformity")


def _keyword_defaults(fn: Callable[..., Any], exclude: Sequence[str] = ()) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        and p.default is not inspect.Parameter.empty
        and name not in exclude
    }


# ----------------------------------------------------------------------------------------------
# Feature extraction.


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


def _mesh_or_default(mesh: Mesh | None) -> Mesh:
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
    return _extract(
        model,
        variables,
        images,
        batch_size=batch_size,
        mesh=mesh,
        transform_kwargs=transform_kwargs,
        fn="extract_features",
    )[0]


def _extract(
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
    return _map_batches(
        apply, variables, source, batch_size=batch_size, mesh=_mesh_or_default(mesh)
    )


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
    out, _ = _map_batches(
        apply, variables, source, batch_size=batch_size, mesh=_mesh_or_default(mesh)
    )
    return tuple({name: out[f"{name}_{v}"] for name in OUTPUTS} for v in (1, 2))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Geometry.

_effective_rank = jax.jit(metrics.effective_rank)
_rank = jax.jit(metrics.rank, static_argnames=("tol",))
_alignment = jax.jit(metrics.alignment)
_uniformity = jax.jit(metrics.uniformity, static_argnames=("block_size",))
_wasserstein = jax.jit(metrics.wasserstein_uniformity, static_argnames=("block_size",))
_pair_histogram = jax.jit(metrics.pair_cosine_histogram, static_argnames=("num_bins", "block_size"))


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


# ----------------------------------------------------------------------------------------------
# The paper's linear probe.


def crop_flip_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``augment.augment`` keywords of the paper probe's train views: the run's random resized
    crop and horizontal flip, no colour jitter, grayscale, blur or solarisation."""
    kwargs = builders.augment_kwargs(config)
    kwargs.update(
        jitter_strength=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0
    )
    return kwargs


def paper_linear_probe(
    apply_fn: Callable[[Any, Array], Array],
    variables: Any,
    train_images: Any,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    view_kwargs: Mapping[str, Any],
    epochs: int = 100,
    batch_size: int = 256,
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    seed: int = 0,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """A linear layer trained by SGD on a frozen encoder over augmented train images.

    Every step draws ``batch_size`` train images (a fresh permutation each epoch, the last
    incomplete batch dropped), makes one view of each with ``augment.augment(images,
    fold_in(key(seed), step), **view_kwargs)``, encodes it with the frozen
    ``apply_fn(variables, views) -> (B, F)`` and takes one SGD step (momentum, optional
    Nesterov; learning rate cosine-decayed from ``learning_rate`` to 0 over all steps; L2
    ``weight_decay`` on the weights, not the bias) on the mean softmax cross-entropy of
    ``features @ W + b`` (W, b zero-initialised). The batch is sharded over ``mesh``. The layer
    is then scored on ``test_features`` (the encoder's features of the evaluation-transformed
    test images).

    Args:
      apply_fn: jittable frozen encoder; gradients never flow into it.
      variables: its variables (passed to ``apply_fn`` as an argument, not baked into the
        program).
      train_images: uint8 (N, H, W, C), or an image source (``data.open_split``) whose
        batches are read a few steps ahead (host memory: a few batches, not the images);
        train_labels: (N,) integers in [0, num_classes).
      test_features: (N_test, F); test_labels: (N_test,).
      view_kwargs: ``augment.augment`` keywords (:func:`crop_flip_kwargs`).
      mesh: a ``('data',)`` mesh (default: every local accelerator; one device on CPUs).
      progress: show a progress bar over epochs.

    Returns:
      ``{"accuracy": test top-1, "train_accuracy": top-1 on the last epoch's views,
      "train_loss": last epoch's mean loss, "steps": number of SGD steps}``.
    """
    fn = "paper_linear_probe"
    source = data.as_source(train_images, fn)
    n = len(source)
    if mesh is None:
        devices = jax.local_devices()
        if devices[0].platform == "cpu":
            # XLA:CPU runs the gradient all-reduce between host devices on its shared intra-op
            # thread pool; with more devices than idle cores the rendezvous can starve and abort.
            # One CPU device already uses every core.
            devices = devices[:1]
        mesh = parallel.data_mesh(devices)
    check_int(epochs, "epochs", fn=fn)
    check_int(batch_size, "batch_size", fn=fn)
    if batch_size % mesh.devices.size or batch_size > n:
        raise ValueError(
            f"{fn}: batch_size = {batch_size} must be a multiple of the {mesh.devices.size} "
            f"devices and at most the {n} train images."
        )
    check_number(learning_rate, "learning_rate", fn=fn, strict=True)
    check_number(momentum, "momentum", fn=fn)
    check_number(weight_decay, "weight_decay", fn=fn)
    train_labels = np.asarray(train_labels, np.int32)
    test_labels = np.asarray(test_labels, np.int32)
    for name, labels in (("train_labels", train_labels), ("test_labels", test_labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{fn}: {name} must lie in [0, {num_classes}).")

    view_kwargs = dict(view_kwargs)
    steps_per_epoch = n // batch_size
    total_steps = epochs * steps_per_epoch
    schedule = optax.cosine_decay_schedule(learning_rate, total_steps)
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay, mask={"kernel": True, "bias": False}),
        optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov),
    )
    probe_shape = jax.eval_shape(
        lambda v, x: apply_fn(v, augment.augment(x, jax.random.key(0), **view_kwargs)),
        variables,
        jax.ShapeDtypeStruct((2, *source.image_shape), jnp.uint8),
    )
    num_features = probe_shape.shape[-1]
    replicated = parallel.replicated(mesh)
    shard = parallel.batch_sharding(mesh)
    params = {
        "kernel": jnp.zeros((num_features, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }
    params, opt_state = jax.device_put((params, tx.init(params)), replicated)
    variables = jax.device_put(variables, replicated)
    base_key = jax.random.key(seed)

    # Sources of images in canvases (ImageNet-100) give each image's size; the crop is then
    # drawn in the image. Others pass a placeholder, unused.
    has_sizes = "size" in source.read(np.zeros(1, np.int64))

    def step(params, opt_state, variables, images, sizes, labels, step_index):
        views = augment.augment(
            images,
            jax.random.fold_in(base_key, step_index),
            sizes=sizes if has_sizes else None,
            **view_kwargs,
        )
        features = jax.lax.stop_gradient(apply_fn(variables, views)).astype(jnp.float32)

        def loss_fn(p):
            logits = features @ p["kernel"] + p["bias"]
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    jitted = jax.jit(
        step,
        in_shardings=(replicated, replicated, replicated, shard, shard, shard, None),
        out_shardings=(replicated, replicated, replicated, replicated),
        donate_argnums=(0, 1),
    )
    rng = np.random.default_rng(seed)

    def index_batches() -> Iterator[np.ndarray]:
        for _ in range(epochs):
            order = rng.permutation(n)
            for s in range(steps_per_epoch):
                yield np.sort(order[s * batch_size : (s + 1) * batch_size])

    reads = data.iter_batches(source, index_batches())
    bar = None
    if progress:
        import tqdm

        bar = tqdm.tqdm(total=epochs, desc="paper probe", unit="epoch", dynamic_ncols=True)
    step_index = 0
    loss_sum = acc_sum = jnp.zeros((), jnp.float32)
    # Dispatch is asynchronous: unchecked, the host would queue every batch of the epoch (and
    # hold its images) while the device is busy. It stays at most two steps ahead.
    in_flight: collections.deque = collections.deque()
    for _ in range(epochs):
        loss_sum = acc_sum = jnp.zeros((), jnp.float32)
        for _ in range(steps_per_epoch):
            idx, read = next(reads)
            params, opt_state, loss, acc = jitted(
                params,
                opt_state,
                variables,
                jax.device_put(read["image"], shard),
                jax.device_put(read.get("size", np.zeros((len(idx), 2), np.int32)), shard),
                jax.device_put(train_labels[idx], shard),
                np.int32(step_index),
            )
            loss_sum, acc_sum = loss_sum + loss, acc_sum + acc
            step_index += 1
            in_flight.append(loss)
            if len(in_flight) > 2:
                in_flight.popleft().block_until_ready()
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {float(loss_sum) / steps_per_epoch:.4f}")
    reads.close()
    if bar is not None:
        bar.close()
    w, b = jax.device_get((params["kernel"], params["bias"]))
    predictions = np.argmax(np.asarray(test_features, np.float32) @ w + b, axis=-1)
    return {
        "accuracy": float(np.mean(predictions == test_labels)),
        "train_accuracy": float(acc_sum) / steps_per_epoch,
        "train_loss": float(loss_sum) / steps_per_epoch,
        "steps": float(total_steps),
    }


# ----------------------------------------------------------------------------------------------
# Settings.

FAST_PROBE_DEFAULTS: dict[str, Any] = _keyword_defaults(
    probes.fit_linear_probe, exclude=("num_classes", "seed")
)
PAPER_PROBE_DEFAULTS: dict[str, Any] = _keyword_defaults(
    paper_linear_probe, exclude=("num_classes", "view_kwargs", "mesh", "progress", "seed")
)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Every setting of an evaluation (recorded in ``eval.json``).

    Attributes:
      protocol: linear-probe protocol, ``"fast"`` or ``"paper"``.
      knn_k, knn_temperature, knn_chunk_size: ``probes.knn_accuracy`` arguments.
      batch_size: images per feature-extraction step (global, over the devices). On a 2-core
        CPU, 256 (128 per device) extracts faster than 1024 (``benchmarks/README.md``);
        on an accelerator a larger batch may pay.
      geometry_examples: the first this many test images give the pair metrics and alignment.
      rank_tol: ``metrics.rank`` tolerance.
      seed: seeds the alignment views, the fast probe's held-out split and the paper probe.
      fast_probe: ``probes.fit_linear_probe`` keywords (``FAST_PROBE_DEFAULTS`` updated).
      paper_probe: :func:`paper_linear_probe` keywords (``PAPER_PROBE_DEFAULTS`` updated).
    """

    protocol: str = "fast"
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_chunk_size: int = 512
    batch_size: int = 256
    geometry_examples: int = 5000
    rank_tol: float = 1e-5
    seed: int = 0
    fast_probe: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    paper_probe: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        fn = "EvalSettings"
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"{fn}: unknown protocol {self.protocol!r}; accepted values are "
                f"{', '.join(map(repr, PROTOCOLS))}."
            )
        for name in ("knn_k", "knn_chunk_size", "batch_size"):
            check_int(getattr(self, name), name, fn=fn)
        check_int(self.geometry_examples, "geometry_examples", fn=fn, minimum=2)
        check_int(self.seed, "seed", fn=fn, minimum=0)
        for name in ("knn_temperature", "rank_tol"):
            check_number(getattr(self, name), name, fn=fn, strict=True)
        for name, defaults in (
            ("fast_probe", FAST_PROBE_DEFAULTS),
            ("paper_probe", PAPER_PROBE_DEFAULTS),
        ):
            given = dict(getattr(self, name))
            unknown = sorted(set(given) - set(defaults))
            if unknown:
                raise ValueError(
                    f"{fn}: {name} has no setting {unknown[0]!r}; accepted: "
                    f"{', '.join(sorted(defaults))}."
                )
            object.__setattr__(self, name, {**defaults, **given})

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["fast_probe"] = _jsonable(dict(self.fast_probe))
        out["paper_probe"] = _jsonable(dict(self.paper_probe))
        return out


_SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(EvalSettings))


def settings_from_config(config: ml_collections.ConfigDict, **overrides: Any) -> EvalSettings:
    """The run's ``config.eval`` fields, then ``overrides`` (``None`` values are ignored).

    Raises:
      ValueError: an unknown override or an invalid value.
    """
    unknown = sorted(set(overrides) - set(_SETTING_FIELDS))
    if unknown:
        raise ValueError(
            f"evaluate: unknown setting {unknown[0]!r}; accepted settings are "
            f"{', '.join(_SETTING_FIELDS)}."
        )
    values: dict[str, Any] = {}
    eval_config = config.get("eval") or {}
    for key, value in dict(eval_config).items():
        if key in _SETTING_FIELDS:
            values[key] = value.to_dict() if hasattr(value, "to_dict") else value
        else:
            logging.warning("config.eval.%s is not an evaluation setting; ignored", key)
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("fast_probe", "paper_probe"):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value
    return EvalSettings(**values)


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend change).


def _save_figure(fig: Any, path: epath.Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_atomic(path, buffer.getvalue())


_SPECTRUM_FLOOR = 1e-8


def plot_spectrum(
    embeddings: Mapping[str, np.ndarray], effective_ranks: Mapping[str, float], path: epath.Path
) -> None:
    """Normalised singular values ``s_k / sum(s)`` of the L2-normalised rows (the ``p_k`` of
    ``effective_rank``), log scale; the axis stops at 1e-8."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for name, x in embeddings.items():
        u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        s = np.linalg.svd(u.astype(np.float64), compute_uv=False)
        ax.semilogy(
            np.arange(1, len(s) + 1),
            s / s.sum(),
            marker=".",
            label=f"{name} (d = {x.shape[1]}, effective rank {effective_ranks[name]:.1f})",
        )
    # Singular values at round-off level (exact zeros in theory) would stretch the axis.
    low, _ = ax.get_ylim()
    if low < _SPECTRUM_FLOOR:
        ax.set_ylim(bottom=_SPECTRUM_FLOOR)
    ax.set_xlabel("index k")
    ax.set_ylabel("s_k / sum(s)")
    ax.set_title("Singular-value spectrum of the test embeddings")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save_figure(fig, path)


def plot_cosine_histograms(
    embeddings: Mapping[str, np.ndarray],
    w1: Mapping[str, float],
    path: epath.Path,
    *,
    num_bins: int = 200,
) -> None:
    """Histogram (as a density) of the pairwise cosines of each embedding, against the density
    of the cosine of two uniform points on the sphere of the same dimension."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(embeddings), 4.0))
    axes = np.atleast_1d(fig.subplots(1, len(embeddings)))
    edges = np.linspace(-1.0, 1.0, num_bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    grid = np.linspace(-1.0, 1.0, 2001)
    for ax, (name, x) in zip(axes, embeddings.items(), strict=True):
        counts = np.asarray(_pair_histogram(x, num_bins=num_bins, block_size=512))
        density = counts / max(counts.sum(), 1) / np.diff(edges)
        ax.bar(centres, density, width=np.diff(edges), alpha=0.6, label=f"{name} pairs")
        d = x.shape[1]
        ax.plot(
            grid,
            metrics.sphere_cosine_density(grid, d),
            "k-",
            lw=1.2,
            label=f"uniform on S^{d - 1}",
        )
        ax.set_xlim(-1, 1)
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("density")
        ax.set_title(f"{name}: {len(x)} examples, W1 = {w1[name]:.4f}")
        ax.legend()
    _save_figure(fig, path)


def read_metrics_log(path: epath.Path) -> list[dict[str, float]]:
    """The records of a run's ``metrics.jsonl`` ([] when absent)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(
    records: Sequence[Mapping[str, float]], path: epath.Path, *, step: int | None = None
) -> None:
    """One panel per logged scalar against the training step: the loss, its aux terms, the
    online probe, then the optimiser and speed diagnostics; a dashed line marks ``step``."""
    from matplotlib.figure import Figure

    logged = {k for r in records for k in r} - {"step", "epoch"}
    last = ("probe_accuracy", "probe_loss", "learning_rate", "grad_norm", "images_per_sec")
    keys = [k for k in ("loss",) if k in logged]
    keys += sorted(logged - set(keys) - set(last)) + [k for k in last if k in logged]
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig = Figure(figsize=(3.6 * cols, 2.7 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, key in zip(axes, keys, strict=False):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points, strict=True), lw=1.2)
        if step is not None:
            ax.axvline(step, color="k", ls="--", lw=0.8)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    marked = "" if step is None else f"; dashed: evaluated step {step}"
    fig.suptitle(f"Training curves ({builders.METRICS_FILENAME}{marked})")
    fig.tight_layout()
    _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Orchestration.


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: tuples as lists, NumPy scalars as Python numbers, NaN/inf as null."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def _versions() -> dict[str, str]:
    import dhel_jax

    out = {"dhel_jax": dhel_jax.__version__}
    for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        logging.info("dhel-eval: %s ...", phase)
        yield
        self.seconds[phase] = round(time.perf_counter() - start, 3)


def _check_out_dir(out: epath.Path, workdir: epath.Path) -> None:
    ckpt = checkpointing.checkpoint_dir(workdir)
    resolved = os.path.realpath(os.fspath(out))
    if resolved == os.path.realpath(os.fspath(ckpt)) or resolved.startswith(
        os.path.realpath(os.fspath(ckpt)) + os.sep
    ):
        raise ValueError(
            f"evaluate: out_dir {os.fspath(out)!r} is inside the checkpoint directory {ckpt}; "
            "evaluation never writes there. Use the workdir or another directory."
        )


def _run_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
    loss = {k: v for k, v in config.loss.to_dict().items() if v is not None}
    return {
        "dataset": config.dataset,
        "model": config.model.name,
        "loss": loss,
        "batch_size": config.batch_size,
        "seed": config.seed,
    }


def _linear_probe(
    settings: EvalSettings,
    config: ml_collections.ConfigDict,
    model: Any,
    variables: Any,
    splits: Mapping[str, tuple[Any, np.ndarray]],
    features: Mapping[str, Mapping[str, np.ndarray]],
    *,
    num_classes: int,
    mesh: Mesh | None,
    progress: bool,
) -> dict[str, Any]:
    (train_x, train_y), (_, test_y) = splits["train"], splits["test"]
    if settings.protocol == "fast":
        return probes.linear_probe_accuracy(
            jnp.asarray(features["train"]["features"]),
            jnp.asarray(train_y),
            jnp.asarray(features["test"]["features"]),
            jnp.asarray(test_y),
            num_classes=num_classes,
            seed=settings.seed,
            **settings.fast_probe,
        )
    view_kwargs = crop_flip_kwargs(config)
    result: dict[str, Any] = paper_linear_probe(
        lambda v, x: model.apply(v, x, train=False)["features"],
        variables,
        train_x,
        train_y,
        features["test"]["features"],
        test_y,
        num_classes=num_classes,
        view_kwargs=view_kwargs,
        seed=settings.seed,
        mesh=mesh,
        progress=progress,
        **settings.paper_probe,
    )
    result["view_kwargs"] = view_kwargs
    return result


def _knn(
    settings: EvalSettings,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
) -> dict[str, Any]:
    accuracy = probes.knn_accuracy(
        jnp.asarray(train_features),
        jnp.asarray(train_labels),
        jnp.asarray(test_features),
        jnp.asarray(test_labels),
        num_classes=num_classes,
        k=settings.knn_k,
        temperature=settings.knn_temperature,
        chunk_size=settings.knn_chunk_size,
    )
    return {
        "accuracy": accuracy,
        "k": settings.knn_k,
        "temperature": settings.knn_temperature,
        "on": "features",
    }


def _baselines(
    settings: EvalSettings,
    config: ml_collections.ConfigDict,
    model: Any,
    splits: Mapping[str, tuple[Any, np.ndarray]],
    *,
    num_classes: int,
    mesh: Mesh,
    paper_mesh: Mesh | None,
    progress: bool,
) -> dict[str, Any]:
    """``eval.json["baselines"]``: the random-init encoder (the run's protocol) and the raw
    pixels (the ``fast`` probe), each ``{"linear_probe": ..., "knn": ...}``."""
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    transform = builders.eval_transform_kwargs(config)
    size = builders.view_size(config)
    variables, bn_examples = baselines.random_init_variables(
        model,
        config.seed,
        train_x,
        view_shape=(size, size, train_x.image_shape[-1]),
        transform_kwargs=transform,
        batch_size=settings.batch_size,
        mesh=mesh,
    )
    features = {
        key: extract_features(
            model,
            variables,
            images,
            batch_size=settings.batch_size,
            mesh=mesh,
            transform_kwargs=transform,
        )
        for key, (images, _) in splits.items()
    }
    random_init = {
        "linear_probe": {
            "protocol": settings.protocol,
            **_linear_probe(
                settings,
                config,
                model,
                variables,
                splits,
                features,
                num_classes=num_classes,
                mesh=paper_mesh,
                progress=progress,
            ),
        },
        "knn": _knn(
            settings,
            features["train"]["features"],
            train_y,
            features["test"]["features"],
            test_y,
            num_classes,
        ),
        "bn_examples": bn_examples,
    }
    del features
    pixels_train, pixels_test = baselines.pixel_features(train_x), baselines.pixel_features(test_x)
    pixels = {
        "linear_probe": {
            "protocol": "fast",
            **probes.linear_probe_accuracy(
                jnp.asarray(pixels_train),
                jnp.asarray(train_y),
                jnp.asarray(pixels_test),
                jnp.asarray(test_y),
                num_classes=num_classes,
                seed=settings.seed,
                **(settings.fast_probe if settings.protocol == "fast" else FAST_PROBE_DEFAULTS),
            ),
        },
        "knn": _knn(settings, pixels_train, train_y, pixels_test, test_y, num_classes),
        "image_size": baselines.pixel_size(train_x.image_shape),
        "dim": int(pixels_train.shape[1]),
    }
    return {"random_init": random_init, "pixels": pixels}


def _write_plots(
    out: epath.Path,
    workdir: epath.Path,
    step: int,
    test: Mapping[str, np.ndarray],
    geo: Mapping[str, Mapping[str, float]],
    num_pairs: int,
) -> dict[str, str | None]:
    """Writes the PNG plots; returns their paths relative to ``out`` (None: not written)."""
    paths = {k: out / PLOTS_SUBDIR / v for k, v in PLOT_FILENAMES.items()}
    plot_spectrum(
        {k: test[k] for k in OUTPUTS},
        {k: geo[k]["effective_rank"] for k in OUTPUTS},
        paths["spectrum"],
    )
    plot_cosine_histograms(
        {k: test[k][:num_pairs] for k in OUTPUTS},
        {k: geo[k]["wasserstein_uniformity"] for k in OUTPUTS},
        paths["cosine_histogram"],
    )
    written: dict[str, str | None] = {
        k: f"{PLOTS_SUBDIR}/{PLOT_FILENAMES[k]}" for k in ("spectrum", "cosine_histogram")
    }
    records = read_metrics_log(workdir / builders.METRICS_FILENAME)
    if records:
        plot_training_curves(records, paths["training_curves"], step=step)
        written["training_curves"] = f"{PLOTS_SUBDIR}/{PLOT_FILENAMES['training_curves']}"
    else:
        logging.warning("no %s in %s: no training curves", builders.METRICS_FILENAME, workdir)
        written["training_curves"] = None
    return written


def evaluate(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    protocol: str | None = None,
    out_dir: str | os.PathLike | None = None,
    data_dir: str | None = None,
    mesh: Mesh | None = None,
    plots: bool = True,
    progress: bool = False,
    with_baselines: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluates the checkpoint ``step`` (default: the latest) of a ``dhel-train`` run.

    See the module docstring for what is computed. Writes ``<out_dir>/eval.json`` and, with
    ``plots``, ``<out_dir>/plots/{spectrum,cosine_histogram,training_curves}.png``; nothing is
    written before the checkpoint has been read, and nothing ever under
    ``<workdir>/checkpoints``.

    Args:
      workdir: the run's ``--workdir``.
      step: checkpoint step (``None``: the latest).
      protocol: ``"fast"`` or ``"paper"`` (``None``: ``config.eval.protocol``).
      out_dir: where the outputs go (default: ``workdir``).
      data_dir: TFDS data directory (default: the run's ``config.data_dir``).
      mesh: a ``('data',)`` mesh to shard the batches over (default: the local devices).
      plots: write the PNG plots.
      progress: progress bar for the paper probe.
      with_baselines: also score the random-init encoder and the raw pixels with the same
        probes (:mod:`dhel_jax.baselines`; ``eval.json["baselines"]``).
      **overrides: :class:`EvalSettings` fields (``knn_k``, ``batch_size``,
        ``geometry_examples``, ``paper_probe={"epochs": 1}``, ...).

    Returns:
      The contents of ``eval.json`` (schema in the module docstring).

    Raises:
      checkpointing.CheckpointError: no such workdir or step, or an unreadable checkpoint
        (the message names the path and the available steps).
      ValueError: a bad setting, or ``out_dir`` inside the checkpoint directory.
    """
    timer = _Timer()
    start = time.perf_counter()
    run_dir = epath.Path(workdir)
    out = run_dir if out_dir is None else epath.Path(out_dir)
    _check_out_dir(out, run_dir)
    with timer("restore"):
        config, variables, step = checkpointing.restore_for_eval(run_dir, step)
    settings = settings_from_config(config, protocol=protocol, **overrides)
    info = data.get_dataset_info(config.dataset)
    data_dir = config.get("data_dir") if data_dir is None else data_dir
    paper_mesh, mesh = mesh, _mesh_or_default(mesh)

    # Small datasets are decoded into host memory once; the others (``in_memory=False``:
    # STL-10, ImageNet-100) are read batch by batch, so host memory holds their features only.
    sources: dict[str, Any] = {}
    names = {"train": info.train_split, "test": info.test_split}
    with timer("load_data"):
        for key, split in names.items():
            sources[key] = data.open_split(config.dataset, split, data_dir=data_dir)
    model = builders.build_model(config)
    num_pairs = min(settings.geometry_examples, len(sources["test"]))
    splits: dict[str, tuple[Any, np.ndarray]] = {}
    features: dict[str, dict[str, np.ndarray]] = {}
    with timer("extract_features"):
        transform = builders.eval_transform_kwargs(config)
        for key, source in sources.items():
            features[key], labels = _extract(
                model,
                variables,
                source,
                batch_size=settings.batch_size,
                mesh=mesh,
                transform_kwargs=transform,
            )
            if labels.min() < 0:
                raise ValueError(
                    f"evaluate: {config.dataset}'s {names[key]!r} split has unlabelled records; "
                    "the probes need labels."
                )
            splits[key] = (source, labels)
        (_, train_y), (_, test_y) = splits["train"], splits["test"]
        view1, view2 = extract_view_features(
            model,
            variables,
            data.SubsetSource(sources["test"], np.arange(num_pairs)),
            augment_kwargs=builders.augment_kwargs(config),
            seed=settings.seed,
            batch_size=settings.batch_size,
            mesh=mesh,
        )
    with timer("linear_probe"):
        probe = _linear_probe(
            settings,
            config,
            model,
            variables,
            splits,
            features,
            num_classes=info.num_classes,
            mesh=paper_mesh,
            progress=progress,
        )
    with timer("knn"):
        knn = _knn(
            settings,
            features["train"]["features"],
            train_y,
            features["test"]["features"],
            test_y,
            info.num_classes,
        )
    baseline_results = None
    if with_baselines:
        with timer("baselines"):
            baseline_results = _baselines(
                settings,
                config,
                model,
                splits,
                num_classes=info.num_classes,
                mesh=mesh,
                paper_mesh=paper_mesh,
                progress=progress,
            )
    test = features["test"]
    with timer("geometry"):
        geo = {}
        for name in OUTPUTS:
            geo[name] = geometry(
                test[name],
                (view1[name], view2[name]),
                pair_examples=num_pairs,
                rank_tol=settings.rank_tol,
            )
            del geo[name]["pair_examples"]
    plot_paths: dict[str, str | None] = dict.fromkeys(PLOT_FILENAMES)
    if plots:
        with timer("plots"):
            plot_paths = _write_plots(out, run_dir, step, test, geo, num_pairs)

    timings = dict(timer.seconds)
    timings["total"] = round(time.perf_counter() - start, 3)
    results: dict[str, Any] = {
        "workdir": os.fspath(run_dir),
        "step": int(step),
        "protocol": settings.protocol,
        "settings": settings.to_json(),
        "run": _run_summary(config),
        "dataset": {
            "name": config.dataset,
            "train_split": info.train_split,
            "test_split": info.test_split,
            "num_classes": info.num_classes,
            "num_train": len(train_y),
            "num_test": len(test_y),
            "image_size": builders.view_size(config),
        },
        "dims": {name: int(test[name].shape[1]) for name in OUTPUTS},
        "linear_probe": {"protocol": settings.protocol, **probe},
        "knn": knn,
        "geometry": {
            **geo,
            "pair_examples": num_pairs,
            "alignment_examples": num_pairs,
            "rank_examples": len(test_y),
            "alignment_seed": settings.seed,
        },
        "plots": plot_paths,
        "timings": timings,
        "devices": {"platform": mesh.devices.flat[0].platform, "count": int(mesh.devices.size)},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if baseline_results is not None:
        results["baselines"] = baseline_results
    results = _jsonable(results)
    payload = json.dumps(results, indent=2, allow_nan=False) + "\n"
    write_atomic(out / EVAL_FILENAME, payload.encode())
    return results


def _baseline_lines(results: Mapping[str, Any]) -> list[str]:
    """The baselines' accuracies and what the pretrained encoder gains over each."""
    found = results.get("baselines")
    if not found:
        return []
    ours = (results["linear_probe"]["accuracy"], results["knn"]["accuracy"])
    pixels = found["pixels"]
    side = pixels["image_size"]
    labels = {
        "random_init": "random-init encoder",
        "pixels": f"raw pixels ({side}x{side})",
    }
    lines = ["  baselines, same probes       linear      kNN    pretrained encoder gains"]
    for key, label in labels.items():
        lin, knn = found[key]["linear_probe"]["accuracy"], found[key]["knn"]["accuracy"]
        lines.append(
            f"    {label:<24}{100 * lin:7.2f}%  {100 * knn:6.2f}%    "
            f"{100 * (ours[0] - lin):+.2f} linear, {100 * (ours[1] - knn):+.2f} kNN"
        )
    return lines


def summary(results: Mapping[str, Any]) -> str:
    """A few lines for the terminal: probe and kNN accuracies, the geometry table, outputs."""
    probe, knn, geo = results["linear_probe"], results["knn"], results["geometry"]
    ds, run = results["dataset"], results["run"]
    if probe["protocol"] == "fast":
        detail = f"L-BFGS, l2 = {probe['l2']:g}, train {100 * probe['train_accuracy']:.2f}%"
    else:
        paper = results["settings"]["paper_probe"]
        detail = f"SGD {paper['epochs']} epochs, train {100 * probe['train_accuracy']:.2f}%"
    dims = results["dims"]
    rows = [
        ("effective rank", "effective_rank", "{:.2f}"),
        ("rank", "rank", "{:d}"),
        ("alignment", "alignment", "{:.4f}"),
        ("uniformity", "uniformity", "{:.4f}"),
        ("W1 uniformity", "wasserstein_uniformity", "{:.4f}"),
    ]
    heads = (f"features (F={dims['features']})", f"projections (P={dims['projections']})")
    lines = [
        f"dhel-eval {results['workdir']}  step {results['step']}  "
        f"({ds['name']}, {run['model']}, loss {run['loss'].get('name')}; "
        f"{ds['num_train']} train / {ds['num_test']} test images)",
        f"  linear probe ({probe['protocol']})   top-1 {100 * probe['accuracy']:6.2f}%   ({detail})",
        f"  kNN (k={knn['k']}, T={knn['temperature']:g})   top-1 {100 * knn['accuracy']:6.2f}%",
        *_baseline_lines(results),
        f"  geometry of the test set (pairs, alignment: first {geo['pair_examples']} images)",
        f"    {'':<16}{heads[0]:>20}{heads[1]:>24}",
    ]
    for label, key, fmt in rows:
        text = [
            "-" if geo[name].get(key) is None else fmt.format(geo[name][key]) for name in OUTPUTS
        ]
        lines.append(f"    {label:<16}{text[0]:>20}{text[1]:>24}")
    written = [EVAL_FILENAME] + [p for p in results["plots"].values() if p]
    lines.append(f"  wrote {', '.join(written)}  ({results['timings']['total']:.0f} s)")
    return "\n".join(lines)
