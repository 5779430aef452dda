"""Tests for dhel_jax.evaluate and the dhel-eval entry point (dhel_jax.main).

A ResNet-tiny run is trained for 4 steps on ``tfds.testing.mock_data`` Fashion-MNIST (64 train
and 64 test records; checkpoints at steps 2 and 4) and evaluated. References are independent:
features from one plain ``model.apply`` on the whole split, views drawn image by image,
scikit-learn / scipy / NumPy for the rest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

from dhel_jax import (
    augment,
    checkpointing,
    data,
    eval_settings,
    evaluate,
    features,
    main,
    metrics,
    paper_probe,
    parallel,
    plots,
    train,
    train_config,
)
from dhel_jax.builders import eval_transform_kwargs
from tests.helpers import hash_tree, truncate_state_arrays
from tests.train_worker import COMPILER_OPTIONS, MOCK_EXAMPLES, tiny_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KNN_K = 10
GEOMETRY_EXAMPLES = 40


def _run_config():
    config = tiny_config()
    config.num_train_steps = 4
    config.checkpoint_every_steps = 2
    config.eval.knn_k = KNN_K  # 64 mocked train records: k = 200 is impossible.
    return config


@pytest.fixture
def mocked():
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained 4 steps (checkpoints at 2 and 4); never modified by the tests."""
    workdir = tmp_path_factory.mktemp("run")
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        train.train_and_evaluate(_run_config(), str(workdir), compiler_options=COMPILER_OPTIONS)
    assert checkpointing.available_steps(workdir) == [2, 4]
    return workdir


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory):
    """``evaluate`` of a copy of the run: (workdir, results, checkpoint hashes before)."""
    workdir = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(run, workdir)
    before = hash_tree(workdir / "checkpoints")
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        # The run's config sets knn_k; the pair metrics use a strict subset (40 of 64 images).
        results = evaluate.evaluate(workdir, geometry_examples=GEOMETRY_EXAMPLES)
    return workdir, results, before


def _copy(run: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    return workdir


# ----------------------------------------------------------------------------------------------
# End to end.


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def test_eval_json_has_every_key_finite_values_and_valid_pngs(evaluated):
    workdir, results, before = evaluated
    on_disk = json.loads((workdir / "eval.json").read_text())
    assert on_disk == results
    assert {
        "workdir",
        "step",
        "protocol",
        "settings",
        "run",
        "dataset",
        "dims",
        "linear_probe",
        "knn",
        "geometry",
        "plots",
        "timings",
        "devices",
        "versions",
    } <= set(results)
    assert results["step"] == 4 and results["protocol"] == "fast"
    assert results["dataset"]["num_train"] == results["dataset"]["num_test"] == MOCK_EXAMPLES
    assert results["dims"] == {"features": 8, "projections": 8}
    assert {"accuracy", "train_accuracy", "val_accuracy", "l2", "num_steps", "grad_norm"} <= set(
        results["linear_probe"]
    )
    assert results["knn"]["k"] == KNN_K and results["knn"]["temperature"] == 0.1
    for name in ("features", "projections"):
        assert set(results["geometry"][name]) == set(evaluate.GEOMETRY_KEYS)
    assert results["geometry"]["pair_examples"] == GEOMETRY_EXAMPLES
    assert results["geometry"]["rank_examples"] == MOCK_EXAMPLES
    assert {"restore", "load_data", "extract_features", "linear_probe", "knn", "geometry"} <= set(
        results["timings"]
    )
    assert results["settings"]["fast_probe"]["l2_grid"] == list(
        eval_settings.FAST_PROBE_DEFAULTS["l2_grid"]
    )
    assert {"jax", "dhel_jax"} <= set(results["versions"])
    for key, value in _leaves(results):
        if isinstance(value, (int, float)):
            assert math.isfinite(value), key
        else:
            assert isinstance(value, str), (key, value)
    for key in ("accuracy", "train_accuracy", "val_accuracy"):
        assert 0 <= results["linear_probe"][key] <= 1
    assert 0 <= results["knn"]["accuracy"] <= 1

    import matplotlib.image

    assert set(results["plots"]) == {"spectrum", "cosine_histogram", "training_curves"}
    for relative in results["plots"].values():
        path = workdir / relative
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # not a blank canvas
    # Nothing under checkpoints/ changed, and no temporary file was left behind.
    assert hash_tree(workdir / "checkpoints") == before
    assert not [p for p in workdir.rglob(".*tmp*")]


def test_geometry_in_eval_json_equals_metrics_on_the_same_features(evaluated, mocked):
    """Features recomputed independently (one plain model.apply on the whole test split, views
    drawn image by image with the documented keys) give the geometry recorded in eval.json."""
    workdir, results, _ = evaluated
    config, variables, _ = checkpointing.restore_for_eval(workdir)
    model = train.build_model(config)
    images, _ = data.load_split("fashion_mnist", "test")
    x = augment.eval_transform(images, **eval_transform_kwargs(config))
    out = model.apply(variables, x, train=False)
    kwargs = train.augment_kwargs(config)
    views = [[], []]
    for i, image in enumerate(images):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(0), i))
        for v in range(2):
            views[v].append(augment.augment(image[None], keys[v], **kwargs)[0])
    view_out = [model.apply(variables, jnp.stack(v), train=False) for v in views]
    n = results["geometry"]["pair_examples"]
    for name in ("features", "projections"):
        z = out[name]
        want = {
            "effective_rank": metrics.effective_rank(z),
            "rank": metrics.rank(z),
            "uniformity": metrics.uniformity(z[:n]),
            "wasserstein_uniformity": metrics.wasserstein_uniformity(z[:n]),
            "alignment": metrics.alignment(view_out[0][name][:n], view_out[1][name][:n]),
        }
        got = results["geometry"][name]
        assert got["rank"] == int(want.pop("rank")), name
        for key, value in want.items():
            np.testing.assert_allclose(got[key], float(value), rtol=2e-4, atol=1e-6, err_msg=key)


def test_cli_prints_a_summary_and_writes_the_outputs(run, tmp_path, mocked, capsys):
    workdir = _copy(run, tmp_path)
    before = hash_tree(workdir / "checkpoints")
    argv = ["dhel-eval", f"--workdir={workdir}", "--step=2"]
    main.define_eval_flags()
    main.parse_flags(argv)
    try:
        main._eval(argv[:1])
    finally:
        flags.FLAGS.unparse_flags()
    printed = capsys.readouterr().out
    results = json.loads((workdir / "eval.json").read_text())
    assert results["step"] == 2
    assert "step 2" in printed
    assert f"{100 * results['linear_probe']['accuracy']:6.2f}%" in printed
    assert f"{100 * results['knn']['accuracy']:6.2f}%" in printed
    assert f"{results['geometry']['projections']['wasserstein_uniformity']:.4f}" in printed
    assert (workdir / "plots" / "training_curves.png").exists()
    assert hash_tree(workdir / "checkpoints") == before


# ----------------------------------------------------------------------------------------------
# Errors: clear messages, nothing written.


def test_corrupt_checkpoint_is_reported_and_left_byte_identical(run, tmp_path, mocked):
    workdir = _copy(run, tmp_path)
    truncate_state_arrays(workdir, 4, divisor=2)
    before = hash_tree(workdir)
    with pytest.raises(
        checkpointing.CheckpointError,
        match=r"(?s)cannot read checkpoint .*checkpoints/4: .*\[2, 4\]",
    ):
        evaluate.evaluate(workdir)
    assert hash_tree(workdir) == before  # no eval.json, no plots, checkpoints untouched


def test_missing_step_or_workdir_names_the_available_steps(run, tmp_path, capsys):
    before = hash_tree(run)
    with pytest.raises(checkpointing.CheckpointError, match=r"no checkpoint at step 3: .*\[2, 4\]"):
        evaluate.evaluate(run, step=3)
    assert hash_tree(run) == before
    missing = tmp_path / "nowhere"
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoints in .*nowhere"):
        evaluate.evaluate(missing)
    assert not missing.exists()
    # The CLI prints one line and exits with status 1, no traceback.
    argv = ["dhel-eval", f"--workdir={run}", "--step=3"]
    main.define_eval_flags()
    main.parse_flags(argv)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main._eval(argv[:1])
    finally:
        flags.FLAGS.unparse_flags()
    assert exit_info.value.code == main.EXIT_FAILURE
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("dhel-eval: error: no checkpoint at step 3") and "[2, 4]" in line


def test_outputs_never_go_inside_the_checkpoint_directory(run):
    before = hash_tree(run)
    for out_dir in (run / "checkpoints", run / "checkpoints" / "4" / "eval"):
        with pytest.raises(ValueError, match="inside the checkpoint directory"):
            evaluate.evaluate(run, out_dir=out_dir)
    assert hash_tree(run) == before


# ----------------------------------------------------------------------------------------------
# Pieces.


def test_extract_features_pads_and_shards_like_one_plain_batch(run, eight_devices):
    """37 images in batches of 16 over 8 devices (last batch padded) equal one model.apply."""
    config, variables, _ = checkpointing.restore_for_eval(run)
    model = train.build_model(config)
    images = np.random.default_rng(0).integers(0, 256, (37, 28, 28, 1), dtype=np.uint8)
    kwargs = eval_transform_kwargs(config)
    got = features.extract_features(
        model,
        variables,
        images,
        batch_size=16,
        mesh=parallel.data_mesh(eight_devices),
        transform_kwargs=kwargs,
    )
    want = model.apply(variables, augment.eval_transform(images, **kwargs), train=False)
    chex.assert_shape(got["features"], (37, 8))
    chex.assert_shape(got["projections"], (37, 8))
    for name in ("features", "projections"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_evaluation_host_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Extraction, one paper-probe epoch and kNN over a streamed synthetic split of N, then 2N
    192x192x3 images (108 MiB per N), three times each after a compiling warm-up: the median
    peak RSS grows far less than the N added images; the control that holds the 2N images in
    one array (as ``data.load_split`` did) peaks at least 3/4 of their size higher.
    tests/eval_memory_worker.py says how RSS is measured and why medians."""
    out = tmp_path / "memory.json"
    # glibc serves allocations above its mmap threshold with mmap and unmaps them on free; the
    # threshold adapts upward to the freed sizes (up to 32 MiB), after which freed batches stay
    # in the heap. A fixed threshold keeps RSS to what the program holds (ImageNet batches,
    # 256 x 256 x 256 x 3 bytes, exceed the adaptive ceiling anyway).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", JAX_PLATFORMS="cpu", XLA_FLAGS="")
    worker = Path(__file__).with_name("eval_memory_worker.py")
    subprocess.run(
        [sys.executable, str(worker), "1024", str(out)], env=env, check=True, timeout=600
    )
    got = json.loads(out.read_text())
    images = got["image_bytes_n"]
    stream_n, stream_2n = np.median(got["stream_n"]), np.median(got["stream_2n"])
    assert stream_2n - stream_n < 0.25 * images, got
    assert min(got["materialise_2n"]) - stream_2n > 0.75 * 2 * images, got


def test_extract_features_of_canvases_use_each_images_size(run):
    """Images in canvases (as ImageNet-100's): a source with sizes, 21 images in batches of 8
    (the last padded), gives the features of ``eval_transform(images, sizes=sizes)``; the
    paper probe runs on it (its crops are tested in tests/test_augment.py)."""
    config, variables, _ = checkpointing.restore_for_eval(run)
    model = train.build_model(config)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (21, 28, 28, 1), dtype=np.uint8)
    sizes = np.stack([rng.integers(12, 29, 21), rng.integers(12, 29, 21)], 1).astype(np.int32)
    labels = rng.integers(0, 10, 21).astype(np.int32)
    source = data.ArraySource(images, labels, sizes)
    kwargs = eval_transform_kwargs(config)
    got = features.extract_features(model, variables, source, batch_size=8, transform_kwargs=kwargs)
    want = model.apply(
        variables, augment.eval_transform(images, sizes=sizes, **kwargs), train=False
    )
    for name in ("features", "projections"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    result = paper_probe.paper_linear_probe(
        lambda v, x: model.apply(v, x, train=False)["features"],
        variables,
        source,
        labels,
        got["features"],
        labels,
        num_classes=10,
        view_kwargs=paper_probe.crop_flip_kwargs(config),
        epochs=1,
        batch_size=8,
    )
    assert result["steps"] == 2 and math.isfinite(result["train_loss"])


def _histogram_features(variables, views):
    """A fixed 'encoder': soft histogram of the pixel values around 10 intensity levels."""
    del variables
    levels = (jnp.arange(10) * 25 + 10) / 255.0
    x = views.reshape(views.shape[0], -1, 1)
    return jnp.exp(-(((x - levels) / 0.03) ** 2)).mean(axis=1)


def test_paper_probe_learns_crop_invariant_synthetic_classes():
    """Class c: images of intensity level c (+-2 noise). Random crops and flips keep the level,
    so a linear layer on the soft-histogram 'encoder' must reach >= 99% test accuracy."""
    rng = np.random.default_rng(0)

    def images(n):
        labels = rng.integers(0, 10, n).astype(np.int32)
        base = (labels * 25 + 10)[:, None, None, None]
        noise = rng.integers(-2, 3, (n, 12, 12, 1))
        return (base + noise).astype(np.uint8), labels

    train_x, train_y = images(512)
    test_x, test_y = images(256)
    test_features = np.asarray(_histogram_features(None, test_x / 255.0))
    view_kwargs = dict(
        out_size=12, jitter_strength=0.0, jitter_prob=0.0, grayscale_prob=0.0, crop_scale=(0.2, 1.0)
    )
    result = paper_probe.paper_linear_probe(
        _histogram_features,
        {},
        train_x,
        train_y,
        test_features,
        test_y,
        num_classes=10,
        view_kwargs=view_kwargs,
        epochs=5,
        batch_size=64,
        learning_rate=0.5,
    )
    assert result["accuracy"] >= 0.99, result
    assert result["train_accuracy"] >= 0.99, result
    assert result["steps"] == 5 * (512 // 64)


def test_paper_protocol_end_to_end(run, tmp_path, mocked):
    out_dir = tmp_path / "paper_eval"
    before = hash_tree(run)
    results = evaluate.evaluate(
        run,
        protocol="paper",
        out_dir=out_dir,
        plots=False,
        paper_probe={"epochs": 2, "batch_size": 16},
    )
    assert hash_tree(run) == before  # the workdir is untouched: outputs went to out_dir
    assert json.loads((out_dir / "eval.json").read_text()) == results
    probe = results["linear_probe"]
    assert probe["protocol"] == "paper" and 0 <= probe["accuracy"] <= 1
    assert probe["steps"] == 2 * (MOCK_EXAMPLES // 16)
    assert math.isfinite(probe["train_loss"])
    assert results["settings"]["paper_probe"] == {
        **eval_settings.PAPER_PROBE_DEFAULTS,
        "epochs": 2,
        "batch_size": 16,
    }
    assert probe["view_kwargs"]["jitter_strength"] == 0.0
    assert probe["view_kwargs"]["crop_scale"] == [0.08, 1.0]
    assert results["plots"] == dict.fromkeys(plots.PLOT_FILENAMES)


def test_settings_come_from_the_config_then_the_overrides():
    config = train_config.default_config()
    config.eval.knn_k = 20
    config.eval.protocol = "paper"
    settings = eval_settings.settings_from_config(config)
    assert (settings.knn_k, settings.protocol, settings.knn_temperature) == (20, "paper", 0.1)
    settings = eval_settings.settings_from_config(
        config, protocol="fast", knn_k=None, paper_probe={"epochs": 3}
    )
    assert (settings.protocol, settings.knn_k) == ("fast", 20)
    assert settings.paper_probe["epochs"] == 3
    assert (
        settings.paper_probe["learning_rate"] == eval_settings.PAPER_PROBE_DEFAULTS["learning_rate"]
    )
    assert settings.fast_probe == eval_settings.FAST_PROBE_DEFAULTS
    for overrides, match in (
        ({"protocol": "slow"}, r"unknown protocol 'slow'; accepted values are 'fast', 'paper'"),
        ({"knn_k": 0}, r"knn_k must be an integer >= 1; got knn_k = 0"),
        ({"knn_temperature": -1.0}, r"knn_temperature must be a finite number > 0"),
        ({"knn": 5}, r"unknown setting 'knn'; accepted settings are protocol, knn_k"),
        ({"paper_probe": {"lr": 1.0}}, r"paper_probe has no setting 'lr'; accepted: batch_size"),
    ):
        with pytest.raises(ValueError, match=match):
            eval_settings.settings_from_config(config, **overrides)
