"""Orbax checkpoints of a pretraining run, and a read-only restore for evaluation.

A run's checkpoints live in ``<workdir>/checkpoints/<step>/`` (an Orbax ``CheckpointManager``),
each holding three items:

* ``state``: the whole :class:`dhel_jax.step.TrainState` (``StandardSave``): parameters,
  BatchNorm statistics, optimiser states, step and PRNG key;
* ``data``: the grain iterator state of every process (``grain.checkpoint.CheckpointSave``:
  one ``process_<p>-of-<P>.json`` each), so a resumed run reads exactly the next batch;
* ``config``: the run's configuration (``JsonSave``).

``<workdir>/config.json`` repeats the configuration for humans.

Training opens the manager with :func:`open_manager` and resumes with :func:`restore`;
evaluation programs call :func:`restore_for_eval`, which never writes, creates or deletes
anything. Every failure to read a checkpoint raises :class:`CheckpointError` naming the path
and the steps available; nothing is ever overwritten to recover.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dhel_jax._config_tree import as_json, differing_keys, flatten
from dhel_jax._io import write_atomic

CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILENAME = "config.json"
STATE, DATA, CONFIG = "state", "data", "config"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible with the requested structure."""


class WorkdirConflictError(ValueError):
    """``--workdir`` holds another run: its ``config.json`` differs from the config given."""


# Config fields a resumed run may change: where data is read from and how the run logs,
# checkpoints and is evaluated, none of which changes the parameters it trains.
RESUMABLE_FIELDS = frozenset(
    {
        "data_dir",
        "data_workers",
        "log_every_steps",
        "checkpoint_every_steps",
        "max_checkpoints_to_keep",
        "eval",
    }
)


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    """``<workdir>/checkpoints``, absolute (Orbax rejects relative paths, and ``--workdir``
    is usually given relative to the current directory); URLs such as ``gs://`` are kept."""
    name = os.fspath(workdir)
    if "://" not in name:
        name = os.path.abspath(name)
    return epath.Path(name) / CHECKPOINT_SUBDIR


def available_steps(workdir: str | os.PathLike) -> list[int]:
    """The finalised checkpoint steps of ``workdir``, ascending (read-only; [] if none).

    Orbax writes a step into a temporary directory and renames it to ``<step>`` when complete,
    so only integer-named directories count; interrupted saves are ignored.
    """
    return _finalised_steps(checkpoint_dir(workdir))


def _finalised_steps(directory: epath.Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _save_failed(manager: ocp.CheckpointManager, error: OSError) -> CheckpointError:
    """The error for a checkpoint write that the file system refused (full, read-only, ...)."""
    directory = epath.Path(manager.directory)
    reason = error.strerror or str(error)
    if error.errno in _NO_SPACE:
        reason += " (the disk is full, or a quota or file-size limit was reached)"
    steps = _finalised_steps(directory)
    kept = (
        f"the checkpoints saved before, steps {steps}, are intact"
        if steps
        else ("no checkpoint had been saved yet")
    )
    return CheckpointError(
        f"cannot write a checkpoint in {directory}: {reason}. Training stopped; {kept}, and "
        "the unfinished save is ignored on resume. Free space (or make the directory "
        "writable), then rerun the same command to resume."
    )


def _file_system_error(error: Exception) -> OSError | None:
    """The file-system error behind a failed write: Python's own ``OSError`` (metadata files),
    or TensorStore's (array files), a ``ValueError`` such as ``OUT_OF_RANGE: Error writing local
    file ...: File too large [os_error_code='27']``; ``None`` for anything else."""
    if isinstance(error, OSError):
        return error
    match = re.search(r"os_error_code='?(\d+)", str(error))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code))


@contextlib.contextmanager
def _refused_writes_as_checkpoint_errors(manager: ocp.CheckpointManager) -> Iterator[None]:
    """Turns a write the file system refused (see :func:`_file_system_error`) into
    :func:`_save_failed`'s :class:`CheckpointError`; anything else passes unchanged."""
    try:
        yield
    except Exception as e:
        refused = _file_system_error(e)
        if refused is None:
            raise
        raise _save_failed(manager, refused) from e


def wait_until_saved(manager: ocp.CheckpointManager) -> None:
    """``manager.wait_until_finished()``; a background write refused by the file system
    raises :class:`CheckpointError` (see :func:`save`)."""
    with _refused_writes_as_checkpoint_errors(manager):
        manager.wait_until_finished()


def _describe(workdir: str | os.PathLike) -> str:
    steps = available_steps(workdir)
    where = checkpoint_dir(workdir)
    return f"available steps in {where}: {steps}" if steps else f"no checkpoints in {where}"


def open_manager(
    workdir: str | os.PathLike, *, max_to_keep: int, async_save: bool = True
) -> ocp.CheckpointManager:
    """The training run's ``CheckpointManager`` (creates ``<workdir>/checkpoints``).

    Keeps the ``max_to_keep`` most recent steps. Saves are asynchronous: arrays are copied to
    host memory before :func:`save` returns and written in the background; call
    ``manager.wait_until_finished()`` before exiting.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=options,
        item_names=(STATE, DATA, CONFIG),
        item_handlers={
            STATE: ocp.StandardCheckpointHandler(),
            DATA: grain.checkpoint.CheckpointHandler(),
            CONFIG: ocp.JsonCheckpointHandler(),
        },
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iterator: grain.DatasetIterator,
    config: ml_collections.ConfigDict,
) -> None:
    """Saves the train state, the data iterator position and the config at ``step``.

    The write finishes in the background; a failure of it (or of the previous save) surfaces
    here or in :func:`wait_until_saved`.

    Raises:
      CheckpointError: the file system refused a write (a full disk, a read-only or
        unwritable directory); the message names the directory and the intact steps.
    """
    # The previous step's background write may fail here too.
    with _refused_writes_as_checkpoint_errors(manager):
        manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(state),
                    DATA: grain.checkpoint.CheckpointSave(data_iterator),
                    CONFIG: ocp.args.JsonSave(config.to_dict()),
                }
            ),
            force=True,
        )


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: Any,
    data_iterator: grain.DatasetIterator,
) -> Any:
    """Restores the train state at ``step`` into ``abstract_state``'s structure and shardings,
    and moves ``data_iterator`` to the saved position. Returns the state.

    Raises:
      CheckpointError: the checkpoint is corrupt, or its arrays do not match
        ``abstract_state`` (e.g. the config changed the model); names the path and the
        available steps.
    """
    workdir = epath.Path(manager.directory).parent
    path = epath.Path(manager.directory) / str(step)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardRestore(abstract_state),
                    DATA: grain.checkpoint.CheckpointRestore(data_iterator),
                }
            ),
        )
    except Exception as e:
        raise CheckpointError(
            f"cannot resume from checkpoint {path}: {type(e).__name__}: {e}\n"
            f"It is corrupt or was written by an incompatible config (model, optimiser, loss "
            f"or number of processes); {_describe(workdir)}. Nothing was overwritten. Resume "
            "with the original config, start a new --workdir, or move this step away to resume "
            "from an earlier one."
        ) from e
    return restored[STATE]


def write_config_json(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Writes ``<workdir>/config.json`` (indented, for humans), atomically: a failed write
    (a full disk) leaves the previous file as it was."""
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    write_atomic(epath.Path(workdir) / CONFIG_FILENAME, text.encode())


def check_workdir_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Refuses to train ``config`` in a ``workdir`` that another run's config owns.

    ``<workdir>/config.json`` is written when a run starts; rerunning with the same config
    resumes that run. Only the :data:`RESUMABLE_FIELDS` may differ. Reads, never writes.

    Raises:
      WorkdirConflictError: the stored config differs elsewhere (every differing field is
        named, with the stored and the given value), or cannot be read as JSON.
    """
    path = epath.Path(workdir) / CONFIG_FILENAME
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WorkdirConflictError(
            f"--workdir {workdir} has a {CONFIG_FILENAME} that cannot be read ({e}); it may "
            "belong to another program's run. Nothing was changed: use another --workdir."
        ) from e
    given = as_json(config.to_dict())
    differing = differing_keys(stored, given, ignore=RESUMABLE_FIELDS)
    if differing:
        old, new = flatten(stored), flatten(given)
        shown = "; ".join(
            f"{key}: {old.get(key, '(absent)')!r} there, {new.get(key, '(absent)')!r} now"
            for key in differing[:5]
        )
        more = f" and {len(differing) - 5} more" if len(differing) > 5 else ""
        raise WorkdirConflictError(
            f"--workdir {workdir} holds another run, whose config differs in {shown}{more}. "
            "Nothing was changed: use another --workdir for this config, or rerun with that "
            f"run's config (its {CONFIG_FILENAME}) to resume it."
        )


def _to_config(value: Any) -> Any:
    if isinstance(value, Mapping):
        return ml_collections.ConfigDict({k: _to_config(v) for k, v in value.items()})
    if isinstance(value, list):
        # JSON has no tuples; configs only hold tuples of scalars (crop ranges, means).
        return tuple(_to_config(v) for v in value)
    return value


def restore_for_eval(
    workdir: str | os.PathLike, step: int | None = None
) -> tuple[ml_collections.ConfigDict, dict[str, Any], int]:
    """Reads a pretraining checkpoint for evaluation, without modifying anything on disk.

    Args:
      workdir: the ``--workdir`` of a ``dhel-train`` run.
      step: the checkpoint step; ``None`` is the latest.

    Returns:
      ``(config, variables, step)``: the run's config (from the checkpoint), the model
      variables ``{"params": ..., "batch_stats": ...}`` as host NumPy arrays (ready for
      ``model.apply``), and the step restored.

    Raises:
      CheckpointError: no such workdir or step, or a corrupt or incompatible checkpoint; the
        message names the path and the available steps.
    """
    steps = available_steps(workdir)
    if not steps:
        raise CheckpointError(
            f"no checkpoint to evaluate: {_describe(workdir)}. Is {os.fspath(workdir)!r} the "
            "--workdir of a dhel-train run?"
        )
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise CheckpointError(f"no checkpoint at step {step}: {_describe(workdir)}.")
    path = checkpoint_dir(workdir) / str(step)
    try:
        config = _to_config(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path / CONFIG))
        # Only the model variables are read (partial restore), onto this host's first device
        # whatever the device layout of the run that saved them.
        metadata = ocp.PyTreeCheckpointHandler().metadata(path / STATE).tree
        device = jax.local_devices()[0]
        target = {
            key: jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(
                    m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(device)
                ),
                metadata[key],
            )
            for key in ("params", "batch_stats")
        }
        restored = ocp.PyTreeCheckpointer().restore(
            path / STATE,
            args=ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            ),
        )
        variables = jax.tree.map(np.asarray, {k: restored[k] for k in ("params", "batch_stats")})
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {e}\n"
            f"It is corrupt or not a dhel-train checkpoint; {_describe(workdir)}."
        ) from e
    return config, variables, step
