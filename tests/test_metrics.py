"""Metrics against float64 NumPy/SciPy references written from docs/spec.md, plus properties and
errors.

The references below import nothing from dhel_jax: explicit loops or full matrices, and for the
Wasserstein uniformity an exact piecewise integration of |F_emp - F_d| built on
``scipy.special.betainc`` (itself checked against ``scipy.integrate.quad``), closed forms for
M = 2, and the published implementation's sampling estimator.
"""

from __future__ import annotations

import math
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from dhel_jax import metrics
from tests.np_reference import effective_rank as ref_effective_rank
from tests.np_reference import hyperspherical_energy as ref_energy
from tests.np_reference import rank as ref_rank
from tests.np_reference import sorted_pair_cosines as _sorted_pairs
from tests.np_reference import wasserstein_uniformity as ref_wasserstein

SHAPES = [(2, 2), (3, 2), (7, 3), (24, 8), (64, 128)]


# ----------------------------------------------------------------------------- references


def _normalize(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ref_alignment(x, y, alpha=2.0) -> float:
    u, v = _normalize(x), _normalize(y)
    return float(np.mean([np.linalg.norm(u[i] - v[i]) ** alpha for i in range(len(u))]))


def ref_uniformity(x, t=2.0) -> float:
    u = _normalize(x)
    m = len(u)
    vals = [np.exp(-t * np.sum((u[i] - u[j]) ** 2)) for i in range(m) for j in range(i + 1, m)]
    return float(np.log(np.mean(vals)))


def _sphere_cdf(t, d):
    """F_d: (1 + s)/2 ~ Beta((d-1)/2, (d-1)/2)."""
    a = (d - 1) / 2
    return scipy.special.betainc(a, a, np.clip((1 + t) / 2, 0.0, 1.0))


def ref_wasserstein_quad(x) -> float:
    """The same integral by adaptive quadrature (scipy.integrate.quad), for small inputs."""
    s = _sorted_pairs(x)
    n_pairs, d = len(s), np.shape(x)[1]
    a = (d - 1) / 2
    knots = np.concatenate([[-1.0], s, [1.0]])
    total = 0.0
    for k in range(n_pairs + 1):
        level = k / n_pairs
        quantile = 2 * scipy.special.betaincinv(a, a, level) - 1
        cross = float(np.clip(quantile, knots[k], knots[k + 1]))
        for lo, hi in ((knots[k], cross), (cross, knots[k + 1])):
            total += scipy.integrate.quad(
                lambda t, lv=level: abs(lv - _sphere_cdf(t, d)), lo, hi, epsabs=1e-14, limit=200
            )[0]
    return total


# ----------------------------------------------------------------------------- helpers


def _rel_err(ours, expected) -> float:
    return abs(float(ours) - expected) / abs(expected)


def _spread_points(rng, m, d, min_dist=0.25):
    """Gaussian rows whose normalised pairwise distances are >= min_dist.

    float32 energies come from r^2 = 2 - 2 u.v, whose absolute error ~1e-7 is
    amplified by 1/r^2 for close points; spread inputs keep the 1e-5 check
    about the formula (the float64 checks take arbitrary inputs).
    """
    for _ in range(1000):
        x = rng.normal(size=(m, d))
        u = _normalize(x)
        r = np.linalg.norm(u[:, None] - u[None], axis=-1) + 10 * np.eye(m)
        if r.min() >= min_dist:
            return x
    raise AssertionError("no spread configuration found")


def _sphere(rng, m, d):
    return _normalize(rng.normal(size=(m, d)))


def _low_rank(rng, m, d, r):
    return rng.normal(size=(m, r)) @ rng.normal(size=(r, d))


def _anisotropic(rng, m, d, decay=0.97):
    """Full-rank Gaussian with a geometrically decaying spectrum (effective dimension ~30)."""
    return rng.normal(size=(m, d)) * decay ** np.arange(d)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("m,d", SHAPES)
def test_alignment_uniformity_match_reference(rng, m, d):
    x = rng.normal(size=(m, d))
    y = x + 0.5 * rng.normal(size=(m, d))
    xf, yf = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    for alpha in (2.0, 1.5):
        assert _rel_err(metrics.alignment(xf, yf, alpha=alpha), ref_alignment(x, y, alpha)) < 1e-5
    for t in (2.0, 8.0):
        assert _rel_err(metrics.uniformity(xf, t=t), ref_uniformity(x, t)) < 1e-5


@pytest.mark.parametrize("m,d", SHAPES)
def test_effective_rank_and_rank_match_reference(rng, m, d):
    for r in sorted({1, min(3, d), d}):
        x = _low_rank(rng, m, d, r) if r < d else rng.normal(size=(m, d))
        xf = jnp.asarray(x, jnp.float32)
        for normalize in (True, False):
            expected = ref_effective_rank(x, normalize)
            assert _rel_err(metrics.effective_rank(xf, normalize=normalize), expected) < 1e-5
            assert int(metrics.rank(xf, normalize=normalize)) == ref_rank(x, normalize=normalize)
        # Rows in an r-dimensional subspace: the expected rank is not trivially d or 0.
        assert ref_rank(x) == min(r, m - 1) or r == 1


def test_effective_rank_closed_forms():
    # d orthonormal rows: d equal singular values, p = 1/d + 1e-7.
    for d in (3, 32):
        p = 1 / d + 1e-7
        expected = math.exp(-d * p * math.log(p))
        got = metrics.effective_rank(jnp.eye(d, dtype=jnp.float32) * 3.0)
        assert _rel_err(got, expected) < 1e-5
    # One direction repeated: a single nonzero singular value out of min(M, d) = 5.
    x = jnp.tile(jnp.arange(1.0, 9.0)[None], (5, 1))
    p, q = 1 + 1e-7, 1e-7
    expected = math.exp(-(p * math.log(p) + 4 * q * math.log(q)))
    assert _rel_err(metrics.effective_rank(x), expected) < 1e-5


@pytest.mark.parametrize("m,d", SHAPES)
def test_hyperspherical_energy_matches_reference(rng, m, d):
    x = jnp.asarray(_spread_points(rng, m, d), jnp.float32)
    for s in (0, 0.5, 1.0, 2.0):
        expected = ref_energy(np.asarray(x, np.float64), s)
        assert _rel_err(metrics.hyperspherical_energy(x, s=s), expected) < 1e-5


def test_tiled_and_float64_energies_match_reference(rng):
    x = _spread_points(rng, 13, 5)
    for s in (0, 1.5):
        energy = jax.jit(partial(metrics.hyperspherical_energy, s=s, block_size=4))
        assert _rel_err(energy(jnp.asarray(x, jnp.float32)), ref_energy(x, s)) < 1e-5
    unif = jax.jit(partial(metrics.uniformity, t=3.0, block_size=4))
    assert _rel_err(unif(jnp.asarray(x, jnp.float32)), ref_uniformity(x, 3.0)) < 1e-5
    with jax.enable_x64(True):
        for m, d in [(2, 2), (40, 2)]:  # arbitrary, possibly close points
            x = rng.normal(size=(m, d))
            for s in (0, 2.0):
                got = metrics.hyperspherical_energy(jnp.asarray(x), s=s)
                assert _rel_err(got, ref_energy(x, s)) < 1e-10


def test_energy_closed_form_simplex():
    # Regular simplex of M = 5 points: every distance is sqrt(2 M / (M - 1)).
    m = 5
    x = np.eye(m) - 1 / m
    r = math.sqrt(2 * m / (m - 1))
    for s in (0, 1.0, 3.0):
        expected = -math.log(r) if s == 0 else r ** (-s)
        got = metrics.hyperspherical_energy(jnp.asarray(x, jnp.float32), s=s)
        assert abs(float(got) - expected) < 1e-6 * max(1.0, abs(expected))


def test_wasserstein_reference_agrees_with_adaptive_quadrature(rng):
    for m, d in [(2, 2), (4, 2), (5, 3), (5, 8), (4, 128)]:
        x = rng.normal(size=(m, d))
        assert abs(ref_wasserstein(x) - ref_wasserstein_quad(x)) < 1e-10


# One jitted function: each input shape compiles once across the tests below.
_w1 = jax.jit(metrics.wasserstein_uniformity, static_argnames=("num_bins",))


@pytest.mark.parametrize("m,d", [(3, 2), (60, 2), (50, 3), (150, 128)])
def test_wasserstein_uniformity_matches_reference(rng, m, d):
    x = rng.normal(size=(m, d))
    expected = ref_wasserstein(x)
    # Float32 pair values carry ~1e-7 round-off; the binning error is far below it.
    assert abs(float(_w1(jnp.asarray(x, jnp.float32))) - expected) < 2e-6


@pytest.mark.parametrize("m,d", [(200, 8), (40, 1024)])
def test_wasserstein_uniformity_float64_matches_reference(rng, m, d):
    x = rng.normal(size=(m, d))
    with jax.enable_x64(True):
        got = _w1(jnp.asarray(x))
    assert abs(float(got) - ref_wasserstein(x)) < 2e-8


def test_wasserstein_uniformity_two_points_closed_forms():
    # M = 2: W1 = E|S - c| for the single pair value c. d = 2: S = cos(uniform angle);
    # d = 3: S ~ Uniform[-1, 1] (Archimedes).
    for c in (-1.0, -0.9999, -0.6, 0.0, 0.35, 0.99, 1.0):
        th = math.acos(c)
        e2 = 2 / math.pi * (math.sqrt(max(1 - c * c, 0.0)) + c * math.asin(c))
        e3 = (1 + c * c) / 2
        x2 = jnp.asarray([[1.0, 0.0], [math.cos(th), math.sin(th)]], jnp.float32)
        x3 = jnp.asarray([[0.0, 2.0, 0.0], [0.0, 2 * math.cos(th), 2 * math.sin(th)]], jnp.float32)
        assert abs(float(_w1(x2)) - e2) < 1e-6, c
        assert abs(float(_w1(x3)) - e3) < 1e-6, c


def test_wasserstein_uniformity_tiny_bins_within_documented_bound(rng):
    # Error <= 2 (max - min) / num_bins, and it shrinks as the bins get finer.
    x = rng.normal(size=(80, 8))
    expected = ref_wasserstein(x)
    s = _sorted_pairs(x)
    with jax.enable_x64(True):
        errors = []
        for num_bins in (8, 1024):
            got = _w1(jnp.asarray(x), num_bins=num_bins)
            errors.append(abs(float(got) - expected))
            assert errors[-1] <= 2 * (s[-1] - s[0]) / num_bins
    assert errors[0] > errors[1]


# ----------------------------------------------------------------------------- W1 behaviour


def test_wasserstein_uniformity_small_and_decreasing_for_uniform_samples():
    values = []
    for m in (40, 160, 640):
        per_seed = [
            float(_w1(jnp.asarray(_sphere(np.random.default_rng(seed), m, 16), jnp.float32)))
            for seed in range(2)
        ]
        values.append(np.mean(per_seed))
    assert values[0] > values[1] > values[2]
    assert values[2] < 5e-3


def test_wasserstein_uniformity_orders_uniform_anisotropic_collapsed(rng):
    m, d = 300, 128
    uniform = float(_w1(jnp.asarray(_sphere(rng, m, d), jnp.float32)))
    aniso = float(_w1(jnp.asarray(_anisotropic(rng, m, d), jnp.float32)))
    collapsed = [
        float(_w1(jnp.asarray(_low_rank(rng, m, d, r), jnp.float32))) for r in (1, 2, 4, 8)
    ]
    assert uniform < 5e-3
    assert uniform < aniso < min(collapsed)
    assert min(collapsed) > 0.1
    # Lower rank, worse uniformity.
    assert collapsed == sorted(collapsed, reverse=True)


@pytest.mark.parametrize("kind", ["sphere", "anisotropic", "rank8"])
def test_wasserstein_uniformity_agrees_with_published_sampling_estimator(kind):
    # The published implementation: scipy.stats.wasserstein_distance of the pair values against
    # samples of u.v on the sphere of R^128. 4e5 samples from the Beta law put its noise ~1e-4.
    rng = np.random.default_rng(7)
    m, d = 300, 128
    x = {
        "sphere": lambda: _sphere(rng, m, d),
        "anisotropic": lambda: _anisotropic(rng, m, d),
        "rank8": lambda: _low_rank(rng, m, d, 8),
    }[kind]()
    a = (d - 1) / 2
    samples = 2 * rng.beta(a, a, size=400_000) - 1
    estimate = scipy.stats.wasserstein_distance(_sorted_pairs(x), samples)
    got = float(_w1(jnp.asarray(x, jnp.float32)))
    assert abs(got - estimate) < 5e-4  # observed <= 1.2e-4; 10k samples would give ~1e-3


def test_wasserstein_uniformity_subsampled_pairs(rng):
    x = jnp.asarray(_anisotropic(rng, 200, 16, decay=0.8), jnp.float32)
    exact = float(_w1(x))
    f = jax.jit(partial(metrics.wasserstein_uniformity, num_pairs=100_000))
    a = float(f(x, key=jax.random.key(0)))
    assert float(f(x, key=jax.random.key(0))) == a  # deterministic given the key
    assert float(f(x, key=jax.random.key(1))) != a
    assert abs(a - exact) < 3e-3
    assert exact > 0.05  # so that 3e-3 is a meaningful tolerance


def test_wasserstein_uniformity_block_size_matches_dense(rng):
    x = jnp.asarray(rng.normal(size=(37, 6)), jnp.float32)
    f = jax.jit(metrics.wasserstein_uniformity, static_argnames=("block_size",))
    dense = float(f(x))
    for block in (5,):
        assert abs(float(f(x, block_size=block)) - dense) < 1e-7


# ----------------------------------------------------------------------------- gradients


def test_gradients_match_finite_differences(rng):
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(6, 4)))
        y = jnp.asarray(rng.normal(size=(6, 4)))
        kw = {"order": 1, "modes": ("rev",), "eps": 1e-6, "atol": 1e-6, "rtol": 1e-6}
        check_grads(jax.jit(partial(metrics.alignment, alpha=1.5)), (x, y), **kw)
        for block in (None, 4):
            check_grads(jax.jit(partial(metrics.uniformity, t=2.0, block_size=block)), (x,), **kw)
        for s, block in ((0, None), (2.5, 4)):
            energy = partial(metrics.hyperspherical_energy, s=s, block_size=block)
            check_grads(jax.jit(energy), (x,), **kw)


# ----------------------------------------------------------------------------- jit, dtypes


# name -> (metric, float64 reference)
ALL_METRICS = {
    "alignment": (lambda x: metrics.alignment(x, x[::-1]), lambda x: ref_alignment(x, x[::-1])),
    "uniformity": (metrics.uniformity, ref_uniformity),
    "effective_rank": (metrics.effective_rank, ref_effective_rank),
    "hyperspherical_energy": (
        partial(metrics.hyperspherical_energy, s=1.0),
        partial(ref_energy, s=1.0),
    ),
    "log_energy": (partial(metrics.hyperspherical_energy, s=0), partial(ref_energy, s=0)),
    "wasserstein_uniformity": (
        partial(metrics.wasserstein_uniformity, num_bins=4096),
        ref_wasserstein,
    ),
}


@pytest.mark.parametrize("name", sorted(ALL_METRICS))
def test_jit_shapes_and_dtypes(rng, name):
    fn, reference = ALL_METRICS[name]
    x = rng.normal(size=(12, 8))
    jitted = jax.jit(fn)
    out32, out16 = jitted(jnp.asarray(x, jnp.float32)), jitted(jnp.asarray(x, jnp.bfloat16))
    chex.assert_shape([out32, out16], ())
    chex.assert_type([out32, out16], jnp.float32)
    assert _rel_err(out32, reference(x)) < 1e-5
    # bfloat16 inputs only lose their own rounding (~4e-3 relative per entry).
    chex.assert_trees_all_close(out16, out32, rtol=5e-2, atol=5e-3)


def test_rank_jit_and_dtype(rng):
    x = jnp.asarray(_low_rank(rng, 12, 8, 3), jnp.float32)
    out = jax.jit(metrics.rank)(x)
    chex.assert_shape(out, ())
    chex.assert_type(out, jnp.int32)
    assert int(out) == 3


def test_metrics_accept_explicitly_sharded_inputs(rng, eight_devices):
    # jax.make_mesh gives Explicit axes: the (M, M) products and the SVD need replicated rows.
    mesh = jax.make_mesh((8,), ("batch",))
    x = rng.normal(size=(16, 8))
    xs = jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, P("batch")))
    for name in ("uniformity", "effective_rank", "hyperspherical_energy", "wasserstein_uniformity"):
        fn, reference = ALL_METRICS[name]
        assert _rel_err(jax.jit(fn)(xs), reference(x)) < 1e-5, name
    assert int(jax.jit(metrics.rank)(xs)) == ref_rank(x)


# ----------------------------------------------------------------------------- sharding


SHARDED = {
    "effective_rank": metrics.effective_rank,
    "rank": metrics.rank,
    "wasserstein": partial(metrics.wasserstein_uniformity, num_bins=4096),
    "wasserstein_tiled": partial(metrics.wasserstein_uniformity, num_bins=4096, block_size=2),
    # Same key on every device and on one device: the same pairs.
    "wasserstein_sampled": partial(
        metrics.wasserstein_uniformity, num_bins=4096, num_pairs=500, key=jax.random.key(3)
    ),
}


@pytest.mark.parametrize("name", sorted(SHARDED))
def test_sharded_equals_single_device(rng, eight_devices, name):
    fn = SHARDED[name]
    mesh = jax.make_mesh((8,), ("batch",))
    x = jnp.asarray(rng.normal(size=(24, 8)), jnp.float32)
    sharded = jax.jit(
        jax.shard_map(partial(fn, axis_name="batch"), mesh=mesh, in_specs=P("batch"), out_specs=P())
    )
    got = sharded(jax.device_put(x, NamedSharding(mesh, P("batch"))))
    chex.assert_trees_all_close(got, fn(x), rtol=1e-5, atol=1e-7)


def test_sharded_energy_gradient_equals_single_device(rng, eight_devices):
    mesh = jax.make_mesh((8,), ("batch",))
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    local = partial(metrics.hyperspherical_energy, s=1.0, axis_name="batch")
    sharded = jax.shard_map(local, mesh=mesh, in_specs=P("batch"), out_specs=P())
    g_sharded = jax.jit(jax.grad(sharded))(jax.device_put(x, NamedSharding(mesh, P("batch"))))
    g_single = jax.grad(partial(metrics.hyperspherical_energy, s=1.0))(x)
    chex.assert_trees_all_close(g_sharded, g_single, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call,exc,needle",
    [
        (lambda: metrics.alignment(jnp.ones(4), jnp.ones(4)), ValueError, "(4,)"),
        (lambda: metrics.alignment(jnp.ones((3, 2)), jnp.ones((4, 2))), ValueError, "(4, 2)"),
        (
            lambda: metrics.alignment(jnp.ones((3, 2)), jnp.ones((3, 2)), alpha=0),
            ValueError,
            "alpha = 0",
        ),
        (lambda: metrics.uniformity(jnp.ones((1, 3))), ValueError, "M = 1"),
        (lambda: metrics.uniformity(jnp.ones((3, 3)), t=-1.0), ValueError, "t = -1.0"),
        (lambda: metrics.effective_rank(jnp.ones((2, 3, 4))), ValueError, "(2, 3, 4)"),
        (lambda: metrics.effective_rank(jnp.ones((1, 3))), ValueError, "M = 1"),
        (lambda: metrics.effective_rank(jnp.ones((3, 3), jnp.int32)), TypeError, "int32"),
        (lambda: metrics.rank(jnp.ones((1, 3))), ValueError, "M = 1"),
        (lambda: metrics.rank(jnp.ones((3, 3)), tol=0.0), ValueError, "tol = 0.0"),
        (lambda: metrics.hyperspherical_energy(jnp.ones((3, 3)), s=-1.0), ValueError, "s = -1.0"),
        (lambda: metrics.hyperspherical_energy(jnp.ones((1, 3)), s=1.0), ValueError, "M = 1"),
        (
            lambda: metrics.hyperspherical_energy(jnp.ones((3, 3)), s=1.0, block_size=0),
            ValueError,
            "block_size",
        ),
        (lambda: metrics.wasserstein_uniformity(jnp.ones(5)), ValueError, "(5,)"),
        (lambda: metrics.wasserstein_uniformity(jnp.ones((1, 3))), ValueError, "M = 1"),
        (lambda: metrics.wasserstein_uniformity(jnp.ones((4, 1))), ValueError, "(4, 1)"),
        (
            lambda: metrics.wasserstein_uniformity(jnp.ones((4, 3)), num_pairs=100),
            ValueError,
            "num_pairs = 100",
        ),
        (
            lambda: metrics.wasserstein_uniformity(jnp.ones((4, 3)), key=jax.random.key(0)),
            ValueError,
            "num_pairs = None",
        ),
        (
            lambda: metrics.wasserstein_uniformity(
                jnp.ones((4, 3)), num_pairs=0, key=jax.random.key(0)
            ),
            ValueError,
            "num_pairs = 0",
        ),
        (
            lambda: metrics.wasserstein_uniformity(jnp.ones((4, 3)), num_bins=0),
            ValueError,
            "num_bins = 0",
        ),
        (
            lambda: metrics.wasserstein_uniformity(
                jnp.ones((4, 3)), num_pairs=10, block_size=2, key=jax.random.key(0)
            ),
            ValueError,
            "block_size = 2",
        ),
        (lambda: metrics.wasserstein_uniformity(jnp.ones((70_000, 2))), ValueError, "num_pairs"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, exc, needle):
    with pytest.raises(exc) as info:
        call()
    assert needle in str(info.value)


def test_sphere_cosine_density_is_the_beta_law_and_integrates_to_one():
    s = np.linspace(-0.999, 0.999, 501)
    for d in (2, 3, 8, 64, 512):
        a = (d - 1) / 2
        want = 0.5 * scipy.stats.beta.pdf((1 + s) / 2, a, a)  # (1 + s) / 2 ~ Beta(a, a)
        np.testing.assert_allclose(metrics.sphere_cosine_density(s, d), want, rtol=1e-9, atol=1e-12)
        total, _ = scipy.integrate.quad(lambda t, d=d: metrics.sphere_cosine_density(t, d), -1, 1)
        assert total == pytest.approx(1.0, abs=1e-6)
    assert metrics.sphere_cosine_density(np.array([-1.5, 1.0, 2.0]), 5).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="d >= 2"):
        metrics.sphere_cosine_density(s, 1)


@pytest.mark.parametrize("block_size", [None, 64])
def test_pair_cosine_histogram_counts_every_pair_once(rng, block_size):
    x = rng.standard_normal((301, 5))
    edges = np.linspace(-1, 1, 41)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = u @ u.T
    want = np.histogram(sims[np.triu_indices(len(x), 1)], bins=edges)[0]
    got = np.asarray(
        metrics.pair_cosine_histogram(
            jnp.asarray(x, jnp.float32), num_bins=40, block_size=block_size
        )
    )
    chex.assert_type(got, jnp.int32)
    assert got.sum() == 301 * 300 // 2
    # float32 pair values may land in the neighbouring bin when within round-off of an edge.
    near_edge = np.min(np.abs(sims[np.triu_indices(len(x), 1)][:, None] - edges), axis=1) < 1e-5
    assert np.abs(got - want).sum() <= 2 * near_edge.sum()
