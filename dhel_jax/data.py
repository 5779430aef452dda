"""Datasets for contrastive pretraining and evaluation: TFDS ``array_record`` read with grain.

Every dataset is a TensorFlow Datasets (TFDS) dataset prepared in the ``array_record`` format and
read through ``tfds.data_source`` (random access, no TensorFlow needed to read) and a ``grain``
pipeline. The host only decodes: batches hold uint8 images, and the random SimCLR augmentations
run on the accelerator (:mod:`dhel_jax.augment`).

Registry (:data:`DATASETS`, :func:`get_dataset_info`):

=============  ==========================  =======  ===================  ======================
name           TFDS builder                classes  pretraining splits   evaluation splits
=============  ==========================  =======  ===================  ======================
fashion_mnist  ``fashion_mnist``           10       train                train / test
cifar10        ``cifar10``                 10       train                train / test
cifar100       ``cifar100``                100      train                train / test
stl10          ``stl10``                   10       train + unlabelled   train / test
imagenet100    ``imagenet100`` (below)     100      train                train / validation
=============  ==========================  =======  ===================  ======================

Getting the data:

* ``fashion_mnist`` is the embedded default and works offline with no flags. When it is not
  prepared yet, the four original IDX ``.gz`` files are first rebuilt from Debian's
  ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``, or ``local_dir=``):
  Debian's files hold the upstream deflate streams with a shorter gzip header, and restoring the
  header gives the upstream files byte for byte. They are checked against the sha256 sums TFDS
  records for the downloads, then handed to TFDS, which checks them again while preparing. As
  the bytes are identical, the prepared dataset is the one a download gives. Without a usable
  local copy, TFDS downloads the files; with neither, the loaders fail within seconds.
* ``cifar10``, ``cifar100``, ``stl10`` are downloaded by TFDS on first use. Offline, prepare them
  on a machine with internet access (``tfds build cifar10 --file_format=array_record
  --data_dir=DIR``) and copy ``DIR`` over.
* ``imagenet100`` is the 100-class subset of ImageNet-2012 used by CMC (Tian et al., 2019) and
  by the paper (:data:`IMAGENET100_CLASSES`, labels in sorted-wnid order). ImageNet cannot be
  downloaded automatically: register at https://image-net.org, download
  ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` into
  ``<data_dir>/downloads/manual/`` (the place TFDS's ``imagenet2012`` uses), and the first call
  prepares only the 100 classes (about 127k training and 5k validation images). TFDS keeps
  the JPEGs at their original sizes; the loader decodes them and resizes each, aspect kept, to
  a shorter side of 256 (a longer side of 384 for images more elongated than 3:2), and yields
  it whole in the top-left corner of a 384x384 canvas, with its ``'size'`` (height, width) in
  the batch. The on-device random-resized crop draws from the whole image, as SimCLR's crop of
  the full image does, and the evaluation view is the usual resize-256, centre-224
  (``augment.eval_transform(sizes=...)``). The canvas costs 2.25x the bytes of a 256x256
  square per image in host batches and host-to-device transfers (442 KB, not 197 KB); the
  prepared dataset on disk is unchanged. The training split (about 56 GB as canvases) is
  streamed, never held in memory, by the pretraining loader and by ``dhel-eval``
  (:func:`open_split`, ``docs/evaluation_memory.md``).

Preparing a dataset needs TensorFlow (``tensorflow-cpu``); reading one does not.
Multi-host: process ``p`` of ``P`` owns the records ``p, p + P, p + 2P, ...`` (``N // P`` of
them, so all processes yield the same number of batches) and reads only those.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import io
import os
import socket
import struct
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from dhel_jax._validation import check_int

# The image sources live in dhel_jax.sources (NumPy only); re-exported for data's users.
from dhel_jax.sources import ArraySource as ArraySource
from dhel_jax.sources import SubsetSource as SubsetSource
from dhel_jax.sources import as_source as as_source
from dhel_jax.sources import iter_batches as iter_batches

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
      tfds_name: TFDS builder name.
      num_classes: number of classes of the labelled splits.
      image_shape: ``(H, W, C)`` of every uint8 image the loaders yield.
      pretrain_splits: TFDS splits concatenated for contrastive pretraining.
      train_split: labelled split to fit evaluation probes on.
      test_split: labelled split to report evaluation results on.
      mean: per-channel mean of the training pixels in [0, 1] units (for normalisation).
      std: per-channel standard deviation of the training pixels in [0, 1] units.
      view_size: default side length of the augmented views (``out_size`` of the augmentations).
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
    tfds_name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    pretrain_splits: tuple[str, ...]
    train_split: str
    test_split: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    view_size: int
    eval_crop_fraction: float = 1.0
    resize_shorter: int | None = None
    in_memory: bool = True
    needs_manual_download: bool = False


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="fashion_mnist",
            tfds_name="fashion_mnist",
            num_classes=10,
            image_shape=(28, 28, 1),
            pretrain_splits=("train",),
            train_split="train",
            test_split="test",
            # Exact moments of the 60000 training images (checked by tests/test_data.py).
            mean=(0.28604060,),
            std=(0.35302424,),
            view_size=28,
        ),
        DatasetInfo(
            name="cifar10",
            tfds_name="cifar10",
            num_classes=10,
            image_shape=(32, 32, 3),
            pretrain_splits=("train",),
            train_split="train",
            test_split="test",
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            view_size=32,
        ),
        DatasetInfo(
            name="cifar100",
            tfds_name="cifar100",
            num_classes=100,
            image_shape=(32, 32, 3),
            pretrain_splits=("train",),
            train_split="train",
            test_split="test",
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            view_size=32,
        ),
        DatasetInfo(
            name="stl10",
            tfds_name="stl10",
            num_classes=10,
            image_shape=(96, 96, 3),
            pretrain_splits=("train", "unlabelled"),
            train_split="train",
            test_split="test",
            mean=(0.4467, 0.4398, 0.4066),
            std=(0.2603, 0.2566, 0.2713),
            view_size=96,
            in_memory=False,
        ),
        DatasetInfo(
            name="imagenet100",
            tfds_name="imagenet100",
            num_classes=100,
            # Shorter side 256 (SimCLR's evaluation resize), kept whole for the random crop;
            # the 384 canvas keeps every aspect ratio up to 3:2 at that resolution.
            image_shape=(384, 384, 3),
            pretrain_splits=("train",),
            train_split="train",
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


# ----------------------------------------------------------------------------------------------
# ImageNet-100: a TFDS builder that keeps the 100 CMC classes of the ImageNet-2012 archives.


def _imagenet100_builder_class() -> type:
    """Defines the ``imagenet100`` TFDS builder (on first use: it imports TFDS's ImageNet code)."""
    from tensorflow_datasets.datasets.imagenet2012 import (
        imagenet2012_dataset_builder as imagenet2012,
    )
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    classes = frozenset(IMAGENET100_CLASSES)

    class Imagenet100(imagenet2012.Builder, skip_registration=True):  # type: ignore[call-arg]
        """ImageNet-100 (CMC's class subset) built from the manually downloaded ILSVRC-2012 tars."""

        VERSION = tfds.core.Version("1.0.0")
        SUPPORTED_VERSIONS: list = []
        RELEASE_NOTES = {"1.0.0": "The 100 CMC classes of imagenet2012 5.1.0 (train, validation)."}

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description="The 100-class ImageNet-2012 subset of CMC (Tian et al., 2019).",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(encoding_format="jpeg"),
                        "label": tfds.features.ClassLabel(names=IMAGENET100_CLASSES),
                        "file_name": tfds.features.Text(),
                    }
                ),
                supervised_keys=("image", "label"),
                homepage="https://github.com/HobbitLong/CMC",
                citation="@article{tian2019contrastive, title={Contrastive Multiview Coding}, "
                "author={Tian, Yonglong and Krishnan, Dilip and Isola, Phillip}, "
                "journal={arXiv preprint arXiv:1906.05849}, year={2019}}",
            )

        def _split_generators(self, dl_manager: Any) -> list:
            manual = os.fspath(dl_manager.manual_dir)
            train = os.path.join(manual, "ILSVRC2012_img_train.tar")
            val = os.path.join(manual, "ILSVRC2012_img_val.tar")
            return [
                tfds.core.SplitGenerator(
                    name=tfds.Split.TRAIN, gen_kwargs={"archive": dl_manager.iter_archive(train)}
                ),
                tfds.core.SplitGenerator(
                    name=tfds.Split.VALIDATION,
                    gen_kwargs={
                        "archive": dl_manager.iter_archive(val),
                        "validation_labels": imagenet_common.get_validation_labels(val),
                    },
                ),
            ]

        def _generate_examples(self, archive: Any, validation_labels: Any = None, **_: Any):
            if validation_labels:
                for key, record in imagenet_common.generate_examples_validation(
                    archive, validation_labels
                ):
                    if record["label"] in classes:
                        yield key, record
                return
            # The training tar holds one tar per class, named after its wnid; other classes are
            # skipped before their images are read.
            for fname, fobj in archive:
                if fname[: -len(".tar")] not in classes:
                    continue
                for image_fname, image in tfds.download.iter_archive(
                    io.BytesIO(fobj.read()), tfds.download.ExtractMethod.TAR_STREAM
                ):
                    image = self._fix_image(image_fname, image)
                    yield (
                        image_fname,
                        {
                            "file_name": image_fname,
                            "image": image,
                            "label": fname[: -len(".tar")],
                        },
                    )

    return Imagenet100


_IMAGENET100_CLASS: list[type] = []


def _builder(info: DatasetInfo, data_dir: str | None) -> tfds.core.DatasetBuilder:
    if info.tfds_name == "imagenet100":
        if not _IMAGENET100_CLASS:
            _IMAGENET100_CLASS.append(_imagenet100_builder_class())
        return _IMAGENET100_CLASS[0](data_dir=data_dir, file_format="array_record")
    return tfds.builder(info.tfds_name, data_dir=data_dir, file_format="array_record")


# ----------------------------------------------------------------------------------------------
# Preparing: local Fashion-MNIST files, a quick network check, then TFDS.

# Debian recompressed nothing: its .gz files hold the upstream deflate streams, but their gzip
# headers lack the original FNAME field and modification times. Restoring those fields gives the
# upstream files byte for byte, hence TFDS's recorded sha256 sums.
_FASHION_MNIST_GZIP_MTIME = {"train": 1504176606, "t10k": 1504176627}
_GZIP_OS_UNIX = 3
_GZIP_FLAG_FNAME = 0x08


def _upstream_gzip(data: bytes, filename: str) -> bytes:
    """Re-creates an upstream Fashion-MNIST ``.gz`` from Debian's copy (header fields only)."""
    if len(data) < 10 or data[:3] != b"\x1f\x8b\x08" or data[3] != 0:
        return data  # Not a bare gzip header: the checksum check decides.
    mtime = _FASHION_MNIST_GZIP_MTIME[filename.split("-")[0]]
    name = filename[: -len(".gz")].encode("latin-1") + b"\0"
    header = b"\x1f\x8b\x08" + bytes([_GZIP_FLAG_FNAME]) + struct.pack("<I", mtime)
    return header + bytes([data[8], _GZIP_OS_UNIX]) + name + data[10:]


def _stage_local_fashion_mnist(local_dir: str, url_infos: dict, staging_dir: str) -> None:
    """Writes the four upstream ``.gz`` files into ``staging_dir``, checking size and sha256.

    Raises ``FileNotFoundError`` or ``ValueError`` with the reason the local copy is unusable.
    """
    for url_info in url_infos.values():
        filename = url_info.filename
        path = os.path.join(local_dir, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
        with open(path, "rb") as f:
            content = _upstream_gzip(f.read(), filename)
        digest = hashlib.sha256(content).hexdigest()
        if len(content) != url_info.size or digest != url_info.checksum:
            raise ValueError(
                f"{path} does not match the upstream {filename} (sha256 {digest}, "
                f"{len(content)} bytes; expected sha256 {url_info.checksum}, {url_info.size} bytes)"
            )
        with open(os.path.join(staging_dir, filename), "wb") as f:
            f.write(content)


def _reachable(urls: Sequence[str], timeout: float) -> tuple[bool, str]:
    """Whether TCP connections to the hosts (or proxies) serving ``urls`` open within ``timeout``.

    Runs in a daemon thread so that a hanging DNS resolver cannot delay the answer either.
    """
    proxies = urllib.request.getproxies()
    endpoints = set()
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        proxy = proxies.get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
            parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        endpoints.add((parts.hostname, port))
    failures: list[str] = []

    def probe(endpoint: tuple[str, int]) -> None:
        try:
            socket.create_connection(endpoint, timeout=timeout).close()
        except OSError as e:
            failures.append(f"{endpoint[0]}:{endpoint[1]} ({e})")

    threads = [threading.Thread(target=probe, args=(e,), daemon=True) for e in sorted(endpoints)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 1.0)
    if any(t.is_alive() for t in threads):
        failures.append(f"no answer within {timeout:g} s")
    where = ", ".join(f"{h}:{p}" for h, p in sorted(endpoints))
    return (not failures), ("; ".join(failures) if failures else where)


def _require_tensorflow(info: DatasetInfo) -> None:
    if importlib.util.find_spec("tensorflow") is None:
        raise DatasetUnavailableError(
            f"Preparing {info.name} as array_record needs TensorFlow (pip install tensorflow-cpu); "
            "reading a prepared dataset does not."
        )


def _download_config(**kwargs: Any) -> tfds.download.DownloadConfig:
    # GCS-hosted TFDS copies are tfrecord; we want array_record, and no slow GCS lookups.
    return tfds.download.DownloadConfig(try_download_gcs=False, **kwargs)


def _prepare(
    builder: tfds.core.DatasetBuilder, info: DatasetInfo, local_dir: str, network_timeout: float
) -> None:
    """Prepares ``builder`` as array_record, failing within seconds when that is impossible."""
    where = os.fspath(builder.data_dir)
    if info.needs_manual_download:
        manual_dir = os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")
        needed = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
        missing = [f for f in needed if not os.path.isfile(os.path.join(manual_dir, f))]
        if missing:
            raise DatasetUnavailableError(
                f"{info.name} is not prepared in {where}, and ImageNet cannot be downloaded "
                f"automatically: {', '.join(missing)} missing from {manual_dir}. Register at "
                "https://image-net.org/download-images, download ILSVRC2012_img_train.tar and "
                f"ILSVRC2012_img_val.tar into {manual_dir}, and call again: the first call keeps "
                f"the {info.num_classes} classes of dhel_jax.data.IMAGENET100_CLASSES."
            )
        _require_tensorflow(info)
        builder.download_and_prepare(download_config=_download_config(manual_dir=manual_dir))
        return

    url_infos = dict(builder.url_infos or {})
    local_reason = None
    if info.name == "fashion_mnist":
        with tempfile.TemporaryDirectory(prefix="dhel_fashion_mnist_") as staging_dir:
            try:
                _stage_local_fashion_mnist(local_dir, url_infos, staging_dir)
            except (OSError, ValueError) as e:
                local_reason = str(e)
            else:
                _require_tensorflow(info)
                # TFDS takes the files from manual_dir and validates their checksums again.
                builder.download_and_prepare(
                    download_config=_download_config(manual_dir=staging_dir)
                )
                return

    online, detail = _reachable(sorted(url_infos), network_timeout)
    if online:
        _require_tensorflow(info)
        builder.download_and_prepare(download_config=_download_config())
        return

    if info.name == "fashion_mnist":
        raise DatasetUnavailableError(
            f"fashion_mnist is not prepared in {where} and cannot be obtained: no usable local "
            f"copy ({local_reason}) and no network ({detail}). Either install Debian's package "
            f"(apt-get install dataset-fashion-mnist, which fills {DEBIAN_FASHION_MNIST_DIR}) "
            "or pass local_dir= a directory holding train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz; "
            "or run with internet access, and TFDS downloads it."
        )
    raise DatasetUnavailableError(
        f"{info.name} is not prepared as array_record in {where}, and its download host is "
        f"unreachable ({detail}). Either run with internet access (TFDS downloads and prepares "
        f"it on first use), or prepare it on a machine that has it (tfds build {info.tfds_name} "
        "--file_format=array_record --data_dir=DIR), copy DIR here and pass data_dir=DIR."
    )


def prepare(
    name: str,
    *,
    data_dir: str | None = None,
    local_dir: str = DEBIAN_FASHION_MNIST_DIR,
    network_timeout: float = 3.0,
) -> str:
    """Makes sure dataset ``name`` is prepared as array_record; returns its TFDS directory.

    The loaders call this themselves; call it ahead of time (e.g. once per machine before a
    multi-host job) to keep preparation out of training.

    Args:
      name: a :data:`DATASETS` name.
      data_dir: TFDS data directory; ``None`` is TFDS's default (``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).
      local_dir: fashion_mnist only: directory with the four IDX ``.gz`` files (Debian's or the
        upstream ones), used before any download. Their sha256 sums are always checked.
      network_timeout: seconds allowed to open a connection to the download host before the
        dataset is declared unavailable.

    Raises:
      DatasetUnavailableError: the dataset is not prepared and neither local files nor the
        network can provide it (raised within seconds, naming the ways to get the data).
    """
    info = get_dataset_info(name)
    builder = _builder(info, data_dir)
    if not builder.is_prepared():
        _prepare(builder, info, local_dir, network_timeout)
    return os.fspath(builder.data_dir)


def _open_splits(
    info: DatasetInfo,
    splits: Sequence[str],
    data_dir: str | None,
    local_dir: str,
    network_timeout: float,
) -> list[Any]:
    """Returns a TFDS random-access data source per split, preparing the dataset if needed."""
    builder = _builder(info, data_dir)
    try:
        return [builder.as_data_source(split=split) for split in splits]
    except KeyError:
        # TFDS: "`splits` is empty ... the dataset has not been generated yet".
        if builder.is_prepared():
            raise
    except NotImplementedError as e:
        raise DatasetUnavailableError(
            f"{info.name} is prepared in {builder.data_dir} in a format without random access "
            "(probably tfrecord). Convert it: tfds convert_format "
            f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record"
        ) from e
    _prepare(builder, info, local_dir, network_timeout)
    builder = _builder(info, data_dir)
    return [builder.as_data_source(split=split) for split in splits]


# ----------------------------------------------------------------------------------------------
# Reading records.


def _fit_image(image: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resizes the shorter side to ``shape``'s side and keeps the centre (for variable sizes)."""
    height, width, channels = shape
    if image.ndim == 2:
        image = image[..., None]
    if image.shape == shape:
        return image
    if image.shape[-1] != channels:
        raise ValueError(f"expected {channels} channel(s), got an image of shape {image.shape}")
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
    out = np.asarray(pil).reshape(new_h, new_w, channels)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return out[top : top + height, left : left + width]


def _fit_canvas(
    image: np.ndarray, shape: tuple[int, int, int], shorter: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resizes ``image`` whole, aspect kept, to a shorter side of ``shorter`` (torchvision's
    ``Resize(shorter)`` sizes: the longer side is truncated), or to a longer side of the canvas
    side when that is smaller, and stores it in the top-left of a zero ``shape`` canvas.

    Returns:
      ``(canvas, (height, width))``: the uint8 canvas and the size of the image in it.
    """
    side, _, channels = shape
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] != channels:
        raise ValueError(f"expected {channels} channel(s), got an image of shape {image.shape}")
    h, w = image.shape[:2]
    short, long = min(h, w), max(h, w)
    new_short, new_long = shorter, int(shorter * long / short)
    if new_long > side:
        new_short, new_long = max(1, int(side * short / long)), side
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        pil = Image.fromarray(image[..., 0] if channels == 1 else image)
        pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
        image = np.asarray(pil).reshape(new_h, new_w, channels)
    canvas = np.zeros(shape, np.uint8)
    canvas[:new_h, :new_w] = image
    return canvas, (new_h, new_w)


def _get_records(source: Any, keys: list[int]) -> Sequence[dict]:
    """``source.__getitems__(keys)`` (batched reads, ~3x faster), else one record at a time."""
    try:
        return source.__getitems__(keys)
    except TypeError:
        # tfds.testing.mock_data (4.9.10) installs an unbound __getitems__ on its mock source.
        return [source[k] for k in keys]


class _Records:
    """Random access to the concatenation of several TFDS data sources, as uint8 batches."""

    def __init__(
        self,
        sources: Sequence[Any],
        image_shape: tuple[int, int, int],
        resize_shorter: int | None = None,
    ):
        self._sources = list(sources)
        self._offsets = np.cumsum([0] + [len(s) for s in self._sources])
        self.image_shape = image_shape
        self.resize_shorter = resize_shorter

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _empty(self, n: int) -> dict[str, np.ndarray]:
        batch: dict[str, np.ndarray] = {
            "image": np.empty((n, *self.image_shape), np.uint8),
            "label": np.empty((n,), np.int32),
        }
        if self.resize_shorter is not None:
            batch["size"] = np.empty((n, 2), np.int32)
        return batch

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Decodes records ``indices`` (in order): ``{'image': uint8, 'label': int32}``, and
        ``'size'`` (int32 (height, width) in the canvas) with ``resize_shorter``."""
        indices = np.asarray(indices, np.int64)
        batch = self._empty(len(indices))
        which = np.searchsorted(self._offsets, indices, side="right") - 1
        for s, source in enumerate(self._sources):
            (rows,) = np.nonzero(which == s)
            if rows.size == 0:
                continue
            keys = (indices[rows] - self._offsets[s]).tolist()
            for row, record in zip(rows, _get_records(source, keys), strict=True):
                image = np.asarray(record["image"])
                if self.resize_shorter is None:
                    batch["image"][row] = _fit_image(image, self.image_shape)
                else:
                    batch["image"][row], batch["size"][row] = _fit_canvas(
                        image, self.image_shape, self.resize_shorter
                    )
                batch["label"][row] = record["label"]
        return batch

    def read_all(self, indices: np.ndarray, num_threads: int) -> dict[str, np.ndarray]:
        """Like :meth:`read`, decoding chunks in parallel threads (decoders release the GIL)."""
        indices = np.asarray(indices, np.int64)
        batch = self._empty(len(indices))
        starts = range(0, len(indices), 2048)

        def read_chunk(start: int) -> None:
            stop = start + 2048
            for key, value in self.read(indices[start:stop]).items():
                batch[key][start:stop] = value

        with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
            list(pool.map(read_chunk, starts))
        return batch


class _InMemoryShard:
    """A process's shard decoded into host memory; ``read`` takes indices into the shard."""

    def __init__(self, batch: dict[str, np.ndarray]):
        self.batch = batch

    def read(self, local_indices: np.ndarray) -> dict[str, np.ndarray]:
        return {key: value[local_indices] for key, value in self.batch.items()}


class _StreamedShard:
    """A process's shard read from the data sources on demand: local ``k`` is record ``p + P k``."""

    def __init__(self, records: _Records, shard_index: int, shard_count: int):
        self.records, self.shard_index, self.shard_count = records, shard_index, shard_count

    def read(self, local_indices: np.ndarray) -> dict[str, np.ndarray]:
        return self.records.read(self.shard_index + self.shard_count * np.asarray(local_indices))


class _ReadBatch(grain.transforms.Map):
    """grain map: a batch of shard indices -> ``{'image': uint8 [B,H,W,C], 'label': int32 [B]}``
    (and ``'size'``: int32 [B, 2] for datasets with ``resize_shorter``)."""

    def __init__(self, shard: _InMemoryShard | _StreamedShard):
        self._shard = shard

    def map(self, local_indices: np.ndarray) -> dict[str, np.ndarray]:
        return self._shard.read(np.asarray(local_indices, np.int64))


# ----------------------------------------------------------------------------------------------
# Public loaders.


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    count = check_int(count, "process_count", minimum=1)
    index = check_int(index, "process_index", minimum=0)
    if index >= count:
        raise ValueError(
            f"process_index must be in [0, process_count); got process_index = {index}, "
            f"process_count = {count}."
        )
    return index, count


def _as_splits(info: DatasetInfo, splits: str | Sequence[str] | None) -> tuple[str, ...]:
    if splits is None:
        return info.pretrain_splits
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    if not splits or not all(isinstance(s, str) and s for s in splits):
        raise ValueError(f"splits must be a split name or a sequence of them; got {splits!r}.")
    return splits


def num_examples(
    name: str,
    splits: str | Sequence[str] | None = None,
    *,
    data_dir: str | None = None,
    local_dir: str = DEBIAN_FASHION_MNIST_DIR,
    network_timeout: float = 3.0,
) -> int:
    """Number of records in ``splits`` (default: the pretraining splits), preparing if needed."""
    info = get_dataset_info(name)
    sources = _open_splits(info, _as_splits(info, splits), data_dir, local_dir, network_timeout)
    return sum(len(s) for s in sources)


def load_split(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    local_dir: str = DEBIAN_FASHION_MNIST_DIR,
    network_timeout: float = 3.0,
    num_threads: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads a whole split into host memory, in the stored order (for probes and evaluation).

    Returns:
      ``(images, labels)``: uint8 ``[N, H, W, C]`` with ``(H, W, C) = image_shape`` and int32
      ``[N]`` (``-1`` for unlabelled records, e.g. stl10's ``unlabelled`` split).

    ``imagenet100``'s training split is about 56 GB this way, and its images are canvases
    whose valid sizes only :func:`open_split` and the loaders give; read it with those (see
    the module docstring). Other arguments are those of :func:`prepare`; ``num_threads``
    threads decode the records.
    """
    info = get_dataset_info(name)
    (source,) = _open_splits(info, _as_splits(info, split), data_dir, local_dir, network_timeout)
    records = _Records([source], info.image_shape, info.resize_shorter)
    batch = records.read_all(np.arange(len(records)), num_threads)
    return batch["image"], batch["label"]


# ----------------------------------------------------------------------------------------------
# Random access to one split, for evaluation: in host memory, or streamed from the records.


class RecordSource:
    """A split decoded from its TFDS records on each :meth:`read` (an image source, see
    ``dhel_jax.sources``): host memory holds only what is being read."""

    def __init__(self, records: _Records):
        self._records = records
        self.image_shape = records.image_shape

    def __len__(self) -> int:
        return len(self._records)

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self._records.read(indices)


def open_split(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    in_memory: bool | None = None,
    local_dir: str = DEBIAN_FASHION_MNIST_DIR,
    network_timeout: float = 3.0,
    num_threads: int = 8,
) -> ArraySource | RecordSource:
    """An image source (see ``dhel_jax.sources``) of one split, in the stored order.

    ``in_memory`` (default: the dataset's ``in_memory``) decodes the split into host memory
    once, as :func:`load_split`; otherwise every read decodes its records, and an evaluation
    that streams the split holds only its features (``docs/evaluation_memory.md``). Other
    arguments are those of :func:`load_split`.
    """
    info = get_dataset_info(name)
    (source,) = _open_splits(info, _as_splits(info, split), data_dir, local_dir, network_timeout)
    records = _Records([source], info.image_shape, info.resize_shorter)
    if info.in_memory if in_memory is None else in_memory:
        batch = records.read_all(np.arange(len(records)), num_threads)
        return ArraySource(batch["image"], batch["label"], batch.get("size"))
    return RecordSource(records)


def make_pretrain_loader(
    name: str,
    *,
    global_batch_size: int,
    seed: int,
    data_dir: str | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    splits: str | Sequence[str] | None = None,
    drop_remainder: bool = True,
    in_memory: bool | None = None,
    read_threads: int = 4,
    prefetch_batches: int = 4,
    local_dir: str = DEBIAN_FASHION_MNIST_DIR,
    network_timeout: float = 3.0,
) -> grain.IterDataset:
    """A deterministic, checkpointable grain pipeline of this process's uint8 batches.

    Process ``p`` of ``P`` owns the records ``p + P k`` for ``k < N // P`` (``N`` records in
    ``splits``), reshuffles them every epoch (grain's index shuffle, seeded by ``seed`` and
    ``p``) and yields local batches of ``B_local = global_batch_size // P``; the global batch is
    the concatenation over processes. ``num_epochs=None`` repeats forever; epochs follow one
    another without gaps, and only the final incomplete batch is dropped (``drop_remainder``).

    ``iter()`` of the result gives a ``grain.DatasetIterator`` whose ``get_state()`` (a small
    JSON-serialisable dict) and ``set_state(state)`` resume on exactly the next batch; Orbax saves
    it with ``grain.checkpoint.CheckpointSave(iterator)`` / ``CheckpointRestore(iterator)``.

    Args:
      name: a :data:`DATASETS` name.
      global_batch_size: batch size over all processes; a multiple of ``process_count``.
      seed: shuffling seed.
      data_dir: TFDS data directory (``None``: TFDS's default).
      shuffle: reshuffle every epoch (``False``: stored order).
      num_epochs: number of passes (``None``: infinite).
      process_index, process_count: this process and the number of processes (default
        ``jax.process_index()`` and ``jax.process_count()``).
      worker_count: grain worker processes decoding batches (0: threads of this process only).
      splits: TFDS splits to read (default: ``pretrain_splits``).
      drop_remainder: drop the final incomplete batch of a finite pipeline.
      in_memory: decode the shard into host memory once (default: the dataset's ``in_memory``).
      read_threads: grain threads preparing batches in this process.
      prefetch_batches: batches prepared ahead.
      local_dir, network_timeout: see :func:`prepare`.

    Returns:
      A ``grain.IterDataset`` of ``{'image': uint8 [B_local, H, W, C], 'label': int32
      [B_local]}`` (label ``-1`` for unlabelled records), plus ``'size'`` (int32 [B_local, 2],
      each image's (height, width) in its canvas) for datasets with ``resize_shorter``.
    """
    info = get_dataset_info(name)
    index, count = _process(process_index, process_count)
    global_batch_size = check_int(global_batch_size, "global_batch_size", minimum=1)
    if global_batch_size % count:
        raise ValueError(
            f"global_batch_size must be a multiple of process_count; got {global_batch_size} "
            f"for {count} processes."
        )
    if num_epochs is not None:
        num_epochs = check_int(num_epochs, "num_epochs", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    worker_count = check_int(worker_count, "worker_count", minimum=0)
    local_batch = global_batch_size // count

    sources = _open_splits(info, _as_splits(info, splits), data_dir, local_dir, network_timeout)
    records = _Records(sources, info.image_shape, info.resize_shorter)
    shard_size = len(records) // count
    if shard_size < local_batch:
        raise ValueError(
            f"{name} {list(_as_splits(info, splits))} has {len(records)} records, "
            f"{shard_size} per process: fewer than the per-process batch of {local_batch}."
        )
    if info.in_memory if in_memory is None else in_memory:
        owned = index + count * np.arange(shard_size)
        shard: _InMemoryShard | _StreamedShard = _InMemoryShard(
            records.read_all(owned, max(1, read_threads))
        )
    else:
        shard = _StreamedShard(records, index, count)

    ds = grain.MapDataset.range(shard_size)
    if shuffle:
        # A 32-bit seed per (seed, process): shards are shuffled independently.
        ds = ds.shuffle(seed=int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
    ds = ds.repeat(num_epochs)
    ds = ds.batch(local_batch, drop_remainder=drop_remainder)
    ds = ds.map(_ReadBatch(shard))
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
    )
    if worker_count:
        # grain's worker start-up reads its absl flags; outside absl.app.run they are unparsed
        # and grain would fail, although it means their defaults (cf. grain.config.get_or_default).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it_ds
