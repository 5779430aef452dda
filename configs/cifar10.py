"""CIFAR-10: ResNet-18 with the CIFAR stem, batch 256, 200 epochs (the paper's setting).

    dhel-train --config configs/cifar10.py --workdir runs/cifar10_dhel
    dhel-train --config configs/cifar10.py:kcl --workdir runs/cifar10_kcl --config.loss.gamma=8

The optional ``:<loss>`` selects any loss of ``dhel_jax.LOSSES``; its hyper-parameters default
to docs/spec.md's values and are overridden with ``--config.loss.<name>=<value>``.
"""

import ml_collections

from dhel_jax.train_config import default_config


def get_config(loss: str | None = None) -> ml_collections.ConfigDict:
    config = default_config()
    config.dataset = "cifar10"
    config.model.name = "resnet18"
    config.model.stem = "cifar"
    config.batch_size = 256
    config.num_epochs = 200
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    if loss:
        config.loss.name = loss
    return config
