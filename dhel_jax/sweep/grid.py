"""The sweep file and its grid: loading and checking ``get_sweep()``, the paper's sweep, the
cells of the batch-size and temperature views, and each run's config overrides and commands
(see :mod:`dhel_jax.sweep`)."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from dhel_jax._config_tree import flatten

TEMPERATURES = {"tau": "τ", "t": "t"}
# Fields of the training config the sweep sets per run; the shared overrides may not.
_RUN_FIELDS = ("loss", "batch_size", "seed")


class SweepError(ValueError):
    """A bad sweep file, or a run directory that does not belong to this sweep."""


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


def _as_dict(value: Any) -> dict[str, Any]:
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else dict(value or {})


def validate_sweep(sweep: ml_collections.ConfigDict) -> None:
    """Checks a sweep's fields (see the module docstring), and the training config of one cell
    of each loss with ``dhel_jax.train_config.validate_config``.

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
    optional = ("description", "loss_order", "comparisons", "error_bars", "baselines_cell")
    extra = sorted(set(sweep) - {*required, *optional})
    if extra:
        raise SweepError(f"sweep: unknown field {extra[0]!r}; accepted: {required + optional}.")
    if not isinstance(sweep.name, str) or not sweep.name or "/" in sweep.name:
        raise SweepError(f"sweep.name must be a non-empty file name; got {sweep.name!r}.")
    if not os.path.isfile(sweep.config):
        raise SweepError(f"sweep.config: no such training config file {sweep.config!r}.")
    shared = flatten(_as_dict(sweep.overrides))
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
    bars = sweep.get("error_bars")
    if bars is not None and bars not in ("se", "sd"):
        raise SweepError(
            f"sweep.error_bars must be 'se' (standard error of the mean, the default) or 'sd' "
            f"(sample standard deviation); got {bars!r}."
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
    for label, entry in sweep.losses.items():
        _validate_loss_entry(label, entry)
    for pair in sweep.get("comparisons") or ():
        if len(pair) != 2 or not all(label in sweep.losses for label in pair):
            raise SweepError(
                f"sweep.comparisons: {pair!r} is not a pair of keys of sweep.losses "
                f"({sorted(sweep.losses)})."
            )
    cells = expand(sweep)
    chosen = sweep.get("baselines_cell")
    if chosen is not None and chosen not in {c.name for c in cells}:
        raise SweepError(
            f"sweep.baselines_cell: no cell named {chosen!r}; it names the cell whose "
            f"evaluation also scores the baselines, one of: {', '.join(c.name for c in cells)}."
        )
    # Every run's config must build: check one cell of each loss now, not hours into the sweep.
    checked: set[str] = set()
    for cell in cells:
        if cell.loss not in checked:
            checked.add(cell.loss)
            try:
                run_config(sweep, cell, sweep.seeds[0], validate=True)
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                raise SweepError(f"sweep: the config of cell {cell.name} is invalid: {e}") from e


PAPER_LOSS_ORDER = ("simclr", "dcl", "dhel", "kcl")
# The paper's claims: DHEL and KCL against SimCLR and DCL (``sweep.comparisons``).
PAPER_COMPARISONS = (("dhel", "simclr"), ("dhel", "dcl"), ("kcl", "simclr"), ("kcl", "dcl"))


def _validate_loss_entry(label: str, entry: Any) -> None:
    """Checks ``sweep.losses[label]``: its fields, its loss and its temperatures."""
    from dhel_jax import losses

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
    error_bars: str = "se",
    baselines_cell: str | None = None,
) -> ml_collections.ConfigDict:
    """A sweep of the paper's comparison (:func:`paper_losses`, :data:`PAPER_LOSS_ORDER`,
    :data:`PAPER_COMPARISONS`) over ``config`` (a path relative to the sweep file): every loss
    at its default temperature over ``batch_sizes``, and over the temperatures at
    ``temperature_batch_size``; ``overrides`` apply to every run; ``error_bars``: what the ± of
    the report is (``"se"`` or ``"sd"``, see :mod:`dhel_jax.sweep`); ``baselines_cell``: the
    cell whose ``dhel-eval`` also scores the baselines of its seed (``--baselines``)."""
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
    sweep.error_bars = error_bars
    if baselines_cell is not None:
        sweep.baselines_cell = baselines_cell
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
            overrides = {f"loss.{k}": v for k, v in flatten(_as_dict(entry.loss)).items()}
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
    return {**flatten(_as_dict(sweep.overrides)), **cell.overrides, "seed": seed}


def run_config(
    sweep: ml_collections.ConfigDict, cell: Cell, seed: int, *, validate: bool = False
) -> ml_collections.ConfigDict:
    """The training config of one run (what ``dhel-train`` builds from its command line);
    ``validate``: also ``dhel_jax.train_config.validate_config`` on one device."""
    config = _load_config_file(sweep.config)
    config.update_from_flattened_dict(run_overrides(sweep, cell, seed))
    if validate:
        from dhel_jax import train_config

        train_config.validate_config(config, device_count=1, process_count=1)
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
    baselines_cell = sweep.get("baselines_cell")
    runs = []
    for seed in sweep.seeds:
        for cell in expand(sweep):
            workdir = root / cell.name / f"seed{seed}"
            args = ["--config", sweep.config, "--workdir", os.fspath(workdir)]
            args += [
                f"--config.{k}={_flag_value(v)}"
                for k, v in run_overrides(sweep, cell, seed).items()
            ]
            evaluate = ["--workdir", os.fspath(workdir)]
            if cell.name == baselines_cell:
                evaluate.append("--baselines")
            runs.append(Run(cell, seed, workdir, tuple(args), tuple(evaluate)))
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
