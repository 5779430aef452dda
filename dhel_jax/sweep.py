"""Sweeps: a grid of ``dhel-train`` + ``dhel-eval`` runs, resumable, aggregated into tables.

::

    dhel-sweep --sweep configs/sweeps/fmnist_cpu.py [--dry-run] [--aggregate-only] \\
        [--runs_dir runs/sweeps] [--results_dir results] [--only 'dhel_*'] [--seeds 0,1]

A sweep file (``configs/sweeps/NAME.py``) defines ``get_sweep()``, returning a
``ConfigDict`` (:func:`validate_sweep` checks it):

* ``config``: the training config file (``configs/*.py``, relative to the sweep file), and
  ``overrides``: nested config fields shared by every run (the common budget: epochs, model,
  optimiser, augmentation). They may not set ``loss``, ``batch_size`` or ``seed``;
* ``losses``: ``{label: {loss: {name, <other loss fields>}, temperature: 'tau' | 't',
  temperatures: (...)}}``. The loss fields (e.g. KCL's kernel) are the only per-loss
  settings, so no loss is tuned more than another (:func:`paper_losses` builds the paper's);
* ``batch_sizes``, ``temperature_batch_size`` and ``seeds``;
* optionally ``loss_order`` (table order), ``comparisons`` (pairs ``(a, b)`` of loss labels
  whose differences ``a - b`` are tabulated) and ``description``.

:func:`paper_sweep` builds the whole ``ConfigDict`` of the paper's comparison; every file in
``configs/sweeps/`` uses it.

The grid has two views. *Batch size*: every loss at every batch size, at the loss's docs/spec.md
default temperature. *Temperature*: every loss at every value of its temperature, at
``temperature_batch_size``. A cell is one (loss, batch size, temperature); cells in both views
(e.g. SimCLR at tau = 0.5, B = 128) run once. Every cell runs once per seed (``config.seed``:
initialisation, augmentations and data order), in ``<runs_dir>/NAME/<cell>/seed<k>``, as

1. ``dhel-train --config <config> --workdir <run> --config.<field>=<value> ...`` (the shared
   overrides, then the loss, its temperature, the batch size and the seed, written out in full
   on the command line and in the run's ``log.txt``), then
2. ``dhel-eval --workdir <run>``, which writes ``<run>/eval.json``,

each in a fresh subprocess (its own memory; a crash or SIGKILL loses no other run) whose output
is appended to ``<run>/log.txt``. Runs go one after another; progress (run i/N, ETA) is printed.

Resuming. Rerunning the same command skips every run whose ``eval.json`` is of the final step,
evaluates runs whose training finished, and restarts any other run with ``dhel-train`` on the
same workdir, which resumes from its latest checkpoint. A run whose workdir holds a config that
differs from the sweep's (the sweep file was edited) is an error: nothing is overwritten. The
sweep process holds a lock on each run while working on it (shared with the subprocess), so a
second ``dhel-sweep`` on the same runs skips what the first is doing. Ctrl-C / SIGTERM make the
running ``dhel-train`` checkpoint and stop, and the sweep stops after it; if the sweep process
is killed, its subprocess checkpoints and stops by itself (:func:`run_tool`). A run that stopped
on a non-finite loss is not retried (``--retry_failed`` does) and is reported as failed.

Aggregation (:func:`aggregate`, also on partial results, marking missing runs) reads every
``eval.json`` and writes ``<results_dir>/NAME.json`` (every run's numbers, per-cell mean and
sample standard deviation over seeds, wall times, hardware), ``NAME.md`` (tables: rows are
losses, columns batch sizes or temperatures; linear-probe and kNN accuracy, effective rank of
the features and of the projections; the ``comparisons`` as differences ± standard error; the
range of each loss's accuracy over batch sizes and temperatures) and three plots:
``NAME_batch_size.png``, ``NAME_temperature.png``, ``NAME_effective_rank.png``.

The sweep process never starts an accelerator backend (it runs JAX on the CPU only, to count
steps), so its subprocesses get the whole TPU or GPU. It drives one host; multi-host pods are
not supported (launch ``dhel-train`` on every host yourself).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import fnmatch
import importlib.util
import io
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from dhel_jax._io import write_atomic
from dhel_jax._signals import SignalHandler

EVAL_FILENAME = "eval.json"  # dhel_jax.evaluate.EVAL_FILENAME (not imported: it imports JAX).
CONFIG_FILENAME = "config.json"  # dhel_jax.checkpointing.CONFIG_FILENAME.
LOG_FILENAME = "log.txt"
RECORD_FILENAME = "sweep_run.json"
LOCK_FILENAME = ".sweep.lock"
TEMPERATURES = {"tau": "τ", "t": "t"}
TOOLS = {"dhel-train": "train_main", "dhel-eval": "eval_main"}
PARENT_ENV = "DHEL_SWEEP_PID"
# Fields of the training config the sweep sets per run; the shared overrides may not.
_RUN_FIELDS = ("loss", "batch_size", "seed")
_NON_FINITE = "NonFiniteLossError"

# Aggregated metrics: key -> (path in eval.json, label, scale for display, decimals).
METRICS: dict[str, tuple[tuple[str, ...], str, float, int]] = {
    "linear_probe": (("linear_probe", "accuracy"), "Linear-probe accuracy (%)", 100.0, 2),
    "knn": (("knn", "accuracy"), "kNN accuracy (%)", 100.0, 2),
    "effective_rank_features": (
        ("geometry", "features", "effective_rank"),
        "Effective rank of the features",
        1.0,
        1,
    ),
    "effective_rank_projections": (
        ("geometry", "projections", "effective_rank"),
        "Effective rank of the projections",
        1.0,
        1,
    ),
    "alignment_projections": (
        ("geometry", "projections", "alignment"),
        "Alignment of the projections",
        1.0,
        4,
    ),
    "wasserstein_uniformity_projections": (
        ("geometry", "projections", "wasserstein_uniformity"),
        "W1 uniformity of the projections",
        1.0,
        4,
    ),
}
# The metrics that get a table in NAME.md (all are in NAME.json).
TABLE_METRICS = ("linear_probe", "knn", "effective_rank_features", "effective_rank_projections")


class SweepError(ValueError):
    """A bad sweep file, or a run directory that does not belong to this sweep."""


# ----------------------------------------------------------------------------------------------
# The sweep file and its grid.


def load_sweep(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Imports ``path`` and returns its ``get_sweep()``, validated, with ``name`` (the file's
    stem unless set) and ``config`` resolved to an absolute path (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {os.fspath(path)!r} does not exist.")
    module = _import_file(path, f"dhel_sweep_{path.stem}")
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"sweep file {os.fspath(path)!r} defines no get_sweep().")
    sweep = module.get_sweep()
    if not isinstance(sweep, ml_collections.ConfigDict):
        raise SweepError(f"{path}: get_sweep() must return a ConfigDict; got {type(sweep)}.")
    sweep = ml_collections.ConfigDict(sweep.to_dict())
    if "name" not in sweep or sweep.name is None:
        sweep.name = path.stem
    if "config" in sweep and isinstance(sweep.config, str):
        sweep.config = os.path.normpath(path.parent.resolve() / sweep.config)
    validate_sweep(sweep)
    return sweep


def _import_file(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SweepError(f"cannot import {os.fspath(path)!r} as a Python module.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _as_dict(value: Any) -> dict[str, Any]:
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else dict(value or {})


def validate_sweep(sweep: ml_collections.ConfigDict) -> None:
    """Checks a sweep's fields (see the module docstring), and the training config of one cell
    of each loss with ``dhel_jax.train.validate_config``.

    Raises:
      SweepError: naming the bad field, its value and what is accepted.
    """
    required = (
        "name",
        "config",
        "overrides",
        "losses",
        "batch_sizes",
        "temperature_batch_size",
        "seeds",
    )
    missing = [k for k in required if k not in sweep]
    if missing:
        raise SweepError(f"sweep: missing field(s) {', '.join(missing)}; a sweep sets {required}.")
    optional = ("description", "loss_order", "comparisons")
    extra = sorted(set(sweep) - {*required, *optional})
    if extra:
        raise SweepError(f"sweep: unknown field {extra[0]!r}; accepted: {required + optional}.")
    if not isinstance(sweep.name, str) or not sweep.name or "/" in sweep.name:
        raise SweepError(f"sweep.name must be a non-empty file name; got {sweep.name!r}.")
    if not os.path.isfile(sweep.config):
        raise SweepError(f"sweep.config: no such training config file {sweep.config!r}.")
    shared = _flatten(_as_dict(sweep.overrides))
    for key, value in shared.items():
        if value is None:
            raise SweepError(
                f"sweep.overrides.{key} is None; a command-line override needs a value (leave "
                "the field out to keep the training config's)."
            )
        if key.split(".")[0] in _RUN_FIELDS:
            raise SweepError(
                f"sweep.overrides.{key}: the sweep sets {', '.join(_RUN_FIELDS)} per run; "
                "put loss fields in sweep.losses and use batch_sizes / seeds."
            )
    for field, minimum in (("batch_sizes", 1), ("seeds", 0)):
        values = tuple(sweep[field] or ())
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        if not values or not ints or len(set(values)) != len(values) or min(values) < minimum:
            raise SweepError(
                f"sweep.{field} must be distinct integers >= {minimum}; got {values!r}."
            )
    b = sweep.temperature_batch_size
    if not isinstance(b, int) or b < 1:
        raise SweepError(f"sweep.temperature_batch_size must be an integer >= 1; got {b!r}.")
    if not sweep.losses:
        raise SweepError("sweep.losses is empty.")
    order = sweep.get("loss_order")
    if order is not None and sorted(order) != sorted(sweep.losses):
        raise SweepError(
            f"sweep.loss_order must list every key of sweep.losses once: {sorted(sweep.losses)}; "
            f"got {order!r}."
        )
    from dhel_jax import losses

    for label, entry in sweep.losses.items():
        extra = sorted(set(entry) - {"loss", "temperature", "temperatures"})
        if extra:
            raise SweepError(
                f"sweep.losses.{label}: unknown field {extra[0]!r}; accepted: loss, temperature, "
                "temperatures (only loss fields differ between losses)."
            )
        loss = _as_dict(entry.get("loss"))
        name = loss.get("name")
        if name not in losses.LOSSES:
            raise SweepError(
                f"sweep.losses.{label}.loss.name: unknown loss {name!r}; accepted: "
                f"{', '.join(losses.LOSSES)}."
            )
        temperature = entry.get("temperature")
        hparams = losses.loss_hyperparameters(name)
        if temperature not in TEMPERATURES or temperature not in hparams:
            takes = [k for k in TEMPERATURES if k in hparams]
            raise SweepError(
                f"sweep.losses.{label}.temperature: loss {name!r} has no temperature "
                f"{temperature!r}; use {takes}."
            )
        if temperature in loss:
            raise SweepError(
                f"sweep.losses.{label}.loss.{temperature} is set; the sweep sets it per run "
                f"(its temperatures, and the SPEC default {hparams[temperature]} for the "
                "batch-size view)."
            )
        values = tuple(entry.get("temperatures") or ())
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not values or not numbers or min(values) <= 0:
            raise SweepError(
                f"sweep.losses.{label}.temperatures must be positive numbers; got {values!r}."
            )
    for pair in sweep.get("comparisons") or ():
        if len(pair) != 2 or not all(label in sweep.losses for label in pair):
            raise SweepError(
                f"sweep.comparisons: {pair!r} is not a pair of keys of sweep.losses "
                f"({sorted(sweep.losses)})."
            )
    # Every run's config must build: check one cell of each loss now, not hours into the sweep.
    checked: set[str] = set()
    for cell in expand(sweep):
        if cell.loss not in checked:
            checked.add(cell.loss)
            try:
                run_config(sweep, cell, sweep.seeds[0], validate=True)
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                raise SweepError(f"sweep: the config of cell {cell.name} is invalid: {e}") from e


PAPER_LOSS_ORDER = ("simclr", "dcl", "dhel", "kcl")
# The paper's claims: DHEL and KCL against SimCLR and DCL (``sweep.comparisons``).
PAPER_COMPARISONS = (("dhel", "simclr"), ("dhel", "dcl"), ("kcl", "simclr"), ("kcl", "dcl"))


def paper_losses(
    taus: Sequence[float] = (0.1, 0.2, 0.5), ts: Sequence[float] = (1.0, 2.0, 4.0)
) -> ml_collections.ConfigDict:
    """``sweep.losses`` of the paper's comparison (table order :data:`PAPER_LOSS_ORDER`):
    SimCLR, DCL and DHEL over ``taus``, KCL with the Gaussian kernel over ``ts``; every other
    loss field at its docs/spec.md default."""
    losses = ml_collections.ConfigDict()
    for name in ("simclr", "dcl", "dhel"):
        losses[name] = {"loss": {"name": name}, "temperature": "tau", "temperatures": tuple(taus)}
    losses.kcl = {
        "loss": {"name": "kcl", "kernel": "gaussian"},
        "temperature": "t",
        "temperatures": tuple(ts),
    }
    return losses


def paper_sweep(
    config: str,
    description: str,
    *,
    overrides: Mapping[str, Any] | None = None,
    batch_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    temperature_batch_size: int = 256,
    seeds: Sequence[int] = (0, 1),
) -> ml_collections.ConfigDict:
    """A sweep of the paper's comparison (:func:`paper_losses`, :data:`PAPER_LOSS_ORDER`,
    :data:`PAPER_COMPARISONS`) over ``config`` (a path relative to the sweep file): every loss
    at its default temperature over ``batch_sizes``, and over the temperatures at
    ``temperature_batch_size``; ``overrides`` apply to every run."""
    sweep = ml_collections.ConfigDict()
    sweep.description = description
    sweep.config = config
    sweep.overrides = dict(overrides or {})
    sweep.losses = paper_losses()
    sweep.loss_order = PAPER_LOSS_ORDER
    sweep.comparisons = PAPER_COMPARISONS
    sweep.batch_sizes = tuple(batch_sizes)
    sweep.temperature_batch_size = temperature_batch_size
    sweep.seeds = tuple(seeds)
    return sweep


def _num(value: float) -> str:
    return f"{value:g}"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (loss, batch size, temperature) of the grid, run once per seed.

    Attributes:
      name: ``<loss>_b<batch>_<temperature name><value>``, e.g. ``dhel_b128_tau0.3``.
      loss: the loss label (a key of ``sweep.losses``).
      batch_size: the global batch size.
      temperature_name: ``"tau"`` or ``"t"``.
      temperature: its value.
      views: ``"batch_size"`` and/or ``"temperature"``: the tables the cell belongs to.
      overrides: the config fields of the cell (loss fields, temperature, batch size).
    """

    name: str
    loss: str
    batch_size: int
    temperature_name: str
    temperature: float
    views: tuple[str, ...]
    overrides: Mapping[str, Any]


def loss_labels(sweep: ml_collections.ConfigDict) -> list[str]:
    """The loss labels in table order: ``sweep.loss_order``, else sorted (as ConfigDict keys)."""
    order = sweep.get("loss_order")
    return list(order) if order is not None else sorted(sweep.losses)


def default_temperature(sweep: ml_collections.ConfigDict, label: str) -> float:
    """docs/spec.md's default of the loss's temperature (``losses.loss_hyperparameters``)."""
    from dhel_jax import losses

    entry = sweep.losses[label]
    return float(losses.loss_hyperparameters(entry.loss.name)[entry.temperature])


def expand(sweep: ml_collections.ConfigDict) -> list[Cell]:
    """The unique cells of the grid: the batch-size view (losses x batch sizes at the default
    temperature), then the temperature cells not already in it (at ``temperature_batch_size``)."""
    cells: dict[tuple[str, int, float], dict[str, Any]] = {}

    def add(label: str, batch: int, value: float, view: str) -> None:
        entry = sweep.losses[label]
        key = (label, batch, float(value))
        if key not in cells:
            overrides = {f"loss.{k}": v for k, v in _flatten(_as_dict(entry.loss)).items()}
            overrides[f"loss.{entry.temperature}"] = float(value)
            overrides["batch_size"] = batch
            cells[key] = {
                "name": f"{label}_b{batch}_{entry.temperature}{_num(value)}",
                "loss": label,
                "batch_size": batch,
                "temperature_name": entry.temperature,
                "temperature": float(value),
                "views": [],
                "overrides": overrides,
            }
        if view not in cells[key]["views"]:
            cells[key]["views"].append(view)

    for label in loss_labels(sweep):
        for batch in sweep.batch_sizes:
            add(label, batch, default_temperature(sweep, label), "batch_size")
    for label in loss_labels(sweep):
        for value in sweep.losses[label].temperatures:
            add(label, sweep.temperature_batch_size, value, "temperature")
    return [Cell(**{**c, "views": tuple(c["views"])}) for c in cells.values()]


def _load_config_file(path: str) -> ml_collections.ConfigDict:
    return _import_file(Path(path), f"dhel_config_{Path(path).stem}").get_config()


def run_overrides(sweep: ml_collections.ConfigDict, cell: Cell, seed: int) -> dict[str, Any]:
    """Every ``--config.<field>`` of a run, in command-line order: shared, cell, seed."""
    return {**_flatten(_as_dict(sweep.overrides)), **cell.overrides, "seed": seed}


def run_config(
    sweep: ml_collections.ConfigDict, cell: Cell, seed: int, *, validate: bool = False
) -> ml_collections.ConfigDict:
    """The training config of one run (what ``dhel-train`` builds from its command line);
    ``validate``: also ``dhel_jax.train.validate_config`` on one device."""
    config = _load_config_file(sweep.config)
    config.update_from_flattened_dict(run_overrides(sweep, cell, seed))
    if validate:
        from dhel_jax import train

        train.validate_config(config, device_count=1, process_count=1)
    return config


def _flag_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return (
            "(" + ", ".join(_flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        )
    if isinstance(value, float):
        return repr(value)
    if value is None:
        raise SweepError("sweep: a config override cannot be None on the command line.")
    return str(value)


@dataclasses.dataclass(frozen=True)
class Run:
    """One seed of one cell: its workdir and its two commands (arguments after the tool)."""

    cell: Cell
    seed: int
    workdir: Path
    train_args: tuple[str, ...]
    eval_args: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.cell.name}/seed{self.seed}"


def make_runs(sweep: ml_collections.ConfigDict, runs_dir: str | os.PathLike) -> list[Run]:
    """Every run of the sweep, seed by seed (so a partly run sweep covers the whole grid with
    its first seeds), cells in :func:`expand` order; workdirs under ``<runs_dir>/<name>/``."""
    root = Path(runs_dir) / sweep.name
    runs = []
    for seed in sweep.seeds:
        for cell in expand(sweep):
            workdir = root / cell.name / f"seed{seed}"
            args = ["--config", sweep.config, "--workdir", os.fspath(workdir)]
            args += [
                f"--config.{k}={_flag_value(v)}"
                for k, v in run_overrides(sweep, cell, seed).items()
            ]
            runs.append(Run(cell, seed, workdir, tuple(args), ("--workdir", os.fspath(workdir))))
    return runs


def select_runs(runs: Sequence[Run], only: Sequence[str]) -> list[Run]:
    """The runs whose cell name matches one of the ``fnmatch`` patterns ``only`` (all if none).

    Raises:
      SweepError: no run matches.
    """
    if not only:
        return list(runs)
    chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.cell.name, p) for p in only)]
    if not chosen:
        raise SweepError(f"--only {list(only)} matches no cell of this sweep.")
    return chosen


def display_command(tool: str, args: Sequence[str]) -> str:
    """The shell command, paths relative to the current directory where shorter."""

    def short(arg: str) -> str:
        if os.path.isabs(arg):
            rel = os.path.relpath(arg)
            return rel if len(rel) < len(arg) else arg
        return arg

    return shlex.join([tool, *(short(a) for a in args)])


# ----------------------------------------------------------------------------------------------
# The state of a run on disk.


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value))


class StepCounter:
    """``train.step_counts(config, N).total_steps`` of each run, with the dataset sizes N
    read once per dataset (only for runs that have checkpoints, so a dry run reads no data)."""

    def __init__(self) -> None:
        self._sizes: dict[tuple[str, str | None], int] = {}

    def total_steps(self, config: ml_collections.ConfigDict) -> int:
        from dhel_jax import data, train

        key = (config.dataset, config.data_dir)
        if key not in self._sizes:
            self._sizes[key] = data.num_examples(config.dataset, data_dir=config.data_dir)
        return train.step_counts(config, self._sizes[key]).total_steps


@dataclasses.dataclass(frozen=True)
class RunState:
    """``status`` is ``"done"`` (eval.json of the final step), ``"trained"`` (final checkpoint,
    no evaluation of it), ``"partial"`` (checkpoints before the final step), ``"new"`` or
    ``"failed"`` (the last attempt stopped on a non-finite loss)."""

    status: str
    step: int
    total_steps: int | None


def run_state(run: Run, sweep: ml_collections.ConfigDict, counter: StepCounter) -> RunState:
    """Where ``run`` stands on disk.

    Raises:
      SweepError: the workdir's ``config.json`` is not this run's config.
    """
    from dhel_jax import checkpointing

    steps = checkpointing.available_steps(run.workdir)
    written = _read_json(run.workdir / CONFIG_FILENAME)
    config = None
    if written is not None:
        config = run_config(sweep, run.cell, run.seed)
        expected = _normalised(config.to_dict())
        if written != expected:
            diff = sorted(
                k
                for k in set(_flatten(expected)) | set(_flatten(written))
                if _flatten(expected).get(k, "<absent>") != _flatten(written).get(k, "<absent>")
            )
            raise SweepError(
                f"{run.workdir}: its {CONFIG_FILENAME} differs from run {run.label} of this sweep "
                f"in {', '.join(diff)}. The sweep file changed after the run started; move the "
                "run away, or use another --runs_dir (nothing was overwritten)."
            )
    attempts = (_read_json(run.workdir / RECORD_FILENAME) or {}).get("attempts", [])
    diverged = bool(attempts) and attempts[-1].get("error") == _NON_FINITE
    if not steps:
        return RunState("failed" if diverged else "new", 0, None)
    config = config or run_config(sweep, run.cell, run.seed)
    total = counter.total_steps(config)
    evaluated = _read_json(run.workdir / EVAL_FILENAME)
    if isinstance(evaluated, dict) and evaluated.get("step") == total:
        return RunState("done", total, total)
    if steps[-1] >= total:
        return RunState("trained", steps[-1], total)
    return RunState("failed" if diverged else "partial", steps[-1], total)


# ----------------------------------------------------------------------------------------------
# Running.

Launcher = Callable[[str], list[str]]


def python_launcher(tool: str) -> list[str]:
    """The argv prefix running console script ``tool`` (:func:`run_tool`) with this interpreter;
    it works without the scripts on PATH, e.g. with ``PYTHONPATH=.``."""
    return [sys.executable, "-c", f"from dhel_jax.sweep import run_tool; run_tool({tool!r})"]


def run_tool(tool: str) -> None:
    """Runs console script ``tool`` (``dhel-train`` or ``dhel-eval``) with ``sys.argv[1:]``.

    As a subprocess of the sweep process whose pid is ``$DHEL_SWEEP_PID``, it sends itself one
    SIGTERM (``dhel-train``: checkpoint and stop) if that process dies, so it cannot outlive a
    killed sweep and train alongside the next one on the same workdir. (A watcher thread, not
    Linux's PR_SET_PDEATHSIG, which can fire more than once and a second SIGTERM makes
    ``dhel-train`` exit without its checkpoint.)
    """
    parent = os.environ.get(PARENT_ENV)
    if parent:
        if os.getppid() != int(parent):
            sys.exit(f"{tool}: the dhel-sweep process {parent} is gone; not starting.")
        threading.Thread(target=_watch_parent, args=(int(parent),), daemon=True).start()
    from dhel_jax import main

    sys.argv[0] = tool
    getattr(main, TOOLS[tool])()


def _watch_parent(parent: int, interval: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    os.kill(os.getpid(), signal.SIGTERM)


def hardware() -> dict[str, Any]:
    """The host: CPU model, core count, platform (no accelerator query: that would claim it)."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "system": sys.platform}


class _Stop(SignalHandler):
    """SIGTERM / SIGINT: forward SIGTERM to the running subprocess, stop after it."""

    def __init__(self) -> None:
        super().__init__((signal.SIGTERM, signal.SIGINT))
        self.requested = False
        self.child: subprocess.Popen | None = None

    def handle(self, signum: int) -> None:
        first = not self.requested
        self.requested = True
        if self.child is not None and self.child.poll() is None:
            # Ctrl-C reaches the child directly (same process group); SIGTERM may not.
            if signum == signal.SIGTERM or not first:
                self.child.send_signal(signal.SIGTERM if first else signal.SIGKILL)
        print(
            f"dhel-sweep: {signal.strsignal(signum)}: stopping after the current run's "
            "checkpoint (again to kill it)",
            flush=True,
        )


def _append_record(workdir: Path, run: Run, attempt: Mapping[str, Any]) -> None:
    path = workdir / RECORD_FILENAME
    record = _read_json(path) or {"cell": run.cell.name, "seed": run.seed, "attempts": []}
    record["attempts"].append(dict(attempt))
    write_atomic(path, (json.dumps(record, indent=2) + "\n").encode())


def _last_error(log: Path, offset: int) -> str | None:
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    if _NON_FINITE in text:
        return _NON_FINITE
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][-300:] if lines else None


def _launch(
    tool: str,
    run: Run,
    args: Sequence[str],
    launcher: Launcher,
    stop: _Stop,
    lock_fd: int,
    env: Mapping[str, str] | None,
) -> dict[str, Any]:
    """Runs one tool to completion, output appended to the run's log; returns the attempt."""
    log = run.workdir / LOG_FILENAME
    command = display_command(tool, args)
    with log.open("ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')}  {command}\n".encode())
        out.flush()
        offset = out.tell()
        load = os.getloadavg()[0]
        start = time.time()
        child_env = dict(os.environ if env is None else env)
        # Progress-bar redraws in log.txt: at logged steps and every 30 s, not 10 per second.
        child_env.setdefault("TQDM_MININTERVAL", "30")
        child_env[PARENT_ENV] = str(os.getpid())
        proc = subprocess.Popen(
            [*launcher(tool), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            pass_fds=(lock_fd,),
        )
        stop.child = proc
        try:
            while True:
                try:
                    rc = proc.wait()
                    break
                except KeyboardInterrupt:  # Only if the handler was not installed.
                    stop.requested = True
        finally:
            stop.child = None
    attempt = {
        "tool": tool,
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start)),
        "seconds": round(time.time() - start, 1),
        "returncode": rc,
        "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],
        "hardware": hardware(),
    }
    if rc != 0:
        attempt["error"] = _last_error(log, offset)
    return attempt


@contextlib.contextmanager
def _locked(workdir: Path) -> Iterator[int | None]:
    """An exclusive, non-blocking lock on the run (None if another process holds it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def run_sweep(
    sweep: ml_collections.ConfigDict,
    *,
    runs_dir: str | os.PathLike = "runs/sweeps",
    only: Sequence[str] = (),
    retry_failed: bool = False,
    launcher: Launcher = python_launcher,
    env: Mapping[str, str] | None = None,
    print_fn: Callable[[str], None] = lambda s: print(s, flush=True),
) -> dict[str, list[str]]:
    """Trains and evaluates every run of ``sweep`` not yet done (see the module docstring).

    Args:
      sweep: from :func:`load_sweep`.
      runs_dir: the runs go to ``<runs_dir>/<sweep.name>/<cell>/seed<k>``.
      only: ``fnmatch`` patterns of cell names to run (default: all).
      retry_failed: rerun runs whose last attempt stopped on a non-finite loss.
      launcher: ``tool -> argv prefix`` running ``dhel-train`` / ``dhel-eval``
        (default :func:`python_launcher`).
      env: the subprocesses' environment (default: this process's).
      print_fn: progress output.

    Returns:
      ``{"done": [...], "skipped": [...], "failed": [...], "busy": [...], "stopped": [...]}``:
      run labels (``<cell>/seed<k>``) finished by this call, already finished before it,
      failed (a non-zero exit), held by another sweep process, and not reached after a stop.
    """
    runs = select_runs(make_runs(sweep, runs_dir), only)
    counter = StepCounter()
    states = {r.label: run_state(r, sweep, counter) for r in runs}
    todo = [r for r in runs if states[r.label].status != "done"]
    outcome: dict[str, list[str]] = {
        k: [] for k in ("done", "skipped", "failed", "busy", "stopped")
    }
    outcome["skipped"] = [r.label for r in runs if states[r.label].status == "done"]
    print_fn(
        f"dhel-sweep {sweep.name}: {len(runs)} runs, {len(outcome['skipped'])} already done, "
        f"{len(todo)} to run, in {Path(runs_dir) / sweep.name}"
    )
    started = time.time()
    worked = 0
    with _Stop() as stop:
        for i, run in enumerate(todo, 1):
            if stop.requested:
                outcome["stopped"].append(run.label)
                continue
            eta = ""
            if worked:
                eta = f", ETA {_duration((time.time() - started) / worked * (len(todo) - i + 1))}"
            with _locked(run.workdir) as fd:
                if fd is None:
                    print_fn(f"[{i}/{len(todo)}] {run.label}: locked by another sweep; skipped")
                    outcome["busy"].append(run.label)
                    continue
                state = run_state(run, sweep, counter)  # It may have changed while waiting.
                if state.status == "done":
                    outcome["skipped"].append(run.label)
                    continue
                if state.status == "failed" and not retry_failed:
                    print_fn(
                        f"[{i}/{len(todo)}] {run.label}: stopped on a non-finite loss at step "
                        f"{state.step} before; not retried (--retry_failed)"
                    )
                    outcome["failed"].append(run.label)
                    continue
                worked += 1
                failed = False
                if state.status in ("new", "partial", "failed"):
                    where = f"resuming from step {state.step}" if state.step else "from scratch"
                    print_fn(f"[{i}/{len(todo)}] {run.label}: dhel-train ({where}){eta}")
                    attempt = _launch("dhel-train", run, run.train_args, launcher, stop, fd, env)
                    _append_record(run.workdir, run, attempt)
                    state = run_state(run, sweep, counter)
                    # A tool interrupted by Ctrl-C has stopped, not failed.
                    failed = attempt["returncode"] != 0 and not stop.requested
                    if failed:
                        print_fn(
                            f"    dhel-train failed (exit {attempt['returncode']}): "
                            f"{attempt.get('error')}; see {run.workdir / LOG_FILENAME}"
                        )
                if not failed and state.status == "trained" and not stop.requested:
                    print_fn(f"[{i}/{len(todo)}] {run.label}: dhel-eval (step {state.step})")
                    attempt = _launch("dhel-eval", run, run.eval_args, launcher, stop, fd, env)
                    _append_record(run.workdir, run, attempt)
                    # A tool interrupted by Ctrl-C has stopped, not failed.
                    failed = attempt["returncode"] != 0 and not stop.requested
                    if failed:
                        print_fn(
                            f"    dhel-eval failed (exit {attempt['returncode']}): "
                            f"{attempt.get('error')}; see {run.workdir / LOG_FILENAME}"
                        )
                    state = run_state(run, sweep, counter)
                if failed:
                    outcome["failed"].append(run.label)
                elif state.status == "done":
                    outcome["done"].append(run.label)
                else:
                    outcome["stopped"].append(run.label)
    print_fn(
        f"dhel-sweep {sweep.name}: {len(outcome['done'])} runs finished in "
        f"{_duration(time.time() - started)}; {len(outcome['failed'])} failed, "
        f"{len(outcome['stopped'])} stopped, {len(outcome['busy'])} busy elsewhere"
    )
    return outcome


# ----------------------------------------------------------------------------------------------
# Aggregation.


def _get(tree: Any, path: Sequence[str]) -> float | None:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return None if tree is None else float(tree)


def _summary(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof = 1; None for fewer than 2 values)."""
    x = np.asarray([v for v in values if v is not None], np.float64)
    return {
        "mean": float(x.mean()) if x.size else None,
        "std": float(x.std(ddof=1)) if x.size > 1 else None,
        "n": int(x.size),
    }


def aggregate(sweep: ml_collections.ConfigDict, runs_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads every run's ``eval.json`` and record; returns the contents of ``NAME.json``.

    A run counts when its ``eval.json`` is of the final training step; others are listed in
    ``missing`` with their status. Per cell and metric: ``mean``, ``std`` (sample, over the
    seeds that finished) and ``n``.
    """
    runs = make_runs(sweep, runs_dir)
    counter = StepCounter()
    cells: dict[str, dict[str, Any]] = {}
    missing = []
    wall = {"train_seconds": 0.0, "eval_seconds": 0.0}
    hosts: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    for run in runs:
        cell = run.cell
        entry = cells.setdefault(
            cell.name,
            {
                "name": cell.name,
                "loss": cell.loss,
                "batch_size": cell.batch_size,
                "temperature_name": cell.temperature_name,
                "temperature": cell.temperature,
                "views": list(cell.views),
                "overrides": dict(cell.overrides),
                "runs": [],
            },
        )
        state = run_state(run, sweep, counter)
        record = _read_json(run.workdir / RECORD_FILENAME) or {"attempts": []}
        seconds = {"train_seconds": 0.0, "eval_seconds": 0.0}
        for attempt in record["attempts"]:
            key = "train_seconds" if attempt["tool"] == "dhel-train" else "eval_seconds"
            seconds[key] += attempt["seconds"]
            if attempt.get("hardware") and attempt["hardware"] not in hosts:
                hosts.append(attempt["hardware"])
        for key in wall:
            wall[key] += seconds[key]
        item: dict[str, Any] = {
            "seed": run.seed,
            "workdir": os.fspath(run.workdir),
            "status": state.status,
            "step": state.step,
            **{k: round(v, 1) for k, v in seconds.items()},
        }
        if state.status == "done":
            evaluated = _read_json(run.workdir / EVAL_FILENAME)
            item.update({k: _get(evaluated, spec[0]) for k, spec in METRICS.items()})
            device = evaluated.get("devices")
            if device and device not in devices:
                devices.append(device)
        else:
            missing.append({"run": run.label, "status": state.status, "step": state.step})
        entry["runs"].append(item)
    for entry in cells.values():
        done = [r for r in entry["runs"] if r["status"] == "done"]
        entry["summary"] = {k: _summary([r[k] for r in done]) for k in METRICS}
    views: dict[str, dict[str, list[str]]] = {"batch_size": {}, "temperature": {}}
    for entry in cells.values():
        for view in entry["views"]:
            views[view].setdefault(entry["loss"], []).append(entry["name"])
    views["temperature"] = {
        label: sorted(names, key=lambda n: cells[n]["temperature"])
        for label, names in views["temperature"].items()
    }
    results = {
        "sweep": sweep.name,
        "description": sweep.get("description"),
        "config": os.path.relpath(sweep.config),
        "overrides": _normalised(_flatten(_as_dict(sweep.overrides))),
        "losses": {
            label: {
                "loss": _normalised(_as_dict(sweep.losses[label].loss)),
                "temperature": sweep.losses[label].temperature,
                "default": default_temperature(sweep, label),
                "temperatures": list(sweep.losses[label].temperatures),
            }
            for label in loss_labels(sweep)
        },
        "batch_sizes": list(sweep.batch_sizes),
        "temperature_batch_size": sweep.temperature_batch_size,
        "seeds": list(sweep.seeds),
        "metrics": {k: {"eval_json": ".".join(v[0]), "label": v[1]} for k, v in METRICS.items()},
        "statistics": "mean and sample standard deviation (ddof = 1) over the seeds that finished",
        "cells": list(cells.values()),
        "views": views,
        "comparisons": [list(p) for p in sweep.get("comparisons") or ()],
        "complete": not missing,
        "num_runs": len(runs),
        "missing": missing,
        "wall_time": {
            **{k: round(v, 1) for k, v in wall.items()},
            "total_seconds": round(sum(wall.values()), 1),
        },
        "hardware": hosts,
        "devices": devices,
    }
    results["differences"] = differences(results)
    results["robustness"] = robustness(results)
    return results


def _difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any] | None:
    """``a - b`` of two cell summaries, with the standard error of that difference of means,
    ``sqrt(s_a^2 / n_a + s_b^2 / n_b)`` (None unless both cells have >= 2 seeds)."""
    if not a["n"] or not b["n"]:
        return None
    se = None
    if a["std"] is not None and b["std"] is not None:
        se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return {"difference": a["mean"] - b["mean"], "standard_error": se}


def differences(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """For each pair ``(a, b)`` of ``results["comparisons"]`` and each batch size of the batch
    view: ``a - b`` of every metric's mean and its standard error (:func:`_difference`)."""
    cells = {c["name"]: c for c in results["cells"]}
    view = results["views"]["batch_size"]
    out = []
    for a, b in results["comparisons"]:
        by_batch = {
            label: {cells[n]["batch_size"]: cells[n] for n in view.get(label, [])}
            for label in (a, b)
        }
        for batch in results["batch_sizes"]:
            ca, cb = by_batch[a].get(batch), by_batch[b].get(batch)
            if ca is None or cb is None:
                continue
            out.append(
                {
                    "losses": [a, b],
                    "batch_size": batch,
                    **{m: _difference(ca["summary"][m], cb["summary"][m]) for m in METRICS},
                }
            )
    return out


def robustness(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per loss, for the linear-probe accuracy: the range (max - min) of the cell means over the
    batch sizes and over the temperatures, and the median seed standard deviation of its cells
    (None where cells are missing)."""
    cells = {c["name"]: c for c in results["cells"]}
    out = {}
    for loss in results["losses"]:
        entry: dict[str, Any] = {}
        for view in ("batch_size", "temperature"):
            names = results["views"][view].get(loss, [])
            means = [cells[n]["summary"]["linear_probe"]["mean"] for n in names]
            ok = means and all(m is not None for m in means)
            entry[f"{view}_range"] = max(means) - min(means) if ok else None
        stds = [
            c["summary"]["linear_probe"]["std"]
            for c in results["cells"]
            if c["loss"] == loss and c["summary"]["linear_probe"]["std"] is not None
        ]
        entry["median_seed_std"] = float(np.median(stds)) if stds else None
        out[loss] = entry
    return out


def _cell_text(summary: Mapping[str, Any], scale: float, decimals: int, seeds: int) -> str:
    n = summary["n"]
    if not n:
        return "missing"
    text = f"{summary['mean'] * scale:.{decimals}f}"
    if summary["std"] is not None:
        text += f" ± {summary['std'] * scale:.{decimals}f}"
    return text if n == seeds else f"{text} ({n}/{seeds} seeds)"


def _temperature_label(name: str, value: float) -> str:
    return f"{TEMPERATURES[name]} = {_num(value)}"


def markdown(results: Mapping[str, Any]) -> str:
    """``NAME.md``: the batch-size and temperature tables of :func:`aggregate`'s results."""
    cells = {c["name"]: c for c in results["cells"]}
    seeds = len(results["seeds"])
    losses = results["losses"]
    lines = [f"# Sweep `{results['sweep']}`", ""]
    if results.get("description"):
        lines += [results["description"], ""]
    lines += [
        f"Cells: mean ± sample standard deviation over {seeds} seed{'s' * (seeds > 1)} "
        f"({', '.join(map(str, results['seeds']))}); evaluation `dhel-eval` of the final "
        "checkpoint (linear probe and kNN on frozen encoder features, test split).",
        "",
    ]
    if not results["complete"]:
        lines += [
            f"**Partial results**: {len(results['missing'])} of {results['num_runs']} runs are "
            "not finished (listed at the end).",
            "",
        ]
    batch_view = results["views"]["batch_size"]
    if batch_view:
        lines += ["## Batch size (each loss at its default temperature)", ""]
        for metric in TABLE_METRICS:
            _, label, scale, decimals = METRICS[metric]
            lines += [f"### {label}", ""]
            header = ["loss"] + [f"B = {b}" for b in results["batch_sizes"]]
            lines += ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
            for loss, names in batch_view.items():
                by_batch = {cells[n]["batch_size"]: cells[n] for n in names}
                info = losses[loss]
                row = [f"{loss} ({_temperature_label(info['temperature'], info['default'])})"]
                for b in results["batch_sizes"]:
                    c = by_batch.get(b)
                    row.append(
                        _cell_text(c["summary"][metric], scale, decimals, seeds) if c else "-"
                    )
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    temp_view = results["views"]["temperature"]
    if temp_view:
        width = max(len(v) for v in temp_view.values())
        lines += [f"## Temperature (batch size {results['temperature_batch_size']})", ""]
        # Column i holds every loss's i-th temperature (ascending): tau and t share columns.
        columns: list[list[str]] = [[] for _ in range(width)]
        for names in temp_view.values():
            for i, n in enumerate(names):
                text = _temperature_label(cells[n]["temperature_name"], cells[n]["temperature"])
                if text not in columns[i]:
                    columns[i].append(text)
        header = ["loss"] + [" / ".join(c) for c in columns]
        for metric in TABLE_METRICS:
            _, label, scale, decimals = METRICS[metric]
            lines += [f"### {label}", ""]
            lines += ["| " + " | ".join(header) + " |", "|---" + "|---:" * width + "|"]
            for loss, names in temp_view.items():
                row = [f"{loss} ({TEMPERATURES[losses[loss]['temperature']]})"]
                row += [
                    _cell_text(cells[n]["summary"][metric], scale, decimals, seeds) for n in names
                ]
                row += ["-"] * (width - len(names))
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    lines += _comparison_lines(results)
    wall = results["wall_time"]
    lines += [
        "## Runs",
        "",
        f"{results['num_runs']} runs ({len(cells)} cells x {seeds} seeds). Wall time of the "
        f"runs: {_duration(wall['total_seconds'])} (training {_duration(wall['train_seconds'])}, "
        f"evaluation {_duration(wall['eval_seconds'])}).",
    ]
    for host in results["hardware"]:
        lines.append(f"Host: {host['cpu']}, {host['cores']} cores ({host['system']}).")
    for device in results["devices"]:
        lines.append(f"Evaluation devices: {device['count']} x {device['platform']}.")
    if results["missing"]:
        lines += ["", "Not finished:", ""]
        lines += [f"- `{m['run']}`: {m['status']} (step {m['step']})" for m in results["missing"]]
    return "\n".join(lines) + "\n"


def _comparison_lines(results: Mapping[str, Any]) -> list[str]:
    lines = []
    if results["differences"]:
        lines += [
            "## Differences (batch-size view)",
            "",
            "Difference of the means ± its standard error sqrt(s_a²/n_a + s_b²/n_b) from the seed "
            "standard deviations (with 2 seeds the standard error is itself rough; a difference "
            "smaller than about twice it is not resolved by this sweep).",
            "",
        ]
        for metric in ("linear_probe", "effective_rank_features"):
            _, label, scale, decimals = METRICS[metric]
            header = ["losses"] + [f"B = {b}" for b in results["batch_sizes"]]
            lines += [f"### {label}: difference", ""]
            lines += ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
            for a, b in results["comparisons"]:
                row = [f"{a} − {b}"]
                for batch in results["batch_sizes"]:
                    d = next(
                        (
                            x[metric]
                            for x in results["differences"]
                            if x["losses"] == [a, b] and x["batch_size"] == batch
                        ),
                        None,
                    )
                    if d is None:
                        row.append("missing")
                        continue
                    text = f"{d['difference'] * scale:+.{decimals}f}"
                    if d["standard_error"] is not None:
                        text += f" ± {d['standard_error'] * scale:.{decimals}f}"
                    row.append(text)
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    lines += [
        "## Robustness of the linear-probe accuracy (percentage points)",
        "",
        "| loss | range over batch sizes | range over temperatures | median seed std |",
        "|---|---:|---:|---:|",
    ]
    for loss, entry in results["robustness"].items():
        cells = [
            "missing" if entry[k] is None else f"{100 * entry[k]:.2f}"
            for k in ("batch_size_range", "temperature_range", "median_seed_std")
        ]
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return lines + [""]


def _save_png(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_atomic(path, buffer.getvalue())


def _legend(ax: Any, **kwargs: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # Nothing to label while runs are missing.
        ax.legend(**kwargs)


def _series(results: Mapping[str, Any], names: Sequence[str], x_key: str, metric: str):
    cells = {c["name"]: c for c in results["cells"]}
    scale = METRICS[metric][2]
    points = [(cells[n][x_key], cells[n]["summary"][metric]) for n in names]
    points = [(x, s) for x, s in points if s["n"]]
    x = np.asarray([p[0] for p in points], float)
    y = np.asarray([p[1]["mean"] * scale for p in points], float)
    err = np.asarray([(p[1]["std"] or 0.0) * scale for p in points], float)
    return x, y, err


def plot_results(results: Mapping[str, Any], results_dir: str | os.PathLike) -> dict[str, str]:
    """Writes ``NAME_batch_size.png``, ``NAME_temperature.png`` and ``NAME_effective_rank.png``
    (error bars: sample standard deviation over seeds); returns their paths."""
    from matplotlib.figure import Figure

    out = Path(results_dir)
    name = results["sweep"]
    seeds = len(results["seeds"])
    paths = {}
    colours = {loss: f"C{i}" for i, loss in enumerate(results["losses"])}
    note = f"mean ± std over {seeds} seed{'s' * (seeds > 1)}"

    batch_view = results["views"]["batch_size"]
    fig = Figure(figsize=(11, 4.2))
    for ax, metric in zip(fig.subplots(1, 2), ("linear_probe", "knn"), strict=True):
        for loss, names in batch_view.items():
            x, y, err = _series(results, names, "batch_size", metric)
            if x.size:
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colours[loss], label=loss)
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["batch_sizes"], [str(b) for b in results["batch_sizes"]])
        ax.set_xlabel("batch size")
        ax.set_ylabel(METRICS[metric][1])
        ax.grid(True, alpha=0.3)
        _legend(ax)
    fig.suptitle(f"{name}: accuracy vs batch size (default temperature; {note})")
    paths["batch_size"] = out / f"{name}_batch_size.png"
    _save_png(fig, paths["batch_size"])

    temp_view = results["views"]["temperature"]
    groups: dict[str, list[str]] = {}
    for loss in temp_view:
        groups.setdefault(results["losses"][loss]["temperature"], []).append(loss)
    fig = Figure(figsize=(5.5 * max(1, len(groups)), 4.2))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(groups))))
    for ax, (tname, group) in zip(axes, groups.items(), strict=False):
        for loss in group:
            for metric, style in (("linear_probe", "-"), ("knn", "--")):
                x, y, err = _series(results, temp_view[loss], "temperature", metric)
                if x.size:
                    ax.errorbar(
                        x,
                        y,
                        yerr=err,
                        marker="o",
                        ls=style,
                        capsize=3,
                        color=colours[loss],
                        label=f"{loss}, {'linear probe' if metric == 'linear_probe' else 'kNN'}",
                    )
        ax.set_xscale("log")
        values = sorted({v for loss in group for v in results["losses"][loss]["temperatures"]})
        ax.set_xticks(values, [_num(v) for v in values])
        ax.set_xlabel(f"temperature {tname}")
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        _legend(ax, fontsize=8)
    fig.suptitle(
        f"{name}: accuracy vs temperature (batch {results['temperature_batch_size']}; {note})"
    )
    paths["temperature"] = out / f"{name}_temperature.png"
    _save_png(fig, paths["temperature"])

    fig = Figure(figsize=(11, 4.2))
    cells = {c["name"]: c for c in results["cells"]}
    batches = results["batch_sizes"]
    width = 0.8 / len(batches)
    for ax, metric in zip(
        fig.subplots(1, 2), ("effective_rank_features", "effective_rank_projections"), strict=True
    ):
        for j, batch in enumerate(batches):
            heights, errs = [], []
            for names in batch_view.values():
                s = next(
                    (cells[n]["summary"][metric] for n in names if cells[n]["batch_size"] == batch),
                    None,
                )
                heights.append(s["mean"] if s and s["n"] else np.nan)
                errs.append((s["std"] or 0.0) if s and s["n"] else 0.0)
            xs = np.arange(len(batch_view)) + (j - (len(batches) - 1) / 2) * width
            ax.bar(xs, heights, width, yerr=errs, capsize=2, label=f"B = {batch}")
        ax.set_xticks(np.arange(len(batch_view)), list(batch_view))
        ax.set_ylabel(METRICS[metric][1].replace("Effective rank of the", "effective rank,"))
        ax.grid(True, axis="y", alpha=0.3)
        _legend(ax, fontsize=8)
    fig.suptitle(f"{name}: effective rank per loss (default temperature; {note})")
    paths["effective_rank"] = out / f"{name}_effective_rank.png"
    _save_png(fig, paths["effective_rank"])
    return {k: os.fspath(v) for k, v in paths.items()}


def write_results(results: Mapping[str, Any], results_dir: str | os.PathLike) -> dict[str, str]:
    """Writes ``NAME.json``, ``NAME.md`` and the plots to ``results_dir``; returns the paths."""
    out = Path(results_dir)
    name = results["sweep"]
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    write_atomic(paths["json"], (json.dumps(results, indent=2, allow_nan=False) + "\n").encode())
    write_atomic(paths["markdown"], markdown(results).encode())
    return {**{k: os.fspath(v) for k, v in paths.items()}, **plot_results(results, out)}


# ----------------------------------------------------------------------------------------------
# Command line.


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes integers like 0,1,2; got {text!r}"
        ) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dhel-sweep",
        description="Run a grid of dhel-train + dhel-eval runs (resumable) and aggregate them.",
    )
    parser.add_argument("--sweep", required=True, help="a configs/sweeps/NAME.py file")
    parser.add_argument(
        "--runs_dir",
        "--runs-dir",
        default="runs/sweeps",
        help="runs go to RUNS_DIR/NAME/<cell>/seed<k> (default: runs/sweeps)",
    )
    parser.add_argument(
        "--results_dir",
        "--results-dir",
        default="results",
        help="NAME.json, NAME.md and NAME_*.png go here (default: results)",
    )
    parser.add_argument(
        "--dry-run",
        "--dry_run",
        action="store_true",
        help="list the runs, their status and commands; run nothing",
    )
    parser.add_argument(
        "--aggregate-only",
        "--aggregate_only",
        action="store_true",
        help="only aggregate the runs finished so far (missing ones are marked)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="run only the cells matching this glob (repeatable); aggregation "
        "still covers the whole sweep",
    )
    parser.add_argument(
        "--retry_failed",
        "--retry-failed",
        action="store_true",
        help="rerun runs that stopped on a non-finite loss",
    )
    parser.add_argument(
        "--seeds",
        type=_seeds,
        default=None,
        metavar="0,1,...",
        help="replace the sweep file's seeds (e.g. a first pass with --seeds 0)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``dhel-sweep`` console script."""
    args = _parser().parse_args(argv)
    # This process only counts steps: keep JAX off the accelerator its subprocesses need.
    import jax

    jax.config.update("jax_platforms", "cpu")
    try:
        sweep = load_sweep(args.sweep)
        if args.seeds is not None:
            sweep.seeds = args.seeds
            validate_sweep(sweep)
        if args.dry_run:
            counter = StepCounter()
            runs = make_runs(sweep, args.runs_dir)
            print(
                f"sweep {sweep.name}: {len(expand(sweep))} cells x {len(sweep.seeds)} seeds = "
                f"{len(runs)} runs"
            )
            for run in select_runs(runs, args.only):
                state = run_state(run, sweep, counter)
                step = f" at step {state.step}/{state.total_steps}" if state.step else ""
                views = "+".join(run.cell.views)
                print(f"  {run.label:<32} {state.status}{step}  [{views}]  {run.workdir}")
                print(f"      {display_command('dhel-train', run.train_args)}")
            return 0
        outcome: dict[str, list[str]] = {"failed": [], "stopped": []}
        if not args.aggregate_only:
            outcome = run_sweep(
                sweep, runs_dir=args.runs_dir, only=args.only, retry_failed=args.retry_failed
            )
        results = aggregate(sweep, args.runs_dir)
    except SweepError as e:
        print(f"dhel-sweep: error: {e}", file=sys.stderr)
        return 1
    paths = write_results(results, args.results_dir)
    done = results["num_runs"] - len(results["missing"])
    print(f"aggregated {done}/{results['num_runs']} runs: {', '.join(paths.values())}")
    return 1 if outcome["failed"] or outcome["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main())
