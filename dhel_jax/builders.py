"""Config -> objects, shared by training (``dhel_jax.train``) and evaluation
(``dhel_jax.evaluate``): the model of ``config.model``, the image size the encoder sees, and the
keyword arguments of the training views and of the evaluation transform, so that evaluation
sees the images the way training did. Also the name of the run's metrics log, which training
writes and evaluation plots.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from dhel_jax import data, models

# <workdir>/metrics.jsonl: one JSON line of averaged training metrics per logged step.
METRICS_FILENAME = "metrics.jsonl"


def build_model(config: ml_collections.ConfigDict) -> models.ContrastiveModel:
    """The encoder + projection head of ``config.model``."""
    m = config.model
    extra = {} if m.num_filters is None else {"num_filters": m.num_filters}
    return models.get_model(
        m.name,
        stem=m.stem,
        head_hidden_dim=m.head_hidden_dim,
        head_out_dim=m.head_out_dim,
        head_num_layers=m.head_num_layers,
        dtype=m.dtype,
        **extra,
    )


def view_size(config: ml_collections.ConfigDict) -> int:
    """Side of the images the encoder sees (training views and evaluation images)."""
    size = config.augment.out_size
    return data.get_dataset_info(config.dataset).view_size if size is None else size


def augment_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments of ``augment.two_views`` for ``config``."""
    info = data.get_dataset_info(config.dataset)
    kwargs = {k: v for k, v in config.augment.items() if k != "normalize"}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    kwargs["out_size"] = view_size(config)
    if config.augment.normalize:
        kwargs["mean"], kwargs["std"] = info.mean, info.std
    return kwargs


def eval_transform_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments of ``augment.eval_transform`` matching the training views of
    ``config``: the dataset's centre crop resized to the view size, the same normalisation."""
    info = data.get_dataset_info(config.dataset)
    kwargs: dict[str, Any] = {
        "out_size": view_size(config),
        "crop_fraction": info.eval_crop_fraction,
    }
    if config.augment.normalize:
        kwargs["mean"], kwargs["std"] = info.mean, info.std
    return kwargs
