"""Fashion-MNIST: the CPU default (``make run``), DHEL on a narrow ResNet-8.

    dhel-train --config configs/fashion_mnist.py --workdir runs/fashion_mnist_dhel
    dhel-train --config configs/fashion_mnist.py:kcl --workdir runs/fashion_mnist_kcl

Sized so that ``dhel-train`` + ``dhel-eval`` finish in about 10 minutes on a 2-core CPU.
"""

import ml_collections

from dhel_jax.train import default_config


def get_config(loss: str | None = None) -> ml_collections.ConfigDict:
    config = default_config()
    config.dataset = "fashion_mnist"
    config.model.name = "resnet_small"
    config.model.num_filters = 16
    config.model.head_hidden_dim = 128
    config.model.head_out_dim = 64
    config.augment.out_size = 16
    config.batch_size = 256
    config.num_epochs = 2
    config.optimizer.warmup_epochs = 0.2
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100
    if loss:
        config.loss.name = loss
    return config
