"""Tests for dhel_jax.checkpointing: what a run saves, and the read-only restore for evaluation.

A checkpoint is written here directly (a ResNet-tiny TrainState, a grain iterator and a config);
the training loop's own checkpoints are tested in tests/test_train.py.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from dhel_jax import checkpointing, optimizers, train, train_config
from dhel_jax.step import create_train_state
from tests.helpers import hash_tree, truncate_state_arrays


def _config():
    config = train_config.default_config()
    config.dataset = "fashion_mnist"
    config.model.name = "resnet_tiny"
    config.model.head_hidden_dim = 16
    config.model.head_out_dim = 8
    config.augment.out_size = 16
    return config


def _state(config, seed: int):
    """A TrainState of ResNet-tiny (built under jit: eager init is much slower)."""
    options = {"xla_backend_optimization_level": 0}  # Compiles in 1 s rather than 10.
    return jax.jit(functools.partial(_make_state, config, seed), compiler_options=options)()


def _make_state(config, seed: int):
    model = train.build_model(config)
    tx = optimizers.make_optimizer("lars", learning_rate=0.1, weight_decay=1e-6)
    probe_tx = optimizers.make_optimizer("adamw", learning_rate=1e-3, weight_decay=0.0)
    state = create_train_state(
        jax.random.key(seed),
        model=model,
        tx=tx,
        probe_tx=probe_tx,
        image_shape=(16, 16, 1),
        num_classes=10,
    )
    # Distinguishable BatchNorm statistics: the initial ones are all 0 or 1.
    stats = jax.tree.map(lambda x: x + seed + 0.5, state.batch_stats)
    return state.replace(batch_stats=stats, step=state.step + 10 * seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with checkpoints at steps 10 and 20 (max_to_keep=2), and what was saved."""
    workdir = tmp_path_factory.mktemp("run")
    config = _config()
    manager = checkpointing.open_manager(workdir, max_to_keep=2)
    iterator = iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())
    states = {}
    for step in (10, 20):
        next(iterator)
        states[step] = _state(config, seed=step // 10)
        checkpointing.save(manager, step, states[step], iterator, config)
    manager.wait_until_finished()
    manager.close()
    checkpointing.write_config_json(workdir, config)
    return workdir, config, states


def _leaves(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_checkpoint_holds_state_data_position_and_config(saved):
    workdir, config, _ = saved
    step_dir = workdir / "checkpoints" / "20"
    assert {p.name for p in step_dir.iterdir()} >= {"state", "data", "config"}
    data_state = json.loads((step_dir / "data" / "process_0-of-1.json").read_text())
    assert data_state["next_index"] == 2
    assert json.loads((workdir / "config.json").read_text()) == json.loads(
        json.dumps(config.to_dict())
    )


@pytest.mark.parametrize("step", [None, 10])
def test_restore_for_eval_returns_the_saved_variables_and_config(saved, step):
    workdir, config, states = saved
    got_config, variables, got_step = checkpointing.restore_for_eval(workdir, step)
    want_step = step or 20
    assert got_step == want_step
    assert got_config.to_dict() == config.to_dict()
    assert got_config.augment.crop_scale == (0.08, 1.0)
    assert set(variables) == {"params", "batch_stats"}
    want = _leaves(
        {"params": states[want_step].params, "batch_stats": states[want_step].batch_stats}
    )
    got = _leaves(variables)
    assert got.keys() == want.keys()
    for key in want:
        assert isinstance(got[key], np.ndarray)
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # The restored variables drive the model.
    model = train.build_model(got_config)
    out = model.apply(variables, np.zeros((2, 16, 16, 1), np.float32), train=False)
    assert out["features"].shape == (2, 8)


def test_restore_for_eval_never_modifies_the_workdir(saved, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(saved[0], workdir)
    before = hash_tree(workdir)
    checkpointing.restore_for_eval(workdir)
    checkpointing.restore_for_eval(workdir, 10)
    assert hash_tree(workdir) == before

    # Truncate every array-data file of step 20: a clear error, and still nothing written.
    truncate_state_arrays(workdir, 20, divisor=3)
    before = hash_tree(workdir)
    with pytest.raises(
        checkpointing.CheckpointError,
        match=r"(?s)cannot read checkpoint .*checkpoints/20: .*\[10, 20\]",
    ):
        checkpointing.restore_for_eval(workdir)
    assert hash_tree(workdir) == before
    # The earlier step is untouched and still restorable.
    assert checkpointing.restore_for_eval(workdir, 10)[2] == 10
    assert hash_tree(workdir) == before


def test_missing_step_or_workdir_names_the_available_steps(saved, tmp_path):
    workdir = saved[0]
    with pytest.raises(
        checkpointing.CheckpointError, match=r"no checkpoint at step 15: .*\[10, 20\]"
    ):
        checkpointing.restore_for_eval(workdir, 15)
    missing = tmp_path / "nowhere"
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoints in .*nowhere"):
        checkpointing.restore_for_eval(missing)
    assert not missing.exists()


def test_available_steps_ignores_unfinished_saves(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / "5").mkdir(parents=True)
    (ckpt / "12").mkdir()
    (ckpt / "15.orbax-checkpoint-tmp-1234").mkdir()
    (ckpt / "notes.txt").write_text("x")
    assert checkpointing.available_steps(tmp_path) == [5, 12]
    assert checkpointing.available_steps(tmp_path / "empty") == []


def _garble(path: Path) -> None:
    path.write_text("{not json")


# Every kind of file in a checkpoint step, corrupted; whether resuming training and evaluating
# can still use the step: False means a CheckpointError naming the step and the available steps.
CORRUPTIONS = {
    "state array chunks (truncated)": (
        lambda d: truncate_state_arrays(d.parents[1], 20, 2),
        False,
        False,
    ),
    "state _METADATA": (lambda d: _garble(d / "state" / "_METADATA"), False, False),
    "state OCDBT manifests": (
        lambda d: [p.write_bytes(b"garbage") for p in (d / "state").rglob("manifest.ocdbt")],
        False,
        False,
    ),
    "state _sharding": (lambda d: _garble(d / "state" / "_sharding"), False, False),
    "state array_metadatas": (
        lambda d: _garble(d / "state" / "array_metadatas" / "process_0"),
        False,
        False,
    ),
    "data iterator state": (lambda d: _garble(d / "data" / "process_0-of-1.json"), False, True),
    # Resuming takes the config from the command line, evaluation from the checkpoint.
    "config item": (lambda d: _garble(d / "config" / "metadata"), True, False),
    # Orbax's step metadata (timestamps): logged, not needed to restore.
    "_CHECKPOINT_METADATA": (lambda d: _garble(d / "_CHECKPOINT_METADATA"), True, True),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_each_kind_of_corrupt_file_is_refused_or_harmless_and_never_rewritten(
    saved, tmp_path, kind
):
    """Step 20 with one kind of file corrupted: resuming training and evaluating each either
    restore exactly what was saved or raise a CheckpointError naming the step and the steps
    available; no byte on disk changes, and step 10 still restores."""
    import shutil

    corrupt, resumable, evaluable = CORRUPTIONS[kind]
    saved_dir, _, states = saved
    workdir = tmp_path / "run"
    shutil.copytree(saved_dir, workdir)
    corrupt(workdir / "checkpoints" / "20")
    before = hash_tree(workdir)
    refused = r"(?s)checkpoints/20: .*\[10, 20\]"

    manager = checkpointing.open_manager(workdir, max_to_keep=2)
    iterator = iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())
    abstract = jax.eval_shape(lambda: states[20])
    try:
        if resumable:
            state = checkpointing.restore(manager, 20, abstract, iterator)
            for key, value in _leaves(states[20]).items():
                np.testing.assert_array_equal(_leaves(state)[key], value, err_msg=key)
            np.testing.assert_array_equal(next(iterator), [8, 9, 10, 11])
        else:
            with pytest.raises(checkpointing.CheckpointError, match=refused):
                checkpointing.restore(manager, 20, abstract, iterator)
    finally:
        manager.close()
    if evaluable:
        assert checkpointing.restore_for_eval(workdir)[2] == 20
    else:
        with pytest.raises(checkpointing.CheckpointError, match=refused):
            checkpointing.restore_for_eval(workdir)
    assert checkpointing.restore_for_eval(workdir, 10)[2] == 10
    assert hash_tree(workdir) == before
