"""The four facts from the theory in docs/spec.md, each checked by a real optimisation or
Monte-Carlo experiment (not by inspecting the code).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dhel_jax import losses


def _dhel_paper(z1, z2):
    return losses.dhel(z1, z2, include_augs=False)


MINIMISED = {
    "simclr": losses.simclr,
    "dcl": losses.dcl,
    "dhel": losses.dhel,
    "dhel_paper": _dhel_paper,
    "kcl": losses.kcl,
}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 4))
@functools.partial(jax.vmap, in_axes=(None, None, None, 0, None))
def _lbfgs(fn, m, d, key, steps):
    """Minimises fn over free (unnormalised) embeddings with L-BFGS in float64, one run
    per key (vmapped)."""
    z = jax.random.normal(key, (2, m, d))
    objective = lambda z: fn(z[0], z[1])
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry, _):
        z, state = carry
        value, grad = value_and_grad(z, state=state)
        updates, state = opt.update(grad, state, z, value=value, grad=grad, value_fn=objective)
        return (optax.apply_updates(z, updates), state), value

    (z, _), values = jax.lax.scan(step, (z, opt.init(z)), None, length=steps)
    return z, values[-1]


def _best_of(fn, m, d, starts, steps=300):
    """Minimum over several random starts (KCL with gamma = 16 has local minima)."""
    z, values = _lbfgs(fn, m, d, jax.random.split(jax.random.PRNGKey(0), starts), steps)
    z = np.asarray(z[int(jnp.argmin(values))])
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    return unit(z[0]), unit(z[1])


@pytest.mark.parametrize("name", list(MINIMISED))
@pytest.mark.parametrize("m,d", [(3, 3), (4, 3), (5, 4)])
def test_simplex_minimiser_when_batch_fits_the_sphere(name, m, d):
    """Fact 1: for M <= d + 1 the minimiser is a perfectly aligned regular simplex."""
    with jax.enable_x64(True):
        u, v = _best_of(MINIMISED[name], m, d, starts=8 if name == "kcl" else 1)
    gram = u @ u.T
    off_diagonal = gram[~np.eye(m, dtype=bool)]
    np.testing.assert_allclose(off_diagonal, -1.0 / (m - 1), atol=1e-3)
    np.testing.assert_allclose(np.sum(u * v, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(u.sum(axis=0), 0.0, atol=1e-3)


@pytest.mark.parametrize("name", list(MINIMISED))
def test_cross_polytope_minimiser_at_twice_the_dimension(name):
    """Fact 2: for M = 2d the minimiser is the cross-polytope, perfectly aligned."""
    m, d = 6, 3
    with jax.enable_x64(True):
        u, v = _best_of(MINIMISED[name], m, d, starts=32 if name == "kcl" else 2)
    gram = u @ u.T
    off_diagonal = gram[~np.eye(m, dtype=bool)]
    assert np.all(np.minimum(np.abs(off_diagonal), np.abs(off_diagonal + 1.0)) < 1e-3), off_diagonal
    antipodes = np.sum(np.abs(gram + 1.0) < 1e-3, axis=1)
    np.testing.assert_array_equal(antipodes, np.ones(m))
    np.testing.assert_allclose(np.sum(u * v, axis=1), 1.0, atol=1e-3)


def _mean_loss_over_batches(fn, m, total_pairs=8192, d=8, seed=0):
    """Monte-Carlo mean (and standard error) of a loss over i.i.d. batches of M pairs."""
    repeats = max(16, total_pairs // m)

    def one(key):
        k1, k2 = jax.random.split(key)
        z1 = jax.random.normal(k1, (m, d))
        z2 = z1 + 0.6 * jax.random.normal(k2, (m, d))
        return fn(z1, z2)

    values = np.asarray(
        jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(seed + m), repeats))
    )
    return values.mean(), values.std(ddof=1) / np.sqrt(repeats)


BATCH_SIZES = (8, 32, 128, 512)


def test_kcl_expected_loss_does_not_depend_on_batch_size():
    """Fact 3a: KCL is a U-statistic; its mean over i.i.d. batches is flat in M."""
    stats = [_mean_loss_over_batches(losses.kcl, m) for m in BATCH_SIZES]
    means = np.array([s[0] for s in stats])
    errors = np.array([s[1] for s in stats])
    pooled = np.sum(means / errors**2) / np.sum(1 / errors**2)
    assert np.all(np.abs(means - pooled) <= 4 * errors), (means, errors)
    # Far flatter than log(M - 1), which changes by 4.3 over this range.
    assert np.ptp(means) < 0.1


@pytest.mark.parametrize(
    "name,fn,slope",
    [("simclr", losses.simclr, 1.0), ("dhel_paper", _dhel_paper, 1.0), ("dhel", losses.dhel, 2.0)],
)
def test_infonce_family_grows_like_log_batch_size(name, fn, slope):
    """Fact 3b: each LSE over M - 1 negatives adds about log(M - 1) to the expected loss
    (DHEL with include_augs=True has two such terms)."""
    means = np.array([_mean_loss_over_batches(fn, m)[0] for m in BATCH_SIZES])
    fitted = np.polyfit(np.log(np.array(BATCH_SIZES[1:]) - 1), means[1:], 1)[0]
    assert abs(fitted - slope) < 0.1 * slope, (name, fitted, means)


def test_dhel_positive_gradient_is_alignment_only(rng):
    """Fact 4: with include_augs=False, dL/dv_i = -(1/(M tau)) u_i, projected through the
    normalisation: dL/dz2_i = -(1/(M tau)) (I - v_i v_i^T) u_i / |z2_i|."""
    m, d, tau = 9, 5, 0.3
    z1 = rng.normal(size=(m, d))
    z2 = rng.normal(size=(m, d)) * rng.uniform(0.5, 2.0, size=(m, 1))
    with jax.enable_x64(True):
        grad_z2 = np.asarray(
            jax.grad(losses.dhel, argnums=1)(
                jnp.asarray(z1), jnp.asarray(z2), tau=tau, include_augs=False
            )
        )
        with_augs = np.asarray(
            jax.grad(losses.dhel, argnums=1)(jnp.asarray(z1), jnp.asarray(z2), tau=tau)
        )
    norms = np.linalg.norm(z2, axis=1, keepdims=True)
    u = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
    v = z2 / norms
    projected = u - np.sum(u * v, axis=1, keepdims=True) * v
    expected = -projected / (m * tau) / norms
    np.testing.assert_allclose(grad_z2, expected, rtol=1e-10, atol=1e-12)
    # The published default (energy of the positives included) is not decoupled.
    assert np.max(np.abs(with_augs - expected)) > 1e-2
