"""Tests for dhel_jax.baselines and ``dhel-eval --baselines``.

References: the stem BatchNorm's population statistics from a float64 NumPy convolution written
out tap by tap; the run's initial parameters from ``dhel_jax.step.create_train_state``; the
pixel kNN from the float64 brute-force reference of tests/np_reference.py.
"""

from __future__ import annotations

import json

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

from dhel_jax import augment, baselines, data, main, models, optimizers, parallel, probes, train
from dhel_jax.builders import eval_transform_kwargs
from dhel_jax.step import create_train_state
from tests import np_reference
from tests.train_worker import MOCK_EXAMPLES, tiny_config


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    model = train.build_model(config)
    transform = eval_transform_kwargs(config)
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    return config, model, transform, images


def _stem_moments_float64(kernel: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (biased) variance over (N, H, W) of a 3x3, stride-1, 'SAME' convolution."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i : i + h, j : j + w, :] @ kernel[i, j]
    flat = out.reshape(-1, out.shape[-1])
    return flat.mean(0), flat.var(0)


@pytest.mark.parametrize("batch_size", [64, 16])
def test_precise_batch_stats_are_the_population_statistics(setup, batch_size):
    """The stem BatchNorm sees the same inputs whatever the batch, so its pooled statistics
    must be the float64 population mean and variance over all 64 images, for one batch of 64
    and for four batches of 16 (pooled with the law of total variance)."""
    config, model, transform, images = setup
    variables = models.init_variables(model, jax.random.key(3), (16, 16, 1))
    stats, used = baselines.precise_batch_stats(
        model, variables, images, transform_kwargs=transform, batch_size=batch_size
    )
    assert used == 64
    chex.assert_trees_all_equal_shapes(stats, variables["batch_stats"])
    x = np.asarray(augment.eval_transform(images, **transform))
    kernel = np.asarray(variables["params"]["encoder"]["stem_conv"]["kernel"])
    mean, var = _stem_moments_float64(kernel, x)
    got = stats["encoder"]["stem_bn"]
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["var"], var, rtol=1e-4, atol=1e-6)
    # Every layer's statistics were re-estimated: none is left at its initial 0 / 1.
    for path, leaf in jax.tree_util.tree_leaves_with_path(stats):
        initial = 0.0 if path[-1].key == "mean" else 1.0
        assert np.max(np.abs(np.asarray(leaf) - initial)) > 1e-3, path


def test_precise_batch_stats_shards_like_one_device(setup, eight_devices):
    config, model, transform, images = setup
    variables = models.init_variables(model, jax.random.key(0), (16, 16, 1))
    one, _ = baselines.precise_batch_stats(
        model,
        variables,
        images,
        transform_kwargs=transform,
        batch_size=32,
        mesh=parallel.data_mesh(eight_devices[:1]),
    )
    eight, _ = baselines.precise_batch_stats(
        model,
        variables,
        images,
        transform_kwargs=transform,
        batch_size=32,
        mesh=parallel.data_mesh(eight_devices),
    )
    chex.assert_trees_all_close(one, eight, rtol=1e-5, atol=1e-6)


def test_random_init_variables_start_from_the_runs_initial_parameters(setup):
    config, model, transform, images = setup
    variables, used = baselines.random_init_variables(
        model,
        5,
        images,
        view_shape=(16, 16, 1),
        transform_kwargs=transform,
        batch_size=16,
        num_examples=48,
    )
    assert used == 48
    state = create_train_state(
        jax.random.key(5),
        model=model,
        tx=optimizers.make_optimizer("sgd", learning_rate=0.1, weight_decay=0.0),
        probe_tx=None,
        image_shape=(16, 16, 1),
        num_classes=10,
    )
    chex.assert_trees_all_equal(variables["params"], state.params)
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(variables["batch_stats"], state.batch_stats)


def test_pixel_features_native_and_downsampled():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    got = baselines.pixel_features(small)
    chex.assert_shape(got, (5, 784))
    chex.assert_type(got, np.float32)
    np.testing.assert_allclose(got, small.reshape(5, -1).astype(np.float64) / 255, rtol=1e-6)
    assert baselines.pixel_size((28, 28, 1)) == 28 and baselines.pixel_size((32, 32, 3)) == 32
    # 96 x 96 x 3 = 27648 values > 4096: resized to 36 x 36 (3888 values).
    assert baselines.pixel_size((96, 96, 3)) == 36
    levels = np.array([0, 51, 255], np.uint8)
    big = np.broadcast_to(levels[:, None, None, None], (3, 96, 96, 3)).copy()
    got = baselines.pixel_features(big)
    chex.assert_shape(got, (3, 36 * 36 * 3))
    np.testing.assert_allclose(got, np.repeat(levels / 255, 3888).reshape(3, -1), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        baselines.pixel_features(small[0])


def test_dhel_eval_baselines_end_to_end(tmp_path, capsys):
    """``dhel-eval --baselines`` on a tiny mocked run: the pixel baseline is the probes'
    answer on the raw pixels, the random-init baseline is scored, and the summary shows
    the gains."""
    workdir = tmp_path / "run"
    config = tiny_config()
    config.num_train_steps = 2
    config.eval.knn_k = 10
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        train.train_and_evaluate(config, str(workdir))
        argv = ["dhel-eval", f"--workdir={workdir}", "--baselines"]
        main.define_eval_flags()
        main.parse_flags(argv)
        try:
            main._eval(argv[:1])
        finally:
            flags.FLAGS.unparse_flags()
        train_x, train_y = data.load_split("fashion_mnist", "train")
        test_x, test_y = data.load_split("fashion_mnist", "test")
    printed = capsys.readouterr().out
    results = json.loads((workdir / "eval.json").read_text())
    found = results["baselines"]
    assert set(found) == {"random_init", "pixels"}
    assert found["random_init"]["bn_examples"] == MOCK_EXAMPLES
    assert found["pixels"]["image_size"] == 28 and found["pixels"]["dim"] == 784

    pixels_train = train_x.reshape(len(train_x), -1) / 255.0
    pixels_test = test_x.reshape(len(test_x), -1) / 255.0
    want_linear = probes.linear_probe_accuracy(
        pixels_train.astype(np.float32),
        train_y,
        pixels_test.astype(np.float32),
        test_y,
        num_classes=10,
    )["accuracy"]
    assert found["pixels"]["linear_probe"]["accuracy"] == pytest.approx(want_linear, abs=1e-9)
    want_knn = np.mean(
        np_reference.knn_predict(pixels_train, train_y, pixels_test, 10, 10, 0.1) == test_y
    )
    assert found["pixels"]["knn"]["accuracy"] == pytest.approx(want_knn, abs=1e-9)
    for key in ("random_init", "pixels"):
        for probe in ("linear_probe", "knn"):
            assert 0 <= found[key][probe]["accuracy"] <= 1
    ours = results["linear_probe"]["accuracy"]
    gain = 100 * (ours - found["pixels"]["linear_probe"]["accuracy"])
    assert "random-init encoder" in printed and "raw pixels (28x28)" in printed
    assert f"{gain:+.2f} linear" in printed
    assert "baselines" in results["timings"]
