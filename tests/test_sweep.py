"""Tests for dhel_jax.sweep (dhel-sweep).

The end-to-end tests run a 2 x 2 sweep (SimCLR and DHEL x seeds 0 and 1) of ResNet-tiny runs on
``tfds.testing.mock_data`` Fashion-MNIST (64 records, batch 16, 8 steps, checkpoints at steps 4
and 8). Every ``dhel-train`` / ``dhel-eval`` is a real subprocess (tests/sweep_worker.py), in
three invocations of the sweep sharing one runs directory:

1. the last run's training is SIGKILLed right after its step-4 checkpoint;
2. the rerun skips the three finished runs and resumes the killed one from step 4;
3. a third run does nothing.

Compiled programs go to a persistent XLA cache shared by the subprocesses. The other tests
check the grids, the configs and the aggregation without training.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import statistics
import sys
import textwrap
import types
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dhel_jax import checkpointing, sweep
from dhel_jax._config_tree import flatten
from tests.helpers import parse_train_command
from tests.train_worker import MOCK_EXAMPLES

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("sweep_worker.py")
SWEEPS = ROOT / "configs" / "sweeps"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KILLED = "dhel_b16_tau0.3/seed1"

TINY_SWEEP = """
import ml_collections


def get_sweep():
    sweep = ml_collections.ConfigDict()
    sweep.config = "tiny_config.py"
    sweep.overrides = {"eval": {"knn_k": 10}}
    sweep.losses = {
        "simclr": {"loss": {"name": "simclr"}, "temperature": "tau", "temperatures": (0.5,)},
        "dhel": {"loss": {"name": "dhel"}, "temperature": "tau", "temperatures": (0.3,)},
    }
    sweep.loss_order = ("simclr", "dhel")
    sweep.comparisons = (("dhel", "simclr"),)
    sweep.batch_sizes = (16,)
    sweep.temperature_batch_size = 16
    sweep.seeds = (0, 1)
    sweep.baselines_cell = "dhel_b16_tau0.3"
    return sweep
"""

TINY_CONFIG = """
from tests.train_worker import tiny_config


def get_config():
    return tiny_config()
"""


def _write_sweep(directory: Path, text: str = TINY_SWEEP, name: str = "tiny") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tiny_config.py").write_text(TINY_CONFIG)
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(text))
    return path


def _flat(config: ml_collections.ConfigDict) -> dict:
    return flatten(json.loads(json.dumps(config.to_dict())))


# ----------------------------------------------------------------------------------------------
# Grids and configs (no training).


def test_fmnist_cpu_grid_has_unique_cells_and_one_budget():
    s = sweep.load_sweep(SWEEPS / "fmnist_cpu.py")
    cells = sweep.expand(s)
    runs = sweep.make_runs(s, "runs/sweeps")
    # 4 losses x 4 batch sizes, plus 4 x 3 temperatures at B = 128 of which 3 are defaults.
    assert len(cells) == 16 + 12 - 3 == len({c.name for c in cells})
    assert len(runs) == 2 * len(cells) and {r.seed for r in runs} == {0, 1}
    assert len({r.workdir for r in runs}) == len(runs)
    by_name = {c.name: c for c in cells}
    # docs/spec.md defaults: SimCLR tau 0.5, DCL 0.1, DHEL 0.3, KCL t 2.
    for name in ("simclr_b128_tau0.5", "dcl_b128_tau0.1", "kcl_b128_t2"):
        assert by_name[name].views == ("batch_size", "temperature")
    assert by_name["dhel_b128_tau0.3"].views == ("batch_size",)
    for loss, key, default, grid in (
        ("simclr", "tau", 0.5, (0.1, 0.2, 0.5)),
        ("dcl", "tau", 0.1, (0.1, 0.2, 0.5)),
        ("dhel", "tau", 0.3, (0.1, 0.2, 0.5)),
        ("kcl", "t", 2.0, (1.0, 2.0, 4.0)),
    ):
        mine = [c for c in cells if c.loss == loss]
        batch = sorted(c.batch_size for c in mine if "batch_size" in c.views)
        assert batch == [32, 64, 128, 256]
        assert {c.temperature for c in mine if "batch_size" in c.views} == {default}
        temps = [c for c in mine if "temperature" in c.views]
        assert sorted(c.temperature for c in temps) == list(grid)
        assert {c.batch_size for c in temps} == {128}
        assert all(c.temperature_name == key for c in mine)

    # Every run has the same budget: configs differ only in the loss, batch size and seed.
    base = None
    for run in runs:
        config = sweep.run_config(s, run.cell, run.seed)
        flat = _flat(config)
        assert flat["loss.name"] == run.cell.loss and flat["batch_size"] == run.cell.batch_size
        assert flat[f"loss.{run.cell.temperature_name}"] == run.cell.temperature
        assert flat["seed"] == run.seed
        if run.cell.loss == "kcl":
            assert flat["loss.kernel"] == "gaussian"
        shared = {k: v for k, v in flat.items() if not k.startswith("loss.")}
        del shared["batch_size"], shared["seed"]
        if base is None:
            base = shared
        assert shared == base
    assert base["num_epochs"] == 4 and base["optimizer.lr_scaling"] == "linear"
    assert (base["model.num_filters"], base["augment.out_size"]) == (16, 12)


def test_fmnist_cpu_v2_grid_has_three_seeds_and_one_pinned_budget():
    s = sweep.load_sweep(SWEEPS / "fmnist_cpu_v2.py")
    cells = sweep.expand(s)
    runs = sweep.make_runs(s, "runs/sweeps")
    # 4 losses x 3 batch sizes, plus 4 x 3 temperatures at B = 128 of which 3 are defaults.
    assert len(cells) == 12 + 12 - 3 == 21 == len({c.name for c in cells})
    assert len(runs) == 63 and {r.seed for r in runs} == {0, 1, 2}
    # One cell per seed also scores the baselines that every cell of the seed is held against.
    scored = [r.label for r in runs if "--baselines" in r.eval_args]
    assert scored == [f"dhel_b128_tau0.3/seed{k}" for k in (0, 1, 2)]
    assert s.error_bars == "se" and tuple(s.comparisons) == sweep.PAPER_COMPARISONS
    for loss in sweep.PAPER_LOSS_ORDER:
        mine = [c for c in cells if c.loss == loss]
        assert sorted(c.batch_size for c in mine if "batch_size" in c.views) == [32, 128, 512]
        assert {c.batch_size for c in mine if "temperature" in c.views} == {128}
    base = None
    for run in runs:
        flat = _flat(sweep.run_config(s, run.cell, run.seed))
        assert (flat["batch_size"], flat["seed"]) == (run.cell.batch_size, run.seed)
        shared = {k: v for k, v in flat.items() if not k.startswith("loss.")}
        del shared["batch_size"], shared["seed"]
        base = base or shared
        assert shared == base
    # Every setting of the pilot that chose the size is pinned in the sweep file itself.
    pinned = flatten(json.loads(json.dumps(s.overrides.to_dict())))
    want = {
        "model.name": "resnet_small",
        "model.num_filters": 16,
        "augment.out_size": 12,
        "augment.crop_scale": [0.2, 1.0],
        "augment.jitter_strength": 1.0,
        "num_epochs": 10,
        "optimizer.name": "lars",
        "optimizer.base_lr": 1.0,
        "optimizer.lr_scaling": "linear",
        "optimizer.warmup_epochs": 0.5,
    }
    assert {k: pinned[k] for k in want} == want
    assert {k: base[k] for k in want} == want
    sweep.run_config(s, cells[0], 0, validate=True)


@pytest.mark.parametrize(
    "name", ["cifar10_paper", "cifar100_paper", "stl10_paper", "imagenet100_paper"]
)
def test_paper_sweeps_follow_the_protocol(name):
    s = sweep.load_sweep(SWEEPS / f"{name}.py")
    assert tuple(s.batch_sizes) == (32, 64, 128, 256, 512)
    assert list(s.losses) == ["dcl", "dhel", "kcl", "simclr"]
    cell = sweep.expand(s)[0]
    config = sweep.run_config(s, cell, 0, validate=True)
    assert config.num_epochs == 200 and config.eval.protocol == "paper"
    assert config.optimizer.name in ("lars", "sgd") and config.optimizer.warmup_epochs > 0
    if name == "imagenet100_paper":
        assert (config.model.name, config.model.stem) == ("resnet50", "imagenet")
    else:
        assert (config.model.name, config.model.stem) == ("resnet18", "cifar")
        m = config.model
        assert (m.head_hidden_dim, m.head_out_dim, m.head_num_layers) == (512, 128, 2)


def test_train_command_builds_the_run_config(tmp_path):
    """The command line of each run, parsed by dhel-train's own flags, gives run_config."""
    text = TINY_SWEEP.replace(
        '"eval": {"knn_k": 10}',
        '"eval": {"knn_k": 10}, "augment": {"crop_scale": (0.2, 1.0), "normalize": False}, '
        '"optimizer": {"weight_decay": 1e-06}',
    )
    s = sweep.load_sweep(_write_sweep(tmp_path, text))
    runs = sweep.make_runs(s, tmp_path / "runs")
    assert len(runs) == 4
    for run in runs[:2]:
        parsed = parse_train_command(*run.train_args[:2], *run.train_args[4:])
        assert _flat(parsed) == _flat(sweep.run_config(s, run.cell, run.seed))
        assert parsed.augment.crop_scale == (0.2, 1.0) and parsed.augment.normalize is False
    command = sweep.display_command("dhel-train", runs[0].train_args)
    assert command.startswith("dhel-train --config ") and "--config.loss.tau=0.5" in command


@pytest.mark.parametrize(
    "change, message",
    [
        ('sweep.overrides = {"batch_size": 8}', "sweep.overrides.batch_size"),
        ('sweep.overrides = {"loss": {"tau": 0.2}}', "sweep.overrides.loss.tau"),
        ('sweep.losses.dhel.loss.name = "dhell"', "unknown loss 'dhell'"),
        ('sweep.losses.dhel.temperature = "t"', "loss 'dhel' has no temperature 't'"),
        ("sweep.losses.dhel.loss.tau = 0.2", "sweep.losses.dhel.loss.tau is set"),
        ("sweep.losses.dhel.temperatures = (0.0,)", "temperatures must be positive"),
        ("sweep.losses.dhel.lr = 0.1", "unknown field 'lr'"),
        ("sweep.batch_sizes = (16, 16)", "sweep.batch_sizes must be distinct"),
        ("sweep.seeds = ()", "sweep.seeds must be distinct"),
        ('sweep.loss_order = ("dhel",)', "sweep.loss_order must list every key"),
        ('sweep.comparisons = (("dhel", "kcl"),)', "sweep.comparisons: ('dhel', 'kcl') is not"),
        ('sweep.overrides = {"model": {"name": "vgg"}}', "config.model.name: unknown value"),
        ('sweep.config = "nope.py"', "no such training config file"),
        ("sweep.bogus = 1", "unknown field 'bogus'"),
        ('sweep.error_bars = "ci"', "sweep.error_bars must be 'se'"),
        ('sweep.baselines_cell = "dhel_b32"', "sweep.baselines_cell: no cell named 'dhel_b32'"),
    ],
)
def test_bad_sweeps_fail_clearly(tmp_path, change, message):
    text = TINY_SWEEP.replace("    return sweep", f"    {change}\n    return sweep")
    with pytest.raises(sweep.SweepError, match=re.escape(message)):
        sweep.load_sweep(_write_sweep(tmp_path, text))


def _synthetic_results(linear_probe: dict[str, list[float]], bars: str | None = None) -> dict:
    """Results of a sweep over SimCLR (tau) and KCL (t), batch sizes 32 and 64, temperatures
    at batch 64, from given per-seed accuracies (every metric takes the same values). With
    ``bars`` (``"se"`` or ``"sd"``), the results of ``aggregate`` for that ``error_bars``: cell
    summaries by ``stats.summary`` and the sensitivity tables."""
    views = {"batch_size": {}, "temperature": {}}
    cells = []
    for name, values in linear_probe.items():
        loss, batch, temp = name.split("_")
        tname = "tau" if temp.startswith("tau") else "t"
        value = float(temp[len(tname) :])
        default = {"simclr": 0.5, "kcl": 2.0}[loss]
        cell_views = (["batch_size"] if value == default else []) + (
            ["temperature"] if batch == "b64" else []
        )
        for view in cell_views:
            views[view].setdefault(loss, []).append(name)
        n = len(values)
        summary = {
            "mean": statistics.mean(values) if n else None,
            "std": statistics.stdev(values) if n > 1 else None,
            "n": n,
        }
        if bars is not None:
            summary = sweep.stats.summary(values)
        cells.append(
            {
                "name": name,
                "loss": loss,
                "batch_size": int(batch[1:]),
                "temperature_name": tname,
                "temperature": value,
                "views": cell_views,
                "summary": dict.fromkeys(sweep.METRICS, summary),
            }
        )
    results_seeds = list(range(max(len(v) for v in linear_probe.values())))
    by_name = {c["name"]: c for c in cells}
    for names in views["temperature"].values():  # ascending, as aggregate() orders them
        names.sort(key=lambda n: by_name[n]["temperature"])
    results = {
        "sweep": "synthetic",
        "losses": {
            "simclr": {"temperature": "tau", "default": 0.5, "temperatures": [0.1, 0.5]},
            "kcl": {"temperature": "t", "default": 2.0, "temperatures": [1.0, 2.0]},
        },
        "batch_sizes": [32, 64],
        "temperature_batch_size": 64,
        "seeds": results_seeds,
        "cells": cells,
        "views": views,
        "comparisons": [["kcl", "simclr"]],
        "complete": False,
        "num_runs": len(results_seeds) * len(cells),
        "missing": [{"run": "kcl_b32_t2/seed0", "status": "new", "step": 0}],
        "wall_time": {"train_seconds": 0.0, "eval_seconds": 0.0, "total_seconds": 0.0},
        "hardware": [],
        "devices": [],
    }
    results["differences"] = sweep.differences(results)
    results["robustness"] = sweep.robustness(results)
    if bars is not None:
        results["error_bars"] = bars
        results["sensitivity"] = sweep.sensitivity(results)
    return results


def test_differences_robustness_and_tables_of_both_views(tmp_path):
    values = {
        "simclr_b32_tau0.5": [0.70, 0.74],
        "simclr_b64_tau0.5": [0.80, 0.81],
        "simclr_b64_tau0.1": [0.60, 0.66],
        "kcl_b32_t2": [],  # missing
        "kcl_b64_t2": [0.83, 0.86],
        "kcl_b64_t1": [0.82, 0.84],
    }
    results = _synthetic_results(values)
    diffs = {d["batch_size"]: d for d in results["differences"]}
    assert diffs[32]["linear_probe"] is None  # no KCL run at B = 32
    diff = diffs[64]
    assert diff["linear_probe"]["difference"] == pytest.approx(0.845 - 0.805)
    se = ((0.03**2 / 2) / 2 + (0.01**2 / 2) / 2) ** 0.5  # variances 0.03^2/2 and 0.01^2/2
    assert diff["linear_probe"]["standard_error"] == pytest.approx(se)
    rob = results["robustness"]
    assert rob["simclr"]["batch_size_range"] == pytest.approx(0.805 - 0.72)
    assert rob["simclr"]["temperature_range"] == pytest.approx(0.805 - 0.63)
    assert rob["kcl"]["batch_size_range"] is None  # a missing cell: no range
    assert rob["kcl"]["temperature_range"] == pytest.approx(0.845 - 0.83)
    assert rob["simclr"]["median_seed_std"] == pytest.approx(
        statistics.median([statistics.stdev(v) for k, v in values.items() if "simclr" in k])
    )

    table = sweep.markdown(results)
    assert "| simclr (τ = 0.5) | 72.00 ± 2.83 | 80.50 ± 0.71 |" in table
    assert "| kcl (t = 2) | missing | 84.50 ± 2.12 |" in table
    assert "| loss | τ = 0.1 / t = 1 | τ = 0.5 / t = 2 |" in table
    assert "| kcl (t) | 83.00 ± 1.41 | 84.50 ± 2.12 |" in table
    assert f"| kcl − simclr | missing | +4.00 ± {100 * se:.2f} |" in table
    assert "| simclr | 8.50 | 17.50 | 2.83 |" in table
    assert "`kcl_b32_t2/seed0`: new (step 0)" in table
    paths = sweep.plot_results(results, tmp_path)
    assert all(Path(p).read_bytes()[:8] == PNG_SIGNATURE for p in paths.values())


def test_plot_titles_say_when_the_results_are_partial(tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr(
        sweep.plots, "_save_png", lambda fig, path: titles.append(fig.get_suptitle())
    )
    results = _synthetic_results(SE_VALUES, "se")  # 3 seeds
    for complete, want in ((True, "mean ± SE over 3 seeds)"), (False, "of 3; partial results)")):
        titles.clear()
        sweep.plot_results({**results, "complete": complete}, tmp_path)
        assert len(titles) == 4 and all(t.endswith(want) for t in titles), titles


@pytest.mark.parametrize("values", [[0.8], [0.7, 0.74], [0.61, 0.64, 0.66], [1.0, 2.0, 4.0, 8.0]])
def test_cell_summary_has_the_standard_error_of_the_mean(values):
    got = sweep.stats.summary([*values, None])  # None: a run that did not finish
    x = np.asarray(values, np.float64)
    assert got["n"] == x.size and got["mean"] == pytest.approx(x.mean(), rel=1e-12)
    if x.size < 2:
        assert got["std"] is None and got["standard_error"] is None
    else:
        assert got["std"] == pytest.approx(x.std(ddof=1), rel=1e-12)
        want = np.sqrt(((x - x.mean()) ** 2).sum() / (x.size - 1) / x.size)
        assert got["standard_error"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    "intervals",
    [
        [],
        [(3, 7)],
        [(0, 5), (5, 9)],  # touching
        [(0, 10), (2, 4), (3, 12)],  # nested and overlapping
        [(20, 25), (0, 3), (1, 2), (10, 15), (14, 30)],  # unsorted
    ],
)
def test_busy_seconds_is_the_length_of_the_union(intervals):
    # Reference: count the unit cells [t, t + 1) that some interval covers.
    covered = np.zeros(64, bool)
    for start, end in intervals:
        covered[start:end] = True
    assert sweep.report.busy_seconds(intervals) == covered.sum()


def test_elapsed_time_counts_overlapping_runs_once(tmp_path):
    """Two runners' attempts overlap: the report's elapsed time is their union, not their sum,
    and the stamps' UTC offsets are honoured."""
    s = sweep.load_sweep(_write_sweep(tmp_path / "configs"))
    runs = sweep.make_runs(s, tmp_path / "runs")
    attempts = {  # run -> (tool, started, seconds)
        0: [("dhel-train", "2026-11-30T10:00:00+0000", 600.0)],  # 10:00-10:10 UTC
        1: [
            ("dhel-train", "2026-11-30T11:05:00+0100", 900.0),  # 10:05-10:20 UTC
            ("dhel-eval", "2026-11-30T11:20:00+0100", 60.0),  # 10:20-10:21 UTC
        ],
        2: [("dhel-train", "2026-11-30T10:30:00+0000", 120.0)],  # 10:30-10:32 UTC
    }
    for i, found in attempts.items():
        runs[i].workdir.mkdir(parents=True)
        record = {
            "cell": runs[i].cell.name,
            "seed": runs[i].seed,
            "attempts": [{"tool": t, "started": w, "seconds": x} for t, w, x in found],
        }
        (runs[i].workdir / sweep.RECORD_FILENAME).write_text(json.dumps(record))
    results = sweep.aggregate(s, tmp_path / "runs")
    wall = results["wall_time"]
    assert wall["total_seconds"] == 600 + 900 + 60 + 120
    assert wall["elapsed_seconds"] == 21 * 60 + 2 * 60
    assert wall["first_started"] == "2026-11-30T10:00:00+0000"
    assert wall["last_finished"] == "2026-11-30T10:32:00+0000"
    table = sweep.markdown(results)
    assert "Wall time of the runs: 28m00s" in table
    assert "Elapsed with at least one run going: 23m00s" in table
    assert "from 2026-11-30 10:00 UTC to 2026-11-30 10:32 UTC" in table


# Three seeds per cell; KCL - SimCLR is resolved at B = 32 (0.09 against an SE of 0.013) but not
# at B = 64 (0.017 against an SE of 0.0093).
SE_VALUES = {
    "simclr_b32_tau0.5": [0.70, 0.72, 0.74],
    "simclr_b64_tau0.5": [0.80, 0.81, 0.79],
    "simclr_b64_tau0.1": [0.60, 0.66, 0.63],
    "kcl_b32_t2": [0.80, 0.81, 0.82],
    "kcl_b64_t2": [0.805, 0.83, 0.815],
    "kcl_b64_t1": [0.82, 0.84, 0.80],
}


def _np_difference(a, b):
    """Reference: difference of means, independent-samples SE, resolved beyond 2 SE."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a.mean() - b.mean()
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    return d, se


def test_differences_and_sensitivity_with_standard_errors_against_numpy(tmp_path):
    results = _synthetic_results(SE_VALUES, bars="se")
    v = {k: np.asarray(x, np.float64) for k, x in SE_VALUES.items()}
    diffs = {d["batch_size"]: d["linear_probe"] for d in results["differences"]}
    for batch, resolved in ((32, True), (64, False)):
        d, se = _np_difference(v[f"kcl_b{batch}_t2"], v[f"simclr_b{batch}_tau0.5"])
        assert diffs[batch]["difference"] == pytest.approx(d, rel=1e-12)
        assert diffs[batch]["standard_error"] == pytest.approx(se, rel=1e-12)
        assert diffs[batch]["resolved"] is resolved is bool(abs(d) > 2 * se)

    sens = results["sensitivity"]
    drops, ranges = {}, {}
    for loss, default, temps in (
        ("simclr", "tau0.5", ("tau0.1", "tau0.5")),
        ("kcl", "t2", ("t1", "t2")),
    ):
        drops[loss] = _np_difference(v[f"{loss}_b64_{default}"], v[f"{loss}_b32_{default}"])
        cells = [v[f"{loss}_b64_{t}"] for t in temps]
        hi, lo = max(cells, key=np.mean), min(cells, key=np.mean)
        ranges[loss] = _np_difference(hi, lo)
        got = sens["losses"][loss]["linear_probe"]
        for key, (d, se) in (
            ("small_batch_drop", drops[loss]),
            ("temperature_range", ranges[loss]),
        ):
            assert got[key]["difference"] == pytest.approx(d, rel=1e-12)
            assert got[key]["standard_error"] == pytest.approx(se, rel=1e-12)
            assert got[key]["resolved"] is bool(abs(d) > 2 * se)
    assert sens["losses"]["simclr"]["linear_probe"]["temperature_range"]["lowest"] == 0.1
    assert sens["losses"]["kcl"]["linear_probe"]["temperature_range"]["highest"] == 1.0
    (pair,) = sens["comparisons"]
    assert pair["losses"] == ["kcl", "simclr"]
    for key, table in (("small_batch_drop", drops), ("temperature_range", ranges)):
        d = table["kcl"][0] - table["simclr"][0]
        se = np.hypot(table["kcl"][1], table["simclr"][1])
        got = pair["linear_probe"][key]
        assert got["difference"] == pytest.approx(d, rel=1e-12)
        assert got["standard_error"] == pytest.approx(se, rel=1e-12)
        assert got["resolved"] is bool(abs(d) > 2 * se)
    # The SimCLR drop (8 points) is resolved; KCL's (0.7) and the KCL range are not.
    assert sens["losses"]["simclr"]["linear_probe"]["small_batch_drop"]["resolved"] is True
    assert sens["losses"]["kcl"]["linear_probe"]["small_batch_drop"]["resolved"] is False

    table = sweep.markdown(results)
    se32 = v["simclr_b32_tau0.5"].std(ddof=1) / np.sqrt(3)
    assert f"| simclr (τ = 0.5) | 72.00 ± {100 * se32:.2f} |" in table
    assert "mean ± SE, the standard error of the mean" in table
    assert "### W1 uniformity of the projections (mean ± SE)" in table
    d32, se32 = _np_difference(v["kcl_b32_t2"], v["simclr_b32_tau0.5"])
    d64, se64 = _np_difference(v["kcl_b64_t2"], v["simclr_b64_tau0.5"])
    row = f"| kcl − simclr | **{100 * d32:+.2f} ± {100 * se32:.2f}** | {100 * d64:+.2f} ± {100 * se64:.2f} |"
    assert row in table
    assert "## Sensitivity to the batch size and the temperature" in table

    paths = sweep.plot_results(results, tmp_path)
    assert Path(paths["geometry"]).name == "synthetic_geometry.png"
    assert all(Path(p).read_bytes()[:8] == PNG_SIGNATURE for p in paths.values())


def test_baseline_gains_use_each_runs_own_seed_and_skip_seeds_without_baselines():
    rng = np.random.default_rng(3)
    acc = rng.uniform(0.7, 0.9, size=(2, 3, 2))  # cell, seed, (linear, kNN)
    base = {0: rng.uniform(0.6, 0.8, size=2), 2: rng.uniform(0.6, 0.8, size=2)}  # no seed 1
    cells = [
        {
            "name": f"cell{i}",
            "runs": [
                {
                    "seed": k,
                    # Seed 2 of cell 1 did not finish: it counts nowhere.
                    "status": "new" if (i, k) == (1, 2) else "done",
                    "linear_probe": acc[i, k, 0],
                    "knn": acc[i, k, 1],
                }
                for k in range(3)
            ],
        }
        for i in range(2)
    ]
    results = {
        "cells": cells,
        "baselines": [
            {"seed": k, "random_init": {"linear_probe": b[0], "knn": b[1]}} for k, b in base.items()
        ],
    }
    gains = sweep.baseline_gains(results)
    smallest = np.inf
    for i, seeds in ((0, [0, 2]), (1, [0])):
        g = np.array([acc[i, k] - base[k] for k in seeds], np.float64)
        smallest = min(smallest, g.min())
        for j, metric in enumerate(("linear_probe", "knn")):
            entry = gains["cells"][f"cell{i}"][metric]
            assert entry["n"] == len(seeds)
            assert entry["mean"] == pytest.approx(g[:, j].mean(), abs=1e-12)
            assert entry["min"] == pytest.approx(g[:, j].min(), abs=1e-12)
            if len(seeds) > 1:
                se = g[:, j].std(ddof=1) / np.sqrt(len(seeds))
                assert entry["standard_error"] == pytest.approx(se, abs=1e-12)
            else:
                assert entry["standard_error"] is None
    assert gains["smallest"]["gain"] == pytest.approx(smallest, abs=1e-12)
    assert sweep.baseline_gains({"cells": cells})["smallest"] is None


def test_sd_report_keeps_the_first_studys_format():
    """``error_bars = "sd"`` (and results written before the option) give mean ± sample std
    and no resolved marks, as results/fmnist_cpu.md."""
    for results in (_synthetic_results(SE_VALUES), _synthetic_results(SE_VALUES, bars="sd")):
        table = sweep.markdown(results)
        sd = np.std(SE_VALUES["simclr_b32_tau0.5"], ddof=1)
        assert f"| simclr (τ = 0.5) | 72.00 ± {100 * sd:.2f} |" in table
        assert "mean ± sample standard deviation" in table
        assert "resolved, |difference|" not in table and "W1 uniformity" not in table
        assert "## Sensitivity" not in table
    s = sweep.load_sweep(SWEEPS / "fmnist_cpu.py")
    assert s.error_bars == "sd"


# ----------------------------------------------------------------------------------------------
# End to end: three invocations of a 2 x 2 sweep.


@pytest.fixture(scope="module")
def subprocess_env(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("xla_cache"))
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT),
        # 2 devices instead of the suite's 8, and XLA's quickest compilation: the subprocesses
        # compile every program once (the tests compare them with themselves only).
        XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    env.pop("SWEEP_TEST_KILL", None)
    return env


def _invoke(s, runs_dir: Path, env: dict) -> types.SimpleNamespace:
    """One sweep invocation through the worker; records the subprocesses launched."""
    calls, printed = [], []

    def launcher(tool: str) -> list[str]:
        calls.append(tool)
        return [sys.executable, str(WORKER), tool]

    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        outcome = sweep.run_sweep(
            s, runs_dir=runs_dir, launcher=launcher, env=env, print_fn=printed.append
        )
        results = sweep.aggregate(s, runs_dir)
    return types.SimpleNamespace(outcome=outcome, calls=calls, printed=printed, results=results)


def _snapshot(runs_dir: Path) -> dict:
    """Bytes and modification times of every eval.json and metrics.jsonl under runs_dir."""
    return {
        str(p.relative_to(runs_dir)): (p.stat().st_mtime_ns, p.read_bytes())
        for pattern in ("*/*/*/eval.json", "*/*/*/metrics.jsonl")
        for p in runs_dir.glob(pattern)
    }


@pytest.fixture(scope="module")
def invocations(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("sweep")
    s = sweep.load_sweep(_write_sweep(root / "configs"))
    runs_dir = root / "runs"
    killed = runs_dir / "tiny" / KILLED
    first = _invoke(s, runs_dir, {**subprocess_env, "SWEEP_TEST_KILL": f"{killed}:4"})
    first.snapshot = _snapshot(runs_dir)
    first.killed_steps = checkpointing.available_steps(killed)
    second = _invoke(s, runs_dir, subprocess_env)
    second.snapshot = _snapshot(runs_dir)
    third = _invoke(s, runs_dir, subprocess_env)
    third.snapshot = _snapshot(runs_dir)
    return types.SimpleNamespace(
        sweep=s, runs_dir=runs_dir, killed=killed, first=first, second=second, third=third
    )


def test_killed_run_is_reported_and_aggregation_marks_it_missing(invocations):
    first = invocations.first
    assert first.outcome["failed"] == [KILLED]
    assert sorted(first.outcome["done"]) == sorted(
        ["simclr_b16_tau0.5/seed0", "dhel_b16_tau0.3/seed0", "simclr_b16_tau0.5/seed1"]
    )
    assert first.calls == ["dhel-train", "dhel-eval"] * 3 + ["dhel-train"]
    assert any("dhel-train failed (exit -9)" in line for line in first.printed)
    assert first.killed_steps == [4]

    results = first.results
    assert not results["complete"]
    assert results["missing"] == [{"run": KILLED, "status": "partial", "step": 4}]
    dhel = next(c for c in results["cells"] if c["loss"] == "dhel")
    assert dhel["summary"]["linear_probe"]["n"] == 1
    assert dhel["summary"]["linear_probe"]["std"] is None
    table = sweep.markdown(results)
    assert "**Partial results**: 1 of 4 runs" in table and "(1/2 seeds)" in table
    assert f"`{KILLED}`: partial (step 4)" in table


def test_rerun_resumes_the_killed_run_from_its_checkpoint(invocations):
    second, killed = invocations.second, invocations.killed
    assert second.outcome["done"] == [KILLED] and second.outcome["failed"] == []
    assert second.calls == ["dhel-train", "dhel-eval"]
    assert any(f"{KILLED}: dhel-train (resuming from step 4)" in line for line in second.printed)
    # The trainer itself restored step 4 ...
    log = (killed / sweep.LOG_FILENAME).read_text()
    assert "resumed from" in log and "at step 4" in log
    assert log.count("==== ") == 3  # killed train, resumed train, eval
    assert checkpointing.available_steps(killed) == [4, 8]
    # ... and did not redo steps 1-4: their logged metrics (with timings) are the first
    # process's, byte for byte, and steps 5-8 were appended.
    key = str((killed / "metrics.jsonl").relative_to(invocations.runs_dir))
    before = invocations.first.snapshot[key][1].decode().splitlines()
    after = second.snapshot[key][1].decode().splitlines()
    assert [json.loads(line)["step"] for line in before] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in after] == list(range(1, 9))
    assert after[:4] == before
    assert any("images_per_sec" in line for line in before)


def test_rerun_skips_finished_runs(invocations):
    first, second, third = invocations.first, invocations.second, invocations.third
    for key, value in first.snapshot.items():
        if KILLED not in key:
            assert second.snapshot[key] == value, key  # untouched: same bytes, same mtime
    assert sorted(second.outcome["skipped"]) == sorted(first.outcome["done"])
    assert third.calls == [] and third.outcome["done"] == []
    assert sorted(third.outcome["skipped"]) == sorted(first.outcome["done"] + [KILLED])
    assert third.snapshot == second.snapshot
    assert "4 already done, 0 to run" in third.printed[0]


def test_aggregate_json_table_and_plots(invocations, tmp_path):
    results = invocations.third.results
    assert results["complete"] and results["missing"] == [] and results["num_runs"] == 4
    evals = {
        (c, k): json.loads(
            (invocations.runs_dir / "tiny" / c / f"seed{k}" / "eval.json").read_text()
        )
        for c in ("simclr_b16_tau0.5", "dhel_b16_tau0.3")
        for k in (0, 1)
    }
    cells = {c["name"]: c for c in results["cells"]}
    assert list(results["views"]["batch_size"]) == ["simclr", "dhel"]
    for name in ("simclr_b16_tau0.5", "dhel_b16_tau0.3"):
        assert cells[name]["views"] == ["batch_size", "temperature"]
        for metric, path in (
            ("linear_probe", ("linear_probe", "accuracy")),
            ("knn", ("knn", "accuracy")),
            ("effective_rank_features", ("geometry", "features", "effective_rank")),
            ("effective_rank_projections", ("geometry", "projections", "effective_rank")),
        ):
            values = []
            for k in (0, 1):
                node = evals[(name, k)]
                for p in path:
                    node = node[p]
                values.append(node)
            summary = cells[name]["summary"][metric]
            assert summary["n"] == 2
            assert summary["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert summary["std"] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-15)
            assert [r[metric] for r in cells[name]["runs"]] == values
    (diff,) = results["differences"]
    assert diff["losses"] == ["dhel", "simclr"] and diff["batch_size"] == 16
    a, b = cells["dhel_b16_tau0.3"]["runs"], cells["simclr_b16_tau0.5"]["runs"]
    xa, xb = [r["linear_probe"] for r in a], [r["linear_probe"] for r in b]
    want = statistics.mean(xa) - statistics.mean(xb)
    se = (statistics.variance(xa) / 2 + statistics.variance(xb) / 2) ** 0.5
    assert diff["linear_probe"]["difference"] == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert diff["linear_probe"]["standard_error"] == pytest.approx(se, rel=1e-9, abs=1e-15)
    wall = results["wall_time"]
    assert wall["train_seconds"] > 0 and wall["eval_seconds"] > 0
    # One runner ran the attempts one after another, so the elapsed time is their sum, up to
    # the 1 s resolution of each attempt's start stamp.
    records = [json.loads(p.read_text()) for p in invocations.runs_dir.glob("*/*/*/sweep_run.json")]
    num_attempts = sum(len(r["attempts"]) for r in records)
    assert num_attempts == 9  # 4 runs x (train, eval), and the killed run's first train
    assert abs(wall["elapsed_seconds"] - wall["total_seconds"]) <= num_attempts
    assert wall["first_started"] < wall["last_finished"]
    assert results["hardware"] and results["devices"]

    paths = sweep.write_results(results, tmp_path)
    assert json.loads(Path(paths["json"]).read_text()) == json.loads(json.dumps(results))
    table = Path(paths["markdown"]).read_text()
    lp = cells["dhel_b16_tau0.3"]["summary"]["linear_probe"]
    # The default error bars: the standard error of the mean.
    assert results["error_bars"] == "se"
    row = f"| dhel (τ = 0.3) | {100 * lp['mean']:.2f} ± {100 * lp['standard_error']:.2f} |"
    assert row in table
    assert "| loss | B = 16 |" in table and "## Temperature (batch size 16)" in table
    # The baselines of each seed, scored by the dhel cell's evaluation only, and every run's
    # gain over the random-init encoder of its own seed (NumPy, float64, from the eval.json files).
    assert results["baselines_cell"] == "dhel_b16_tau0.3"
    base = {}
    for k in (0, 1):
        assert "baselines" not in evals[("simclr_b16_tau0.5", k)]
        found = evals[("dhel_b16_tau0.3", k)]["baselines"]["random_init"]
        base[k] = np.array([found["linear_probe"]["accuracy"], found["knn"]["accuracy"]])
    assert [b["seed"] for b in results["baselines"]] == [0, 1]
    for b in results["baselines"]:
        got = [b["random_init"]["linear_probe"], b["random_init"]["knn"]]
        assert got == pytest.approx(base[b["seed"]], rel=1e-12)
    smallest = np.inf
    for name in ("simclr_b16_tau0.5", "dhel_b16_tau0.3"):
        gains = np.array(
            [
                [evals[(name, k)]["linear_probe"]["accuracy"], evals[(name, k)]["knn"]["accuracy"]]
                for k in (0, 1)
            ],
            np.float64,
        ) - np.stack([base[0], base[1]])
        smallest = min(smallest, gains.min())
        entry = results["baseline_gains"]["cells"][name]
        for j, metric in enumerate(("linear_probe", "knn")):
            assert entry[metric]["n"] == 2
            assert entry[metric]["mean"] == pytest.approx(gains[:, j].mean(), abs=1e-12)
            assert entry[metric]["min"] == pytest.approx(gains[:, j].min(), abs=1e-12)
            se = gains[:, j].std(ddof=1) / np.sqrt(2)
            assert entry[metric]["standard_error"] == pytest.approx(se, abs=1e-12)
    assert results["baseline_gains"]["smallest"]["gain"] == pytest.approx(smallest, abs=1e-12)
    assert "## Baselines: the random-init encoder and the raw pixels" in table
    assert f"| 0 | {100 * base[0][0]:.2f} | {100 * base[0][1]:.2f} | " in table
    assert f"Smallest gain of any run: {100 * smallest:+.2f} points" in table

    for key in ("batch_size", "temperature", "effective_rank", "geometry"):
        assert Path(paths[key]).name == f"tiny_{key}.png"
        assert Path(paths[key]).read_bytes()[:8] == PNG_SIGNATURE


def test_changed_sweep_is_refused_not_overwritten(invocations):
    changed = ml_collections.ConfigDict(invocations.sweep.to_dict())
    changed.overrides.num_epochs = 3
    run = sweep.make_runs(changed, invocations.runs_dir)[0]
    with pytest.raises(sweep.SweepError, match="differs from run .* in num_epochs"):
        sweep.run_state(run, changed, sweep.StepCounter())


def test_dry_run_lists_runs_and_status(invocations, capsys):
    sweep_file = Path(invocations.sweep.config).parent / "tiny.py"
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        rc = sweep.main(
            ["--sweep", str(sweep_file), "--runs_dir", str(invocations.runs_dir), "--dry-run"]
        )
    out = capsys.readouterr().out
    assert rc == 0
    assert "sweep tiny: 2 cells x 2 seeds = 4 runs" in out
    assert out.count(" done at step 8/8  [batch_size+temperature]") == 4
    assert out.count("dhel-train --config ") == 4


def test_cli_errors_are_one_line_with_their_status(invocations, tmp_path, capsys):
    """A missing sweep file is a usage error (2); a --runs_dir that cannot be created is a
    runtime failure (1). One 'dhel-sweep: error:' line each, and no run is touched."""
    assert sweep.main(["--sweep", str(tmp_path / "nope.py")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dhel-sweep: error: sweep file "), err
    assert "does not exist" in err[0]

    before = _snapshot(invocations.runs_dir)
    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")
    sweep_file = Path(invocations.sweep.config).parent / "tiny.py"
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        rc = sweep.main(["--sweep", str(sweep_file), "--runs_dir", str(blocked / "runs")])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dhel-sweep: error: cannot write "), err
    assert str(blocked) in err[0]
    assert _snapshot(invocations.runs_dir) == before


def test_two_sweeps_on_one_runs_dir_never_run_the_same_run(tmp_path):
    """Another process's lock on a run (the lock a running sweep holds): this sweep reports
    the run busy, launches nothing for it and writes nothing into it."""
    s = sweep.load_sweep(_write_sweep(tmp_path / "configs"))
    s.seeds = [0]
    runs_dir = tmp_path / "runs"
    run = sweep.make_runs(s, runs_dir)[0]
    run.workdir.mkdir(parents=True)
    fd = os.open(run.workdir / sweep.LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    launched, printed = [], []

    def launcher(tool: str) -> list[str]:
        launched.append(tool)
        raise AssertionError("a locked run was launched")

    try:
        with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
            outcome = sweep.run_sweep(
                s,
                runs_dir=runs_dir,
                only=[run.cell.name],
                launcher=launcher,
                print_fn=printed.append,
            )
    finally:
        os.close(fd)
    assert outcome["busy"] == [run.label] and not outcome["done"] and not launched
    assert any("locked by another sweep; skipped" in line for line in printed), printed
    assert sorted(p.name for p in run.workdir.iterdir()) == [sweep.LOCK_FILENAME]
