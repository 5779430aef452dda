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
  whose differences ``a - b`` are tabulated), ``description``, ``error_bars``: ``"se"``
  (the default: cells are mean ± standard error of the mean over seeds) or ``"sd"`` (mean ±
  sample standard deviation: the first study's report, results/fmnist_cpu.md), and
  ``baselines_cell``: the name of a cell whose ``dhel-eval`` also runs ``--baselines``, once
  per seed (the random-init encoder depends on the seed only, so it serves every cell).

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
``eval.json`` and writes ``<results_dir>/NAME.json`` (every run's numbers, per-cell mean,
sample standard deviation and standard error over seeds, wall times: the sum over runs and the
elapsed time with at least one run going, which counts the runs of two sweeps sharing the runs
directory once, hardware), ``NAME.md`` (tables: rows are losses, columns batch sizes or
temperatures; linear-probe and kNN accuracy, effective rank of the features and of the
projections, and with ``"se"`` the W1 uniformity of the projections; the ``comparisons`` as
differences ± standard error, seeds treated as independent samples, in bold where resolved,
i.e. beyond 2 standard errors; the range of each loss's accuracy over batch sizes and
temperatures, and with ``"se"`` its drop from the largest to the smallest batch size and its
range over temperatures with standard errors, and the comparisons' differences of those,
:func:`~dhel_jax.sweep.stats.sensitivity`; with baselines, each seed's random-init and pixel
baselines and every cell's gain over its seed's random-init encoder,
:func:`~dhel_jax.sweep.stats.baseline_gains`) and four plots: ``NAME_batch_size.png``
(accuracy against log B), ``NAME_temperature.png``, ``NAME_effective_rank.png`` and
``NAME_geometry.png`` (effective rank and W1 uniformity of the projections against log B).

The sweep process never starts an accelerator backend (it runs JAX on the CPU only, to count
steps), so its subprocesses get the whole TPU or GPU. It drives one host; multi-host pods are
not supported (launch ``dhel-train`` on every host yourself).

The package is split by concern: :mod:`~dhel_jax.sweep.grid` (the sweep file and its grid),
:mod:`~dhel_jax.sweep.runner` (the runs' state on disk, the subprocesses, locks and signals),
:mod:`~dhel_jax.sweep.stats` (the metrics, means, standard errors, differences between
losses), :mod:`~dhel_jax.sweep.report` (aggregation and tables), :mod:`~dhel_jax.sweep.plots`
(the plots) and :mod:`~dhel_jax.sweep.cli` (``dhel-sweep``); their public names are importable
from ``dhel_jax.sweep``.
"""

from __future__ import annotations

from dhel_jax.sweep.cli import main
from dhel_jax.sweep.grid import (
    PAPER_COMPARISONS,
    PAPER_LOSS_ORDER,
    TEMPERATURES,
    Cell,
    Run,
    SweepError,
    default_temperature,
    display_command,
    expand,
    load_sweep,
    loss_labels,
    make_runs,
    paper_losses,
    paper_sweep,
    run_config,
    run_overrides,
    select_runs,
    validate_sweep,
)
from dhel_jax.sweep.plots import plot_results
from dhel_jax.sweep.report import (
    TABLE_METRICS,
    aggregate,
    markdown,
    write_results,
)
from dhel_jax.sweep.runner import (
    CONFIG_FILENAME,
    EVAL_FILENAME,
    LOCK_FILENAME,
    LOG_FILENAME,
    PARENT_ENV,
    RECORD_FILENAME,
    TOOLS,
    Launcher,
    RunState,
    StepCounter,
    hardware,
    python_launcher,
    run_state,
    run_sweep,
    run_tool,
)
from dhel_jax.sweep.stats import (
    ERROR_BARS,
    METRICS,
    RESOLVED_SE,
    baseline_gains,
    differences,
    error_bars,
    robustness,
    sensitivity,
)

__all__ = [
    "CONFIG_FILENAME",
    "ERROR_BARS",
    "EVAL_FILENAME",
    "LOCK_FILENAME",
    "LOG_FILENAME",
    "METRICS",
    "PAPER_COMPARISONS",
    "PAPER_LOSS_ORDER",
    "PARENT_ENV",
    "RECORD_FILENAME",
    "RESOLVED_SE",
    "TABLE_METRICS",
    "TEMPERATURES",
    "TOOLS",
    "Cell",
    "Launcher",
    "Run",
    "RunState",
    "StepCounter",
    "SweepError",
    "aggregate",
    "baseline_gains",
    "default_temperature",
    "differences",
    "display_command",
    "error_bars",
    "expand",
    "hardware",
    "load_sweep",
    "loss_labels",
    "main",
    "make_runs",
    "markdown",
    "paper_losses",
    "paper_sweep",
    "plot_results",
    "python_launcher",
    "robustness",
    "run_config",
    "run_overrides",
    "run_state",
    "run_sweep",
    "run_tool",
    "select_runs",
    "sensitivity",
    "validate_sweep",
    "write_results",
]
