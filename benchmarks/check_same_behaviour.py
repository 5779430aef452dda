"""Checks that two revisions of dhel-jax behave the same: same outputs, byte for byte.

    python benchmarks/check_same_behaviour.py --base REV [--head REV]

For each revision (``--head`` defaults to the working tree this script sits in; any other is
checked out into a temporary ``git worktree``), a fresh Python process with that tree first on
``sys.path`` produces:

* ``train/metrics.jsonl`` and ``train/config.json`` of a tiny run: ``tests/train_worker.py``'s
  ``tiny_config`` (ResNet-tiny, 16x16 views, batch 16), 4 steps on ``tfds.testing.mock_data``
  Fashion-MNIST (64 records), through ``dhel_jax.train.train_and_evaluate``;
* ``eval_fast.json`` (+ its printed summary and PNG plots) of ``dhel_jax.evaluate.evaluate`` on
  that run, fast protocol, with the baselines; ``eval_paper.json`` with the paper probe
  (2 epochs of batch 16), no plots;
* the stdout of ``dhel-sweep --dry-run`` for every ``configs/sweeps/*.py``, and the
  ``NAME.json`` / ``NAME.md`` / plots of ``dhel-sweep --aggregate-only`` on an empty runs
  directory (every run missing);
* ``dhel_jax.sweep.report.write_results`` of every committed ``results/*.json`` (the Markdown
  report and the plots).

Both sides run on one CPU device with the same XLA flags, so every number must be equal. Fields
that legitimately differ between any two runs are removed before comparing, and only these:

* ``metrics.jsonl``: ``images_per_sec`` (wall-clock);
* ``eval*.json``: ``timings`` and ``created`` (wall-clock), ``workdir`` (a temporary path);
* the summary: the workdir path and the ``(N s)`` elapsed time of its last line;
* ``eval_fast/plots/training_curves.png``: not compared, it draws the ``images_per_sec``
  curve (the other two plots are compared byte for byte).

Exit status 0 when everything is identical, 1 with a list of differences otherwise.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXCLUDED_METRICS_FIELDS = ("images_per_sec",)
EXCLUDED_EVAL_FIELDS = ("timings", "created", "workdir")
EXCLUDED_FILES = ("eval_fast/plots/training_curves.png",)
TRAIN_STEPS = 4


def _produce(out: Path) -> None:
    """Runs in the revision's tree (cwd and sys.path[0]); writes everything to ``out``."""
    import contextlib
    import io

    import tensorflow_datasets as tfds

    import dhel_jax
    from dhel_jax import evaluate, train
    from dhel_jax.sweep import cli, report
    from tests.train_worker import COMPILER_OPTIONS, MOCK_EXAMPLES, tiny_config

    if Path(dhel_jax.__file__).resolve().parents[1] != Path.cwd().resolve():
        raise SystemExit(f"imported {dhel_jax.__file__}, not the tree in {Path.cwd()}")
    config = tiny_config()
    config.num_train_steps = TRAIN_STEPS
    config.checkpoint_every_steps = 2
    config.eval.knn_k = 10  # 64 mocked train records: k = 200 is impossible.
    workdir = Path(tempfile.mkdtemp(prefix="same_behaviour_run_"))
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        train.train_and_evaluate(config, str(workdir), compiler_options=COMPILER_OPTIONS)
        fast = evaluate.evaluate(
            workdir, out_dir=out / "eval_fast", with_baselines=True, geometry_examples=40
        )
        evaluate.evaluate(
            workdir,
            protocol="paper",
            out_dir=out / "eval_paper",
            plots=False,
            paper_probe={"epochs": 2, "batch_size": 16},
        )
    (out / "eval_fast" / "summary.txt").write_text(evaluate.summary(fast) + "\n")
    (out / "train").mkdir()
    for name in ("metrics.jsonl", "config.json"):
        shutil.copy(workdir / name, out / "train" / name)
    shutil.rmtree(workdir)

    for sweep in sorted(Path("configs/sweeps").glob("*.py")):
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            status = cli.main(["--sweep", str(sweep), "--runs_dir", "runs/sweeps", "--dry-run"])
        (out / "dry_run").mkdir(exist_ok=True)
        (out / "dry_run" / f"{sweep.stem}.txt").write_text(f"exit {status}\n{text.getvalue()}")
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            status = cli.main(
                [
                    "--sweep",
                    str(sweep),
                    "--runs_dir",
                    "runs/same_behaviour_empty",
                    "--results_dir",
                    str(out / "aggregate_only"),
                    "--aggregate-only",
                ]
            )
        (out / "aggregate_only" / f"{sweep.stem}.txt").write_text(f"exit {status}\n")
    for results in sorted(Path("results").glob("*.json")):
        report.write_results(json.loads(results.read_text()), out / "reports")


def _normalised(path: Path, rel: str) -> bytes:
    """The file's bytes with the fields listed in the module docstring removed."""
    if rel.endswith("metrics.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for record in records:
            for key in EXCLUDED_METRICS_FIELDS:
                record.pop(key, None)
        return "\n".join(json.dumps(r, sort_keys=True) for r in records).encode()
    if rel.endswith("eval.json"):
        results = json.loads(path.read_text())
        for key in EXCLUDED_EVAL_FIELDS:
            results.pop(key, None)
        return json.dumps(results, indent=1, sort_keys=True).encode()
    if rel.endswith("summary.txt"):
        text = re.sub(r"^dhel-eval \S+", "dhel-eval <workdir>", path.read_text())
        return re.sub(r"\(\d+ s\)$", "(N s)", text.rstrip("\n"), flags=re.M).encode()
    return path.read_bytes()


def _files(root: Path) -> dict[str, bytes]:
    return {
        os.fspath(p.relative_to(root)): _normalised(p, os.fspath(p.relative_to(root)))
        for p in sorted(root.rglob("*"))
        if p.is_file() and os.fspath(p.relative_to(root)) not in EXCLUDED_FILES
    }


def _run_side(rev: str | None, out: Path) -> None:
    """Produces the outputs of ``rev`` (None: this working tree) in ``out``."""
    with tempfile.TemporaryDirectory(prefix="same_behaviour_tree_") as tmp:
        tree = REPO
        if rev is not None:
            tree = Path(tmp) / "tree"
            subprocess.run(
                ["git", "-C", os.fspath(REPO), "worktree", "add", "--detach", os.fspath(tree), rev],
                check=True,
                capture_output=True,
            )
        try:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.fspath(tree)
            env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
            env["JAX_PLATFORMS"] = "cpu"
            env["MPLBACKEND"] = "Agg"
            out.mkdir(parents=True)
            subprocess.run(
                [sys.executable, os.fspath(Path(__file__).resolve()), "--produce", os.fspath(out)],
                cwd=tree,
                env=env,
                check=True,
            )
        finally:
            if rev is not None:
                subprocess.run(
                    ["git", "-C", os.fspath(REPO), "worktree", "remove", "--force", tree],
                    check=False,
                )


def _compare(base: Path, head: Path) -> list[str]:
    a, b = _files(base), _files(head)
    problems = [f"only in base: {k}" for k in sorted(a.keys() - b.keys())]
    problems += [f"only in head: {k}" for k in sorted(b.keys() - a.keys())]
    for key in sorted(a.keys() & b.keys()):
        if a[key] == b[key]:
            continue
        try:
            diff = difflib.unified_diff(
                a[key].decode().splitlines(), b[key].decode().splitlines(), lineterm="", n=1
            )
            problems.append(f"differs: {key}\n" + "\n".join(list(diff)[:40]))
        except UnicodeDecodeError:
            digests = [hashlib.sha256(x).hexdigest()[:12] for x in (a[key], b[key])]
            problems.append(f"differs: {key} (sha256 {digests[0]} vs {digests[1]})")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="the revision to compare against (e.g. main)")
    parser.add_argument("--head", default=None, help="default: this working tree")
    parser.add_argument("--keep", default=None, help="keep both sides' outputs in this folder")
    parser.add_argument("--produce", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.produce:
        _produce(Path(args.produce))
        return 0
    if not args.base:
        parser.error("--base is required")
    root = Path(args.keep or tempfile.mkdtemp(prefix="same_behaviour_"))
    _run_side(args.base, root / "base")
    _run_side(args.head, root / "head")
    files = _files(root / "base")
    problems = _compare(root / "base", root / "head")
    for problem in problems:
        print(problem)
    print(
        f"{len(files)} files compared ({', '.join(sorted({k.split('/')[0] for k in files}))}): "
        + ("identical" if not problems else f"{len(problems)} differences")
        + f"; excluded fields: metrics.jsonl {list(EXCLUDED_METRICS_FIELDS)}, "
        f"eval.json {list(EXCLUDED_EVAL_FIELDS)}, summary workdir and elapsed seconds; "
        f"files not compared: {list(EXCLUDED_FILES)}"
    )
    if args.keep is None:
        shutil.rmtree(root)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
