"""Tests for dhel_jax.data: the real offline Fashion-MNIST and every other dataset mocked.

Fashion-MNIST is prepared once per session, with networking disabled, from Debian's
``dataset-fashion-mnist`` files into a temporary TFDS directory; its contents are checked
against the raw IDX bytes parsed here with gzip + NumPy. The other datasets run on
``tfds.testing.mock_data``; ImageNet-100's builder also runs on tiny fake ILSVRC archives.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import hashlib
import io
import json
import os
import socket
import tarfile

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dhel_jax import data, prepare

DEBIAN_DIR = data.DEBIAN_FASHION_MNIST_DIR
HAVE_DEBIAN_FILES = os.path.isfile(os.path.join(DEBIAN_DIR, "train-images-idx3-ubyte.gz"))
needs_debian = pytest.mark.skipif(
    not HAVE_DEBIAN_FILES, reason="Debian's dataset-fashion-mnist is not installed"
)
MOCKED = ("cifar10", "cifar100", "stl10", "imagenet100")


def _no_network(*args, **kwargs):
    raise OSError("networking is disabled in this test")


@contextlib.contextmanager
def _networking_disabled():
    """Makes every socket connection and DNS lookup of this process fail at once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "create_connection", _no_network)
        mp.setattr(socket, "getaddrinfo", _no_network)
        mp.setattr(socket.socket, "connect", _no_network)
        yield


@pytest.fixture
def offline():
    with _networking_disabled():
        yield


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
    """A TFDS data dir holding Fashion-MNIST, prepared offline from Debian's files."""
    if not HAVE_DEBIAN_FILES:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    with _networking_disabled():
        data.prepare("fashion_mnist", data_dir=data_dir)
    return data_dir


def _read_idx(name: str) -> np.ndarray:
    """Parses an IDX file (Debian's .gz) independently of TFDS: big-endian header, then uint8."""
    raw = gzip.open(os.path.join(DEBIAN_DIR, name)).read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _hashes(images: np.ndarray) -> list[bytes]:
    return [hashlib.sha1(im.tobytes()).digest() for im in images]


def _collect(loader) -> tuple[np.ndarray, np.ndarray]:
    batches = list(loader)
    return (
        np.concatenate([b["image"] for b in batches]),
        np.concatenate([b["label"] for b in batches]),
    )


# ----------------------------------------------------------------------------------------------
# Registry.


def test_registry_lists_the_paper_datasets():
    assert set(data.DATASETS) == {"fashion_mnist", "cifar10", "cifar100", "stl10", "imagenet100"}
    for name, info in data.DATASETS.items():
        assert data.get_dataset_info(name) is info
        assert len(info.mean) == len(info.std) == info.image_shape[-1]
        assert info.test_split != info.train_split
    assert data.get_dataset_info("stl10").pretrain_splits == ("train", "unlabelled")
    assert len(data.IMAGENET100_CLASSES) == len(set(data.IMAGENET100_CLASSES)) == 100
    assert list(data.IMAGENET100_CLASSES) == sorted(data.IMAGENET100_CLASSES)


def test_unknown_dataset_lists_accepted_names():
    with pytest.raises(ValueError, match="'mnist'.*accepted names.*'cifar10'"):
        data.get_dataset_info("mnist")
    with pytest.raises(ValueError, match="accepted names"):
        data.make_pretrain_loader("svhn", global_batch_size=8, seed=0)


# ----------------------------------------------------------------------------------------------
# Offline Fashion-MNIST (the real data).


@needs_debian
def test_debian_files_rebuild_the_upstream_downloads_byte_for_byte():
    """Restoring FNAME, mtime and OS in Debian's gzip headers gives TFDS's recorded sha256."""
    url_infos = tfds.builder("fashion_mnist").url_infos
    assert len(url_infos) == 4
    for url_info in url_infos.values():
        with open(os.path.join(DEBIAN_DIR, url_info.filename), "rb") as f:
            debian = f.read()
        upstream = prepare._upstream_gzip(debian, url_info.filename)
        assert hashlib.sha256(debian).hexdigest() != url_info.checksum
        assert hashlib.sha256(upstream).hexdigest() == url_info.checksum
        assert len(upstream) == url_info.size
        assert gzip.decompress(upstream) == gzip.decompress(debian)
        # The restored header: FNAME flag, then the original file name after 10 bytes.
        assert upstream[3] == 0x08 and upstream[9] == 3
        assert upstream[10:].startswith(url_info.filename[: -len(".gz")].encode() + b"\0")


@needs_debian
def test_fashion_mnist_splits_match_the_raw_idx_files(fashion_mnist_dir, offline):
    for split, prefix, per_class in (("train", "train", 6000), ("test", "t10k", 1000)):
        images, labels = data.load_split("fashion_mnist", split, data_dir=fashion_mnist_dir)
        chex.assert_shape(images, (10 * per_class, 28, 28, 1))
        chex.assert_type(images, np.uint8)
        chex.assert_shape(labels, (10 * per_class,))
        chex.assert_type(labels, np.int32)
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)

        idx_images = _read_idx(f"{prefix}-images-idx3-ubyte.gz")
        idx_labels = _read_idx(f"{prefix}-labels-idx1-ubyte.gz")
        assert idx_images.shape == (10 * per_class, 28, 28)
        # TFDS stores the records in its own order: compare the multisets of (image, label).
        loaded = collections.Counter(zip(_hashes(images[..., 0]), labels.tolist(), strict=True))
        raw = collections.Counter(zip(_hashes(idx_images), idx_labels.tolist(), strict=True))
        assert loaded == raw
        # And a few pixels directly: raw IDX image i is found, with its label, in the split.
        position = {h: i for i, h in enumerate(_hashes(images[..., 0]))}
        for i in (0, 1, 4321, len(idx_images) - 1):
            j = position[hashlib.sha1(idx_images[i].tobytes()).digest()]
            np.testing.assert_array_equal(images[j, :, :, 0], idx_images[i])
            assert labels[j] == idx_labels[i]
        if split == "train":
            pixels = idx_images.astype(np.float64) / 255.0
            info = data.get_dataset_info("fashion_mnist")
            np.testing.assert_allclose(info.mean, [pixels.mean()], atol=1e-7)
            np.testing.assert_allclose(info.std, [pixels.std()], atol=1e-7)


@needs_debian
def test_fashion_mnist_pretrain_loader_offline(fashion_mnist_dir, offline):
    # One of four processes: it decodes only its quarter of the records.
    loader = data.make_pretrain_loader(
        "fashion_mnist",
        global_batch_size=256,
        seed=0,
        data_dir=fashion_mnist_dir,
        process_index=3,
        process_count=4,
    )
    it = iter(loader)
    batches = [next(it) for _ in range(3)]
    for batch in batches:
        chex.assert_shape(batch["image"], (64, 28, 28, 1))
        chex.assert_type(batch["image"], np.uint8)
        chex.assert_type(batch["label"], np.int32)
        assert batch["label"].min() >= 0 and batch["label"].max() < 10
    assert data.num_examples("fashion_mnist", "test", data_dir=fashion_mnist_dir) == 10000


@pytest.mark.timeout(10)
def test_fashion_mnist_without_network_or_files_fails_fast_naming_both_ways(tmp_path, offline):
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load_split(
            "fashion_mnist",
            "train",
            data_dir=str(tmp_path / "tfds"),
            local_dir=str(tmp_path / "nothing"),
        )
    message = str(err.value)
    assert "dataset-fashion-mnist" in message and "local_dir" in message
    assert "internet" in message and "disabled" in message


@needs_debian
@pytest.mark.timeout(10)
def test_corrupt_local_copy_is_rejected_by_its_checksum(tmp_path, offline):
    local = tmp_path / "local"
    local.mkdir()
    for name in os.listdir(DEBIAN_DIR):
        with open(os.path.join(DEBIAN_DIR, name), "rb") as f:
            content = bytearray(f.read())
        if name == "t10k-labels-idx1-ubyte.gz":
            content[-20] ^= 0xFF
        (local / name).write_bytes(bytes(content))
    with pytest.raises(data.DatasetUnavailableError, match="t10k-labels.*sha256"):
        data.prepare("fashion_mnist", data_dir=str(tmp_path / "tfds"), local_dir=str(local))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", ["cifar10", "stl10"])
def test_downloadable_dataset_without_network_fails_fast(name, tmp_path, offline):
    with pytest.raises(data.DatasetUnavailableError, match="internet.*tfds build"):
        data.make_pretrain_loader(name, global_batch_size=8, seed=0, data_dir=str(tmp_path))


@pytest.mark.timeout(10)
def test_imagenet100_without_archives_explains_the_manual_download(tmp_path):
    with pytest.raises(data.DatasetUnavailableError, match="ILSVRC2012_img_train.tar.*image-net"):
        data.load_split("imagenet100", "validation", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Every other dataset, mocked.


@pytest.fixture
def mocked():
    """TFDS's mock: 64 random records per split, no files, no network."""
    with tfds.testing.mock_data(num_examples=64):
        yield 64


@pytest.mark.parametrize("name", MOCKED)
def test_mocked_batches_have_the_registry_shapes(name, mocked):
    info = data.get_dataset_info(name)
    batch = next(iter(data.make_pretrain_loader(name, global_batch_size=16, seed=0)))
    chex.assert_shape(batch["image"], (16, *info.image_shape))
    chex.assert_type(batch["image"], np.uint8)
    chex.assert_shape(batch["label"], (16,))
    chex.assert_type(batch["label"], np.int32)
    assert batch["label"].min() >= -1 and batch["label"].max() < info.num_classes
    for split in (info.train_split, info.test_split):
        images, labels = data.load_split(name, split)
        chex.assert_shape(images, (mocked, *info.image_shape))
        chex.assert_type(images, np.uint8)
        chex.assert_type(labels, np.int32)
        assert labels.min() >= 0 and labels.max() < info.num_classes
    expected = mocked * len(info.pretrain_splits)
    assert data.num_examples(name) == expected


@pytest.mark.parametrize("name", MOCKED)
@pytest.mark.parametrize("shuffle", [False, True])
def test_two_processes_read_disjoint_complete_shards(name, shuffle, mocked):
    info = data.get_dataset_info(name)
    all_images = np.concatenate([data.load_split(name, s)[0] for s in info.pretrain_splits])
    shards = [
        _collect(
            data.make_pretrain_loader(
                name,
                global_batch_size=8,
                seed=3,
                shuffle=shuffle,
                num_epochs=1,
                process_index=p,
                process_count=2,
            )
        )[0]
        for p in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == len(all_images) // 2
    counts = [collections.Counter(_hashes(s)) for s in shards]
    # Disjoint and complete, as multisets (stl10's mocked splits repeat the same fake records).
    assert counts[0] + counts[1] == collections.Counter(_hashes(all_images))
    if name != "stl10":
        assert not set(counts[0]) & set(counts[1])


def test_global_batch_must_split_evenly_over_processes(mocked):
    with pytest.raises(ValueError, match="multiple of process_count"):
        data.make_pretrain_loader(
            "cifar10", global_batch_size=9, seed=0, process_index=0, process_count=2
        )
    with pytest.raises(ValueError, match="process_index"):
        data.make_pretrain_loader(
            "cifar10", global_batch_size=8, seed=0, process_index=2, process_count=2
        )
    with pytest.raises(ValueError, match="fewer than the per-process batch"):
        data.make_pretrain_loader("cifar10", global_batch_size=128, seed=0, process_count=1)


@pytest.mark.parametrize("name", ["cifar10", "stl10"])
def test_pipeline_is_deterministic_for_a_seed(name, mocked):
    def first(seed, shuffle=True, n=3):
        it = iter(data.make_pretrain_loader(name, global_batch_size=8, seed=seed, shuffle=shuffle))
        return [next(it)["image"] for _ in range(n)]

    a, b, c = first(7), first(7), first(8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], first(7, shuffle=False)[0])


def test_epochs_are_reshuffled_permutations_of_the_shard(mocked):
    images, _ = _collect(
        data.make_pretrain_loader(
            "cifar10", global_batch_size=8, seed=1, num_epochs=2, process_index=0, process_count=1
        )
    )
    first, second = images[:64], images[64:]
    assert len(second) == 64
    assert collections.Counter(_hashes(first)) == collections.Counter(_hashes(second))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize(("name", "in_memory"), [("cifar10", True), ("stl10", False)])
def test_iterator_state_resumes_on_the_identical_next_batch(name, in_memory, mocked):
    def loader():
        return data.make_pretrain_loader(
            name, global_batch_size=8, seed=5, in_memory=in_memory, num_epochs=None
        )

    it = iter(loader())
    for _ in range(11):  # past the end of the first epoch (64 / 8 = 8 batches)
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(3)]

    restored = iter(loader())  # a fresh pipeline, as after a restart
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_orbax_checkpoints_the_iterator_with_grains_handler(tmp_path, mocked):
    """The training loop saves the iterator with Orbax through grain's checkpoint handler."""
    import grain
    import orbax.checkpoint as ocp

    def loader():
        return data.make_pretrain_loader("cifar10", global_batch_size=8, seed=4)

    it = iter(loader())
    for _ in range(5):
        next(it)
    manager = ocp.CheckpointManager(tmp_path, item_names=("data",))
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    want = next(it)

    restored = iter(loader())
    manager = ocp.CheckpointManager(tmp_path, item_names=("data",))
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    got = next(restored)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_worker_processes_give_the_same_batches(mocked):
    def first(workers):
        it = iter(
            data.make_pretrain_loader(
                "cifar10", global_batch_size=8, seed=2, worker_count=workers, num_epochs=1
            )
        )
        out = [next(it)["image"] for _ in range(3)]
        if hasattr(it, "close"):
            it.close()
        return out

    for x, y in zip(first(0), first(1), strict=True):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------------------------
# ImageNet-100's builder on fake ILSVRC-2012 archives.


def _jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_imagenet100_builder_keeps_the_cmc_classes(tmp_path):
    pytest.importorskip("tensorflow")  # preparing needs TensorFlow
    rng = np.random.default_rng(0)
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    kept, dropped = "n01558993", "n01440764"  # robin (in CMC's list), tench (not)
    assert kept in data.IMAGENET100_CLASSES and dropped not in data.IMAGENET100_CLASSES
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
        for wnid, count in ((dropped, 2), (kept, 3)):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i in range(count):
                    _add(tar, f"{wnid}_{i}.JPEG", _jpeg(rng, 40 + i, 60))
            _add(train, f"{wnid}.tar", inner.getvalue())
    # Validation labels are TFDS's list, in sorted file-name order.
    val_labels_path = os.path.join(
        os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "validation_labels.txt"
    )
    with open(val_labels_path) as f:
        val_labels = f.read().split()[:10]
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(10):
            _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(rng, 30, 50))
    expected_val = sorted(
        data.IMAGENET100_CLASSES.index(w) for w in val_labels if w in data.IMAGENET100_CLASSES
    )
    assert expected_val  # the first ten validation images include CMC classes

    images, labels = data.load_split("imagenet100", "train", data_dir=str(tmp_path))
    chex.assert_shape(images, (3, 384, 384, 3))
    np.testing.assert_array_equal(labels, [data.IMAGENET100_CLASSES.index(kept)] * 3)
    _, labels = data.load_split("imagenet100", "validation", data_dir=str(tmp_path))
    assert sorted(labels.tolist()) == expected_val


def test_fit_image_resizes_the_shorter_side_and_keeps_the_centre():
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # the centre square is white, the sides black
    out = data._fit_image(wide, (10, 10, 3))
    chex.assert_shape(out, (10, 10, 3))
    # Bilinear resizing blends the outermost columns with the black sides, nothing more.
    np.testing.assert_array_equal(out[:, 1:-1], 255)
    assert out[:, [0, -1]].min() > 128
    tall = np.transpose(wide, (1, 0, 2))
    np.testing.assert_array_equal(data._fit_image(tall, (10, 10, 3)), np.transpose(out, (1, 0, 2)))
    np.testing.assert_array_equal(data._fit_image(wide, (20, 40, 3)), wide)


def test_fit_canvas_keeps_the_whole_image_at_shorter_side_256_or_longer_side_384():
    rng = np.random.default_rng(1)
    for (h, w), (new_h, new_w) in (
        ((300, 400), (256, 341)),  # torchvision Resize(256): int(256 * 400 / 300) = 341
        ((400, 300), (341, 256)),
        ((300, 500), (230, 384)),  # 5:3, more than 3:2: longer side 384, int(384 * 3 / 5)
        ((200, 200), (256, 256)),
        ((100, 300), (128, 384)),  # more elongated than 3:2: the longer side is the canvas's
        ((256, 384), (256, 384)),  # already there: stored as is
    ):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        canvas, size = data._fit_canvas(image, (384, 384, 3), 256)
        assert size == (new_h, new_w)
        chex.assert_shape(canvas, (384, 384, 3))
        ref = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
        np.testing.assert_array_equal(canvas[:new_h, :new_w], ref)
        assert not canvas[new_h:].any() and not canvas[:, new_w:].any()


def test_imagenet100_crops_cover_the_whole_image_and_eval_is_resize_256_centre_224(tmp_path):
    """A fake ILSVRC-2012 with one 200x290 (wide) and one 330x220 (tall) training JPEG: the
    loader's canvases hold each whole image at shorter side 256 with its size; random crops of
    the training augmentation reach all four borders of both, beyond their centre squares;
    the evaluation view is the centre 224x224 of the shorter-side-256 image (NumPy/PIL
    reference from the decoded record)."""
    pytest.importorskip("tensorflow")  # preparing needs TensorFlow
    import jax
    import jax.numpy as jnp

    from dhel_jax import augment

    rng = np.random.default_rng(0)
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    wnid = "n01558993"
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
        inner = io.BytesIO()
        with tarfile.open(fileobj=inner, mode="w") as tar:
            _add(tar, f"{wnid}_0.JPEG", _jpeg(rng, 200, 290))
            _add(tar, f"{wnid}_1.JPEG", _jpeg(rng, 330, 220))
        _add(train, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(10):  # the first ten validation images include CMC classes
            _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(rng, 30, 50))

    source = data.open_split("imagenet100", "train", data_dir=str(tmp_path))
    assert len(source) == 2
    batch = source.read(np.arange(2))
    chex.assert_shape(batch["image"], (2, 384, 384, 3))
    raw = prepare._builder(data.get_dataset_info("imagenet100"), str(tmp_path)).as_data_source(
        split="train"
    )
    decoded = [np.asarray(raw[i]["image"]) for i in range(2)]
    for i, image in enumerate(decoded):
        h, w = image.shape[:2]
        short, long = min(h, w), max(h, w)
        new = (256, int(256 * long / short)) if h <= w else (int(256 * long / short), 256)
        assert tuple(batch["size"][i]) == new
        resized = np.asarray(Image.fromarray(image).resize(new[::-1], Image.BILINEAR))
        np.testing.assert_array_equal(batch["image"][i, : new[0], : new[1]], resized)

        # Eval: centre 224 of the resized image (top (H - 224) // 2, left (W - 224) // 2).
        top, left = (new[0] - 224) // 2, (new[1] - 224) // 2
        view = augment.eval_transform(
            jnp.asarray(batch["image"][i : i + 1]),
            sizes=jnp.asarray(batch["size"][i : i + 1]),
            crop_fraction=0.875,
            out_size=224,
        )
        ref = resized[top : top + 224, left : left + 224].astype(np.float64) / 255.0
        np.testing.assert_allclose(view[0], ref, atol=1e-5)

        # Training crops: coordinates of every view's source pixels, via a coordinate image.
        n = 512
        yy, xx = np.meshgrid(np.arange(new[0]), np.arange(new[1]), indexing="ij")
        coords = np.zeros((384, 384, 3), np.float32)
        coords[: new[0], : new[1], 0] = yy / 383
        coords[: new[0], : new[1], 1] = xx / 383
        coords[: new[0], : new[1], 2] = 1.0  # 1 inside the image, 0 in the padding
        views = augment.augment(
            jnp.asarray(np.broadcast_to(coords, (n, 384, 384, 3))),
            jax.random.key(i),
            sizes=jnp.asarray(np.tile(new, (n, 1)), jnp.int32),
            out_size=8,
            flip_prob=0.0,
            jitter_prob=0.0,
            grayscale_prob=0.0,
        )
        views = np.asarray(views)
        np.testing.assert_allclose(views[..., 2], 1.0, atol=1e-6)  # never the padding
        ys, xs = views[..., 0] * 383, views[..., 1] * 383
        # Output pixels sample the crop at its pixel centres, averaged over a few input pixels
        # (8 of them, 4 pixels in, for the smallest crops): they come within 16 pixels of all
        # four borders, while the centre square stops 57 (wide) and 64 (tall) pixels short of
        # the ends of the longer side.
        assert ys.min() < 16 and ys.max() > new[0] - 17, (ys.min(), ys.max())
        assert xs.min() < 16 and xs.max() > new[1] - 17, (xs.min(), xs.max())
