"""Throughput of the input side: on-device SimCLR augmentation and the host grain pipeline.

Measures, on the default JAX device and this host:

* ``augment``: images per second through ``two_views`` (two augmented views each) for a batch of
  512 at 32x32x3 (SimCLR's CIFAR recipe) and 28x28x1 (Fashion-MNIST);
* ``train``: images per second of a contrastive training step at the same batch size (forward and
  backward of the encoder + projection head on both views, DHEL loss, SGD update), the figure
  the augmentation must exceed by 5x so that it never limits training (needs
  ``dhel_jax.models``; ResNet-18 with the CIFAR stem for 32x32x3, ``resnet_small`` for 28x28x1);
* ``load_split``: seconds to decode Fashion-MNIST's train and test splits whole into memory
  (``data.load_split``, what ``dhel-eval`` and the in-memory loader do), and the decoder TFDS
  used (OpenCV when installed, else PIL);
* ``host``: images per second yielded by ``make_pretrain_loader`` for the real Fashion-MNIST
  (in memory, and streamed with PNG decoding per batch) and for TFDS-mocked CIFAR-10.

Usage::

    python benchmarks/bench_data.py [--data_dir DIR] [--skip_train] [--out benchmarks/out]

Fashion-MNIST is prepared into ``--data_dir`` (default: a temporary directory) from Debian's files.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dhel_jax import augment, data

BATCH = 512
CASES = {  # name: (image shape, two_views kwargs, model for the training-step reference)
    "32x32x3": ((32, 32, 3), dict(crop_scale=(0.08, 1.0), jitter_strength=0.5), "resnet18"),
    "28x28x1": ((28, 28, 1), dict(crop_scale=(0.2, 1.0), jitter_strength=0.5), "resnet_small"),
}


def _rate(fn: Callable[[], object], items: int, repeats: int, warmup: int = 1) -> float:
    """Median items per second of ``fn`` (which must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return items / statistics.median(times)


def bench_augment(shape: tuple[int, ...], kwargs: dict, repeats: int) -> float:
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (BATCH, *shape)), jnp.uint8)
    keys = iter(jax.random.split(jax.random.key(0), repeats + 1))

    def run():
        jax.block_until_ready(augment.two_views(images, next(keys), **kwargs))

    return _rate(run, BATCH, repeats)


def bench_train_step(shape: tuple[int, ...], model_name: str, repeats: int) -> float | None:
    try:
        import optax

        from dhel_jax import losses, models
    except ImportError as e:  # dhel_jax.models arrives with the models issue
        print(f"  (training-step reference skipped: {e})")
        return None
    model = models.get_model(model_name, stem="cifar")
    views = jnp.zeros((2 * BATCH, *shape), jnp.float32)
    variables = model.init(jax.random.key(0), views, train=True)
    tx = optax.sgd(0.1, momentum=0.9)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    @jax.jit
    def step(state, views):
        params, batch_stats, opt_state = state

        def loss_fn(params):
            out, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                views,
                train=True,
                mutable=["batch_stats"],
            )
            z1, z2 = jnp.split(out["projections"], 2)
            return losses.dhel(z1, z2, tau=0.3), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    def run():
        nonlocal state
        state, loss = step(state, views)
        jax.block_until_ready(loss)

    return _rate(run, BATCH, repeats)


def bench_host(loader, batches: int) -> float:
    it = iter(loader)
    next(it)  # start-up (threads, first reads)
    start = time.perf_counter()
    images = 0
    for _ in range(batches):
        images += next(it)["image"].shape[0]
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=None, help="TFDS dir for Fashion-MNIST")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--train_repeats", type=int, default=3)
    parser.add_argument("--host_batches", type=int, default=100)
    parser.add_argument("--skip_train", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args()

    results: dict[str, object] = {
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "batch": BATCH,
    }
    print(f"device: {results['device']}  host: {results['host']}  batch: {BATCH}")

    for name, (shape, kwargs, model_name) in CASES.items():
        aug = bench_augment(shape, kwargs, args.repeats)
        line = f"two_views {name}: {aug:,.0f} images/s ({2 * aug:,.0f} views/s)"
        results[f"augment_{name}"] = aug
        if not args.skip_train:
            train = bench_train_step(shape, model_name, args.train_repeats)
            if train is not None:
                results[f"train_{name}_{model_name}"] = train
                line += (
                    f"; train step ({model_name}): {train:,.0f} images/s, ratio {aug / train:.1f}x"
                )
        print(line, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or tmp
        decoder = "OpenCV" if importlib.util.find_spec("cv2") else "PIL"
        for split in ("train", "test"):
            start = time.perf_counter()
            images, _ = data.load_split("fashion_mnist", split, data_dir=data_dir)
            seconds = time.perf_counter() - start
            key = f"load_split_fashion_mnist_{split}"
            results[key] = {"images": len(images), "seconds": seconds, "decoder": decoder}
            print(f"{key}: {len(images):,} images in {seconds:.1f} s ({decoder})", flush=True)
        for in_memory in (True, False):
            loader = data.make_pretrain_loader(
                "fashion_mnist",
                global_batch_size=BATCH,
                seed=0,
                data_dir=data_dir,
                in_memory=in_memory,
            )
            key = f"host_fashion_mnist_{'in_memory' if in_memory else 'streamed'}"
            results[key] = bench_host(loader, args.host_batches)
            print(f"{key}: {results[key]:,.0f} images/s", flush=True)

    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=50000):
        loader = data.make_pretrain_loader("cifar10", global_batch_size=BATCH, seed=0)
        key = "host_cifar10_mocked_in_memory"
        results[key] = bench_host(loader, args.host_batches)
        print(f"{key}: {results[key]:,.0f} images/s", flush=True)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_data.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
