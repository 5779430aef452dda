"""Tests for gradient caching (dhel_jax.grad_cache, config.embedding_chunks) and the online
geometry of the train step (config.geometry_every_steps).

The reference for k chunks is the one-pass gradient with ghost BatchNorm: one differentiated
function that applies the model to each chunk separately (rows picked by NumPy index lists),
puts the projections back in place and takes the loss of the whole batch.
"""

from __future__ import annotations

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dhel_jax import grad_cache, losses, metrics, models, parallel, train, train_config
from dhel_jax.step import GEOMETRY_METRICS
from tests.kinks import assert_clear_of_kinks, model_apply_pair
from tests.train_worker import (
    COMPILER_OPTIONS,
    MOCK_EXAMPLES,
    fixed_batch,
    step_views,
    tiny_config,
)

MODEL = models.get_model("resnet_tiny", head_hidden_dim=16, head_out_dim=8)
VIEW = (8, 8, 1)
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache: the run test reuses the step compiled by the step test."""
    keys = {
        "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    old = {k: getattr(jax.config, k) for k in keys}
    for k, v in keys.items():
        jax.config.update(k, v)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


@functools.cache
def _variables():
    init = jax.jit(
        lambda key: models.init_variables(MODEL, key, VIEW), compiler_options=COMPILER_OPTIONS
    )
    return jax.device_get(init(jax.random.key(0)))


def _views(num_views: int) -> np.ndarray:
    return np.random.default_rng(3).normal(size=(num_views, *VIEW)).astype(np.float32)


def _chunk_indices(num_rows: int, num_shards: int, num_chunks: int) -> list[np.ndarray]:
    """Chunk c: rows [c m, (c + 1) m) of each shard's num_rows / num_shards rows."""
    per = num_rows // num_shards
    m = per // num_chunks
    return [
        np.concatenate(
            [np.arange(d * per + c * m, d * per + (c + 1) * m) for d in range(num_shards)]
        )
        for c in range(num_chunks)
    ]


def _ghost_bn_reference(params, batch_stats, views, loss_fn, num_shards, num_chunks):
    """(loss, projections, features, grads, running stats) of one differentiated pass with
    BatchNorm per chunk; the running statistics are the mean of the chunks' updates. Asserts
    first that no chunk's network lies within round-off of a ReLU kink, where two float32
    computations need not agree (tests/kinks.py)."""
    n = views.shape[0]
    chunks = _chunk_indices(n, num_shards, num_chunks)
    apply = model_apply_pair(MODEL, train=True, mutable=["batch_stats"])
    for idx in chunks:
        assert_clear_of_kinks(*apply, {"params": params, "batch_stats": batch_stats}, views[idx])

    def objective(p):
        z = jnp.zeros((n, MODEL.head.out_dim))
        f = jnp.zeros((n, MODEL.encoder.num_features))
        stats = []
        for idx in chunks:
            out, mutated = MODEL.apply(
                {"params": p, "batch_stats": batch_stats},
                views[idx],
                train=True,
                mutable=["batch_stats"],
            )
            z = z.at[idx].set(out["projections"])
            f = f.at[idx].set(out["features"])
            stats.append(mutated["batch_stats"])
        pairs = z.reshape((n // 2, 2, -1))
        return loss_fn(pairs[:, 0], pairs[:, 1]), (z, f, stats)

    (loss, (z, f, stats)), grads = jax.jit(
        jax.value_and_grad(objective, has_aux=True), compiler_options=COMPILER_OPTIONS
    )(params)
    mean_stats = jax.tree.map(lambda *s: sum(s) / len(s), *stats)
    return loss, z, f, grads, mean_stats


def _assert_trees_close(actual, expected, what):
    a = jax.tree_util.tree_flatten_with_path(actual)[0]
    e = jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [p for p, _ in a] == [p for p, _ in e], what
    for (path, x), (_, y) in zip(a, e, strict=True):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), **TOL, err_msg=f"{what} {jax.tree_util.keystr(path)}"
        )


def test_chunk_rows_takes_consecutive_rows_of_every_shard_and_unchunk_inverts_it():
    x = np.arange(48).reshape(24, 2)
    chunks = grad_cache.chunk_rows(jnp.asarray(x), 3, num_shards=4)
    chex.assert_shape(chunks, (3, 8, 2))
    for c, idx in enumerate(_chunk_indices(24, 4, 3)):
        np.testing.assert_array_equal(chunks[c], x[idx])
    np.testing.assert_array_equal(grad_cache.unchunk_rows(chunks, num_shards=4), x)
    with pytest.raises(ValueError, match=r"24 rows do not split into 5 chunks"):
        grad_cache.chunk_rows(jnp.asarray(x), 5)


@pytest.mark.parametrize(
    ("loss", "hparams", "num_chunks", "num_devices"),
    [
        ("kcl", {}, 4, 8),
        ("info_nce", {"block_size": 8}, 2, 1),
    ],
)
def test_gradient_caching_equals_one_pass_with_ghost_batchnorm(
    loss, hparams, num_chunks, num_devices, eight_devices
):
    """Loss, embeddings, parameter gradients and BatchNorm statistics within 1e-5 (DHEL with
    k = 2 on 8 devices: in the train-step test below)."""
    loss_fn = losses.get_loss(loss, **hparams)
    variables = _variables()
    views = _views(64)  # 32 images: 4 per device, 1 per chunk of 4 per device.
    mesh = parallel.data_mesh(eight_devices[:num_devices])
    sharding = parallel.batch_sharding(mesh)

    def cached(params, batch_stats, x):
        (value, _), outputs, grads, stats = grad_cache.contrastive_gradients(
            params,
            batch_stats,
            x,
            model=MODEL,
            loss_fn=lambda z1, z2, return_aux: (loss_fn(z1, z2), {}),
            num_chunks=num_chunks,
            sharding=sharding,
        )
        return value, outputs, grads, stats

    replicated = parallel.replicated(mesh)
    value, outputs, grads, stats = jax.jit(
        cached,
        in_shardings=(replicated, replicated, sharding),
        compiler_options=COMPILER_OPTIONS,
    )(variables["params"], variables["batch_stats"], jax.device_put(views, sharding))
    ref_loss, ref_z, ref_f, ref_grads, ref_stats = _ghost_bn_reference(
        variables["params"], variables["batch_stats"], views, loss_fn, num_devices, num_chunks
    )
    np.testing.assert_allclose(value, ref_loss, **TOL)
    np.testing.assert_allclose(outputs["projections"], ref_z, **TOL)
    np.testing.assert_allclose(outputs["features"], ref_f, **TOL)
    _assert_trees_close(grads, ref_grads, "grads")
    _assert_trees_close(stats, ref_stats, "batch_stats")
    # Ghost BatchNorm really differs from BatchNorm over the whole batch.
    whole, _ = MODEL.apply(variables, views, train=True, mutable=["batch_stats"])
    assert not np.allclose(whole["projections"], ref_z, atol=1e-3)


def test_compiled_temporaries_fall_as_one_over_the_number_of_chunks():
    """memory_analysis() of the compiled gradient of 256 pairs of views: the temporaries
    (activations, mostly) of k = 2 and k = 4 chunks are at most ~1/k of the one-pass ones
    (plus what does not shrink: the views' chunked copy, the loss's (B, B) blocks)."""
    variables = _variables()
    views = jax.ShapeDtypeStruct((512, *VIEW), jnp.float32)
    temps = {}
    for k in (1, 2, 4):
        fn = jax.jit(
            functools.partial(
                grad_cache.contrastive_gradients,
                model=MODEL,
                loss_fn=losses.get_loss("dhel"),
                num_chunks=k,
            ),
            compiler_options=COMPILER_OPTIONS,
        )
        compiled = fn.lower(variables["params"], variables["batch_stats"], views).compile()
        temps[k] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[1] > 4 * 512 * np.prod(VIEW) * 8, temps  # Activations dominate.
    assert temps[2] < 0.6 * temps[1], temps
    assert temps[4] < 0.35 * temps[1], temps
    assert temps[4] < 0.65 * temps[2], temps


def test_contrastive_gradients_rejects_chunks_that_split_a_pair():
    variables = _variables()
    with pytest.raises(ValueError, match=r"8 images on 1 devices do not split into num_chunks = 3"):
        grad_cache.contrastive_gradients(
            variables["params"],
            variables["batch_stats"],
            jnp.zeros((16, *VIEW)),
            model=MODEL,
            loss_fn=losses.get_loss("dhel"),
            num_chunks=3,
        )


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"embedding_chunks": 0}, r"config.embedding_chunks must be an integer >= 1"),
        (
            {"embedding_chunks": 4},
            r"batch_size = 16 does not split into config.embedding_chunks = 4 chunks on each "
            r"of the 8 devices; use a batch that is a multiple of 32",
        ),
        ({"geometry_every_steps": -1}, r"config.geometry_every_steps must be an integer >= 0"),
        (
            {"geometry_every_steps": 10, "batch_size": 2**17},
            r"counts all pairs of at most 65536 rows",
        ),
    ],
)
def test_bad_chunk_and_geometry_settings_fail_clearly(changes, match):
    config = tiny_config()
    config.update(changes)
    with pytest.raises(ValueError, match=match):
        train_config.validate_config(config, device_count=8, process_count=1)


def _chunked_config():
    """tiny_config with k = 2 chunks, geometry every 2 steps and plain SGD at learning rate 1
    (so that a step moves the parameters by minus the gradient); one epoch of 4 steps. Seed 2:
    at seeds 0 and 1 a ReLU input of the second step's views lies within 1e-7 of zero, where
    float32 round-off decides whether its gradient passes (the step and the reference took
    different sides on AMD CPUs); at seed 2 every one is at least 1.6e-5 from it."""
    config = tiny_config()
    config.seed = 2
    config.embedding_chunks = 2
    config.geometry_every_steps = 2
    config.num_epochs = 1
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.0
    config.optimizer.weight_decay = 0.0
    config.optimizer.lr_scaling = "none"
    config.optimizer.base_lr = 1.0
    return config


@pytest.mark.slow
def test_train_step_with_chunks_on_8_devices_is_exact_and_measures_the_batch_geometry(
    eight_devices,
):
    """The jitted step with k = 2 on 8 devices. Step 1: geometry not due (NaN). Step 2: the
    loss, the new parameters (params - reference gradient) and statistics are the reference's;
    the geometry metrics are dhel_jax.metrics of the reference embeddings of the same views."""
    config = _chunked_config()
    counts = train.StepCounts(num_examples=64, steps_per_epoch=4, total_steps=4, warmup_steps=0)
    setup = train.make_training(
        config, parallel.data_mesh(eight_devices), counts, compiler_options=COMPILER_OPTIONS
    )
    host = fixed_batch()
    batch = train.global_batch(host, setup.batch_sharding)
    state, first = setup.train_step(setup.init(), batch)
    assert all(np.isnan(first[k]) for k in GEOMETRY_METRICS)
    assert np.isfinite(first["loss"])

    params, batch_stats = jax.device_get((state.params, state.batch_stats))
    views = step_views(state, host, config)
    lr = float(setup.learning_rate_fn(1))
    new_state, second = setup.train_step(state, batch)

    ref_loss, ref_z, ref_f, ref_grads, ref_stats = _ghost_bn_reference(
        params, batch_stats, views, train_config.loss_from_config(config.loss), 8, 2
    )
    np.testing.assert_allclose(second["loss"], ref_loss, **TOL)
    _assert_trees_close(
        new_state.params, jax.tree.map(lambda p, g: p - lr * g, params, ref_grads), "params"
    )
    _assert_trees_close(new_state.batch_stats, ref_stats, "batch_stats")

    f1, z1, z2 = ref_f[0::2], ref_z[0::2], ref_z[1::2]
    expected = {
        "features_effective_rank": metrics.effective_rank(f1),
        "projections_effective_rank": metrics.effective_rank(z1),
        "projections_wasserstein_uniformity": metrics.wasserstein_uniformity(z1),
        "projections_alignment": metrics.alignment(z1, z2),
    }
    assert set(expected) == set(GEOMETRY_METRICS)
    for name, value in expected.items():
        np.testing.assert_allclose(second[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_run_with_chunks_logs_geometry_on_due_steps_only(tmp_path, eight_devices):
    """train_and_evaluate with k = 2: every step logged, the geometry at steps 2 and 4 only."""
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        train.train_and_evaluate(
            _chunked_config(), str(tmp_path), compiler_options=COMPILER_OPTIONS
        )
    records = [
        json.loads(line) for line in (tmp_path / train.METRICS_FILENAME).read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        has = {k for k in GEOMETRY_METRICS if k in r}
        assert has == (set(GEOMETRY_METRICS) if r["step"] % 2 == 0 else set()), r
        assert all(np.isfinite(r[k]) for k in has), r
