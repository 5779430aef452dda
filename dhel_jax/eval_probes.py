"""The probes of an evaluation, run on one frozen encoder's features: the linear probe of the
run's protocol (``fast``: ``probes.linear_probe_accuracy``; ``paper``: :mod:`dhel_jax.paper_probe`),
the kNN monitor, and the same two on the baselines of :mod:`dhel_jax.baselines`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from dhel_jax import baselines, builders, probes
from dhel_jax.eval_settings import FAST_PROBE_DEFAULTS, EvalSettings
from dhel_jax.features import extract_features
from dhel_jax.paper_probe import crop_flip_kwargs, paper_linear_probe


def score_encoder(
    settings: EvalSettings,
    config: ml_collections.ConfigDict,
    model: Any,
    variables: Any,
    splits: Mapping[str, tuple[Any, np.ndarray]],
    features: Mapping[str, Mapping[str, np.ndarray]],
    *,
    num_classes: int,
    mesh: Mesh | None,
    progress: bool,
    phase: Callable[[str], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, Any]:
    """``{"linear_probe": ..., "knn": ...}`` of one encoder: the linear probe of the run's
    protocol and the kNN monitor, on ``features`` (``{"train"|"test": outputs}``) and the labels
    of ``splits``; each runs inside ``phase("linear_probe")``, ``phase("knn")`` (a timer)."""
    with phase("linear_probe"):
        probe = linear_probe(
            settings,
            config,
            model,
            variables,
            splits,
            features,
            num_classes=num_classes,
            mesh=mesh,
            progress=progress,
        )
    with phase("knn"):
        neighbours = knn(
            settings,
            features["train"]["features"],
            splits["train"][1],
            features["test"]["features"],
            splits["test"][1],
            num_classes,
        )
    return {"linear_probe": {"protocol": settings.protocol, **probe}, "knn": neighbours}


def linear_probe(
    settings: EvalSettings,
    config: ml_collections.ConfigDict,
    model: Any,
    variables: Any,
    splits: Mapping[str, tuple[Any, np.ndarray]],
    features: Mapping[str, Mapping[str, np.ndarray]],
    *,
    num_classes: int,
    mesh: Mesh | None,
    progress: bool,
) -> dict[str, Any]:
    """The linear probe of ``settings.protocol`` on the encoder's ``features``."""
    (train_x, train_y), (_, test_y) = splits["train"], splits["test"]
    if settings.protocol == "fast":
        return _fast_probe(
            settings.fast_probe,
            (features["train"]["features"], train_y),
            (features["test"]["features"], test_y),
            num_classes=num_classes,
            seed=settings.seed,
        )
    view_kwargs = crop_flip_kwargs(config)
    result: dict[str, Any] = paper_linear_probe(
        lambda v, x: model.apply(v, x, train=False)["features"],
        variables,
        train_x,
        train_y,
        features["test"]["features"],
        test_y,
        num_classes=num_classes,
        view_kwargs=view_kwargs,
        seed=settings.seed,
        mesh=mesh,
        progress=progress,
        **settings.paper_probe,
    )
    result["view_kwargs"] = view_kwargs
    return result


def _fast_probe(
    fast_probe: Mapping[str, Any],
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    num_classes: int,
    seed: int,
) -> dict[str, Any]:
    """``probes.linear_probe_accuracy`` of ``(features, labels)`` pairs."""
    return probes.linear_probe_accuracy(
        jnp.asarray(train[0]),
        jnp.asarray(train[1]),
        jnp.asarray(test[0]),
        jnp.asarray(test[1]),
        num_classes=num_classes,
        seed=seed,
        **fast_probe,
    )


def knn(
    settings: EvalSettings,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
) -> dict[str, Any]:
    """The kNN monitor's record: ``probes.knn_accuracy`` with the settings' k and T."""
    accuracy = probes.knn_accuracy(
        jnp.asarray(train_features),
        jnp.asarray(train_labels),
        jnp.asarray(test_features),
        jnp.asarray(test_labels),
        num_classes=num_classes,
        k=settings.knn_k,
        temperature=settings.knn_temperature,
        chunk_size=settings.knn_chunk_size,
    )
    return {
        "accuracy": accuracy,
        "k": settings.knn_k,
        "temperature": settings.knn_temperature,
        "on": "features",
    }


def score_baselines(
    settings: EvalSettings,
    config: ml_collections.ConfigDict,
    model: Any,
    splits: Mapping[str, tuple[Any, np.ndarray]],
    *,
    num_classes: int,
    mesh: Mesh,
    paper_mesh: Mesh | None,
    progress: bool,
) -> dict[str, Any]:
    """``eval.json["baselines"]``: the random-init encoder (the run's protocol) and the raw
    pixels (the ``fast`` probe), each ``{"linear_probe": ..., "knn": ...}``."""
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    transform = builders.eval_transform_kwargs(config)
    size = builders.view_size(config)
    variables, bn_examples = baselines.random_init_variables(
        model,
        config.seed,
        train_x,
        view_shape=(size, size, train_x.image_shape[-1]),
        transform_kwargs=transform,
        batch_size=settings.batch_size,
        mesh=mesh,
    )
    features = {
        key: extract_features(
            model,
            variables,
            images,
            batch_size=settings.batch_size,
            mesh=mesh,
            transform_kwargs=transform,
        )
        for key, (images, _) in splits.items()
    }
    random_init = score_encoder(
        settings,
        config,
        model,
        variables,
        splits,
        features,
        num_classes=num_classes,
        mesh=paper_mesh,
        progress=progress,
    )
    random_init["bn_examples"] = bn_examples
    del features
    pixels_train, pixels_test = baselines.pixel_features(train_x), baselines.pixel_features(test_x)
    fast_probe = settings.fast_probe if settings.protocol == "fast" else FAST_PROBE_DEFAULTS
    pixels = {
        "linear_probe": {
            "protocol": "fast",
            **_fast_probe(
                fast_probe,
                (pixels_train, train_y),
                (pixels_test, test_y),
                num_classes=num_classes,
                seed=settings.seed,
            ),
        },
        "knn": knn(settings, pixels_train, train_y, pixels_test, test_y, num_classes),
        "image_size": baselines.pixel_size(train_x.image_shape),
        "dim": int(pixels_train.shape[1]),
    }
    return {"random_init": random_init, "pixels": pixels}
