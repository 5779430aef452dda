"""The probes of an evaluation, run on one frozen encoder's features: the linear probe of the
run's protocol (``fast``: ``probes.linear_probe_accuracy``; ``paper``: :mod:`dhel_jax.paper_probe`),
the kNN monitor, and the same two on the baselines of :mod:`dhel_jax.baselines`.
"""

from __future__ import annotations

import contextlib
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class ProbeRun:
    """What every probe of one evaluation shares: its settings, the run's config and model, the
    number of classes, the paper probe's mesh (None: its default) and progress bar."""

    settings: EvalSettings
    config: ml_collections.ConfigDict
    model: Any
    num_classes: int
    paper_mesh: Mesh | None = None
    progress: bool = False


def score_encoder(
    run: ProbeRun,
    variables: Any,
    splits: Mapping[str, tuple[Any, np.ndarray]],
    features: Mapping[str, Mapping[str, np.ndarray]],
    *,
    phase: Callable[[str], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, Any]:
    """``{"linear_probe": ..., "knn": ...}`` of the encoder ``variables``: the linear probe of
    the run's protocol and the kNN monitor, on ``features`` (``{"train"|"test": outputs}``) and
    the labels of ``splits`` (``{"train"|"test": (source, labels)}``); each runs inside
    ``phase("linear_probe")``, ``phase("knn")`` (a timer)."""
    settings = run.settings
    (train_x, train_y), (_, test_y) = splits["train"], splits["test"]
    train_f, test_f = features["train"]["features"], features["test"]["features"]
    with phase("linear_probe"):
        if settings.protocol == "fast":
            probe = _fast_probe(
                settings.fast_probe,
                (train_f, train_y),
                (test_f, test_y),
                num_classes=run.num_classes,
                seed=settings.seed,
            )
        else:
            view_kwargs = crop_flip_kwargs(run.config)
            paper = paper_linear_probe(
                lambda v, x: run.model.apply(v, x, train=False)["features"],
                variables,
                train_x,
                train_y,
                test_f,
                test_y,
                num_classes=run.num_classes,
                view_kwargs=view_kwargs,
                seed=settings.seed,
                mesh=run.paper_mesh,
                progress=run.progress,
                **settings.paper_probe,
            )
            probe = {**paper, "view_kwargs": view_kwargs}
    with phase("knn"):
        neighbours = knn(settings, train_f, train_y, test_f, test_y, run.num_classes)
    return {"linear_probe": {"protocol": settings.protocol, **probe}, "knn": neighbours}


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
    run: ProbeRun, splits: Mapping[str, tuple[Any, np.ndarray]], *, mesh: Mesh
) -> dict[str, Any]:
    """``eval.json["baselines"]``: the random-init encoder (the run's protocol) and the raw
    pixels (the ``fast`` probe), each ``{"linear_probe": ..., "knn": ...}``; features are
    extracted over ``mesh``."""
    settings, config, model = run.settings, run.config, run.model
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
    random_init = score_encoder(run, variables, splits, features)
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
                num_classes=run.num_classes,
                seed=settings.seed,
            ),
        },
        "knn": knn(settings, pixels_train, train_y, pixels_test, test_y, run.num_classes),
        "image_size": baselines.pixel_size(train_x.image_shape),
        "dim": int(pixels_train.shape[1]),
    }
    return {"random_init": random_init, "pixels": pixels}
