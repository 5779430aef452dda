"""The plots of an evaluation: the singular-value spectrum, the pairwise-cosine histogram
against the uniform-sphere density, and the training curves of a run's ``metrics.jsonl``.

matplotlib's object API with the Agg canvas: no pyplot, no global backend change. Every PNG is
written to a temporary name and renamed.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from dhel_jax import builders, metrics
from dhel_jax._io import write_atomic

PLOTS_SUBDIR = "plots"
PLOT_FILENAMES = {
    "spectrum": "spectrum.png",
    "cosine_histogram": "cosine_histogram.png",
    "training_curves": "training_curves.png",
}
OUTPUTS = ("features", "projections")

_pair_histogram = jax.jit(metrics.pair_cosine_histogram, static_argnames=("num_bins", "block_size"))


def _save_figure(fig: Any, path: epath.Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_atomic(path, buffer.getvalue())


_SPECTRUM_FLOOR = 1e-8


def plot_spectrum(
    embeddings: Mapping[str, np.ndarray], effective_ranks: Mapping[str, float], path: epath.Path
) -> None:
    """Normalised singular values ``s_k / sum(s)`` of the L2-normalised rows (the ``p_k`` of
    ``effective_rank``), log scale; the axis stops at 1e-8."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for name, x in embeddings.items():
        u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        s = np.linalg.svd(u.astype(np.float64), compute_uv=False)
        ax.semilogy(
            np.arange(1, len(s) + 1),
            s / s.sum(),
            marker=".",
            label=f"{name} (d = {x.shape[1]}, effective rank {effective_ranks[name]:.1f})",
        )
    # Singular values at round-off level (exact zeros in theory) would stretch the axis.
    low, _ = ax.get_ylim()
    if low < _SPECTRUM_FLOOR:
        ax.set_ylim(bottom=_SPECTRUM_FLOOR)
    ax.set_xlabel("index k")
    ax.set_ylabel("s_k / sum(s)")
    ax.set_title("Singular-value spectrum of the test embeddings")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save_figure(fig, path)


def plot_cosine_histograms(
    embeddings: Mapping[str, np.ndarray],
    w1: Mapping[str, float],
    path: epath.Path,
    *,
    num_bins: int = 200,
) -> None:
    """Histogram (as a density) of the pairwise cosines of each embedding, against the density
    of the cosine of two uniform points on the sphere of the same dimension."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(embeddings), 4.0))
    axes = np.atleast_1d(fig.subplots(1, len(embeddings)))
    edges = np.linspace(-1.0, 1.0, num_bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    grid = np.linspace(-1.0, 1.0, 2001)
    for ax, (name, x) in zip(axes, embeddings.items(), strict=True):
        counts = np.asarray(_pair_histogram(x, num_bins=num_bins, block_size=512))
        density = counts / max(counts.sum(), 1) / np.diff(edges)
        ax.bar(centres, density, width=np.diff(edges), alpha=0.6, label=f"{name} pairs")
        d = x.shape[1]
        ax.plot(
            grid,
            metrics.sphere_cosine_density(grid, d),
            "k-",
            lw=1.2,
            label=f"uniform on S^{d - 1}",
        )
        ax.set_xlim(-1, 1)
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("density")
        ax.set_title(f"{name}: {len(x)} examples, W1 = {w1[name]:.4f}")
        ax.legend()
    _save_figure(fig, path)


def read_metrics_log(path: epath.Path) -> list[dict[str, float]]:
    """The records of a run's ``metrics.jsonl`` ([] when absent)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(
    records: Sequence[Mapping[str, float]], path: epath.Path, *, step: int | None = None
) -> None:
    """One panel per logged scalar against the training step: the loss, its aux terms, the
    online probe, then the optimiser and speed diagnostics; a dashed line marks ``step``."""
    from matplotlib.figure import Figure

    logged = {k for r in records for k in r} - {"step", "epoch"}
    last = ("probe_accuracy", "probe_loss", "learning_rate", "grad_norm", "images_per_sec")
    keys = [k for k in ("loss",) if k in logged]
    keys += sorted(logged - set(keys) - set(last)) + [k for k in last if k in logged]
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig = Figure(figsize=(3.6 * cols, 2.7 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, key in zip(axes, keys, strict=False):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points, strict=True), lw=1.2)
        if step is not None:
            ax.axvline(step, color="k", ls="--", lw=0.8)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    marked = "" if step is None else f"; dashed: evaluated step {step}"
    fig.suptitle(f"Training curves ({builders.METRICS_FILENAME}{marked})")
    fig.tight_layout()
    _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------


def write_plots(
    out: epath.Path,
    workdir: epath.Path,
    step: int,
    test: Mapping[str, np.ndarray],
    geo: Mapping[str, Mapping[str, float]],
    num_pairs: int,
) -> dict[str, str | None]:
    """Writes the PNG plots; returns their paths relative to ``out`` (None: not written)."""
    paths = {k: out / PLOTS_SUBDIR / v for k, v in PLOT_FILENAMES.items()}
    plot_spectrum(
        {k: test[k] for k in OUTPUTS},
        {k: geo[k]["effective_rank"] for k in OUTPUTS},
        paths["spectrum"],
    )
    plot_cosine_histograms(
        {k: test[k][:num_pairs] for k in OUTPUTS},
        {k: geo[k]["wasserstein_uniformity"] for k in OUTPUTS},
        paths["cosine_histogram"],
    )
    written: dict[str, str | None] = {
        k: f"{PLOTS_SUBDIR}/{PLOT_FILENAMES[k]}" for k in ("spectrum", "cosine_histogram")
    }
    records = read_metrics_log(workdir / builders.METRICS_FILENAME)
    if records:
        plot_training_curves(records, paths["training_curves"], step=step)
        written["training_curves"] = f"{PLOTS_SUBDIR}/{PLOT_FILENAMES['training_curves']}"
    else:
        logging.warning("no %s in %s: no training curves", builders.METRICS_FILENAME, workdir)
        written["training_curves"] = None
    return written
