"""Subprocess side of the bounded-memory test of tests/test_evaluate.py.

    python eval_memory_worker.py N OUT_JSON

runs on synthetic splits of 192x192x3 uint8 images what ``dhel-eval`` runs on its train split:
``features.extract_features``, one epoch of ``paper_probe.paper_linear_probe`` and the kNN monitor
on the features. Each image is generated from its index when it is read, so no copy of a split
exists unless the evaluation makes one. The runs, one after the other in this process:

* ``warmup``: N, then 2N images, streamed. This compiles every program of both sizes (the kNN
  monitor's depends on the number of images), so that no measured run includes a compilation
  (a first run at 2N peaked about 20 MiB higher than the later ones, near the test's bound);
* ``stream_n`` and ``stream_2n``: N and 2N images, streamed from the source, alternated for
  ``ROUNDS`` rounds. The test compares their medians: on a shared machine the difference of
  single runs ranged from -24 to +30 MiB (allocator and thread timing), against a 27 MiB bound;
* ``materialise_2n``: 2N images first read into one array (what ``data.load_split`` did): the
  control that the measurement sees images that are held.

Each run's figure is its peak resident memory above the resident memory before it (RSS read
from ``/proc/self/statm`` every 2 ms by a thread); a run that holds or leaks images shows them
in its own figure. OUT_JSON gets ``{run: [bytes of each run], ..., "image_bytes_n": N * 192 *
192 * 3}``.
"""

from __future__ import annotations

import json
import os
import sys
import threading

SIDE, CHANNELS, CLASSES = 192, 3, 4
# Small batches: N images are many batches, so that the bounded read-ahead and dispatch queues
# reach their full depth in every run (a run of a few batches would understate the base).
BATCH = 32
ROUNDS = 3


class GeneratedSource:
    """An image source (``data.ArraySource``'s protocol) computing image i from i on read."""

    image_shape = (SIDE, SIDE, CHANNELS)

    def __init__(self, n: int):
        import numpy as np

        self._n = n
        self._base = (np.arange(SIDE * SIDE * CHANNELS) % 251).astype(np.uint8)
        self._base = self._base.reshape(self.image_shape)

    def __len__(self) -> int:
        return self._n

    def read(self, indices):
        import numpy as np

        indices = np.asarray(indices, np.int64)
        images = np.empty((len(indices), *self.image_shape), np.uint8)
        images[:] = self._base
        images += (indices % 256).astype(np.uint8)[:, None, None, None]  # wraps around
        return {"image": images, "label": (indices % CLASSES).astype(np.int32)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Context manager: ``self.growth`` = peak RSS inside the block minus RSS before it."""

    def __enter__(self) -> PeakRss:
        self._before = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.growth = self._peak - self._before


def main(n: int, out: str) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dhel_jax import data, paper_probe, probes
    from dhel_jax.features import extract_features

    class TinyEncoder(nn.Module):
        """Per-channel mean and mean square -> 8 features -> 4 projections."""

        @nn.compact
        def __call__(self, x, train: bool = False):
            del train
            pooled = jnp.concatenate([x.mean(axis=(1, 2)), (x * x).mean(axis=(1, 2))], axis=-1)
            features = nn.Dense(8)(pooled)
            return {"features": features, "projections": nn.Dense(4)(features)}

    model = TinyEncoder()
    variables = model.init(jax.random.key(0), jnp.zeros((1, SIDE, SIDE, CHANNELS)))

    def evaluate_split(source) -> None:
        size = len(source)
        features = extract_features(model, variables, source, batch_size=BATCH)
        labels = np.arange(size, dtype=np.int32) % CLASSES
        paper_probe.paper_linear_probe(
            lambda v, x: model.apply(v, x)["features"],
            variables,
            source,
            labels,
            features["features"][:64],
            labels[:64],
            num_classes=CLASSES,
            view_kwargs={
                "out_size": 8,
                "jitter_strength": 0.0,
                "jitter_prob": 0.0,
                "grayscale_prob": 0.0,
            },
            epochs=1,
            batch_size=BATCH,
        )
        probes.knn_accuracy(
            jnp.asarray(features["features"]),
            jnp.asarray(labels),
            jnp.asarray(features["features"][:64]),
            jnp.asarray(labels[:64]),
            num_classes=CLASSES,
            k=10,
            chunk_size=64,
        )

    def materialised(size: int):
        everything = GeneratedSource(size).read(np.arange(size))
        return data.ArraySource(everything["image"], everything["label"])

    runs = [("warmup", lambda: GeneratedSource(n)), ("warmup", lambda: GeneratedSource(2 * n))]
    for _ in range(ROUNDS):
        runs.append(("stream_n", lambda: GeneratedSource(n)))
        runs.append(("stream_2n", lambda: GeneratedSource(2 * n)))
    runs.append(("materialise_2n", lambda: materialised(2 * n)))
    growth: dict[str, list[int] | int] = {}
    for name, make in runs:
        with PeakRss() as peak:
            evaluate_split(make())
        growth.setdefault(name, []).append(peak.growth)
    growth["image_bytes_n"] = n * SIDE * SIDE * CHANNELS
    with open(out, "w") as f:
        json.dump(growth, f)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(int(sys.argv[1]), sys.argv[2])
