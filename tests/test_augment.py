"""Tests for dhel_jax.augment against independent references.

References: a NumPy transcription of torchvision's ``RandomResizedCrop.get_params`` (crop
boxes), PIL's float bilinear resize (crop-and-resize, evaluation resize), Python's ``colorsys``
(saturation and hue), ITU-R 601 luma weights (grayscale) and explicit convolutions (blur).
Statistical checks use fixed seeds, many draws and binomial / Kolmogorov-Smirnov bounds.
"""

from __future__ import annotations

import colorsys
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from dhel_jax import augment

IDENTITY_CROP = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
NOTHING = dict(**IDENTITY_CROP, flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


def _images(rng, shape, lo=0, hi=256):
    return jnp.asarray(rng.integers(lo, hi, shape), jnp.uint8)


def _luma(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (TensorFlow's rgb_to_grayscale), tiled to 3 channels."""
    y = x @ np.array([0.2989, 0.5870, 0.1140])
    return np.repeat(y[..., None], 3, axis=-1)


def _ref_crop_box(rng, height, width, scale, ratio):
    """torchvision.transforms.RandomResizedCrop.get_params, transcribed to NumPy."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _sample_boxes(n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """n crop boxes as the pipeline draws them (augment's private crop-box sampler)."""
    keys = jax.random.split(jax.random.key(0), n)

    def box(key):
        u = jax.random.uniform(key, (augment._CROP_UNIFORMS,))
        return augment._crop_box(u, height, width, scale, ratio)

    return np.asarray(jax.jit(jax.vmap(box))(keys))


def _pil_resize(image: np.ndarray, out_hw, box=None) -> np.ndarray:
    """PIL's antialiased bilinear resize of a float [H, W, C] image, channel by channel."""
    channels = []
    for c in range(image.shape[-1]):
        pil = Image.fromarray(image[..., c].astype(np.float32), mode="F")
        channels.append(np.asarray(pil.resize(out_hw[::-1], Image.BILINEAR, box=box)))
    return np.stack(channels, -1)


def _ref_jitter(x, brightness, contrast, saturation, hue_delta, order):
    """SimCLR's colour jitter in float64, HSV through colorsys, clipping after each operation."""
    x = np.asarray(x, np.float64)
    for op in order:
        if op == augment.BRIGHTNESS:
            x = x * brightness
        elif op == augment.CONTRAST:
            mean = x.mean(axis=(0, 1), keepdims=True)
            x = contrast * (x - mean) + mean
        elif x.shape[-1] == 3:
            out = np.empty_like(x)
            for i, j in np.ndindex(x.shape[:2]):
                h, s, v = colorsys.rgb_to_hsv(*x[i, j])
                if op == augment.SATURATION:
                    s = min(max(s * saturation, 0.0), 1.0)
                else:
                    h = (h + hue_delta) % 1.0
                out[i, j] = colorsys.hsv_to_rgb(h, s, v)
            x = out
        x = np.clip(x, 0.0, 1.0)
    return x


def _hsv(x: np.ndarray) -> np.ndarray:
    """[..., 3] RGB -> [..., 3] HSV with colorsys."""
    flat = x.reshape(-1, 3).astype(np.float64)
    return np.array([colorsys.rgb_to_hsv(*p) for p in flat]).reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# Shapes, dtypes, ranges, keys.


# Most tests share this batch shape and the default arguments, so that they share one
# compilation of the pipeline (compiling dominates these tests' time on a CPU).
SHAPE = (6, 16, 16, 3)


def test_two_views_shapes_dtypes_and_ranges(rng):
    rgb = _images(rng, SHAPE)
    gray = _images(rng, (6, 12, 12, 1))
    key = jax.random.key(0)
    for images, kwargs, shape in (
        (rgb, {}, SHAPE),
        (rgb, dict(out_size=(8, 12)), (6, 8, 12, 3)),
        (gray, {}, (6, 12, 12, 1)),
    ):
        v1, v2 = augment.two_views(images, key, **kwargs)
        for v in (v1, v2):
            chex.assert_shape(v, shape)
            chex.assert_type(v, jnp.float32)
            assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
        assert not np.allclose(v1, v2)


def test_normalisation_is_applied_last(rng):
    images = _images(rng, SHAPE)
    key = jax.random.key(3)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    plain = augment.two_views(images, key)
    normed = augment.two_views(images, key, mean=mean, std=std)
    for p, n in zip(plain, normed, strict=True):
        np.testing.assert_allclose(n, (np.asarray(p) - mean) / np.asarray(std), atol=1e-5)


def test_same_key_same_views_and_other_keys_differ(rng):
    images = _images(rng, SHAPE)
    a = augment.two_views(images, jax.random.key(1))
    b = augment.two_views(images, jax.random.key(1))
    c = augment.two_views(images, jax.random.key(2))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a[0], c[0]) and not np.allclose(a[1], c[1])
    # Legacy uint32 keys work too.
    legacy = augment.two_views(images, jax.random.PRNGKey(1))
    chex.assert_shape(legacy[0], SHAPE)


def test_examples_use_their_own_keys(rng):
    """A view depends only on its own image and key: changing image j changes row j only."""
    images = _images(rng, SHAPE)
    key = jax.random.key(4)
    other = images.at[2].set(255 - images[2])
    a, b = augment.augment(images, key), augment.augment(other, key)
    changed = np.abs(np.asarray(a) - np.asarray(b)).max(axis=(1, 2, 3)) > 0
    np.testing.assert_array_equal(changed, [False, False, True, False, False, False])
    # two_views is augment with the two halves of the key.
    k1, k2 = jax.random.split(key)
    for view, k in zip(augment.two_views(images, key), (k1, k2), strict=True):
        np.testing.assert_allclose(view, augment.augment(images, k), atol=1e-6)


def test_jit_and_vmap(rng):
    images = _images(rng, (2, *SHAPE))
    keys = jax.random.split(jax.random.key(5), 2)
    kwargs = dict(crop_scale=(0.08, 1.0))  # the defaults, passed explicitly
    jitted = jax.jit(lambda x, k: augment.two_views(x, k, **kwargs))
    for i in range(2):
        direct = augment.two_views(images[i], keys[i], **kwargs)
        for x, y in zip(direct, jitted(images[i], keys[i]), strict=True):
            np.testing.assert_allclose(x, y, atol=1e-6)
    mapped = jax.vmap(lambda x, k: augment.augment(x, k, **kwargs))(images, keys)
    for i in range(2):
        np.testing.assert_allclose(
            mapped[i], augment.augment(images[i], keys[i], **kwargs), atol=1e-6
        )


# ----------------------------------------------------------------------------------------------
# Random resized crop.


@pytest.mark.parametrize(("height", "width"), [(224, 224), (64, 160)])
def test_crop_boxes_follow_torchvision_distribution(height, width):
    n = 20000
    ours = _sample_boxes(n, height, width)
    np_rng = np.random.default_rng(0)
    ref = np.array(
        [_ref_crop_box(np_rng, height, width, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
    )
    for boxes in (ours, ref):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= height).all() and (left + w <= width).all()

    def features(boxes):
        top, left, h, w = boxes.T.astype(np.float64)
        return (
            h * w / (height * width),  # area fraction
            np.log(w / h),  # aspect ratio
            top / np.maximum(height - h, 1),  # vertical position
            left / np.maximum(width - w, 1),  # horizontal position
        )

    for a, b in zip(features(ours), features(ref), strict=True):
        assert stats.ks_2samp(a, b).pvalue > 1e-3


def test_crop_area_and_ratio_stay_in_the_configured_ranges():
    height, width, scale, ratio = 96, 128, (0.25, 0.5), (3 / 4, 4 / 3)
    top, left, h, w = _sample_boxes(5000, height, width, scale=scale, ratio=ratio).T
    area = height * width
    # Sides are rounded to integers: allow half a pixel on each.
    assert ((h - 0.5) * (w - 0.5) <= scale[1] * area).all()
    assert ((h + 0.5) * (w + 0.5) >= scale[0] * area).all()
    assert ((w - 0.5) / (h + 0.5) <= ratio[1]).all()
    assert ((w + 0.5) / (h - 0.5) >= ratio[0]).all()
    fraction = h * w / area
    assert fraction.min() < 0.26 and fraction.max() > 0.49  # the range is covered
    assert (top <= height - h).all() and (left <= width - w).all()


def test_crop_falls_back_to_a_centre_crop_when_nothing_fits():
    # A 10x200 strip: every candidate is too tall, so the box is the centre crop at ratio 4/3.
    boxes = _sample_boxes(100, 10, 200)
    np.testing.assert_array_equal(boxes, np.tile([0, 93, 10, 13], (100, 1)))


def test_crop_and_resize_matches_pil(rng):
    image = rng.random((40, 50, 3)).astype(np.float32)
    crop_and_resize = jax.jit(augment.crop_and_resize, static_argnames="out_size")
    for (top, left, h, w), out in (
        ((3, 5, 20, 30), (10, 15)),  # downscale
        ((0, 0, 40, 50), (17, 23)),  # whole image
        ((7, 2, 10, 12), (25, 31)),  # upscale
    ):
        ours = crop_and_resize(jnp.asarray(image), jnp.array([top, left, h, w]), out_size=out)
        ref = _pil_resize(image, out, box=(left, top, left + w, top + h))
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    # A crop of the output size is an exact copy.
    exact = crop_and_resize(jnp.asarray(image), jnp.array([5, 6, 30, 30]), out_size=(30, 30))
    np.testing.assert_allclose(exact, image[5:35, 6:36], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Images stored in the top-left of a larger canvas (ImageNet-100: ``sizes``).


def test_crop_and_resize_in_a_canvas_reads_only_the_image(rng):
    """The canvas's padding is never read: the result is PIL's resize of the box of the image
    alone, also for boxes touching the image's right and bottom edges."""
    image = rng.random((30, 44, 3)).astype(np.float32)
    canvas = np.full((48, 48, 3), 7.0, np.float32)  # padding far outside [0, 1]
    canvas[:30, :44] = image
    fn = jax.jit(augment.crop_and_resize_in, static_argnames="out_size")
    for (top, left, h, w), out in (
        ((0, 0, 30, 44), (16, 16)),  # the whole image, downscaled
        ((12, 20, 18, 24), (9, 11)),  # touching the bottom-right corner
        ((20, 30, 10, 14), (25, 31)),  # upscaled, touching it too
    ):
        ours = fn(
            jnp.asarray(canvas), jnp.array([30, 44]), jnp.array([top, left, h, w]), out_size=out
        )
        ref = _pil_resize(image, out, box=(left, top, left + w, top + h))
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def _ref_crop_box_from_uniforms(u, height, width, scale, ratio):
    """torchvision's get_params in float64 NumPy, driven by the given U[0, 1) numbers: the
    10 candidates from u[:10] (area) and u[10:20] (log aspect), the position from u[20:22]."""
    n = 10
    for i in range(n):
        area = height * width * (scale[0] + (scale[1] - scale[0]) * float(u[i]))
        lo, hi = math.log(ratio[0]), math.log(ratio[1])
        aspect = math.exp(lo + (hi - lo) * float(u[n + i]))
        w = int(np.round(math.sqrt(area * aspect)))
        h = int(np.round(math.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(math.floor(float(u[2 * n]) * (height - h + 1))), height - h)
            left = min(int(math.floor(float(u[2 * n + 1]) * (width - w + 1))), width - w)
            return top, left, h, w
    if width / height < ratio[0]:
        w, h = width, int(np.round(width / ratio[0]))
    elif width / height > ratio[1]:
        h, w = height, int(np.round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize(("height", "width"), [(64, 160), (40, 40), (10, 200), (200, 12)])
def test_crop_box_of_a_traced_size_follows_the_reference_draw_for_draw(height, width):
    """The box of an image whose size is traced (a canvas's image) against the float64
    reference from the same uniforms, fallbacks of too-wide and too-tall images included."""
    keys = jax.random.split(jax.random.key(3), 300)
    uniforms = jax.vmap(lambda k: jax.random.uniform(k, (augment._CROP_UNIFORMS,)))(keys)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    size = jnp.int32(height), jnp.int32(width)
    ours = jax.vmap(lambda u: augment._crop_box_in(u, *size, scale, ratio))(uniforms)
    ref = [
        _ref_crop_box_from_uniforms(u, height, width, scale, ratio) for u in np.asarray(uniforms)
    ]
    np.testing.assert_array_equal(np.asarray(ours), np.array(ref))


def test_views_of_a_canvas_crop_the_whole_image_and_nothing_else():
    """A 24x60 image (coloured 0.1 .. 0.9 by column) in a 64x64 canvas of 255s: over many
    views every pixel comes from the image (never 1.0), and the crops reach both of its ends,
    which a centre-square crop of the image would never see."""
    height, width, canvas_side = 24, 60, 64
    column = np.round(np.linspace(0.1, 0.9, width) * 255).astype(np.uint8)
    canvas = np.full((canvas_side, canvas_side, 1), 255, np.uint8)
    canvas[:height, :width, 0] = column[None, :]
    n = 256
    images = jnp.asarray(np.broadcast_to(canvas, (n, *canvas.shape)))
    sizes = jnp.asarray(np.tile([height, width], (n, 1)), jnp.int32)
    views = np.asarray(
        augment.augment(
            images,
            jax.random.key(0),
            sizes=sizes,
            out_size=8,
            **{k: v for k, v in NOTHING.items() if k not in IDENTITY_CROP},
        )
    )
    assert views.max() <= 0.9 + 1e-6 and views.min() >= 0.1 - 1e-6
    # The centre 24x24 square spans columns 18..41, i.e. values in [0.35, 0.65].
    assert views.min() < 0.15 and views.max() > 0.85
    # Same keys, same image without a canvas: the same views.
    alone = augment.augment(
        jnp.asarray(np.broadcast_to(canvas[:height, :width], (n, height, width, 1))),
        jax.random.key(0),
        out_size=8,
        **{k: v for k, v in NOTHING.items() if k not in IDENTITY_CROP},
    )
    np.testing.assert_allclose(views, alone, atol=1e-5)


def test_eval_transform_with_sizes_is_resize_256_then_centre_224(rng):
    """A 300x500 photo resized (PIL, shorter side 256: 256x426) into a 448x448 canvas; the view
    equals the centre 224x224 of the resized image, as torchvision's Resize(256) +
    CenterCrop(224) (top (256 - 224) // 2 = 16, left (426 - 224) // 2 = 101)."""
    photo = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(photo).resize((426, 256), Image.BILINEAR))
    canvas = np.zeros((1, 448, 448, 3), np.uint8)
    canvas[0, :256, :426] = resized
    out = augment.eval_transform(
        jnp.asarray(canvas), sizes=jnp.array([[256, 426]]), crop_fraction=0.875, out_size=224
    )
    ref = resized[16:240, 101:325].astype(np.float64) / 255.0
    np.testing.assert_allclose(out[0], ref, atol=1e-5)
    # The same in portrait, with normalisation and a smaller view (the square resized).
    tall = np.transpose(canvas, (0, 2, 1, 3))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    out = augment.eval_transform(
        jnp.asarray(tall),
        sizes=jnp.array([[426, 256]]),
        crop_fraction=0.875,
        out_size=112,
        mean=mean,
        std=std,
    )
    # PIL's resize of a box reads the pixels around it too, as the crop does.
    portrait = np.transpose(resized, (1, 0, 2)).astype(np.float32) / 255.0
    view = _pil_resize(portrait, (112, 112), box=(16, 101, 240, 325))
    ref = (view - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(out[0], ref, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Flip, grayscale, jitter rates.


def test_flip_and_grayscale_rates(rng):
    n = 4000
    image = rng.random((6, 6, 3))
    images = jnp.asarray(np.repeat(image[None], n, 0), jnp.float32)
    views = np.asarray(
        augment.augment(
            images,
            jax.random.key(6),
            **{**NOTHING, "flip_prob": 0.5, "grayscale_prob": 0.2},
        )
    )
    candidates = np.stack([image, image[:, ::-1], _luma(image), _luma(image)[:, ::-1]])
    distance = np.abs(views[:, None] - candidates[None]).max(axis=(2, 3, 4))
    kind = distance.argmin(axis=1)
    assert distance.min(axis=1).max() < 1e-5  # every view is one of the four
    flipped, gray = np.isin(kind, (1, 3)), np.isin(kind, (2, 3))
    assert abs(flipped.mean() - 0.5) < 4 * math.sqrt(0.25 / n)
    assert abs(gray.mean() - 0.2) < 4 * math.sqrt(0.16 / n)
    assert abs((flipped & gray).mean() - 0.1) < 4 * math.sqrt(0.09 / n)


def test_jitter_is_applied_with_its_probability(rng):
    n = 4000
    image = 0.2 + 0.6 * rng.random((4, 4, 3))
    images = jnp.asarray(np.repeat(image[None], n, 0), jnp.float32)
    views = np.asarray(
        augment.augment(
            images, jax.random.key(7), **{**NOTHING, "jitter_prob": 0.8, "jitter_strength": 0.5}
        )
    )
    changed = np.abs(views - image).max(axis=(1, 2, 3)) > 1e-4
    assert abs(changed.mean() - 0.8) < 4 * math.sqrt(0.16 / n)


def _jitter(image, brightness=1.0, contrast=1.0, saturation=1.0, hue_delta=0.0, order=(0, 1, 2, 3)):
    """The pipeline's colour jitter with given factors (augment's private jitter step)."""
    image = jnp.asarray(image, jnp.float32)
    factors = tuple(jnp.float32(f) for f in (brightness, contrast, saturation, hue_delta))
    order = jnp.asarray(order, jnp.int32)
    return augment._jitter_in_order(image, factors, order, use_hsv=image.shape[-1] == 3)


def test_jitter_matches_reference_in_every_order(rng):
    image = 0.05 + 0.9 * rng.random((5, 5, 3))
    factors = dict(brightness=1.3, contrast=0.6, saturation=1.7, hue_delta=0.15)
    orders = np.array(list(itertools.permutations(range(4))), np.int32)
    ours = jax.vmap(lambda order: _jitter(image, **factors, order=order))(orders)
    refs = [_ref_jitter(image, **factors, order=order) for order in orders]
    for got, want in zip(ours, refs, strict=True):
        np.testing.assert_allclose(got, want, atol=3e-5)
    assert not np.allclose(refs[0], refs[-1], atol=1e-3)  # the order matters
    gray = image[..., :1]
    got = _jitter(gray, brightness=1.3, contrast=0.6, order=(1, 0, 2, 3))
    np.testing.assert_allclose(got, _ref_jitter(gray, 1.3, 0.6, 1.0, 0.0, (1, 0)), atol=1e-6)


def _jitter_draws(image, n, **strengths):
    keys = jax.random.split(jax.random.key(8), n)
    kwargs = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    kwargs.update(strengths)
    use_hsv = kwargs["saturation"] > 0 or kwargs["hue"] > 0

    def draw(key):
        u = jax.random.uniform(key, (augment._JITTER_UNIFORMS,))
        factors, order = augment._jitter_params(u, **kwargs)
        return augment._jitter_in_order(jnp.asarray(image), factors, order, use_hsv)

    return np.asarray(jax.jit(jax.vmap(draw))(keys), np.float64)


def _assert_uniform(samples, lo, hi):
    assert samples.min() >= lo - 1e-4 and samples.max() <= hi + 1e-4
    assert stats.kstest(samples, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3


def test_jitter_magnitudes_stay_within_bounds(rng):
    n = 1500
    image = 0.3 + 0.3 * rng.random((3, 3, 3)).astype(np.float32)  # no clipping at factors <= 1.4

    out = _jitter_draws(image, n, brightness=0.4)
    factor = out / image
    np.testing.assert_allclose(factor, factor[:, :1, :1, :1] * np.ones_like(factor), atol=1e-5)
    _assert_uniform(factor[:, 0, 0, 0], 0.6, 1.4)

    out = _jitter_draws(image, n, contrast=0.4)
    mean = image.mean(axis=(0, 1))
    factor = (out - mean) / (image - mean)
    np.testing.assert_allclose(factor, factor[:, :1, :1, :1] * np.ones_like(factor), atol=1e-3)
    _assert_uniform(factor[:, 0, 0, 0], 0.6, 1.4)

    hsv_in = _hsv(image)
    out = _jitter_draws(image, n, saturation=0.4)
    hsv_out = _hsv(out)
    factor = hsv_out[..., 1] / hsv_in[..., 1]
    np.testing.assert_allclose(factor, factor[:, :1, :1] * np.ones_like(factor), atol=1e-4)
    np.testing.assert_allclose(
        hsv_out[..., 2], np.broadcast_to(hsv_in[..., 2], (n, 3, 3)), atol=1e-6
    )
    _assert_uniform(factor[:, 0, 0], 0.6, 1.4)

    out = _jitter_draws(image, n, hue=0.1)
    hsv_out = _hsv(out)
    shift = (hsv_out[..., 0] - hsv_in[..., 0] + 0.5) % 1.0 - 0.5
    np.testing.assert_allclose(shift, shift[:, :1, :1] * np.ones_like(shift), atol=1e-4)
    np.testing.assert_allclose(
        hsv_out[..., 1:], np.broadcast_to(hsv_in[..., 1:], (n, 3, 3, 2)), atol=1e-4
    )
    _assert_uniform(shift[:, 0, 0], -0.1, 0.1)


def test_grayscale_inputs_keep_one_channel_and_skip_colour_steps(rng):
    images = _images(rng, (5, 12, 12, 1))
    # Grayscale conversion is a no-op for one channel.
    out = augment.augment(images, jax.random.key(9), **{**NOTHING, "grayscale_prob": 1.0})
    np.testing.assert_allclose(out, np.asarray(images, np.float32) / 255.0, atol=1e-6)
    # Jitter: brightness and contrast only, so every view is an affine map x -> a x + b of its
    # image (saturation and hue would not be); factors <= 1.4 leave these values unclipped.
    image = 0.45 + 0.1 * rng.random((12, 12, 1))
    batch = jnp.asarray(np.repeat(image[None], 8, 0), jnp.float32)
    settings = {**NOTHING, "jitter_prob": 1.0, "jitter_strength": 0.5}
    views = np.asarray(augment.augment(batch, jax.random.key(10), **settings), np.float64)
    chex.assert_shape(views, (8, 12, 12, 1))
    design = np.stack([image.ravel(), np.ones(image.size)], axis=1)
    for view in views:
        coef, *_ = np.linalg.lstsq(design, view.ravel(), rcond=None)
        np.testing.assert_allclose(design @ coef, view.ravel(), atol=1e-5)
    assert not np.allclose(views, image[None], atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Blur, solarisation.


def test_blur_matches_an_explicit_gaussian_convolution(rng):
    image = rng.random((40, 40, 3))
    out = augment.augment(
        jnp.asarray(image[None], jnp.float32),
        jax.random.key(11),
        **{**NOTHING, "blur_prob": 1.0, "blur_sigma": (1.5, 1.5)},
    )[0]
    radius = 2  # kernel side: 10% of 40 pixels, made odd
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * 1.5**2))
    taps /= taps.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)))
    rows = sum(taps[k] * padded[:, k : k + 40] for k in range(2 * radius + 1))
    ref = sum(taps[k] * rows[k : k + 40] for k in range(2 * radius + 1))
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_solarisation(rng):
    image = rng.random((1, 8, 8, 3))
    out = augment.augment(
        jnp.asarray(image, jnp.float32), jax.random.key(12), **{**NOTHING, "solarize_prob": 1.0}
    )
    np.testing.assert_allclose(out, np.where(image < 0.5, image, 1.0 - image), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Evaluation transform.


def test_eval_transform_only_normalises_by_default(rng):
    images = _images(rng, (3, 20, 20, 3))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    out = augment.eval_transform(images, mean=mean, std=std)
    ref = (np.asarray(images, np.float64) / 255.0 - mean) / np.asarray(std)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(
        augment.eval_transform(images), np.asarray(images) / 255.0, atol=1e-7
    )


def test_eval_transform_centre_crop_and_resize(rng):
    images = _images(rng, (2, 32, 32, 3))
    cropped = augment.eval_transform(images, crop_fraction=0.875)  # 28x28 centre
    np.testing.assert_allclose(cropped, np.asarray(images[:, 2:30, 2:30]) / 255.0, atol=1e-7)
    resized = augment.eval_transform(images, crop_fraction=0.5, out_size=24)
    x = np.asarray(images, np.float32) / 255.0
    for i in range(2):
        np.testing.assert_allclose(resized[i], _pil_resize(x[i, 8:24, 8:24], (24, 24)), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    ("images", "kwargs", "error", "match"),
    [
        (np.zeros((4, 8, 8), np.uint8), {}, ValueError, r"\[B, H, W, C\]"),
        (np.zeros((4, 8, 8, 2), np.uint8), {}, ValueError, "C = 1"),
        (np.zeros((4, 8, 8, 3), np.int32), {}, TypeError, "uint8"),
        (np.zeros((4, 8, 8, 3), np.uint8), {"crop_scale": (0.5, 0.2)}, ValueError, "crop_scale"),
        (np.zeros((4, 8, 8, 3), np.uint8), {"crop_ratio": (0.0, 1.0)}, ValueError, "crop_ratio"),
        (np.zeros((4, 8, 8, 3), np.uint8), {"flip_prob": 1.5}, ValueError, "flip_prob"),
        (np.zeros((4, 8, 8, 3), np.uint8), {"jitter_strength": -1.0}, ValueError, "jitter"),
        (np.zeros((4, 8, 8, 3), np.uint8), {"out_size": 0}, ValueError, "out_size"),
        (np.zeros((4, 8, 8, 3), np.uint8), {"mean": (0.5, 0.5)}, ValueError, "mean"),
        (np.zeros((4, 8, 8, 3), np.uint8), {"std": (0.0,)}, ValueError, "std"),
        (np.zeros((4, 8, 8, 3), np.uint8), {"jiter_prob": 0.5}, TypeError, "unknown.*jiter"),
    ],
)
def test_bad_arguments_raise_clear_errors(images, kwargs, error, match):
    with pytest.raises(error, match=match):
        augment.two_views(images, jax.random.key(0), **kwargs)


def test_eval_transform_rejects_a_bad_crop_fraction():
    with pytest.raises(ValueError, match="crop_fraction"):
        augment.eval_transform(np.zeros((1, 8, 8, 3), np.uint8), crop_fraction=1.5)
