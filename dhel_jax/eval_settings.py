"""The settings of an evaluation (:class:`EvalSettings`, recorded in ``eval.json``): the run's
``config.eval`` fields, then the caller's overrides, checked once.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from dhel_jax import probes
from dhel_jax._validation import check_int, check_number
from dhel_jax.paper_probe import paper_linear_probe

PROTOCOLS = ("fast", "paper")


def _keyword_defaults(fn: Callable[..., Any], exclude: Sequence[str] = ()) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        and p.default is not inspect.Parameter.empty
        and name not in exclude
    }


def jsonable(value: Any) -> Any:
    """JSON-safe copy: tuples as lists, NumPy scalars as Python numbers, NaN/inf as null."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


FAST_PROBE_DEFAULTS: dict[str, Any] = _keyword_defaults(
    probes.fit_linear_probe, exclude=("num_classes", "seed")
)
PAPER_PROBE_DEFAULTS: dict[str, Any] = _keyword_defaults(
    paper_linear_probe, exclude=("num_classes", "view_kwargs", "mesh", "progress", "seed")
)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Every setting of an evaluation (recorded in ``eval.json``).

    Attributes:
      protocol: linear-probe protocol, ``"fast"`` or ``"paper"``.
      knn_k, knn_temperature, knn_chunk_size: ``probes.knn_accuracy`` arguments.
      batch_size: images per feature-extraction step (global, over the devices). On a 2-core
        CPU, 256 (128 per device) extracts faster than 1024 (``benchmarks/README.md``);
        on an accelerator a larger batch may pay.
      geometry_examples: the first this many test images give the pair metrics and alignment.
      rank_tol: ``metrics.rank`` tolerance.
      seed: seeds the alignment views, the fast probe's held-out split and the paper probe.
      fast_probe: ``probes.fit_linear_probe`` keywords (``FAST_PROBE_DEFAULTS`` updated).
      paper_probe: :func:`paper_linear_probe` keywords (``PAPER_PROBE_DEFAULTS`` updated).
    """

    protocol: str = "fast"
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_chunk_size: int = 512
    batch_size: int = 256
    geometry_examples: int = 5000
    rank_tol: float = 1e-5
    seed: int = 0
    fast_probe: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    paper_probe: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        fn = "EvalSettings"
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"{fn}: unknown protocol {self.protocol!r}; accepted values are "
                f"{', '.join(map(repr, PROTOCOLS))}."
            )
        for name in ("knn_k", "knn_chunk_size", "batch_size"):
            check_int(getattr(self, name), name, fn=fn)
        check_int(self.geometry_examples, "geometry_examples", fn=fn, minimum=2)
        check_int(self.seed, "seed", fn=fn, minimum=0)
        for name in ("knn_temperature", "rank_tol"):
            check_number(getattr(self, name), name, fn=fn, strict=True)
        for name, defaults in (
            ("fast_probe", FAST_PROBE_DEFAULTS),
            ("paper_probe", PAPER_PROBE_DEFAULTS),
        ):
            given = dict(getattr(self, name))
            unknown = sorted(set(given) - set(defaults))
            if unknown:
                raise ValueError(
                    f"{fn}: {name} has no setting {unknown[0]!r}; accepted: "
                    f"{', '.join(sorted(defaults))}."
                )
            object.__setattr__(self, name, {**defaults, **given})

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["fast_probe"] = jsonable(dict(self.fast_probe))
        out["paper_probe"] = jsonable(dict(self.paper_probe))
        return out


_SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(EvalSettings))


def settings_from_config(config: ml_collections.ConfigDict, **overrides: Any) -> EvalSettings:
    """The run's ``config.eval`` fields, then ``overrides`` (``None`` values are ignored).

    Raises:
      ValueError: an unknown override or an invalid value.
    """
    unknown = sorted(set(overrides) - set(_SETTING_FIELDS))
    if unknown:
        raise ValueError(
            f"evaluate: unknown setting {unknown[0]!r}; accepted settings are "
            f"{', '.join(_SETTING_FIELDS)}."
        )
    values: dict[str, Any] = {}
    eval_config = config.get("eval") or {}
    for key, value in dict(eval_config).items():
        if key in _SETTING_FIELDS:
            values[key] = value.to_dict() if hasattr(value, "to_dict") else value
        else:
            logging.warning("config.eval.%s is not an evaluation setting; ignored", key)
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("fast_probe", "paper_probe"):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value
    return EvalSettings(**values)
