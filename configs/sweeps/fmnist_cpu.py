"""The CPU-scale study: SimCLR, DCL, DHEL and KCL on Fashion-MNIST, on a 2-core machine.

    dhel-sweep --sweep configs/sweeps/fmnist_cpu.py            # ~3 h on 2 x86-64 cores
    dhel-sweep --sweep configs/sweeps/fmnist_cpu.py --dry-run  # the 50 runs and their commands

Grid: 4 losses x batch sizes {32, 64, 128, 256} at each loss's SPEC.md default temperature
(SimCLR tau = 0.5, DCL tau = 0.1, DHEL tau = 0.3, KCL t = 2), plus tau in {0.1, 0.2, 0.5}
(t in {1, 2, 4} for KCL) at batch 128; the cells the two views share run once: 25 cells x 2
seeds = 50 runs.

Every run has the same budget whatever the loss: ``configs/fashion_mnist.py`` (ResNet-8 with 16
filters, F = 64 features, a 64-128-64 projection head, 16x16 views, the Fashion-MNIST
augmentations) for 3 epochs, LARS with the SimCLR schedule (peak learning rate
1.0 x B / 256, linear warm-up over 0.2 epochs, cosine decay), weight decay 1e-6, then
``dhel-eval`` with the ``fast`` linear probe (L-BFGS on frozen features, L2 penalty chosen on a
held-out 10%) and the kNN monitor. Only the loss, its temperature, the batch size and the seed
vary. The learning rate follows SimCLR's linear scaling rule, the optimiser's default, so a
fixed number of epochs is a fixed number of examples seen at every batch size; it is the same
rule for every loss and was not tuned for any.
"""

import ml_collections

from dhel_jax.sweep import PAPER_COMPARISONS, PAPER_LOSS_ORDER, paper_losses


def get_sweep() -> ml_collections.ConfigDict:
    sweep = ml_collections.ConfigDict()
    sweep.description = (
        "Fashion-MNIST, ResNet-8 (16 filters), 16x16 views, 3 epochs, LARS with base "
        "learning rate 1.0 x B / 256; fast linear probe and kNN (k = 200) on frozen features."
    )
    sweep.config = "../fashion_mnist.py"
    sweep.overrides = {
        "num_epochs": 3,
        "optimizer": {"warmup_epochs": 0.2},
        "log_every_steps": 50,
        "checkpoint_every_steps": 500,
    }
    sweep.losses = paper_losses()
    sweep.loss_order = PAPER_LOSS_ORDER
    sweep.comparisons = PAPER_COMPARISONS
    sweep.batch_sizes = (32, 64, 128, 256)
    sweep.temperature_batch_size = 128
    sweep.seeds = (0, 1)
    return sweep
