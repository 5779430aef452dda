"""The ``dhel-sweep`` command line (see :mod:`dhel_jax.sweep`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dhel_jax._io import refused_write_message
from dhel_jax.sweep.grid import (
    SweepError,
    display_command,
    expand,
    load_sweep,
    make_runs,
    select_runs,
    validate_sweep,
)
from dhel_jax.sweep.report import aggregate, write_results
from dhel_jax.sweep.runner import StepCounter, run_state, run_sweep


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


# Exit statuses, as dhel-train's and dhel-eval's: 2 for a usage or sweep-file error (argparse
# uses 2 too), 1 for a runtime failure (a run that failed or was stopped, a refused write).
EXIT_USAGE = 2
EXIT_FAILURE = 1


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
        paths = write_results(results, args.results_dir)
    except SweepError as e:  # A bad or changed sweep file: a config error.
        print(f"dhel-sweep: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # An unwritable or full --runs_dir / --results_dir.
        where = "--runs_dir / --results_dir"
        message = refused_write_message(e, where, "finished runs are")
        print(f"dhel-sweep: error: {message}", file=sys.stderr)
        return EXIT_FAILURE
    done = results["num_runs"] - len(results["missing"])
    print(f"aggregated {done}/{results['num_runs']} runs: {', '.join(paths.values())}")
    return EXIT_FAILURE if outcome["failed"] or outcome["stopped"] else 0
