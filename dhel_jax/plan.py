"""Plan a TPU run on any machine: compile the real train step for a named TPU topology, deviceless.

``dhel-compile`` (``dhel_jax.main.compile_main``) calls :func:`compile_plan`. As MaxText's
``train_compile.py`` does, the step of :func:`dhel_jax.train.make_training` is lowered and
compiled by libtpu for a mesh of the topology's abstract devices
(``jax.experimental.topologies``), on a host with no TPU. The compiled program gives its own
figures, per chip:

* memory (``memory_analysis()``): arguments, outputs, temporaries and code, against the chip's
  HBM (:data:`CHIPS`);
* FLOPs and the compiler's cost-model time of one step (``cost_analysis()``), from which
  :func:`estimate` derives images/s and the model FLOPs utilisation (MFU). These are the
  compiler's *estimate*, not a measurement.

The cost model's ``optimal_seconds`` is negative for programs with ``ConcatBitcast`` custom
calls: each adds exactly -1 s, a sentinel for an operation the model does not time
(docs/accelerators.md, "Planning a TPU run", has the evidence). :func:`estimate` adds those
seconds back, reports no time at all (``None`` with a ``reason``) when the corrected time is
still not positive, and never a time below the roofline bound ``max(FLOPs / peak, bytes /
bandwidth)`` of the chip's table: a faster time is raised to the bound (``roofline_limited``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from dhel_jax import cost_model, data, parallel, train, train_config


class PlanError(Exception):
    """A plan that cannot be made (unknown topology, libtpu missing): a usage error."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of a TPU generation (Cloud TPU's system-architecture pages).

    Attributes:
      hbm_bytes: HBM capacity.
      peak_flops: peak dense bfloat16 FLOP/s (the MFU denominator).
      hbm_bytes_per_second: HBM bandwidth (the roofline's memory bound).
    """

    hbm_bytes: int
    peak_flops: float
    hbm_bytes_per_second: float


_GIB = 2**30
# Keyed by the device_kind of the topology's devices. libtpu's deviceless devices report no
# memory (memory_stats() needs an addressable device), hence a table.
CHIPS: dict[str, Chip] = {
    "TPU v4": Chip(32 * _GIB, 275e12, 1228e9),
    "TPU v5 lite": Chip(16 * _GIB, 197e12, 819e9),  # v5e
    "TPU v5": Chip(95 * _GIB, 459e12, 2765e9),  # v5p
    "TPU v6 lite": Chip(32 * _GIB, 918e12, 1640e9),  # v6e (Trillium)
}
# Pretraining images per dataset (docs/reproducing.md, "Expected wall time"): the learning-rate
# schedule's length, and the chip-hours of a run. ImageNet-100's is approximate.
PRETRAIN_EXAMPLES = {
    "fashion_mnist": 60_000,
    "cifar10": 50_000,
    "cifar100": 50_000,
    "stl10": 105_000,
    "imagenet100": 127_000,
}
_TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:2x4, v5p:2x2x1, v5p:2x2x2, v6e:2x2, v6e:2x4, v4:2x2x1"
INSTALL_HINT = "pip install 'dhel-jax[tpu]'"
# libtpu's refusal of a program larger than the chip's usable HBM (binary units).
_HBM_OOM = re.compile(
    r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def libtpu_available() -> bool:
    """Whether the TPU compiler (the ``libtpu`` package) is importable."""
    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):
        return False


def tpu_topology(name: str) -> Any:
    """``jax.experimental.topologies.get_topology_desc`` of a topology name such as ``v5e:2x4``.

    TPU v4 needs its megacore chip configuration and host bounds, which are given here.

    Raises:
      PlanError: libtpu is not installed, or libtpu does not know ``name``.
    """
    if not libtpu_available():
        raise PlanError(f"compiling for a TPU needs libtpu, which is not installed: {INSTALL_HINT}")
    from jax.experimental import topologies

    kwargs: dict[str, Any] = {}
    if name.lower().startswith("v4:"):
        kwargs = {"chip_config_name": "megacore", "chips_per_host_bounds": (2, 2, 1)}
    try:
        with _quiet_stderr():
            return topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
    except Exception as e:  # libtpu raises JaxRuntimeError (or others) with a long message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "lockfile" in first:
            raise PlanError(
                f"libtpu is held by another process (/tmp/libtpu_lockfile): {first}"
            ) from None
        raise PlanError(
            f"unknown TPU topology {name!r} ({first}); e.g. {_TOPOLOGY_EXAMPLES}"
        ) from None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Drops what native code writes to stderr meanwhile: libtpu, started on a host with no
    TPU, warns at length that it finds no TPU metadata, which is expected here. Kept with
    ``DHEL_JAX_TRACEBACK=1``."""
    if os.environ.get("DHEL_JAX_TRACEBACK", "").strip() not in ("", "0"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def topology_mesh(topology: Any) -> Mesh:
    """A 1-D ``('data',)`` mesh over every chip of ``topology``."""
    from jax.experimental import topologies

    devices = topology.devices
    return topologies.make_mesh(topology, (len(devices),), (parallel.DATA_AXIS,))


def plan_counts(config: ml_collections.ConfigDict) -> train.StepCounts:
    """The step counts of ``config``'s run, from :data:`PRETRAIN_EXAMPLES` (no data is read)."""
    n = PRETRAIN_EXAMPLES[config.dataset]
    steps_per_epoch = n // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"config.batch_size = {config.batch_size} is larger than {config.dataset}'s "
            f"{n} pretraining examples."
        )
    total = config.num_train_steps or max(1, int(config.num_epochs * n) // config.batch_size)
    warmup = min(int(round(config.optimizer.warmup_epochs * steps_per_epoch)), total - 1)
    return train.StepCounts(n, steps_per_epoch, total, warmup)


def batch_structs(config: ml_collections.ConfigDict, setup: train.Training) -> dict[str, Any]:
    """``jax.ShapeDtypeStruct`` of one global batch of ``config``, sharded as the step takes it."""
    info = data.get_dataset_info(config.dataset)
    b, sharding = config.batch_size, setup.batch_sharding
    batch = {
        "image": jax.ShapeDtypeStruct((b, *info.image_shape), jnp.uint8, sharding=sharding),
        "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharding),
    }
    if info.resize_shorter is not None:
        batch["size"] = jax.ShapeDtypeStruct((b, 2), jnp.int32, sharding=sharding)
    return batch


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # one dict per program on older jaxlibs
        cost = cost[0] if cost else {}
    return dict(cost or {})


def estimate(
    cost: Mapping[str, float],
    hlo_text: str,
    *,
    chip: Chip,
    batch_size: int,
    num_devices: int,
) -> dict[str, Any]:
    """The step time, images/s and MFU of the compiler's cost model (an estimate).

    ``step_seconds`` is ``optimal_seconds`` plus one second per ``ConcatBitcast`` custom call
    (the model's -1 s sentinel); ``images_per_second`` counts dataset images (each makes two
    views); ``mfu`` is ``flops_per_device / step_seconds / peak``. All three are ``None``, with a
    ``reason``, when the cost model gives no positive time. A time below the roofline bound
    ``max(flops / peak, bytes accessed / HBM bandwidth)`` is raised to it, and
    ``roofline_limited`` says so: no chip runs the step faster than its own table allows.
    """
    raw = cost.get("optimal_seconds")
    untimed = cost_model.untimed_custom_calls(hlo_text)
    flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    bound = max(flops / chip.peak_flops, bytes_accessed / chip.hbm_bytes_per_second)
    result: dict[str, Any] = {
        "kind": "estimate: the TPU compiler's cost model, not a measurement",
        "step_seconds": None,
        "images_per_second": None,
        "mfu": None,
        "optimal_seconds_raw": raw,
        "untimed_custom_calls": untimed,
        "roofline_seconds": bound,
    }
    if raw is None:
        result["reason"] = "the cost model gave no optimal_seconds"
        return result
    seconds = cost_model.corrected_seconds(raw, untimed)
    if seconds <= 0:
        result["reason"] = (
            f"the cost model's time {float(raw):.6g} s (+{untimed} s for {untimed} ConcatBitcast "
            f"calls = {seconds:.6g} s) is not positive"
        )
        return result
    if seconds < bound:
        result["roofline_limited"] = (
            f"the cost model's time {seconds:.6g} s is below the roofline bound {bound:.6g} s "
            "of the chip's peak and HBM bandwidth (dhel_jax.plan.CHIPS); the bound is used"
        )
        seconds = bound
    result.update(
        step_seconds=seconds,
        images_per_second=batch_size / seconds,
        mfu=flops / seconds / chip.peak_flops,
    )
    if untimed:
        result["correction"] = f"+{untimed} s: {untimed} ConcatBitcast calls timed at -1 s each"
    return result


def compile_plan(
    config: ml_collections.ConfigDict,
    topology_name: str,
    *,
    geometry: bool = False,
) -> tuple[dict[str, Any], Any]:
    """Compiles ``config``'s train step for the TPU topology ``topology_name``, deviceless.

    Args:
      config: a pretraining config (``configs/*.py``).
      topology_name: e.g. ``"v5e:2x4"`` (generation, then the chips' grid).
      geometry: keep ``config.geometry_every_steps``; by default the online-geometry branch is
        left out of the compiled step (``geometry_every_steps = 0``).

    Returns:
      ``(plan, compiled)``: the JSON-ready plan (``topology``, ``num_devices``,
      ``compile_seconds``, ``memory``, ``flops_per_device``, ``estimate``, ...) and the
      compiled program (``compiled.as_text()`` is its HLO).

    Raises:
      PlanError: libtpu is missing or the topology is unknown.
      ValueError: a bad config, or a batch that does not split over the topology's chips.
    """
    topology = tpu_topology(topology_name)
    config = _planned_config(config, geometry)
    num_devices = len(topology.devices)
    processes = len({d.process_index for d in topology.devices})
    train_config.validate_config(config, device_count=num_devices, process_count=processes)
    device_kind = topology.devices[0].device_kind
    mesh = topology_mesh(topology)
    counts = plan_counts(config)
    setup = train.make_training(config, mesh, counts)

    step: Any = setup.train_step  # jax.jit's wrapper (lower, trace)
    start = time.perf_counter()
    lowered = step.lower(setup.abstract_state(), batch_structs(config, setup))
    chip = CHIPS.get(device_kind)
    plan: dict[str, Any] = {
        "topology": topology_name,
        "device_kind": device_kind,
        "num_devices": num_devices,
        "num_hosts": processes,
        "dataset": config.dataset,
        "model": config.model.name,
        "dtype": config.model.dtype,
        "batch_size": config.batch_size,
        "batch_per_device": config.batch_size // num_devices,
        "geometry_every_steps": config.geometry_every_steps,
        "jax": jax.__version__,
    }
    try:
        compiled = lowered.compile()
    except Exception as e:  # JaxRuntimeError; libtpu refuses a program larger than the HBM
        memory = _refused_memory(e, chip)  # re-raises any other error
        plan["compile_seconds"] = round(time.perf_counter() - start, 2)
        plan["memory"] = memory
        plan["flops_per_device"] = None
        plan["estimate"] = _no_estimate("the step does not fit the chip's HBM: not compiled")
        return plan, None
    plan["compile_seconds"] = round(time.perf_counter() - start, 2)
    cost = _cost(compiled)
    plan["memory"] = _compiled_memory(compiled, chip)
    plan["flops_per_device"] = float(cost.get("flops", 0.0))
    plan["bytes_accessed_per_device"] = float(cost.get("bytes accessed", 0.0))
    plan["total_steps"] = counts.total_steps
    if chip is None:
        plan["estimate"] = _no_estimate(f"no chip figures for {device_kind!r} (plan.CHIPS)")
    else:
        plan["estimate"] = estimate(
            cost,
            compiled.as_text(),
            chip=chip,
            batch_size=config.batch_size,
            num_devices=num_devices,
        )
    seconds = plan["estimate"]["step_seconds"]
    plan["estimate"]["chip_hours"] = (
        None if seconds is None else counts.total_steps * seconds * num_devices / 3600
    )
    return plan, compiled


def _refused_memory(error: Exception, chip: Chip | None) -> dict[str, Any]:
    """The plan's ``memory`` of a step libtpu refused to compile for lack of HBM, with the
    bytes its message names; re-raises ``error`` when it is not that refusal."""
    message = str(error)
    oom = _HBM_OOM.search(message)
    if oom is None and "Ran out of memory" not in message:
        raise error
    needed = available = None
    if oom is not None:
        needed, available = (int(float(oom.group(i)) * _UNITS[oom.group(i + 1)]) for i in (1, 3))
    return {
        "argument_bytes": None,
        "output_bytes": None,
        "temp_bytes": needed,
        "code_bytes": None,
        "total_bytes": needed,
        "hbm_bytes": chip.hbm_bytes if chip else available,
        "usable_hbm_bytes": available,
        "fits": False,
        "compiler": message.strip().splitlines()[0],
    }


def _compiled_memory(compiled: Any, chip: Chip | None) -> dict[str, Any]:
    """The plan's ``memory`` of a compiled step, per chip."""
    memory = compiled.memory_analysis()
    argument = int(memory.argument_size_in_bytes)
    output = int(memory.output_size_in_bytes)
    alias = int(memory.alias_size_in_bytes)
    temp = int(memory.temp_size_in_bytes)
    code = int(memory.generated_code_size_in_bytes)
    # The donated state is aliased to the new one: count those bytes once.
    total = argument + output - alias + temp + code
    hbm = chip.hbm_bytes if chip else None
    return {
        "argument_bytes": argument,
        "output_bytes": output,
        "alias_bytes": alias,
        "temp_bytes": temp,
        "code_bytes": code,
        "total_bytes": total,
        "hbm_bytes": hbm,
        "fits": None if hbm is None else total <= hbm,
    }


def _no_estimate(reason: str) -> dict[str, Any]:
    return {
        "kind": "estimate: the TPU compiler's cost model, not a measurement",
        "step_seconds": None,
        "images_per_second": None,
        "mfu": None,
        "reason": reason,
    }


def lower_for(config: ml_collections.ConfigDict, platform: str, *, geometry: bool = False) -> dict:
    """Lowers ``config``'s train step for ``platform`` (e.g. ``"cuda"``) on this host, as a
    smoke check: no compile, no figures; a one-device mesh of this host's first device."""
    config = _planned_config(config, geometry)
    train_config.validate_config(config, device_count=1, process_count=1)
    mesh = parallel.data_mesh(jax.devices()[:1])
    setup = train.make_training(config, mesh, plan_counts(config))
    step: Any = setup.train_step
    start = time.perf_counter()
    traced = step.trace(setup.abstract_state(), batch_structs(config, setup))
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    return {
        "platform": platform,
        "lowered": True,
        "lower_seconds": round(time.perf_counter() - start, 2),
        "stablehlo_chars": len(text),
        "convolutions": text.count("stablehlo.convolution"),
    }


def _planned_config(config: ml_collections.ConfigDict, geometry: bool) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
    if not geometry:
        config.geometry_every_steps = 0
    return config


def summary(plan: Mapping[str, Any]) -> str:
    """A few lines of ``plan`` for the terminal (the JSON holds everything)."""
    lines = [
        f"{plan['dataset']} {plan['model']} {plan['dtype']}, batch {plan['batch_size']} on "
        f"{plan['topology']} ({plan['num_devices']} x {plan['device_kind']}), compiled in "
        f"{plan['compile_seconds']:.1f} s",
        _memory_line(plan["memory"]),
    ]
    if plan["flops_per_device"] is not None:
        lines.append(f"FLOPs per chip and step: {plan['flops_per_device']:.4g}")
    lines.append(_estimate_line(plan))
    return "\n".join(lines)


def _memory_line(m: Mapping[str, Any]) -> str:
    if m["total_bytes"] is None:
        return f"memory per chip: does not fit ({m.get('compiler', 'not compiled')})"
    gib = 1 / _GIB
    hbm = "unknown" if m["hbm_bytes"] is None else f"{m['hbm_bytes'] * gib:.2f} GiB"
    verdict = {True: "fits", False: "does not fit", None: "unknown"}[m["fits"]]
    total, temp = m["total_bytes"] * gib, m["temp_bytes"] * gib
    return f"memory per chip: {total:.2f} GiB of {hbm} (temporaries {temp:.2f} GiB): {verdict}"


def _estimate_line(plan: Mapping[str, Any]) -> str:
    e = plan["estimate"]
    if e["step_seconds"] is None:
        return f"estimate: none ({e['reason']})"
    return (
        f"estimate (cost model, not a measurement): {e['step_seconds'] * 1e3:.1f} ms/step, "
        f"{e['images_per_second']:.0f} images/s, MFU {100 * e['mfu']:.1f}%, "
        f"{e['chip_hours']:.1f} chip-hours for {plan['total_steps']} steps"
    )
