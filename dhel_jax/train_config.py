"""The pretraining config: :func:`default_config` (the fields every config in ``configs/``
sets), the loss it names (:func:`loss_from_config`) and :func:`validate_config`, which checks the
whole config once, before any data is read or anything compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from dhel_jax import augment, data, losses, models, optimizers
from dhel_jax._validation import check_int, check_number, check_optional_int
from dhel_jax.builders import augment_kwargs

# Loss keywords that are not hyper-parameters: they are set by the caller, not the config.
_LOSS_CALL_ARGS = frozenset({"axis_name", "return_aux"})
# Types of loss hyper-parameters whose SPEC default is None.
_LOSS_NONE_DEFAULT_TYPES = {"block_size": int}
# metrics.wasserstein_uniformity counts the M (M - 1) / 2 pairs in int32.
_MAX_GEOMETRY_BATCH = 65536


def loss_config_fields() -> dict[str, type]:
    """Every hyper-parameter of every loss in ``losses.LOSSES``, with its type.

    ``{'tau': float, 'symmetric': bool, 'sigma': float, 'include_augs': bool, 'kernel': str,
    't': float, 'gamma': float, 'alpha': float, 'lam': float, 'block_size': int}``.
    """
    fields: dict[str, type] = {}
    for name in losses.LOSSES:
        for key, default in losses.loss_hyperparameters(name).items():
            if key in _LOSS_CALL_ARGS:
                continue
            kind = _LOSS_NONE_DEFAULT_TYPES[key] if default is None else type(default)
            fields.setdefault(key, kind)
    return fields


def default_config() -> ml_collections.ConfigDict:
    """The fields of every pretraining config, with CIFAR-10 / ResNet-18 values.

    ``configs/*.py`` start from this and change what their dataset needs. ``loss`` holds the
    loss ``name`` and every hyper-parameter of every loss as a typed placeholder: ``None`` means
    the SPEC default of the chosen loss; setting one the chosen loss does not take is an error.
    """
    config = ml_collections.ConfigDict()
    config.dataset = "cifar10"
    config.data_dir = config_dict.placeholder(str)  # None: TFDS's default data directory.
    config.data_workers = 0  # grain worker processes decoding batches (0: threads only).

    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet18"
    config.model.stem = "cifar"
    config.model.num_filters = config_dict.placeholder(int)  # None: the model's own width.
    config.model.head_hidden_dim = 512
    config.model.head_out_dim = 128
    config.model.head_num_layers = 2
    config.model.dtype = "float32"

    config.loss = ml_collections.ConfigDict()
    config.loss.name = "dhel"
    for key, kind in loss_config_fields().items():
        config.loss[key] = config_dict.placeholder(kind)

    # Keyword arguments of augment.two_views; out_size None is the dataset's view size, and
    # normalize uses the dataset's per-channel mean and std.
    config.augment = ml_collections.ConfigDict()
    config.augment.out_size = config_dict.placeholder(int)
    config.augment.crop_scale = (0.08, 1.0)
    config.augment.crop_ratio = (3 / 4, 4 / 3)
    config.augment.flip_prob = 0.5
    config.augment.jitter_strength = 0.5
    config.augment.jitter_prob = 0.8
    config.augment.grayscale_prob = 0.2
    config.augment.blur_prob = 0.0
    config.augment.blur_sigma = (0.1, 2.0)
    config.augment.solarize_prob = 0.0
    config.augment.normalize = True

    # SimCLR's CIFAR setting: LARS, lr = base_lr * B / 256, linear warm-up then cosine decay.
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "lars"
    config.optimizer.base_lr = 1.0
    config.optimizer.lr_scaling = "linear"
    config.optimizer.end_lr = 0.0
    config.optimizer.warmup_epochs = 10.0
    config.optimizer.weight_decay = 1e-6
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.optimizer.trust_coefficient = 0.001
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8

    config.batch_size = 256  # Global, over all devices and processes.
    # Gradient caching (dhel_jax.grad_cache): each device's batch is embedded in this many
    # chunks, so activation memory falls as 1/k for a second forward pass; the gradient is
    # that of the global-batch loss, but BatchNorm normalises each chunk on its own (ghost
    # BatchNorm). 1: today's one-pass step, BatchNorm over the whole batch.
    config.embedding_chunks = 1
    config.num_epochs = 200
    config.num_train_steps = config_dict.placeholder(int)  # None: num_epochs of steps.
    config.seed = 0

    config.log_every_steps = 50
    # Every this many steps the step also logs the geometry of its batch (GEOMETRY_METRICS:
    # effective rank of features and projections, Wasserstein uniformity and alignment of the
    # projections); 0: never.
    config.geometry_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.max_checkpoints_to_keep = 3

    config.online_probe = ml_collections.ConfigDict()
    config.online_probe.enabled = True
    config.online_probe.learning_rate = 1e-3  # AdamW.
    config.online_probe.weight_decay = 0.0

    # Read by dhel-eval (dhel_jax.main.eval_main).
    config.eval = ml_collections.ConfigDict()
    config.eval.protocol = "fast"
    config.eval.knn_k = 200
    config.eval.knn_temperature = 0.1
    return config


def loss_from_config(loss_config: ml_collections.ConfigDict) -> Callable[..., Any]:
    """``losses.get_loss(name, **hparams)`` with the non-None hyper-parameters of the config.

    Raises:
      ValueError: unknown loss name, a set hyper-parameter the loss does not take, or an
        invalid value (unknown kernel, tau <= 0, ...).
    """
    name = loss_config.name
    if name not in losses.LOSSES:
        raise ValueError(
            f"config.loss.name: unknown loss {name!r}; accepted losses are "
            f"{', '.join(map(repr, losses.LOSSES))}."
        )
    accepted = [k for k in losses.loss_hyperparameters(name) if k not in _LOSS_CALL_ARGS]
    hparams = {k: v for k, v in loss_config.items() if k != "name" and v is not None}
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ValueError(
            f"config.loss.{unknown[0]} is set but loss {name!r} takes "
            f"{', '.join(accepted)}; leave the other fields at None."
        )
    try:
        return losses.get_loss(name, **hparams)
    except ValueError as e:
        raise ValueError(f"config.loss: {e}") from e


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate_config(
    config: ml_collections.ConfigDict,
    *,
    device_count: int | None = None,
    process_count: int | None = None,
) -> None:
    """Checks the whole config before any data is read or anything is compiled.

    Names (dataset, model, stem, dtype, loss, kernel, optimiser, schedule), ranges, the loss
    hyper-parameters, the augmentation arguments (by tracing ``two_views`` on shapes only) and
    that the global batch splits evenly over ``device_count`` devices (default: all) and
    ``process_count`` processes.

    Raises:
      ValueError: naming the bad field, its value and what is accepted.
    """
    device_count = jax.device_count() if device_count is None else device_count
    process_count = jax.process_count() if process_count is None else process_count
    try:
        info = data.get_dataset_info(config.dataset)
    except ValueError as e:
        raise ValueError(f"config.dataset: {e}") from e
    _validate_model(config.model)
    loss_from_config(config.loss)
    _validate_optimizer(config.optimizer)
    _validate_batch(config, device_count, process_count)
    check_number(config.num_epochs, "config.num_epochs", strict=True)
    check_optional_int(config.num_train_steps, "config.num_train_steps")
    for field in ("log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep"):
        check_int(config[field], f"config.{field}")
    check_int(config.seed, "config.seed", minimum=0)
    check_int(config.data_workers, "config.data_workers", minimum=0)
    check_number(
        config.online_probe.learning_rate, "config.online_probe.learning_rate", strict=True
    )
    check_number(config.online_probe.weight_decay, "config.online_probe.weight_decay")
    # The checks EvalSettings makes of the same fields.
    check_int(config.eval.knn_k, "config.eval.knn_k")
    check_number(config.eval.knn_temperature, "config.eval.knn_temperature", strict=True)

    # The augmentation checks its arguments at trace time: trace it on shapes only.
    try:
        jax.eval_shape(
            lambda x, k: augment.two_views(x, k, **augment_kwargs(config)),
            jax.ShapeDtypeStruct((2, *info.image_shape), jnp.uint8),
            jax.ShapeDtypeStruct((2,), jnp.uint32),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"config.augment: {err}") from err


def _validate_model(m: ml_collections.ConfigDict) -> None:
    for field, value, accepted in (
        ("name", m.name, tuple(models.MODELS)),
        ("stem", m.stem, models.STEMS),
        ("dtype", m.dtype, tuple(models.DTYPES)),
    ):
        _require(
            value in accepted,
            f"config.model.{field}: unknown value {value!r}; accepted values are "
            f"{', '.join(map(repr, accepted))}.",
        )
    for field in ("head_hidden_dim", "head_out_dim", "head_num_layers"):
        check_int(m[field], f"config.model.{field}")
    check_optional_int(m.num_filters, "config.model.num_filters")


def _validate_optimizer(o: ml_collections.ConfigDict) -> None:
    _require(
        o.name in optimizers.OPTIMIZERS,
        f"config.optimizer.name: unknown optimizer {o.name!r}; accepted values are "
        f"{', '.join(map(repr, optimizers.OPTIMIZERS))}.",
    )
    _require(
        o.lr_scaling in optimizers.LR_SCALINGS,
        f"config.optimizer.lr_scaling: unknown value {o.lr_scaling!r}; accepted values are "
        f"{', '.join(map(repr, optimizers.LR_SCALINGS))}.",
    )
    for field, low, strict in (
        ("base_lr", 0.0, True),
        ("end_lr", 0.0, False),
        ("warmup_epochs", 0.0, False),
        ("weight_decay", 0.0, False),
        ("momentum", 0.0, False),
        ("trust_coefficient", 0.0, True),
        ("eps", 0.0, True),
    ):
        check_number(o[field], f"config.optimizer.{field}", minimum=low, strict=strict)


def _validate_batch(
    config: ml_collections.ConfigDict, device_count: int, process_count: int
) -> None:
    """The batch splits over the devices, processes and embedding chunks, and the online
    geometry can count its pairs."""
    b = config.batch_size
    check_int(b, "config.batch_size", minimum=2, reason="the contrastive losses need negatives")
    _require(
        b % device_count == 0,
        f"config.batch_size = {b} does not split evenly over the {device_count} devices; use a "
        f"multiple of {device_count} (e.g. {(b // device_count + 1) * device_count}).",
    )
    _require(
        b % process_count == 0,
        f"config.batch_size = {b} does not split evenly over the {process_count} processes.",
    )
    k = check_int(config.embedding_chunks, "config.embedding_chunks", reason="1: one pass")
    _require(
        b % (device_count * k) == 0,
        f"config.batch_size = {b} does not split into config.embedding_chunks = {k} chunks on "
        f"each of the {device_count} devices; use a batch that is a multiple of "
        f"{device_count * k} (e.g. {(b // (device_count * k) + 1) * device_count * k}) or "
        f"fewer chunks.",
    )
    g = check_int(
        config.geometry_every_steps, "config.geometry_every_steps", minimum=0, reason="0: off"
    )
    _require(
        g == 0 or b <= _MAX_GEOMETRY_BATCH,
        f"config.geometry_every_steps = {g} with config.batch_size = {b}: the online "
        f"Wasserstein uniformity counts all pairs of at most {_MAX_GEOMETRY_BATCH} rows; set "
        f"config.geometry_every_steps = 0.",
    )
