"""Smoke test of benchmarks/bench_losses.py: a ``--quick`` run writes a well-formed report.

No timing assertions: the run must finish, every section must be present, every
PyTorch baseline must have been verified equal to our loss (value and gradients)
before it was timed, and every figure must be a positive finite number.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

import dhel_jax.metrics  # noqa: E402
from dhel_jax.losses import LOSSES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_losses.py"
QUICK_SIZES = (32, 64)
PUBLISHED = ("dhel", "kcl", "align_uniform")


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench_losses.json"
    # Passive OpenMP waiting keeps torch's tiny cases fast on a busy machine.
    proc = _run("--quick", "--omp-wait-policy", "passive", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_timing(t: dict, min_rounds: int = 5) -> None:
    assert _positive_finite(t["median_s"])
    assert t["min_s"] <= t["median_s"] <= t["max_s"]
    assert t["rounds"] >= min_rounds


def test_meta_and_no_failures(quick_run):
    report, _ = quick_run
    meta = report["meta"]
    assert meta["quick"] is True
    assert meta["torch"] is not None and meta["torch_threads"] == 2
    assert meta["omp_wait_policy"] == "passive"
    assert len(meta["load_avg_start"]) == 3 and len(meta["load_avg_end"]) == 3
    assert report["failures"] == []


def test_losses_section_verified_against_torch(quick_run):
    report, stdout = quick_run
    rows = {(r["loss"], r["m"]): r for r in report["losses"]}
    assert set(rows) == {(name, m) for name in LOSSES for m in QUICK_SIZES}
    for (name, m), row in rows.items():
        assert math.isfinite(row["loss_value"])
        _check_timing(row["ours"])
        expected = {"dense", "published"} if name in PUBLISHED else {"dense"}
        assert set(row["torch"]) == expected, (name, row["torch"])
        for info in row["torch"].values():
            assert info["verified"] is True
            assert info["loss_rel_diff"] <= 1e-4 and info["grad_rel_diff"] <= 1e-3
            _check_timing(info)
            ratio = row["ours"]["median_s"] / info["median_s"]
            assert info["ratio_ours_over_torch"] == pytest.approx(ratio)
        assert f"{name:>13} M={m:<5}" in stdout


def test_wasserstein_section(quick_run):
    report, _ = quick_run
    section = report["wasserstein"]
    if getattr(dhel_jax.metrics, "wasserstein_uniformity", None) is None:
        assert "not present" in section["skipped"] and section["rows"] == []
        return
    assert [r["n"] for r in section["rows"]] == [200]
    for row in section["rows"]:
        assert row["pairs"] == row["n"] * (row["n"] - 1) // 2
        assert _positive_finite(row["value"])
        _check_timing(row["ours"])
        assert row["torch_sort"]["verified"] is True
        _check_timing(row["torch_sort"])


def test_tiled_section(quick_run):
    report, _ = quick_run
    rows = report["tiled"]
    assert [r["loss"] for r in rows] == ["dhel", "kcl"]
    for row in rows:
        assert row["verified"] is True
        _check_timing(row["dense"])
        _check_timing(row["tiled"])
        assert row["ratio_tiled_over_dense"] == pytest.approx(
            row["tiled"]["median_s"] / row["dense"]["median_s"]
        )


def test_memory_section(quick_run):
    report, _ = quick_run
    rows = report["memory"]
    assert [r["loss"] for r in rows] == ["dhel", "kcl"]
    for row in rows:
        assert row["finite"] is True
        assert _positive_finite(row["time_s"]) and _positive_finite(row["compile_s"])
        assert row["peak_rss_bytes"] >= row["rss_after_inputs_bytes"] > 0
        assert row["ru_maxrss_children_bytes"] >= row["peak_rss_bytes"]
        assert row["dense_matrix_bytes_avoided"] == row["m"] * row["m"] * 4


def test_unknown_section_is_rejected():
    proc = _run("--sections", "losses,nope", timeout=300)
    assert proc.returncode != 0
    assert "unknown section ['nope']" in proc.stderr
