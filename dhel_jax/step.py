"""The pure pretraining step: train state, one step on a global batch, and its jitted form.

It imports jax, flax, optax and dhel_jax's pure modules (``augment``, which needs dm_pix,
``grad_cache``, ``metrics``, ``models``, ``parallel``) only: no configs, ml_collections, grain,
orbax or TensorFlow, so that it runs on an accelerator host with no data stack
(``benchmarks/accelerator_check.py``) and compiles for a topology the host does not have.
``dhel_jax.train`` builds its arguments from a config and runs it in the loop.

One step, on the global batch of B images (uint8, sharded over a ``('data',)`` mesh of every
device of every process; the train state replicated):

1. two SimCLR views of every image, drawn on device from per-example keys derived from
   ``fold_in(state.rng, state.step)`` (so they do not depend on the number of devices);
2. encoder f and projection head g on the 2B views, interleaved so that rows 2i and 2i + 1 are
   the views of image i: BatchNorm normalises over all 2B views (as SimCLR's concatenated
   batch) and every device keeps the views of its own images;
3. the contrastive loss (a function from ``losses.get_loss``) on the global (B, P) projections:
   XLA partitions it and inserts the collectives;
4. gradients, the optax update (e.g. LARS / SGD / AdamW with the SimCLR learning-rate
   schedule of ``dhel_jax.optimizers``);
5. the online linear probe: a linear classifier on ``stop_gradient(features)`` trained with its
   own optimiser on the batch labels (labels < 0, e.g. STL-10's unlabelled split, are ignored),
   reporting how linearly separable the representation is as training goes.

With ``embedding_chunks = k > 1``, steps 2-4 run by gradient caching (``dhel_jax.grad_cache``):
the views are embedded in k chunks of every device's batch, the loss and its gradient are those
of the global batch, and activation memory falls as 1/k for a second forward pass; BatchNorm
then normalises each chunk on its own (ghost BatchNorm).

The step returns the new state and scalar metrics: the loss and its aux terms (alignment,
energy, per-view energies, contrastive accuracy), learning rate, gradient norm, probe loss and
accuracy, and a finiteness flag; every ``geometry_every_steps`` steps also the geometry of the
batch (:data:`GEOMETRY_METRICS`, by ``dhel_jax.metrics``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from dhel_jax import augment, grad_cache, models, parallel
from dhel_jax import metrics as metrics_lib

Array = jax.Array

# The online geometry of the batch (geometry_every_steps), in the step's metrics.
GEOMETRY_METRICS = (
    "features_effective_rank",
    "projections_effective_rank",
    "projections_wasserstein_uniformity",
    "projections_alignment",
)


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from one step to the next (all arrays).

    Attributes:
      step: int32 scalar, the number of steps taken.
      params: ``{"encoder": ..., "head": ...}`` model parameters.
      batch_stats: BatchNorm running statistics.
      opt_state: optax state of the model optimiser.
      probe_params: ``{"kernel": (F, classes), "bias": (classes,)}`` of the online linear
        probe, ``{}`` when it is disabled.
      probe_opt_state: optax state of the probe optimiser (``{}`` when disabled).
      rng: uint32 key data of the run's base PRNG key (``jax.random.key_data``).
    """

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any
    probe_params: Any
    probe_opt_state: Any
    rng: Array


def create_train_state(
    rng: Array,
    *,
    model: models.ContrastiveModel,
    tx: optax.GradientTransformation,
    probe_tx: optax.GradientTransformation | None,
    image_shape: Sequence[int],
    num_classes: int,
) -> TrainState:
    """Initialises a :class:`TrainState` from a PRNG key.

    Args:
      rng: a PRNG key (new-style or raw uint32).
      image_shape: ``(H, W, C)`` of the encoder's inputs (the augmented views).
      num_classes: outputs of the online probe.
      probe_tx: the probe's optimiser; ``None`` disables the probe.
    """
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    init_key, run_key = jax.random.split(rng)
    variables = models.init_variables(model, init_key, image_shape)
    params = variables["params"]
    probe_params: Any = {}
    probe_opt_state: Any = {}
    if probe_tx is not None:
        num_features = model.encoder.num_features
        probe_params = {
            "kernel": jnp.zeros((num_features, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32),
        }
        probe_opt_state = probe_tx.init(probe_params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        probe_params=probe_params,
        probe_opt_state=probe_opt_state,
        rng=jax.random.key_data(run_key),
    )


def _all_finite(tree: Any) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def _probe_step(
    state: TrainState, features: Array, labels: Array, probe_tx: optax.GradientTransformation
) -> tuple[Any, Any, dict[str, Array]]:
    """One optimiser step of the linear probe on ``features`` (2B, F) and ``labels`` (2B,)."""
    valid = labels >= 0
    count = jnp.maximum(valid.sum(), 1)

    def probe_loss(probe_params):
        logits = features @ probe_params["kernel"] + probe_params["bias"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        return jnp.sum(jnp.where(valid, ce, 0.0)) / count, logits

    (loss, logits), grads = jax.value_and_grad(probe_loss, has_aux=True)(state.probe_params)
    updates, opt_state = probe_tx.update(grads, state.probe_opt_state, state.probe_params)
    correct = jnp.where(valid, jnp.argmax(logits, -1) == labels, False)
    metrics = {"probe_loss": loss, "probe_accuracy": correct.sum() / count}
    return optax.apply_updates(state.probe_params, updates), opt_state, metrics


def online_geometry(features: Array, projections: Array) -> dict[str, Array]:
    """:data:`GEOMETRY_METRICS` of a step's batch, by ``dhel_jax.metrics`` (docs/spec.md).

    Args:
      features: (2B, F) encoder outputs, projections: (2B, P) head outputs, of interleaved
        views (rows 2i and 2i + 1 are the two views of image i).

    Returns:
      ``features_effective_rank``, ``projections_effective_rank`` and
      ``projections_wasserstein_uniformity`` of the B first views (one row per image, as
      ``dhel-eval`` measures them), ``projections_alignment`` between the two views.
    """
    b = features.shape[0] // 2
    f = features.reshape((b, 2, -1))
    z = projections.reshape((b, 2, -1))
    return {
        "features_effective_rank": metrics_lib.effective_rank(f[:, 0]),
        "projections_effective_rank": metrics_lib.effective_rank(z[:, 0]),
        # All b (b - 1) / 2 pairs, in row blocks beyond 1024 rows (O(512 b) memory).
        "projections_wasserstein_uniformity": metrics_lib.wasserstein_uniformity(
            z[:, 0], block_size=None if b <= 1024 else 512
        ),
        "projections_alignment": metrics_lib.alignment(z[:, 0], z[:, 1]),
    }


def train_step(
    state: TrainState,
    batch: Mapping[str, Array],
    *,
    model: models.ContrastiveModel,
    tx: optax.GradientTransformation,
    loss_fn: Callable[..., Any],
    learning_rate_fn: optax.Schedule,
    view_kwargs: Mapping[str, Any],
    probe_tx: optax.GradientTransformation | None = None,
    sharding: NamedSharding | None = None,
    embedding_chunks: int = 1,
    geometry_every_steps: int = 0,
) -> tuple[TrainState, dict[str, Array]]:
    """One pretraining step on a global batch (pure; see the module docstring).

    Args:
      state: the current :class:`TrainState`.
      batch: ``{"image": uint8 (B, H, W, C), "label": int32 (B,)}``, and ``"size"``: int32
        (B, 2) for images stored in canvases (``data.DatasetInfo.resize_shorter``).
      model, tx, loss_fn, learning_rate_fn: the model, its optimiser, a loss from
        ``losses.get_loss`` and the optimiser's learning-rate schedule (for the metrics).
      view_kwargs: keyword arguments of ``augment.two_views``.
      probe_tx: the online probe's optimiser (``None``: no probe).
      sharding: the batch sharding, to keep the interleaved views on their images' devices.
      embedding_chunks: k; k > 1 computes the same global-batch gradient by gradient caching
        over k chunks of every device's batch (``grad_cache.contrastive_gradients``), with
        BatchNorm statistics per chunk; 1 is the one-pass step.
      geometry_every_steps: N > 0 adds :data:`GEOMETRY_METRICS` (:func:`online_geometry` of
        this batch) on the steps whose number after the update is a multiple of N, NaN on the
        others (computed under ``lax.cond``: nothing is spent on those); 0 leaves them out.

    Returns:
      ``(new_state, metrics)``, metrics being float32 scalars plus the bool ``finite`` (loss,
      gradient norm and new parameters all finite).
    """
    images, labels = batch["image"], batch["label"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    x1, x2 = augment.two_views(images, key, sizes=batch.get("size"), **view_kwargs)
    b = images.shape[0]
    views = jnp.stack([x1, x2], axis=1).reshape((2 * b, *x1.shape[1:]))
    if sharding is not None:
        views = jax.lax.with_sharding_constraint(views, sharding)

    (loss, aux), outputs, grads, batch_stats = grad_cache.contrastive_gradients(
        state.params,
        state.batch_stats,
        views,
        model=model,
        loss_fn=loss_fn,
        num_chunks=embedding_chunks,
        sharding=sharding,
    )
    features = outputs["features"]
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = {"loss": loss}
    for name, value in aux.items():
        metrics["contrastive_accuracy" if name == "accuracy" else name] = value
    metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
    metrics["grad_norm"] = grad_norm

    probe_params, probe_opt_state = state.probe_params, state.probe_opt_state
    if probe_tx is not None:
        probe_params, probe_opt_state, probe_metrics = _probe_step(
            state, jax.lax.stop_gradient(features), jnp.repeat(labels, 2), probe_tx
        )
        metrics.update(probe_metrics)
    if geometry_every_steps:
        due = (state.step + 1) % geometry_every_steps == 0
        metrics.update(
            jax.lax.cond(
                due,
                online_geometry,
                lambda *_: {k: jnp.full((), jnp.nan, jnp.float32) for k in GEOMETRY_METRICS},
                jax.lax.stop_gradient(features),
                jax.lax.stop_gradient(outputs["projections"]),
            )
        )
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    metrics["finite"] = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
    new_state = dataclasses.replace(
        state,
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        probe_params=probe_params,
        probe_opt_state=probe_opt_state,
    )
    return new_state, metrics


def make_train_step(
    mesh: Mesh,
    *,
    compiler_options: Mapping[str, Any] | None = None,
    **step_kwargs: Any,
) -> Callable[[TrainState, Mapping[str, Array]], tuple[TrainState, dict[str, Array]]]:
    """:func:`train_step` jitted over ``mesh``: batch sharded on ``'data'``, state replicated
    and donated, metrics replicated.

    ``step_kwargs`` are :func:`train_step`'s keywords (``model``, ``tx``, ``loss_fn``,
    ``learning_rate_fn``, ``view_kwargs`` and the optional ones) but ``sharding``, which is the
    mesh's batch sharding; a name :func:`train_step` does not take raises ``TypeError`` here.
    ``compiler_options`` are XLA options for this step only (e.g.
    ``{"xla_backend_optimization_level": 0}`` compiles CPU smoke tests twice as fast).
    """
    accepted = set(inspect.signature(train_step).parameters) - {"state", "batch", "sharding"}
    unknown = sorted(set(step_kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"make_train_step: unknown keyword(s) {', '.join(map(repr, unknown))}; accepted are "
            f"{', '.join(sorted(accepted | {'compiler_options'}))}."
        )
    batch_sharding = parallel.batch_sharding(mesh)
    replicated = parallel.replicated(mesh)
    if "view_kwargs" in step_kwargs:  # a copy: later changes to the caller's mapping stay out
        step_kwargs["view_kwargs"] = dict(step_kwargs["view_kwargs"])
    step = functools.partial(train_step, sharding=batch_sharding, **step_kwargs)
    return jax.jit(
        step,
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=dict(compiler_options) if compiler_options else None,
    )
