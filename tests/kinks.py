"""How far a float32 computation of a network stays from its kinks.

Two float32 computations of the same network (a sharded train step and its reference, say) agree
to round-off only where both take the same branch at every kink: a ReLU input within round-off
of zero (a ``max``/``min`` operand pair within round-off of a tie) takes the side that the order
of the arithmetic gives it, and that order differs between XLA:CPU's kernels (Intel AMX, AMD
AVX-512, YNNPACK on or off). One flipped ReLU lets a gradient through that the other side blocks,
far beyond any float32 tolerance. A test that compares such computations therefore first asserts
:func:`assert_clear_of_kinks` on its reference, so that data landing on a kink fails with that
cause named instead of a misleading tolerance error.

:func:`kink_gaps` evaluates a function's jaxpr eagerly, equation by equation, and records
``a - b`` for every elementwise ``max``/``min`` (a ReLU is ``max(x, 0)``: its gap is ``x``). It
follows ``jit`` and the custom-derivative calls (whose forward is their own jaxpr); primitives
whose ties it cannot measure (max-pool, argmax, sort, top-k, and kinks inside loops or
conditionals) make it raise, so that no margin is claimed for a computation it did not see.

How close is too close is decided element by element. :func:`closest_kink` evaluates the
network in float32 and in float64: the float64 gap ``x`` is the distance to the kink, and
``|x32 - x|`` (at least the float32 spacing at ``x``) the round-off of that float32 evaluation.
An element must lie at least ``min(MARGIN, SAFETY * round-off)`` from its kink. The absolute
``MARGIN`` covers an O(1) computation that cancels near zero (the input that flipped on AMD was
``0.0475 - 0.0475 = -5.2e-8``, with an error of about 1e-7); the relative bound lets through an
input that is small because everything summed into it is (after a step from a zero-initialised
residual scale, a block's ReLU sees ``0 + y`` with ``y`` of 1e-7 and an error of 1e-14, a side
no float32 computation gets wrong). An exact float64 tie that float32 reproduces exactly (that
``0 + y`` before the first step, ``y`` exactly 0) is forced by the arithmetic, the same in every
computation, and is counted apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

#: The two bounds, against what other float32 computations of the same ReLU inputs were
#: measured to do (``python tests/kink_round_off.py 0 1``, AMD EPYC: the train-step networks of
#: tests/train_worker.py at seeds 0 and 1, jitted on 8, 4 and 1 simulated devices, against the
#: eager float32 evaluation and float64): where the distance was below 1e-5 their error was at
#: most 4.0e-7 (MARGIN is 2.5 times that), and near kinks at most 42.6 times the eager round-off
#: (SAFETY is 2.3 times that).
MARGIN = 1e-6
SAFETY = 100.0

_KINKS = frozenset({"max", "min"})
# Kinks that a tie decides but that this module does not measure.
_UNMEASURED = frozenset(
    {
        "argmax",
        "argmin",
        "sort",
        "top_k",
        "reduce_max",
        "reduce_min",
        "reduce_window_max",
        "reduce_window_min",
        "select_and_scatter_add",
        "select_and_gather_add",
        "cummax",
        "cummin",
    }
)
# Primitives whose value is that of their one sub-jaxpr applied to their operands.
_CALLS = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
        "checkpoint",
        "remat",
    }
)


@dataclasses.dataclass(frozen=True)
class Gap:
    """``a - b`` of one ``max``/``min`` equation, broadcast to its output's shape."""

    primitive: str
    where: str  # file:line of the code that applied it
    diff: Any


@dataclasses.dataclass(frozen=True)
class Kink:
    """The element closest to its kink, relative to the distance it must keep."""

    distance: float  # |a - b| in float64
    round_off: float  # |float32 gap - float64 gap|, at least the float32 spacing there
    required: float  # min(margin, safety * round_off)
    primitive: str
    where: str
    index: tuple[int, ...]
    shape: tuple[int, ...]
    exact_ties: int  # elements tied exactly in float64 and in float32 alike


def _where(eqn: Any, outer: str) -> str:
    """The innermost frame of the equation's traceback outside JAX and Flax (the line of the
    model that called ``nn.relu``, say), else that of the enclosing call."""
    traceback = getattr(eqn.source_info, "traceback", None)
    for frame in traceback.frames if traceback is not None else ():
        if not any(lib in frame.file_name for lib in ("/jax/", "/flax/")):
            return f"{frame.file_name.rsplit('/', 1)[-1]}:{frame.line_num}"
    return outer


def _subjaxprs(eqn: Any) -> Iterator[Any]:
    yield from core.jaxprs_in_params(eqn.params)


def _has_kinks(jaxpr: Any) -> bool:
    return any(
        eqn.primitive.name in _KINKS | _UNMEASURED or any(_has_kinks(s) for s in _subjaxprs(eqn))
        for eqn in jaxpr.eqns
    )


def _eval(jaxpr: Any, consts: list, args: list, gaps: list[Gap], outer: str) -> list:
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        where = _where(eqn, outer)
        invals = [read(v) for v in eqn.invars]
        subs = list(_subjaxprs(eqn))
        if name in _CALLS and len(subs) == 1:
            sub = next(
                p for p in eqn.params.values() if isinstance(p, core.ClosedJaxpr | core.Jaxpr)
            )
            closed = isinstance(sub, core.ClosedJaxpr)
            outvals = _eval(
                sub.jaxpr if closed else sub, sub.consts if closed else [], invals, gaps, where
            )
        else:
            if name in _UNMEASURED or any(_has_kinks(s) for s in subs):
                raise NotImplementedError(
                    f"kink_gaps does not measure the ties of {name!r} at {where}"
                )
            if name in _KINKS:
                a, b = invals
                diff = jnp.broadcast_to(jnp.subtract(a, b), eqn.outvars[0].aval.shape)
                gaps.append(Gap(name, where, diff))
            outvals = eqn.primitive.bind(*invals, **eqn.params)
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        env.update(zip(eqn.outvars, outvals, strict=True))
    return [read(v) for v in jaxpr.outvars]


def kink_gaps(fn: Callable[..., Any], *args: Any) -> tuple[list[Gap], Any]:
    """``(gaps, fn(*args))``: the :class:`Gap` of every ``max``/``min`` that ``fn`` applies, in
    order, and ``fn``'s value as computed on the way (equation by equation, in the arguments'
    dtypes; traceable, so ``jax.jit`` of it gives a compiled computation's gaps). Raises
    ``NotImplementedError`` on ties it cannot measure, ``ValueError`` where there is no kink."""
    closed = jax.make_jaxpr(fn)(*args)
    gaps: list[Gap] = []
    flat_out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args), gaps, "?")
    if not gaps:
        raise ValueError("the computation has no max/min: there is no kink to stay clear of")
    out_tree = jax.tree.structure(jax.eval_shape(fn, *args))
    return gaps, jax.tree.unflatten(out_tree, flat_out)


def _widen(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: np.asarray(x, np.float64) if np.asarray(x).dtype == np.float32 else x, tree
    )


def float32_and_float64_gaps(
    fn32: Callable[..., Any], fn64: Callable[..., Any], *args: Any
) -> list[tuple[Gap, np.ndarray, np.ndarray]]:
    """Each kink's ``(gap, float32 diff, float64 diff)``: ``fn32(*args)`` in float32 and
    ``fn64`` (the same computation in float64) of the float32 arguments widened."""
    gaps32, _ = kink_gaps(fn32, *args)
    with jax.enable_x64(True):
        gaps64, _ = kink_gaps(fn64, *_widen(args))
        pairs = [
            (g, np.asarray(g.diff), np.asarray(h.diff, np.float64))
            for g, h in zip(gaps32, gaps64, strict=True)
        ]
    for g, d32, d64 in pairs:
        assert d32.shape == d64.shape, (g, d32.shape, d64.shape)
    return pairs


def closest_kink(
    fn32: Callable[..., Any],
    fn64: Callable[..., Any],
    *args: Any,
    margin: float = MARGIN,
    safety: float = SAFETY,
) -> Kink:
    """The element of ``fn32(*args)``'s ``max``/``min`` inputs with the smallest ratio of its
    distance from the tie to the distance it must keep (see the module's docstring), with the
    count of exact ties. ``fn64`` is the same computation in float64."""
    best: Kink | None = None
    worst = np.inf
    ties = 0
    for gap, d32, d64 in float32_and_float64_gaps(fn32, fn64, *args):
        exact = (d64 == 0) & (d32 == 0)
        ties += int(exact.sum())
        distance = np.abs(d64)
        round_off = np.maximum(np.abs(d32 - d64), np.spacing(distance.astype(np.float32)))
        required = np.minimum(margin, safety * round_off)
        ratio = np.where(exact, np.inf, distance / required)
        i = np.unravel_index(np.argmin(ratio), ratio.shape)
        if best is None or ratio[i] < worst:
            worst = ratio[i]
            best = Kink(
                float(distance[i]),
                float(round_off[i]),
                float(required[i]),
                gap.primitive,
                gap.where,
                tuple(map(int, i)),
                ratio.shape,
                0,
            )
    assert best is not None
    return dataclasses.replace(best, exact_ties=ties)


def assert_clear_of_kinks(fn32: Callable[..., Any], fn64: Callable[..., Any], *args: Any) -> Kink:
    """Asserts that every ``max``/``min`` input of ``fn32(*args)`` that is not an exact tie lies
    at least ``min(MARGIN, SAFETY * its float32 round-off)`` from its kink, with a message that
    names the kink. ``fn64`` is the same computation in float64. Returns the closest one."""
    kink = closest_kink(fn32, fn64, *args)
    assert kink.distance >= kink.required, (
        f"a {kink.primitive} input lies {kink.distance:.2g} from its kink, closer than the "
        f"{kink.required:.2g} required (its float32 round-off is {kink.round_off:.2g}) at "
        f"{kink.where}, element {kink.index} of shape {kink.shape}: which side it takes depends "
        "on the order of the arithmetic (the CPU's kernels), so two float32 computations of "
        "this network need not agree; use data or a seed that keeps the network away from its "
        "kinks"
    )
    return kink


def model_apply_pair(model: Any, **apply_kwargs: Any) -> tuple[Callable, Callable]:
    """``(apply, apply64)``: ``(variables, images) -> model.apply(variables, images,
    **apply_kwargs)`` for a ``dhel_jax.models.ContrastiveModel`` and for its float64 twin."""
    wide = {"dtype": jnp.float64, "param_dtype": jnp.float64}
    model64 = model.clone(encoder=model.encoder.clone(**wide), head=model.head.clone(**wide))
    return (
        lambda variables, images: model.apply(variables, images, **apply_kwargs),
        lambda variables, images: model64.apply(variables, images, **apply_kwargs),
    )
