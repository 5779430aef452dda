"""The datasets: their registry (:data:`DATASETS`, :func:`get_dataset_info`).

Registry:

=============  ==========================  =======  ===================  ======================
name           TFDS builder                classes  pretraining splits   evaluation splits
=============  ==========================  =======  ===================  ======================
fashion_mnist  ``fashion_mnist``           10       train                train / test
cifar10        ``cifar10``                 10       train                train / test
cifar100       ``cifar100``                100      train                train / test
stl10          ``stl10``                   10       train + unlabelled   train / test
imagenet100    ``imagenet100`` (prepare)   100      train                train / validation
=============  ==========================  =======  ===================  ======================

How each gets onto disk: :mod:`dhel_jax.prepare`; how it is read: :mod:`dhel_jax.data`.
"""

from __future__ import annotations

import dataclasses

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the four IDX ``.gz`` files."""

# The 100 ImageNet-2012 classes (WordNet ids) of CMC's ``imagenet100.txt`` (Tian et al., 2019,
# github.com/HobbitLong/CMC), sorted: the label of a class is its index here, as in an
# ImageFolder of the subset.
IMAGENET100_CLASSES: tuple[str, ...] = tuple(
    sorted(
        """
        n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890
        n03062245 n01773797 n01735189 n07831146 n07753275 n03085013 n04485082 n02105505
        n01983481 n02788148 n03530642 n04435653 n02086910 n02859443 n13040303 n03594734
        n02085620 n02099849 n01558993 n04493381 n02109047 n04111531 n02877765 n04429376
        n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855
        n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251
        n02701002 n03379051 n02259212 n07715103 n03947888 n04026417 n02326432 n03637318
        n01980166 n02113799 n02086240 n03903868 n02483362 n04127249 n02089973 n03017168
        n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 n02113978 n03787032
        n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029
        n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630
        n03584829 n02123045 n04229816 n02100583 n03642806 n04336792 n03259280 n02116738
        n02108089 n03424325 n01855672 n02090622
        """.split()
    )
)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset in the registry.

    Attributes:
      name: registry name.
      num_classes: number of classes of the labelled splits.
      image_shape: ``(H, W, C)`` of every uint8 image the loaders yield.
      mean: per-channel mean of the training pixels in [0, 1] units (for normalisation).
      std: per-channel standard deviation of the training pixels in [0, 1] units.
      view_size: default side length of the augmented views (``out_size`` of the augmentations).
      tfds_name: TFDS builder name (default: ``name``).
      pretrain_splits: TFDS splits concatenated for contrastive pretraining.
      train_split: labelled split to fit evaluation probes on.
      test_split: labelled split to report evaluation results on.
      eval_crop_fraction: centre-crop fraction of the evaluation transform.
      resize_shorter: for datasets of varied image sizes (ImageNet): every image is resized,
        aspect kept, so that its shorter side is this (or its longer side the canvas side
        ``image_shape[0]``, when that is smaller), and stored whole in the top-left corner of
        an ``image_shape`` canvas; batches then also hold ``'size'``, the (height, width) of
        each image in its canvas. ``None``: images are resized and centre-cropped to
        ``image_shape``.
      in_memory: whether the loaders decode the whole (per-process) split into host memory once,
        rather than decoding records as batches are read.
      needs_manual_download: whether TFDS cannot download the data itself.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    view_size: int
    tfds_name: str = ""  # "": the registry name.
    pretrain_splits: tuple[str, ...] = ("train",)
    train_split: str = "train"
    test_split: str = "test"
    eval_crop_fraction: float = 1.0
    resize_shorter: int | None = None
    in_memory: bool = True
    needs_manual_download: bool = False

    def __post_init__(self) -> None:
        if not self.tfds_name:
            object.__setattr__(self, "tfds_name", self.name)


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="fashion_mnist",
            num_classes=10,
            image_shape=(28, 28, 1),
            # Exact moments of the 60000 training images (checked by tests/test_data.py).
            mean=(0.28604060,),
            std=(0.35302424,),
            view_size=28,
        ),
        DatasetInfo(
            name="cifar10",
            num_classes=10,
            image_shape=(32, 32, 3),
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            view_size=32,
        ),
        DatasetInfo(
            name="cifar100",
            num_classes=100,
            image_shape=(32, 32, 3),
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            view_size=32,
        ),
        DatasetInfo(
            name="stl10",
            num_classes=10,
            image_shape=(96, 96, 3),
            pretrain_splits=("train", "unlabelled"),
            mean=(0.4467, 0.4398, 0.4066),
            std=(0.2603, 0.2566, 0.2713),
            view_size=96,
            in_memory=False,
        ),
        DatasetInfo(
            name="imagenet100",
            num_classes=100,
            # Shorter side 256 (SimCLR's evaluation resize), kept whole for the random crop;
            # the 384 canvas keeps every aspect ratio up to 3:2 at that resolution.
            image_shape=(384, 384, 3),
            test_split="validation",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            view_size=224,
            eval_crop_fraction=0.875,
            resize_shorter=256,
            in_memory=False,
            needs_manual_download=True,
        ),
    )
}


class DatasetUnavailableError(RuntimeError):
    """A dataset is not prepared and cannot be prepared here (no local files, no network)."""


def get_dataset_info(name: str) -> DatasetInfo:
    """Returns the registry entry of dataset ``name``; ValueError listing the accepted names."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; accepted names: {sorted(DATASETS)}.")
    return DATASETS[name]
