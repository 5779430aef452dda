"""Kernels of the kernel contrastive loss (KCL), as functions of squared distance.

docs/spec.md, "KCL kernels", with ``r = |x - y|`` and ``r2 = r^2``:

============== ============================== ====================== ==========
kernel         ``K_U`` (energy)               ``K_A`` (alignment)    valid t
============== ============================== ====================== ==========
gaussian       ``exp(-t r^2)``                same                   t > 0
log            ``-0.5 log(t r^2 + 1)``        ``-log(t r^2 + 1)``    t > 0
imq            ``t / sqrt(t^2 + r^2)``        same                   t > 0
riesz          ``-r^{|s|}`` (s = t)           same                   s < 0
gaussian_riesz ``r^{-s}`` (s > 0),            ``exp(-2 r^2)``        t != 0
               ``-r^{|s|}`` (s < 0)
============== ============================== ====================== ==========

Each kernel is a pair of pure functions ``k(r2, t) -> values``, elementwise,
written so that values and gradients stay finite at ``r2 = 0`` wherever the
kernel itself is finite there (``-r^{|s|}`` has an infinite derivative at 0
for ``|s| < 2``; we use the subgradient 0, as for ``|x|`` at 0).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
KernelFn = Callable[[Array, Array], Array]


def power(r2: Array, p: Array) -> Array:
    """``r^p = (r2)^(p/2)`` for p > 0, with value and gradient 0 at r2 = 0 (kernels and
    ``metrics.alignment``)."""
    pos = r2 > 0
    safe = jnp.where(pos, r2, 1.0)
    return jnp.where(pos, safe ** (p / 2), 0.0)


def inverse_power(r2: Array, s: Array) -> Array:
    """``r^{-s} = r2^(-s/2)`` for s > 0 (infinite at coincident points, as it should be)."""
    return r2 ** (-s / 2)


def gaussian(r2: Array, t: Array) -> Array:
    """Gaussian kernel ``exp(-t r^2)``."""
    return jnp.exp(-t * r2)


def log_energy(r2: Array, t: Array) -> Array:
    """Logarithmic energy kernel ``-0.5 log(t r^2 + 1)``."""
    return -0.5 * jnp.log1p(t * r2)


def log_alignment(r2: Array, t: Array) -> Array:
    """Logarithmic alignment kernel ``-log(t r^2 + 1)``."""
    return -jnp.log1p(t * r2)


def imq(r2: Array, t: Array) -> Array:
    """Inverse multiquadric kernel ``t / sqrt(t^2 + r^2)``."""
    return t * jax.lax.rsqrt(t * t + r2)


def riesz(r2: Array, s: Array) -> Array:
    """Riesz kernel for s < 0: ``-r^{|s|}``."""
    return -power(r2, -s)


def gaussian_alignment_t2(r2: Array, t: Array) -> Array:
    """``exp(-2 r^2)``: the fixed alignment kernel of ``gaussian_riesz``."""
    del t
    return jnp.exp(-2.0 * r2)


class Kernel(NamedTuple):
    """A KCL kernel: ``energy(r2, t)`` is ``K_U``, ``alignment(r2, t)`` is ``K_A``."""

    name: str
    energy: KernelFn
    alignment: KernelFn


KERNEL_NAMES = ("gaussian", "log", "imq", "riesz", "gaussian_riesz")


def get_kernel(name: str, t: float | Array) -> Kernel:
    """Returns the kernel ``name`` for parameter ``t`` after validating ``t``.

    ``t`` may be a traced array for ``gaussian``, ``log`` and ``imq``; the
    Riesz kernels branch on the sign of ``s = t``, which must then be a Python
    number.

    Raises:
      ValueError: unknown ``name``, or ``t`` outside the kernel's valid range
        (``riesz`` with s > 0 is rejected: its alignment term ``-2 mean r^{-s}``
        is unbounded below; use ``gaussian_riesz`` for a positive Riesz energy).
    """
    if name not in KERNEL_NAMES:
        raise ValueError(
            f"kcl: unknown kernel {name!r}; accepted kernels are {', '.join(map(repr, KERNEL_NAMES))}."
        )
    concrete = isinstance(t, numbers.Real)
    if name in ("gaussian", "log", "imq"):
        if concrete and not t > 0:
            raise ValueError(f"kcl: kernel {name!r} needs t > 0; got t = {t!r}.")
        energies: dict[str, KernelFn] = {"gaussian": gaussian, "log": log_energy, "imq": imq}
        alignments: dict[str, KernelFn] = {"gaussian": gaussian, "log": log_alignment, "imq": imq}
        return Kernel(name, energies[name], alignments[name])
    if not concrete:
        raise TypeError(
            f"kcl: kernel {name!r} branches on the sign of s = t, which must be a Python number; "
            f"got {type(t).__name__}."
        )
    if name == "riesz":
        if not t < 0:
            raise ValueError(
                f"kcl: kernel 'riesz' needs s = t < 0 (energy -r^|s|); got t = {t!r}. For s > 0 the "
                "alignment term -2 mean r^{-s} is unbounded below; use kernel='gaussian_riesz', "
                "which pairs the Riesz energy r^{-s} with a Gaussian alignment."
            )
        return Kernel(name, riesz, riesz)
    if t == 0:
        raise ValueError("kcl: kernel 'gaussian_riesz' needs s = t != 0; got t = 0.")
    signed: KernelFn = inverse_power if t > 0 else riesz
    return Kernel(name, signed, gaussian_alignment_t2)
