"""The kink guard of tests/kinks.py fails where float32 comparisons would be decided by
round-off, and only there."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core

from dhel_jax import models
from tests.kinks import assert_clear_of_kinks, float64_apply, kink_margin


def _net(x, w):
    return jnp.sum(jax.nn.relu(x @ w) * 2.0)


def test_the_margin_is_the_closest_relu_input_to_zero_and_exact_ties_are_apart():
    w = np.eye(3)
    x = np.array([[0.5, -3e-7, 0.0], [-2.0, 4e-3, 1.0]])
    with jax.enable_x64(True):
        kink, ties, value = kink_margin(_net, x, w)
    assert kink.margin == pytest.approx(3e-7, rel=1e-9)
    assert kink.index == (0, 1) and kink.shape == (2, 3)
    assert kink.where.startswith("test_kinks.py:")
    assert ties == 1
    np.testing.assert_allclose(value, 2 * (0.5 + 4e-3 + 1.0), rtol=1e-12)


def test_the_guard_names_the_kink_it_is_too_close_to():
    x, w = np.array([[0.5, -3e-7]], np.float32), np.eye(2, dtype=np.float32)
    with pytest.raises(AssertionError, match=r"max input lies 3e-07 from its kink .* element"):
        assert_clear_of_kinks(_net, x, w)
    kink = assert_clear_of_kinks(_net, np.array([[0.5, -3e-5]], np.float32), w)
    # Widened to float64 before measuring: float32's -3e-5 is not exactly -3e-5.
    assert kink.margin == float(np.float32(3e-5))


def test_kinks_it_cannot_measure_raise():
    with pytest.raises(NotImplementedError, match=r"'reduce_window_max'"):
        kink_margin(lambda x: nn.max_pool(jax.nn.relu(x), (2, 2)), jnp.ones((1, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"no max/min"):
        kink_margin(lambda x: x * 2, jnp.ones(3))


def _matmul_dtypes(jaxpr) -> set[str]:
    found = {
        str(e.outvars[0].aval.dtype)
        for e in jaxpr.eqns
        if e.primitive.name in ("conv_general_dilated", "dot_general")
    }
    for sub in core.subjaxprs(jaxpr):
        found |= _matmul_dtypes(sub)
    return found


def test_float64_apply_computes_the_model_in_float64():
    model = models.get_model("resnet_tiny", head_hidden_dim=8, head_out_dim=4)
    variables = models.init_variables(model, jax.random.key(0), (8, 8, 1))
    images = np.zeros((4, 8, 8, 1), np.float32)
    with jax.enable_x64(True):
        wide = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
        jaxpr = jax.make_jaxpr(float64_apply(model, train=False))(wide, images.astype(np.float64))
        assert _matmul_dtypes(jaxpr.jaxpr) == {"float64"}
        plain = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(wide, images)
        assert _matmul_dtypes(plain.jaxpr) == {"float32"}
