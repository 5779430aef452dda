"""Memory and time of the gradient-cached train step (``config.embedding_chunks``), and the cost
of the online geometry (``config.geometry_every_steps``).

Usage (from the repository root, with the project importable)::

    PYTHONPATH=. python benchmarks/bench_grad_cache.py memory [--models cpu_default,resnet18_cifar]
        [--batches 256,1024,4096] [--chunks 1,2,4,8,16]
    PYTHONPATH=. python benchmarks/bench_grad_cache.py time [--models cpu_default]
        [--batches 256] [--chunks 1,2,4] [--rounds 4] [--steps-per-round 2]
    PYTHONPATH=. python benchmarks/bench_grad_cache.py geometry [--models cpu_default]
        [--batches 256] [--rounds 4] [--steps-per-round 2]

Models: ``cpu_default`` is ``configs/fashion_mnist.py`` (ResNet-8 widths 96-192-384 on 10x10
views), ``resnet18_cifar`` is ``configs/cifar10.py`` (ResNet-18, CIFAR stem, 32x32 views); both
with their own loss (DHEL), optimiser (LARS) and online probe, on one XLA:CPU device with the
flags of ``dhel-train`` (``dhel_jax.cpu``).

* ``memory``: compiles (does not run) the jitted train step for every batch B and chunk count
  k (B divisible by k) and records ``memory_analysis()``: temporaries, arguments, outputs.
* ``time``: compiles the step for each k at one batch, then times ``--rounds`` rounds of
  ``--steps-per-round`` steps of every k in rotating order (so that the load of a shared
  machine hits all alike); median step time and its ratio to k = 1.
* ``geometry``: the same rotation over three steps: geometry off (``geometry_every_steps =
  0``), not due (the default interval, on a step that is not a multiple of it) and due (every
  step). The cost at interval N is ``((due - off) + (N - 1) (not_due - off)) / (N off)``.

Results are merged into ``--out`` (default ``benchmarks/out/bench_grad_cache.json``) under
``memory`` / ``time`` / ``geometry``, each entry with the CPU model and the load average; a
table goes to stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = {"cpu_default": "fashion_mnist", "resnet18_cifar": "cifar10"}
GIB = 2**30


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": os.getloadavg()}


def make_config(model: str, batch: int, chunks: int, geometry_every_steps: int):
    name = CONFIG_FILES[model]
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.batch_size = batch
    config.embedding_chunks = chunks
    config.geometry_every_steps = geometry_every_steps
    return config


def build(model: str, batch: int, chunks: int, geometry_every_steps: int = 0):
    """(training setup, abstract state, abstract batch) of one step on one device."""
    import jax
    import jax.numpy as jnp

    from dhel_jax import data, parallel, train, train_config

    config = make_config(model, batch, chunks, geometry_every_steps)
    train_config.validate_config(config, device_count=1, process_count=1)
    mesh = parallel.data_mesh(jax.devices()[:1])
    counts = train.StepCounts(
        num_examples=100 * batch, steps_per_epoch=100, total_steps=1000, warmup_steps=10
    )
    setup = train.make_training(config, mesh, counts)
    shape = data.get_dataset_info(config.dataset).image_shape
    abstract_batch = {
        "image": jax.ShapeDtypeStruct((batch, *shape), jnp.uint8, sharding=setup.batch_sharding),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=setup.batch_sharding),
    }
    return setup, setup.abstract_state(), abstract_batch, shape


def bench_memory(models, batches, chunks, out: Path) -> list[dict[str, Any]]:
    """Compiles every (model, batch, k); each row is saved to ``out`` as soon as it is done."""
    rows = []
    for model in models:
        for batch in batches:
            for k in chunks:
                if batch % k:
                    continue
                setup, state, batch_spec, _ = build(model, batch, k)
                start = time.perf_counter()
                compiled = setup.train_step.lower(state, batch_spec).compile()
                seconds = time.perf_counter() - start
                m = compiled.memory_analysis()
                row = {
                    "model": model,
                    "batch": batch,
                    "chunks": k,
                    "temp_bytes": int(m.temp_size_in_bytes),
                    "argument_bytes": int(m.argument_size_in_bytes),
                    "output_bytes": int(m.output_size_in_bytes),
                    "compile_s": round(seconds, 1),
                    **_machine(),
                }
                rows.append(row)
                save(out, "memory", [row])
                print(
                    f"{model:15s} B={batch:5d} k={k:3d}  temp {row['temp_bytes'] / GIB:8.3f} GiB"
                    f"  args {row['argument_bytes'] / GIB:6.3f} GiB  compile {seconds:6.1f} s"
                    f"  load {row['loadavg'][0]:.1f}",
                    flush=True,
                )
    return rows


def _rotate(steps: dict[str, Any], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Times every step function in ``steps`` in rotating order; seconds per step."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for _ in range(per_round):
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
    return times


def _runner(setup, shape, batch: int, steps_before: int = 0):
    """A ``step()`` closure over a fresh state and a fixed random uint8 batch."""
    import jax
    import numpy as np

    from dhel_jax import train

    rng = np.random.default_rng(0)
    host = {
        "image": rng.integers(0, 256, (batch, *shape), dtype=np.uint8),
        "label": rng.integers(0, 10, batch).astype(np.int32),
    }
    batch_arrays = train.global_batch(host, setup.batch_sharding)
    state = setup.init()
    holder = {"state": state}

    def step():
        holder["state"], metrics = setup.train_step(holder["state"], batch_arrays)
        jax.block_until_ready(metrics)

    for _ in range(steps_before):
        step()
    return step, holder


def bench_time(models, batches, chunks, rounds, per_round) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        for batch in batches:
            steps = {}
            for k in chunks:
                if batch % k:
                    continue
                setup, _, _, shape = build(model, batch, k)
                steps[k], _ = _runner(setup, shape, batch, steps_before=1)  # compiles
            load_before = os.getloadavg()
            times = _rotate(steps, rounds, per_round)
            base = statistics.median(times[chunks[0]])
            for k, ts in times.items():
                row = {
                    "model": model,
                    "batch": batch,
                    "chunks": k,
                    "median_s": statistics.median(ts),
                    "best_s": min(ts),
                    "ratio_to_first": statistics.median(ts) / base,
                    "steps": len(ts),
                    "loadavg_before": load_before,
                    **_machine(),
                }
                rows.append(row)
                print(
                    f"{model:15s} B={batch:5d} k={k:3d}  median {row['median_s']:7.3f} s  best "
                    f"{row['best_s']:7.3f} s  x{row['ratio_to_first']:.2f}  load "
                    f"{row['loadavg'][0]:.1f}",
                    flush=True,
                )
    return rows


def bench_geometry(models, batches, rounds, per_round) -> list[dict[str, Any]]:
    from dhel_jax import train_config

    interval = train_config.default_config().geometry_every_steps
    rows = []
    for model in models:
        for batch in batches:
            steps = {}
            for name, every in (("off", 0), ("not_due", interval), ("due", 1)):
                setup, _, _, shape = build(model, batch, 1, every)
                # "not_due" starts at step 1 of `interval`: its timed steps are never due.
                steps[name], _ = _runner(setup, shape, batch, steps_before=1)
            load_before = os.getloadavg()
            times = _rotate(steps, rounds, per_round)
            med = {n: statistics.median(t) for n, t in times.items()}
            best = {n: min(t) for n, t in times.items()}
            due_extra = med["due"] - med["off"]
            cost = (due_extra + (interval - 1) * (med["not_due"] - med["off"])) / (
                interval * med["off"]
            )
            row = {
                "model": model,
                "batch": batch,
                "interval": interval,
                "median_s": med,
                "best_s": best,
                "due_extra_s": due_extra,
                "cost_at_interval": cost,
                "due_cost_per_interval": due_extra / (interval * med["off"]),
                "steps": {n: len(t) for n, t in times.items()},
                "loadavg_before": load_before,
                **_machine(),
            }
            rows.append(row)
            print(
                f"{model:15s} B={batch:5d} off {med['off']:.3f} s  not due "
                f"{med['not_due']:.3f} s  due {med['due']:.3f} s  -> cost at interval {interval}: "
                f"{100 * cost:+.2f}% (due step alone: {100 * row['due_cost_per_interval']:.2f}%)"
                f"  load {row['loadavg'][0]:.1f}",
                flush=True,
            )
    return rows


def save(out: Path, mode: str, rows: list[dict[str, Any]]) -> None:
    """Appends ``rows`` to the ``mode`` list of the JSON file ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault(mode, []).extend(rows)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("memory", "time", "geometry"))
    parser.add_argument("--models", default=None)
    parser.add_argument("--batches", default=None)
    parser.add_argument("--chunks", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "bench_grad_cache.json"))
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from dhel_jax import cpu

    cpu.use_cpu_xla_flags()
    models = (args.models or "cpu_default").split(",")
    for m in models:
        if m not in CONFIG_FILES:
            parser.error(f"unknown model {m!r}; accepted: {', '.join(CONFIG_FILES)}")
    batches = [int(b) for b in (args.batches or "256").split(",")]
    chunks = [int(k) for k in args.chunks.split(",")]
    if args.mode == "memory":
        bench_memory(models, batches, chunks, Path(args.out))
        return
    if args.mode == "time":
        rows = bench_time(models, batches, chunks, args.rounds, args.steps_per_round)
    else:
        rows = bench_geometry(models, batches, args.rounds, args.steps_per_round)
    save(Path(args.out), args.mode, rows)


if __name__ == "__main__":
    main()
