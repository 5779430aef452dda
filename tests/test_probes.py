"""Tests for dhel_jax.probes: the linear probe against scikit-learn, kNN against NumPy."""

from __future__ import annotations

import gzip
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhel_jax import probes
from tests import np_reference

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------- data


def _read_idx(path: str) -> np.ndarray:
    """Parses an IDX file (big-endian header: 0, 0, dtype code, ndim, then the dims)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    assert data[:3] == b"\x00\x00\x08", f"{path}: not an unsigned-byte IDX file"
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@pytest.fixture(scope="module")
def fashion_features():
    """8k train / 2k test Fashion-MNIST images under a fixed 64-d random projection."""
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    names += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = [os.path.join(FASHION_MNIST_DIR, f"{name}.gz") for name in names]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        pytest.skip(
            f"Fashion-MNIST IDX files not found ({', '.join(missing)}); "
            "install Debian's fashion-mnist dataset package to run this test."
        )
    x_train, y_train, x_test, y_test = (_read_idx(p) for p in paths)
    rng = np.random.default_rng(0)
    train = rng.choice(len(y_train), 8000, replace=False)
    test = rng.choice(len(y_test), 2000, replace=False)
    projection = rng.standard_normal((784, 64)) / np.sqrt(784)

    def project(images):
        return (images.reshape(len(images), -1) / 255.0 @ projection).astype(np.float32)

    return (
        project(x_train[train]),
        y_train[train].astype(np.int32),
        project(x_test[test]),
        y_test[test].astype(np.int32),
    )


def _separable(rng, n, means):
    """Gaussian blobs around well-separated class means: linearly separable w.h.p."""
    labels = rng.integers(0, len(means), n).astype(np.int32)
    features = means[labels] + 0.3 * rng.standard_normal((n, means.shape[1]))
    return features.astype(np.float32), labels


# --------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_reaches_99_percent(rng):
    means = 4.0 * rng.standard_normal((4, 16))
    x_train, y_train = _separable(rng, 800, means)
    x_test, y_test = _separable(rng, 400, means)
    # A constant feature (zero variance) must not break the standardisation.
    x_train, x_test = (
        np.concatenate([x, np.full((len(x), 1), 5.0, x.dtype)], 1) for x in (x_train, x_test)
    )
    probe = probes.fit_linear_probe(x_train, y_train, num_classes=4, max_search_examples=300)
    chex.assert_shape(probe.weights, (17, 4))
    chex.assert_shape((probe.bias,), [(4,)])
    chex.assert_shape((probe.mean, probe.scale), (17,))
    assert probe.scale[-1] == 1.0 and probe.mean[-1] == pytest.approx(5.0)
    assert np.all(np.isfinite(probe.weights))
    assert probe.l2 in probe.l2_grid
    assert len(probe.grid_val_accuracy) == len(probe.l2_grid)
    predictions = probes.predict_linear_probe(probe, x_test)
    chex.assert_shape(predictions, (400,))
    chex.assert_type(predictions, jnp.int32)
    accuracy = np.mean(np.asarray(predictions) == y_test)
    assert accuracy >= 0.99
    result = probes.linear_probe_accuracy(
        x_train, y_train, x_test, y_test, num_classes=4, max_search_examples=300
    )
    assert result["accuracy"] == pytest.approx(accuracy)
    assert result["l2"] == probe.l2 and result["val_accuracy"] == probe.val_accuracy
    assert result["train_accuracy"] >= 0.99


def _one_blas_thread():
    """scikit-learn's OpenMP/BLAS pools busy-wait against XLA's threads on a shared
    2-core machine (40x slower fits); one thread is fast for these problem sizes."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    return threadpoolctl.threadpool_limits(1)


def _softmax_objective(w, b, x, y, l2):
    """float64 ``mean_i CE_i + (l2 / 2) |W|^2`` of logits ``x @ w + b``."""
    logits = x @ w + b
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(y)), y].mean() + 0.5 * l2 * np.sum(w * w)


def test_linear_probe_fixed_l2_solves_sklearns_problem(fashion_features):
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    x_train, y_train, x_test, _ = fashion_features
    n, l2 = len(y_train), 1e-3
    probe = probes.fit_linear_probe(
        x_train, y_train, num_classes=10, l2_grid=(l2,), max_steps=500, tol=1e-5
    )
    assert np.isnan(probe.val_accuracy)

    x = x_train.astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    np.testing.assert_allclose(probe.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probe.scale, std, rtol=1e-5)
    z = (x - mean) / std
    with _one_blas_thread():
        clf = sklearn_linear.LogisticRegression(C=1.0 / (l2 * n), tol=1e-8, max_iter=5000)
        clf.fit(z, y_train)

    w = np.asarray(probe.weights, np.float64)
    ours = _softmax_objective(w, np.asarray(probe.bias, np.float64), z, y_train, l2)
    theirs = _softmax_objective(clf.coef_.T, clf.intercept_, z, y_train, l2)
    assert abs(ours - theirs) <= 1e-5 * theirs, (ours, theirs)
    # The penalised W is unique (only the bias has a softmax shift freedom).
    np.testing.assert_allclose(w, clf.coef_.T, rtol=0, atol=5e-3 * np.abs(clf.coef_).max())
    z_test = (x_test.astype(np.float64) - mean) / std
    agree = np.mean(np.asarray(probes.predict_linear_probe(probe, x_test)) == clf.predict(z_test))
    assert agree >= 0.99


def test_linear_probe_search_and_accuracy_match_sklearn(fashion_features):
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    x_train, y_train, x_test, y_test = fashion_features
    probe = probes.fit_linear_probe(x_train, y_train, num_classes=10, seed=3)
    accuracy = np.mean(np.asarray(probes.predict_linear_probe(probe, x_test)) == y_test)

    # scikit-learn on the documented held-out split, over the same grid with
    # C = 1 / (l2 * N) held fixed between the search fits and the refit on all rows.
    n = len(y_train)
    held_out = np.asarray(jax.random.permutation(jax.random.key(3), n))[: round(0.1 * n)]
    fit = np.setdiff1d(np.arange(n), held_out)
    x = x_train.astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    z, z_test = (x - mean) / std, (x_test - mean) / std
    val_accuracy = []
    with _one_blas_thread():
        for l2 in probes.DEFAULT_L2_GRID:
            clf = sklearn_linear.LogisticRegression(C=1.0 / (l2 * n), max_iter=2000)
            val_accuracy.append(clf.fit(z[fit], y_train[fit]).score(z[held_out], y_train[held_out]))
        best = probes.DEFAULT_L2_GRID[int(np.argmax(val_accuracy))]
        clf = sklearn_linear.LogisticRegression(C=1.0 / (best * n), max_iter=2000)
        sklearn_accuracy = clf.fit(z, y_train).score(z_test, y_test)

    # 800 held-out rows: 0.5 points is 4 examples.
    np.testing.assert_allclose(probe.grid_val_accuracy, val_accuracy, atol=0.005)
    assert sklearn_accuracy > 0.75  # the reference itself is sane
    assert abs(accuracy - sklearn_accuracy) <= 0.01, (probe, sklearn_accuracy)


# --------------------------------------------------------------------------- kNN


def _knn_data(rng, n_train=300, n_query=150, dim=16, num_classes=5):
    # Class-dependent means make the votes informative, noise keeps similarities distinct.
    means = rng.standard_normal((num_classes, dim))
    train_labels = rng.integers(0, num_classes, n_train).astype(np.int32)
    train = means[train_labels] + rng.standard_normal((n_train, dim))
    queries = means[rng.integers(0, num_classes, n_query)] + rng.standard_normal((n_query, dim))
    return train, train_labels, queries


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 512])
@pytest.mark.parametrize("k", [1, 10, 300])
def test_knn_matches_bruteforce_float64(rng, chunk_size, k):
    train, train_labels, queries = _knn_data(rng)
    expected = np_reference.knn_predict(train, train_labels, queries, 5, k, 0.1)
    with jax.enable_x64(True):
        got = probes.knn_predict(
            train, train_labels, queries, num_classes=5, k=k, chunk_size=chunk_size
        )
        chex.assert_shape(got, (150,))
        chex.assert_type(got, jnp.int32)
        np.testing.assert_array_equal(np.asarray(got), expected)


def _knn_ties(train, train_labels, queries, num_classes, k, temperature):
    """Over the queries, in float64: the smallest gap between the k-th and the (k+1)-th cosine
    similarity (top-k's tie), and the smallest relative gap between the two heaviest classes'
    votes (argmax's tie)."""
    train, queries = np_reference.normalize(train), np_reference.normalize(queries)
    sims = np.sort(queries @ train.T, axis=1)[:, ::-1]
    order = np.argsort(-(queries @ train.T), axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(queries), num_classes))
    for i, neighbours in enumerate(order):
        s = (queries[i] @ train[neighbours].T) / temperature
        np.add.at(votes[i], train_labels[neighbours], np.exp(s - s.max()))
    top2 = np.sort(votes, axis=1)[:, -2:]
    return np.min(sims[:, k - 1] - sims[:, k]), np.min((top2[:, 1] - top2[:, 0]) / top2[:, 1])


@pytest.mark.parametrize("temperature", [0.1, 0.01, 1.0])
def test_knn_float32_matches_bruteforce(rng, temperature):
    # temperature 0.01 puts exp(s / temperature) up to e^100, beyond float32's range.
    train, train_labels, queries = _knn_data(rng)
    expected = np_reference.knn_predict(train, train_labels, queries, 5, 50, temperature)
    # Exact equality holds only away from ties that float32 round-off could decide either way:
    # a cosine similarity of unit vectors in d = 16 is off by at most (d + 2) float32 epsilons
    # (normalisation and the dot product), a vote exp(s / temperature) by that over the
    # temperature, relatively, plus the sum of k = 50 of them. Twice each bound must separate
    # the k-th from the (k+1)-th neighbour and the two heaviest classes.
    eps = 2.0**-24
    topk_gap, vote_gap = _knn_ties(train, train_labels, queries, 5, 50, temperature)
    assert topk_gap > 2 * 18 * eps, topk_gap
    assert vote_gap > 2 * (18 * eps / temperature + 50 * eps), vote_gap
    got = probes.knn_predict(
        train.astype(np.float32),
        train_labels,
        queries.astype(np.float32),
        num_classes=5,
        k=50,
        temperature=temperature,
        chunk_size=37,
    )
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_knn_accuracy_counts_correct_votes(rng):
    train, train_labels, queries = _knn_data(rng)
    query_labels = rng.integers(0, 5, len(queries)).astype(np.int32)
    expected = np.mean(
        np_reference.knn_predict(train, train_labels, queries, 5, 20, 0.1) == query_labels
    )
    got = probes.knn_accuracy(
        train.astype(np.float32),
        train_labels,
        queries.astype(np.float32),
        query_labels,
        num_classes=5,
        k=20,
        chunk_size=64,
    )
    assert got == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- validation


_X = np.ones((20, 3), np.float32)
_Y = np.arange(20, dtype=np.int32) % 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(features=np.ones(20, np.float32)), ValueError, r"features must have rank 2"),
        (dict(features=np.ones((20, 3), np.int32)), TypeError, r"floating dtype"),
        (dict(labels=_Y[:10]), ValueError, r"labels must have shape \(20,\)"),
        (dict(labels=_Y.astype(np.float32)), TypeError, r"integer dtype"),
        (dict(labels=_Y + 1), ValueError, r"\[0, num_classes\) = \[0, 2\); got values in \[1, 2\]"),
        (dict(labels=_Y - 1), ValueError, r"got values in \[-1, 0\]"),
        (dict(num_classes=1), ValueError, r"num_classes must be an integer >= 2"),
        (dict(num_classes=2.0), ValueError, r"num_classes must be an integer >= 2"),
        (dict(l2_grid=()), ValueError, r"l2_grid must be a non-empty"),
        (dict(l2_grid=(1e-3, -1.0)), ValueError, r"l2_grid must be .* >= 0"),
        (dict(val_fraction=1.0), ValueError, r"val_fraction must lie in \(0, 1\)"),
        (dict(val_fraction=0.01), ValueError, r"leaves 0 held-out"),
        (
            dict(max_search_examples=0),
            ValueError,
            r"max_search_examples must be None or an integer >= 1",
        ),
        (dict(max_steps=0), ValueError, r"max_steps must be an integer >= 1"),
        (dict(tol=0.0), ValueError, r"tol must be > 0"),
    ],
)
def test_fit_linear_probe_rejects_bad_input(kwargs, error, match):
    args = dict(features=_X, labels=_Y, num_classes=2) | kwargs
    features, labels = args.pop("features"), args.pop("labels")
    with pytest.raises(error, match=match):
        probes.fit_linear_probe(features, labels, **args)


def test_predict_and_accuracy_reject_mismatched_features():
    probe = probes.fit_linear_probe(_X, _Y, num_classes=2, l2_grid=(1e-2,), max_steps=5)
    with pytest.raises(ValueError, match=r"feature dimension 3; got shape \(4, 5\)"):
        probes.predict_linear_probe(probe, np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"same feature dimension"):
        probes.linear_probe_accuracy(_X, _Y, np.ones((4, 5), np.float32), _Y[:4], num_classes=2)
    with pytest.raises(ValueError, match=r"test_labels must have shape \(4,\)"):
        probes.linear_probe_accuracy(_X, _Y, _X[:4], _Y[:5], num_classes=2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(query=np.ones((5, 4), np.float32)), ValueError, r"same feature dimension"),
        (dict(query=np.ones((5,), np.float32)), ValueError, r"query_features must have rank 2"),
        (dict(labels=_Y[:5]), ValueError, r"train_labels must have shape \(20,\)"),
        (dict(labels=_Y + 3), ValueError, r"\[0, 2\); got values in \[3, 4\]"),
        (dict(k=21), ValueError, r"k must be <= the number of train rows N_train = 20; got k = 21"),
        (dict(k=0), ValueError, r"k must be an integer >= 1"),
        (dict(temperature=0.0), ValueError, r"temperature must be > 0"),
        (dict(chunk_size=0), ValueError, r"chunk_size must be an integer >= 1"),
        (dict(num_classes=True), ValueError, r"num_classes must be an integer >= 2"),
    ],
)
def test_knn_rejects_bad_input(kwargs, error, match):
    args = dict(query=_X[:5], labels=_Y, num_classes=2, k=3) | kwargs
    query, labels = args.pop("query"), args.pop("labels")
    with pytest.raises(error, match=match):
        probes.knn_predict(_X, labels, query, **args)


def test_knn_accuracy_rejects_bad_query_labels():
    with pytest.raises(ValueError, match=r"query_labels must have shape \(5,\)"):
        probes.knn_accuracy(_X, _Y, _X[:5], _Y[:4], num_classes=2, k=3)
