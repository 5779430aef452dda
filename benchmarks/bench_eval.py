"""Wall time of ``dhel-eval`` on a trained run, and of its two heavy phases.

Measures, for each requested number of XLA host devices (``--cpu_devices``, CPU only):

* ``dhel-eval``: the whole command in a fresh process (imports, checkpoint restore, data
  loading, compilation, feature extraction, ``fast`` probe, kNN, geometry, plots), with the
  per-phase seconds it records in ``eval.json``. Outputs go to a temporary ``--out_dir``: the
  run's workdir is not touched.
* ``extract``: ``features.extract_features`` of the train + test splits (70k images for
  Fashion-MNIST), first call (with compilation) and a second, warm call; images per second.
* ``fast_probe``: ``probes.linear_probe_accuracy`` on those features, first and second call.

Usage::

    dhel-train --config configs/fashion_mnist.py --workdir runs/fashion_mnist_dhel
    PYTHONPATH=. python benchmarks/bench_eval.py --workdir runs/fashion_mnist_dhel \\
        [--cpu_devices 1,2] [--out benchmarks/out/bench_eval.json]

The machine's load average (other jobs share the cores) is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dhel_jax import cpu  # noqa: E402 - after the path set-up; starts no JAX backend.

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG))
    # The CPU flags dhel-eval sets itself, so that the worker's phases are timed as they run there.
    flags = " ".join([flags, *cpu.cpu_xla_flags(flags)])
    env["XLA_FLAGS"] = f"{flags} {DEVICE_FLAG}={devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def bench_cli(workdir: str, devices: int) -> dict:
    """``dhel-eval --workdir WORKDIR --out_dir TMP`` in a fresh process."""
    with tempfile.TemporaryDirectory() as out_dir:
        command = [
            sys.executable,
            "-c",
            "import sys; from dhel_jax import main; main.eval_main()",
            f"--workdir={workdir}",
            f"--out_dir={out_dir}",
        ]
        start = time.perf_counter()
        proc = subprocess.run(command, env=_env(devices), capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"dhel-eval failed:\n{proc.stderr[-3000:]}")
        results = json.loads((Path(out_dir) / "eval.json").read_text())
    return {
        "wall_s": round(wall, 2),
        "phases_s": results["timings"],
        "linear_probe_accuracy": results["linear_probe"]["accuracy"],
        "knn_accuracy": results["knn"]["accuracy"],
        "step": results["step"],
        "summary": proc.stdout.strip(),
    }


def bench_phases(workdir: str, devices: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", "--workdir", workdir],
        env=_env(devices),
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker(workdir: str) -> None:
    """Times extraction and the fast probe in this process (XLA_FLAGS set by the parent)."""
    import jax
    import numpy as np

    from dhel_jax import (
        builders,
        checkpointing,
        data,
        eval_settings,
        features,
        parallel,
        probes,
    )

    config, variables, _ = checkpointing.restore_for_eval(workdir)
    info = data.get_dataset_info(config.dataset)
    splits = [data.load_split(config.dataset, s) for s in (info.train_split, info.test_split)]
    model = builders.build_model(config)
    kwargs = dict(
        batch_size=eval_settings.EvalSettings().batch_size,
        mesh=parallel.data_mesh(jax.local_devices()),
        transform_kwargs=builders.eval_transform_kwargs(config),
    )
    num_images = sum(len(y) for _, y in splits)
    out: dict = {"devices": jax.local_device_count(), "images": num_images}
    for label in ("extract_first_s", "extract_warm_s"):
        start = time.perf_counter()
        feats = [features.extract_features(model, variables, x, **kwargs) for x, _ in splits]
        out[label] = round(time.perf_counter() - start, 2)
    out["extract_warm_images_per_s"] = round(num_images / out["extract_warm_s"])
    (_, y_train), (_, y_test) = splits
    for label in ("fast_probe_first_s", "fast_probe_warm_s"):
        start = time.perf_counter()
        probe = probes.linear_probe_accuracy(
            feats[0]["features"],
            y_train,
            feats[1]["features"],
            y_test,
            num_classes=info.num_classes,
        )
        out[label] = round(time.perf_counter() - start, 2)
    out["fast_probe_accuracy"] = probe["accuracy"]
    out["feature_dim"] = int(np.shape(feats[0]["features"])[1])
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a dhel-train run directory")
    parser.add_argument("--cpu_devices", default="2", help="comma-separated device counts")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "bench_eval.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.workdir)
        return

    report: dict = {
        "workdir": os.path.abspath(args.workdir),
        "xla_flags": _env(1)["XLA_FLAGS"],
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "load_average_start": os.getloadavg(),
        "runs": [],
    }
    for devices in (int(d) for d in args.cpu_devices.split(",")):
        print(f"== {devices} device(s): dhel-eval ...", flush=True)
        cli = bench_cli(args.workdir, devices)
        print(cli["summary"])
        print(f"   wall {cli['wall_s']:.1f} s; phases {cli['phases_s']}", flush=True)
        print(f"== {devices} device(s): extraction and fast probe, first and warm ...", flush=True)
        phases = bench_phases(args.workdir, devices)
        print(f"   {phases}", flush=True)
        report["runs"].append({"devices": devices, "dhel_eval": cli, "phases": phases})
    report["load_average_end"] = os.getloadavg()
    import jax

    report["versions"] = {"jax": jax.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"load average {report['load_average_start']} -> {report['load_average_end']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
