"""SimCLR augmentations on the accelerator: pure, jittable, one PRNG key per example.

The host pipeline (:mod:`dhel_jax.data`) only decodes; these functions run inside the jitted
training step on uint8 batches ``[B, H, W, C]`` (``C`` = 1 or 3), each example drawing its own
random parameters from its own key (``jax.vmap`` over ``jax.random.split(key, B)``).

One view is, in SimCLR's order (Chen et al., 2020, appendix A):

1. random resized crop: area fraction ``~ U(crop_scale)`` of the image, log aspect ratio
   ``~ U(log crop_ratio)``, first of 10 draws that fits (else a centre crop), as torchvision's
   ``RandomResizedCrop``; bilinear, antialiased resize to ``out_size``;
2. horizontal flip with probability ``flip_prob``;
3. colour jitter with probability ``jitter_prob``: brightness, contrast and saturation factors
   ``~ U(max(0, 1 - 0.8 s), 1 + 0.8 s)`` and a hue shift ``~ U(-0.2 s, 0.2 s)`` (of the hue
   circle) for strength ``s = jitter_strength``, applied in a random order, clipping to [0, 1]
   after each (SimCLR v2's ``color_jitter_rand``: multiplicative brightness, contrast about the
   per-channel mean, saturation and hue in HSV);
4. grayscale with probability ``grayscale_prob`` (ITU-R 601 luma, kept as 3 channels);
5. Gaussian blur with probability ``blur_prob`` (ImageNet-scale configs): sigma
   ``~ U(blur_sigma)`` pixels, kernel side 10% of the view side;
6. solarisation with probability ``solarize_prob`` (threshold 0.5);
7. normalisation ``(x - mean) / std``, or none when ``mean``/``std`` are ``None``.

Grayscale inputs (``C = 1``, Fashion-MNIST) have no saturation or hue, so their jitter is
brightness and contrast in random order, and the grayscale step is a no-op.

Images of varied sizes (ImageNet-100) come in fixed-shape canvases, each image in the top-left
corner with its ``(height, width)`` in ``sizes`` (int ``[B, 2]``, ``dhel_jax.data``): the crop
is then drawn in, and reads only, the image (:func:`crop_and_resize_in`), as SimCLR's crop of
the full image, and :func:`eval_transform` takes the centre square of its shorter side.

Every keyword argument is plain Python data (floats, ints, tuples), so a config can pass a dict
of them through. Arithmetic is float32; outputs are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any

import dm_pix
import jax
import jax.numpy as jnp

_SIMCLR_CROP_ATTEMPTS = 10
_SOLARIZE_THRESHOLD = 0.5
_BLUR_KERNEL_FRACTION = 0.1


# ----------------------------------------------------------------------------------------------
# Argument checks (trace time, static values only).


def _pair(value: Any, name: str, fn: str, *, lo: float, hi: float | None = None) -> tuple:
    try:
        pair = tuple(float(v) for v in value)
    except TypeError:
        pair = ()
    ok = len(pair) == 2 and lo < pair[0] <= pair[1] and (hi is None or pair[1] <= hi)
    if not ok:
        upper = f" <= {hi:g}" if hi is not None else ""
        raise ValueError(
            f"{fn}: {name} must be a pair (low, high) with {lo:g} < low <= high{upper}; "
            f"got {name} = {value!r}."
        )
    return pair


def _prob(value: Any, name: str, fn: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{fn}: {name} must be a probability in [0, 1]; got {name} = {value!r}.")
    return float(value)


def _size(value: Any, height: int, width: int, name: str, fn: str) -> tuple[int, int]:
    if value is None:
        return height, width
    size = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        size = tuple(size)
    except TypeError:
        size = ()
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in size):
        size = ()
    if not size or min(size) < 1:
        raise ValueError(
            f"{fn}: {name} must be None, a positive int or a pair of positive ints (height, "
            f"width); got {name} = {value!r}."
        )
    return size


def _moments(value: Any, name: str, channels: int, fn: str, *, positive: bool) -> tuple | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, (int, float)) else value
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        values = ()
    if len(values) not in (1, channels) or (positive and min(values) <= 0):
        need = "positive " if positive else ""
        raise ValueError(
            f"{fn}: {name} must be None or {need}floats, one or one per channel ({channels}); "
            f"got {name} = {value!r}."
        )
    return values


def _check_images(images: Any, fn: str) -> None:
    shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{fn}: images must be an array [B, H, W, C]; got {type(images)!r}.")
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise ValueError(
            f"{fn}: images must have shape [B, H, W, C] with C = 1 (grayscale) or 3 (RGB); "
            f"got shape {tuple(shape)}."
        )
    if dtype != jnp.uint8 and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{fn}: images must be uint8 (0..255) or floating (in [0, 1]); got dtype {dtype}."
        )


def _to_unit_float(images: jax.Array) -> jax.Array:
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def _normalize(x: jax.Array, mean: tuple | None, std: tuple | None) -> jax.Array:
    if mean is not None:
        x = x - jnp.asarray(mean, jnp.float32)
    if std is not None:
        x = x / jnp.asarray(std, jnp.float32)
    return x


# ----------------------------------------------------------------------------------------------
# The per-image operations.


_CROP_UNIFORMS = 2 * _SIMCLR_CROP_ATTEMPTS + 2


def _uniform_int(u: jax.Array, high: jax.Array) -> jax.Array:
    """An integer uniform on ``{0, ..., high - 1}`` from ``u ~ U[0, 1)``."""
    return jnp.minimum(jnp.floor(u * high).astype(jnp.int32), high - 1)


def _crop_box(
    u: jax.Array, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> jax.Array:
    """A random-resized-crop box for an image of ``height x width`` pixels, drawn from
    ``_CROP_UNIFORMS`` independent U[0, 1) numbers ``u``.

    torchvision's ``RandomResizedCrop.get_params``: up to 10 candidates with area
    ``A ~ U(scale) * H * W`` and aspect ratio ``r = w / h`` with ``log r ~ U(log ratio)``,
    ``w = round(sqrt(A r))``, ``h = round(sqrt(A / r))``; the first that fits is placed
    uniformly at random, else the centre crop with the ratio clamped to ``ratio``.

    Returns:
      int32 ``[4]``: ``(top, left, crop_height, crop_width)``.
    """
    return _crop_box_in(u, jnp.int32(height), jnp.int32(width), scale, ratio)


def crop_and_resize(image: jax.Array, box: jax.Array, *, out_size: tuple[int, int]) -> jax.Array:
    """Resizes the ``box = (top, left, h, w)`` region of a float ``[H, W, C]`` image.

    Bilinear with antialiasing (``jax.image.scale_and_translate``, pixel centres at half
    integers): output pixel ``(y, x)`` samples the input at ``top + (y + 0.5) h / S_h - 0.5``.

    Returns:
      float ``[S_h, S_w, C]`` for ``out_size = (S_h, S_w)``.
    """
    out_h, out_w = out_size
    box = jnp.asarray(box, jnp.float32)
    top, left, crop_h, crop_w = box[0], box[1], box[2], box[3]
    scale = jnp.stack([out_h / crop_h, out_w / crop_w])
    translation = -jnp.stack([top, left]) * scale
    return jax.image.scale_and_translate(
        image,
        (out_h, out_w, image.shape[-1]),
        (0, 1),
        scale,
        translation,
        method="linear",
        antialias=True,
    )


def _crop_box_in(
    u: jax.Array,
    height: jax.Array,
    width: jax.Array,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> jax.Array:
    """:func:`_crop_box` for an image of traced size ``height x width`` (int32 scalars), the
    fallback's clamped ratio computed on device; the static-size box is this one."""
    n = _SIMCLR_CROP_ATTEMPTS
    hf, wf = height.astype(jnp.float32), width.astype(jnp.float32)
    area = hf * wf * (scale[0] + (scale[1] - scale[0]) * u[:n])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[n : 2 * n])
    w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits)
    in_ratio = wf / hf
    fallback_w = jnp.where(in_ratio > ratio[1], jnp.round(hf * ratio[1]).astype(jnp.int32), width)
    fallback_h = jnp.where(in_ratio < ratio[0], jnp.round(wf / ratio[0]).astype(jnp.int32), height)
    found = fits[first]
    crop_h = jnp.where(found, h[first], fallback_h)
    crop_w = jnp.where(found, w[first], fallback_w)
    top = jnp.where(found, _uniform_int(u[2 * n], height - crop_h + 1), (height - fallback_h) // 2)
    left = jnp.where(
        found, _uniform_int(u[2 * n + 1], width - crop_w + 1), (width - fallback_w) // 2
    )
    return jnp.stack([top, left, crop_h, crop_w]).astype(jnp.int32)


def _resize_weights(
    valid: jax.Array, in_size: int, out_size: int, scale: jax.Array, translation: jax.Array
) -> jax.Array:
    """``[in_size, out_size]`` weights of antialiased linear resampling of the first ``valid``
    input pixels: ``jax.image.scale_and_translate``'s, as if the input had ``valid`` pixels."""
    inv_scale = 1.0 / scale
    kernel_scale = jnp.maximum(inv_scale, 1.0)
    sample = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * inv_scale
    sample = sample - translation * inv_scale - 0.5
    index = jnp.arange(in_size, dtype=jnp.float32)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(sample[None, :] - index[:, None]) / kernel_scale)
    weights = jnp.where(index[:, None] < valid, weights, 0.0)
    total = jnp.sum(weights, axis=0, keepdims=True)
    weights = jnp.where(
        jnp.abs(total) > 1000.0 * float(jnp.finfo(jnp.float32).eps),
        weights / jnp.where(total != 0, total, 1.0),
        0.0,
    )
    inside = (sample >= -0.5) & (sample <= valid.astype(jnp.float32) - 0.5)
    return jnp.where(inside[None, :], weights, 0.0)


def crop_and_resize_in(
    image: jax.Array, size: jax.Array, box: jax.Array, *, out_size: tuple[int, int]
) -> jax.Array:
    """:func:`crop_and_resize` of an image stored in the top-left ``size = (h, w)`` pixels of
    a larger float ``[H, W, C]`` canvas: pixels outside it are never read, so the result is
    that of :func:`crop_and_resize` on ``image[:h, :w]``.

    Returns:
      float ``[S_h, S_w, C]`` for ``out_size = (S_h, S_w)``.
    """
    out_h, out_w = out_size
    box = jnp.asarray(box, jnp.float32)
    top, left, crop_h, crop_w = box[0], box[1], box[2], box[3]
    scale_h, scale_w = out_h / crop_h, out_w / crop_w
    rows = _resize_weights(size[0], image.shape[0], out_h, scale_h, -top * scale_h)
    cols = _resize_weights(size[1], image.shape[1], out_w, scale_w, -left * scale_w)
    # HIGH: three bfloat16 passes on a TPU (XLA:CPU computes float32 whatever the precision).
    # 8-bit pixels are exact in bfloat16 and the weights keep 16 bits, an error below 0.01 of
    # a grey level; HIGHEST's six passes cost the ImageNet-100 step 0.5M more TPU cycles
    # (docs/accelerators.md, "What holds the MFU down").
    x = jnp.einsum("hwc,ho->owc", image, rows, precision=jax.lax.Precision.HIGH)
    return jnp.einsum("owc,wp->opc", x, cols, precision=jax.lax.Precision.HIGH)


BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
"""Operation ids of the colour jitter (the ``order`` of :func:`_jitter_in_order`)."""


def _clip(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 1.0)


def _hsv_adjust(x: jax.Array, saturation_factor: jax.Array, hue_delta: jax.Array) -> jax.Array:
    """HSV ``S <- clip(S f)``, ``H <- (H + delta) mod 1``: ``dm_pix.adjust_saturation`` and
    ``dm_pix.adjust_hue`` in one round trip (each is the identity at f = 1, delta = 0)."""
    hue, saturation, value = jnp.moveaxis(dm_pix.rgb_to_hsv(x), -1, 0)
    hsv = jnp.stack(
        [(hue + hue_delta) % 1.0, jnp.clip(saturation * saturation_factor, 0.0, 1.0), value], -1
    )
    return dm_pix.hsv_to_rgb(hsv)


def _jitter_in_order(
    x: jax.Array,
    factors: Sequence[jax.Array],
    order: jax.Array,
    use_hsv: bool,
) -> jax.Array:
    """Colour jitter of one float ``[H, W, C]`` image in [0, 1] with the given ``factors``
    ``(f_b, f_c, f_s, delta)``.

    Runs, in ``order`` (a permutation of ``BRIGHTNESS, CONTRAST, SATURATION, HUE``), with
    ``clip(., 0, 1)`` after each: brightness ``x f_b``; contrast ``f_c (x - mean_c) + mean_c``
    (per-channel spatial mean, as ``tf.image.adjust_contrast``); saturation ``S <- clip(S f_s)``
    and hue ``H <- (H + delta) mod 1`` in HSV, only when ``use_hsv`` (``C = 3``).

    Only saturation and hue need an HSV round trip, so rather than evaluating every operation
    at every position (what a vmapped ``lax.switch`` does), the two HSV steps are fixed slots
    and brightness and contrast are placed, in their relative order, in the three gaps around
    them: two HSV round trips per image instead of eight.
    """
    brightness, contrast, saturation, hue_delta = factors
    position = jnp.argsort(order)  # position[op]: when op runs.
    p_b, p_c, p_s, p_h = (
        position[BRIGHTNESS],
        position[CONTRAST],
        position[SATURATION],
        position[HUE],
    )
    if use_hsv:
        gap_b = (p_s < p_b).astype(jnp.int32) + (p_h < p_b)
        gap_c = (p_s < p_c).astype(jnp.int32) + (p_h < p_c)
    else:
        gap_b = gap_c = jnp.zeros((), jnp.int32)

    def cheap_ops(x: jax.Array, gap: int) -> jax.Array:
        in_b, in_c = gap_b == gap, gap_c == gap
        b_first = in_b & (~in_c | (p_b < p_c))
        x = jnp.where(b_first, _clip(x * brightness), x)
        x = jnp.where(in_c, _clip(dm_pix.adjust_contrast(x, contrast)), x)
        return jnp.where(in_b & ~b_first, _clip(x * brightness), x)

    x = cheap_ops(x, 0)
    if use_hsv:
        saturation_first = p_s < p_h
        one, zero = jnp.ones_like(saturation), jnp.zeros_like(hue_delta)
        x = _clip(
            _hsv_adjust(
                x,
                jnp.where(saturation_first, saturation, one),
                jnp.where(saturation_first, zero, hue_delta),
            )
        )
        x = cheap_ops(x, 1)
        x = _clip(
            _hsv_adjust(
                x,
                jnp.where(saturation_first, one, saturation),
                jnp.where(saturation_first, hue_delta, zero),
            )
        )
        x = cheap_ops(x, 2)
    return x


_JITTER_UNIFORMS = 8


def _jitter_params(
    u: jax.Array, brightness: float, contrast: float, saturation: float, hue: float
) -> tuple[Sequence[jax.Array], jax.Array]:
    """SimCLR's random jitter parameters from ``_JITTER_UNIFORMS`` U[0, 1) numbers ``u``:
    ``f_b, f_c, f_s ~ U(max(0, 1 - a), 1 + a)`` for ``a`` = brightness, contrast, saturation,
    ``delta ~ U(-hue, hue)``, and a uniformly random order (a strength of 0 gives the identity
    factor)."""

    def factor(v: jax.Array, strength: float) -> jax.Array:
        lo = max(0.0, 1.0 - strength)
        return lo + (1.0 + strength - lo) * v

    factors = (
        factor(u[0], brightness),
        factor(u[1], contrast),
        factor(u[2], saturation),
        hue * (2.0 * u[3] - 1.0),
    )
    # The ranks of i.i.d. uniforms form a uniformly random permutation.
    return factors, jnp.argsort(u[4:8]).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Batched views.


@dataclasses.dataclass(frozen=True)
class _ViewConfig:
    out_size: tuple[int, int]
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip_prob: float
    jitter_strength: float
    jitter_prob: float
    grayscale_prob: float
    blur_prob: float
    blur_sigma: tuple[float, float]
    solarize_prob: float
    mean: tuple | None
    std: tuple | None


def _view_config(images: Any, fn: str, settings: dict[str, Any]) -> _ViewConfig:
    """Checks ``settings`` (keyword arguments of :func:`augment`, the one list of them and of
    their defaults) against ``images``."""
    unknown = sorted(set(settings) - set(_VIEW_DEFAULTS))
    if unknown:
        raise TypeError(
            f"{fn}: unknown keyword argument(s) {', '.join(unknown)}; accepted are those of "
            f"augment: {', '.join(_VIEW_DEFAULTS)}."
        )
    s = {**_VIEW_DEFAULTS, **settings}
    jitter_strength = s["jitter_strength"]
    _check_images(images, fn)
    _, height, width, channels = images.shape
    if (
        isinstance(jitter_strength, bool)
        or not isinstance(jitter_strength, (int, float))
        or not 0 <= jitter_strength <= 2.5
    ):
        raise ValueError(
            f"{fn}: jitter_strength must be a float in [0, 2.5] (hue shift 0.2 s <= 0.5); got "
            f"jitter_strength = {jitter_strength!r}."
        )
    return _ViewConfig(
        out_size=_size(s["out_size"], height, width, "out_size", fn),
        crop_scale=_pair(s["crop_scale"], "crop_scale", fn, lo=0.0, hi=1.0),
        crop_ratio=_pair(s["crop_ratio"], "crop_ratio", fn, lo=0.0),
        flip_prob=_prob(s["flip_prob"], "flip_prob", fn),
        jitter_strength=float(jitter_strength),
        jitter_prob=_prob(s["jitter_prob"], "jitter_prob", fn),
        grayscale_prob=_prob(s["grayscale_prob"], "grayscale_prob", fn),
        blur_prob=_prob(s["blur_prob"], "blur_prob", fn),
        blur_sigma=_pair(s["blur_sigma"], "blur_sigma", fn, lo=0.0),
        solarize_prob=_prob(s["solarize_prob"], "solarize_prob", fn),
        mean=_moments(s["mean"], "mean", channels, fn, positive=False),
        std=_moments(s["std"], "std", channels, fn, positive=True),
    )


# Slices of the per-example uniforms: one threefry draw per example feeds every random choice.
_U_CROP = slice(0, _CROP_UNIFORMS)
_U_JITTER = slice(_U_CROP.stop, _U_CROP.stop + _JITTER_UNIFORMS)
_U_FLIP, _U_JITTER_APPLY, _U_GRAY, _U_BLUR_SIGMA, _U_BLUR_APPLY, _U_SOLARIZE = range(
    _U_JITTER.stop, _U_JITTER.stop + 6
)
_VIEW_UNIFORMS = _U_SOLARIZE + 1


def _one_view(
    image: jax.Array, size: jax.Array | None, key: jax.Array, cfg: _ViewConfig
) -> jax.Array:
    """One augmented view of one float ``[H, W, C]`` image in [0, 1] (SimCLR's order); with
    ``size = (h, w)``, of the image in the top-left ``h x w`` pixels."""
    height, width, channels = image.shape
    u = jax.random.uniform(key, (_VIEW_UNIFORMS,))
    if size is None:
        box = _crop_box(u[_U_CROP], height, width, cfg.crop_scale, cfg.crop_ratio)
        x = crop_and_resize(image, box, out_size=cfg.out_size)
    else:
        box = _crop_box_in(u[_U_CROP], size[0], size[1], cfg.crop_scale, cfg.crop_ratio)
        x = crop_and_resize_in(image, size, box, out_size=cfg.out_size)
    x = jnp.clip(x, 0.0, 1.0)
    if cfg.flip_prob > 0:
        x = jnp.where(u[_U_FLIP] < cfg.flip_prob, x[:, ::-1], x)
    if cfg.jitter_prob > 0 and cfg.jitter_strength > 0:
        s = cfg.jitter_strength
        factors, order = _jitter_params(u[_U_JITTER], 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        jittered = _jitter_in_order(x, factors, order, use_hsv=channels == 3)
        x = jnp.where(u[_U_JITTER_APPLY] < cfg.jitter_prob, jittered, x)
    if cfg.grayscale_prob > 0 and channels == 3:
        gray = dm_pix.rgb_to_grayscale(x, keep_dims=True)
        x = jnp.where(u[_U_GRAY] < cfg.grayscale_prob, gray, x)
    if cfg.blur_prob > 0:
        lo, hi = cfg.blur_sigma
        sigma = lo + (hi - lo) * u[_U_BLUR_SIGMA]
        kernel = max(3, int(_BLUR_KERNEL_FRACTION * min(cfg.out_size)))
        blurred = dm_pix.gaussian_blur(x, sigma, kernel, padding="SAME")
        x = jnp.where(u[_U_BLUR_APPLY] < cfg.blur_prob, blurred, x)
    if cfg.solarize_prob > 0:
        solarized = dm_pix.solarize(x, _SOLARIZE_THRESHOLD)
        x = jnp.where(u[_U_SOLARIZE] < cfg.solarize_prob, solarized, x)
    return _normalize(x, cfg.mean, cfg.std)


@functools.partial(jax.jit, static_argnames=("cfg", "num_views"))
def _views(
    images: jax.Array, sizes: jax.Array | None, key: jax.Array, cfg: _ViewConfig, num_views: int
) -> tuple:
    x = _to_unit_float(images)
    batch = images.shape[0]
    if sizes is None:
        one_batch = jax.vmap(lambda image, k: _one_view(image, None, k, cfg))
        view_keys = [key] if num_views == 1 else jax.random.split(key, num_views)
        return tuple(one_batch(x, jax.random.split(k, batch)) for k in view_keys)
    one_batch_in = jax.vmap(lambda image, size, k: _one_view(image, size, k, cfg))
    view_keys = [key] if num_views == 1 else jax.random.split(key, num_views)
    return tuple(one_batch_in(x, sizes, jax.random.split(k, batch)) for k in view_keys)


def _check_sizes(sizes: Any, images: Any, fn: str) -> Any:
    if sizes is None:
        return None
    shape, dtype = getattr(sizes, "shape", None), getattr(sizes, "dtype", None)
    if (
        shape is None
        or dtype is None
        or tuple(shape) != (images.shape[0], 2)
        or not jnp.issubdtype(dtype, jnp.integer)
    ):
        raise ValueError(
            f"{fn}: sizes must be None or integers of shape (B, 2) = ({images.shape[0]}, 2), "
            f"the (height, width) of each image in its canvas; got "
            f"{None if shape is None else tuple(shape)} {dtype}."
        )
    return jnp.asarray(sizes, jnp.int32)


def augment(
    images: jax.Array,
    key: jax.Array,
    *,
    sizes: jax.Array | None = None,
    out_size: int | Sequence[int] | None = None,
    crop_scale: Sequence[float] = (0.08, 1.0),
    crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
    flip_prob: float = 0.5,
    jitter_strength: float = 0.5,
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    blur_prob: float = 0.0,
    blur_sigma: Sequence[float] = (0.1, 2.0),
    solarize_prob: float = 0.0,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> jax.Array:
    """One SimCLR view of every image, each example with its own key (see the module docstring).

    Args:
      images: uint8 ``[B, H, W, C]`` (or floating in [0, 1]), ``C`` in {1, 3}.
      key: a PRNG key; example ``i`` uses ``jax.random.split(key, B)[i]``.
      sizes: int ``[B, 2]``: image ``i`` is the top-left ``sizes[i] = (h, w)`` pixels of its
        ``H x W`` canvas (ImageNet-100, ``dhel_jax.data``); the crop is drawn in, and reads
        only, those pixels. ``None``: every image fills its canvas.
      out_size: view side ``S`` (int) or ``(S_h, S_w)``; ``None`` keeps ``(H, W)``.
      crop_scale: range of the crop's area fraction.
      crop_ratio: range of the crop's aspect ratio ``w / h``.
      flip_prob: probability of a horizontal flip.
      jitter_strength: colour-jitter strength ``s`` (0 disables the jitter).
      jitter_prob: probability of applying the colour jitter.
      grayscale_prob: probability of converting an RGB view to grayscale.
      blur_prob: probability of a Gaussian blur.
      blur_sigma: range of the blur's standard deviation, in pixels.
      solarize_prob: probability of solarising.
      mean, std: per-channel normalisation in [0, 1] pixel units (``None``: none).

    Returns:
      float32 ``[B, S_h, S_w, C]``: in [0, 1] before normalisation.
    """
    settings = {name: value for name, value in locals().items() if name in _VIEW_DEFAULTS}
    cfg = _view_config(images, "augment", settings)
    return _views(images, _check_sizes(sizes, images, "augment"), key, cfg, 1)[0]


# The keyword arguments of augment and two_views, with their defaults: augment's signature
# (but ``sizes``, an array that comes with each batch).
_VIEW_DEFAULTS: dict[str, Any] = {
    name: p.default
    for name, p in inspect.signature(augment).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "sizes"
}


def two_views(
    images: jax.Array, key: jax.Array, *, sizes: jax.Array | None = None, **settings: Any
) -> tuple[jax.Array, jax.Array]:
    """Two independent SimCLR views: ``augment`` with each key of ``jax.random.split(key)``.

    ``settings`` are the keyword arguments of :func:`augment` (same names, defaults and
    checks). Returns two float32 ``[B, S_h, S_w, C]`` arrays; row ``i`` of the second is the
    positive of row ``i`` of the first.
    """
    cfg = _view_config(images, "two_views", settings)
    first, second = _views(images, _check_sizes(sizes, images, "two_views"), key, cfg, 2)
    return first, second


def eval_transform(
    images: jax.Array,
    *,
    sizes: jax.Array | None = None,
    out_size: int | Sequence[int] | None = None,
    crop_fraction: float = 1.0,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> jax.Array:
    """Deterministic evaluation view: centre crop, resize, normalise.

    The centre ``round(crop_fraction * H) x round(crop_fraction * W)`` region is resized
    (bilinear, antialiased) to ``out_size`` (``None``: the crop's size, i.e. no resize), then
    ``(x - mean) / std``. With ``crop_fraction=1`` and ``out_size=None`` it only normalises.

    With ``sizes`` (int ``[B, 2]``, as in :func:`augment`), image ``i`` is the top-left
    ``(h, w) = sizes[i]`` pixels of its canvas, and its view is the centred square of side
    ``s = round(crop_fraction * min(h, w))`` (top ``(h - s) // 2``, left ``(w - s) // 2``),
    resized to ``out_size`` (required). For images stored with their shorter side 256
    (ImageNet-100), ``crop_fraction = 0.875`` and ``out_size = 224`` this is the usual
    resize-256, centre-224 evaluation view.

    Returns:
      float32 ``[B, S_h, S_w, C]``.
    """
    fn = "eval_transform"
    _check_images(images, fn)
    _, height, width, channels = images.shape
    if not isinstance(crop_fraction, (int, float)) or not 0 < crop_fraction <= 1:
        raise ValueError(
            f"{fn}: crop_fraction must be in (0, 1]; got crop_fraction = {crop_fraction!r}."
        )
    sizes = _check_sizes(sizes, images, fn)
    if sizes is not None:
        if out_size is None:
            raise ValueError(f"{fn}: with sizes, out_size must be given (the views' side).")
        out = _size(out_size, height, width, "out_size", fn)
        x = _centre_views(_to_unit_float(images), sizes, float(crop_fraction), out)
        mean_ = _moments(mean, "mean", channels, fn, positive=False)
        std_ = _moments(std, "std", channels, fn, positive=True)
        return _normalize(x, mean_, std_)
    crop_h = max(1, round(crop_fraction * height))
    crop_w = max(1, round(crop_fraction * width))
    out_h, out_w = _size(out_size, crop_h, crop_w, "out_size", fn)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    x = _to_unit_float(images[:, top : top + crop_h, left : left + crop_w])
    if (out_h, out_w) != (crop_h, crop_w):
        x = jax.image.resize(x, (x.shape[0], out_h, out_w, channels), "linear", antialias=True)
    mean_ = _moments(mean, "mean", channels, fn, positive=False)
    std_ = _moments(std, "std", channels, fn, positive=True)
    return _normalize(x, mean_, std_)


def _centre_view(
    image: jax.Array, size: jax.Array, crop_fraction: float, out_size: tuple[int, int]
) -> jax.Array:
    side = jnp.maximum(1, jnp.round(crop_fraction * jnp.min(size).astype(jnp.float32)))
    side = side.astype(jnp.int32)
    box = jnp.stack([(size[0] - side) // 2, (size[1] - side) // 2, side, side])
    return crop_and_resize_in(image, size, box, out_size=out_size)


@functools.partial(jax.jit, static_argnames=("crop_fraction", "out_size"))
def _centre_views(
    images: jax.Array, sizes: jax.Array, crop_fraction: float, out_size: tuple[int, int]
) -> jax.Array:
    return jax.vmap(lambda im, sz: _centre_view(im, sz, crop_fraction, out_size))(images, sizes)
