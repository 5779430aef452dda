"""The paper's linear probe: a linear layer trained by SGD on a frozen encoder's features of
randomly cropped and flipped train images (the ``paper`` protocol of ``dhel-eval``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from dhel_jax import augment, builders, data, parallel
from dhel_jax._validation import check_int, check_number

Array = jax.Array


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
    mesh = _probe_mesh(mesh)
    _check_arguments(fn, n, mesh, epochs, batch_size, learning_rate, momentum, weight_decay)
    train_labels = _checked_labels(fn, "train_labels", train_labels, num_classes)
    test_labels = _checked_labels(fn, "test_labels", test_labels, num_classes)

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
    params = {
        "kernel": jnp.zeros((num_features, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }
    params, opt_state = jax.device_put((params, tx.init(params)), replicated)
    variables = jax.device_put(variables, replicated)
    # Sources of images in canvases (ImageNet-100) give each image's size; the crop is then
    # drawn in the image. Others pass a placeholder, unused.
    has_sizes = "size" in source.read(np.zeros(1, np.int64))
    step = _sgd_step(apply_fn, tx, view_kwargs, seed=seed, has_sizes=has_sizes, mesh=mesh)
    params, loss_sum, acc_sum = _train(
        step,
        (params, opt_state, variables),
        source,
        train_labels,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        mesh=mesh,
        progress=progress,
    )
    w, b = jax.device_get((params["kernel"], params["bias"]))
    predictions = np.argmax(np.asarray(test_features, np.float32) @ w + b, axis=-1)
    return {
        "accuracy": float(np.mean(predictions == test_labels)),
        "train_accuracy": float(acc_sum) / steps_per_epoch,
        "train_loss": float(loss_sum) / steps_per_epoch,
        "steps": float(total_steps),
    }


def _check_arguments(
    fn: str,
    n: int,
    mesh: Mesh,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float,
    weight_decay: float,
) -> None:
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


def _checked_labels(fn: str, name: str, labels: Any, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels, np.int32)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{fn}: {name} must lie in [0, {num_classes}).")
    return labels


def _probe_mesh(mesh: Mesh | None) -> Mesh:
    """``mesh``, or by default every local accelerator (one device on CPUs)."""
    if mesh is not None:
        return mesh
    devices = jax.local_devices()
    if devices[0].platform == "cpu":
        # XLA:CPU runs the gradient all-reduce between host devices on its shared intra-op
        # thread pool; with more devices than idle cores the rendezvous can starve and abort.
        # One CPU device already uses every core.
        devices = devices[:1]
    return parallel.data_mesh(devices)


def _sgd_step(
    apply_fn: Callable[[Any, Array], Array],
    tx: optax.GradientTransformation,
    view_kwargs: Mapping[str, Any],
    *,
    seed: int,
    has_sizes: bool,
    mesh: Mesh,
) -> Callable[..., Any]:
    """The jitted probe step ``(params, opt_state, variables, images, sizes, labels,
    step_index) -> (params, opt_state, loss, accuracy)``: one view of each image, the frozen
    features, one SGD step of the linear layer; the batch sharded over ``mesh``."""
    base_key = jax.random.key(seed)

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

    replicated = parallel.replicated(mesh)
    shard = parallel.batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(replicated, replicated, replicated, shard, shard, shard, None),
        out_shardings=(replicated, replicated, replicated, replicated),
        donate_argnums=(0, 1),
    )


def _train(
    step: Callable[..., Any],
    state: tuple[Any, Any, Any],
    source: Any,
    train_labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    mesh: Mesh,
    progress: bool,
) -> tuple[Any, Array, Array]:
    """Runs ``epochs`` epochs of ``step`` from ``state = (params, opt_state, variables)``:
    a fresh permutation of the images each epoch, the last incomplete batch dropped.

    Returns:
      ``(params, loss_sum, acc_sum)``, the sums over the last epoch's steps.
    """
    params, opt_state, variables = state
    n = len(source)
    steps_per_epoch = n // batch_size
    shard = parallel.batch_sharding(mesh)
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
            params, opt_state, loss, acc = step(
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
    return params, loss_sum, acc_sum
