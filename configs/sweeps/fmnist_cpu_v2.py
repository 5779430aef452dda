"""The second CPU-scale study: SimCLR, DCL, DHEL and KCL on Fashion-MNIST, 3 seeds per cell.

    dhel-sweep --sweep configs/sweeps/fmnist_cpu_v2.py            # about 5.5 h on 2 quiet cores
    dhel-sweep --sweep configs/sweeps/fmnist_cpu_v2.py --dry-run  # the 63 runs and their commands

Grid: 4 losses x batch sizes {32, 128, 512} at each loss's docs/spec.md default temperature
(SimCLR tau = 0.5, DCL tau = 0.1, DHEL tau = 0.3, KCL t = 2), plus tau in {0.1, 0.2, 0.5}
(t in {1, 2, 4} for KCL) at batch 128; the cells the two views share run once: 21 cells x 3
seeds (0, 1, 2) = 63 runs. The report gives mean ± standard error of the mean per cell, and
differences between losses ± their standard error, resolved only beyond 2 SE.

Every run has the same budget whatever the loss, pinned here rather than inherited from
``configs/fashion_mnist.py`` (whose default may change): ResNet-8 (``resnet_small``) with 16
filters (F = 64 features), a 64-128-64 projection head, 12x12 views with crops of at least 20%
of the image and brightness/contrast jitter at strength 1.0, 10 epochs, LARS (momentum 0.9,
trust coefficient 1e-3, weight decay 1e-6) with SimCLR's schedule: peak learning rate
1.0 x B / 256, linear warm-up over 0.5 epochs (5%), cosine decay to 0. Then ``dhel-eval`` with
the ``fast`` linear probe and the kNN monitor. Only the loss, its temperature, the batch size
and the seed vary; the learning rate follows SimCLR's linear scaling for every loss and every
batch size, tuned for none, and every batch size sees the same 10 epochs.

How the size was chosen (pilot runs of 2026-11-30 on 2 cores of an Intel Xeon, shared with
two other jobs: load average 3-6, so the times below are inflated; seed 0):

* The first study's model (16 filters, 12x12, 4 epochs) reached 80-82% linear; a wide random
  ResNet is already a strong feature extractor on Fashion-MNIST, so each encoder must beat the
  same architecture at random initialisation (``dhel-eval --baselines``) by >= 5 points.
* 32 filters on 10x10 views, 4 epochs, DHEL at B = 128: linear 84.29%, random-init encoder
  80.93%: +3.36 points only (kNN 79.51% against 77.39%). Rejected.
* 16 filters on 12x12 views, 10 epochs, DHEL at B = 128 (this file's settings): linear
  83.11%, kNN 80.44%; random-init encoder 75.25% linear, 72.80% kNN: +7.86 and +7.64 points.
  KCL at B = 32 (the first study's weakest cell), same settings: linear 82.17%, kNN 78.86%:
  +6.92 and +6.06 over the same random-init encoder (seed 0 fixes the initialisation).
  The sweep checks the bar itself: the evaluation of cell ``dhel_b128_tau0.3`` also scores the
  baselines of its seed (``baselines_cell``), and the report gives every cell's gain over the
  random-init encoder of the same seed.
* Time per epoch from the training logs (images per second over the logged steps, median):
  55-61 s at B = 32 (load 3-5), 37 s at B = 128 (load 3-4), 61 s at B = 512 (load 3-4);
  ``dhel-eval`` without baselines 40-50 s. The first study's runs of the same encoder and
  views took 31 and 22 s per epoch at B = 32 and 128 on a quieter machine, 1.7-2x less. So on
  2 quiet cores a run (start-up, training, evaluation) takes about 6 min at B = 32, 4.5 min at
  B = 128 and 7 min at B = 512 (61 s / 1.7 per epoch): 4 x 6 + 13 x 4.5 + 4 x 7 = 110 min per
  seed, 5.5 h for the 63 runs; about 9 h on a machine shared as during the pilot. The commands
  and the table of the pilot are in docs/results.md ("Planned: the second CPU-scale study").
"""

import ml_collections

from dhel_jax.sweep import paper_sweep


def get_sweep() -> ml_collections.ConfigDict:
    return paper_sweep(
        "../fashion_mnist.py",
        (
            "Fashion-MNIST, ResNet-8 (16 filters), 12x12 views, crop scale (0.2, 1), jitter 1.0, "
            "10 epochs, LARS with peak learning rate 1.0 x B / 256; fast linear probe and kNN "
            "(k = 200) on frozen encoder features; 3 seeds."
        ),
        overrides={
            "model": {
                "name": "resnet_small",
                "num_filters": 16,
                "head_hidden_dim": 128,
                "head_out_dim": 64,
                "head_num_layers": 2,
            },
            "augment": {
                "out_size": 12,
                "crop_scale": (0.2, 1.0),
                "jitter_strength": 1.0,
            },
            "num_epochs": 10,
            "optimizer": {
                "name": "lars",
                "base_lr": 1.0,
                "lr_scaling": "linear",
                "end_lr": 0.0,
                "warmup_epochs": 0.5,
                "weight_decay": 1e-6,
                "momentum": 0.9,
                "trust_coefficient": 0.001,
            },
            "log_every_steps": 50,
            "checkpoint_every_steps": 1000,
            "eval": {"protocol": "fast"},
        },
        batch_sizes=(32, 128, 512),
        temperature_batch_size=128,
        seeds=(0, 1, 2),
        error_bars="se",
        baselines_cell="dhel_b128_tau0.3",
    )
