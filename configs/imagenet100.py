"""ImageNet-100 (CMC's 100 classes): ResNet-50 with the ImageNet stem on 224x224 views,
batch 256, 200 epochs, SimCLR's ImageNet augmentations (colour strength 1.0, blur).

    dhel-train --config configs/imagenet100.py[:<loss>] --workdir runs/imagenet100_dhel \\
        --config.data_dir=/path/to/tensorflow_datasets

ImageNet must be downloaded by hand first (see ``dhel_jax.data``). On accelerators,
``--config.model.dtype=bfloat16`` halves the activation memory (parameters stay float32).
"""

import ml_collections

from dhel_jax.train_config import default_config


def get_config(loss: str | None = None) -> ml_collections.ConfigDict:
    config = default_config()
    config.dataset = "imagenet100"
    config.model.name = "resnet50"
    config.model.stem = "imagenet"
    config.model.head_hidden_dim = 2048
    config.model.head_out_dim = 128
    config.augment.jitter_strength = 1.0
    config.augment.blur_prob = 0.5
    config.batch_size = 256
    config.num_epochs = 200
    config.optimizer.weight_decay = 1e-6
    config.data_workers = 8
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    if loss:
        config.loss.name = loss
    return config
