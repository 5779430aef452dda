"""Optimisers and learning-rate schedules for contrastive pre-training (all optax).

* ``lr_schedule``: linear warm-up from 0 to the peak rate, then cosine decay to ``end_value``,
  with the peak scaled by the batch size as in SimCLR (``base_lr * B / 256``).
* ``make_optimizer("lars" | "sgd" | "adamw", ...)``: ``optax.lars`` (You et al., 2017), SGD with
  momentum and ``optax.adamw``. In all three, weight decay skips biases and BatchNorm parameters
  (every parameter of rank <= 1), and LARS also skips them in the trust-ratio adaptation, so they
  get plain momentum SGD; ``exclude_bias_and_norm`` is that mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import optax

from dhel_jax._validation import check_choice, check_int, check_number

OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALINGS = ("linear", "sqrt", "none")

# Leaf names of Flax biases and normalisation parameters (BatchNorm/LayerNorm scale and bias).
_NO_DECAY_NAMES = frozenset({"bias", "scale"})


def exclude_bias_and_norm(params: Any) -> Any:
    """The weight-decay / trust-ratio mask: ``True`` for weights, ``False`` for biases and norms.

    A leaf is masked out (``False``) when it is named ``bias`` or ``scale`` (Dense/Conv biases,
    BatchNorm/LayerNorm parameters) or has rank <= 1; convolution and dense kernels get ``True``.
    Works on any pytree of arrays (or shape-dtype structs), so it can be passed to optax as a
    callable mask, which optax applies to the parameters or to the updates.
    """

    def keep(path: tuple[Any, ...], leaf: Any) -> bool:
        name = _key_name(path[-1]) if path else None
        return name not in _NO_DECAY_NAMES and len(getattr(leaf, "shape", ())) > 1

    return jax.tree_util.tree_map_with_path(keep, params)


def _key_name(key: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def lr_schedule(
    *,
    base_lr: float,
    batch_size: int,
    total_steps: int,
    warmup_steps: int,
    lr_scaling: str = "linear",
    end_value: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up then cosine decay, peaking at the batch-scaled rate (SimCLR).

    peak = base_lr * B / 256 (``"linear"``), base_lr * sqrt(B) (``"sqrt"``, SimCLR's square-root
    rule, used there with base_lr 0.075) or base_lr (``"none"``). For step t:
    lr(t) = peak * t / W for t < W, then end + (peak - end) * (1 + cos(pi * (t - W) / (T - W))) / 2
    up to t = T, and ``end_value`` after; W = ``warmup_steps``, T = ``total_steps``.
    """
    fn = "lr_schedule"
    check_choice(lr_scaling, "lr_scaling", LR_SCALINGS, fn=fn)
    check_number(base_lr, "base_lr", fn=fn, minimum=0.0, strict=True)
    check_int(batch_size, "batch_size", fn=fn, minimum=1)
    check_int(total_steps, "total_steps", fn=fn, minimum=1)
    check_int(warmup_steps, "warmup_steps", fn=fn, minimum=0)
    check_number(end_value, "end_value", fn=fn, minimum=0.0)
    if warmup_steps >= total_steps:
        raise ValueError(
            f"{fn}: warmup_steps must be < total_steps (the cosine phase needs at least one "
            f"step); got warmup_steps={warmup_steps}, total_steps={total_steps}."
        )
    if lr_scaling == "linear":
        peak = base_lr * batch_size / 256
    elif lr_scaling == "sqrt":
        peak = base_lr * math.sqrt(batch_size)
    else:
        peak = base_lr
    if end_value > peak:
        raise ValueError(
            f"{fn}: end_value must be <= the peak learning rate {peak}; got end_value={end_value}."
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=end_value,
    )


def make_optimizer(
    name: str,
    *,
    learning_rate: float | optax.Schedule,
    weight_decay: float,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    nesterov: bool = False,
    mask: Any | Callable[[Any], Any] = exclude_bias_and_norm,
) -> optax.GradientTransformation:
    """Builds an optax optimiser by name.

    * ``"lars"``: ``optax.lars``. For masked-in leaves (kernels) g' = g + wd * w and the update
      is scaled by the trust ratio eta * ||w|| / ||g'|| (1 if either norm is 0); masked-out leaves
      (biases, BatchNorm) use g' = g. Then v <- momentum * v + lr * g', w <- w - v.
    * ``"sgd"``: coupled L2 decay on masked-in leaves, g' = g + wd * w, then torch-style momentum
      v <- momentum * v + g', w <- w - lr * v (``nesterov``: w <- w - lr * (g' + momentum * v)).
    * ``"adamw"``: ``optax.adamw`` with decoupled decay lr * wd * w on masked-in leaves only.

    ``mask`` (a pytree of bools or a callable of the params; ``True`` = decay/adapt) defaults to
    ``exclude_bias_and_norm``; pass ``True`` to decay everything.
    """
    fn = "make_optimizer"
    check_choice(name, "optimizer name", OPTIMIZERS, fn=fn)
    check_number(weight_decay, "weight_decay", fn=fn, minimum=0.0)
    if not callable(learning_rate):
        check_number(learning_rate, "learning_rate", fn=fn, minimum=0.0)
    if name == "lars":
        return optax.lars(
            learning_rate,
            weight_decay=weight_decay,
            weight_decay_mask=mask,
            trust_coefficient=trust_coefficient,
            trust_ratio_mask=mask,
            momentum=momentum,
            nesterov=nesterov,
        )
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask=mask),
            optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
        )
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
