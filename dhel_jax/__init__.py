"""dhel-jax: contrastive losses, metrics and training from Koromilas et al. (ICML 2024).

The losses and metrics need nothing but ``jax``::

    import dhel_jax
    loss = dhel_jax.dhel(z1, z2, tau=0.3)
    loss_fn = dhel_jax.get_loss("kcl", kernel="gaussian", t=2.0, gamma=16.0)

The training stack (``dhel_jax.models``, ``dhel_jax.data``, ``dhel_jax.augment``,
``dhel_jax.step``, ``dhel_jax.train_config``, ``dhel_jax.train``, ``dhel_jax.evaluate`` and the
modules of its phases) is imported on first attribute access, so ``import dhel_jax`` stays
light.
"""

from __future__ import annotations

import importlib
from typing import Any

from dhel_jax.kernels import KERNEL_NAMES, get_kernel
from dhel_jax.losses import (
    LOSSES,
    align_uniform,
    dcl,
    dclw,
    dhel,
    get_loss,
    info_nce,
    kcl,
    loss_hyperparameters,
    simclr,
)
from dhel_jax.metrics import (
    alignment,
    effective_rank,
    hyperspherical_energy,
    rank,
    uniformity,
    wasserstein_uniformity,
)
from dhel_jax.pairwise import l2_normalize

__version__ = "0.1.0"

_LAZY_SUBMODULES = (
    "augment",
    "builders",
    "checkpointing",
    "cpu",
    "data",
    "datasets",
    "eval_probes",
    "eval_settings",
    "evaluate",
    "features",
    "geometry",
    "grad_cache",
    "models",
    "optimizers",
    "paper_probe",
    "parallel",
    "plots",
    "prepare",
    "probes",
    "sources",
    "step",
    "train",
    "train_config",
)


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"dhel_jax.{name}")
    raise AttributeError(f"module 'dhel_jax' has no attribute {name!r}")


__all__ = [
    "KERNEL_NAMES",
    "LOSSES",
    "align_uniform",
    "alignment",
    "dcl",
    "dclw",
    "dhel",
    "effective_rank",
    "get_kernel",
    "get_loss",
    "hyperspherical_energy",
    "info_nce",
    "kcl",
    "l2_normalize",
    "loss_hyperparameters",
    "rank",
    "simclr",
    "uniformity",
    "wasserstein_uniformity",
]
