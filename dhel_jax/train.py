"""Contrastive pretraining: a config's step over a mesh, and the loop.

The shape follows flax ``examples/imagenet``: :func:`make_training` (the model, optimisers, loss
and jitted step of a config over a mesh) and :func:`train_and_evaluate`, which the
``dhel-train`` entry point (``dhel_jax.main``), tests and notebooks call. The config itself,
:func:`~dhel_jax.train_config.default_config` and
:func:`~dhel_jax.train_config.validate_config`, lives in ``dhel_jax.train_config``.

The step itself, :class:`~dhel_jax.step.TrainState`, :func:`~dhel_jax.step.create_train_state`
and the pure :func:`~dhel_jax.step.train_step`, lives in ``dhel_jax.step``, which needs no
config. The loop adds images/second to the step's metrics (two views count as two images).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding

from dhel_jax import (
    checkpointing,
    data,
    models,
    optimizers,
    parallel,
)
from dhel_jax._signals import SignalHandler
from dhel_jax.builders import (
    METRICS_FILENAME,
    augment_kwargs,
    build_model,
    view_size,
)
from dhel_jax.step import GEOMETRY_METRICS, TrainState, create_train_state, make_train_step
from dhel_jax.train_config import loss_from_config, validate_config

Array = jax.Array
Hook = Callable[[int, Mapping[str, float]], None]


# ----------------------------------------------------------------------------------------------
# A config's step over a mesh.


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Assembles each process's part of the batch into global arrays sharded by ``sharding``
    (``jax.make_array_from_process_local_data``; a plain transfer with one process)."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


@dataclasses.dataclass(frozen=True)
class StepCounts:
    """Step counts of a run: ``total_steps`` steps of ``batch_size`` over ``num_examples``."""

    num_examples: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def step_counts(config: ml_collections.ConfigDict, num_examples: int) -> StepCounts:
    """Steps per epoch (every process reads ``num_examples // P`` records in batches of
    ``B / P``), total steps and warm-up steps of ``config``."""
    processes = jax.process_count()
    local_batch = config.batch_size // processes
    steps_per_epoch = (num_examples // processes) // local_batch
    if steps_per_epoch < 1:
        raise ValueError(
            f"config.batch_size = {config.batch_size} is larger than {config.dataset}'s "
            f"{num_examples} pretraining examples."
        )
    total = config.num_train_steps
    if total is None:
        total = max(1, int(config.num_epochs * (num_examples // processes)) // local_batch)
    warmup = int(round(config.optimizer.warmup_epochs * steps_per_epoch))
    if warmup >= total:
        raise ValueError(
            f"config.optimizer.warmup_epochs = {config.optimizer.warmup_epochs} is {warmup} "
            f"steps, not fewer than the run's {total} steps; lower it."
        )
    return StepCounts(num_examples, steps_per_epoch, total, warmup)


@dataclasses.dataclass(frozen=True)
class Training:
    """What :func:`make_training` builds from a config: the pieces of a run over a mesh.

    Attributes:
      model: the encoder + projection head.
      learning_rate_fn: the model optimiser's schedule (step -> learning rate).
      train_step: :func:`make_train_step`'s jitted step.
      init: a jitted ``() -> TrainState`` (seeded by ``config.seed``), replicated on the mesh.
      abstract_state: ``() -> TrainState`` of ``jax.ShapeDtypeStruct`` with the replicated
        sharding (the restore target of a checkpoint).
      batch_sharding: the batch's ``NamedSharding``.
    """

    model: models.ContrastiveModel
    learning_rate_fn: optax.Schedule
    train_step: Callable[[TrainState, Mapping[str, Array]], tuple[TrainState, dict[str, Array]]]
    init: Callable[[], TrainState]
    abstract_state: Callable[[], TrainState]
    batch_sharding: NamedSharding


def _init_options(mesh: Mesh) -> dict[str, Any] | None:
    # Initialisation runs once; on CPU, LLVM's optimisation of its unrolled random-number code
    # costs ~10 s of compilation (for ResNet-tiny) and saves nothing.
    if mesh.devices.flat[0].platform == "cpu":
        return {"xla_backend_optimization_level": 0}
    return None


# config.optimizer's fields that optimizers.make_optimizer takes under the same names.
_OPTIMIZER_KEYWORDS = (
    "weight_decay",
    "momentum",
    "trust_coefficient",
    "b1",
    "b2",
    "eps",
    "nesterov",
)


def make_training(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    counts: StepCounts,
    *,
    compiler_options: Mapping[str, Any] | None = None,
) -> Training:
    """Builds the model, optimisers, loss, augmentation and jitted functions of ``config``."""
    info = data.get_dataset_info(config.dataset)
    model = build_model(config)
    o = config.optimizer
    learning_rate_fn = optimizers.lr_schedule(
        base_lr=o.base_lr,
        batch_size=config.batch_size,
        total_steps=counts.total_steps,
        warmup_steps=counts.warmup_steps,
        lr_scaling=o.lr_scaling,
        end_value=o.end_lr,
    )
    tx = optimizers.make_optimizer(
        o.name, learning_rate=learning_rate_fn, **{k: o[k] for k in _OPTIMIZER_KEYWORDS}
    )
    probe_tx = None
    if config.online_probe.enabled:
        probe_tx = optimizers.make_optimizer(
            "adamw",
            learning_rate=config.online_probe.learning_rate,
            weight_decay=config.online_probe.weight_decay,
        )
    size = view_size(config)

    def init() -> TrainState:
        return create_train_state(
            jax.random.key(config.seed),
            model=model,
            tx=tx,
            probe_tx=probe_tx,
            image_shape=(size, size, info.image_shape[-1]),
            num_classes=info.num_classes,
        )

    replicated = parallel.replicated(mesh)

    def abstract_state() -> TrainState:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
            jax.eval_shape(init),
        )

    step = make_train_step(
        mesh,
        model=model,
        tx=tx,
        loss_fn=loss_from_config(config.loss),
        learning_rate_fn=learning_rate_fn,
        view_kwargs=augment_kwargs(config),
        probe_tx=probe_tx,
        compiler_options=compiler_options,
        embedding_chunks=config.embedding_chunks,
        geometry_every_steps=config.geometry_every_steps,
    )
    return Training(
        model=model,
        learning_rate_fn=learning_rate_fn,
        train_step=step,
        init=jax.jit(init, out_shardings=replicated, compiler_options=_init_options(mesh)),
        abstract_state=abstract_state,
        batch_sharding=parallel.batch_sharding(mesh),
    )


# ----------------------------------------------------------------------------------------------
# The training loop.


class NonFiniteLossError(FloatingPointError):
    """The loss, the gradients or the updated parameters of a step are not finite."""


class _StopSignal(SignalHandler):
    """Turns SIGTERM / SIGINT into a request to checkpoint and stop after the current step.

    A second signal restores the default behaviour (a second Ctrl-C interrupts at once).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, signals: Sequence[int] = SIGNALS) -> None:
        super().__init__(signals)
        self.received: int | None = None

    def handle(self, signum: int) -> None:
        self.received = signum
        self.restore()
        logging.warning(
            "received %s: saving a checkpoint after this step", signal.strsignal(signum)
        )


class _MetricsLog:
    """Averages step metrics over each logging interval and writes them (process 0 only) to
    TensorBoard, ``metrics.jsonl`` and the progress bar."""

    def __init__(self, workdir: epath.Path, start_step: int, total_steps: int, enabled: bool):
        self.enabled = enabled
        self._sums: dict[str, float] = collections.defaultdict(float)
        # Per key: the geometry metrics are only present on some steps.
        self._counts: dict[str, int] = collections.defaultdict(int)
        self._count = 0
        self._timed_steps = 0
        self._t0: float | None = None
        self.bar: Any = None
        self.writer: Any = None
        if not enabled:
            return
        import tensorboardX
        import tqdm

        self._path = workdir / METRICS_FILENAME
        self._lines: list[str] = []
        if self._path.exists():
            # Resuming: drop lines logged after the restored checkpoint (they will be redone).
            self._lines = [
                line
                for line in self._path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start_step
            ]
        self._rewrite()
        self.writer = tensorboardX.SummaryWriter(
            str(workdir), purge_step=start_step + 1 if start_step else None
        )
        self.bar = tqdm.tqdm(
            total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
        )

    def add(self, metrics: Mapping[str, float], images_per_step: int) -> None:
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = now  # The first step includes compilation: time from its end.
        else:
            self._timed_steps += 1
        for k, v in metrics.items():
            self._sums[k] += v
            self._counts[k] += 1
        self._count += 1
        self._images_per_step = images_per_step
        if self.bar is not None:
            self.bar.update(1)

    def write(self, step: int, epoch: float) -> dict[str, float]:
        if not self._count:
            return {}
        record: dict[str, float] = {"step": step, "epoch": round(epoch, 4)}
        record.update({k: v / self._counts[k] for k, v in self._sums.items()})
        if self._timed_steps and self._t0 is not None:
            elapsed = time.perf_counter() - self._t0
            record["images_per_sec"] = self._timed_steps * self._images_per_step / elapsed
            self._t0, self._timed_steps = time.perf_counter(), 0
        self._sums.clear()
        self._counts.clear()
        self._count = 0
        if self.enabled:
            self._lines.append(json.dumps(record))
            if "://" in str(self._path):
                self._rewrite()  # Object stores (gs://) cannot append.
            else:
                with self._path.open("a") as f:
                    f.write(self._lines[-1] + "\n")
            for k, v in record.items():
                if k != "step":
                    self.writer.add_scalar(f"train/{k}", v, step)
            postfix = f"loss {record['loss']:.4f}"
            if "images_per_sec" in record:
                postfix += f", {record['images_per_sec']:.0f} img/s"
            if "probe_accuracy" in record:
                postfix += f", probe {record['probe_accuracy']:.3f}"
            self.bar.set_postfix_str(postfix)
        return record

    def _rewrite(self) -> None:
        self._path.write_text("".join(line + "\n" for line in self._lines))

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.bar.close()


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    hooks: Sequence[Hook] = (),
    compiler_options: Mapping[str, Any] | None = None,
) -> TrainState:
    """Pretrains ``config`` in ``workdir``, resuming from its latest checkpoint if any.

    Validates the config before reading data or compiling; trains ``total_steps`` (``num_epochs``
    passes, or ``num_train_steps``); logs every ``log_every_steps`` (the geometry metrics:
    their mean over the interval's ``geometry_every_steps`` steps) to TensorBoard,
    ``<workdir>/metrics.jsonl`` and a progress bar; checkpoints every ``checkpoint_every_steps``
    and at the end. SIGTERM / SIGINT (and, with several processes, JAX's preemption notice)
    checkpoint the current step and return early.

    Args:
      config: a config from ``configs/`` (see :func:`dhel_jax.train_config.default_config`).
      workdir: the run directory (created if needed).
      hooks: called on the host as ``hook(step, metrics)`` after every step (after its
        checkpoint is issued, if it has one); ``metrics`` are that step's host scalars.
      compiler_options: XLA options for the train step (see :func:`make_train_step`).

    Returns:
      The final train state.

    Raises:
      ValueError: a bad config (before anything is read or compiled), or
        ``checkpointing.WorkdirConflictError``: ``workdir`` holds another run's config.
      NonFiniteLossError: a step's loss, gradients or parameters were not finite; no
        checkpoint of that step or later is written.
      checkpointing.CheckpointError: the latest checkpoint cannot be restored.
    """
    validate_config(config)
    checkpointing.check_workdir_config(workdir, config)
    workdir_path = epath.Path(workdir)
    is_chief = jax.process_index() == 0
    if is_chief:
        workdir_path.mkdir(parents=True, exist_ok=True)

    mesh = parallel.data_mesh()
    num_examples = data.num_examples(config.dataset, data_dir=config.data_dir)
    counts = step_counts(config, num_examples)
    setup = make_training(config, mesh, counts, compiler_options=compiler_options)

    loader = data.make_pretrain_loader(
        config.dataset,
        global_batch_size=config.batch_size,
        seed=config.seed,
        data_dir=config.data_dir,
        worker_count=config.data_workers,
    )
    iterator = iter(loader)

    manager = checkpointing.open_manager(workdir, max_to_keep=config.max_checkpoints_to_keep)
    log = None
    try:
        start_step = manager.latest_step() or 0
        if start_step:
            state = checkpointing.restore(manager, start_step, setup.abstract_state(), iterator)
            logging.info("resumed from %s at step %d", manager.directory, start_step)
        else:
            state = setup.init()
        if is_chief:
            checkpointing.write_config_json(workdir, config)

        log = _MetricsLog(workdir_path, start_step, counts.total_steps, enabled=is_chief)
        last_saved = [start_step]

        def write_log(step: int) -> None:
            log.write(step, step * config.batch_size / counts.num_examples)

        def finish(step: int, device_metrics: Mapping[str, Array]) -> dict[str, float]:
            """Host side of a step: fetch its metrics, stop on non-finite values, log."""
            host = _host_metrics(step, device_metrics, config, last_saved[0], manager.directory)
            log.add(host, 2 * config.batch_size)
            if step % config.log_every_steps == 0 or step == counts.total_steps:
                write_log(step)
            return host

        def checkpoint(step: int, state: TrainState) -> None:
            write_log(step)
            checkpointing.save(manager, step, state, iterator, config)
            last_saved[0] = step

        state = _run_steps(
            state,
            setup,
            iterator,
            manager,
            config,
            steps=range(start_step + 1, counts.total_steps + 1),
            finish=finish,
            checkpoint=checkpoint,
            hooks=hooks,
        )
    finally:
        try:
            checkpointing.wait_until_saved(manager)
        finally:
            manager.close()
            if log is not None:
                log.close()
    return state


def _host_metrics(
    step: int,
    device_metrics: Mapping[str, Array],
    config: ml_collections.ConfigDict,
    last_saved: int,
    directory: Any,
) -> dict[str, float]:
    """A step's metrics on the host, without the geometry where it was not measured.

    Raises:
      NonFiniteLossError: the step's loss, gradients or parameters were not finite.
    """
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if config.geometry_every_steps and step % config.geometry_every_steps:
        for k in GEOMETRY_METRICS:  # NaN: not measured at this step.
            host.pop(k, None)
    if not host.pop("finite"):
        where = (
            f"the last good checkpoint is step {last_saved} in {directory}"
            if last_saved
            else "no checkpoint was saved"
        )
        raise NonFiniteLossError(
            f"non-finite training at step {step}: loss = {host['loss']}, gradient "
            f"norm = {host['grad_norm']} (or non-finite parameters after the update). "
            f"Training stopped without saving; {where}. Lower "
            "config.optimizer.base_lr, raise the temperature, or use float32."
        )
    return host


def _run_steps(
    state: TrainState,
    setup: Training,
    iterator: Any,
    manager: Any,
    config: ml_collections.ConfigDict,
    *,
    steps: range,
    finish: Callable[[int, Mapping[str, Array]], dict[str, float]],
    checkpoint: Callable[[int, TrainState], None],
    hooks: Sequence[Hook],
) -> TrainState:
    """Runs ``steps``: each step's metrics are fetched (``finish``) while the next one runs;
    ``checkpoint`` every ``checkpoint_every_steps``, at the last step and when stopped
    (SIGTERM / SIGINT, or with several processes JAX's preemption notice), then return."""

    def run_hooks(step: int, host: Mapping[str, float]) -> None:
        for hook in hooks:
            hook(step, host)

    # With several processes, SIGTERM is JAX's preemption notice (reached_preemption).
    signals = _StopSignal.SIGNALS if jax.process_count() == 1 else (signal.SIGINT,)
    pending: tuple[int, Any] | None = None
    with _StopSignal(signals) as stop:
        for step in steps:
            batch = global_batch(next(iterator), setup.batch_sharding)
            state, metrics = setup.train_step(state, batch)
            # The previous step's metrics are fetched while this step runs.
            if pending is not None:
                run_hooks(pending[0], finish(*pending))
            pending = (step, metrics)
            stopping = stop.received is not None or (
                jax.process_count() > 1 and manager.reached_preemption(step)
            )
            if stopping or step % config.checkpoint_every_steps == 0 or step == steps[-1]:
                host = finish(*pending)
                pending = None
                checkpoint(step, state)
                run_hooks(step, host)
            if stopping:
                logging.warning("stopped at step %d; checkpoint saved", step)
                break
    return state
