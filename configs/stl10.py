"""STL-10: ResNet-18 with the CIFAR stem on 96x96 views, batch 256, 200 epochs over the
labelled training split and the 100k unlabelled images (the paper's setting).

    dhel-train --config configs/stl10.py[:<loss>] --workdir runs/stl10_dhel

The online probe learns from the labelled images of each batch only (unlabelled ones have
label -1).
"""

import ml_collections

from dhel_jax.train_config import default_config


def get_config(loss: str | None = None) -> ml_collections.ConfigDict:
    config = default_config()
    config.dataset = "stl10"
    config.model.name = "resnet18"
    config.model.stem = "cifar"
    config.augment.jitter_strength = 1.0
    config.augment.blur_prob = 0.5
    config.batch_size = 256
    config.num_epochs = 200
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    if loss:
        config.loss.name = loss
    return config
