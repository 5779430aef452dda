"""Image sources: random access to the images of one split, batch by batch.

An *image source* has ``len(source)``, ``source.image_shape`` ``(H, W, C)`` and
``source.read(indices)``, which returns ``{'image': uint8 [n, H, W, C], 'label': int32 [n]}``
for the records ``indices`` in that order, and ``'size'`` (int32 [n, 2], each image's (height,
width) in its canvas) for datasets stored in canvases (ImageNet-100). ``dhel_jax.data.open_split``
opens one from a prepared dataset (in memory, or streamed from its records); evaluation, the
probes' inputs and the baselines read through these, so their host memory holds batches, not
splits. Needs only NumPy and the standard library.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
from collections.abc import Generator, Iterable, Sequence
from typing import Any

import numpy as np


class ArraySource:
    """A split held in host memory (uint8 images, int32 labels): the in-memory image source
    (see the module docstring)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        sizes: np.ndarray | None = None,
    ):
        self.images = images
        self.labels = np.full(len(images), -1, np.int32) if labels is None else labels
        self.sizes = sizes
        if len(self.labels) != len(images) or (sizes is not None and len(sizes) != len(images)):
            raise ValueError(
                f"ArraySource: {len(images)} images but {len(self.labels)} labels"
                f"{'' if sizes is None else f' and {len(sizes)} sizes'}; one per image."
            )

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        batch = {"image": self.images[indices], "label": np.asarray(self.labels[indices], np.int32)}
        if self.sizes is not None:
            batch["size"] = np.asarray(self.sizes[indices], np.int32)
        return batch


class SubsetSource:
    """The records ``indices`` of an image ``source``, renumbered ``0 .. len(indices) - 1``."""

    def __init__(self, source: Any, indices: Sequence[int] | np.ndarray):
        self._source = source
        self._indices = np.asarray(indices, np.int64)
        self.image_shape = tuple(source.image_shape)
        if self._indices.size and (self._indices.min() < 0 or self._indices.max() >= len(source)):
            raise ValueError(
                f"SubsetSource: indices must lie in [0, {len(source)}); got "
                f"[{self._indices.min()}, {self._indices.max()}]."
            )

    def __len__(self) -> int:
        return len(self._indices)

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self._source.read(self._indices[np.asarray(indices, np.int64)])


def as_source(images: Any, fn: str = "as_source") -> Any:
    """``images`` as an image source: an image source itself, or an :class:`ArraySource` of
    a uint8 ``(N, H, W, C)`` array; ValueError (naming ``fn``) for anything else or N = 0."""
    if hasattr(images, "read") and hasattr(images, "image_shape"):
        source = images
    else:
        shape = getattr(images, "shape", None)
        if shape is None or len(shape) != 4:
            raise ValueError(
                f"{fn}: images must be an array of shape (N, H, W, C) with N >= 1, or an image "
                f"source (dhel_jax.data.open_split); got {None if shape is None else tuple(shape)}."
            )
        source = ArraySource(images)
    if len(source) < 1 or len(tuple(source.image_shape)) != 3:
        raise ValueError(
            f"{fn}: images must hold N >= 1 images of shape (H, W, C); got {len(source)} of "
            f"shape {tuple(source.image_shape)}."
        )
    return source


def iter_batches(
    source: Any,
    index_batches: Iterable[np.ndarray],
    *,
    num_threads: int = 4,
    prefetch: int = 4,
) -> Generator[tuple[np.ndarray, dict[str, np.ndarray]], None, None]:
    """``(indices, source.read(indices))`` for each batch of ``index_batches``, in order.

    ``num_threads`` threads decode up to ``prefetch`` batches ahead (decoders release the GIL),
    so host memory holds at most ``prefetch + 1`` batches, whatever the size of the split.
    """
    if num_threads < 1 or prefetch < 1:
        raise ValueError(
            f"iter_batches: num_threads and prefetch must be >= 1; got {num_threads}, {prefetch}."
        )
    pending: collections.deque = collections.deque()
    batches = iter(index_batches)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        for indices in itertools.islice(batches, prefetch):
            pending.append((indices, pool.submit(source.read, indices)))
        while pending:
            indices, future = pending.popleft()
            batch = future.result()
            for more in itertools.islice(batches, 1):
                pending.append((more, pool.submit(source.read, more)))
            yield indices, batch
