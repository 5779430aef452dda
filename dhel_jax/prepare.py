"""Getting a dataset onto disk as TFDS ``array_record``: :func:`prepare`.

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
  (:func:`dhel_jax.data.open_split`, ``docs/evaluation_memory.md``).

Preparing a dataset needs TensorFlow (``tensorflow-cpu``); reading one does not.
"""

from __future__ import annotations

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

import tensorflow_datasets as tfds

from dhel_jax.datasets import (
    DEBIAN_FASHION_MNIST_DIR,
    IMAGENET100_CLASSES,
    DatasetInfo,
    DatasetUnavailableError,
    get_dataset_info,
)

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


def open_tfds_splits(
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
