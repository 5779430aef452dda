"""Fashion-MNIST: the CPU default (``make run``): DHEL on a wide ResNet-8, one epoch.

    dhel-train --config configs/fashion_mnist.py --workdir runs/fashion_mnist_dhel
    dhel-train --config configs/fashion_mnist.py:kcl --workdir runs/fashion_mnist_kcl

Sized so that ``make run`` (``dhel-train``, then ``dhel-eval --baselines``) takes at most 12
minutes on a 2-core CPU: a ResNet-8 (``resnet_small``) of widths 96-192-384 (F = 384 features)
on 10x10 views, a 384-128-64 projection head, batch 256, crops of at least 20% of the image,
and brightness/contrast jitter at strength 1.0 (SimCLR's 0.5 is for colour images; on
grayscale ones only brightness and contrast act). Width paid for by smaller views was the
strongest lever measured, and width 128 probes better, but its run does not fit the time
budget there; the runs behind each choice, with their accuracies and minutes, are in
``benchmarks/README.md`` ("The Fashion-MNIST default").
"""

import ml_collections

from dhel_jax.train_config import default_config


def get_config(loss: str | None = None) -> ml_collections.ConfigDict:
    config = default_config()
    config.dataset = "fashion_mnist"
    config.model.name = "resnet_small"
    config.model.num_filters = 96
    config.model.head_hidden_dim = 128
    config.model.head_out_dim = 64
    config.augment.out_size = 10
    config.augment.jitter_strength = 1.0
    config.augment.crop_scale = (0.2, 1.0)
    config.batch_size = 256
    config.num_epochs = 1
    config.optimizer.warmup_epochs = 0.2
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100
    if loss:
        config.loss.name = loss
    return config
