"""The kink guard of tests/kinks.py: it sees every ReLU input, and fails where float32
comparisons would be decided by round-off, and only there."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core

from dhel_jax import models
from tests.kinks import MARGIN, assert_clear_of_kinks, closest_kink, kink_gaps, model_apply_pair


def _net(x, w):
    return jnp.sum(jax.nn.relu(x @ w) * 2.0)


def test_gaps_are_the_relu_inputs_through_jit_and_custom_derivatives():
    x = np.array([[0.5, -3e-7, 0.0], [-2.0, 4e-3, 1.0]], np.float32)
    w = np.eye(3, dtype=np.float32)
    gaps, value = kink_gaps(jax.jit(_net), x, w)  # relu is a custom_jvp around a jit
    assert [g.primitive for g in gaps] == ["max"]
    assert gaps[0].where.startswith("test_kinks.py:")
    np.testing.assert_array_equal(gaps[0].diff, x)
    np.testing.assert_allclose(value, 2 * (0.5 + 4e-3 + 1.0), rtol=1e-6)


def test_kinks_it_cannot_measure_raise():
    with pytest.raises(NotImplementedError, match=r"'reduce_window_max'"):
        kink_gaps(lambda x: nn.max_pool(jax.nn.relu(x), (2, 2)), jnp.ones((1, 4, 4, 1)))
    with pytest.raises(NotImplementedError, match=r"'(scan|while)'"):
        kink_gaps(lambda x: jax.lax.fori_loop(0, 2, lambda i, y: jax.nn.relu(y - 1), x), 1.0)
    with pytest.raises(ValueError, match=r"no max/min"):
        kink_gaps(lambda x: x * 2, jnp.ones(3))


def test_a_sum_that_cancels_within_round_off_of_zero_fails_with_the_kink_named():
    # float32(0.1) + float32(0.2) - float32(0.3) is 7.5e-9 exactly; float32 arithmetic makes it
    # another number: the sign is round-off's to decide.
    x = np.array([[0.1, 0.2, -0.3]], np.float32)
    w = np.ones((3, 1), np.float32)
    kink = closest_kink(_net, _net, x, w)
    assert kink.distance == pytest.approx(7.450580596923828e-09, rel=1e-6)
    assert kink.round_off >= kink.distance  # float32 gives 0 here
    with pytest.raises(AssertionError, match=r"max input lies 7.5e-09 from its kink.*element"):
        assert_clear_of_kinks(_net, _net, x, w)


def test_a_small_input_computed_exactly_enough_passes_and_exact_ties_are_apart():
    # 1e-4 * 1e-3 is far below MARGIN, but its round-off is 1e-11 of it; 0 * 5 is an exact tie.
    x = np.array([[1e-4, 0.0, 3.0]], np.float32)
    w = np.diag(np.float32([1e-3, 5.0, 1.0]))
    kink = assert_clear_of_kinks(_net, _net, x, w)
    assert kink.distance == pytest.approx(1e-7, rel=1e-6)
    assert kink.distance < MARGIN
    assert kink.exact_ties == 1


def _matmul_dtypes(jaxpr) -> set[str]:
    found = {
        str(e.outvars[0].aval.dtype)
        for e in jaxpr.eqns
        if e.primitive.name in ("conv_general_dilated", "dot_general")
    }
    for sub in core.subjaxprs(jaxpr):
        found |= _matmul_dtypes(sub)
    return found


def test_the_model_pair_computes_in_float32_and_float64():
    model = models.get_model("resnet_tiny", head_hidden_dim=8, head_out_dim=4)
    variables = models.init_variables(model, jax.random.key(0), (8, 8, 1))
    images = np.zeros((4, 8, 8, 1), np.float32)
    apply32, apply64 = model_apply_pair(model, train=False)
    assert _matmul_dtypes(jax.make_jaxpr(apply32)(variables, images).jaxpr) == {"float32"}
    with jax.enable_x64(True):
        wide = jax.tree.map(lambda a: np.asarray(a, np.float64), (variables, images))
        assert _matmul_dtypes(jax.make_jaxpr(apply64)(*wide).jaxpr) == {"float64"}
