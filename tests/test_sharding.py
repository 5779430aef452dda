"""Global negatives across devices, and tiled (memory-bounded) evaluation.

Sharded runs use the 8 simulated CPU devices of tests/conftest.py; the
multi-process test launches 2 local processes with 2 CPU devices each.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhel_jax import losses, metrics, parallel

LOSS_NAMES = list(losses.LOSSES)
D = 32


def _views(m: int, d: int = D, seed: int = 0):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(m, d)).astype(np.float32)
    z2 = (z1 + 0.5 * rng.normal(size=(m, d))).astype(np.float32)
    return jnp.asarray(z1), jnp.asarray(z2)


def _assert_rel_close(actual, expected, tol=1e-5):
    """Max abs error <= tol * max|expected|; scalar losses use max(|loss|, 1) as the scale,
    since KCL and align_uniform are differences of O(1) terms and can sit near 0."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.max(np.abs(expected)), 1.0 if expected.ndim == 0 else 1e-30)
    assert np.max(np.abs(actual - expected)) <= tol * scale, (
        np.max(np.abs(actual - expected)) / scale
    )


def _value_and_grads(fn, z1, z2):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(z1, z2)


# ----------------------------------------------------------------------------- global negatives


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("global_batch", [64, 256])
def test_sharded_loss_and_gradients_equal_single_device(name, global_batch, eight_devices):
    z1, z2 = _views(global_batch)
    loss_fn = losses.LOSSES[name]
    single, single_grads = _value_and_grads(loss_fn, z1, z2)
    sharded_fn = parallel.sharded_loss(loss_fn, parallel.data_mesh(eight_devices))
    sharded, sharded_grads = _value_and_grads(sharded_fn, z1, z2)
    _assert_rel_close(sharded, single)
    for got, want in zip(sharded_grads, single_grads, strict=True):
        _assert_rel_close(got, want)


@pytest.mark.parametrize("name", ["simclr", "dhel", "kcl"])
def test_sharded_and_tiled_together(name, eight_devices):
    z1, z2 = _views(96)
    loss_fn = losses.LOSSES[name]
    single, single_grads = _value_and_grads(loss_fn, z1, z2)
    sharded_fn = parallel.sharded_loss(loss_fn, parallel.data_mesh(eight_devices), block_size=5)
    sharded, sharded_grads = _value_and_grads(sharded_fn, z1, z2)
    _assert_rel_close(sharded, single)
    for got, want in zip(sharded_grads, single_grads, strict=True):
        _assert_rel_close(got, want)


def test_gradient_taken_inside_shard_map_is_the_global_gradient(eight_devices):
    """Per-device jax.grad inside shard_map (how a hand-written train step uses axis_name)
    returns each device's rows of the global gradient: no 1/n or n scaling, no dropped
    cross-device terms (solo-learn #232, lightly #1977)."""
    from jax.sharding import PartitionSpec as P

    z1, z2 = _views(64)
    _, (g1, g2) = _value_and_grads(losses.dcl, z1, z2)
    mesh = parallel.data_mesh(eight_devices)
    per_device = jax.jit(
        jax.shard_map(
            jax.grad(lambda a, b: losses.dcl(a, b, axis_name="data"), argnums=(0, 1)),
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs=(P("data"), P("data")),
        )
    )
    s1, s2 = per_device(
        jax.device_put(z1, parallel.batch_sharding(mesh)),
        jax.device_put(z2, parallel.batch_sharding(mesh)),
    )
    _assert_rel_close(s1, g1)
    _assert_rel_close(s2, g2)


@pytest.mark.parametrize("block", [None, 3])
def test_replicated_parameter_gradient_inside_shard_map(block, eight_devices):
    """jax.grad inside shard_map of a psum-ed loss with a replicated parameter (a learnable
    temperature): the parameter's gradient is the single-device one, counted once, dense and
    tiled (the tiled custom VJP casts its inputs to one varying type with public API only)."""
    from jax.sharding import PartitionSpec as P

    from dhel_jax import pairwise

    z1, _ = _views(32, d=5)
    tau = jnp.asarray(0.3, jnp.float32)
    f = lambda x, p: x / p[0]  # noqa: E731

    def single(a, t):
        red, _ = pairwise.pairwise_reduce(
            a, None, f, (t,), reduce="lse", exclude=(jnp.arange(a.shape[0]),)
        )
        return jnp.sum(red)

    def local(a, t):
        b, ids = pairwise.gather_candidates(a, "data")
        red, _ = pairwise.pairwise_reduce(
            a, b, f, (t,), reduce="lse", exclude=(ids,), block_size=block
        )
        return jax.lax.psum(jnp.sum(red), "data")

    want_a, want_t = jax.grad(single, argnums=(0, 1))(z1, tau)
    per_device = jax.shard_map(
        jax.grad(local, argnums=(0, 1)),
        mesh=parallel.data_mesh(eight_devices),
        in_specs=(P("data"), P()),
        out_specs=(P("data"), P()),
    )
    got_a, got_t = jax.jit(per_device)(z1, tau)
    _assert_rel_close(got_a, want_a)
    _assert_rel_close(got_t, want_t)


def test_metrics_accept_axis_name(eight_devices):
    from jax.sharding import PartitionSpec as P

    z1, z2 = _views(64)
    mesh = parallel.data_mesh(eight_devices)
    fn = jax.shard_map(
        lambda a, b: (
            metrics.alignment(a, b, axis_name="data"),
            metrics.uniformity(a, axis_name="data"),
        ),
        mesh=mesh,
        in_specs=(P("data"), P("data")),
        out_specs=P(),
    )
    align, unif = jax.jit(fn)(z1, z2)
    _assert_rel_close(align, metrics.alignment(z1, z2))
    _assert_rel_close(unif, metrics.uniformity(z1))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_explicit_mesh_axes(name, eight_devices):
    """Arrays sharded over Explicit axes (jax.make_mesh's default under jax.set_mesh) work
    under jit: same loss and gradients as one device, gradients keep the input sharding."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    z1, z2 = _views(64)
    single, single_grads = _value_and_grads(losses.LOSSES[name], z1, z2)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,), devices=eight_devices)
    with jax.set_mesh(mesh):
        s1 = jax.device_put(z1, NamedSharding(mesh, P("data")))
        s2 = jax.device_put(z2, NamedSharding(mesh, P("data")))
        loss, grads = _value_and_grads(losses.LOSSES[name], s1, s2)
    _assert_rel_close(loss, single)
    for got, want in zip(grads, single_grads, strict=True):
        assert got.sharding.spec == P("data", None)
        _assert_rel_close(got, want)


def test_uneven_global_batch_is_rejected_clearly(eight_devices):
    z1, z2 = _views(60)
    fn = parallel.sharded_loss(losses.dhel, parallel.data_mesh(eight_devices))
    with pytest.raises(ValueError, match=r"global batch size 60 .* 8 devices .* multiple of 8"):
        fn(z1, z2)


def _dot_shapes_inside_shard_map(fn, *args):
    """Output shapes of every dot_general traced inside shard_map bodies (per-device shapes)."""
    shapes = []

    def walk(jaxpr, inside):
        for eqn in jaxpr.eqns:
            now_inside = inside or eqn.primitive.name == "shard_map"
            if inside and eqn.primitive.name == "dot_general":
                shapes.append(tuple(eqn.outvars[0].aval.shape))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner, now_inside)

    walk(jax.make_jaxpr(fn)(*args).jaxpr, False)
    return shapes


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_each_device_computes_only_its_block(name, eight_devices):
    """Forward and backward similarity products are (M_local x M_global) per device
    (2M_local x 2M_global for the stacked NT-Xent family), never M_global x M_global."""
    m_global, n = 256, 8
    m_local = m_global // n
    z1, z2 = _views(m_global)
    fn = parallel.sharded_loss(losses.LOSSES[name], parallel.data_mesh(eight_devices))
    shapes = _dot_shapes_inside_shard_map(jax.grad(fn, argnums=(0, 1)), z1, z2)
    assert shapes, "no matmul traced inside shard_map"
    largest = max(int(np.prod(s)) for s in shapes)
    stacked = name in ("simclr", "dcl", "dclw")
    block = (2 * m_local, 2 * m_global) if stacked else (m_local, m_global)
    assert block in shapes, shapes
    assert largest <= block[0] * block[1], shapes
    assert largest * n <= (2 * m_global) ** 2 // (1 if stacked else 4), shapes


# ----------------------------------------------------------------------------- tiled evaluation


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("m,block", [(100, 32), (100, 50), (1024, 256), (1024, 300)])
def test_tiled_equals_dense(name, m, block):
    z1, z2 = _views(m, d=16, seed=1)
    loss_fn = losses.LOSSES[name]
    dense, dense_grads = _value_and_grads(loss_fn, z1, z2)
    tiled, tiled_grads = _value_and_grads(lambda a, b: loss_fn(a, b, block_size=block), z1, z2)
    _assert_rel_close(tiled, dense)
    for got, want in zip(tiled_grads, dense_grads, strict=True):
        _assert_rel_close(got, want)


@pytest.mark.parametrize("name", ["info_nce", "dhel", "dcl", "kcl"])
def test_tiled_aux_equals_dense(name):
    z1, z2 = _views(130, d=8, seed=2)
    _, dense = losses.LOSSES[name](z1, z2, return_aux=True)
    _, tiled = losses.LOSSES[name](z1, z2, return_aux=True, block_size=40)
    assert dense.keys() == tiled.keys()
    for key in dense:
        _assert_rel_close(tiled[key], dense[key])


@pytest.mark.parametrize("name", ["dhel", "kcl", "simclr"])
def test_tiled_memory_at_65536(name):
    """Compiled tiled forward + backward at M = 65536, d = 128 needs <= 1 GiB of temporaries
    (a dense M x M float32 similarity matrix alone would be 16 GiB)."""
    m, d = 65536, 128
    spec = jax.ShapeDtypeStruct((m, d), jnp.float32)
    fn = jax.jit(
        jax.value_and_grad(lambda a, b: losses.LOSSES[name](a, b, block_size=1024), argnums=(0, 1))
    )
    temp = fn.lower(spec, spec).compile().memory_analysis().temp_size_in_bytes
    assert temp <= 2**30, f"{temp / 2**30:.2f} GiB"
    dense_matrix_bytes = m * m * 4 * (4 if name == "simclr" else 1)
    assert temp * 16 < dense_matrix_bytes


# ----------------------------------------------------------------------------- multi-process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_equal_single_process(tmp_path):
    """2 processes x 2 CPU devices (jax.distributed on localhost, gloo collectives):
    global loss and gradients equal a single-process computation of the same batch."""
    worker = Path(__file__).with_name("multiprocess_loss_worker.py")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(pid), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        if "CPU_COLLECTIVES_UNAVAILABLE" in out:
            pytest.skip("this jaxlib provides no CPU cross-process collectives")
        assert p.returncode == 0, out[-3000:]

    z1, z2 = (np.load(tmp_path / "batch.npz")[k] for k in ("z1", "z2"))
    for name in LOSS_NAMES:
        loss, (g1, g2) = _value_and_grads(losses.LOSSES[name], jnp.asarray(z1), jnp.asarray(z2))
        got = np.load(tmp_path / f"{name}.npz")
        _assert_rel_close(got["loss"], loss)
        _assert_rel_close(got["g1"], g1)
        _assert_rel_close(got["g2"], g2)
