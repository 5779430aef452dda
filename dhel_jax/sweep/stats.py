"""The statistics of a sweep's results, from per-seed numbers: each cell's mean, standard
deviation and standard error, differences between losses with standard errors and whether
they are resolved, and each loss's sensitivity to the batch size and the temperature (see
:mod:`dhel_jax.sweep`). Pure functions of the results dictionary of
:func:`dhel_jax.sweep.report.aggregate`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Aggregated metrics: key -> (path in eval.json, label, scale for display, decimals).
METRICS: dict[str, tuple[tuple[str, ...], str, float, int]] = {
    "linear_probe": (("linear_probe", "accuracy"), "Linear-probe accuracy (%)", 100.0, 2),
    "knn": (("knn", "accuracy"), "kNN accuracy (%)", 100.0, 2),
    # The geometry of one output: eval.json["geometry"][output][metric].
    **{
        f"{metric}_{output}": (
            ("geometry", output, metric),
            f"{label} of the {output}",
            1.0,
            digits,
        )
        for metric, output, label, digits in (
            ("effective_rank", "features", "Effective rank", 1),
            ("effective_rank", "projections", "Effective rank", 1),
            ("alignment", "projections", "Alignment", 4),
            ("wasserstein_uniformity", "projections", "W1 uniformity", 4),
        )
    },
}
# What the ± of a cell is (``sweep.error_bars``): the standard error of the mean over seeds, or
# the sample standard deviation over seeds (the first study's report, results/fmnist_cpu.md).
ERROR_BARS = {
    "se": ("standard_error", "SE", "standard error of the mean (s / √n)"),
    "sd": ("std", "std", "sample standard deviation"),
}
# A difference is called resolved only when it exceeds this many of its standard errors.
RESOLVED_SE = 2.0
# The metrics of the sensitivity tables (the batch-size drop and the temperature range).
SENSITIVITY_METRICS = ("linear_probe", "knn")
# The metrics ``dhel-eval --baselines`` scores for each baseline (``eval.json["baselines"]``).
BASELINE_METRICS = ("linear_probe", "knn")


def summary(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation s (ddof = 1) and standard error of the mean s / sqrt(n)
    (both None for fewer than 2 values)."""
    x = np.asarray([v for v in values if v is not None], np.float64)
    std = float(x.std(ddof=1)) if x.size > 1 else None
    return {
        "mean": float(x.mean()) if x.size else None,
        "std": std,
        "standard_error": std / math.sqrt(x.size) if std is not None else None,
        "n": int(x.size),
    }


def error_bars(results: Mapping[str, Any]) -> str:
    """``"se"`` or ``"sd"``: what the ± of the results' tables and plots is (results written
    before the option existed, like results/fmnist_cpu.json, are ``"sd"``)."""
    return results.get("error_bars") or "sd"


def _resolved(difference: float, se: float | None) -> bool | None:
    """Whether ``|difference| > RESOLVED_SE * se`` (None without a standard error)."""
    return None if se is None else bool(abs(difference) > RESOLVED_SE * se)


def _difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any] | None:
    """``a - b`` of two cell summaries, with the standard error of that difference of means,
    ``sqrt(s_a^2 / n_a + s_b^2 / n_b)``, and ``resolved`` (:func:`_resolved`); the standard
    error and the flag are None unless both cells have >= 2 seeds.

    The two cells' seeds are treated as independent samples, not paired by seed: a seed fixes
    the initialisation, augmentations and data order, but two losses trained from it take
    different paths, and in the first study (results/fmnist_cpu.json, 24 pairs of losses at a
    batch size) the variance of the seed-paired differences of the linear-probe accuracy was
    0.98 times s_a^2 + s_b^2: pairing removed no variance, and it would halve the degrees of
    freedom and drop a cell's seeds that the other cell lacks.
    """
    if not a["n"] or not b["n"]:
        return None
    se = None
    if a["std"] is not None and b["std"] is not None:
        se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    difference = a["mean"] - b["mean"]
    return {"difference": difference, "standard_error": se, "resolved": _resolved(difference, se)}


def _combine(*terms: Mapping[str, Any] | None, signs: Sequence[int]) -> dict[str, Any] | None:
    """``sum(sign * difference)`` of independent differences (:func:`_difference`), with the
    standard error ``sqrt(sum(se^2))`` and ``resolved``; None if a term is missing."""
    present = [t for t in terms if t is not None]
    if len(present) < len(terms):
        return None
    value = sum(s * t["difference"] for s, t in zip(signs, present, strict=True))
    ses = [t["standard_error"] for t in present]
    se = None if any(x is None for x in ses) else math.sqrt(sum(x**2 for x in ses))
    return {"difference": value, "standard_error": se, "resolved": _resolved(value, se)}


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
                    **{m: _difference(ca["summary"][m], cb["summary"][m]) for m in ca["summary"]},
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


def sensitivity(results: Mapping[str, Any]) -> dict[str, Any]:
    """How much each loss's accuracy (:data:`SENSITIVITY_METRICS`) moves with the batch size and
    the temperature, with standard errors, and the comparisons' differences of those.

    Per loss and metric:

    * ``small_batch_drop``: mean at the largest batch size minus mean at the smallest (of the
      batch-size view), ± the standard error of that difference (:func:`_difference`);
    * ``temperature_range``: the highest minus the lowest cell mean over the temperatures, ±
      the standard error of the difference of those two cells. The two cells are picked after
      seeing the means, so with equal true accuracies this range is still positive on average:
      read its flag as an upper bound on the evidence.

    Per pair ``(a, b)`` of ``results["comparisons"]`` and metric: ``a``'s drop minus ``b``'s,
    and ``a``'s range minus ``b``'s, each ± sqrt of the sum of the four cells' squared standard
    errors (:func:`_combine`). Every entry has ``resolved`` (beyond :data:`RESOLVED_SE` standard
    errors); an entry is None where a cell is missing.
    """
    cells = {c["name"]: c for c in results["cells"]}
    batches = results["batch_sizes"]
    per_loss: dict[str, dict[str, Any]] = {}
    for loss in results["losses"]:
        by_batch = {
            cells[n]["batch_size"]: cells[n] for n in results["views"]["batch_size"].get(loss, [])
        }
        temps = [cells[n] for n in results["views"]["temperature"].get(loss, [])]
        entry: dict[str, Any] = {}
        for metric in SENSITIVITY_METRICS:
            small, large = by_batch.get(min(batches)), by_batch.get(max(batches))
            drop = None
            if small is not None and large is not None and len(batches) > 1:
                drop = _difference(large["summary"][metric], small["summary"][metric])
            spread = None
            done = [c for c in temps if c["summary"][metric]["n"]]
            if len(temps) > 1 and len(done) == len(temps):
                ranked = sorted(done, key=lambda c: c["summary"][metric]["mean"])
                spread = _difference(ranked[-1]["summary"][metric], ranked[0]["summary"][metric])
                if spread is not None:
                    spread["highest"] = ranked[-1]["temperature"]
                    spread["lowest"] = ranked[0]["temperature"]
            entry[metric] = {"small_batch_drop": drop, "temperature_range": spread}
        per_loss[loss] = entry
    pairs = []
    for a, b in results["comparisons"]:
        item: dict[str, Any] = {"losses": [a, b]}
        for metric in SENSITIVITY_METRICS:
            item[metric] = {
                key: _combine(per_loss[a][metric][key], per_loss[b][metric][key], signs=(1, -1))
                for key in ("small_batch_drop", "temperature_range")
            }
        pairs.append(item)
    return {"losses": per_loss, "comparisons": pairs}


def baseline_gains(results: Mapping[str, Any]) -> dict[str, Any]:
    """Per cell and metric (:data:`BASELINE_METRICS`): what each finished run gains over the
    random-init encoder of its own seed (``results["baselines"]``, one entry per seed whose
    baselines were scored), as ``summary`` of the per-seed gains plus ``min``, the smallest.

    The random-init encoder is the run's architecture initialised from the run's seed, so a
    seed's baseline serves every cell of that seed; runs of seeds without one are left out
    (``n`` counts the runs used). ``smallest`` names the cell and metric of the overall
    smallest gain (None when there is none)."""
    base = {b["seed"]: b["random_init"] for b in results.get("baselines") or ()}
    cells: dict[str, Any] = {}
    smallest = None
    for cell in results["cells"]:
        entry = {}
        for metric in BASELINE_METRICS:
            gains = [
                r[metric] - base[r["seed"]][metric]
                for r in cell["runs"]
                if r["status"] == "done" and r["seed"] in base and r.get(metric) is not None
            ]
            entry[metric] = {**summary(gains), "min": min(gains) if gains else None}
            if gains and (smallest is None or min(gains) < smallest["gain"]):
                smallest = {"cell": cell["name"], "metric": metric, "gain": min(gains)}
        cells[cell["name"]] = entry
    return {"cells": cells, "smallest": smallest}
