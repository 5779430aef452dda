"""The plots of a sweep's results (``NAME.json``, :mod:`dhel_jax.sweep.report`): accuracy and
the geometry of the projections against the batch size, accuracy against the temperature, and
the effective rank per loss; matplotlib's object API, written atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dhel_jax._io import write_atomic
from dhel_jax.sweep.grid import _num
from dhel_jax.sweep.stats import ERROR_BARS, METRICS, error_bars

PLOTS = ("batch_size", "temperature", "effective_rank", "geometry")


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
    spread = ERROR_BARS[error_bars(results)][0]
    points = [(cells[n][x_key], cells[n]["summary"][metric]) for n in names]
    points = [(x, s) for x, s in points if s["n"]]
    x = np.asarray([p[0] for p in points], float)
    y = np.asarray([p[1]["mean"] * scale for p in points], float)
    err = np.asarray([(p[1].get(spread) or 0.0) * scale for p in points], float)
    return x, y, err


def plot_results(results: Mapping[str, Any], results_dir: str | os.PathLike) -> dict[str, str]:
    """Writes ``NAME_batch_size.png`` (linear-probe and kNN accuracy against log B),
    ``NAME_temperature.png``, ``NAME_effective_rank.png`` and ``NAME_geometry.png`` (effective
    rank and W1 uniformity of the projections against log B); error bars: the standard error
    of the mean, or the sample standard deviation for an ``"sd"`` report (:func:`error_bars`).
    Returns their paths."""
    out = Path(results_dir)
    name = results["sweep"]
    seeds = len(results["seeds"])
    _, short, _ = ERROR_BARS[error_bars(results)]
    note = f"mean ± {short} over {seeds} seed{'s' * (seeds > 1)}"
    if not results["complete"]:  # a cell may have fewer: the tables say how many
        note = f"mean ± {short} over the seeds finished, of {seeds}; partial results"
    paths = {key: out / f"{name}_{key}.png" for key in PLOTS}
    _against_batch_size(results, ("linear_probe", "knn"), "accuracy", note, paths["batch_size"])
    _against_temperature(results, note, paths["temperature"])
    _effective_rank_bars(results, note, paths["effective_rank"])
    _against_batch_size(
        results,
        ("effective_rank_projections", "wasserstein_uniformity_projections"),
        "geometry of the projections",
        note,
        paths["geometry"],
    )
    return {k: os.fspath(v) for k, v in paths.items()}


def _colours(results: Mapping[str, Any]) -> dict[str, str]:
    return {loss: f"C{i}" for i, loss in enumerate(results["losses"])}


def _against_batch_size(
    results: Mapping[str, Any], metrics: Sequence[str], title: str, note: str, path: Path
) -> None:
    from matplotlib.figure import Figure

    colours = _colours(results)
    fig = Figure(figsize=(11, 4.2))
    for ax, metric in zip(fig.subplots(1, len(metrics)), metrics, strict=True):
        for loss, names in results["views"]["batch_size"].items():
            x, y, err = _series(results, names, "batch_size", metric)
            if x.size:
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colours[loss], label=loss)
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["batch_sizes"], [str(b) for b in results["batch_sizes"]])
        ax.set_xlabel("batch size (log scale)")
        w1 = metric == "wasserstein_uniformity_projections"
        ax.set_ylabel(METRICS[metric][1] + (" (0: uniform)" if w1 else ""))
        ax.grid(True, alpha=0.3)
        _legend(ax)
    fig.suptitle(f"{results['sweep']}: {title} vs batch size (default temperature; {note})")
    _save_png(fig, path)


def _against_temperature(results: Mapping[str, Any], note: str, path: Path) -> None:
    from matplotlib.figure import Figure

    colours = _colours(results)
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
        ax.set_xticks([], minor=True)  # no log-scale minor labels (3x10^-1) between them
        ax.set_xlabel(f"temperature {tname}")
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        _legend(ax, fontsize=8, handlelength=4)  # long enough to show kNN's dashes
    fig.suptitle(
        f"{results['sweep']}: accuracy vs temperature "
        f"(batch {results['temperature_batch_size']}; {note})"
    )
    _save_png(fig, path)


def _effective_rank_bars(results: Mapping[str, Any], note: str, path: Path) -> None:
    from matplotlib.figure import Figure

    spread = ERROR_BARS[error_bars(results)][0]
    batch_view = results["views"]["batch_size"]
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
                errs.append((s.get(spread) or 0.0) if s and s["n"] else 0.0)
            xs = np.arange(len(batch_view)) + (j - (len(batches) - 1) / 2) * width
            ax.bar(xs, heights, width, yerr=errs, capsize=2, label=f"B = {batch}")
        ax.set_xticks(np.arange(len(batch_view)), list(batch_view))
        ax.set_ylabel(METRICS[metric][1].replace("Effective rank of the", "effective rank,"))
        ax.grid(True, axis="y", alpha=0.3)
        _legend(ax, fontsize=8)
    fig.suptitle(f"{results['sweep']}: effective rank per loss (default temperature; {note})")
    _save_png(fig, path)
