"""The paper-scale study on ImageNet-100: SimCLR, DCL, DHEL and KCL, 200 epochs per run.

    dhel-sweep --sweep configs/sweeps/imagenet100_paper.py --dry-run   # 29 cells x 2 seeds

ImageNet must be downloaded by hand first (see ``dhel_jax.data``); set ``TFDS_DATA_DIR`` to the
directory holding ``downloads/manual/ILSVRC2012_img_{train,val}.tar``.

``configs/imagenet100.py`` (ResNet-50 with the ImageNet stem, a 2048-2048-128 projection head,
224x224 views, SimCLR's ImageNet augmentations, 200 epochs, LARS with 10 warm-up epochs then
cosine decay, weight decay 1e-6) with peak learning rate 0.3 x B / 256, the ImageNet setting of
AndrewAtanov/simclr-pytorch (lr 0.6 at batch 512), the codebase of the paper's experiments;
then ``dhel-eval --protocol paper`` (a linear classifier on the frozen encoder, SGD, 100
epochs). On accelerators, add ``"model": {"dtype": "bfloat16"}`` to the overrides to halve the
activation memory (every run then uses it).

Grid: batch sizes 32 to 512 at each loss's default temperature; tau in {0.1, 0.2, 0.5} (t in
{1, 2, 4} for KCL) at batch 256. Steps per run: 200 x N / B with N ~ 127,000 training images
(~790,000 at B = 32, ~99,000 at B = 256, ~49,500 at B = 512).
"""

import ml_collections

from dhel_jax.sweep import paper_sweep


def get_sweep() -> ml_collections.ConfigDict:
    return paper_sweep(
        "../imagenet100.py",
        (
            "ImageNet-100, ResNet-50 (ImageNet stem, 2048-2048-128 head), 224x224 views, 200 "
            "epochs, LARS with peak learning rate 0.3 x B / 256, 10 warm-up epochs, cosine decay; "
            "paper linear probe."
        ),
        overrides={"optimizer": {"base_lr": 0.3}, "eval": {"protocol": "paper"}},
    )
