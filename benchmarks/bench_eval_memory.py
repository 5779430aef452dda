"""Host-memory parts of a ``dhel-eval`` of ImageNet-100, measured at a reduced scale.

Each part runs in a fresh process, and its figure is the peak resident memory (RSS, read from
``/proc/self/statm`` every 2 ms) above the RSS just before it:

* ``reads``: ``data.iter_batches`` (what the extraction and the paper probe read through) over
  a generated source of ImageNet-100 canvases (384x384x3 uint8), batches of 256: the host's
  read-ahead buffers, independent of the split's size.
* ``fast_probe``: ``probes.linear_probe_accuracy`` (the ``fast`` protocol) on random float32
  features, N x 2048 train (ResNet-50's F) and 5000 x 2048 test, 100 classes, for two N: the
  slope is the probe's bytes per train feature value. ``max_steps`` is cut to 3 (memory does
  not depend on the number of L-BFGS steps).
* ``knn``: ``probes.knn_accuracy`` (k = 200, chunks of 512 test rows) on the same features.
* ``baseline``: the RSS of a process that has imported dhel_jax.evaluate and run a trivial jit.

Usage::

    PYTHONPATH=. python benchmarks/bench_eval_memory.py [--n 6400,12800] [--out FILE.json]

docs/evaluation_memory.md combines the figures into the peak of a full ImageNet-100 evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEATURES, CLASSES, TEST = 2048, 100, 5000


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_growth(fn) -> int:
    before = peak = _rss()
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not stop.wait(0.002):
            peak = max(peak, _rss())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    return max(peak, _rss()) - before


def _child(part: str, n: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dhel_jax import data, probes

    jax.jit(lambda x: x + 1)(jnp.zeros(2)).block_until_ready()
    if part == "baseline":
        return {"rss_bytes": _rss()}
    if part == "reads":

        class Canvases:
            image_shape = (384, 384, 3)

            def __len__(self) -> int:
                return n

            def read(self, indices):
                images = np.empty((len(indices), *self.image_shape), np.uint8)
                images[:] = (np.asarray(indices) % 256).astype(np.uint8)[:, None, None, None]
                return {"image": images, "label": np.zeros(len(indices), np.int32)}

        batches = (np.arange(s, min(s + 256, n)) for s in range(0, n, 256))
        growth = _peak_growth(lambda: [None for _ in data.iter_batches(Canvases(), batches)])
        return {"growth_bytes": growth, "batch_bytes": 256 * 384 * 384 * 3}
    rng = np.random.default_rng(0)
    train_x = rng.standard_normal((n, FEATURES), np.float32)
    train_y = rng.integers(0, CLASSES, n).astype(np.int32)
    test_x = rng.standard_normal((TEST, FEATURES), np.float32)
    test_y = rng.integers(0, CLASSES, TEST).astype(np.int32)
    probe_settings = {
        "fast_probe": (probes.linear_probe_accuracy, {"max_steps": 3}),
        "knn": (probes.knn_accuracy, {"k": 200, "temperature": 0.1, "chunk_size": 512}),
    }
    if part not in probe_settings:
        raise SystemExit(f"unknown part {part!r}")
    probe, settings = probe_settings[part]

    def run() -> None:
        arrays = (train_x, train_y, test_x, test_y)
        probe(*map(jnp.asarray, arrays), num_classes=CLASSES, **settings)

    return {"growth_bytes": _peak_growth(run), "train_feature_bytes": train_x.nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="6400,12800", help="train feature rows (two values)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]))))
        return
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    # glibc returns freed large blocks only above its (otherwise adaptive) mmap threshold.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    results: dict = {"loadavg": open("/proc/loadavg").read().split()[:3]}
    runs = [("baseline", 0), ("reads", 4096)]
    runs += [(part, int(n)) for part in ("fast_probe", "knn") for n in args.n.split(",")]
    for part, n in runs:
        out = subprocess.run(
            [sys.executable, __file__, "--child", part, str(n)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[f"{part}_{n}"] = json.loads(out.strip().splitlines()[-1])
        print(part, n, results[f"{part}_{n}"], flush=True)
    results["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
