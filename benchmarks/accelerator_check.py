"""One prepared command for a borrowed accelerator: correctness, speed, MFU and learning.

Usage (from a source checkout, no ``pip install`` of the project)::

    PYTHONPATH=. python benchmarks/accelerator_check.py [--tiny] [--fashion-mnist DIR]
        [--sections correctness,losses,train_step,learning] [--out-dir DIR] [--time-limit S]

It runs on whatever backend JAX finds (GPU, TPU or CPU), finishes within ``--time-limit``
(default 570 s) and writes ``<out-dir>/accelerator_check.{json,md}`` (default
``benchmarks/out``), printing the markdown. docs/accelerators.md explains every row.

Sections (each runs on its own: a missing module or a failure is reported in that section and
the others still run):

1. ``correctness``: every loss and metric in float32 against the float64 NumPy references of
   ``tests/np_reference.py`` (values, and each loss's gradient along a random direction against
   a central difference of its reference); the matmul precision the losses force and a raw
   matmul at the backend's default precision beside it; the bfloat16 path of the losses; the
   sharded losses over all local devices.
2. ``losses``: dense and tiled dhel and kcl forward + backward at M = 4096, 16384, 65536
   (d = 128): median time, XLA's planned memory, the device's peak memory
   (``memory_stats()``) and the achieved FLOP/s against the chip's peak.
3. ``train_step``: ``dhel-train``'s own step (``dhel_jax.step``) of ResNet-18 (CIFAR stem) at
   batch 256 and 512, float32 and bfloat16: images/s, MFU from ``cost_analysis()`` FLOPs and
   :data:`PEAK_TFLOPS`, the host input pipeline's rate, and the step fed through
   ``parallel.prefetch_to_device``; on a TPU also the compiler's own estimate of the step's
   time beside the measured one (:func:`compiler_estimate`).
4. ``learning``: Fashion-MNIST (the four IDX ``.gz`` files, no TFDS) pretraining of ResNet-18
   (CIFAR stem, 28x28 views, DHEL) within a fixed device-time budget, then the evaluation of
   ``dhel-eval --baselines`` with its CPU-default protocols (fast linear probe, kNN k = 200),
   for the trained encoder, its random initialisation and the raw pixels.

Only jax, flax, optax, numpy and scipy are needed (what an accelerator host has); no
TensorFlow, TFDS, grain, ml_collections or orbax. dm_pix (used by the on-device augmentation)
is taken from ``benchmarks/vendor/`` when it is not installed. ``--tiny`` runs every section at
small sizes on a CPU in under two minutes (tests/test_accelerator_check.py runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
VENDOR = BENCHMARKS / "vendor"
for _path in (str(ROOT), str(BENCHMARKS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def importable(module: str) -> bool:
    """Whether ``module`` can be found (an import hook that refuses it counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


if not importable("dm_pix"):
    # A pure-Python wheel imports straight from its zip file.
    sys.path.extend(str(p) for p in sorted(VENDOR.glob("dm_pix-*.whl")))

SECTIONS = ("correctness", "losses", "train_step", "learning")
DEFAULT_OUT_DIR = BENCHMARKS / "out"
DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# Dense peak TFLOP/s of one JAX device (no sparsity), from the vendors' data sheets:
# (bfloat16, float32 at XLA's default precision, float32 at Precision.HIGHEST). NVIDIA's
# default float32 convolutions and matmuls use TF32 tensor cores; HIGHEST uses the FP32 units.
# A TPU's default float32 matmul is one bfloat16 pass; HIGHEST takes six.
PEAK_TFLOPS: tuple[tuple[str, str, tuple[float, float, float]], ...] = (
    (r"h200 nvl", "NVIDIA H200 NVL", (835.0, 417.5, 60.0)),
    (r"h200", "NVIDIA H200 SXM", (989.5, 494.5, 67.0)),
    (r"h100 nvl", "NVIDIA H100 NVL", (835.0, 417.5, 60.0)),
    (r"h100 pcie", "NVIDIA H100 PCIe", (756.5, 378.0, 51.0)),
    (r"h100", "NVIDIA H100 SXM", (989.5, 494.5, 67.0)),
    (r"a100", "NVIDIA A100", (312.0, 156.0, 19.5)),
    (r"\bl4\b", "NVIDIA L4", (121.0, 60.0, 30.3)),
    (r"tpu v4", "TPU v4", (275.0, 275.0, 275.0 / 6)),
    (r"tpu v5 ?(lite|e)", "TPU v5e", (197.0, 197.0, 197.0 / 6)),
    (r"tpu v5p?\b", "TPU v5p", (459.0, 459.0, 459.0 / 6)),
    (r"tpu v6 ?(lite|e)", "TPU v6e", (918.0, 918.0, 918.0 / 6)),
)
PRECISIONS = ("bfloat16", "float32_default", "float32_highest")


def peak_flops(device_kind: str, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device of ``device_kind`` at ``precision``, the matched name);
    ``(None, "unknown device kind ...")`` when the kind is not in :data:`PEAK_TFLOPS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"peak_flops: unknown precision {precision!r}; accepted: {PRECISIONS}")
    for pattern, name, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_kind.lower()):
            return peaks[PRECISIONS.index(precision)] * 1e12, name
    return None, f"unknown device kind {device_kind!r}: no peak FLOP/s on record"


# ----------------------------------------------------------------------------------------------
# Sizes.


@dataclasses.dataclass(frozen=True)
class Sizes:
    corr_m: int = 48
    corr_d: int = 16
    corr_kernels: tuple[tuple[str, float], ...] = (("log", 1.0), ("imq", 2.0), ("riesz", -1.0))
    sharded_losses: tuple[str, ...] = ("dhel", "kcl", "info_nce")
    precision_m: int = 512
    loss_sizes: tuple[int, ...] = (4096, 16384, 65536)
    loss_d: int = 128
    block_size: int = 1024
    loss_min_seconds: float = 1.0
    model: str = "resnet18"
    step_batches: tuple[int, ...] = (256, 512)
    step_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    step_image: int = 32
    step_steps: int = 10
    host_examples: int = 10_000
    learn_model: str = "resnet18"
    learn_batch: int = 512
    learn_seconds: float = 240.0
    learn_max_steps: int = 20_000
    learn_train_examples: int | None = None
    learn_test_examples: int | None = None
    eval_batch: int = 1024
    eval_reserve_s: float = 100.0
    compiler_options: dict[str, Any] | None = None


FULL = Sizes()
TINY = Sizes(
    corr_m=12,
    corr_d=6,
    corr_kernels=(),
    sharded_losses=("dhel",),
    precision_m=64,
    loss_sizes=(256, 512),
    loss_d=32,
    block_size=128,
    loss_min_seconds=0.0,
    model="resnet_tiny",
    step_batches=(16,),
    step_dtypes=("bfloat16",),
    step_image=16,
    step_steps=2,
    host_examples=256,
    learn_model="resnet_tiny",
    learn_batch=64,
    learn_seconds=10.0,
    learn_max_steps=12,
    learn_train_examples=1024,
    learn_test_examples=256,
    eval_batch=256,
    eval_reserve_s=0.0,
    # XLA:CPU compiles twice as fast without LLVM's optimisations; tiny steps lose nothing.
    compiler_options={"xla_backend_optimization_level": 0},
)


# ----------------------------------------------------------------------------------------------
# Small helpers.


class SectionSkipped(Exception):
    """A section cannot run here (a missing module or input); the message says why."""


def _require(*modules: str) -> None:
    missing = [m for m in modules if not importable(m)]
    if missing:
        raise SectionSkipped(f"needs {', '.join(missing)}, which this host lacks")


def _rel(ours: float, expected: float, floor: float = 1.0) -> float:
    return abs(float(ours) - expected) / max(abs(expected), floor)


def _cost_analysis(compiled: Any) -> dict[str, Any]:
    """XLA's cost analysis of a compiled program (``{}`` where the backend gives none)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return {}
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else None
    return dict(analysis or {})


def _compiled_flops(compiled: Any) -> float | None:
    """XLA's FLOP count of a compiled program (``None`` where the backend gives none)."""
    flops = _cost_analysis(compiled).get("flops")
    return float(flops) if flops and flops > 0 else None


def compiler_estimate(cost: dict[str, Any], hlo_text: str = "") -> dict[str, Any]:
    """The compiler's own estimate of one run of a program, from its ``cost_analysis()`` and,
    for a TPU program, its HLO text.

    Returns ``{"step_s": seconds or None, "flops": FLOPs or None, "reason": None or why there
    is no estimate}``. ``optimal_seconds`` (the TPU cost model's time) gets back the second it
    takes off per ``ConcatBitcast`` call (``dhel_jax.cost_model``, as dhel-compile does) and
    counts only when the result is finite and positive.
    """
    from dhel_jax import cost_model

    flops = cost.get("flops")
    flops = float(flops) if flops is not None and math.isfinite(flops) and flops > 0 else None
    seconds = cost.get("optimal_seconds")
    if seconds is None:
        reason = "the compiler's cost analysis gives no optimal_seconds"
    else:
        untimed = cost_model.untimed_custom_calls(hlo_text)
        corrected = cost_model.corrected_seconds(seconds, untimed)
        if math.isfinite(corrected) and corrected > 0:
            return {"step_s": corrected, "flops": flops, "reason": None}
        added = f" (+{untimed} s for {untimed} ConcatBitcast calls)" if untimed else ""
        reason = (
            f"the compiler's cost analysis gives optimal_seconds = {seconds!r}{added}, not a time"
        )
    return {"step_s": None, "flops": flops, "reason": reason}


def estimate_line(measured_s: float, estimate: dict[str, Any]) -> str:
    """``measured X ms/step vs compiler estimate Y ms/step`` (``null (why)`` without one)."""
    measured = f"measured {measured_s * 1e3:.2f} ms/step vs compiler estimate"
    if estimate["step_s"] is None:
        return f"{measured} null ({estimate['reason']})"
    return f"{measured} {estimate['step_s'] * 1e3:.2f} ms/step"


def _planned_bytes(compiled: Any) -> int | None:
    """Arguments + outputs + temporaries of XLA's memory plan for one device."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    return int(sum(getattr(m, f, 0) or 0 for f in fields))


def _peak_bytes() -> int | None:
    """The first local device's peak bytes in use so far (``None`` where not reported)."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def _device_summary() -> dict[str, Any]:
    devices = jax.local_devices()
    kind = devices[0].device_kind
    return {
        "backend": jax.default_backend(),
        "device_kind": kind,
        "local_devices": len(devices),
        "process_count": jax.process_count(),
        "peak_tflops": {p: peak_flops(kind, p)[0] for p in PRECISIONS},
        "peak_source": peak_flops(kind, "bfloat16")[1],
    }


def _time_steps(step: Callable[[], Any], steps: int) -> float:
    """Seconds per call of ``step`` (which returns something to block on), over ``steps``."""
    out = step()
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


# ----------------------------------------------------------------------------------------------
# 1. Correctness.


def _views(rng: np.random.Generator, m: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    z1 = rng.normal(size=(m, d))
    return z1, z1 + 0.5 * rng.normal(size=(m, d))


def _row(check: str, error: float, tolerance: float, **extra: Any) -> dict[str, Any]:
    ok = bool(np.isfinite(error) and error <= tolerance)
    return {"check": check, "error": float(error), "tolerance": tolerance, "ok": ok, **extra}


def section_correctness(sizes: Sizes) -> dict[str, Any]:
    from dhel_jax import losses, metrics, pairwise, parallel
    from tests import np_reference as ref

    rng = np.random.default_rng(0)
    m, d = sizes.corr_m, sizes.corr_d
    rows: list[dict[str, Any]] = []
    cases = [(name, {}) for name in losses.LOSSES]
    cases += [("kcl", {"kernel": k, "t": t}) for k, t in sizes.corr_kernels]
    for name, hp in cases:
        label = name + "".join(f" {k}={v}" for k, v in hp.items())
        z1, z2 = _views(rng, m, d)
        fn = losses.get_loss(name, **hp)
        value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(
            jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32)
        )
        expected = ref.LOSSES[name](z1, z2, **hp)
        rows.append(_row(f"{label}: float32 value", _rel(value, expected), 1e-5))
        # Directional derivative: <grad, v> against a central difference of the reference.
        v1, v2 = rng.normal(size=(m, d)), rng.normal(size=(m, d))
        eps = 1e-5
        fd = (
            ref.LOSSES[name](z1 + eps * v1, z2 + eps * v2, **hp)
            - ref.LOSSES[name](z1 - eps * v1, z2 - eps * v2, **hp)
        ) / (2 * eps)
        g1, g2 = (np.asarray(g, np.float64) for g in grads)
        ours = float(np.sum(g1 * v1) + np.sum(g2 * v2))
        scale = math.sqrt(np.sum(g1**2) + np.sum(g2**2)) * math.sqrt(np.sum(v1**2) + np.sum(v2**2))
        rows.append(_row(f"{label}: float32 gradient", abs(ours - fd) / max(scale, 1e-12), 1e-4))
        # bfloat16 inputs: float32 loss, bfloat16 gradients, against the rounded inputs.
        b1, b2 = jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16)
        value16, grads16 = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(b1, b2)
        expected16 = ref.LOSSES[name](np.asarray(b1, np.float64), np.asarray(b2, np.float64), **hp)
        dtypes_ok = value16.dtype == jnp.float32 and all(g.dtype == jnp.bfloat16 for g in grads16)
        finite = all(bool(jnp.all(jnp.isfinite(g))) for g in grads16)
        row = _row(f"{label}: bfloat16 inputs", _rel(value16, expected16), 3e-2)
        row["ok"] = row["ok"] and dtypes_ok and finite
        row["dtypes"] = f"loss {value16.dtype}, grads {grads16[0].dtype}"
        rows.append(row)

    x = rng.normal(size=(m, d))
    y = x + 0.5 * rng.normal(size=(m, d))
    xf, yf = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    metric_cases = [
        ("alignment", metrics.alignment(xf, yf), ref.alignment(x, y), 1e-5),
        ("uniformity", metrics.uniformity(xf), ref.uniformity(x), 1e-5),
        ("effective_rank", metrics.effective_rank(xf), ref.effective_rank(x), 1e-5),
        (
            "hyperspherical_energy s=1",
            metrics.hyperspherical_energy(xf, s=1.0),
            ref.hyperspherical_energy(x, 1.0),
            1e-5,
        ),
        (
            "hyperspherical_energy s=0 (log)",
            metrics.hyperspherical_energy(xf, s=0),
            ref.hyperspherical_energy(x, 0),
            1e-5,
        ),
    ]
    for label, ours, expected, tol in metric_cases:
        rows.append(_row(f"{label}: float32", _rel(ours, expected), tol))
    w1 = float(jax.jit(metrics.wasserstein_uniformity)(xf))
    rows.append(
        _row(
            "wasserstein_uniformity: float32 (absolute)",
            abs(w1 - ref.wasserstein_uniformity(x)),
            2e-6,
        )
    )
    low = rng.normal(size=(m, 3)) @ rng.normal(size=(3, d))
    rank = int(metrics.rank(jnp.asarray(low, jnp.float32)))
    rows.append(_row("rank of a rank-3 matrix: float32 (exact)", abs(rank - ref.rank(low)), 0))

    # Precision: the losses' similarity matmuls force Precision.HIGHEST in float32; a plain
    # matmul at the backend's default precision is shown beside them (TF32 / one bf16 pass on
    # GPUs and TPUs would miss the 1e-5 tolerance).
    pm = sizes.precision_m
    u1, u2 = _views(rng, pm, 128)
    un = ref.normalize(u1)
    exact = un @ un.T
    a32 = jnp.asarray(un, jnp.float32)
    default_err = float(np.max(np.abs(np.asarray(jax.jit(lambda a: a @ a.T)(a32)) - exact)))
    # pairwise._dot_nt is the similarity matmul every loss uses.
    forced = jax.jit(lambda a: pairwise._dot_nt(a, a))(a32)
    forced_err = float(np.max(np.abs(np.asarray(forced) - exact)))
    rows.append(_row(f"unit-row Gram {pm}x128, losses' precision (max abs)", forced_err, 1e-5))
    value = jax.jit(losses.dhel)(jnp.asarray(u1, jnp.float32), jnp.asarray(u2, jnp.float32))
    rows.append(_row(f"dhel M={pm} d=128: float32 value", _rel(value, ref.dhel(u1, u2)), 1e-5))
    precision = {
        "losses_force": "lax.Precision.HIGHEST for float32 similarity matmuls "
        "(dhel_jax.pairwise._dot_nt); bfloat16 inputs: one pass, float32 accumulation",
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "default_precision_gram_max_abs_error": default_err,
        "forced_precision_gram_max_abs_error": forced_err,
    }

    # Sharded: the shard_map path and the jit-over-NamedSharding path, on all local devices.
    devices = jax.local_devices()
    mesh = parallel.data_mesh(devices)
    ms = 4 * len(devices) * max(1, m // (4 * len(devices)))
    s1, s2 = _views(rng, ms, d)
    a, b = jnp.asarray(s1, jnp.float32), jnp.asarray(s2, jnp.float32)
    shard = parallel.batch_sharding(mesh)
    for name in sizes.sharded_losses:
        single, single_grads = jax.value_and_grad(losses.LOSSES[name], argnums=(0, 1))(a, b)
        expected = ref.LOSSES[name](s1, s2)
        for path, fn in (
            ("shard_map", parallel.sharded_loss(losses.LOSSES[name], mesh)),
            ("jit+NamedSharding", losses.LOSSES[name]),
        ):
            value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(
                jax.device_put(a, shard), jax.device_put(b, shard)
            )
            grad_err = max(
                float(jnp.max(jnp.abs(g - h)) / jnp.max(jnp.abs(h)))
                for g, h in zip(grads, single_grads, strict=True)
            )
            row = _row(
                f"{name} sharded over {len(devices)} devices ({path}), M={ms}",
                _rel(value, expected),
                1e-5,
                grad_vs_single_device=grad_err,
            )
            row["ok"] = row["ok"] and grad_err <= 1e-5 and _rel(value, float(single)) <= 1e-5
            rows.append(row)
    failed = [r["check"] for r in rows if not r["ok"]]
    return {"rows": rows, "precision": precision, "failed": failed, "ok": not failed}


# ----------------------------------------------------------------------------------------------
# 2. Losses: dense and tiled forward + backward.


def section_losses(sizes: Sizes, device: dict[str, Any]) -> dict[str, Any]:
    import bench_losses

    peak, _ = peak_flops(device["device_kind"], "float32_highest")
    d = sizes.loss_d
    programs = []
    for m in sizes.loss_sizes:
        z1, z2 = bench_losses._inputs(m, d, seed=m)
        a, b = jax.device_put(z1), jax.device_put(z2)
        for name in ("dhel", "kcl"):
            dense_flops = None
            for mode, block in (("dense", None), ("tiled", sizes.block_size)):
                entry = {"loss": name, "m": m, "d": d, "mode": mode, "block_size": block}
                t0 = time.perf_counter()
                try:
                    compiled = bench_losses.jax_step(name, block).lower(a, b).compile()
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at compile time
                    entry.update(status="compile failed", error=str(e).splitlines()[0][:300])
                    programs.append((0, entry, None, None))
                    continue
                entry["compile_s"] = time.perf_counter() - t0
                entry["planned_bytes"] = _planned_bytes(compiled)
                flops = _compiled_flops(compiled)
                if mode == "dense":
                    dense_flops = flops
                # The tiled program's loop bodies are not counted by cost_analysis: use the
                # dense program's count (the same arithmetic) for both.
                entry["flops"] = dense_flops
                entry["xla_flops_of_program"] = flops
                programs.append((entry["planned_bytes"] or 0, entry, compiled, (a, b)))
    rows = []
    # Peak memory is a process high-water mark: run in increasing order of planned memory, so
    # that the mark after each program is that program's own peak (flagged otherwise).
    for _, entry, compiled, args in sorted(programs, key=lambda p: p[0]):
        rows.append(entry)
        if compiled is None:
            continue
        before = _peak_bytes()
        try:
            timing = bench_losses.time_interleaved(
                {"run": functools.partial(bench_losses._run_jax, compiled, *args)},
                min_rounds=3,
                min_seconds=sizes.loss_min_seconds,
                max_rounds=20,
                warmup=1,
                pause_s=0.0,
            )["run"]
        except Exception as e:  # noqa: BLE001 - out of memory at run time
            entry.update(status="run failed", error=str(e).splitlines()[0][:300])
            continue
        after = _peak_bytes()
        entry.update(status="ok", median_s=timing["median_s"], rounds=timing["rounds"])
        entry["peak_bytes"] = after
        entry["peak_is_this_program"] = None if after is None else after > (before or 0)
        if entry["flops"]:
            entry["tflops_per_s"] = entry["flops"] / timing["median_s"] / 1e12
            entry["fraction_of_peak"] = (
                None if peak is None else entry["flops"] / timing["median_s"] / peak
            )
    rows.sort(key=lambda r: (r["loss"], r["m"], r["mode"]))
    failed = [f"{r['loss']} M={r['m']} {r['mode']}" for r in rows if r.get("status") != "ok"]
    return {
        "rows": rows,
        "peak_precision": "float32_highest (the losses force Precision.HIGHEST)",
        "not_run": failed,
        "ok": True,
    }


# ----------------------------------------------------------------------------------------------
def _host_rate(images: np.ndarray, labels: np.ndarray, batch: int, seconds: float = 1.0) -> float:
    """Images/s the host pipeline alone delivers."""
    import accelerator_pretrain as pretrain

    it = pretrain.host_batches(images, labels, batch, seed=1)
    count, t0 = 0, time.perf_counter()
    while count < 5 or time.perf_counter() - t0 < seconds:
        next(it)
        count += 1
    return count * batch / (time.perf_counter() - t0)


class _Stepper:
    """A compiled step and its (donated) state: ``run(batch)`` advances one step."""

    def __init__(self, step: Any, state: Any):
        self.step, self.state = step, state

    def run(self, batch: Any) -> jax.Array:
        self.state, metrics = self.step(self.state, batch)
        return metrics["loss"]


def measure_step(
    sizes: Sizes,
    dtype: str,
    batch: int,
    pool: tuple[np.ndarray, np.ndarray],
    mesh: Any,
    peak: float | None,
) -> dict[str, Any]:
    """Compile time, FLOPs, images/s on a resident batch and fed by the host pipeline; on a
    TPU, the compiler's estimate of the step's time beside the measured one."""
    import accelerator_pretrain as pretrain

    from dhel_jax import parallel

    images, labels = pool
    setup = pretrain.make_setup(
        sizes.model,
        dtype,
        batch_size=batch,
        total_steps=1000,
        channels=images.shape[-1],
        view_size=images.shape[1],
        view_kwargs={"mean": (0.5,) * 3, "std": (0.25,) * 3},
    )
    state = pretrain.init_state(setup, 0, mesh, sizes.compiler_options)
    shard = parallel.batch_sharding(mesh)
    fixed = jax.device_put({"image": images[:batch], "label": labels[:batch]}, shard)
    t0 = time.perf_counter()
    stepper = _Stepper(
        pretrain.compile_step(setup, mesh, state, fixed, sizes.compiler_options), state
    )
    row: dict[str, Any] = {"compile_s": time.perf_counter() - t0}
    cost = _cost_analysis(stepper.step)
    row["flops_per_step"] = _compiled_flops(stepper.step)
    seconds = _time_steps(functools.partial(stepper.run, fixed), sizes.step_steps)
    feed = parallel.prefetch_to_device(
        pretrain.host_batches(images, labels, batch, seed=0), shard, size=2
    )
    fed_seconds = _time_steps(lambda: stepper.run(next(feed)), sizes.step_steps)
    row.update(
        step_s=seconds,
        images_per_s=batch / seconds,
        views_per_s=2 * batch / seconds,
        host_images_per_s=_host_rate(images, labels, batch),
        fed_images_per_s=batch / fed_seconds,
        loss_finite=bool(np.isfinite(float(stepper.run(fixed)))),
    )
    row["data_bound"] = row["host_images_per_s"] < row["images_per_s"]
    if row["flops_per_step"]:
        row["tflops_per_s"] = row["flops_per_step"] / seconds / 1e12
        row["mfu"] = None if peak is None else row["flops_per_step"] / seconds / peak
    if mesh.devices.flat[0].platform == "tpu":
        row["compiler_estimate"] = compiler_estimate(cost, stepper.step.as_text())
        row["compiler_estimate"]["line"] = estimate_line(seconds, row["compiler_estimate"])
        print(f"train_step {dtype} batch {batch}: {row['compiler_estimate']['line']}", flush=True)
    return row


def section_train_step(sizes: Sizes, device: dict[str, Any]) -> dict[str, Any]:
    _require("flax", "optax", "dm_pix")
    from dhel_jax import parallel

    mesh = parallel.data_mesh(jax.local_devices())
    side = sizes.step_image
    rng = np.random.default_rng(0)
    pool = (
        rng.integers(0, 256, (sizes.host_examples, side, side, 3), dtype=np.uint8),
        rng.integers(0, 10, (sizes.host_examples,), dtype=np.int32),
    )
    rows = []
    for dtype in sizes.step_dtypes:
        precision = "bfloat16" if dtype == "bfloat16" else "float32_default"
        peak, _ = peak_flops(device["device_kind"], precision)
        for batch in sizes.step_batches:
            row: dict[str, Any] = {"model": f"{sizes.model}_cifar", "dtype": dtype, "batch": batch}
            try:
                row.update(measure_step(sizes, dtype, batch, pool, mesh, peak))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: the next row still runs
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            rows.append(row)
    return {
        "rows": rows,
        "step": "dhel_jax.step.make_train_step, as dhel-train runs it: online probe on, "
        "geometry off (geometry_every_steps = 0)",
        "prefetch": {
            "dhel-train": "no: train_and_evaluate reads and transfers batch k + 1 after "
            "dispatching step k (only asynchronous dispatch overlaps them)",
            "this check": "yes: dhel_jax.parallel.prefetch_to_device, double-buffered (size 2)",
        },
        "host_pipeline": "in-memory uint8 array, shuffled gather per batch (this check's "
        "pipeline; dhel-train's grain + TFDS pipeline does not run on this host)",
        "ok": all(r.get("loss_finite") for r in rows),
    }


# ----------------------------------------------------------------------------------------------
# 4. Learning: Fashion-MNIST from the IDX files.


def learn_dtype() -> str:
    """bfloat16 compute on accelerators; float32 on CPUs, where XLA emulates bfloat16."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def section_learning(
    sizes: Sizes, data_dir: Path, budget_s: float, step_estimate_s: float | None
) -> dict[str, Any]:
    _require("flax", "optax", "dm_pix")
    import accelerator_pretrain as pretrain

    from dhel_jax import baselines, parallel

    t_load = time.perf_counter()
    try:
        data = pretrain.load_fashion_mnist(data_dir)
    except FileNotFoundError as e:
        raise SectionSkipped(f"{e}; pass --fashion-mnist DIR with the four .gz files") from e
    train_x, train_y = data["train_images"], data["train_labels"]
    test_x, test_y = data["test_images"], data["test_labels"]
    if sizes.learn_train_examples:
        train_x, train_y = (
            train_x[: sizes.learn_train_examples],
            train_y[: sizes.learn_train_examples],
        )
        test_x, test_y = test_x[: sizes.learn_test_examples], test_y[: sizes.learn_test_examples]
    load_s = time.perf_counter() - t_load
    scaled = train_x.astype(np.float64) / 255.0
    mean, std = (float(scaled.mean()),), (float(scaled.std()),)
    # configs/fashion_mnist.py's augmentation at the native 28x28 view size.
    view_kwargs = {"crop_scale": (0.2, 1.0), "jitter_strength": 1.0, "mean": mean, "std": std}
    transform = {"out_size": 28, "crop_fraction": 1.0, "mean": mean, "std": std}
    dtype = learn_dtype()
    batch = sizes.learn_batch
    # Steps that fit the budget, from the train-step section's time for a larger image.
    per_step = step_estimate_s or 0.1
    steps = int(max(10, min(sizes.learn_max_steps, 0.85 * budget_s / per_step)))
    if sizes.learn_train_examples:
        steps = sizes.learn_max_steps
    mesh = parallel.data_mesh(jax.local_devices())
    setup = pretrain.make_setup(
        sizes.learn_model,
        dtype,
        batch_size=batch,
        total_steps=steps,
        channels=1,
        view_size=28,
        view_kwargs=view_kwargs,
    )
    state = pretrain.init_state(setup, 0, mesh, sizes.compiler_options)
    feed = parallel.prefetch_to_device(
        pretrain.host_batches(train_x, train_y, batch, seed=0),
        parallel.batch_sharding(mesh),
        size=2,
    )
    first = next(feed)
    t0 = time.perf_counter()
    step = pretrain.compile_step(setup, mesh, state, first, sizes.compiler_options)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses_seen: list[float] = []
    online_probe: list[float] = []
    done, current = 0, first
    while done < steps:
        state, metrics = step(state, current)
        done += 1
        if done % 100 == 0 or done == steps:
            losses_seen.append(float(metrics["loss"]))
            online_probe.append(float(metrics["probe_accuracy"]))
            if time.perf_counter() - t0 > budget_s:
                break
        current = next(feed)
    jax.block_until_ready(state)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = setup.model
    trained = {"params": state.params, "batch_stats": state.batch_stats}
    results: dict[str, Any] = {}
    encoders = {"pretrained": trained}
    encoders["random_init"], _ = baselines.random_init_variables(
        model,
        0,
        train_x,
        view_shape=setup.view_shape,
        transform_kwargs=transform,
        batch_size=sizes.eval_batch,
        mesh=mesh,
    )
    for name, variables in encoders.items():
        feats = {
            split: pretrain.extract(
                model, variables, x, transform=transform, batch=sizes.eval_batch, mesh=mesh
            )
            for split, x in (("train", train_x), ("test", test_x))
        }
        results[name] = pretrain.probe_scores(feats["train"], train_y, feats["test"], test_y)
    results["pixels"] = pretrain.probe_scores(
        baselines.pixel_features(train_x), train_y, baselines.pixel_features(test_x), test_y
    )
    eval_s = time.perf_counter() - t0
    finite = all(np.isfinite(v) for v in losses_seen)
    return {
        "rows": [{"encoder": k, **v} for k, v in results.items()],
        "run": {
            "model": f"{sizes.learn_model}_cifar",
            "dtype": dtype,
            "batch": batch,
            "views": "28x28x1",
            "loss": "dhel tau=0.3",
            "optimizer": "lars, lr 1.0 x B/256, 10% warm-up, cosine",
            "steps_planned": steps,
            "steps_done": done,
            "epochs": done * batch / len(train_x),
            "train_examples": len(train_x),
            "test_examples": len(test_x),
            "budget_s": budget_s,
            "load_s": load_s,
            "compile_s": compile_s,
            "train_s": train_s,
            "eval_s": eval_s,
            "loss_every_100_steps": losses_seen,
            "online_probe_accuracy_every_100_steps": online_probe,
        },
        "protocols": "dhel-eval defaults: fast linear probe (probes.fit_linear_probe defaults, "
        "seed 0) and kNN (k 200, temperature 0.1) on encoder features; baselines as "
        "dhel-eval --baselines (random_init: the run's own initialisation with precise-BN "
        "statistics; pixels: x / 255)",
        "ok": finite,
    }


# ----------------------------------------------------------------------------------------------
def _meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "argv": sys.argv[1:],
        "tiny": args.tiny,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "device": _device_summary(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_avg_start": list(os.getloadavg()),
        "missing_modules": [
            m
            for m in (
                "tensorflow",
                "tensorflow_datasets",
                "grain",
                "ml_collections",
                "orbax",
                "dm_pix",
            )
            if not importable(m)
        ],
        "dm_pix_origin": importlib.util.find_spec("dm_pix").origin
        if importable("dm_pix")
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes: a CPU smoke run")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--fashion-mnist", type=Path, default=Path(DEFAULT_FASHION_MNIST))
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--time-limit", type=float, default=570.0, help="seconds, in all")
    parser.add_argument("--learn-seconds", type=float, default=None, help="training budget")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown}; accepted: {', '.join(SECTIONS)}")
    sizes = TINY if args.tiny else FULL
    start = time.perf_counter()
    report: dict[str, Any] = {"meta": _meta(args), "sections": {}}
    device = report["meta"]["device"]
    print(f"accelerator check on {device['local_devices']} x {device['device_kind']}", flush=True)

    def run(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            result = fn()
            result["status"] = "ok" if result.pop("ok") else "FAILED"
        except SectionSkipped as e:
            result = {"status": "skipped", "reason": str(e)}
        except ImportError as e:
            result = {"status": "skipped", "reason": f"import failed: {e}"}
        except Exception as e:  # noqa: BLE001 - one section's failure must not stop the others
            result = {
                "status": "error",
                "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}",
                "traceback": traceback.format_exc(),
            }
        result["seconds"] = time.perf_counter() - t0
        result["cpu_seconds"] = time.process_time() - c0
        report["sections"][name] = result
        print(
            f"{name}: {result['status']} in {result['seconds']:.1f} s "
            f"({result['cpu_seconds']:.1f} s CPU) "
            f"{result.get('reason', '')}",
            flush=True,
        )

    if "correctness" in sections:
        run("correctness", lambda: section_correctness(sizes))
    if "losses" in sections:
        run("losses", lambda: section_losses(sizes, device))
    if "train_step" in sections:
        run("train_step", lambda: section_train_step(sizes, device))
    if "learning" in sections:
        # The train step's time at the learning batch (32x32x3 images: an upper bound for the
        # 28x28x1 ones) sets how many steps fit the budget; its compile time, what to keep
        # aside for compiling the learning step.
        step_rows = report["sections"].get("train_step", {}).get("rows", [])
        times = [
            r["step_s"]
            for r in step_rows
            if r.get("batch") == sizes.learn_batch and r["dtype"] == learn_dtype() and "step_s" in r
        ]
        estimate = times[0] if times else None
        compile_s = max((r.get("compile_s", 0.0) for r in step_rows), default=0.0) or 60.0
        reserve = sizes.eval_reserve_s + (compile_s if sizes.eval_reserve_s else 0.0)
        left = args.time_limit - (time.perf_counter() - start) - reserve
        budget = min(args.learn_seconds or sizes.learn_seconds, left)
        if budget <= 0:
            report["sections"]["learning"] = {
                "status": "skipped",
                "reason": f"no time left within --time-limit {args.time_limit:.0f} s",
            }
        else:
            run("learning", lambda: section_learning(sizes, args.fashion_mnist, budget, estimate))

    report["meta"]["wall_s"] = time.perf_counter() - start
    report["meta"]["load_avg_end"] = list(os.getloadavg())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "accelerator_check.json").write_text(
        json.dumps(report, indent=1, default=str) + "\n"
    )
    import accelerator_report

    text = accelerator_report.markdown(report, SECTIONS)
    (args.out_dir / "accelerator_check.md").write_text(text + "\n")
    print(text)
    failed = [n for n, s in report["sections"].items() if s["status"] in ("FAILED", "error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
