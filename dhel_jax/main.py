"""Command-line entry points (console scripts declared in pyproject.toml).

``dhel-train``::

    dhel-train --config configs/fashion_mnist.py --workdir runs/NAME \\
        [--config.loss.name=kcl --config.batch_size=128 ...]

trains with :func:`dhel_jax.train.train_and_evaluate`; a ``--workdir`` that already holds
checkpoints resumes from the latest one. ``--config configs/cifar10.py:kcl`` selects the loss
too. Config overrides are type-checked, and unknown fields rejected, while the flags are parsed;
the whole config is then validated before any data is read or anything compiled.

Before JAX starts its backends, ``dhel-train``

* calls ``jax.distributed.initialize()`` when it runs in a multi-process environment (Cloud TPU
  VMs, SLURM, Open MPI, or ``JAX_COORDINATOR_ADDRESS`` set; ``--distributed`` forces it on or
  off); every process then runs the same command;
* on a CPU-only machine, adds :data:`CPU_XLA_FLAGS` to ``XLA_FLAGS`` (YNNPACK for the
  convolutions, matmuls and reductions; results equal the default compiler's within float32
  round-off), and splits the host into ``--cpu_devices`` XLA devices (default 1: one
  device whose operations use every core) unless ``XLA_FLAGS`` already sets ``--xla_force_host_platform_device_count``. A flag the
  user's ``XLA_FLAGS`` already sets is never overridden. Sharded over several host devices,
  results equal the 1-device ones up to float round-off.

``dhel-eval`` does the same before it starts JAX, except that without ``--cpu_devices`` it splits
the host into one device per core (inference needs no collectives, and runs faster so).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

#: XLA options that dhel-train and dhel-eval add on CPU-only hosts: route convolutions,
#: matmuls and reductions to YNNPACK (XLA:CPU's default sends only reductions there, and
#: ``=dot`` alone sends the reductions back to a slow reduce-window path). Measured in
#: benchmarks/README_train.md; tests/test_train.py checks that a train step with them equals
#: one without them within float32 round-off.
CPU_XLA_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "dot,reduce"}
# The jaxlib series the flags were validated on: an XLA that does not know a flag in XLA_FLAGS
# aborts at start-up, so on any other jaxlib none is added.
_CPU_FLAGS_JAXLIB_SERIES = "0.10."

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Training config: a configs/*.py file, optionally with ':<loss name>'. Override fields "
    "with --config.<field>=<value>.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run directory (checkpoints/, metrics.jsonl, config.json, TensorBoard events). A workdir "
    "with checkpoints resumes from the latest.",
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "true", "false"],
    "Call jax.distributed.initialize(): auto-detected (Cloud TPU VM, SLURM, Open MPI, "
    "JAX_COORDINATOR_ADDRESS), or forced on/off.",
)
_CPU_DEVICES = flags.DEFINE_string(
    "cpu_devices",
    "1",
    "CPU-only runs: number of XLA host devices to shard the batch over ('1': one device whose "
    "ops use every core, the faster choice on 2 cores (benchmarks/README_train.md); 'auto': the "
    "largest divisor of the batch size <= the number of cores). Ignored when XLA_FLAGS sets "
    f"{_DEVICE_COUNT_FLAG} or an accelerator is present.",
)

_ACCELERATOR_PLUGINS = (
    "libtpu",
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm6_plugin",
    "jax_rocm7_plugin",
)


def _tpu_chips_present() -> bool:
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - a private helper: absent or changed means "unknown".
        return False


def _multiprocess_environment() -> bool:
    """Whether this process is one of several that must form a jax.distributed system."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return _tpu_chips_present()


def _accelerator_installed() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() not in ("cpu", "")
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def cpu_device_count(batch_size: int, requested: str, cores: int | None = None) -> int:
    """The number of host devices for a CPU run: ``requested``, or for ``'auto'`` the largest
    divisor of ``batch_size`` that is at most the number of cores."""
    if requested != "auto":
        try:
            count = int(requested)
        except ValueError:
            count = 0
        if count < 1:
            raise app.UsageError(
                f"--cpu_devices must be 'auto' or an integer >= 1; got {requested!r}."
            )
        return count
    cores = cores or os.cpu_count() or 1
    return max(d for d in range(1, min(cores, batch_size) + 1) if batch_size % d == 0)


def cpu_xla_flags(xla_flags: str, jaxlib_version: str | None = None) -> list[str]:
    """The :data:`CPU_XLA_FLAGS` to append to ``xla_flags`` (the user's ``XLA_FLAGS``): each
    one the user does not already set, and none on a jaxlib outside the validated series."""
    if jaxlib_version is None:
        try:
            jaxlib_version = importlib.metadata.version("jaxlib")
        except importlib.metadata.PackageNotFoundError:
            return []
    if not jaxlib_version.startswith(_CPU_FLAGS_JAXLIB_SERIES):
        return []
    return [f"{name}={value}" for name, value in CPU_XLA_FLAGS.items() if name not in xla_flags]


def use_cpu_xla_flags() -> list[str]:
    """Adds :data:`CPU_XLA_FLAGS` to ``XLA_FLAGS`` as ``dhel-train`` does, for code that trains
    in-process (a notebook, a script): only on a CPU-only host, never over a flag already set,
    and only on the validated jaxlib series. Call it before JAX's first computation, which is
    when XLA reads ``XLA_FLAGS``. Returns the flags it added."""
    if _accelerator_installed():
        return []
    xla_flags = os.environ.get("XLA_FLAGS", "")
    added = cpu_xla_flags(xla_flags)
    if added:
        os.environ["XLA_FLAGS"] = " ".join([xla_flags, *added]).strip()
    return added


def _configure_cpu_backend(batch_size: int, default_devices: str = "1") -> None:
    """On a CPU-only host: the CPU XLA flags and the device split (see the module docstring);
    ``default_devices`` is the split when ``--cpu_devices`` is not given."""
    if _accelerator_installed():
        return
    use_cpu_xla_flags()
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if _DEVICE_COUNT_FLAG not in xla_flags:
        requested = _CPU_DEVICES.value if flags.FLAGS["cpu_devices"].present else default_devices
        count = cpu_device_count(batch_size, requested)
        if count > 1:
            os.environ["XLA_FLAGS"] = f"{xla_flags} {_DEVICE_COUNT_FLAG}={count}".strip()


class _OwnInfoOnly(logging.Filter):
    """Keeps INFO records of dhel_jax only (Orbax logs every save at INFO), and every warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "dhel_jax" in record.pathname


def _train(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None or not _WORKDIR.value:
        raise app.UsageError(
            "usage: dhel-train --config configs/fashion_mnist.py --workdir runs/NAME "
            "[--config.<field>=<value> ...]"
        )
    absl_logging.get_absl_handler().addFilter(_OwnInfoOnly())
    distributed = _DISTRIBUTED.value == "true" or (
        _DISTRIBUTED.value == "auto" and _multiprocess_environment()
    )
    if not distributed:
        _configure_cpu_backend(config.batch_size)
    # Only now may JAX start its backends (XLA_FLAGS are read then).
    import jax

    from dhel_jax import train

    if distributed:
        jax.distributed.initialize()
    logging.info(
        "process %d of %d, %d devices: %s",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    train.train_and_evaluate(config, _WORKDIR.value)


def _fail(message: str) -> None:
    sys.stderr.write(
        f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help on "
        "flags.\n"
    )
    sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a clear message for an unknown ``--config.<field>``.

    (ml_collections raises a bare ``AttributeError`` naming only the missing key.)
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))
    except (AttributeError, KeyError) as e:
        text = str(e.args[0] if e.args else e)
        found = re.search(r"'(\w+)", text)
        missing = found.group(1) if found else text
        hint = re.search(r'Did you mean "\w+"', text)
        hint_text = f" {hint.group(0)}?" if hint else ""
        for arg in argv:
            parts = arg.split("=", 1)[0].lstrip("-").split(".")
            if parts[0] == "config" and missing in parts[1:]:
                parent = ".".join(parts[: parts.index(missing, 1)])
                _fail(f"{arg}: {parent} has no field {missing!r}.{hint_text}")
        _fail(f"unknown config field {missing!r}.{hint_text}")
    raise AssertionError("unreachable")


def train_main() -> None:
    """The ``dhel-train`` console script."""
    app.run(_train, argv=sys.argv, flags_parser=parse_flags)


# ----------------------------------------------------------------------------------------------
# dhel-eval (flags shared with dhel-train: --workdir, --cpu_devices).

_STEP = flags.DEFINE_integer(
    "step", None, "dhel-eval: checkpoint step to evaluate (default: the latest)."
)
_PROTOCOL = flags.DEFINE_enum(
    "protocol",
    None,
    ["fast", "paper"],
    "dhel-eval: linear-probe protocol (default: the run's config.eval.protocol). 'fast': L-BFGS "
    "logistic regression on precomputed features; 'paper': SGD on frozen features of cropped "
    "and flipped images (slow on CPUs).",
)
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "dhel-eval: where eval.json and plots/ go (default: --workdir)."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "dhel-eval: TFDS data directory (default: the run's config.data_dir)."
)
_PAPER_EPOCHS = flags.DEFINE_integer(
    "paper_epochs", None, "dhel-eval: epochs of the 'paper' probe (default: 100)."
)
_BASELINES = flags.DEFINE_boolean(
    "baselines",
    False,
    "dhel-eval: also score the same encoder at random initialisation (BatchNorm statistics "
    "re-estimated on train images) and the raw pixels, with the same probes.",
)
# dhel_jax.evaluate.EvalSettings.batch_size: the CPU split must divide it.
_EVAL_BATCH_SIZE = 256


def _eval(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise app.UsageError(
            "usage: dhel-eval --workdir runs/NAME [--step N] [--protocol fast|paper] "
            "[--baselines] [--out_dir DIR] [--data_dir DIR]"
        )
    if _CONFIG.value is not None:
        raise app.UsageError(
            "dhel-eval reads the run's config from its checkpoint; --config is for dhel-train."
        )
    absl_logging.get_absl_handler().addFilter(_OwnInfoOnly())
    # Inference has no collectives: one device per core extracts features ~1.5x faster on 2
    # cores than one device using both (benchmarks/README_eval.md).
    _configure_cpu_backend(_EVAL_BATCH_SIZE, default_devices="auto")
    # Only now may JAX start its backends (XLA_FLAGS are read then).
    from dhel_jax import checkpointing, data, evaluate

    paper = {} if _PAPER_EPOCHS.value is None else {"epochs": _PAPER_EPOCHS.value}
    try:
        results = evaluate.evaluate(
            _WORKDIR.value,
            step=_STEP.value,
            protocol=_PROTOCOL.value,
            out_dir=_OUT_DIR.value,
            data_dir=_DATA_DIR.value,
            progress=True,
            with_baselines=_BASELINES.value,
            paper_probe=paper,
        )
    except (checkpointing.CheckpointError, data.DatasetUnavailableError, ValueError) as e:
        sys.exit(f"dhel-eval: error: {e}")
    print(evaluate.summary(results))


def eval_main() -> None:
    """The ``dhel-eval`` console script::

        dhel-eval --workdir runs/NAME [--step N] [--protocol fast|paper] [--baselines]
            [--out_dir DIR]

    evaluates a checkpoint with :func:`dhel_jax.evaluate.evaluate` (read-only: nothing under
    ``<workdir>/checkpoints`` is written), writes ``eval.json`` and ``plots/*.png`` to the
    workdir (or ``--out_dir``) and prints a summary. A missing workdir or step, or an unreadable
    checkpoint, exits with status 1 and a message naming the path and the available steps.
    """
    app.run(_eval, argv=sys.argv, flags_parser=parse_flags)
