"""The pretraining setup, input pipeline and evaluation of benchmarks/accelerator_check.py.

Built from dhel_jax's config-free modules (``step``, ``models``, ``augment``, ``losses``,
``optimizers``, ``parallel``, ``probes``, ``baselines``) with no config objects, TFDS or grain,
so that they run on an accelerator host that has only jax, flax, optax, numpy and scipy:

* :func:`make_setup`, :func:`init_state`, :func:`compile_step`: ``dhel-train``'s own step
  (``dhel_jax.step.train_step``: two on-device views, encoder + head, DHEL, optimiser update,
  online linear probe) with configs/cifar10.py's choices, compiled for a mesh;
* :func:`host_batches`: shuffled uint8 batches (and labels) from an in-memory array;
* :func:`read_idx`, :func:`load_fashion_mnist`: Fashion-MNIST from its four IDX ``.gz`` files;
* :func:`extract`, :func:`probe_scores`: frozen features and dhel-eval's default probes.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """The keyword arguments of ``dhel_jax.step.train_step``, and the shapes of its state."""

    model: Any
    tx: Any
    probe_tx: Any
    loss_fn: Callable[..., Any]
    learning_rate_fn: Callable[[Any], Any]
    view_kwargs: dict[str, Any]
    view_shape: tuple[int, int, int]
    num_classes: int


def make_setup(
    model_name: str,
    dtype: str,
    *,
    batch_size: int,
    total_steps: int,
    channels: int,
    view_size: int,
    view_kwargs: dict[str, Any],
    num_classes: int = 10,
) -> StepSetup:
    """ResNet (CIFAR stem, 512-512-128 head), LARS at SimCLR's CIFAR rate with 10% warm-up,
    DHEL (tau = 0.3), the online probe (AdamW, lr 1e-3): configs/cifar10.py's choices, built
    without ml_collections."""
    from dhel_jax import losses, models, optimizers

    model = models.get_model(model_name, stem="cifar", dtype=dtype)
    schedule = optimizers.lr_schedule(
        base_lr=1.0,
        batch_size=batch_size,
        total_steps=total_steps,
        warmup_steps=max(1, total_steps // 10),
    )
    tx = optimizers.make_optimizer("lars", learning_rate=schedule, weight_decay=1e-6)
    probe_tx = optimizers.make_optimizer("adamw", learning_rate=1e-3, weight_decay=0.0)
    return StepSetup(
        model=model,
        tx=tx,
        probe_tx=probe_tx,
        loss_fn=losses.get_loss("dhel"),
        learning_rate_fn=schedule,
        view_kwargs=dict(view_kwargs, out_size=view_size),
        view_shape=(view_size, view_size, channels),
        num_classes=num_classes,
    )


def init_state(setup: StepSetup, seed: int, mesh: Any, options: Any = None) -> Any:
    """``dhel_jax.step.create_train_state`` from ``key(seed)``, as ``dhel-train`` draws it,
    replicated on ``mesh`` (built under ``jit``: eager initialisation is much slower)."""
    from dhel_jax import parallel, step

    def init():
        return step.create_train_state(
            jax.random.key(seed),
            model=setup.model,
            tx=setup.tx,
            probe_tx=setup.probe_tx,
            image_shape=setup.view_shape,
            num_classes=setup.num_classes,
        )

    return jax.jit(init, out_shardings=parallel.replicated(mesh), compiler_options=options)()


def compile_step(setup: StepSetup, mesh: Any, state: Any, batch: Any, options: Any) -> Any:
    """``dhel_jax.step.make_train_step`` over ``mesh``, compiled for ``state`` and ``batch``
    (``{"image", "label"}``): ``(state, batch) -> (state, metrics)``, the state donated."""
    from dhel_jax import step

    jitted = step.make_train_step(
        mesh,
        model=setup.model,
        tx=setup.tx,
        loss_fn=setup.loss_fn,
        learning_rate_fn=setup.learning_rate_fn,
        view_kwargs=setup.view_kwargs,
        probe_tx=setup.probe_tx,
        compiler_options=options,
    )
    return jitted.lower(state, batch).compile()


def host_batches(
    images: np.ndarray, labels: np.ndarray, batch: int, seed: int
) -> Iterator[dict[str, np.ndarray]]:
    """Endless shuffled epochs of ``{"image": uint8 (batch, H, W, C), "label": int32 (batch,)}``
    (the last partial batch of each epoch dropped): the host side of this check's input
    pipeline."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(images))
        for start in range(0, len(order) - batch + 1, batch):
            index = np.sort(order[start : start + batch])
            yield {"image": images[index], "label": labels[index]}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST format: big-endian magic, dims, then the data), gzipped."""
    with gzip.open(path, "rb") as fh:
        payload = fh.read()
    zero, kind, ndim = struct.unpack(">HBB", payload[:4])
    if zero != 0 or kind != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {payload[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", payload[4 : 4 + 4 * ndim])
    data = np.frombuffer(payload, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise ValueError(f"{path}: {data.size} values for shape {shape}")
    return data.reshape(shape)


def load_fashion_mnist(directory: Path) -> dict[str, np.ndarray]:
    """``{"train_images": uint8 (60000, 28, 28, 1), "train_labels": int32, "test_...": ...}``.

    Raises:
      FileNotFoundError: naming the files missing from ``directory``.
    """
    missing = [f for f in IDX_FILES.values() if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found in {directory} (missing {', '.join(missing)})"
        )
    out = {key: read_idx(directory / name) for key, name in IDX_FILES.items()}
    for split in ("train", "test"):
        out[f"{split}_images"] = out[f"{split}_images"][..., None]
        out[f"{split}_labels"] = out[f"{split}_labels"].astype(np.int32)
    return out


@functools.partial(jax.jit, static_argnames=("model", "transform"))
def _features(variables: Any, images: jax.Array, *, model: Any, transform: tuple) -> jax.Array:
    from dhel_jax import augment

    x = augment.eval_transform(images, **dict(transform))
    return model.apply(variables, x, train=False)["features"]


def extract(
    model: Any, variables: Any, images: np.ndarray, *, transform: dict, batch: int, mesh: Any
) -> np.ndarray:
    """Frozen encoder features (BatchNorm in inference mode) under the evaluation transform,
    each batch sharded over ``mesh`` (the last batch padded)."""
    from dhel_jax import parallel

    devices = mesh.devices.size
    batch = -(-min(batch, len(images)) // devices) * devices
    shard = parallel.batch_sharding(mesh)
    variables = jax.device_put(variables, parallel.replicated(mesh))
    static = {"model": model, "transform": tuple(sorted(transform.items()))}
    outputs = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        pad = batch - len(x)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        outputs.append(_features(variables, jax.device_put(x, shard), **static))
    return np.concatenate(jax.device_get(outputs))[: len(images)]


def probe_scores(train_f, train_y, test_f, test_y) -> dict[str, float]:
    """dhel-eval's CPU-default protocols: the ``fast`` linear probe and kNN (k 200, T 0.1)."""
    from dhel_jax import probes

    arrays = [jnp.asarray(a) for a in (train_f, train_y, test_f, test_y)]
    linear = probes.linear_probe_accuracy(*arrays, num_classes=10, seed=0)
    knn = probes.knn_accuracy(*arrays, num_classes=10, k=200, temperature=0.1, chunk_size=512)
    return {"linear": float(linear["accuracy"]), "knn": float(knn), "l2": linear.get("l2")}
