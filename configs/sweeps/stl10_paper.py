"""The paper-scale study on STL-10: SimCLR, DCL, DHEL and KCL, 200 epochs per run.

    dhel-sweep --sweep configs/sweeps/stl10_paper.py --dry-run   # 29 cells x 2 seeds

``configs/stl10.py`` unchanged: ResNet-18 with the CIFAR stem and the 512-512-128 projection
head on 96x96 views of the labelled training split plus the 100,000 unlabelled images, SimCLR's
ImageNet-strength colour jitter and blur, 200 epochs, LARS with 10 warm-up epochs then cosine
decay, peak learning rate 1.0 x B / 256 (the schedule of AndrewAtanov/simclr-pytorch, the
codebase of the paper's experiments); then ``dhel-eval --protocol paper`` (a linear classifier
on the frozen encoder, SGD, 100 epochs, on the 5,000 labelled training images).

Grid: batch sizes 32 to 512 at each loss's default temperature; tau in {0.1, 0.2, 0.5} (t in
{1, 2, 4} for KCL) at batch 256. Steps per run: 200 x 105,000 / B (656,250 at B = 32, 82,031
at B = 256, 41,015 at B = 512).
"""

import ml_collections

from dhel_jax.sweep import paper_sweep


def get_sweep() -> ml_collections.ConfigDict:
    return paper_sweep(
        "../stl10.py",
        (
            "STL-10 (train + unlabelled), ResNet-18 (CIFAR stem, 512-512-128 head), 96x96 views, "
            "200 epochs, LARS with peak learning rate 1.0 x B / 256, 10 warm-up epochs, cosine "
            "decay; paper linear probe on the labelled split."
        ),
        overrides={"eval": {"protocol": "paper"}},
    )
