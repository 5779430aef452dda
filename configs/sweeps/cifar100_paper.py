"""The paper-scale study on CIFAR-100: SimCLR, DCL, DHEL and KCL, 200 epochs per run.

    dhel-sweep --sweep configs/sweeps/cifar100_paper.py --dry-run   # 29 cells x 2 seeds
    dhel-sweep --sweep configs/sweeps/cifar100_paper.py --seeds 0   # a first pass, one seed

``configs/cifar100.py`` unchanged: ResNet-18 with the CIFAR stem and the 512-512-128 projection
head, 200 epochs, LARS (trust coefficient 1e-3, momentum 0.9, weight decay 1e-6 on weights
only) with 10 warm-up epochs then cosine decay, peak learning rate 1.0 x B / 256 (the schedule
of AndrewAtanov/simclr-pytorch, the codebase of the paper's experiments: lr 4.0 at batch 1024),
SimCLR's CIFAR augmentations; then ``dhel-eval --protocol paper``: a linear classifier on the
frozen encoder trained with SGD for 100 epochs on cropped and flipped images.

Grid: batch sizes 32 to 512 at each loss's default temperature; tau in {0.1, 0.2, 0.5} (t in
{1, 2, 4} for KCL) at batch 256, the paper's default batch. Steps per run: 200 x 50,000 / B
(312,500 at B = 32, 39,062 at B = 256, 19,531 at B = 512).
"""

import ml_collections

from dhel_jax.sweep import paper_sweep


def get_sweep() -> ml_collections.ConfigDict:
    return paper_sweep(
        "../cifar100.py",
        (
            "CIFAR-100, ResNet-18 (CIFAR stem, 512-512-128 head), 200 epochs, LARS with peak "
            "learning rate 1.0 x B / 256, 10 warm-up epochs, cosine decay; paper linear probe."
        ),
        overrides={"eval": {"protocol": "paper"}},
    )
