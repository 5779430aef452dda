"""Running a sweep: the state of each run on disk, the ``dhel-train`` / ``dhel-eval``
subprocesses one after another, the per-run locks, and the signals forwarded to the running
subprocess (see :mod:`dhel_jax.sweep`)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from dhel_jax._config_tree import as_json, differing_keys
from dhel_jax._io import write_atomic
from dhel_jax._signals import SignalHandler
from dhel_jax.sweep.grid import (
    Run,
    SweepError,
    display_command,
    make_runs,
    run_config,
    select_runs,
)

EVAL_FILENAME = "eval.json"  # dhel_jax.evaluate.EVAL_FILENAME (not imported: it imports JAX).
CONFIG_FILENAME = "config.json"  # dhel_jax.checkpointing.CONFIG_FILENAME.
LOG_FILENAME = "log.txt"
RECORD_FILENAME = "sweep_run.json"
# How sweep_run.json stamps when an attempt started (local time with its UTC offset).
STARTED_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
LOCK_FILENAME = ".sweep.lock"
TOOLS = {"dhel-train": "train_main", "dhel-eval": "eval_main"}
PARENT_ENV = "DHEL_SWEEP_PID"
_NON_FINITE = "NonFiniteLossError"


# ----------------------------------------------------------------------------------------------
# The state of a run on disk.


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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
        expected = as_json(config.to_dict())
        if written != expected:
            diff = differing_keys(written, expected)
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
        "started": time.strftime(STARTED_FORMAT, time.localtime(start)),
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
