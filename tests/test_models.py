"""Tests for dhel_jax.models: shapes, parameter counts, stems, bfloat16, global-batch BatchNorm."""

from __future__ import annotations

import collections
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dhel_jax import models

INPUTS = {"cifar10": (32, 32, 3), "fashion_mnist": (28, 28, 1)}


# --------------------------------------------------------------------------- references


def torchvision_resnet_param_count(
    block: str, layers, *, stem: str, in_channels: int = 3, width: int = 64
) -> int:
    """Trainable parameters of a torchvision-style ResNet encoder (no fc), by arithmetic.

    Convolutions have no bias (k * k * c_in * c_out weights); BatchNorm has gamma and beta (2c).
    A shortcut gets a 1x1 conv + BN when the stride is 2 or the width changes.
    """

    def conv(k, cin, cout):
        return k * k * cin * cout

    def bn(c):
        return 2 * c

    stem_k = 7 if stem == "imagenet" else 3
    n = conv(stem_k, in_channels, width) + bn(width)
    inplanes = width
    for i, blocks in enumerate(layers):
        planes = width * 2**i
        for j in range(blocks):
            stride = 2 if i > 0 and j == 0 else 1
            if block == "basic":
                out = planes
                n += conv(3, inplanes, planes) + bn(planes) + conv(3, planes, out) + bn(out)
            else:
                out = 4 * planes
                n += conv(1, inplanes, planes) + bn(planes)
                n += conv(3, planes, planes) + bn(planes)
                n += conv(1, planes, out) + bn(out)
            if stride != 1 or inplanes != out:
                n += conv(1, inplanes, out) + bn(out)
            inplanes = out
    return n


ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2), 64, 512),
    "resnet34": ("basic", (3, 4, 6, 3), 64, 512),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 64, 2048),
    "resnet_small": ("basic", (1, 1, 1), 32, 128),
    "resnet_tiny": ("basic", (1, 1), 4, 8),
}


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_init(module, shape, **kw):
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False, **kw), x)


def random_variables(module, shape, rng):
    """Variables of ``module`` filled from NumPy (no PRNG compiles, non-trivial BN affine/stats).

    Kernels ~ N(0, 2 / fan_in); BatchNorm gamma ~ U(0.5, 1.5); biases ~ N(0, 0.1^2); running
    means ~ N(0, 0.1^2) and variances ~ U(0.5, 1.5).
    """

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, size=leaf.shape)
        else:
            value = rng.normal(size=leaf.shape) * 0.1
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract_init(module, shape))


def numpy_batchnorm(x, scale, bias, eps=1e-5):
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)  # biased, as in training-mode BatchNorm
    return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


# --------------------------------------------------------------------------- parameter counts


def test_reference_formula_matches_published_torchvision_counts():
    # torchvision resnet18 / resnet50 have 11,689,512 / 25,557,032 parameters including the
    # 1000-way fc (512*1000 + 1000 and 2048*1000 + 1000).
    assert (
        torchvision_resnet_param_count("basic", (2, 2, 2, 2), stem="imagenet")
        == (11_689_512 - (512 * 1000 + 1000))
        == 11_176_512
    )
    assert (
        torchvision_resnet_param_count("bottleneck", (3, 4, 6, 3), stem="imagenet")
        == (25_557_032 - (2048 * 1000 + 1000))
        == 23_508_032
    )


@pytest.mark.parametrize("name", list(models.MODELS))
@pytest.mark.parametrize("stem", models.STEMS)
@pytest.mark.parametrize("data", list(INPUTS))
def test_encoder_param_count_and_feature_shape(name, stem, data):
    block, layers, width, num_features = ARCHS[name]
    shape = INPUTS[data]
    encoder = models.MODELS[name](stem=stem)
    variables = abstract_init(encoder, shape)
    expected = torchvision_resnet_param_count(
        block, layers, stem=stem, in_channels=shape[-1], width=width
    )
    assert count(variables["params"]) == expected
    # Running mean and variance: one pair per BatchNorm channel, i.e. as many as gamma/beta.
    n_bn = sum(
        int(np.prod(v.shape))
        for path, v in jax.tree_util.tree_leaves_with_path(variables["params"])
        if path[-1].key in ("scale", "bias")
    )
    assert count(variables["batch_stats"]) == n_bn
    assert encoder.num_features == num_features
    out = jax.eval_shape(
        lambda v, x: encoder.apply(v, x, train=False),
        variables,
        jax.ShapeDtypeStruct((5, *shape), jnp.float32),
    )
    chex.assert_shape(out, (5, num_features))
    assert out.dtype == jnp.float32


def test_cifar_and_imagenet_stems_differ_by_the_stem_kernel_only():
    cifar = count(abstract_init(models.MODELS["resnet18"](stem="cifar"), (32, 32, 3))["params"])
    imnet = count(abstract_init(models.MODELS["resnet18"](stem="imagenet"), (32, 32, 3))["params"])
    assert imnet - cifar == (7 * 7 - 3 * 3) * 3 * 64


@pytest.mark.parametrize(
    "stem, stem_hw, stage1_hw, last_hw",
    [("cifar", 32, 32, 4), ("cifar_stride2", 16, 16, 2), ("imagenet", 16, 8, 1)],
)
def test_stem_resolution(stem, stem_hw, stage1_hw, last_hw):
    # CIFAR stem: 3x3 stride 1 and no max-pool keep 32x32 into stage 1; its stride-2 variant
    # halves it (16x16); ImageNet stem: 7x7 stride 2 (16x16) then a stride-2 max-pool (8x8).
    encoder = models.MODELS["resnet18"](stem=stem)
    variables = abstract_init(encoder, (32, 32, 3))
    _, state = jax.eval_shape(
        lambda v, x: encoder.apply(
            v, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        ),
        variables,
        jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
    )
    inter = state["intermediates"]
    kernel = variables["params"]["stem_conv"]["kernel"]
    chex.assert_shape(kernel, (7, 7, 3, 64) if stem == "imagenet" else (3, 3, 3, 64))
    chex.assert_shape(inter["stem_conv"]["__call__"][0], (2, stem_hw, stem_hw, 64))
    chex.assert_shape(inter["stage1_block1"]["__call__"][0], (2, stage1_hw, stage1_hw, 64))
    chex.assert_shape(inter["stage4_block2"]["__call__"][0], (2, last_hw, last_hw, 512))


# --------------------------------------------------------------------------- real forward passes


@pytest.mark.parametrize(
    "name, stem, data",
    [("resnet_tiny", stem, data) for stem in models.STEMS for data in INPUTS]
    + [("resnet_small", "cifar", "fashion_mnist")],
)
def test_contrastive_model_forward(name, stem, data, rng):
    model = models.get_model(name, stem=stem, head_hidden_dim=16, head_out_dim=8)
    x = jnp.asarray(rng.normal(size=(4, *INPUTS[data])), jnp.float32)
    variables = random_variables(model, INPUTS[data], rng)
    out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    num_features = ARCHS[name][3]
    chex.assert_shape(out["features"], (4, num_features))
    chex.assert_shape(out["projections"], (4, 8))
    chex.assert_type([out["features"], out["projections"]], jnp.float32)
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_equal_shapes(updates["batch_stats"], variables["batch_stats"])
    eval_out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    chex.assert_tree_all_finite(eval_out)


def test_zero_init_residual():
    x = jnp.ones((2, 8, 8, 3))
    # An "rbg" key: its initialisers compile in a fraction of threefry's time on CPU.
    key = jax.random.key(0, impl="rbg")
    v0 = models.MODELS["resnet_tiny"](zero_init_residual=True).init(key, x, train=False)
    v1 = models.MODELS["resnet_tiny"](zero_init_residual=False).init(key, x, train=False)
    for block in ("stage1_block1", "stage2_block1"):
        np.testing.assert_array_equal(v0["params"][block]["BatchNorm_1"]["scale"], 0.0)
        np.testing.assert_array_equal(v1["params"][block]["BatchNorm_1"]["scale"], 1.0)
        np.testing.assert_array_equal(v0["params"][block]["BatchNorm_0"]["scale"], 1.0)


# --------------------------------------------------------------------------- projection head


def test_projection_head_structure_and_values(rng):
    head = models.ProjectionHead(hidden_dim=6, out_dim=3)
    h = rng.normal(size=(10, 5)).astype(np.float32) * 2.0 + 1.0
    variables = random_variables(head, (5,), rng)
    params = jax.tree.map(np.asarray, variables["params"])
    assert jax.tree.map(np.shape, params) == {
        "hidden1": {"kernel": (5, 6)},
        "hidden1_bn": {"scale": (6,), "bias": (6,)},
        "output": {"kernel": (6, 3), "bias": (3,)},
    }
    z, updates = head.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        jnp.asarray(h),
        train=True,
        mutable=["batch_stats"],
    )
    p = jax.tree.map(lambda a: a.astype(np.float64), params)
    a = h.astype(np.float64) @ p["hidden1"]["kernel"]
    a, mean, var = numpy_batchnorm(a, p["hidden1_bn"]["scale"], p["hidden1_bn"]["bias"])
    expected = np.maximum(a, 0.0) @ p["output"]["kernel"] + p["output"]["bias"]
    chex.assert_shape(z, (10, 3))
    assert z.dtype == jnp.float32
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-4)
    old = jax.tree.map(np.float64, variables["batch_stats"]["hidden1_bn"])
    new = updates["batch_stats"]["hidden1_bn"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * var, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_layers, hidden_layers", [(1, 0), (2, 1), (3, 2)])
def test_projection_head_depth(num_layers, hidden_layers):
    head = models.ProjectionHead(hidden_dim=7, out_dim=4, num_layers=num_layers)
    v = abstract_init(head, (9,))
    hidden = [k for k in v["params"] if k.startswith("hidden") and not k.endswith("_bn")]
    assert len(hidden) == hidden_layers
    assert len(v.get("batch_stats", {})) == hidden_layers  # one BatchNorm per hidden layer
    chex.assert_shape(v["params"]["output"]["kernel"], (9 if num_layers == 1 else 7, 4))


def test_paper_resnet18_head_dims():
    model = models.get_model("resnet18")
    v = abstract_init(model, (32, 32, 3))
    head = v["params"]["head"]
    chex.assert_shape(head["hidden1"]["kernel"], (512, 512))
    chex.assert_shape(head["output"]["kernel"], (512, 128))
    assert count(head) == 512 * 512 + 2 * 512 + 512 * 128 + 128


def test_projection_head_rejects_zero_layers():
    with pytest.raises(ValueError, match="num_layers"):
        abstract_init(models.ProjectionHead(num_layers=0), (4,))


# --------------------------------------------------------------------------- bfloat16


def test_bfloat16_compute_float32_params(rng):
    kw = dict(stem="cifar", head_hidden_dim=16, head_out_dim=8, zero_init_residual=False)
    m32 = models.get_model("resnet_tiny", dtype="float32", **kw)
    m16 = models.get_model("resnet_tiny", dtype="bfloat16", **kw)
    x = jnp.asarray(rng.normal(size=(16, 16, 16, 3)), jnp.float32)
    # Parameters and statistics are float32 whatever the compute dtype.
    abstract16 = abstract_init(m16, (16, 16, 3))
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract16)} == {jnp.dtype(jnp.float32)}
    chex.assert_trees_all_equal_shapes(abstract16, abstract_init(m32, (16, 16, 3)))
    variables = random_variables(m32, (16, 16, 3), rng)

    def apply(model, variables, x):
        mutable = ["batch_stats", "intermediates"]
        return model.apply(variables, x, train=True, mutable=mutable, capture_intermediates=True)

    out16, state16 = jax.jit(functools.partial(apply, m16))(variables, x)
    out32, _ = jax.jit(functools.partial(apply, m32))(variables, x)
    convs = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state16["intermediates"])
        if any("Conv" in str(k) or "conv" in str(k) for k in path)
    ]
    assert len(convs) >= 6
    chex.assert_type(convs, jnp.bfloat16)
    chex.assert_type(jax.tree.leaves(state16["batch_stats"]), jnp.float32)
    chex.assert_type([out16["features"], out16["projections"]], jnp.float32)
    chex.assert_tree_all_finite(out16)
    for key in ("features", "projections"):
        scale = float(jnp.max(jnp.abs(out32[key])))
        err = float(jnp.max(jnp.abs(out16[key] - out32[key])))
        assert err <= 0.05 * scale, (key, err, scale)
        assert err > 0.0  # the bf16 path really ran in lower precision


# --------------------------------------------------------------------------- global BatchNorm


def _bn_model(bn_axis_name=None):
    return models.get_model(
        "resnet_tiny",
        head_hidden_dim=8,
        head_out_dim=4,
        zero_init_residual=False,
        bn_axis_name=bn_axis_name,
    )


def _bn_data(rng, n_dev):
    # Each device's 2 examples get their own offset: per-device statistics then differ markedly
    # from the global ones (small local variance, large global variance).
    offsets = np.repeat(np.linspace(-3.0, 3.0, n_dev), 2)[:, None, None, None]
    x = (rng.normal(size=(2 * n_dev, 8, 8, 3)) * 0.5 + offsets).astype(np.float32)
    return random_variables(_bn_model(), (8, 8, 3), rng), x


def _train_apply(model, variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])


def test_batchnorm_statistics_span_global_batch_under_jit(rng, eight_devices):
    model = _bn_model()
    variables, x = _bn_data(rng, len(eight_devices))
    single = jax.jit(functools.partial(_train_apply, model))(variables, jnp.asarray(x))

    mesh = Mesh(np.array(eight_devices), ("data",))
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    v_repl = jax.device_put(variables, NamedSharding(mesh, P()))
    assert len(x_sharded.sharding.device_set) == 8
    sharded = jax.jit(functools.partial(_train_apply, model))(v_repl, x_sharded)
    chex.assert_trees_all_close(sharded, single, atol=1e-5, rtol=1e-5)

    # What per-device (local-batch) statistics would give: each shard normalised on its own,
    # running statistics averaged over devices.
    local = [_train_apply(model, variables, jnp.asarray(x[2 * d : 2 * d + 2])) for d in range(8)]
    local_out = jax.tree.map(lambda *a: np.concatenate(a), *[o for o, _ in local])
    local_stats = jax.tree.map(lambda *a: np.mean(a, axis=0), *[s for _, s in local])
    out, stats = sharded
    assert np.max(np.abs(out["projections"] - local_out["projections"])) > 0.1
    assert np.max(np.abs(out["features"] - local_out["features"])) > 0.1
    stem_var = stats["batch_stats"]["encoder"]["stem_bn"]["var"]
    local_var = local_stats["batch_stats"]["encoder"]["stem_bn"]["var"]
    assert np.max(np.abs(stem_var - local_var)) > 0.1


def test_batchnorm_axis_name_in_shard_map_matches_global(rng, eight_devices):
    variables, x = _bn_data(rng, len(eight_devices))
    single = jax.jit(functools.partial(_train_apply, _bn_model()))(variables, jnp.asarray(x))
    mesh = Mesh(np.array(eight_devices), ("data",))
    sharded = jax.jit(
        jax.shard_map(
            functools.partial(_train_apply, _bn_model(bn_axis_name="data")),
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=(P("data"), P()),
        )
    )(variables, jnp.asarray(x))
    chex.assert_trees_all_close(sharded, single, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="resnet19"), "resnet18"),
        (dict(name="resnet18", dtype="float16"), "bfloat16"),
        (dict(name="resnet18", stem="mnist"), "imagenet"),
    ],
)
def test_get_model_rejects_unknown_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.get_model(**kwargs)


def test_get_model_accepts_jnp_dtypes():
    model = models.get_model("resnet_tiny", dtype=jnp.bfloat16)
    assert model.encoder.dtype == jnp.bfloat16 and model.head.dtype == jnp.bfloat16


def test_resnet_rejects_bad_input_rank():
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        abstract_init(models.MODELS["resnet_tiny"](), (8, 8))


# ----------------------------------------------------------------------------------------------
# The convolutions' custom VJP: NHWC/HWIO gradients, the strided input gradient phase by phase.


def _conv_input_grad_float64(g, kernel, x_shape, strides, padding):
    """Scatter every output's cotangent back through every tap, in float64 loops."""
    g, kernel = np.asarray(g, np.float64), np.asarray(kernel, np.float64)
    n, h, w, c = x_shape
    (lo_h, hi_h), (lo_w, hi_w) = padding
    grad = np.zeros((n, h + lo_h + hi_h, w + lo_w + hi_w, c))
    for i in range(g.shape[1]):
        for j in range(g.shape[2]):
            for a in range(kernel.shape[0]):
                for b in range(kernel.shape[1]):
                    u, v = strides[0] * i + a, strides[1] * j + b
                    grad[:, u, v, :] += g[:, i, j, :] @ kernel[a, b].T
    return grad[:, lo_h : lo_h + h, lo_w : lo_w + w]


def _conv_kernel_grad_float64(x, g, kernel_size, strides, padding):
    """dw[a, b] = sum over outputs (i, j) of x_pad[s i + a, s j + b]^T g[i, j], in float64."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    (lo_h, hi_h), (lo_w, hi_w) = padding
    x = np.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
    grad = np.zeros((kernel_size, kernel_size, x.shape[-1], g.shape[-1]))
    for i in range(g.shape[1]):
        for j in range(g.shape[2]):
            for a in range(kernel_size):
                for b in range(kernel_size):
                    grad[a, b] += x[:, strides[0] * i + a, strides[1] * j + b].T @ g[:, i, j]
    return grad


@pytest.mark.parametrize(
    "shape, kernel_size, strides, padding",
    [
        ((3, 12, 12, 4), 3, (2, 2), ((1, 1), (1, 1))),  # the ResNets' downsampling 3x3
        ((3, 12, 12, 4), 1, (2, 2), ((0, 0), (0, 0))),  # their 1x1 projection shortcut
        ((2, 7, 9, 3), 3, (2, 2), ((1, 1), (1, 1))),  # odd sides: uneven phases
        ((2, 9, 9, 3), 3, (3, 3), ((1, 1), (1, 1))),
        ((2, 8, 8, 3), 2, (3, 3), ((0, 0), (0, 0))),  # a phase no tap reaches
        ((2, 6, 6, 3), 3, (1, 1), ((1, 1), (1, 1))),  # stride 1: one flipped convolution
        ((2, 6, 6, 3), 1, (1, 1), ((0, 0), (0, 0))),  # a bottleneck block's 1x1
        ((2, 6, 7, 3), 3, (1, 1), ((3, 0), (2, 1))),  # padding wider than the kernel
        ((2, 7, 7, 3), 1, (2, 2), "SAME"),
    ],
)
def test_conv_general_dilated_gradients_match_float64_reference(
    rng, shape, kernel_size, strides, padding
):
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, shape[-1], 5)), jnp.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))

    def conv(fn, x, kernel):
        return fn(x, kernel, strides, padding, dimension_numbers=dn)

    y, vjp = jax.vjp(functools.partial(conv, models.conv_general_dilated), x, kernel)
    want_y, want_vjp = jax.vjp(functools.partial(conv, jax.lax.conv_general_dilated), x, kernel)
    np.testing.assert_array_equal(y, want_y)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    x_grad, kernel_grad = vjp(g)
    chex.assert_shape(x_grad, shape)
    chex.assert_type(x_grad, jnp.float32)
    pads = padding
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(shape[1:3], (kernel_size,) * 2, strides, padding)
    want_x = _conv_input_grad_float64(g, kernel, shape, strides, pads)
    np.testing.assert_allclose(x_grad, want_x, rtol=1e-5, atol=1e-5)
    want_kernel = _conv_kernel_grad_float64(x, g, kernel_size, strides, pads)
    np.testing.assert_allclose(kernel_grad, want_kernel, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernel_grad, want_vjp(g)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["_kernel_grad_by_g_t", "_kernel_grad_by_x_t"])
@pytest.mark.parametrize(
    "shape, kernel_size, strides, padding",
    [
        ((3, 10, 10, 4), 3, (1, 1), ((1, 1), (1, 1))),
        ((3, 12, 12, 4), 3, (2, 2), ((1, 1), (1, 1))),
        ((2, 7, 9, 3), 3, (2, 2), ((1, 1), (1, 1))),  # odd sides: uneven phases
        ((2, 9, 9, 3), 3, (3, 3), ((1, 1), (1, 1))),  # g rows before the first phase row
        ((2, 9, 8, 3), 3, (3, 2), ((2, 0), (0, 2))),
        ((2, 8, 8, 3), 2, (3, 3), ((0, 0), (0, 0))),  # a phase no tap reaches
        ((2, 6, 7, 3), 3, (1, 1), ((3, 0), (2, 1))),  # padding wider than the kernel
        ((3, 12, 12, 4), 1, (2, 2), ((0, 0), (0, 0))),
    ],
)
def test_both_kernel_gradient_forms_match_float64_reference(
    rng, form, shape, kernel_size, strides, padding
):
    """``_kernel_grad`` picks one of two forms by the operands' sizes; each is checked here on
    its own, whichever the picker would choose for these shapes."""
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel_shape = (kernel_size, kernel_size, shape[-1], 5)
    out = jax.eval_shape(
        lambda x: jax.lax.conv_general_dilated(
            x, jnp.zeros(kernel_shape), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
        x,
    )
    g = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    got = getattr(models, form)(x, g, kernel_shape, strides, padding)
    chex.assert_shape(got, kernel_shape)
    want = _conv_kernel_grad_float64(x, g, kernel_size, strides, padding)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_resnet_convolutions_use_the_custom_vjp():
    """Every convolution of a ResNet goes through the custom VJP: the jaxpr of its gradient
    holds one custom_vjp_call per convolution kernel."""
    model = models.get_model("resnet_tiny", head_hidden_dim=8, head_out_dim=4)
    x = jnp.zeros((2, 16, 16, 3))
    variables = model.init(jax.random.key(0), x, train=False)

    def loss(params):
        out, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(out["projections"])

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
    kernels = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"]["encoder"])[0]
        if leaf.ndim == 4
    ]
    assert len(kernels) >= 4
    assert jaxpr.count("custom_vjp_call") == len(kernels)


def test_resnet_gradient_in_a_loop_compiles_to_nhwc_hwio_convolutions_only(monkeypatch):
    """The gradient of a ResNet inside a loop over chunks (as dhel_jax.grad_cache runs it)
    compiles to NHWC/HWIO convolutions only, the form XLA:CPU's fast convolution kernels take.
    XLA rewrites other forms only outside loops: with jax.lax's own convolution (checked below)
    the gradient's convolutions keep other forms inside the loop."""
    model = models.get_model("resnet_tiny", head_hidden_dim=8, head_out_dim=4)
    chunks = jnp.zeros((2, 4, 16, 16, 3))
    variables = model.init(jax.random.key(0), chunks[0], train=False)

    def loop(params):
        def body(acc, x):
            def embed(p):
                out, _ = model.apply(
                    {"params": p, "batch_stats": variables["batch_stats"]},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
                return jnp.sum(out["projections"])

            return jax.tree.map(jnp.add, acc, jax.grad(embed)(params)), None

        return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), chunks)[0]

    def labels():
        # A new function each time: jax.jit's trace cache would keep the first convolution.
        hlo = jax.jit(lambda p: loop(p)).lower(variables["params"]).compile().as_text()
        assert "while" in hlo
        return set(re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", hlo))

    assert labels() == {"b01f_01io->b01f"}
    monkeypatch.setattr(models, "conv_general_dilated", jax.lax.conv_general_dilated)
    assert labels() - {"b01f_01io->b01f"}  # e.g. the kernel gradients' f01b_i01o->01bf


def _lowered_convolutions(text: str) -> collections.Counter:
    """Dimension numbers of every ``stablehlo.convolution`` in a lowered module's text."""
    return collections.Counter(
        re.findall(
            r"stablehlo\.convolution\(.*?dim_numbers = (\[[^\]]*\]x\[[^\]]*\]->\[[^\]]*\])",
            text,
        )
    )


def _image_transposes(text: str) -> list[str]:
    """The ``stablehlo.transpose`` ops of 4-D (image or kernel) arrays in a module's text."""
    return re.findall(r"stablehlo\.transpose .*dims = \[\d, \d, \d, \d\]", text)


def test_resnet_gradient_lowers_to_the_custom_vjp_for_cpu_and_to_xla_gradients_for_tpu():
    """The platform the program is lowered for, not the host's backend, picks the convolution
    gradients: lowered for "cpu" the ResNet gradient holds NHWC/HWIO convolutions only (the
    custom VJP); lowered for "tpu" (or "cuda") on this CPU-only host, jax.lax's own transposes
    (kernel gradient f01b_i01o->01bf, input gradient with the kernel's feature axes swapped) and
    no layout transposes. No device of either kind is needed to lower."""
    model = models.get_model("resnet_tiny", head_hidden_dim=8, head_out_dim=4)
    x = jax.ShapeDtypeStruct((4, 16, 16, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), False))

    def loss(params, batch_stats, x):
        out, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out["projections"])

    traced = jax.jit(jax.grad(loss)).trace(variables["params"], variables["batch_stats"], x)
    kernels = sum(leaf.ndim == 4 for leaf in jax.tree.leaves(variables["params"]["encoder"]))
    nhwc = "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"

    cpu_text = traced.lower(lowering_platforms=("cpu",)).as_text()
    cpu = _lowered_convolutions(cpu_text)
    assert set(cpu) == {nhwc}
    # Forward, kernel and input gradients, the strided ones phase by phase.
    assert cpu[nhwc] > 3 * kernels - 1
    assert _image_transposes(cpu_text)

    for platform in ("tpu", "cuda"):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        convolutions = _lowered_convolutions(text)
        assert convolutions == {
            nhwc: kernels,  # the forward pass
            "[f, 0, 1, b]x[i, 0, 1, o]->[0, 1, b, f]": kernels,  # kernel gradients
            "[b, 0, 1, f]x[0, 1, o, i]->[b, 0, 1, f]": kernels - 1,  # input gradients, no stem
        }, platform
        assert not _image_transposes(text), platform
