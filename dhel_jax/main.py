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
  device whose operations use every core) unless ``XLA_FLAGS`` already sets
  ``--xla_force_host_platform_device_count``. A flag the user's ``XLA_FLAGS`` already sets is
  never overridden. Sharded over several host devices,
  results equal the 1-device ones up to float round-off.

``dhel-eval`` does the same before it starts JAX, except that without ``--cpu_devices`` it splits
the host into one device per core (inference needs no collectives, and runs faster so).

``dhel-compile --config configs/imagenet100.py --topology v5e:2x4 [--out plan.json]`` compiles
the config's train step for a TPU slice on this host, with no TPU (:mod:`dhel_jax.plan`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dhel_jax._io import refused_write_message
from dhel_jax.cpu import accelerator_installed, tpu_chips_present, use_cpu_xla_flags

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

# Each tool defines only its own flags (in absl's global FLAGS, when its entry point starts), so
# that its --help lists those and no other tool's; tests define both in one process.


def _define_shared_flags() -> None:
    """The flags of both dhel-train and dhel-eval."""
    if "workdir" in flags.FLAGS:
        return
    flags.DEFINE_string(
        "workdir",
        None,
        "Run directory (checkpoints/, metrics.jsonl, config.json, TensorBoard events). A "
        "workdir with checkpoints resumes from the latest.",
    )
    flags.DEFINE_string(
        "cpu_devices",
        "1",
        "CPU-only runs: number of XLA host devices to shard the batch over ('1': one device "
        "whose ops use every core, the faster choice on 2 cores (benchmarks/README.md); 'auto': "
        "the largest divisor of the batch size <= the number of cores). Ignored when XLA_FLAGS "
        f"sets {_DEVICE_COUNT_FLAG} or an accelerator is present.",
    )


def _define_config_flag() -> None:
    """``--config`` (dhel-train and dhel-compile)."""
    if "config" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Training config: a configs/*.py file, optionally with ':<loss name>'. Override "
        "fields with --config.<field>=<value>.",
        lock_config=True,
    )


def define_train_flags() -> None:
    """Defines dhel-train's flags (once; :func:`train_main` does it before parsing)."""
    _define_shared_flags()
    _define_config_flag()
    if "distributed" in flags.FLAGS:
        return
    flags.DEFINE_enum(
        "distributed",
        "auto",
        ["auto", "true", "false"],
        "Call jax.distributed.initialize(): auto-detected (Cloud TPU VM, SLURM, Open MPI, "
        "JAX_COORDINATOR_ADDRESS), or forced on/off.",
    )


def _multiprocess_environment() -> bool:
    """Whether this process is one of several that must form a jax.distributed system."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    # A TPU VM of a generation missing from the table is still found by --distributed=true or
    # JAX_COORDINATOR_ADDRESS.
    return tpu_chips_present()


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


def _configure_cpu_backend(batch_size: int, default_devices: str = "1") -> None:
    """On a CPU-only host: the CPU XLA flags and the device split (see the module docstring);
    ``default_devices`` is the split when ``--cpu_devices`` is not given."""
    if accelerator_installed():
        return
    use_cpu_xla_flags()
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if _DEVICE_COUNT_FLAG not in xla_flags:
        requested = (
            flags.FLAGS.cpu_devices if flags.FLAGS["cpu_devices"].present else default_devices
        )
        count = cpu_device_count(batch_size, requested)
        if count > 1:
            os.environ["XLA_FLAGS"] = f"{xla_flags} {_DEVICE_COUNT_FLAG}={count}".strip()


class _OwnInfoOnly(logging.Filter):
    """Keeps INFO records of dhel_jax only (Orbax logs every save at INFO), and every warning.

    Orbax's ERROR records go too, unless DHEL_JAX_TRACEBACK is set: each is a failed
    background write, logged with its traceback by every thread that sees it, and re-raised
    to the training loop, which reports it once (as a ``CheckpointError``).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "/orbax/" in record.pathname:
            return _traceback_requested()
        return record.levelno >= logging.WARNING or "dhel_jax" in record.pathname


# Exit statuses of dhel-train and dhel-eval: 2 for a usage or config error, 1 for a runtime
# failure (data, checkpoint, non-finite training). With DHEL_JAX_TRACEBACK=1 the error is raised
# with its traceback instead, for bug reports.
EXIT_USAGE = 2
EXIT_FAILURE = 1
TRACEBACK_ENV = "DHEL_JAX_TRACEBACK"


class _ErrorExit(SystemExit):
    """A failure already reported on stderr; the console scripts end the process on it."""


def _traceback_requested() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0")


def _write_error(prog: str, message: str) -> None:
    """``<prog>: error: <message>`` as one line on stderr (whitespace runs collapsed)."""
    sys.stdout.flush()
    sys.stderr.write(f"{prog}: error: {' '.join(message.split())}\n")
    sys.stderr.flush()


def _exit_with_error(
    prog: str, error: BaseException, status: int, message: str | None = None
) -> None:
    """Reports ``message`` (default: ``str(error)``) with :func:`_write_error`, then raises
    :class:`_ErrorExit` with ``status`` (or, with ``DHEL_JAX_TRACEBACK=1``, re-raises ``error``
    with its traceback). Callers only get here after the training loop's ``finally`` has waited
    for and closed every checkpoint write."""
    if _traceback_requested():
        raise error
    _write_error(prog, str(error) if message is None else message)
    raise _ErrorExit(status) from None


def _without_closed_loop_noise(hook: Any) -> Any:
    """``sys.unraisablehook`` minus one known message: when a checkpoint restore fails, Orbax's
    background threads call into their already closed asyncio loop and Python prints each
    ``RuntimeError: Event loop is closed`` as an ignored exception (hundreds of lines). Anything
    else goes to ``hook``."""

    def hook_without_noise(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        hook(unraisable)

    return hook_without_noise


def _run(prog: str, main: Any, define_flags: Any) -> None:
    """absl's ``app.run`` of ``main`` with the flags ``define_flags`` defines, usage errors
    reported as one line (status 2). A reported failure ends the process at once
    (``os._exit``), so that no library thread (Orbax's asyncio loops) prints its own traceback
    during the interpreter's shutdown after the message."""
    define_flags()
    # --help and --helpshort list the flags of absl's main module, sys.argv[0]: these.
    for flag in flags.FLAGS.get_key_flags_for_module(__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def checked(argv: list[str]) -> None:
        try:
            main(argv)
        except app.UsageError as e:
            _exit_with_error(prog, e, EXIT_USAGE)

    if not _traceback_requested():
        sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)
    try:
        app.run(checked, argv=sys.argv, flags_parser=parse_flags)
    except _ErrorExit as e:
        os._exit(int(e.code))  # type: ignore[arg-type]


def _train(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = flags.FLAGS.config
    if config is None or not flags.FLAGS.workdir:
        raise app.UsageError(
            "usage: dhel-train --config configs/fashion_mnist.py --workdir runs/NAME "
            "[--config.<field>=<value> ...]"
        )
    absl_logging.get_absl_handler().addFilter(_OwnInfoOnly())
    distributed = flags.FLAGS.distributed == "true" or (
        flags.FLAGS.distributed == "auto" and _multiprocess_environment()
    )
    if not distributed:
        _configure_cpu_backend(config.batch_size)
    # Only now may JAX start its backends (XLA_FLAGS are read then).
    import jax

    from dhel_jax import checkpointing, data, train

    if distributed:
        jax.distributed.initialize()
    logging.info(
        "process %d of %d, %d devices: %s",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    try:
        # Validates the whole config first, then the combinations that need the dataset's
        # size (e.g. the warm-up): a ValueError is a config error either way.
        train.train_and_evaluate(config, flags.FLAGS.workdir)
    except ValueError as e:
        _exit_with_error("dhel-train", e, EXIT_USAGE)
    except (
        checkpointing.CheckpointError,
        data.DatasetUnavailableError,
        train.NonFiniteLossError,
    ) as e:
        _exit_with_error("dhel-train", e, EXIT_FAILURE)
    except OSError as e:  # an unwritable or full --workdir (logs, config.json)
        _exit_with_error(
            "dhel-train",
            e,
            EXIT_FAILURE,
            refused_write_message(e, "--workdir", "checkpoints already saved are"),
        )


def _fail(message: str) -> None:
    prog = os.path.basename(sys.argv[0]) if sys.argv else "dhel"
    _write_error(prog, f"{message} (--helpshort lists the flags)")
    sys.exit(EXIT_USAGE)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a clear message for an unknown ``--config.<field>``.

    (ml_collections raises a bare ``AttributeError`` naming only the missing key.)
    """
    try:
        return flags.FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        if e.flagname.split(".")[0] == "config" and "config" not in flags.FLAGS:
            _fail(
                "dhel-eval reads the run's config from its checkpoint; --config is for dhel-train."
            )
        _fail(str(e))
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
    _run("dhel-train", _train, define_train_flags)


# ----------------------------------------------------------------------------------------------
# dhel-eval (flags shared with dhel-train: --workdir, --cpu_devices).


def define_eval_flags() -> None:
    """Defines dhel-eval's flags (once; :func:`eval_main` does it before parsing)."""
    _define_shared_flags()
    if "step" in flags.FLAGS:
        return
    flags.DEFINE_integer(
        "step", None, "dhel-eval: checkpoint step to evaluate (default: the latest)."
    )
    flags.DEFINE_enum(
        "protocol",
        None,
        ["fast", "paper"],
        "dhel-eval: linear-probe protocol (default: the run's config.eval.protocol). 'fast': "
        "L-BFGS logistic regression on precomputed features; 'paper': SGD on frozen features of "
        "cropped and flipped images (slow on CPUs).",
    )
    flags.DEFINE_string(
        "out_dir", None, "dhel-eval: where eval.json and plots/ go (default: --workdir)."
    )
    flags.DEFINE_string(
        "data_dir", None, "dhel-eval: TFDS data directory (default: the run's config.data_dir)."
    )
    flags.DEFINE_integer(
        "paper_epochs", None, "dhel-eval: epochs of the 'paper' probe (default: 100)."
    )
    flags.DEFINE_boolean(
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
    if not flags.FLAGS.workdir:
        raise app.UsageError(
            "usage: dhel-eval --workdir runs/NAME [--step N] [--protocol fast|paper] "
            "[--baselines] [--out_dir DIR] [--data_dir DIR]"
        )
    absl_logging.get_absl_handler().addFilter(_OwnInfoOnly())
    # Inference has no collectives: one device per core extracts features faster on 2 cores
    # than one device using both (benchmarks/README.md, "Evaluation").
    _configure_cpu_backend(_EVAL_BATCH_SIZE, default_devices="auto")
    # Only now may JAX start its backends (XLA_FLAGS are read then).
    from dhel_jax import checkpointing, data, evaluate

    paper = {} if flags.FLAGS.paper_epochs is None else {"epochs": flags.FLAGS.paper_epochs}
    try:
        results = evaluate.evaluate(
            flags.FLAGS.workdir,
            step=flags.FLAGS.step,
            protocol=flags.FLAGS.protocol,
            out_dir=flags.FLAGS.out_dir,
            data_dir=flags.FLAGS.data_dir,
            progress=True,
            with_baselines=flags.FLAGS.baselines,
            paper_probe=paper,
        )
    except ValueError as e:
        _exit_with_error("dhel-eval", e, EXIT_USAGE)
    except (checkpointing.CheckpointError, data.DatasetUnavailableError) as e:
        _exit_with_error("dhel-eval", e, EXIT_FAILURE)
    except OSError as e:  # an unwritable or full --out_dir (eval.json, plots)
        _exit_with_error(
            "dhel-eval",
            e,
            EXIT_FAILURE,
            refused_write_message(e, "--out_dir", "checkpoints are"),
        )
    print(evaluate.summary(results))


def eval_main() -> None:
    """The ``dhel-eval`` console script::

        dhel-eval --workdir runs/NAME [--step N] [--protocol fast|paper] [--baselines]
            [--out_dir DIR]

    evaluates a checkpoint with :func:`dhel_jax.evaluate.evaluate` (read-only: nothing under
    ``<workdir>/checkpoints`` is written), writes ``eval.json`` and ``plots/*.png`` to the
    workdir (or ``--out_dir``) and prints a summary. A missing workdir or step, or an unreadable
    checkpoint, exits with status 1 and a one-line message naming the path and the available
    steps; a bad setting with status 2.
    """
    _run("dhel-eval", _eval, define_eval_flags)


# ----------------------------------------------------------------------------------------------
# dhel-compile (dhel_jax.plan): the train step compiled for a TPU topology, on any host.


def define_compile_flags() -> None:
    """Defines dhel-compile's flags (once; :func:`compile_main` does it before parsing)."""
    _define_config_flag()
    if "topology" in flags.FLAGS:
        return
    flags.DEFINE_string(
        "topology", None, "TPU topology to compile for, e.g. v5e:2x4, v5p:2x2x2, v6e:2x4."
    )
    flags.DEFINE_string("out", None, "Also write the plan as JSON to this file.")
    flags.DEFINE_enum(
        "platform",
        "tpu",
        ["tpu", "cuda"],
        "tpu: compile for --topology (libtpu) and report memory and the cost model's estimate; "
        "cuda: only lower the step for CUDA on this host, as a smoke check.",
    )
    flags.DEFINE_boolean(
        "geometry",
        False,
        "Keep the config's online-geometry branch (config.geometry_every_steps) in the "
        "compiled step; by default it is left out.",
    )


def _compile(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config, topology = flags.FLAGS.config, flags.FLAGS.topology
    platform = flags.FLAGS.platform
    if config is None or (platform == "tpu" and not topology):
        raise app.UsageError(
            "usage: dhel-compile --config configs/imagenet100.py --topology v5e:2x4 "
            "[--config.<field>=<value> ...] [--out plan.json] [--platform cuda]"
        )
    # Deviceless: the TPU is only a compile target, so JAX runs nothing but its CPU backend,
    # and libtpu opens no chip: its one-process lock (/tmp/libtpu_lockfile, which guards the
    # chips) is not needed, and several plans may compile side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax  # already imported by the config file; no backend has started yet

    from dhel_jax import plan as plan_lib

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")

    prog = "dhel-compile"
    try:
        if platform == "tpu":
            result, _ = plan_lib.compile_plan(config, topology, geometry=flags.FLAGS.geometry)
            text = plan_lib.summary(result)
        else:
            result = plan_lib.lower_for(config, platform, geometry=flags.FLAGS.geometry)
            text = f"lowered for {platform} ({result['convolutions']} convolutions); not compiled"
    except (plan_lib.PlanError, ValueError) as e:
        _exit_with_error(prog, e, EXIT_USAGE)
    print(json.dumps(result, indent=2))
    print(text)
    if flags.FLAGS.out:
        try:
            with open(flags.FLAGS.out, "w") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
        except OSError as e:
            _exit_with_error(
                prog,
                e,
                EXIT_FAILURE,
                refused_write_message(e, "--out", "the plan printed above is"),
            )
    memory = result.get("memory", {})
    if memory.get("fits") is False:
        gib = 2**30
        hbm = memory.get("usable_hbm_bytes") or memory["hbm_bytes"]
        if memory["total_bytes"] is None or hbm is None:
            needs = f"the step does not fit a {result['device_kind']}'s HBM ({memory['compiler']})"
        else:
            needs = (
                f"the step needs {memory['total_bytes'] / gib:.2f} GiB per chip and a "
                f"{result['device_kind']} has {hbm / gib:.2f} GiB of HBM"
            )
        _write_error(
            prog,
            f"{needs}; lower config.batch_size, use --config.model.dtype=bfloat16 or "
            f"--config.embedding_chunks, or more chips.",
        )
        raise _ErrorExit(EXIT_FAILURE)


def compile_main() -> None:
    """The ``dhel-compile`` console script::

        dhel-compile --config configs/imagenet100.py --topology v5e:2x4
            [--config.<field>=<value> ...] [--out plan.json] [--platform cuda]

    compiles the config's train step for that TPU topology on this host
    (:func:`dhel_jax.plan.compile_plan`), prints the plan as JSON and a summary, and writes the
    JSON to ``--out``. A step that does not fit the chip's HBM exits with status 1 after one
    line naming the memory needed and the memory there is; an unknown topology, a missing
    libtpu or a bad config with status 2.
    """
    _run("dhel-compile", _compile, define_compile_flags)
