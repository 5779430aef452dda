"""The evaluation program of a pretraining checkpoint (``dhel-eval``): :func:`evaluate` runs its
phases and writes ``eval.json``; :func:`summary` prints it. Each phase lives in its own module.

``dhel-eval --workdir runs/NAME [--step N] [--protocol fast|paper]`` (``dhel_jax.main``) calls
:func:`evaluate`, which

1. restores the run's config, parameters and BatchNorm statistics read-only
   (``checkpointing.restore_for_eval``; nothing under ``<workdir>/checkpoints`` is ever written);
2. extracts frozen encoder features f(x) and projections g(f(x)) of the dataset's train and test
   splits under the deterministic evaluation transform (``augment.eval_transform``: centre crop,
   resize to the training view size, the training normalisation), BatchNorm in inference mode,
   each batch sharded over a ``('data',)`` mesh of the local devices
   (:func:`dhel_jax.features.extract_features`). The splits are image sources (``data.open_split``): small datasets are decoded into host
   memory once; the others (``in_memory=False``: STL-10, ImageNet-100) are read batch by batch,
   in order, a few batches ahead, for the extraction, the paper probe's epochs and the
   baselines alike, so that host memory holds their features, never their images
   (``docs/evaluation_memory.md``);
3. computes
   * the linear-probe top-1 test accuracy, protocol ``fast`` or ``paper`` (below);
   * the weighted kNN top-1 test accuracy on the features (``probes.knn_accuracy``: cosine
     similarity, k = 200 neighbours voting with weight exp(s / 0.1), InstDisc / SimCLR monitor;
     chunked, so the (N_test, N_train) similarity matrix never materialises);
   * the geometry (:func:`dhel_jax.geometry.geometry`) of the test features and of the test
     projections (docs/spec.md Metrics): ``effective_rank`` and ``rank`` of all test rows; ``uniformity`` and
     ``wasserstein_uniformity`` over all pairs of the first ``geometry_examples`` (5000) test
     images; ``alignment`` between two augmented views (the run's training augmentation) of those
     same images, example i's views drawn from ``jax.random.split(fold_in(key(seed), i))``;
4. writes ``<out_dir>/eval.json`` (default ``out_dir``: the workdir) and three PNG plots under
   ``<out_dir>/plots/``: the singular-value spectrum, the pairwise-cosine histogram against the
   uniform-sphere density, and the training curves of ``<workdir>/metrics.jsonl``. Every file is
   written to a temporary name and renamed, so a reader never sees a partial file.

Linear-probe protocols (hyper-parameters recorded in ``eval.json``):

* ``fast`` (default): multinomial logistic regression on the precomputed (standardised) features,
  full-batch L-BFGS (``probes.fit_linear_probe``), the L2 penalty chosen among
  ``probes.DEFAULT_L2_GRID`` on a held-out 10% of the train split, then refit on the whole train
  split. A minute or less on a CPU for Fashion-MNIST.
* ``paper``: the paper's protocol (:mod:`dhel_jax.paper_probe`): a linear layer on the frozen
  encoder, trained with SGD (momentum 0.9, learning rate 0.1 with cosine decay to 0, no weight
  decay, batch 256, 100 epochs) on features computed on the fly from randomly cropped
  (the run's ``crop_scale`` / ``crop_ratio``) and flipped train images, tested on the evaluation
  transform. 100 encoder passes over the train split, minutes on a CPU (benchmarks/README.md,
  "Evaluation"); opt-in.

The settings come from the run's ``config.eval`` (``protocol``, ``knn_k``, ``knn_temperature``,
and any other :class:`dhel_jax.eval_settings.EvalSettings` field it holds), then from the caller's overrides.

``eval.json`` (NaN and infinities written as null; seconds in ``timings``)::

    workdir, step, protocol, created
    settings      EvalSettings: protocol, knn_k, knn_temperature, knn_chunk_size, batch_size,
                  geometry_examples, rank_tol, seed, fast_probe {l2_grid, val_fraction,
                  max_search_examples, max_steps, tol}, paper_probe {epochs, batch_size,
                  learning_rate, momentum, nesterov, weight_decay}
    run           dataset, model, loss {name, set hyper-parameters}, batch_size, seed
    dataset       name, train_split, test_split, num_classes, num_train, num_test, image_size
    dims          features (F), projections (P)
    linear_probe  protocol, accuracy (test top-1), train_accuracy, and for fast: val_accuracy,
                  l2, num_steps, grad_norm; for paper: train_loss, steps, view_kwargs
    knn           accuracy, k, temperature, on ("features")
    geometry      features / projections: {effective_rank, rank, alignment, uniformity,
                  wasserstein_uniformity}; pair_examples, alignment_examples, rank_examples,
                  alignment_seed
    plots         spectrum, cosine_histogram, training_curves: paths relative to out_dir
                  (null when not written)
    baselines     only with ``with_baselines`` (``dhel-eval --baselines``, :mod:`dhel_jax.baselines`):
                  random_init {linear_probe (the run's protocol), knn, bn_examples},
                  pixels {linear_probe (fast), knn, image_size, dim}
    timings       restore, load_data, extract_features, linear_probe, knn, [baselines,]
                  geometry, plots, total
    devices       platform, count;  versions: dhel_jax, jax, jaxlib, flax, optax, ...

Evaluation runs in one process, over its local devices.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from dhel_jax import builders, checkpointing, data, eval_probes
from dhel_jax._io import write_atomic
from dhel_jax.eval_settings import (
    EvalSettings,
    jsonable,
    settings_from_config,
)
from dhel_jax.features import (
    OUTPUTS,
    default_mesh,
    extract_view_features,
    extract_with_labels,
)
from dhel_jax.geometry import geometry
from dhel_jax.plots import PLOT_FILENAMES, write_plots

EVAL_FILENAME = "eval.json"
GEOMETRY_KEYS = ("effective_rank", "rank", "alignment", "uniformity", "wasserstein_uniformity")


def _versions() -> dict[str, str]:
    import dhel_jax

    out = {"dhel_jax": dhel_jax.__version__}
    for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


class _Timer:
    """Seconds per named phase of an evaluation, and in all since it was made."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    def timings(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self.start, 3)}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        logging.info("dhel-eval: %s ...", phase)
        yield
        self.seconds[phase] = round(time.perf_counter() - start, 3)


def _check_out_dir(out: epath.Path, workdir: epath.Path) -> None:
    ckpt = checkpointing.checkpoint_dir(workdir)
    resolved = os.path.realpath(os.fspath(out))
    if resolved == os.path.realpath(os.fspath(ckpt)) or resolved.startswith(
        os.path.realpath(os.fspath(ckpt)) + os.sep
    ):
        raise ValueError(
            f"evaluate: out_dir {os.fspath(out)!r} is inside the checkpoint directory {ckpt}; "
            "evaluation never writes there. Use the workdir or another directory."
        )


def _run_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
    loss = {k: v for k, v in config.loss.to_dict().items() if v is not None}
    return {
        "dataset": config.dataset,
        "model": config.model.name,
        "loss": loss,
        "batch_size": config.batch_size,
        "seed": config.seed,
    }


def evaluate(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    protocol: str | None = None,
    out_dir: str | os.PathLike | None = None,
    data_dir: str | None = None,
    mesh: Mesh | None = None,
    plots: bool = True,
    progress: bool = False,
    with_baselines: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluates the checkpoint ``step`` (default: the latest) of a ``dhel-train`` run.

    See the module docstring for what is computed. Writes ``<out_dir>/eval.json`` and, with
    ``plots``, ``<out_dir>/plots/{spectrum,cosine_histogram,training_curves}.png``; nothing is
    written before the checkpoint has been read, and nothing ever under
    ``<workdir>/checkpoints``.

    Args:
      workdir: the run's ``--workdir``.
      step: checkpoint step (``None``: the latest).
      protocol: ``"fast"`` or ``"paper"`` (``None``: ``config.eval.protocol``).
      out_dir: where the outputs go (default: ``workdir``).
      data_dir: TFDS data directory (default: the run's ``config.data_dir``).
      mesh: a ``('data',)`` mesh to shard the batches over (default: the local devices).
      plots: write the PNG plots.
      progress: progress bar for the paper probe.
      with_baselines: also score the random-init encoder and the raw pixels with the same
        probes (:mod:`dhel_jax.baselines`; ``eval.json["baselines"]``).
      **overrides: :class:`EvalSettings` fields (``knn_k``, ``batch_size``,
        ``geometry_examples``, ``paper_probe={"epochs": 1}``, ...).

    Returns:
      The contents of ``eval.json`` (schema in the module docstring).

    Raises:
      checkpointing.CheckpointError: no such workdir or step, or an unreadable checkpoint
        (the message names the path and the available steps).
      ValueError: a bad setting, or ``out_dir`` inside the checkpoint directory.
    """
    timer = _Timer()
    run_dir = epath.Path(workdir)
    out = run_dir if out_dir is None else epath.Path(out_dir)
    _check_out_dir(out, run_dir)
    with timer("restore"):
        config, variables, step = checkpointing.restore_for_eval(run_dir, step)
    settings = settings_from_config(config, protocol=protocol, **overrides)
    info = data.get_dataset_info(config.dataset)
    paper_mesh, mesh = mesh, default_mesh(mesh)
    with timer("load_data"):
        sources = _open_splits(config, info, data_dir)
    model = builders.build_model(config)
    num_pairs = min(settings.geometry_examples, len(sources["test"]))
    with timer("extract_features"):
        splits, features, views = _extract_splits(
            settings, config, model, variables, sources, info, num_pairs=num_pairs, mesh=mesh
        )
    run = eval_probes.ProbeRun(settings, config, model, info.num_classes, paper_mesh, progress)
    scores = eval_probes.score_encoder(run, variables, splits, features, phase=timer)
    if with_baselines:
        with timer("baselines"):
            scores["baselines"] = eval_probes.score_baselines(run, splits, mesh=mesh)
    test = features["test"]
    with timer("geometry"):
        geo = _geometry(settings, test, views, num_pairs)
    plot_paths: dict[str, str | None] = dict.fromkeys(PLOT_FILENAMES)
    if plots:
        with timer("plots"):
            plot_paths = write_plots(out, run_dir, step, test, geo, num_pairs)
    results = _record(
        run, info, mesh, run_dir, step, splits, test, scores, geo, num_pairs, plot_paths, timer
    )
    payload = json.dumps(results, indent=2, allow_nan=False) + "\n"
    write_atomic(out / EVAL_FILENAME, payload.encode())
    return results


def _open_splits(
    config: ml_collections.ConfigDict, info: Any, data_dir: str | None
) -> dict[str, Any]:
    """The image sources of the train and test splits.

    Small datasets are decoded into host memory once; the others (``in_memory=False``:
    STL-10, ImageNet-100) are read batch by batch, so host memory holds their features only.
    """
    data_dir = config.get("data_dir") if data_dir is None else data_dir
    names = {"train": info.train_split, "test": info.test_split}
    return {
        key: data.open_split(config.dataset, split, data_dir=data_dir)
        for key, split in names.items()
    }


def _extract_splits(
    settings: EvalSettings,
    config: ml_collections.ConfigDict,
    model: Any,
    variables: Any,
    sources: Mapping[str, Any],
    info: Any,
    *,
    num_pairs: int,
    mesh: Mesh,
) -> tuple[
    dict[str, tuple[Any, np.ndarray]],
    dict[str, dict[str, np.ndarray]],
    tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
]:
    """The features of both splits, and of two augmented views of the first ``num_pairs``
    test images: ``(splits {key: (source, labels)}, features {key: outputs}, views)``."""
    names = {"train": info.train_split, "test": info.test_split}
    splits: dict[str, tuple[Any, np.ndarray]] = {}
    features: dict[str, dict[str, np.ndarray]] = {}
    transform = builders.eval_transform_kwargs(config)
    for key, source in sources.items():
        features[key], labels = extract_with_labels(
            model,
            variables,
            source,
            batch_size=settings.batch_size,
            mesh=mesh,
            transform_kwargs=transform,
        )
        if labels.min() < 0:
            raise ValueError(
                f"evaluate: {config.dataset}'s {names[key]!r} split has unlabelled records; "
                "the probes need labels."
            )
        splits[key] = (source, labels)
    views = extract_view_features(
        model,
        variables,
        data.SubsetSource(sources["test"], np.arange(num_pairs)),
        augment_kwargs=builders.augment_kwargs(config),
        seed=settings.seed,
        batch_size=settings.batch_size,
        mesh=mesh,
    )
    return splits, features, views


def _geometry(
    settings: EvalSettings,
    test: Mapping[str, np.ndarray],
    views: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]],
    num_pairs: int,
) -> dict[str, dict[str, float]]:
    """:func:`geometry` of the test features and projections (``pair_examples`` dropped:
    ``eval.json`` records it once)."""
    geo = {}
    for name in OUTPUTS:
        geo[name] = geometry(
            test[name],
            (views[0][name], views[1][name]),
            pair_examples=num_pairs,
            rank_tol=settings.rank_tol,
        )
        del geo[name]["pair_examples"]
    return geo


def _record(
    run: eval_probes.ProbeRun,
    info: Any,
    mesh: Mesh,
    run_dir: epath.Path,
    step: int,
    splits: Mapping[str, tuple[Any, np.ndarray]],
    test: Mapping[str, np.ndarray],
    scores: Mapping[str, Any],
    geo: Mapping[str, Any],
    num_pairs: int,
    plot_paths: Mapping[str, str | None],
    timer: _Timer,
) -> dict[str, Any]:
    """The contents of ``eval.json`` (schema in the module docstring), JSON-safe: ``scores``
    holds the probes' results (``linear_probe``, ``knn``, and ``baselines`` when scored)."""
    settings, config = run.settings, run.config
    train_y, test_y = splits["train"][1], splits["test"][1]
    record = {
        "workdir": os.fspath(run_dir),
        "step": int(step),
        "protocol": settings.protocol,
        "settings": settings.to_json(),
        "run": _run_summary(config),
        "dataset": {
            "name": config.dataset,
            "train_split": info.train_split,
            "test_split": info.test_split,
            "num_classes": info.num_classes,
            "num_train": len(train_y),
            "num_test": len(test_y),
            "image_size": builders.view_size(config),
        },
        "dims": {name: int(test[name].shape[1]) for name in OUTPUTS},
        "linear_probe": scores["linear_probe"],
        "knn": scores["knn"],
        "geometry": {
            **geo,
            "pair_examples": num_pairs,
            "alignment_examples": num_pairs,
            "rank_examples": len(test_y),
            "alignment_seed": settings.seed,
        },
        "plots": plot_paths,
        "timings": timer.timings(),
        "devices": {"platform": mesh.devices.flat[0].platform, "count": int(mesh.devices.size)},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if "baselines" in scores:
        record["baselines"] = scores["baselines"]
    return jsonable(record)


def _baseline_lines(results: Mapping[str, Any]) -> list[str]:
    """The baselines' accuracies and what the pretrained encoder gains over each."""
    found = results.get("baselines")
    if not found:
        return []
    ours = (results["linear_probe"]["accuracy"], results["knn"]["accuracy"])
    pixels = found["pixels"]
    side = pixels["image_size"]
    labels = {
        "random_init": "random-init encoder",
        "pixels": f"raw pixels ({side}x{side})",
    }
    lines = ["  baselines, same probes       linear      kNN    pretrained encoder gains"]
    for key, label in labels.items():
        lin, knn = found[key]["linear_probe"]["accuracy"], found[key]["knn"]["accuracy"]
        lines.append(
            f"    {label:<24}{100 * lin:7.2f}%  {100 * knn:6.2f}%    "
            f"{100 * (ours[0] - lin):+.2f} linear, {100 * (ours[1] - knn):+.2f} kNN"
        )
    return lines


def summary(results: Mapping[str, Any]) -> str:
    """A few lines for the terminal: probe and kNN accuracies, the geometry table, outputs."""
    probe, knn, geo = results["linear_probe"], results["knn"], results["geometry"]
    ds, run = results["dataset"], results["run"]
    if probe["protocol"] == "fast":
        detail = f"L-BFGS, l2 = {probe['l2']:g}, train {100 * probe['train_accuracy']:.2f}%"
    else:
        paper = results["settings"]["paper_probe"]
        detail = f"SGD {paper['epochs']} epochs, train {100 * probe['train_accuracy']:.2f}%"
    dims = results["dims"]
    rows = [
        ("effective rank", "effective_rank", "{:.2f}"),
        ("rank", "rank", "{:d}"),
        ("alignment", "alignment", "{:.4f}"),
        ("uniformity", "uniformity", "{:.4f}"),
        ("W1 uniformity", "wasserstein_uniformity", "{:.4f}"),
    ]
    heads = (f"features (F={dims['features']})", f"projections (P={dims['projections']})")
    lines = [
        f"dhel-eval {results['workdir']}  step {results['step']}  "
        f"({ds['name']}, {run['model']}, loss {run['loss'].get('name')}; "
        f"{ds['num_train']} train / {ds['num_test']} test images)",
        f"  linear probe ({probe['protocol']})   top-1 {100 * probe['accuracy']:6.2f}%   ({detail})",
        f"  kNN (k={knn['k']}, T={knn['temperature']:g})   top-1 {100 * knn['accuracy']:6.2f}%",
        *_baseline_lines(results),
        f"  geometry of the test set (pairs, alignment: first {geo['pair_examples']} images)",
        f"    {'':<16}{heads[0]:>20}{heads[1]:>24}",
    ]
    for label, key, fmt in rows:
        text = [
            "-" if geo[name].get(key) is None else fmt.format(geo[name][key]) for name in OUTPUTS
        ]
        lines.append(f"    {label:<16}{text[0]:>20}{text[1]:>24}")
    written = [EVAL_FILENAME] + [p for p in results["plots"].values() if p]
    lines.append(f"  wrote {', '.join(written)}  ({results['timings']['total']:.0f} s)")
    return "\n".join(lines)
