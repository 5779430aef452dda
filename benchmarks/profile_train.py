"""Where the time of one pretraining step goes on this CPU: a per-op profile of the jitted step.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/profile_train.py [--model cpu_default|resnet18_cifar]
        [--devices 1] [--default-xla-flags] [--steps 3] [--top 25] [--out PATH]

One process builds ``dhel_jax.train``'s step for the model of ``benchmarks/bench_train.py``
(online probe off), with the XLA:CPU options ``dhel-train`` sets (``dhel_jax.cpu.CPU_XLA_FLAGS``)
or, with ``--default-xla-flags``, the compiler's defaults. It

1. times ``--steps`` steps after two warm-up steps;
2. records ``--steps`` more under ``jax.profiler.trace`` and sums the duration of every XLA op
   (thunk) event, grouped by the op's kind (the fusion name without its number: ``transpose_copy_
   fusion``, ``ynn_fusion``, ``wrapped_reduce-window``, ``all-reduce``, ...), per step and device;
3. names the biggest single ops with the source operation XLA recorded for them (from the
   optimised HLO, dumped with ``--xla_dump_to``).

XLA:CPU launches some convolutions asynchronously, so their trace events cover only the launch.
``--convs`` therefore also times every convolution of the model on its own (forward; forward and
weight gradient; forward and input gradient; all three), in JAX under the same flags (through
``dhel_jax.models.conv_general_dilated``, as the ResNets) and, when PyTorch is installed, in
PyTorch (channels-last, all cores) side by side.

Results go to ``--out`` (default ``benchmarks/out/profile_train.json``) and tables on stdout.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Trace events that are not XLA ops: runtime bookkeeping, Python frames, waiting.
_NOT_OPS = ("ThunkExecutor", "$", "Wait", "PjitFunction", "CommonPjRt", "ThreadpoolListener")
_WAITS = ("Rendezvous", "Wait: pending_threads")


def _hlo_sources(dump_dir: str) -> dict[str, tuple[str, str]]:
    """op name -> (result shape, the JAX operation XLA recorded for it) of the train step."""
    found = sorted(Path(dump_dir).glob("*jit_train_step.cpu_after_optimizations.txt"))
    if not found:
        return {}
    sources = {}
    pattern = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ")
    source = re.compile(r"op_name=\"([^\"]+)\"")
    for line in found[-1].read_text().splitlines():
        m = pattern.match(line)
        if m and m.group(1) not in sources:
            found_op = source.search(line)
            op = found_op.group(1) if found_op else "(fused; no source recorded)"
            op = op.replace("jit(train_step)/", "").replace("jvp(ContrastiveModel)/", "")
            sources[m.group(1)] = (m.group(2).split("{")[0], op)
    return sources


def _op_events(trace_dir: str) -> list[dict]:
    (path,) = Path(trace_dir).rglob("*.trace.json.gz")
    with gzip.open(path) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def profile(model: str, devices: int, default_flags: bool, steps: int, top: int) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from dhel_jax.cpu import cpu_xla_flags

    dump_dir = tempfile.mkdtemp(prefix="profile_train_hlo_")
    extra = [] if default_flags else cpu_xla_flags("")
    os.environ["XLA_FLAGS"] = " ".join(
        [f"--xla_force_host_platform_device_count={devices}", *extra, f"--xla_dump_to={dump_dir}"]
    )
    import bench_train
    import jax

    step = bench_train.jax_step(model, augment=True)
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    trace_dir = tempfile.mkdtemp(prefix="profile_train_trace_")
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            step()
    events = _op_events(trace_dir)
    sources = _hlo_sources(dump_dir)
    per = steps * devices
    by_kind: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    by_op: collections.Counter[str] = collections.Counter()
    waiting = 0.0
    for e in events:
        name = e["name"]
        if name.startswith(_WAITS):
            waiting += e["dur"]
            continue
        if name.startswith(_NOT_OPS):
            continue
        kind = re.sub(r"\.\d+$", "", name)
        by_kind[kind] += e["dur"]
        count[kind] += 1
        by_op[name] += e["dur"]
    ms = 1e-3 / per
    return {
        "model": model,
        "devices": devices,
        "xla_flags": " ".join(extra),
        "seconds_per_step": statistics.median(times),
        "step_times": times,
        "op_ms_per_step": round(sum(by_kind.values()) * ms, 1),
        "collective_wait_ms_per_step": round(waiting * ms, 1),
        "kinds": [
            {"kind": k, "ms_per_step": round(v * ms, 2), "ops_per_step": count[k] // per}
            for k, v in by_kind.most_common(top)
        ],
        "ops": [
            {
                "op": k,
                "ms_per_step": round(v * ms, 2),
                "shape": sources.get(k, ("?", "?"))[0],
                "source": sources.get(k, ("?", "?"))[1],
            }
            for k, v in by_op.most_common(top)
        ],
        "loadavg": os.getloadavg(),
    }


def conv_layers(model: str) -> list[dict]:
    """Every distinct convolution of ``model``: batch (2 views per image), input side, channels
    in and out, kernel size, stride, and how many times it occurs in the network."""
    import bench_train

    arch = bench_train._arch(bench_train.bench_config(model))
    b, side, width = 2 * arch["batch"], arch["view"], arch["width"]
    layers: collections.Counter[tuple] = collections.Counter()
    layers[(b, side, arch["channels"], width, 3, 1)] += 1  # the CIFAR stem
    cin = width
    for i, blocks in enumerate(arch["stage_sizes"]):
        cout = width * 2**i
        for j in range(blocks):
            stride = 2 if i > 0 and j == 0 else 1
            layers[(b, side, cin, cout, 3, stride)] += 1
            if stride != 1 or cin != cout:
                layers[(b, side, cin, cout, 1, stride)] += 1
            side = -(-side // stride)  # SAME padding: ceil(side / stride)
            layers[(b, side, cout, cout, 3, 1)] += 1
            cin = cout
    keys = ("batch", "side", "cin", "cout", "kernel", "stride")
    return [dict(zip(keys, k, strict=True), count=n) for k, n in layers.items()]


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_convs(layers: list[dict], repeats: int) -> list[dict]:
    """Milliseconds of each convolution: ``fwd``, ``fwd+wgrad``, ``fwd+xgrad``, ``fwd+both``
    for jax (jitted) and torch (eager, channels-last) on the same shapes."""
    try:
        import torch
    except ImportError:
        torch = None
    return [_time_conv(layer, repeats, torch) for layer in layers]


def _time_conv(layer: dict, repeats: int, torch) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    b, side, cin, cout, k, stride = (
        layer[key] for key in ("batch", "side", "cin", "cout", "kernel", "stride")
    )
    pad = k // 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, side, side, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) * 0.05, jnp.float32)

    from dhel_jax import models

    def conv(x, w):
        # What the ResNets call: jax.lax's convolution with the phase-by-phase input gradient
        # for strides > 1.
        return models.conv_general_dilated(
            x,
            w,
            (stride, stride),
            ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    def loss(x, w):
        return jnp.sum(conv(x, w) ** 2)

    jitted = {
        "fwd": jax.jit(conv),
        "fwd+wgrad": jax.jit(jax.grad(loss, argnums=1)),
        "fwd+xgrad": jax.jit(jax.grad(loss, argnums=0)),
        "fwd+both": jax.jit(jax.grad(loss, argnums=(0, 1))),
    }
    row = dict(layer)
    for name, fn in jitted.items():
        row[f"jax {name}"] = _median_ms(lambda fn=fn: jax.block_until_ready(fn(x, w)), repeats)
    if torch is None:
        return row
    torch.set_num_threads(os.cpu_count() or 1)
    tx = torch.randn(b, cin, side, side).contiguous(memory_format=torch.channels_last)
    tconv = torch.nn.Conv2d(cin, cout, k, stride, pad, bias=False)
    tconv = tconv.to(memory_format=torch.channels_last)

    def backward(need_x: bool, need_w: bool) -> None:
        tx.requires_grad_(need_x)
        tconv.weight.requires_grad_(need_w)
        y = tconv(tx)
        (y * y).sum().backward()

    with torch.no_grad():
        row["torch fwd"] = _median_ms(lambda: tconv(tx), repeats)
    row["torch fwd+wgrad"] = _median_ms(lambda: backward(False, True), repeats)
    row["torch fwd+xgrad"] = _median_ms(lambda: backward(True, False), repeats)
    row["torch fwd+both"] = _median_ms(lambda: backward(True, True), repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cpu_default", choices=("cpu_default", "resnet18_cifar"))
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--default-xla-flags", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--convs", action="store_true", help="also time every convolution")
    parser.add_argument("--conv-repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "profile_train.json"))
    args = parser.parse_args()
    result = profile(args.model, args.devices, args.default_xla_flags, args.steps, args.top)
    if args.convs:
        result["convs"] = time_convs(conv_layers(args.model), args.conv_repeats)
    print(
        f"{result['model']}, {result['devices']} device(s), XLA flags "
        f"{result['xla_flags'] or '(defaults)'}: {result['seconds_per_step']:.3f} s/step; "
        f"traced ops {result['op_ms_per_step']} ms/step, collective waits "
        f"{result['collective_wait_ms_per_step']} ms/step; load {result['loadavg']}"
    )
    print(f"\n{'ms/step':>8} {'ops':>5}  kind")
    for row in result["kinds"]:
        print(f"{row['ms_per_step']:8.1f} {row['ops_per_step']:5d}  {row['kind']}")
    print(f"\n{'ms/step':>8}  {'op':30s} {'shape':24s} source")
    for row in result["ops"]:
        print(f"{row['ms_per_step']:8.1f}  {row['op']:30s} {row['shape']:24s} {row['source'][:70]}")
    if args.convs:
        passes = ("fwd", "fwd+wgrad", "fwd+xgrad", "fwd+both")
        print("\nconvolutions, ms (jax / torch channels-last); x N: occurrences in the network")
        print(f"{'B x side, cin -> cout, k, stride':34s}" + "".join(f"{p:>18s}" for p in passes))
        total = collections.Counter()
        for row in result["convs"]:
            label = (
                f"{row['batch']}x{row['side']}, {row['cin']}->{row['cout']}, {row['kernel']}, "
                f"{row['stride']}  x{row['count']}"
            )
            cells = []
            for p in passes:
                jax_ms, torch_ms = row[f"jax {p}"], row.get(f"torch {p}")
                total[f"jax {p}"] += row["count"] * jax_ms
                if torch_ms is not None:
                    total[f"torch {p}"] += row["count"] * torch_ms
                cells.append(f"{jax_ms:8.1f} / {'-' if torch_ms is None else f'{torch_ms:6.1f}'}")
            print(f"{label:34s}" + "".join(f"{c:>18s}" for c in cells))
        cells = [f"{total[f'jax {p}']:8.1f} / {total.get(f'torch {p}', 0):6.1f}" for p in passes]
        print(f"{'network total':34s}" + "".join(f"{c:>18s}" for c in cells))
        result["conv_totals_ms"] = dict(total)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
