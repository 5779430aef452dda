"""Datasets for contrastive pretraining and evaluation: TFDS ``array_record`` read with grain.

Every dataset is a TensorFlow Datasets (TFDS) dataset prepared in the ``array_record`` format and
read through ``tfds.data_source`` (random access, no TensorFlow needed to read) and a ``grain``
pipeline. The host only decodes: batches hold uint8 images, and the random SimCLR augmentations
run on the accelerator (:mod:`dhel_jax.augment`).

The registry of datasets lives in :mod:`dhel_jax.datasets`, preparing them in
:mod:`dhel_jax.prepare`; both are re-exported here for data's users.

Multi-host: process ``p`` of ``P`` owns the records ``p, p + P, p + 2P, ...`` (``N // P`` of
them, so all processes yield the same number of batches) and reads only those.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from dhel_jax._validation import check_int

# The registry lives in dhel_jax.datasets and preparing in dhel_jax.prepare; re-exported for
# data's users.
from dhel_jax.datasets import DATASETS as DATASETS
from dhel_jax.datasets import DEBIAN_FASHION_MNIST_DIR as DEBIAN_FASHION_MNIST_DIR
from dhel_jax.datasets import IMAGENET100_CLASSES as IMAGENET100_CLASSES
from dhel_jax.datasets import DatasetInfo as DatasetInfo
from dhel_jax.datasets import DatasetUnavailableError as DatasetUnavailableError
from dhel_jax.datasets import get_dataset_info as get_dataset_info
from dhel_jax.prepare import open_tfds_splits
from dhel_jax.prepare import prepare as prepare

# The image sources live in dhel_jax.sources (NumPy only); re-exported for data's users.
from dhel_jax.sources import ArraySource as ArraySource
from dhel_jax.sources import SubsetSource as SubsetSource
from dhel_jax.sources import as_source as as_source
from dhel_jax.sources import iter_batches as iter_batches

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
    sources = open_tfds_splits(info, _as_splits(info, splits), data_dir, local_dir, network_timeout)
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
    (source,) = open_tfds_splits(
        info, _as_splits(info, split), data_dir, local_dir, network_timeout
    )
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
    (source,) = open_tfds_splits(
        info, _as_splits(info, split), data_dir, local_dir, network_timeout
    )
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

    sources = open_tfds_splits(info, _as_splits(info, splits), data_dir, local_dir, network_timeout)
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
