"""Losses against float64 loop references, gradients, robustness and input errors.

The theory facts of docs/spec.md live in tests/test_theory.py; sharded and tiled
evaluation in tests/test_sharding.py.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import dhel_jax
from dhel_jax import losses
from tests import np_reference as ref

# (loss name, hyper-parameters): every loss, every kernel, both variants of the switches.
CASES = [
    ("info_nce", {}),
    ("info_nce", {"symmetric": True, "tau": 0.2}),
    ("simclr", {}),
    ("simclr", {"symmetric": False}),
    ("dcl", {}),
    ("dcl", {"symmetric": False, "tau": 0.3}),
    ("dclw", {}),
    ("dclw", {"sigma": 1.0, "tau": 0.2}),
    ("dhel", {}),
    ("dhel", {"include_augs": False, "tau": 0.1}),
    ("kcl", {}),
    ("kcl", {"kernel": "log", "t": 1.0, "gamma": 4.0}),
    ("kcl", {"kernel": "imq", "t": 2.0}),
    ("kcl", {"kernel": "riesz", "t": -1.0}),
    ("kcl", {"kernel": "gaussian_riesz", "t": 1.0, "gamma": 1.0}),
    ("kcl", {"kernel": "gaussian_riesz", "t": -0.5}),
    ("align_uniform", {}),
    ("align_uniform", {"alpha": 1.0, "t": 3.0, "lam": 0.5}),
]
SHAPES = [(2, 2), (3, 2), (7, 3), (16, 8), (33, 16)]


def _ids(case):
    name, hp = case
    return name + "".join(f"-{k}={v}" for k, v in hp.items())


def _views(rng, m, d, noise=0.5):
    z1 = rng.normal(size=(m, d))
    z2 = z1 + noise * rng.normal(size=(m, d))
    return z1, z2


def _rel_err(ours, expected):
    return abs(float(ours) - expected) / max(abs(expected), 1.0)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("m,d", SHAPES)
def test_matches_float64_reference(case, m, d, rng):
    name, hp = case
    z1, z2 = _views(rng, m, d)
    expected = ref.LOSSES[name](z1, z2, **hp)
    out = losses.get_loss(name, **hp)(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32))
    chex.assert_shape(out, ())
    chex.assert_type(out, jnp.float32)
    assert _rel_err(out, expected) <= 1e-5, (name, hp, float(out), expected)


@pytest.mark.parametrize("tau", [0.05, 0.01])
@pytest.mark.parametrize("name", ["info_nce", "simclr", "dcl", "dclw", "dhel"])
def test_small_temperature_matches_reference(name, tau, rng):
    z1, z2 = _views(rng, 24, 8, noise=0.3)
    expected = ref.LOSSES[name](z1, z2, tau=tau)
    out = losses.get_loss(name, tau=tau)(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32))
    assert _rel_err(out, expected) <= 1e-5, (name, tau, float(out), expected)


def test_published_exp_then_divide_form_overflows_where_ours_does_not(rng):
    """The exp-of-raw-logits form (Lightning-bolts #811) overflows float32 at tau = 0.01."""
    z1, z2 = _views(rng, 16, 8, noise=0.05)
    u = ref.normalize(z1).astype(np.float32)
    with np.errstate(over="ignore"):
        naive = np.exp(u @ u.T / np.float32(0.01))
    assert not np.all(np.isfinite(naive))
    loss, grads = jax.value_and_grad(dhel_jax.dhel, argnums=(0, 1))(
        jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), tau=0.01
    )
    assert np.isfinite(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert _rel_err(loss, ref.dhel(z1, z2, tau=0.01)) <= 1e-5


# ----------------------------------------------------------------------------- aux


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "kcl" or c[1] == {}], ids=_ids)
def test_aux_terms_sum_to_loss(case, rng):
    name, hp = case
    z1, z2 = _views(rng, 12, 6)
    loss, aux = losses.get_loss(name, return_aux=True, **hp)(jnp.asarray(z1), jnp.asarray(z2))
    assert {"alignment", "energy"} <= set(aux)
    np.testing.assert_allclose(
        float(aux["alignment"] + aux["energy"]), float(loss), rtol=1e-6, atol=1e-6
    )
    for value in aux.values():
        chex.assert_shape(value, ())


def test_aux_terms_against_reference(rng):
    z1, z2 = _views(rng, 10, 4)
    u, v = ref.normalize(z1), ref.normalize(z2)
    _, aux = dhel_jax.dhel(jnp.asarray(z1), jnp.asarray(z2), tau=0.3, return_aux=True)
    np.testing.assert_allclose(float(aux["alignment"]), -np.mean(np.sum(u * v, 1)) / 0.3, rtol=1e-5)
    np.testing.assert_allclose(
        float(aux["energy_u"]),
        ref.dhel(z1, z2, include_augs=False) + np.mean(np.sum(u * v, 1)) / 0.3,
        rtol=1e-5,
    )
    _, aux = dhel_jax.kcl(jnp.asarray(z1), jnp.asarray(z2), return_aux=True)
    np.testing.assert_allclose(
        float(aux["alignment"]), -2 * np.mean(np.exp(-2 * np.sum((u - v) ** 2, 1))), rtol=1e-5
    )
    # E(u) for the Gaussian kernel with t = 2 is exp(uniformity(u, t=2)).
    np.testing.assert_allclose(float(aux["energy_u"]), np.exp(ref.uniformity(z1, t=2.0)), rtol=1e-5)


@pytest.mark.parametrize("name", ["info_nce", "simclr", "dcl", "dclw", "dhel"])
def test_contrastive_accuracy_against_reference(name, rng):
    z1, z2 = _views(rng, 20, 5, noise=0.8)  # noisy enough that accuracy is strictly between 0 and 1
    _, aux = losses.get_loss(name, return_aux=True)(jnp.asarray(z1), jnp.asarray(z2))
    kind = {"simclr": "nt_xent", "dcl": "nt_xent", "dclw": "nt_xent"}.get(name, name)
    expected = ref.nt_xent_accuracy(z1, z2, kind)
    assert 0.0 < expected < 1.0
    np.testing.assert_allclose(float(aux["accuracy"]), expected, atol=1e-6)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gradients_match_finite_differences(case, rng):
    name, hp = case
    z1, z2 = _views(rng, 5, 3)
    with jax.enable_x64(True):
        fn = losses.get_loss(name, **hp)
        check_grads(
            fn,
            (jnp.asarray(z1), jnp.asarray(z2)),
            order=1,
            modes=("rev",),
            eps=1e-6,
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("name", ["simclr", "dhel", "kcl"])
def test_gradient_with_respect_to_temperature(name, rng):
    """Hyper-parameters are ordinary arrays: a learnable temperature gets its gradient."""
    z1, z2 = _views(rng, 6, 3)
    key = "t" if name == "kcl" else "tau"
    with jax.enable_x64(True):
        fn = lambda p: losses.LOSSES[name](jnp.asarray(z1), jnp.asarray(z2), **{key: p})
        check_grads(
            fn, (jnp.asarray(0.7),), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6
        )


# ----------------------------------------------------------------------------- robustness


ALL_DEFAULTS = [(name, {}) for name in losses.LOSSES] + [
    ("kcl", {"kernel": k, "t": t})
    for k, t in [("log", 1.0), ("imq", 2.0), ("riesz", -1.0), ("gaussian_riesz", 1.0)]
]


def _finite_value_and_grads(fn, z1, z2):
    loss, grads = jax.value_and_grad(fn, argnums=(0, 1))(z1, z2)
    assert bool(jnp.isfinite(loss)), float(loss)
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g)))
    return loss, grads


@pytest.mark.parametrize("case", ALL_DEFAULTS, ids=_ids)
def test_zero_row_is_finite(case, rng):
    name, hp = case
    z1, z2 = _views(rng, 8, 4)
    z1[3] = 0.0
    loss, _ = _finite_value_and_grads(
        losses.get_loss(name, **hp), jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32)
    )
    assert _rel_err(loss, ref.LOSSES[name](z1, z2, **hp)) <= 1e-5


@pytest.mark.parametrize("case", ALL_DEFAULTS, ids=_ids)
def test_large_norm_rows_are_scale_invariant(case, rng):
    name, hp = case
    z1, z2 = _views(rng, 8, 4)
    fn = losses.get_loss(name, **hp)
    small = fn(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32))
    big, _ = _finite_value_and_grads(
        fn, jnp.asarray(z1 * 1e4, jnp.float32), jnp.asarray(z2 * 1e4, jnp.float32)
    )
    np.testing.assert_allclose(float(big), float(small), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ALL_DEFAULTS, ids=_ids)
def test_bfloat16_inputs(case, rng):
    name, hp = case
    z1, z2 = _views(rng, 16, 8)
    fn = losses.get_loss(name, **hp)
    z1b, z2b = jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16)
    loss, grads = _finite_value_and_grads(fn, z1b, z2b)
    chex.assert_type(loss, jnp.float32)
    chex.assert_type(grads, jnp.bfloat16)
    # bf16 has an 8-bit mantissa: compare with the float64 loss of the same (rounded) inputs.
    expected = ref.LOSSES[name](np.asarray(z1b, np.float64), np.asarray(z2b, np.float64), **hp)
    assert _rel_err(loss, expected) <= 3e-2


@pytest.mark.parametrize("name", ["info_nce", "simclr", "dcl", "dclw", "dhel"])
def test_tiny_temperature_gradients_are_finite_in_bfloat16(name, rng):
    z1, z2 = _views(rng, 16, 8, noise=0.1)
    fn = losses.get_loss(name, tau=0.01)
    _finite_value_and_grads(fn, jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16))


def test_losses_compose_with_jit_and_vmap(rng):
    z1, z2 = _views(rng, 6, 3)
    batched1 = jnp.stack([jnp.asarray(z1, jnp.float32)] * 3)
    batched2 = jnp.stack([jnp.asarray(z2, jnp.float32)] * 3)
    for name, fn in losses.LOSSES.items():
        out = jax.jit(jax.vmap(fn))(batched1, batched2)
        chex.assert_shape(out, (3,))
        np.testing.assert_allclose(np.asarray(out), ref.LOSSES[name](z1, z2), rtol=1e-5)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_shape_errors(name):
    fn = losses.LOSSES[name]
    with pytest.raises(ValueError, match=r"rank 2.*\(4, 3, 2\)"):
        fn(jnp.zeros((4, 3, 2)), jnp.zeros((4, 3, 2)))
    with pytest.raises(ValueError, match=r"same shape.*\(4, 3\).*\(5, 3\)"):
        fn(jnp.zeros((4, 3)), jnp.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"M >= 2.*M = 1"):
        fn(jnp.ones((1, 3)), jnp.ones((1, 3)))
    with pytest.raises(TypeError, match="floating dtype.*int32"):
        fn(jnp.ones((4, 3), jnp.int32), jnp.ones((4, 3), jnp.int32))


def test_hyperparameter_errors():
    with pytest.raises(ValueError, match=r"unknown kernel 'rbf'.*'gaussian'.*'gaussian_riesz'"):
        dhel_jax.kcl(jnp.ones((4, 3)), jnp.ones((4, 3)), kernel="rbf")
    with pytest.raises(ValueError, match=r"riesz.*t = 1\.0.*gaussian_riesz"):
        dhel_jax.kcl(jnp.ones((4, 3)), jnp.ones((4, 3)), kernel="riesz", t=1.0)
    with pytest.raises(ValueError, match=r"gaussian_riesz.*t != 0"):
        dhel_jax.get_loss("kcl", kernel="gaussian_riesz", t=0.0)
    with pytest.raises(ValueError, match=r"'gaussian' needs t > 0; got t = -1"):
        dhel_jax.get_loss("kcl", t=-1.0)
    with pytest.raises(ValueError, match=r"tau must be > 0; got tau = 0"):
        dhel_jax.dhel(jnp.ones((4, 3)), jnp.ones((4, 3)), tau=0.0)
    with pytest.raises(ValueError, match=r"unknown loss 'ntxent'.*'simclr'"):
        dhel_jax.get_loss("ntxent")
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) 'temperature'.*'tau'"):
        dhel_jax.get_loss("dhel", temperature=0.3)
    with pytest.raises(ValueError, match=r"block_size.*positive integer; got 0"):
        dhel_jax.dhel(jnp.ones((4, 3)), jnp.ones((4, 3)), block_size=0)


def test_errors_raise_at_trace_time():
    """Shape errors surface while tracing, before any compute runs."""
    traced = jax.jit(dhel_jax.simclr)
    with pytest.raises(ValueError, match="same shape"):
        traced.lower(
            jax.ShapeDtypeStruct((8, 4), jnp.float32), jax.ShapeDtypeStruct((8, 5), jnp.float32)
        )


def test_loss_hyperparameters_are_spec_defaults():
    expected = {
        "info_nce": {"tau": 0.1},
        "simclr": {"tau": 0.5},
        "dcl": {"tau": 0.1},
        "dclw": {"tau": 0.1, "sigma": 0.5},
        "dhel": {"tau": 0.3, "include_augs": True},
        "kcl": {"kernel": "gaussian", "t": 2.0, "gamma": 16.0},
        "align_uniform": {"alpha": 2.0, "t": 2.0, "lam": 1.0},
    }
    for name, defaults in expected.items():
        got = losses.loss_hyperparameters(name)
        assert {k: got[k] for k in defaults} == defaults, name
