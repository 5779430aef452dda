"""Subprocess side of tests/test_train.py: each mode runs in a fresh Python process.

    python train_worker.py kill WORKDIR STEP
        Trains :func:`tiny_config` on mocked data in WORKDIR and SIGKILLs itself as soon as the
        checkpoint of STEP is complete on disk (a preempted VM that got no notice).
    python train_worker.py kill-in-save WORKDIR STEP
        The same, but SIGKILLed as soon as the save of STEP is issued, while Orbax writes it in
        the background.
    python train_worker.py kill-in-restore WORKDIR
        Resumes :func:`tiny_config` in WORKDIR and SIGKILLs itself 5 ms into the restore.
    python train_worker.py cli ARG...
        Runs ``dhel-train ARG...`` (``dhel_jax.main.train_main``) on mocked data.
    python train_worker.py step OUT_NPZ [check-kinks]
        Two train steps of :func:`step_config` on one CPU device and the batch of
        :func:`fixed_batch`, under the XLA_FLAGS it is given; saves the loss and the state.
        With ``check-kinks``, asserts before each step that it stays clear of the network's
        ReLU kinks (:func:`assert_step_clear_of_kinks`).
    python train_worker.py multiprocess PROCESS_ID PORT OUT_DIR
        One of 2 processes x 2 CPU devices (jax.distributed on localhost): two train steps of
        :func:`tiny_config` on the global batch of :func:`fixed_batch`, each process feeding
        its half; process 0 saves the resulting state to OUT_DIR/state.npz.

The kill and cli modes inherit XLA_FLAGS (8 CPU devices under the test suite).
"""

from __future__ import annotations

import os
import sys
import time

MOCK_EXAMPLES = 64
# Compiles the tiny model's step twice as fast; the numbers are the same in every mode.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def tiny_config():
    """A 2-epoch run of ResNet-tiny on 16x16 views of mocked Fashion-MNIST (8 steps)."""
    from dhel_jax import train_config

    config = train_config.default_config()
    config.dataset = "fashion_mnist"
    config.model.name = "resnet_tiny"
    config.model.head_hidden_dim = 16
    config.model.head_out_dim = 8
    config.augment.out_size = 16
    config.batch_size = 16
    config.num_epochs = 2
    config.optimizer.warmup_epochs = 0.0
    config.log_every_steps = 1
    config.checkpoint_every_steps = 4
    return config


def step_config():
    """The config of the ``step`` mode: :func:`tiny_config` with 16 filters, at seed 12. Its
    two steps' ReLU inputs stay clear of zero (tests/kinks.py: at least 1.7 times the distance
    required); at seeds 0-11 and 13 one of them comes closer (at seed 0 within 9.3e-7 under
    build_training's compiler options, 5e-7 in this worker's own run)."""
    config = tiny_config()
    config.model.num_filters = 16
    config.seed = 12
    return config


def build_training(devices, config=None):
    """``train.make_training`` of ``config`` (default :func:`tiny_config`) over ``devices``,
    for the 8 steps of a 64-example run."""
    from dhel_jax import parallel, train

    counts = train.StepCounts(num_examples=64, steps_per_epoch=4, total_steps=8, warmup_steps=0)
    return train.make_training(
        config or tiny_config(),
        parallel.data_mesh(devices),
        counts,
        compiler_options=COMPILER_OPTIONS,
    )


def fixed_batch(batch_size: int = 16):
    """A deterministic uint8 batch shaped like Fashion-MNIST, with labels."""
    import numpy as np

    rng = np.random.default_rng(7)
    return {
        "image": rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8),
        "label": rng.integers(0, 10, batch_size).astype(np.int32),
    }


def step_views(state, host_batch, config):
    """The (2N, H, W, C) views that the train step of ``state`` draws from ``host_batch``:
    ``augment.two_views`` keyed by ``fold_in(state.rng, state.step)``, pairs interleaved."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dhel_jax import augment, train

    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    x1, x2 = augment.two_views(
        jnp.asarray(host_batch["image"]),
        key,
        sizes=host_batch.get("size"),
        **train.augment_kwargs(config),
    )
    return np.stack([x1, x2], axis=1).reshape((-1, *x1.shape[1:]))


def assert_step_clear_of_kinks(setup, state, host_batch, config=None):
    """Asserts that the network of ``state`` meets the views of its next train step (BatchNorm
    over the whole batch) away from its ReLU kinks (tests/kinks.py): the condition for two
    float32 computations of that step to agree within round-off."""
    import jax

    from tests.kinks import assert_clear_of_kinks, model_apply_pair

    params, batch_stats = jax.device_get((state.params, state.batch_stats))
    assert_clear_of_kinks(
        *model_apply_pair(setup.model, train=True, mutable=["batch_stats"]),
        {"params": params, "batch_stats": batch_stats},
        step_views(state, host_batch, config or tiny_config()),
    )


def _kill(workdir: str, step: int) -> None:
    import signal

    import tensorflow_datasets as tfds

    from dhel_jax import checkpointing, train

    def kill_after_checkpoint(done: int, metrics) -> None:
        del metrics
        if done == step:
            while step not in checkpointing.available_steps(workdir):
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)

    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        train.train_and_evaluate(
            tiny_config(), workdir, hooks=[kill_after_checkpoint], compiler_options=COMPILER_OPTIONS
        )
    raise SystemExit("not killed")


def _kill_in(workdir: str, where: str, step: int = 0) -> None:
    import signal
    import threading

    import tensorflow_datasets as tfds

    from dhel_jax import checkpointing, train

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    save, restore = checkpointing.save, checkpointing.restore

    def save_then_die(manager, at, *args, **kwargs):
        save(manager, at, *args, **kwargs)
        if at == step:
            die()

    def die_while_restoring(*args, **kwargs):
        threading.Timer(0.005, die).start()
        restore(*args, **kwargs)
        time.sleep(60)  # The timer kills the process: the restore never returns.

    if where == "save":
        checkpointing.save = save_then_die
    else:
        checkpointing.restore = die_while_restoring
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        train.train_and_evaluate(tiny_config(), workdir, compiler_options=COMPILER_OPTIONS)
    raise SystemExit("not killed")


def _cli(args: list[str]) -> None:
    import tensorflow_datasets as tfds

    from dhel_jax import main

    sys.argv = ["dhel-train", *args]
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        main.train_main()


def _save_state(path: str, state, loss) -> None:
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, state))[0]
    np.savez(
        path, loss=np.asarray(loss), **{jax.tree_util.keystr(key): leaf for key, leaf in leaves}
    )


def _step(out: str, check_kinks: bool = False) -> None:
    import jax

    from dhel_jax import train

    config = step_config()
    counts = train.StepCounts(num_examples=64, steps_per_epoch=4, total_steps=8, warmup_steps=0)
    from dhel_jax import parallel

    setup = train.make_training(config, parallel.data_mesh(jax.devices()[:1]), counts)
    state = setup.init()
    for _ in range(2):
        if check_kinks:
            assert_step_clear_of_kinks(setup, state, fixed_batch(), config)
        state, metrics = setup.train_step(
            state, train.global_batch(fixed_batch(), setup.batch_sharding)
        )
    _save_state(out, state, metrics["loss"])


def _multiprocess(process_id: int, port: int, out_dir: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    import numpy as np
    from jax.experimental import multihost_utils

    from dhel_jax import train

    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    setup = build_training(jax.devices())
    batch = fixed_batch()
    half = len(batch["label"]) // 2
    local = {k: v[process_id * half : (process_id + 1) * half] for k, v in batch.items()}
    state = setup.init()
    for _ in range(2):
        state, metrics = setup.train_step(state, train.global_batch(local, setup.batch_sharding))
    host = jax.tree.map(np.asarray, multihost_utils.process_allgather(state, tiled=True))
    if process_id == 0:
        _save_state(os.path.join(out_dir, "state.npz"), host, metrics["loss"])
    multihost_utils.sync_global_devices("done")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "kill":
        _kill(rest[0], int(rest[1]))
    elif mode == "kill-in-save":
        _kill_in(rest[0], "save", int(rest[1]))
    elif mode == "kill-in-restore":
        _kill_in(rest[0], "restore")
    elif mode == "cli":
        _cli(rest)
    elif mode == "step":
        _step(rest[0], check_kinks=rest[1:] == ["check-kinks"])
    elif mode == "multiprocess":
        _multiprocess(int(rest[0]), int(rest[1]), rest[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
