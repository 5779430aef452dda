"""Forward+backward time and memory of the dhel_jax losses, side by side with PyTorch eager.

Usage (from the repository root, with the project importable)::

    PYTHONPATH=. python benchmarks/bench_losses.py [--quick] [--out PATH]
        [--sections losses,wasserstein,tiled,memory] [--losses dhel,kcl] [--sizes 4096]

Sections:

* ``losses``: ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` for every
  loss of ``dhel_jax.losses.LOSSES`` at M in {256, 1024, 4096}, d = 128,
  float32, docs/spec.md default hyper-parameters, against the PyTorch eager
  baselines of ``torch_reference.py`` (forward + ``.backward()``): the dense
  formulation for every loss and, for dhel, kcl and align_uniform, the
  published one. Each baseline's loss is first checked to equal ours within
  1e-4 relative (and its gradients within 1e-3 of the largest entry), so the
  timings compare equivalent computations.
* ``wasserstein``: ``jax.jit(wasserstein_uniformity)`` at n in {1000, 2000, 5000},
  d = 128, against an eager sort-based PyTorch W1 (target: n = 2000 in <= 0.5 s).
* ``tiled``: dhel and kcl at M = 4096, ``block_size=1024`` over dense (target <= 1.3x).
* ``memory``: dhel and kcl at M = 65536, d = 128, ``block_size=1024``, each run
  once in a fresh subprocess that reports its time and peak resident memory
  (``VmHWM``); the dense (M, M) float32 matrix it avoids is 16 GiB.

Timing: warm-up (compilation included) is excluded; each measured round runs
every contender once, in rotating order, so machine noise hits all of them;
the median over >= 5 rounds (more for fast cases) is reported, with the load
average at start and end. ``--quick`` uses tiny sizes (a smoke run, not figures).
torch is optional: without it only our timings are reported.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import dhel_jax.metrics
from dhel_jax.losses import LOSSES, loss_hyperparameters

# torch is an optional benchmark dependency, imported in main() after the
# OpenMP environment is settled (libgomp reads it once, at load time).
torch: Any = None
torch_reference: Any = None

SECTIONS = ("losses", "wasserstein", "tiled", "memory")
DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "bench_losses.json"
LOSS_RTOL = 1e-4
GRAD_TOL = 1e-3
TARGETS = {"loss_ratio_m4096": 0.6, "wasserstein_n2000_s": 0.5, "tiled_over_dense": 1.3}

FULL = {
    "d": 128,
    "loss_sizes": (256, 1024, 4096),
    "wasserstein_sizes": (1000, 2000, 5000),
    "tiled": {"m": 4096, "block_size": 1024, "losses": ("dhel", "kcl")},
    "memory": {"m": 65536, "block_size": 1024, "losses": ("dhel", "kcl")},
    "min_rounds": 5,
    "min_seconds": 3.0,
    "max_rounds": 50,
}
QUICK = {
    "d": 128,
    "loss_sizes": (32, 64),
    "wasserstein_sizes": (200,),
    "tiled": {"m": 256, "block_size": 64, "losses": ("dhel", "kcl")},
    "memory": {"m": 1024, "block_size": 128, "losses": ("dhel", "kcl")},
    "min_rounds": 5,
    "min_seconds": 0.0,
    "max_rounds": 5,
}


# --------------------------------------------------------------------------- timing


def _summary(times: list[float], cpu_times: list[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "rounds": len(times),
        # Process CPU time (all threads): less sensitive than wall time to other jobs when
        # each framework runs single-threaded; includes OpenMP/XLA spin-waiting otherwise.
        "cpu_median_s": statistics.median(cpu_times),
    }


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    min_rounds: int,
    min_seconds: float,
    max_rounds: int,
    warmup: int = 2,
    pause_s: float = 0.02,
) -> dict[str, dict[str, Any]]:
    """Median wall time of each no-argument callable, measured in rotating rounds.

    Every round runs each callable once (the order rotates by one per round);
    rounds continue until ``min_rounds`` are done and ``min_seconds`` have
    passed, or ``max_rounds`` are done. ``warmup`` untimed calls come first.
    An untimed ``pause_s`` before each call lets the previous contender's idle
    worker threads (XLA's pool, OpenMP) stop spinning, so that they do not
    steal the cores from the next one.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()  # the pauses count towards min_seconds too
    rounds = 0
    while rounds < min_rounds or (
        rounds < max_rounds and time.perf_counter() - start < min_seconds
    ):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(pause_s)
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
        rounds += 1
    return {name: _summary(times[name], cpu_times[name]) for name in names}


# --------------------------------------------------------------------------- contenders


def _inputs(m: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two correlated float32 views: z2 = z1 + noise, as after augmentation."""
    rng = np.random.default_rng(seed)
    z1 = rng.standard_normal((m, d)).astype(np.float32)
    z2 = (z1 + 0.5 * rng.standard_normal((m, d))).astype(np.float32)
    return z1, z2


def jax_step(name: str, block_size: int | None = None) -> Callable:
    """``jit(value_and_grad(loss, argnums=(0, 1)))`` at the docs/spec.md defaults."""
    loss = functools.partial(LOSSES[name], block_size=block_size)
    return jax.jit(jax.value_and_grad(lambda a, b: loss(a, b), argnums=(0, 1)))


def _run_jax(step: Callable, *args: Any) -> Any:
    return jax.block_until_ready(step(*args))


def _jax_runner(step: Callable, z1: np.ndarray, z2: np.ndarray):
    a, b = jnp.asarray(z1), jnp.asarray(z2)
    t0 = time.perf_counter()
    value, grads = jax.block_until_ready(step(a, b))
    first_call_s = time.perf_counter() - t0
    result = (float(value), np.asarray(grads[0]), np.asarray(grads[1]))
    return functools.partial(_run_jax, step, a, b), result, first_call_s


def _torch_kwargs(name: str, fn: Callable) -> dict[str, Any]:
    """Our docs/spec.md defaults for the keywords the torch baseline takes."""
    ours = loss_hyperparameters(name)
    return {k: ours[k] for k in inspect.signature(fn).parameters if k in ours}


def _torch_runner(fn: Callable, name: str, z1: np.ndarray, z2: np.ndarray):
    fn = functools.partial(fn, **_torch_kwargs(name, fn))
    a = torch.from_numpy(z1.copy()).requires_grad_(True)
    b = torch.from_numpy(z2.copy()).requires_grad_(True)

    def run():
        a.grad = None  # frees last round's gradients
        b.grad = None
        loss = fn(a, b)
        loss.backward()
        return loss

    value = float(run().detach())
    result = (value, a.grad.numpy().copy(), b.grad.numpy().copy())
    return run, result


def _agreement(ours, theirs) -> dict[str, Any]:
    """Relative loss difference and gradient difference over the largest gradient entry."""
    loss_rel = abs(theirs[0] - ours[0]) / max(abs(ours[0]), 1e-30)
    scale = max(np.max(np.abs(ours[1])), np.max(np.abs(ours[2])), 1e-30)
    grad_rel = max(np.max(np.abs(theirs[1] - ours[1])), np.max(np.abs(theirs[2] - ours[2])))
    grad_rel = float(grad_rel / scale)
    return {
        "loss_rel_diff": float(loss_rel),
        "grad_rel_diff": grad_rel,
        "verified": bool(loss_rel <= LOSS_RTOL and grad_rel <= GRAD_TOL),
    }


# --------------------------------------------------------------------------- sections


def bench_losses(cfg: dict, names: list[str], sizes: list[int], failures: list[str]) -> list:
    rows = []
    for m in sizes:
        z1, z2 = _inputs(m, cfg["d"], seed=m)
        for name in names:
            run_ours, ours, first_call_s = _jax_runner(jax_step(name), z1, z2)
            fns = {"ours": run_ours}
            baselines: dict[str, dict[str, Any]] = {}
            if torch is not None:
                candidates = {"dense": torch_reference.DENSE.get(name)}
                candidates["published"] = torch_reference.PUBLISHED.get(name)
                for label, fn in candidates.items():
                    if fn is None:
                        continue
                    run_torch, theirs = _torch_runner(fn, name, z1, z2)
                    check = _agreement(ours, theirs)
                    baselines[label] = {"torch_fn": fn.__name__, "torch_loss": theirs[0], **check}
                    if check["verified"]:
                        fns[f"torch_{label}"] = run_torch
                    else:
                        failures.append(f"losses: {name} M={m} torch {label} disagrees: {check}")
            timing = time_interleaved(
                fns,
                min_rounds=cfg["min_rounds"],
                min_seconds=cfg["min_seconds"],
                max_rounds=cfg["max_rounds"],
            )
            for label, info in baselines.items():
                if f"torch_{label}" in timing:
                    info.update(timing[f"torch_{label}"])
                    info["ratio_ours_over_torch"] = timing["ours"]["median_s"] / info["median_s"]
                    info["cpu_ratio_ours_over_torch"] = (
                        timing["ours"]["cpu_median_s"] / info["cpu_median_s"]
                    )
            row = {
                "loss": name,
                "m": m,
                "d": cfg["d"],
                "loss_value": ours[0],
                "ours": {**timing["ours"], "first_call_s": first_call_s},
                "torch": baselines,
            }
            rows.append(row)
            _print_loss_row(row)
    return rows


def _print_loss_row(row: dict) -> None:
    parts = [f"{row['loss']:>13} M={row['m']:<5} ours {row['ours']['median_s'] * 1e3:9.2f} ms"]
    for label, info in row["torch"].items():
        if "median_s" in info:
            parts.append(
                f"torch-{label} {info['median_s'] * 1e3:9.2f} ms "
                f"(ours/torch {info['ratio_ours_over_torch']:.2f}, "
                f"cpu {info['cpu_ratio_ours_over_torch']:.2f})"
            )
        else:
            parts.append(f"torch-{label} MISMATCH")
    print(" | ".join(parts), flush=True)


def _sphere_reference(d: int, num_bins: int):
    return torch.from_numpy(torch_reference.sphere_cdf_grid(d, num_bins))


def bench_wasserstein(cfg: dict, failures: list[str]) -> dict[str, Any]:
    metric = getattr(dhel_jax.metrics, "wasserstein_uniformity", None)
    if metric is None:
        note = "dhel_jax.metrics.wasserstein_uniformity is not present on this branch: skipped"
        print(f"wasserstein: {note}", flush=True)
        return {"skipped": note, "rows": []}
    param = inspect.signature(metric).parameters.get("num_bins")
    num_bins = param.default if param is not None else 2**18
    step = jax.jit(metric)
    rows = []
    for n in cfg["wasserstein_sizes"]:
        # Anisotropic rows, so that W1 is well away from 0 and the check is meaningful.
        rng = np.random.default_rng(n)
        x = (rng.standard_normal((n, cfg["d"])) * np.linspace(2.0, 0.2, cfg["d"])).astype(
            np.float32
        )
        xj = jnp.asarray(x)
        t0 = time.perf_counter()
        ours = float(jax.block_until_ready(step(xj)))
        first_call_s = time.perf_counter() - t0
        fns = {"ours": functools.partial(_run_jax, step, xj)}
        baseline: dict[str, Any] = {}
        if torch is not None:
            t0 = time.perf_counter()
            ref = _sphere_reference(cfg["d"], num_bins)
            xt = torch.from_numpy(x)
            theirs = float(torch_reference.wasserstein_uniformity(xt, ref))
            # Both integrate |F_emp - F_d| on a grid of num_bins: each is within ~2 (hi - lo)
            # / num_bins of the exact W1.
            tol = LOSS_RTOL * abs(ours) + 8.0 / num_bins
            baseline = {
                "torch_value": theirs,
                "abs_diff": abs(theirs - ours),
                "tolerance": tol,
                "verified": abs(theirs - ours) <= tol,
                "reference_cdf_setup_s": time.perf_counter() - t0,
            }
            if baseline["verified"]:
                fns["torch"] = functools.partial(torch_reference.wasserstein_uniformity, xt, ref)
            else:
                failures.append(f"wasserstein n={n}: torch disagrees: {baseline}")
        timing = time_interleaved(
            fns,
            min_rounds=cfg["min_rounds"],
            min_seconds=cfg["min_seconds"],
            max_rounds=cfg["max_rounds"],
            warmup=1,
        )
        if "torch" in timing:
            baseline.update(timing["torch"])
            baseline["ratio_ours_over_torch"] = timing["ours"]["median_s"] / baseline["median_s"]
        row = {
            "n": n,
            "d": cfg["d"],
            "pairs": n * (n - 1) // 2,
            "num_bins": num_bins,
            "value": ours,
            "ours": {**timing["ours"], "first_call_s": first_call_s},
            "torch_sort": baseline,
        }
        if n == 2000 and cfg["d"] == 128:
            row["meets_target_0.5s"] = timing["ours"]["median_s"] <= TARGETS["wasserstein_n2000_s"]
        rows.append(row)
        msg = f"  wasserstein n={n:<5} ours {timing['ours']['median_s'] * 1e3:9.2f} ms"
        if "median_s" in baseline:
            msg += f" | torch-sort {baseline['median_s'] * 1e3:9.2f} ms"
        print(msg, flush=True)
    return {"num_bins": num_bins, "rows": rows}


def bench_tiled(cfg: dict, failures: list[str]) -> list:
    m, block = cfg["tiled"]["m"], cfg["tiled"]["block_size"]
    z1, z2 = _inputs(m, cfg["d"], seed=m)
    rows = []
    for name in cfg["tiled"]["losses"]:
        run_dense, dense, _ = _jax_runner(jax_step(name), z1, z2)
        run_tiled, tiled, _ = _jax_runner(jax_step(name, block), z1, z2)
        check = _agreement(dense, tiled)
        if not check["verified"]:
            failures.append(f"tiled: {name} M={m} tiled disagrees with dense: {check}")
        timing = time_interleaved(
            {"dense": run_dense, "tiled": run_tiled},
            min_rounds=cfg["min_rounds"],
            min_seconds=cfg["min_seconds"],
            max_rounds=cfg["max_rounds"],
        )
        ratio = timing["tiled"]["median_s"] / timing["dense"]["median_s"]
        rows.append(
            {
                "loss": name,
                "m": m,
                "d": cfg["d"],
                "block_size": block,
                "dense": timing["dense"],
                "tiled": timing["tiled"],
                "ratio_tiled_over_dense": ratio,
                "meets_target_1.3x": ratio <= TARGETS["tiled_over_dense"],
                **check,
            }
        )
        print(
            f"  tiled {name:>5} M={m} B={block}: dense {timing['dense']['median_s'] * 1e3:.1f} ms"
            f", tiled {timing['tiled']['median_s'] * 1e3:.1f} ms, ratio {ratio:.2f}",
            flush=True,
        )
    return rows


def _proc_status_bytes(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM``-style field of /proc/self/status in bytes (Linux only)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_child(name: str, m: int, d: int, block: int) -> dict[str, Any]:
    """Runs one tiled forward+backward in this (fresh) process and reports time and peak RSS."""
    z1, z2 = _inputs(m, d, seed=m)
    a, b = jnp.asarray(z1), jnp.asarray(z2)
    jax.block_until_ready((a, b))
    rss_inputs = _proc_status_bytes("VmRSS")
    t0 = time.perf_counter()
    compiled = jax_step(name, block).lower(a, b).compile()
    compile_s = time.perf_counter() - t0
    analysis = compiled.memory_analysis()
    temp_bytes = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
    t0 = time.perf_counter()
    value, grads = jax.block_until_ready(compiled(a, b))
    run_s = time.perf_counter() - t0
    finite = bool(
        np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in grads)
    )
    return {
        "loss": name,
        "m": m,
        "d": d,
        "block_size": block,
        "loss_value": float(value),
        "finite": finite,
        "compile_s": compile_s,
        "time_s": run_s,
        "rss_after_inputs_bytes": rss_inputs,
        "peak_rss_bytes": _proc_status_bytes("VmHWM"),
        "ru_maxrss_self_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "xla_temp_bytes": temp_bytes,
    }


def bench_memory(cfg: dict, failures: list[str]) -> list:
    m, block = cfg["memory"]["m"], cfg["memory"]["block_size"]
    rows = []
    for name in cfg["memory"]["losses"]:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-child",
            f"{name},{m},{cfg['d']},{block}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            failures.append(f"memory: {name} M={m} child failed:\n{proc.stderr[-2000:]}")
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        # Max RSS over the children waited for so far (so an upper bound for this one).
        row["ru_maxrss_children_bytes"] = (
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        )
        row["dense_matrix_bytes_avoided"] = m * m * 4
        if not row["finite"]:
            failures.append(f"memory: {name} M={m} produced a non-finite loss or gradient")
        rows.append(row)
        print(
            f"  memory {name:>5} M={m} B={block}: {row['time_s']:.1f} s fwd+bwd, peak RSS "
            f"{row['peak_rss_bytes'] / 2**30:.2f} GiB (after inputs "
            f"{row['rss_after_inputs_bytes'] / 2**30:.2f} GiB); dense (M, M) f32 would be "
            f"{m * m * 4 / 2**30:.1f} GiB",
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------- main


def _load_torch(wait_policy: str | None) -> None:
    """Imports torch and the baselines if available; ``wait_policy`` sets ``OMP_WAIT_POLICY``."""
    global torch, torch_reference
    if wait_policy is not None:
        os.environ["OMP_WAIT_POLICY"] = wait_policy
    try:
        import torch as torch_module
        import torch_reference as reference_module
    except ImportError:
        return
    torch, torch_reference = torch_module, reference_module


def _meta(args: argparse.Namespace, cfg: dict) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "argv": sys.argv[1:],
        "quick": args.quick,
        "config": {k: v for k, v in cfg.items()},
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": len(jax.devices()),
        "torch": None if torch is None else torch.__version__,
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "targets": TARGETS,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_avg_start": list(os.getloadavg()),
    }


def _check_names(value: str, accepted, what: str) -> list[str]:
    names = [s for s in value.split(",") if s]
    unknown = [s for s in names if s not in accepted]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; accepted: {', '.join(accepted)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--losses", default=",".join(LOSSES), help="losses section: names")
    parser.add_argument("--sizes", default=None, help="losses section: batch sizes M")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument(
        "--omp-wait-policy",
        choices=("active", "passive"),
        default=None,
        help="OMP_WAIT_POLICY for torch (default: unset, torch's behaviour); 'passive' keeps "
        "idle OpenMP threads from spinning, which matters on an oversubscribed machine",
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        name, m, d, block = args.memory_child.split(",")
        print(json.dumps(memory_child(name, int(m), int(d), int(block))))
        return 0

    sections = _check_names(args.sections, SECTIONS, "section")
    names = _check_names(args.losses, list(LOSSES), "loss")
    cfg = dict(QUICK if args.quick else FULL)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(cfg["loss_sizes"])
    _load_torch(args.omp_wait_policy)
    if torch is not None:
        torch.set_num_threads(args.torch_threads)
    else:
        print("torch is not installed: timing dhel_jax only (pip install '.[bench]')")

    report: dict[str, Any] = {"meta": _meta(args, cfg)}
    failures: list[str] = []
    if "losses" in sections:
        print(f"losses: forward+backward, d={cfg['d']}, float32, median time", flush=True)
        report["losses"] = bench_losses(cfg, names, sizes, failures)
    if "wasserstein" in sections:
        print("wasserstein_uniformity (forward only)", flush=True)
        report["wasserstein"] = bench_wasserstein(cfg, failures)
    if "tiled" in sections:
        print("tiled over dense", flush=True)
        report["tiled"] = bench_tiled(cfg, failures)
    if "memory" in sections:
        print("tiled memory (fresh subprocess per loss)", flush=True)
        report["memory"] = bench_memory(cfg, failures)

    report["meta"]["load_avg_end"] = list(os.getloadavg())
    report["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["failures"] = failures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    load = report["meta"]["load_avg_start"][0], report["meta"]["load_avg_end"][0]
    print(f"load average (1 min) start {load[0]:.2f}, end {load[1]:.2f}; wrote {args.out}")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
