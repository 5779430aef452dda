"""dhel-compile (dhel_jax.plan): the train step compiled for a TPU topology on this CPU-only host.

The compiling tests need libtpu (the CI leg on Python 3.12 has it) and skip without it; the
missing-libtpu and CUDA-lowering tests run everywhere. libtpu lets one process compile at a
time (it holds /tmp/libtpu_lockfile), so the compiling tests run their tools one after another.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dhel_jax import main, plan

needs_libtpu = pytest.mark.skipif(
    not plan.libtpu_available(), reason="needs libtpu (pip install 'dhel-jax[tpu]')"
)
TINY = ("--config=configs/cifar10.py", "--config.model.name=resnet_tiny")
# Run as the console script runs, with one import made to fail when asked.
_BLOCK_LIBTPU = """
import importlib.abc, sys
class _NoLibtpu(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'libtpu':
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, _NoLibtpu())
"""


def _dhel_compile(*args: str, block_libtpu: bool = False) -> subprocess.CompletedProcess:
    code = (_BLOCK_LIBTPU if block_libtpu else "") + (
        "import sys; sys.argv[0] = 'dhel-compile'; from dhel_jax import main; main.compile_main()"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600
    )


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dhel-compile: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@needs_libtpu
def test_dhel_compile_tiny_config_on_v5e_2x2_fits(tmp_path):
    out = tmp_path / "plan.json"
    proc = _dhel_compile(*TINY, "--config.batch_size=16", "--topology=v5e:2x2", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["topology"] == "v5e:2x2"
    assert result["num_devices"] == 4
    assert result["compile_seconds"] > 0
    assert result["geometry_every_steps"] == 0  # the geometry branch is left out by default
    memory = result["memory"]
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "code_bytes", "total_bytes"):
        assert isinstance(memory[key], int) and memory[key] >= 0, key
    assert memory["hbm_bytes"] == 16 * 2**30  # a v5e chip
    assert memory["fits"] is True
    assert result["flops_per_device"] > 0
    estimate = result["estimate"]
    assert "not a measurement" in estimate["kind"]
    if estimate["step_seconds"] is None:
        assert estimate["reason"]
    else:
        assert estimate["step_seconds"] >= estimate["roofline_seconds"] > 0
        assert estimate["images_per_second"] == pytest.approx(16 / estimate["step_seconds"])
        assert 0 < estimate["mfu"] < 1
    assert "not a measurement" in proc.stdout


@needs_libtpu
def test_dhel_compile_impossible_batch_does_not_fit():
    # 49152 CIFAR images (98304 views) of a 64-wide ResNet on 4 chips: tens of GiB per chip.
    proc = _dhel_compile(
        *TINY,
        "--config.model.num_filters=64",
        "--config.batch_size=49152",
        "--topology=v5e:2x2",
    )
    assert proc.returncode == main.EXIT_FAILURE, proc.stderr
    result = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert result["memory"]["fits"] is False
    line = _error_line(proc)
    assert "GiB per chip" in line and "GiB of HBM" in line, line


@needs_libtpu
def test_dhel_compile_unknown_topology_is_one_line_exit_2():
    proc = _dhel_compile(*TINY, "--topology=v9z:2x2")
    assert proc.returncode == main.EXIT_USAGE, proc.stderr
    line = _error_line(proc)
    assert "unknown TPU topology 'v9z:2x2'" in line and "v5e:2x4" in line, line


def test_dhel_compile_without_libtpu_is_one_line_exit_2():
    proc = _dhel_compile(*TINY, "--topology=v5e:2x2", block_libtpu=True)
    assert proc.returncode == main.EXIT_USAGE, proc.stderr
    line = _error_line(proc)
    assert line.startswith("dhel-compile: error: ") and "pip install 'dhel-jax[tpu]'" in line


def test_dhel_compile_lowers_for_cuda_as_a_smoke_check():
    proc = _dhel_compile(*TINY, "--config.batch_size=8", "--platform=cuda")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert result["platform"] == "cuda" and result["lowered"] is True
    assert result["convolutions"] > 0


def test_estimate_adds_back_the_cost_models_untimed_calls_and_refuses_impossible_times():
    chip = plan.CHIPS["TPU v5 lite"]
    hlo = 'custom-call(), custom_call_target="ConcatBitcast"\n' * 3
    cost = {"flops": 1e12, "bytes accessed": 1e9, "optimal_seconds": -3 + 0.02}
    got = plan.estimate(cost, hlo, chip=chip, batch_size=256, num_devices=8)
    assert got["step_seconds"] == pytest.approx(0.02)
    assert got["images_per_second"] == pytest.approx(256 / 0.02)
    assert got["mfu"] == pytest.approx(1e12 / 0.02 / chip.peak_flops)
    assert got["untimed_custom_calls"] == 3
    # Negative with no such calls: no estimate.
    bad = plan.estimate(
        {**cost, "optimal_seconds": -0.5}, "", chip=chip, batch_size=256, num_devices=8
    )
    assert bad["step_seconds"] is None and bad["mfu"] is None and "not positive" in bad["reason"]
    # Faster than the chip's roofline allows: raised to the bound, and said so.
    bound = max(1e12 / chip.peak_flops, 1e9 / chip.hbm_bytes_per_second)
    fast = plan.estimate(
        {**cost, "optimal_seconds": 1e-6}, "", chip=chip, batch_size=256, num_devices=8
    )
    assert fast["step_seconds"] == pytest.approx(bound) and fast["roofline_seconds"] == bound
    assert fast["mfu"] == pytest.approx(1e12 / bound / chip.peak_flops)
    assert "roofline bound" in fast["roofline_limited"] and "reason" not in fast
    assert "roofline_limited" not in got
