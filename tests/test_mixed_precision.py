"""Mixed precision in training: ``config.model.dtype = "bfloat16"``.

The compute of encoder and head runs in bfloat16; the parameters, the optimiser state, the
BatchNorm statistics, the embeddings the loss sees and the loss stay float32. From the same
seed, the first steps' losses of a bfloat16 run track the float32 run's within bfloat16's
rounding. (A longer Fashion-MNIST comparison of the probe accuracies, with its command, is in
docs/accelerators.md.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhel_jax import train
from tests.train_worker import build_training, fixed_batch, tiny_config


def _two_steps(dtype: str):
    config = tiny_config()
    config.model.dtype = dtype
    setup = build_training(jax.devices()[:1], config)
    state = setup.init()
    batch = train.global_batch(fixed_batch(), setup.batch_sharding)
    losses = []
    for _ in range(2):
        state, metrics = setup.train_step(state, batch)
        losses.append(metrics["loss"])
    return setup, state, batch, losses


@pytest.mark.slow
def test_bfloat16_training_keeps_float32_state_and_loss():
    setup32, state32, _, losses32 = _two_steps("float32")
    setup16, state16, batch, losses16 = _two_steps("bfloat16")
    # Everything a run carries from step to step is float32 (probe included).
    for name in ("params", "batch_stats", "opt_state", "probe_params", "probe_opt_state"):
        for leaf in jax.tree.leaves(getattr(state16, name)):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32, (name, leaf.dtype)
    for loss in losses16:
        assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    # The bfloat16 program really convolves in bfloat16.
    hlo = setup16.train_step.lower(state16, batch).as_text()
    assert "bf16" in hlo and "convolution" in hlo
    assert "bf16" not in setup32.train_step.lower(state32, batch).as_text()
    # Same seed, same batch: the losses agree within bfloat16's rounding (8-bit mantissa),
    # and the two runs moved the float32 parameters in the same direction.
    np.testing.assert_allclose(np.asarray(losses16), np.asarray(losses32), rtol=2e-2)
    init = _flat(setup32.init().params)
    delta32, delta16 = _flat(state32.params) - init, _flat(state16.params) - init
    cosine = delta32 @ delta16 / (np.linalg.norm(delta32) * np.linalg.norm(delta16))
    assert np.linalg.norm(delta32) > 0 and cosine > 0.9, cosine


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])
