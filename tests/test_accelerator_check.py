"""benchmarks/accelerator_check.py: the ``--tiny`` run on CPU, as-is and as on an accelerator host.

The accelerator host has jax, flax, optax, numpy and scipy but no TensorFlow, TFDS, grain,
ml_collections, orbax or dm_pix: the second run refuses those imports (dm_pix may then come only
from the wheel in benchmarks/vendor/). Both runs share a persistent compilation cache, so the
second one mostly re-uses the first one's programs. Also: the peak-FLOP/s table, the compiler's
step-time estimate and ``parallel.prefetch_to_device``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dhel_jax import parallel

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator_check.py"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
BLOCKED = ("tensorflow", "tensorflow_datasets", "grain", "ml_collections", "orbax", "array_record")

# Runs SCRIPT with the host's missing modules refused; dm_pix only from a vendored wheel.
HOST_LIKE = """
import importlib.abc, importlib.machinery, runpy, sys
BLOCKED = {blocked!r}

class AcceleratorHost(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (refused)", name=name)
        if name == "dm_pix":
            wheels = [p for p in sys.path if p.endswith(".whl") and "dm_pix-" in p]
            if not wheels:
                raise ModuleNotFoundError("No module named 'dm_pix' (refused)", name=name)
            return importlib.machinery.PathFinder.find_spec(name, wheels)
        return None

sys.meta_path.insert(0, AcceleratorHost())
sys.argv = [{script!r}, *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def _env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["JAX_PLATFORMS"] = "cpu"
    # Two devices, so that the sharded checks shard; no LLVM optimisation of the many small
    # programs (compiles 20% less CPU time; the figures are not what is tested).
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _run(cmd: list[str], cache_dir: Path, out_dir: Path) -> dict:
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(cache_dir), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out_dir / "accelerator_check.json").read_text())
    markdown = (out_dir / "accelerator_check.md").read_text()
    assert markdown.strip() in proc.stdout  # the table is printed too
    return report


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _check_report(report: dict, *, with_data: bool) -> None:
    sections = report["sections"]
    assert report["meta"]["tiny"] is True
    assert report["meta"]["device"]["local_devices"] == 2
    # Correctness: every check ran and holds.
    corr = sections["correctness"]
    assert corr["status"] == "ok", corr.get("reason") or corr.get("failed")
    checks = [r["check"] for r in corr["rows"]]
    for name in ("info_nce", "simclr", "dcl", "dclw", "dhel", "kcl", "align_uniform"):
        for kind in ("float32 value", "float32 gradient", "bfloat16 inputs"):
            assert f"{name}: {kind}" in checks
    assert any("sharded over 2 devices (shard_map)" in c for c in checks)
    assert all(r["ok"] and r["error"] <= r["tolerance"] for r in corr["rows"])
    # Losses: every (loss, size, mode) timed and finite.
    rows = sections["losses"]["rows"]
    assert {(r["loss"], r["m"], r["mode"]) for r in rows} == {
        (loss, m, mode)
        for loss in ("dhel", "kcl")
        for m in (256, 512)
        for mode in ("dense", "tiled")
    }
    for r in rows:
        assert r["status"] == "ok" and r["median_s"] > 0 and r["flops"] > 0
        assert math.isclose(r["tflops_per_s"], r["flops"] / r["median_s"] / 1e12)
    # Train step (dhel_jax.step's): a finite loss, rates, and XLA's FLOP count; the compiler's
    # time estimate is a TPU's only.
    (step,) = sections["train_step"]["rows"]
    assert "compiler_estimate" not in step
    assert step["loss_finite"] and step["flops_per_step"] > 0
    assert step["images_per_s"] > 0 and step["host_images_per_s"] > 0
    assert step["fed_images_per_s"] > 0
    assert step["mfu"] is None  # a CPU has no entry in the peak table
    learning = sections["learning"]
    if not with_data:
        assert learning["status"] == "skipped" and "IDX files not found" in learning["reason"]
        return
    assert learning["status"] == "ok", learning.get("reason")
    scores = {r["encoder"]: r for r in learning["rows"]}
    assert set(scores) == {"pretrained", "random_init", "pixels"}
    for r in scores.values():
        assert 0.1 < r["linear"] <= 1.0 and 0.1 < r["knn"] <= 1.0  # above chance (10 classes)
    assert learning["run"]["steps_done"] == learning["run"]["steps_planned"]
    # The real step's online probe ran on the labels.
    assert all(0.0 <= a <= 1.0 for a in learning["run"]["online_probe_accuracy_every_100_steps"])


@pytest.mark.slow
def test_tiny_run(tmp_path, cache_dir):
    data = ["--fashion-mnist", str(FASHION_MNIST)] if FASHION_MNIST.is_dir() else []
    out = tmp_path / "out"
    report = _run(
        [sys.executable, str(SCRIPT), "--tiny", "--out-dir", str(out), *data], cache_dir, out
    )
    _check_report(report, with_data=bool(data))


@pytest.mark.slow
def test_tiny_run_without_tf_tfds_grain_ml_collections(tmp_path, cache_dir):
    data = str(FASHION_MNIST) if FASHION_MNIST.is_dir() else str(tmp_path / "absent")
    out = tmp_path / "out"
    args = ["--tiny", "--out-dir", str(out), "--fashion-mnist", data]
    code = HOST_LIKE.format(blocked=BLOCKED, script=str(SCRIPT), args=args)
    report = _run([sys.executable, "-c", code], cache_dir, out)
    assert set(BLOCKED) - {"array_record"} <= set(report["meta"]["missing_modules"])
    assert "benchmarks/vendor/dm_pix-" in report["meta"]["dm_pix_origin"]
    _check_report(report, with_data=FASHION_MNIST.is_dir())


def test_missing_fashion_mnist_skips_only_that_section(tmp_path, cache_dir):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--out-dir", str(out)]
    cmd += ["--sections", "learning", "--fashion-mnist", str(tmp_path)]
    report = _run(cmd, cache_dir, out)
    assert list(report["sections"]) == ["learning"]
    assert report["sections"]["learning"]["status"] == "skipped"
    assert str(tmp_path) in report["sections"]["learning"]["reason"]


def test_peak_flops_table():
    sys.path.insert(0, str(SCRIPT.parent))
    import accelerator_check as check

    assert check.peak_flops("NVIDIA H200", "bfloat16") == (989.5e12, "NVIDIA H200 SXM")
    assert check.peak_flops("NVIDIA H100 PCIe", "float32_default")[0] == 378e12
    assert check.peak_flops("NVIDIA H100 NVL", "bfloat16")[1] == "NVIDIA H100 NVL"
    assert check.peak_flops("NVIDIA A100-SXM4-80GB", "float32_highest")[0] == 19.5e12
    assert check.peak_flops("NVIDIA L4", "bfloat16")[0] == 121e12
    assert check.peak_flops("NVIDIA L40S", "bfloat16")[0] is None  # not an L4
    assert check.peak_flops("TPU v5 lite", "bfloat16")[1] == "TPU v5e"
    assert check.peak_flops("TPU v5", "bfloat16")[1] == "TPU v5p"
    assert check.peak_flops("TPU v6 lite", "bfloat16")[1] == "TPU v6e"
    assert check.peak_flops("TPU v4", "bfloat16")[0] == 275e12
    peak, why = check.peak_flops("cpu", "bfloat16")
    assert peak is None and "unknown device kind 'cpu'" in why
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        check.peak_flops("NVIDIA H200", "fp8")


def test_compiler_estimate_is_a_positive_time_or_null_with_the_reason():
    sys.path.insert(0, str(SCRIPT.parent))
    import accelerator_check as check
    import accelerator_report

    good = check.compiler_estimate({"flops": 2.5e12, "optimal_seconds": 0.0117})
    assert good == {"step_s": 0.0117, "flops": 2.5e12, "reason": None}
    line = check.estimate_line(0.0125, good)
    assert line == "measured 12.50 ms/step vs compiler estimate 11.70 ms/step"
    # The TPU cost model's negative times (issue 27) and a backend without one are no estimate.
    negative = check.compiler_estimate({"flops": 2.5e12, "optimal_seconds": -3.9883})
    assert negative["step_s"] is None and negative["flops"] == 2.5e12
    assert "optimal_seconds = -3.9883, not a time" in negative["reason"]
    assert check.estimate_line(0.0125, negative) == (
        "measured 12.50 ms/step vs compiler estimate null (the compiler's cost analysis gives "
        "optimal_seconds = -3.9883, not a time)"
    )
    # A whole TPU step: -1 s per ConcatBitcast call, added back as dhel-compile does.
    hlo = 'x = f32[8] custom-call(y), custom_call_target="ConcatBitcast"\n' * 4
    assert check.compiler_estimate({"optimal_seconds": -3.9883}, hlo)["step_s"] == pytest.approx(
        0.0117
    )
    still = check.compiler_estimate({"optimal_seconds": -4.5}, hlo)
    assert still["step_s"] is None and "(+4 s for 4 ConcatBitcast calls)" in still["reason"]
    for cost in ({"flops": 1.0, "optimal_seconds": float("nan")}, {"optimal_seconds": 0.0}):
        assert check.compiler_estimate(cost)["step_s"] is None
    missing = check.compiler_estimate({"flops": -1.0})
    assert missing == {
        "step_s": None,
        "flops": None,
        "reason": "the compiler's cost analysis gives no optimal_seconds",
    }

    class Compiled:  # older JAX: a list with one dict per program
        def cost_analysis(self):
            return [{"flops": 4.0, "optimal_seconds": 2e-3}]

    assert check.compiler_estimate(check._cost_analysis(Compiled()))["step_s"] == 2e-3
    # The markdown report prints the line under the train-step table.
    row = {"model": "resnet18_cifar", "dtype": "bfloat16", "batch": 256, "images_per_s": 2e4}
    row["compiler_estimate"] = dict(good, line=line)
    report = {
        "meta": {
            "device": {"local_devices": 4, "device_kind": "TPU v5 lite", "backend": "tpu"},
            "jax": jax.__version__,
            "started": "now",
            "wall_s": 1.0,
            "tiny": False,
        },
        "sections": {
            "train_step": {
                "status": "ok",
                "rows": [row],
                "prefetch": {"dhel-train": "no", "this check": "yes"},
            }
        },
    }
    report["meta"]["device"]["peak_source"] = "TPU v5e"
    text = accelerator_report.markdown(report, check.SECTIONS)
    assert f"* bfloat16, batch 256: {line}" in text


def test_read_idx_round_trip(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import gzip
    import struct

    import accelerator_pretrain as pretrain

    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">HBB3I", 0, 8, 3, 2, 3, 4) + images.tobytes()))
    np.testing.assert_array_equal(pretrain.read_idx(path), images)
    path.write_bytes(gzip.compress(struct.pack(">HBB1I", 0, 0x0D, 1, 2) + b"\0" * 8))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        pretrain.read_idx(path)


def test_prefetch_to_device_keeps_order_and_places_batches(eight_devices):
    mesh = parallel.data_mesh(eight_devices)
    sharding = parallel.batch_sharding(mesh)
    host = [{"image": np.full((8, 2), i, np.int32)} for i in range(5)]
    out = list(parallel.prefetch_to_device(iter(host), sharding, size=2))
    assert [int(b["image"][0, 0]) for b in out] == [0, 1, 2, 3, 4]
    for b in out:
        assert isinstance(b["image"], jax.Array) and b["image"].sharding == sharding
    # The source is read exactly size - 1 batches ahead of the consumer.
    reads = []

    def source():
        for i, batch in enumerate(host):
            reads.append(i)
            yield batch

    it = parallel.prefetch_to_device(source(), sharding, size=3)
    next(it)
    assert reads == [0, 1, 2]
    with pytest.raises(ValueError, match="size must be an integer >= 1"):
        next(parallel.prefetch_to_device(iter(host), sharding, size=0))
