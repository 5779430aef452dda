"""How far a float32 computation of a network stays from its kinks.

Two float32 computations of the same network (a sharded train step and its reference, say) agree
to round-off only where both take the same branch at every kink: a ReLU input or a ``max``/``min``
operand pair within round-off of a tie is decided by the order of the arithmetic, which differs
between XLA:CPU's kernels (Intel AMX, AMD AVX-512, YNNPACK on or off). One flipped ReLU lets a
gradient through that the other side blocks, far beyond any float32 tolerance. A test that
compares such computations therefore first asserts :func:`assert_clear_of_kinks` on its reference,
so that data landing on a kink fails with that cause named instead of a misleading tolerance
error.

:func:`kink_margin` evaluates a function's jaxpr eagerly, equation by equation, and records
``|a - b|`` for every elementwise ``max``/``min`` (a ReLU is ``max(x, 0)``: its margin is
``|x|``). :func:`assert_clear_of_kinks` does so in float64, the distance float32 round-off must
not bridge; an exact float64 tie is one the arithmetic forces (a block whose zero-initialised
last BatchNorm scale adds exactly 0 to a ReLU's exact 0), which every float32 computation
reproduces exactly too, so exact ties are counted apart and do not count as close. It follows ``jit`` and the custom-derivative calls (whose forward is their own jaxpr);
primitives whose kinks it cannot measure (max-pool, argmax, sort, top-k, and kinks inside loops or
conditionals) make it raise, so that a margin is never claimed for a computation it did not see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

#: The smallest float64 distance from a kink that the comparisons accept. Near their kinks
#: (|x| < 1e-3) the float32 ReLU inputs of the grad-cache test's network differ from float64
#: by at most 1.9e-7 (an eager float32 evaluation, AMD EPYC, config seeds 0 and 2), so 1e-6 is
#: five times the round-off that decides a side.
MARGIN = 1e-6

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
class Kink:
    """The smallest ``|a - b|`` over the elements of one ``max``/``min`` equation."""

    margin: float
    primitive: str
    where: str  # file:line of the code that applied it
    index: tuple[int, ...]  # the element closest to the tie
    shape: tuple[int, ...]


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
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _KINKS | _UNMEASURED:
            return True
        if any(_has_kinks(sub) for sub in _subjaxprs(eqn)):
            return True
    return False


def _eval(
    jaxpr: Any, consts: list, args: list, kinks: list[Kink], ties: list[int], outer: str
) -> list:
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
                sub.jaxpr if closed else sub,
                sub.consts if closed else [],
                invals,
                kinks,
                ties,
                where,
            )
        else:
            if name in _UNMEASURED or any(_has_kinks(s) for s in subs):
                raise NotImplementedError(
                    f"kink_margin does not measure the ties of {name!r} at {where}"
                )
            if name in _KINKS:
                a, b = (np.asarray(x, np.float64) for x in invals)
                gap = np.abs(a - b) * np.ones(eqn.outvars[0].aval.shape)
                ties[0] += int(np.sum(gap == 0))
                gap[gap == 0] = np.inf
                i = np.unravel_index(np.argmin(gap), gap.shape)
                kinks.append(Kink(float(gap[i]), name, where, tuple(map(int, i)), gap.shape))
            outvals = eqn.primitive.bind(*invals, **eqn.params)
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        env.update(zip(eqn.outvars, outvals, strict=True))
    return [read(v) for v in jaxpr.outvars]


def kink_margin(fn: Callable[..., Any], *args: Any) -> tuple[Kink, int, Any]:
    """``(closest kink, exact ties, fn(*args))``, evaluated eagerly in the arguments' dtypes: the
    ``max``/``min`` equation whose operands come closest to a tie without being equal, how many
    elements are exactly tied, and ``fn``'s value as computed on the way. Raises
    ``NotImplementedError`` on kinks it cannot measure, ``ValueError`` where there is no kink."""
    closed = jax.make_jaxpr(fn)(*args)
    kinks: list[Kink] = []
    ties = [0]
    flat_out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args), kinks, ties, "?")
    if not kinks:
        raise ValueError("the computation has no max/min: there is no kink to stay clear of")
    out_tree = jax.tree.structure(jax.eval_shape(fn, *args))
    return min(kinks, key=lambda k: k.margin), ties[0], jax.tree.unflatten(out_tree, flat_out)


def assert_clear_of_kinks(fn: Callable[..., Any], *args: Any, margin: float = MARGIN) -> Kink:
    """Asserts that, evaluated in float64 (float32 arguments are widened; ``fn`` must compute in
    its arguments' dtype, see :func:`float64_apply`), every ReLU input (every ``max``/``min``
    operand gap) of ``fn(*args)`` that is not an exact tie lies at least ``margin`` from it, with
    a message that names the kink. Returns the closest kink."""
    with jax.enable_x64(True):
        wide = jax.tree.map(
            lambda x: np.asarray(x, np.float64) if np.asarray(x).dtype == np.float32 else x, args
        )
        kink, _, _ = kink_margin(fn, *wide)
    assert kink.margin >= margin, (
        f"a {kink.primitive} input lies {kink.margin:.2g} from its kink (< {margin:g}) at "
        f"{kink.where}, element {kink.index} of shape {kink.shape}: which side float32 "
        "round-off puts it on depends on the CPU's kernels, so two float32 computations of "
        "this network need not agree; use data or a seed that keeps the network away from its "
        "kinks"
    )
    return kink


def float64_apply(model: Any, **apply_kwargs: Any) -> Callable[[Any, Any], Any]:
    """``(variables, images) -> model.apply(variables, images, **apply_kwargs)`` with a
    ``dhel_jax.models.ContrastiveModel`` that computes in float64."""
    wide = {"dtype": jnp.float64, "param_dtype": jnp.float64}
    model = model.clone(encoder=model.encoder.clone(**wide), head=model.head.clone(**wide))
    return lambda variables, images: model.apply(variables, images, **apply_kwargs)
