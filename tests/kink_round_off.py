"""Measures the two bounds of tests/kinks.py: how far other float32 computations of a test
network's ReLU inputs stray from float64, against the eager float32 evaluation the guard uses.

    python tests/kink_round_off.py [SEED ...]

For the train-step networks of tests/train_worker.py (``tiny_config`` and the 16-filter
``step_config``) at each seed, before each of two steps from initialisation, it takes every
ReLU/max/min input in float64, eagerly in float32 (the guard's round-off estimate), and in
three compiled float32 computations: jitted over 8 and 4 simulated devices (BatchNorm's sums
split across them) and on 1 device at XLA's -O0. It prints, over all of them, the largest error
where the float64 distance to the kink is below 1e-5 (what ``MARGIN`` must exceed) and the
largest ratio of a compiled computation's error to the eager round-off within 1e4 round-offs of
a kink (what ``SAFETY`` must exceed).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import numpy as np  # noqa: E402

import tests.conftest  # noqa: E402, F401  (8 simulated devices, before JAX starts)
from dhel_jax import parallel, train  # noqa: E402
from tests import train_worker  # noqa: E402
from tests.kinks import float32_and_float64_gaps, kink_gaps, model_apply_pair  # noqa: E402


def _compiled_gaps(apply32, variables, views, devices, **jit_kwargs):
    x = jax.device_put(views, parallel.batch_sharding(parallel.data_mesh(devices)))
    gaps = jax.jit(lambda v, x: [g.diff for g in kink_gaps(apply32, v, x)[0]], **jit_kwargs)
    return [np.asarray(d) for d in gaps(variables, x)]


def measure(config) -> tuple[float, float]:
    setup = train_worker.build_training(jax.devices()[:1], config)
    state = setup.init()
    apply32, apply64 = model_apply_pair(setup.model, train=True, mutable=["batch_stats"])
    worst_abs, worst_ratio = 0.0, 0.0
    for _ in range(2):
        params, batch_stats = jax.device_get((state.params, state.batch_stats))
        variables = {"params": params, "batch_stats": batch_stats}
        views = train_worker.step_views(state, train_worker.fixed_batch(), config)
        pairs = float32_and_float64_gaps(apply32, apply64, variables, views)
        others = [
            _compiled_gaps(apply32, variables, views, jax.devices()),
            _compiled_gaps(apply32, variables, views, jax.devices()[:4]),
            _compiled_gaps(
                apply32,
                variables,
                views,
                jax.devices()[:1],
                compiler_options={"xla_backend_optimization_level": 0},
            ),
        ]
        for k, (_, d32, d64) in enumerate(pairs):
            distance = np.abs(d64)
            round_off = np.maximum(np.abs(d32 - d64), np.spacing(distance.astype(np.float32)))
            tie = (d64 == 0) & (d32 == 0)
            close, near = (distance < 1e-5) & ~tie, (distance < 1e4 * round_off) & ~tie
            for other in others:
                error = np.abs(other[k] - d64)
                if close.any():
                    worst_abs = max(worst_abs, float(error[close].max()))
                if near.any():
                    worst_ratio = max(worst_ratio, float((error[near] / round_off[near]).max()))
        state, _ = setup.train_step(
            state, train.global_batch(train_worker.fixed_batch(), setup.batch_sharding)
        )
    return worst_abs, worst_ratio


def main(seeds: list[int]) -> None:
    for name in ("tiny_config", "step_config"):
        for seed in seeds:
            config = getattr(train_worker, name)()
            config.seed = seed
            worst_abs, worst_ratio = measure(config)
            print(
                f"{name} seed {seed}: largest compiled error where the distance < 1e-5: "
                f"{worst_abs:.3g}; largest compiled/eager round-off ratio near kinks: "
                f"{worst_ratio:.3g}",
                flush=True,
            )


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [0, 1])
