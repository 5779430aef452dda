"""A sweep's results: the aggregation of every run's ``eval.json`` over seeds (statistics in
:mod:`dhel_jax.sweep.stats`), ``NAME.json`` and ``NAME.md`` (the plots:
:mod:`dhel_jax.sweep.plots`; see :mod:`dhel_jax.sweep`)."""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from dhel_jax._config_tree import as_json, flatten
from dhel_jax._io import write_atomic
from dhel_jax.sweep.grid import (
    TEMPERATURES,
    _as_dict,
    _num,
    default_temperature,
    loss_labels,
    make_runs,
)
from dhel_jax.sweep.plots import plot_results
from dhel_jax.sweep.runner import (
    EVAL_FILENAME,
    RECORD_FILENAME,
    STARTED_FORMAT,
    StepCounter,
    _duration,
    _read_json,
    run_state,
)
from dhel_jax.sweep.stats import (
    BASELINE_METRICS,
    ERROR_BARS,
    METRICS,
    RESOLVED_SE,
    SENSITIVITY_METRICS,
    baseline_gains,
    differences,
    error_bars,
    robustness,
    sensitivity,
    summary,
)

# The metrics that get a table in NAME.md (all are in NAME.json); the ``"se"`` report adds
# SE_TABLE_METRICS.
TABLE_METRICS = ("linear_probe", "knn", "effective_rank_features", "effective_rank_projections")
SE_TABLE_METRICS = ("wasserstein_uniformity_projections",)


def _get(tree: Any, path: Sequence[str]) -> float | None:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return None if tree is None else float(tree)


def aggregate(sweep: ml_collections.ConfigDict, runs_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads every run's ``eval.json`` and record; returns the contents of ``NAME.json``.

    A run counts when its ``eval.json`` is of the final training step; others are listed in
    ``missing`` with their status. Per cell and metric: ``mean``, ``std`` (sample, over the
    seeds that finished), ``standard_error`` (``std / sqrt(n)``) and ``n``. ``error_bars``
    (``sweep.error_bars``, default ``"se"``) says which of the two the tables and plots show.
    """
    runs = make_runs(sweep, runs_dir)
    bars = sweep.get("error_bars") or "se"
    counter = StepCounter()
    cells: dict[str, dict[str, Any]] = {}
    missing = []
    wall = {"train_seconds": 0.0, "eval_seconds": 0.0}
    intervals: list[tuple[float, float]] = []
    hosts: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    found_baselines: dict[int, dict[str, Any]] = {}
    for run in runs:
        entry = cells.setdefault(run.cell.name, _cell_entry(run.cell))
        state = run_state(run, sweep, counter)
        record = _read_json(run.workdir / RECORD_FILENAME) or {"attempts": []}
        seconds = _attempt_seconds(record["attempts"], intervals, hosts)
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
            if evaluated.get("baselines") and run.seed not in found_baselines:
                found_baselines[run.seed] = _seed_baselines(run.label, run.seed, evaluated)
        else:
            missing.append({"run": run.label, "status": state.status, "step": state.step})
        entry["runs"].append(item)
    for entry in cells.values():
        done = [r for r in entry["runs"] if r["status"] == "done"]
        entry["summary"] = {k: summary([r[k] for r in done]) for k in METRICS}
    results = {
        **_sweep_fields(sweep, bars),
        "cells": list(cells.values()),
        "views": _views(cells),
        "comparisons": [list(p) for p in sweep.get("comparisons") or ()],
        "complete": not missing,
        "num_runs": len(runs),
        "missing": missing,
        "wall_time": {
            **{k: round(v, 1) for k, v in wall.items()},
            "total_seconds": round(sum(wall.values()), 1),
            **_elapsed(intervals),
        },
        "hardware": hosts,
        "devices": devices,
    }
    if sweep.get("baselines_cell") or found_baselines:
        results["baselines_cell"] = sweep.get("baselines_cell")
        results["baselines"] = [found_baselines[k] for k in sorted(found_baselines)]
        results["baseline_gains"] = baseline_gains(results)
    results["differences"] = differences(results)
    results["robustness"] = robustness(results)
    results["sensitivity"] = sensitivity(results)
    return results


def _cell_entry(cell: Any) -> dict[str, Any]:
    """A cell of ``NAME.json`` before its runs are added."""
    return {
        "name": cell.name,
        "loss": cell.loss,
        "batch_size": cell.batch_size,
        "temperature_name": cell.temperature_name,
        "temperature": cell.temperature,
        "views": list(cell.views),
        "overrides": dict(cell.overrides),
        "runs": [],
    }


def _attempt_seconds(
    attempts: Sequence[Mapping[str, Any]],
    intervals: list[tuple[float, float]],
    hosts: list[dict[str, Any]],
) -> dict[str, float]:
    """A run's training and evaluation seconds over its attempts; appends each attempt's
    (start, end) to ``intervals`` and its hardware, when new, to ``hosts``."""
    seconds = {"train_seconds": 0.0, "eval_seconds": 0.0}
    for attempt in attempts:
        key = "train_seconds" if attempt["tool"] == "dhel-train" else "eval_seconds"
        seconds[key] += attempt["seconds"]
        if attempt.get("started"):
            start = datetime.datetime.strptime(attempt["started"], STARTED_FORMAT).timestamp()
            intervals.append((start, start + attempt["seconds"]))
        if attempt.get("hardware") and attempt["hardware"] not in hosts:
            hosts.append(attempt["hardware"])
    return seconds


def _views(cells: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """The cells of each view, per loss (the temperature view's by temperature)."""
    views: dict[str, dict[str, list[str]]] = {"batch_size": {}, "temperature": {}}
    for entry in cells.values():
        for view in entry["views"]:
            views[view].setdefault(entry["loss"], []).append(entry["name"])
    views["temperature"] = {
        label: sorted(names, key=lambda n: cells[n]["temperature"])
        for label, names in views["temperature"].items()
    }
    return views


def _sweep_fields(sweep: ml_collections.ConfigDict, bars: str) -> dict[str, Any]:
    """The fields of ``NAME.json`` that describe the sweep itself."""
    return {
        "sweep": sweep.name,
        "description": sweep.get("description"),
        "config": os.path.relpath(sweep.config),
        "overrides": as_json(flatten(_as_dict(sweep.overrides))),
        "losses": {
            label: {
                "loss": as_json(_as_dict(sweep.losses[label].loss)),
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
        "error_bars": bars,
        "statistics": (
            f"mean ± {ERROR_BARS[bars][2]} over the seeds that finished (std: sample standard "
            "deviation, ddof = 1; standard_error: std / sqrt(n)); differences between losses: "
            "difference of the means ± sqrt(SE_a² + SE_b²), seeds treated as independent "
            f"samples, resolved when |difference| > {RESOLVED_SE:g} SE"
        ),
    }


def _elapsed(intervals: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """``results["wall_time"]``'s elapsed time: how long at least one run was going (runs that
    overlap, as with two runners, count once; time the sweep was stopped does not count), and
    the first start and last end (UTC). Empty without recorded start times."""
    if not intervals:
        return {}
    starts, ends = zip(*intervals, strict=True)
    return {
        "elapsed_seconds": round(busy_seconds(intervals), 1),
        "first_started": _stamp(min(starts)),
        "last_finished": _stamp(max(ends)),
    }


def busy_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of the ``(start, end)`` intervals: the time during which at least
    one of them was running, overlapping intervals counted once."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _stamp(seconds: float) -> str:
    """A POSIX time as a ``STARTED_FORMAT`` time stamp in UTC."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime(STARTED_FORMAT)


def _utc_minute(stamp: str) -> str:
    """A ``STARTED_FORMAT`` time stamp as ``YYYY-MM-DD HH:MM UTC``."""
    when = datetime.datetime.strptime(stamp, STARTED_FORMAT).astimezone(datetime.UTC)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def _seed_baselines(label: str, seed: int, evaluated: Mapping[str, Any]) -> dict[str, Any]:
    """One seed's entry of ``results["baselines"]``, from a run's ``eval.json``."""
    found = evaluated["baselines"]
    entry: dict[str, Any] = {"seed": seed, "run": label}
    for key in ("random_init", "pixels"):
        entry[key] = {m: _get(found[key], METRICS[m][0]) for m in BASELINE_METRICS}
    entry["pixels"]["image_size"] = found["pixels"].get("image_size")
    return entry


def _baseline_lines(results: Mapping[str, Any]) -> list[str]:
    """The baselines of each seed and every cell's gain over its seed's random-init encoder."""
    if "baselines" not in results:
        return []
    where = results.get("baselines_cell")
    lines = [
        "## Baselines: the random-init encoder and the raw pixels",
        "",
        "The same probes on the same architecture at random initialisation (the seed's initial "
        "weights, BatchNorm statistics re-estimated on training images) and on the raw pixels, "
        "scored by `dhel-eval --baselines`"
        + (f" in cell `{where}` of each seed." if where else "."),
        "",
    ]
    found = results["baselines"]
    if not found:
        return lines + ["No seed's baselines are scored yet.", ""]
    size = next((b["pixels"]["image_size"] for b in found if b["pixels"]["image_size"]), None)
    pixels = f"raw pixels ({size}x{size})" if size else "raw pixels"
    lines += [
        f"| seed | random-init encoder: linear % | kNN % | {pixels}: linear % | kNN % |",
        "|---|---:|---:|---:|---:|",
    ]
    for b in found:
        row = [str(b["seed"])] + [
            "missing" if b[key][m] is None else f"{100 * b[key][m]:.2f}"
            for key in ("random_init", "pixels")
            for m in BASELINE_METRICS
        ]
        lines.append("| " + " | ".join(row) + " |")
    gains = results["baseline_gains"]
    seeds = ", ".join(str(b["seed"]) for b in found)
    lines += [
        "",
        "### Gain over the random-init encoder of the same seed (points)",
        "",
        f"Each run's accuracy minus its seed's random-init encoder's "
        f"(seed{'s' * (len(found) > 1)} {seeds}): "
        "mean ± SE over those runs, and the smallest (min).",
        "",
        "| cell | linear probe | min | kNN | min |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, entry in gains["cells"].items():
        row = [f"`{name}`"]
        for m in BASELINE_METRICS:
            g = entry[m]
            if not g["n"]:
                row += ["missing", "missing"]
                continue
            gain = {"difference": g["mean"], "standard_error": g["standard_error"]}
            text = _difference_text(gain, 100.0, 2, bold=False)
            if g["n"] != len(found):
                text += f" ({g['n']}/{len(found)} seeds)"
            row += [text, f"{100 * g['min']:+.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    low = gains["smallest"]
    if low is not None:
        lines += [
            "",
            f"Smallest gain of any run: {100 * low['gain']:+.2f} points "
            f"({METRICS[low['metric']][1].split(' (')[0]}, `{low['cell']}`).",
        ]
    return lines + [""]


def _cell_text(
    summary: Mapping[str, Any], scale: float, decimals: int, seeds: int, spread: str = "std"
) -> str:
    n = summary["n"]
    if not n:
        return "missing"
    text = f"{summary['mean'] * scale:.{decimals}f}"
    if summary.get(spread) is not None:
        text += f" ± {summary[spread] * scale:.{decimals}f}"
    return text if n == seeds else f"{text} ({n}/{seeds} seeds)"


def _difference_text(
    d: Mapping[str, Any] | None, scale: float, decimals: int, *, bold: bool = True
) -> str:
    """``+1.23 ± 0.45``, in bold when resolved (and ``bold``); ``missing`` for None."""
    if d is None:
        return "missing"
    text = f"{d['difference'] * scale:+.{decimals}f}"
    if d["standard_error"] is not None:
        text += f" ± {d['standard_error'] * scale:.{decimals}f}"
    return f"**{text}**" if bold and d.get("resolved") else text


def _difference_table(
    results: Mapping[str, Any], metric: str, title: str, *, bold: bool
) -> list[str]:
    """Markdown table of ``metric``'s loss differences (``results["comparisons"]``) per batch
    size, headed ``### <label>: <title>``."""
    _, label, scale, decimals = METRICS[metric]
    header = ["losses"] + [f"B = {b}" for b in results["batch_sizes"]]
    lines = [f"### {label}: {title}", ""]
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
            row.append(_difference_text(d, scale, decimals, bold=bold))
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


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
    bars = error_bars(results)
    se = bars == "se"
    spread, _, long = ERROR_BARS[bars]
    lines += [
        f"Cells: mean ± {'SE, the ' if se else ''}{long} over {seeds} "
        f"seed{'s' * (seeds > 1)} ({', '.join(map(str, results['seeds']))}); evaluation "
        "`dhel-eval` of the final checkpoint (linear probe and kNN on frozen encoder features, "
        "test split).",
        "",
    ]
    metrics = TABLE_METRICS + (SE_TABLE_METRICS if se else ())
    heading = " (mean ± SE)" if se else ""
    if not results["complete"]:
        lines += [
            f"**Partial results**: {len(results['missing'])} of {results['num_runs']} runs are "
            "not finished (listed at the end).",
            "",
        ]
    batch_view = results["views"]["batch_size"]
    if batch_view:
        lines += ["## Batch size (each loss at its default temperature)", ""]
        for metric in metrics:
            _, label, scale, decimals = METRICS[metric]
            lines += [f"### {label}{heading}", ""]
            header = ["loss"] + [f"B = {b}" for b in results["batch_sizes"]]
            lines += ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
            for loss, names in batch_view.items():
                by_batch = {cells[n]["batch_size"]: cells[n] for n in names}
                info = losses[loss]
                row = [f"{loss} ({_temperature_label(info['temperature'], info['default'])})"]
                for b in results["batch_sizes"]:
                    c = by_batch.get(b)
                    row.append(
                        _cell_text(c["summary"][metric], scale, decimals, seeds, spread)
                        if c
                        else "-"
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
        for metric in metrics:
            _, label, scale, decimals = METRICS[metric]
            lines += [f"### {label}{heading}", ""]
            lines += ["| " + " | ".join(header) + " |", "|---" + "|---:" * width + "|"]
            for loss, names in temp_view.items():
                row = [f"{loss} ({TEMPERATURES[losses[loss]['temperature']]})"]
                row += [
                    _cell_text(cells[n]["summary"][metric], scale, decimals, seeds, spread)
                    for n in names
                ]
                row += ["-"] * (width - len(names))
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    lines += _se_comparison_lines(results) if se else _comparison_lines(results)
    lines += _baseline_lines(results)
    wall = results["wall_time"]
    lines += [
        "## Runs",
        "",
        f"{results['num_runs']} runs ({len(cells)} cells x {seeds} seeds). Wall time of the "
        f"runs: {_duration(wall['total_seconds'])} (training {_duration(wall['train_seconds'])}, "
        f"evaluation {_duration(wall['eval_seconds'])}).",
    ]
    if "elapsed_seconds" in wall:  # absent from the first study's results/fmnist_cpu.json
        lines[-1] += (
            f" Elapsed with at least one run going: {_duration(wall['elapsed_seconds'])} "
            f"(overlapping runs count once, time the sweep was stopped does not count), "
            f"from {_utc_minute(wall['first_started'])} to {_utc_minute(wall['last_finished'])}."
        )
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
            lines += _difference_table(results, metric, "difference", bold=False)
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


def _se_comparison_lines(results: Mapping[str, Any]) -> list[str]:
    """The ``"se"`` report's differences between losses and sensitivity tables."""
    lines = []
    threshold = f"{RESOLVED_SE:g}"
    if results["differences"]:
        lines += [
            "## Differences between losses (batch-size view)",
            "",
            "Difference of the cell means ± its standard error sqrt(SE_a² + SE_b²) = "
            "sqrt(s_a²/n_a + s_b²/n_b), the seeds of the two cells treated as independent "
            "samples (a seed does not carry over between losses: in the first study pairing "
            f"by seed removed no variance). **Bold**: resolved, |difference| > {threshold} SE; "
            "any other difference is not resolved by this sweep.",
            "",
        ]
        for metric in (
            "linear_probe",
            "knn",
            "effective_rank_projections",
            "wasserstein_uniformity_projections",
        ):
            lines += _difference_table(results, metric, "difference ± SE", bold=True)
    sens = results.get("sensitivity")
    if sens:
        small, large = min(results["batch_sizes"]), max(results["batch_sizes"])
        lines += [
            "## Sensitivity to the batch size and the temperature (percentage points)",
            "",
            f"Drop: accuracy at B = {large} minus accuracy at B = {small} (each loss at its "
            "default temperature). Temperature range: the highest minus the lowest cell mean over "
            f"the temperatures at B = {results['temperature_batch_size']} (the two cells are "
            "chosen after seeing the means, so the range is biased upward and its flag is "
            f"optimistic). ± SE; **bold**: beyond {threshold} SE.",
            "",
        ]
        for metric in SENSITIVITY_METRICS:
            _, label, scale, decimals = METRICS[metric]
            lines += [
                f"### {label}",
                "",
                f"| loss | drop, B = {large} − B = {small} | temperature range |",
                "|---|---:|---:|",
            ]

            def cells(e: Mapping[str, Any], scale: float = scale, decimals: int = decimals) -> str:
                return " | ".join(
                    _difference_text(e[key], scale, decimals)
                    for key in ("small_batch_drop", "temperature_range")
                )

            for loss, entry in sens["losses"].items():
                lines.append(f"| {loss} | {cells(entry[metric])} |")
            if sens["comparisons"]:
                lines += [
                    "",
                    "| losses | difference of drops | difference of temperature ranges |",
                    "|---|---:|---:|",
                ]
                for item in sens["comparisons"]:
                    a, b = item["losses"]
                    lines.append(f"| {a} − {b} | {cells(item[metric])} |")
            lines.append("")
    return lines


def write_results(results: Mapping[str, Any], results_dir: str | os.PathLike) -> dict[str, str]:
    """Writes ``NAME.json``, ``NAME.md`` and the plots to ``results_dir``; returns the paths."""
    out = Path(results_dir)
    name = results["sweep"]
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    write_atomic(paths["json"], (json.dumps(results, indent=2, allow_nan=False) + "\n").encode())
    write_atomic(paths["markdown"], markdown(results).encode())
    return {**{k: os.fspath(v) for k, v in paths.items()}, **plot_results(results, out)}
