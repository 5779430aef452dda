"""Tests for dhel_jax.optimizers against float64 NumPy references of LARS, SGD and AdamW."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dhel_jax import models, optimizers

# Names a Flax model gives to parameters that must not be decayed or trust-ratio adapted.
NO_DECAY = ("bias", "scale")


def flax_like_params(rng):
    """A Flax-shaped parameter tree: conv and dense kernels, a bias, BatchNorm scale and bias,
    and a stray 1-D parameter with an unusual name (excluded for being 1-D)."""
    return {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 4))},
        "bn": {"scale": rng.uniform(0.5, 1.5, size=4), "bias": rng.normal(size=4)},
        "dense": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)},
        "temperature": {"log_value": rng.normal(size=5)},
    }


def is_decayed(path, leaf) -> bool:
    return path[-1] not in NO_DECAY and leaf.ndim > 1


def flat(tree, prefix=()):
    """{path tuple: leaf} for a nested dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def run_optax(opt, params, grads_seq):
    params = jax.tree.map(jnp.asarray, params)
    state = opt.init(params)
    history = []
    for grads in grads_seq:
        updates, state = opt.update(jax.tree.map(jnp.asarray, grads), state, params)
        params = optax.apply_updates(params, updates)
        history.append(flat(jax.tree.map(np.asarray, params)))
    return history


def lars_reference(params, grads_seq, lrs, *, wd, momentum, eta, nesterov=False):
    """LARS (You et al., 2017) as in SimCLR's TF implementation, float64, leaf by leaf.

    Kernels: g' = g + wd * w; local_lr = lr * eta * ||w|| / ||g'|| (lr if a norm is 0).
    Biases and BatchNorm (and any 1-D leaf): g' = g; local_lr = lr (plain momentum SGD).
    v <- momentum * v + local_lr * g';  w <- w - v  (Nesterov: w <- w - (local_lr g' + m v)).
    """
    w = {k: np.array(v, np.float64) for k, v in flat(params).items()}
    vel = {k: np.zeros_like(v) for k, v in w.items()}
    history = []
    for grads, lr in zip(grads_seq, lrs, strict=True):
        g_all = flat(grads)
        for k in w:
            g = np.array(g_all[k], np.float64)
            local_lr = lr
            if is_decayed(k, w[k]):
                g = g + wd * w[k]
                w_norm, g_norm = np.linalg.norm(w[k]), np.linalg.norm(g)
                if w_norm > 0 and g_norm > 0:
                    local_lr = lr * eta * w_norm / g_norm
            vel[k] = momentum * vel[k] + local_lr * g
            step = local_lr * g + momentum * vel[k] if nesterov else vel[k]
            w[k] = w[k] - step
        history.append({k: v.copy() for k, v in w.items()})
    return history


def sgd_reference(params, grads_seq, lrs, *, wd, momentum, nesterov=False):
    """torch.optim.SGD with L2 decay on kernels only: v <- m v + (g + wd w); w <- w - lr v."""
    w = {k: np.array(v, np.float64) for k, v in flat(params).items()}
    vel = {k: np.zeros_like(v) for k, v in w.items()}
    history = []
    for grads, lr in zip(grads_seq, lrs, strict=True):
        g_all = flat(grads)
        for k in w:
            g = np.array(g_all[k], np.float64)
            if is_decayed(k, w[k]):
                g = g + wd * w[k]
            vel[k] = momentum * vel[k] + g
            w[k] = w[k] - lr * (g + momentum * vel[k] if nesterov else vel[k])
        history.append({k: v.copy() for k, v in w.items()})
    return history


def adamw_reference(params, grads_seq, lrs, *, wd, b1, b2, eps):
    """AdamW (Loshchilov & Hutter): bias-corrected Adam step plus lr * wd * w on kernels only."""
    w = {k: np.array(v, np.float64) for k, v in flat(params).items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v2 = {k: np.zeros_like(v) for k, v in w.items()}
    history = []
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
        g_all = flat(grads)
        for k in w:
            g = np.array(g_all[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v2[k] = b2 * v2[k] + (1 - b2) * g**2
            step = (m[k] / (1 - b1**t)) / (np.sqrt(v2[k] / (1 - b2**t)) + eps)
            if is_decayed(k, w[k]):
                step = step + wd * w[k]
            w[k] = w[k] - lr * step
        history.append({k: v.copy() for k, v in w.items()})
    return history


def assert_histories_close(actual, expected, rtol=1e-10, atol=1e-12):
    assert len(actual) == len(expected)
    for a_step, e_step in zip(actual, expected, strict=True):
        assert a_step.keys() == e_step.keys()
        for k in e_step:
            np.testing.assert_allclose(a_step[k], e_step[k], rtol=rtol, atol=atol, err_msg=str(k))


def problem(rng, steps=3):
    params = flax_like_params(rng)
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params) for _ in range(steps)]
    return params, grads


def ramp(count):
    # A step-dependent rate shows whether the rate is applied inside or outside the momentum.
    return 0.5 * (count + 1)


LRS = [0.5, 1.0, 1.5]


# --------------------------------------------------------------------------- the mask


def test_exclude_bias_and_norm_on_handmade_tree(rng):
    mask = optimizers.exclude_bias_and_norm(flax_like_params(rng))
    assert mask == {
        "conv": {"kernel": True},
        "bn": {"scale": False, "bias": False},
        "dense": {"kernel": True, "bias": False},
        "temperature": {"log_value": False},
    }


def test_exclude_bias_and_norm_on_model_params():
    model = models.get_model("resnet_tiny", head_hidden_dim=8, head_out_dim=4)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)["params"]
    mask = optimizers.exclude_bias_and_norm(params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    mask_leaves = jax.tree.leaves(mask)
    assert len(leaves) == len(mask_leaves)
    n_kernels = 0
    for (path, leaf), decayed in zip(leaves, mask_leaves, strict=True):
        name = path[-1].key
        assert decayed == (name == "kernel"), (path, decayed)
        n_kernels += name == "kernel"
        if not decayed:
            assert leaf.ndim == 1
    # stem conv, 2 + 2 block convs, 1 projection conv, 2 head Dense kernels.
    assert n_kernels == 1 + 2 + 3 + 2


# --------------------------------------------------------------------------- LARS


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_numpy_reference(rng, nesterov):
    params, grads = problem(rng)
    kw = dict(weight_decay=1e-2, momentum=0.9, trust_coefficient=0.01, nesterov=nesterov)
    with jax.enable_x64(True):
        opt = optimizers.make_optimizer("lars", learning_rate=ramp, **kw)
        actual = run_optax(opt, params, grads)
    expected = lars_reference(
        params, grads, LRS, wd=1e-2, momentum=0.9, eta=0.01, nesterov=nesterov
    )
    assert_histories_close(actual, expected)


def test_lars_one_dimensional_params_get_plain_momentum_sgd(rng):
    params, grads = problem(rng, steps=2)
    with jax.enable_x64(True):
        opt = optimizers.make_optimizer(
            "lars", learning_rate=ramp, weight_decay=0.1, trust_coefficient=0.001
        )
        actual = run_optax(opt, params, grads)
    p, g0, g1 = flat(params), flat(grads[0]), flat(grads[1])
    for k in [("bn", "scale"), ("bn", "bias"), ("dense", "bias"), ("temperature", "log_value")]:
        v1 = 0.5 * g0[k]
        np.testing.assert_allclose(actual[0][k], p[k] - v1, rtol=1e-12)
        np.testing.assert_allclose(actual[1][k], p[k] - v1 - (0.9 * v1 + 1.0 * g1[k]), rtol=1e-12)
    # Kernels are trust-ratio scaled: a step of relative size ~ eta, far from a plain SGD step.
    k = ("conv", "kernel")
    step = np.linalg.norm(actual[0][k] - p[k]) / np.linalg.norm(p[k])
    np.testing.assert_allclose(step, 0.5 * 0.001, rtol=1e-9)


def test_lars_with_trust_ratio_on_everything_differs(rng):
    # The mask matters: trust-ratio adapting the BatchNorm/bias leaves changes their update.
    params, grads = problem(rng, steps=1)
    with jax.enable_x64(True):
        masked = run_optax(
            optimizers.make_optimizer("lars", learning_rate=0.1, weight_decay=0.1), params, grads
        )
        unmasked = run_optax(
            optimizers.make_optimizer("lars", learning_rate=0.1, weight_decay=0.1, mask=True),
            params,
            grads,
        )
    assert not np.allclose(masked[0][("bn", "bias")], unmasked[0][("bn", "bias")])
    np.testing.assert_allclose(masked[0][("conv", "kernel")], unmasked[0][("conv", "kernel")])


# --------------------------------------------------------------------------- SGD and AdamW


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_numpy_reference(rng, nesterov):
    params, grads = problem(rng)
    with jax.enable_x64(True):
        opt = optimizers.make_optimizer(
            "sgd", learning_rate=ramp, weight_decay=0.05, momentum=0.9, nesterov=nesterov
        )
        actual = run_optax(opt, params, grads)
    expected = sgd_reference(params, grads, LRS, wd=0.05, momentum=0.9, nesterov=nesterov)
    # optax applies the rate after the momentum (torch semantics); with a varying rate that is
    # what the reference does too.
    assert_histories_close(actual, expected)


def test_sgd_without_momentum(rng):
    params, grads = problem(rng, steps=2)
    with jax.enable_x64(True):
        opt = optimizers.make_optimizer("sgd", learning_rate=0.1, weight_decay=0.05, momentum=0.0)
        actual = run_optax(opt, params, grads)
    expected = sgd_reference(params, grads, [0.1, 0.1], wd=0.05, momentum=0.0)
    assert_histories_close(actual, expected)


def test_adamw_matches_numpy_reference(rng):
    params, grads = problem(rng)
    with jax.enable_x64(True):
        opt = optimizers.make_optimizer(
            "adamw", learning_rate=ramp, weight_decay=0.1, b1=0.8, b2=0.99, eps=1e-6
        )
        actual = run_optax(opt, params, grads)
    expected = adamw_reference(params, grads, LRS, wd=0.1, b1=0.8, b2=0.99, eps=1e-6)
    assert_histories_close(actual, expected)


# --------------------------------------------------------------------------- schedule


def closed_form_lr(t, *, peak, warmup, total, end):
    if t < warmup:
        return peak * t / warmup
    if t >= total:
        return end
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


@pytest.mark.parametrize(
    "scaling, batch_size, peak",
    [("linear", 512, 0.3 * 512 / 256), ("sqrt", 1024, 0.3 * 32.0), ("none", 4096, 0.3)],
)
@pytest.mark.parametrize("warmup, end", [(10, 0.0), (0, 1e-3), (25, 1e-2)])
def test_lr_schedule_closed_form(scaling, batch_size, peak, warmup, end):
    total = 100
    schedule = optimizers.lr_schedule(
        base_lr=0.3,
        batch_size=batch_size,
        total_steps=total,
        warmup_steps=warmup,
        lr_scaling=scaling,
        end_value=end,
    )
    steps = [0, 1, warmup // 2, max(warmup - 1, 0), warmup, warmup + 1, 50, 77, 99, 100, 150]
    for t in steps:
        expected = closed_form_lr(t, peak=peak, warmup=warmup, total=total, end=end)
        np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-5, atol=1e-7, err_msg=t)


def test_lr_schedule_simclr_peak():
    # SimCLR: base_lr 0.3 at batch 4096 with linear scaling peaks at 4.8.
    schedule = optimizers.lr_schedule(
        base_lr=0.3, batch_size=4096, total_steps=100, warmup_steps=10
    )
    np.testing.assert_allclose(float(schedule(10)), 4.8, rtol=1e-6)


def test_schedule_drives_lars(rng):
    params, grads = problem(rng, steps=3)
    schedule = optimizers.lr_schedule(
        base_lr=0.1, batch_size=512, total_steps=4, warmup_steps=2, end_value=0.0
    )
    lrs = [closed_form_lr(t, peak=0.2, warmup=2, total=4, end=0.0) for t in range(3)]
    with jax.enable_x64(True):
        opt = optimizers.make_optimizer("lars", learning_rate=schedule, weight_decay=1e-3)
        actual = run_optax(opt, params, grads)
    expected = lars_reference(params, grads, lrs, wd=1e-3, momentum=0.9, eta=0.001)
    assert_histories_close(actual, expected, rtol=1e-6, atol=1e-9)  # float32 schedule values


# --------------------------------------------------------------------------- errors


def test_make_optimizer_rejects_unknown_name():
    with pytest.raises(ValueError, match="'lars', 'sgd', 'adamw'"):
        optimizers.make_optimizer("adam", learning_rate=0.1, weight_decay=0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=-0.1, weight_decay=0.0), "learning_rate"),
        (dict(learning_rate=0.1, weight_decay=-1.0), "weight_decay"),
        (dict(learning_rate=float("nan"), weight_decay=0.0), "learning_rate"),
    ],
)
def test_make_optimizer_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimizers.make_optimizer("sgd", **kwargs)


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(lr_scaling="cubic"), "'linear', 'sqrt', 'none'"),
        (dict(base_lr=0.0), "base_lr"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=256.0), "batch_size"),
        (dict(total_steps=0), "total_steps"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=100), "warmup_steps must be < total_steps"),
        (dict(end_value=10.0), "end_value"),
    ],
)
def test_lr_schedule_rejects_bad_values(override, match):
    kwargs = dict(base_lr=0.3, batch_size=256, total_steps=100, warmup_steps=10)
    kwargs.update(override)
    with pytest.raises(ValueError, match=match):
        optimizers.lr_schedule(**kwargs)
