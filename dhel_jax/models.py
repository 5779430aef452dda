"""ResNet encoders and the SimCLR projection head, as pure Flax Linen modules.

The ResNet follows flax ``examples/imagenet/models.py`` and torchvision (ResNet v1.5: the stride of
a bottleneck block sits on its 3x3 convolution), with three stems:

* ``stem="imagenet"``: 7x7 stride-2 convolution, BatchNorm, ReLU, 3x3 stride-2 max-pool
  (a 32x32 input reaches the first stage at 8x8);
* ``stem="cifar"``: 3x3 stride-1 convolution, BatchNorm, ReLU and no max-pool (SimCLR's
  CIFAR-10 variant; a 32x32 input reaches the first stage at 32x32).
* ``stem="cifar_stride2"``: the same 3x3 convolution with stride 2 (a 28x28 input reaches the
  first stage at 14x14: the encoder sees full-resolution pixels at the cost of a half-resolution
  first stage).

``ResNet`` returns the globally average-pooled features ``h`` of shape (B, F); ``ProjectionHead``
maps them to ``z = g(h)`` of shape (B, P) on which the contrastive losses act, and
``ContrastiveModel`` bundles the two. ``get_model(name, ...)`` builds one of ``MODELS``.

BatchNorm statistics span the *global* batch: under ``jax.jit`` with the batch sharded over a
mesh, the batch mean and variance are reductions over the full (logical) batch axis and XLA
inserts the cross-device all-reduce. Inside ``jax.shard_map`` (or ``pmap``) pass
``bn_axis_name`` to get the same statistics with explicit collectives.

``dtype`` is the compute dtype (``jnp.bfloat16`` for mixed precision); parameters and BatchNorm
statistics stay float32 (``param_dtype``), BatchNorm reductions run in float32, and the outputs
of ``ContrastiveModel`` are float32 so that losses see float32 embeddings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from dhel_jax._validation import check_choice

Array = jax.Array
ModuleDef = Any
Dtype = Any

STEMS = ("cifar", "cifar_stride2", "imagenet")

_NHWC = ("NHWC", "HWIO", "NHWC")


def _strided_input_grad(
    g: Array,
    kernel: Array,
    x_shape: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> Array:
    """Input gradient of an NHWC/HWIO convolution with ``strides`` (s_h, s_w), phase by phase.

    ``y[n, i, j] = sum_{a, b} x_pad[n, s_h i + a, s_w j + b] . w[a, b]``, so the gradient at a
    padded-input row ``u = s_h m + r`` gathers the taps ``a = r, r + s_h, ...`` only: for each of
    the s_h * s_w phases (r, t) it is a stride-1 convolution of ``g`` with the flipped, transposed
    sub-kernel ``w[r::s_h, t::s_w]``. The phases are interleaved back and the padding cropped.
    This is the FLOPs of the forward pass; XLA's own transpose convolves a zero-dilated ``g``,
    s_h * s_w times the work (4x for stride 2).
    """
    n, height, width, channels = x_shape
    (lo_h, hi_h), (lo_w, hi_w) = padding
    sh, sw = strides
    padded_h, padded_w = height + lo_h + hi_h, width + lo_w + hi_w
    rows_per_phase, cols_per_phase = -(-padded_h // sh), -(-padded_w // sw)
    out_h, out_w = g.shape[1], g.shape[2]
    phases = []
    for r in range(sh):
        row = []
        for t in range(sw):
            sub = kernel[r::sh, t::sw]
            length_r, length_t = -(-(padded_h - r) // sh), -(-(padded_w - t) // sw)
            if sub.shape[0] and sub.shape[1]:
                phase = jax.lax.conv_general_dilated(
                    g,
                    jnp.flip(sub, (0, 1)).transpose(0, 1, 3, 2),
                    (1, 1),
                    ((sub.shape[0] - 1, length_r - out_h), (sub.shape[1] - 1, length_t - out_w)),
                    dimension_numbers=_NHWC,
                )
            else:  # a phase no tap reaches (stride larger than the kernel)
                phase = jnp.zeros((n, length_r, length_t, channels), g.dtype)
            pad = ((0, 0), (0, rows_per_phase - length_r), (0, cols_per_phase - length_t), (0, 0))
            row.append(jnp.pad(phase, pad))
        phases.append(jnp.stack(row, axis=3))
    # (n, rows, s_h, cols, s_w, c) -> (n, rows * s_h, cols * s_w, c): row s_h m + r is phase r.
    full = jnp.stack(phases, axis=2).reshape(n, rows_per_phase * sh, cols_per_phase * sw, -1)
    return full[:, lo_h : lo_h + height, lo_w : lo_w + width]


def _input_grad(
    g: Array,
    kernel: Array,
    x_shape: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> Array:
    """Input gradient of an NHWC/HWIO convolution as NHWC/HWIO convolutions.

    Stride 1: one convolution of ``g`` with the flipped kernel, its input and output feature
    axes swapped (HWIO again), padded ``kernel - 1 - padding`` on each side; this is the
    convolution XLA:CPU itself would make of ``jax.lax``'s transpose in the entry computation.
    Strides > 1 (or a padding wider than the kernel): :func:`_strided_input_grad`.
    """
    (lo_h, hi_h), (lo_w, hi_w) = padding
    kh, kw = kernel.shape[0], kernel.shape[1]
    pads = ((kh - 1 - lo_h, kh - 1 - hi_h), (kw - 1 - lo_w, kw - 1 - hi_w))
    if tuple(strides) != (1, 1) or min(min(p) for p in pads) < 0:
        return _strided_input_grad(g, kernel, x_shape, strides, padding)
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    return jax.lax.conv_general_dilated(g, flipped, (1, 1), pads, dimension_numbers=_NHWC)


def _kernel_grad(
    x: Array,
    g: Array,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> Array:
    """Kernel gradient of an NHWC/HWIO convolution as NHWC/HWIO convolutions.

    Both forms contract over the examples, which must become the minor (feature) axis of one
    operand: a full transpose of that operand, (N, H, W, C) -> (C, H, W, N), while the other
    only moves N past the spatial axes and keeps C-long rows contiguous. XLA:CPU fuses the
    producer of the transposed operand (BatchNorm, residual add, ReLU) into the copy and reads
    every input in transposed order, so the full transpose is the step's largest layout cost.
    It goes to the smaller of ``x`` and ``g`` (``g`` on a tie): :func:`_kernel_grad_by_g_t`
    unless ``x`` is smaller (the one-channel stem), then :func:`_kernel_grad_by_x_t`.
    """
    if g.size <= x.size:
        return _kernel_grad_by_g_t(x, g, kernel_shape, strides, padding)
    return _kernel_grad_by_x_t(x, g, kernel_shape, strides, padding)


def _kernel_grad_by_g_t(
    x: Array,
    g: Array,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> Array:
    """Kernel gradient with ``g`` transposed to (O, H', W', N) as the convolution's input.

    Split the taps by their phase r = a mod s_h (and t = b mod s_w): tap ``a = s_h a' + r``
    reads ``x_pad[s_h (h + a') + r] = x[s_h m + c]`` with ``c = (r - lo) mod s_h`` and
    ``m = h + a' + d``, ``d = (r - lo - c) / s_h``. So the taps of phase (r, t) are a stride-1
    kernel gradient between ``g`` and the phase ``x[:, c::s_h, c'::s_w]`` of the unpadded
    input, here one NHWC/HWIO convolution of ``g`` transposed to (O, H', W', N) with that phase
    transposed to (M_h, M_w, N, I) as its kernel, ``g`` padded so that output row
    ``k_r - 1 - a'`` is tap a'. The phases partition ``x`` (a stride-1 convolution has one), and
    the kernel is never padded: a kernel larger than the convolution's unpadded input sends
    XLA:CPU to a slow path.
    """

    def plan(axis: int, r: int) -> tuple[int, slice, slice, tuple[int, int]]:
        size, out, k, s = x.shape[1 + axis], g.shape[1 + axis], kernel_shape[axis], strides[axis]
        lo = padding[axis][0]
        taps = len(range(r, k, s))
        c = (r - lo) % s
        pad_lo = taps - 1 + (r - lo - c) // s
        # g rows that meet only zero padding are cropped, not padded negatively (XLA:CPU's
        # float32 convolution reads garbage for a negative low padding).
        start = max(0, -pad_lo)
        pad_lo = max(0, pad_lo)
        pad_hi = taps - 1 + len(range(c, size, s)) - pad_lo - (out - start)
        stop = out + min(0, pad_hi)
        return taps, slice(c, None, s), slice(start, stop), (pad_lo, max(0, pad_hi))

    sh, sw = strides
    g_t = g.transpose(3, 1, 2, 0)
    dw = jnp.zeros((*kernel_shape[:2], x.shape[3], g.shape[3]), g.dtype)
    for r in range(sh):
        for t in range(sw):
            (taps_h, rows, g_rows, pad_h), (taps_w, cols, g_cols, pad_w) = plan(0, r), plan(1, t)
            if not (taps_h and taps_w):  # a phase no tap reaches (stride larger than the kernel)
                continue
            phase = x[:, rows, cols].transpose(1, 2, 0, 3)
            out = jax.lax.conv_general_dilated(
                g_t[:, g_rows, g_cols], phase, (1, 1), (pad_h, pad_w), dimension_numbers=_NHWC
            )
            block = jnp.flip(out, (1, 2)).transpose(1, 2, 3, 0)
            if (sh, sw) == (1, 1):
                return block
            dw = dw.at[r::sh, t::sw].set(block)
    return dw


def _kernel_grad_by_x_t(
    x: Array,
    g: Array,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> Array:
    """Kernel gradient with ``x`` transposed to (I, H, W, N) as the convolution's input.

    ``dw[a, b, i, o] = sum_{n, h, w} x_pad[n, s_h h + a, s_w w + b, i] g[n, h, w, o]``: a
    convolution of ``x`` transposed to (I, H, W, N) (the input channels as the batch, the
    examples as the features) with ``g`` transposed to (H', W', N, O) as a kernel whose taps are
    dilated by the strides, giving (I, kh, kw, O), transposed back to HWIO. The high padding
    is negative where the last input rows are read by no output (as in ``jax.lax``'s own
    transpose): cropping them instead would make a second transposed copy of an input that
    a strided block's two convolutions otherwise share.
    """
    pads = [
        (lo, (out - 1) * s + k - size - lo)
        for size, out, k, s, (lo, _) in zip(
            x.shape[1:3], g.shape[1:3], kernel_shape[:2], strides, padding, strict=True
        )
    ]
    dw = jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0),
        g.transpose(1, 2, 0, 3),
        (1, 1),
        pads,
        rhs_dilation=tuple(strides),
        dimension_numbers=_NHWC,
    )
    return dw.transpose(1, 2, 0, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: Array, kernel: Array, strides: tuple, padding: tuple) -> Array:
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def _conv_fwd(x, kernel, strides, padding):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    kernel_grad = _kernel_grad(x, g, kernel.shape, strides, padding)
    x_grad = _input_grad(g, kernel, x.shape, strides, padding)
    return x_grad.astype(x.dtype), kernel_grad.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> Array:
    """``jax.lax.conv_general_dilated`` whose gradients, in CPU programs, are NHWC/HWIO
    convolutions too.

    The value, and the gradients to float round-off, are those of ``jax.lax``. For undilated,
    ungrouped NHWC/HWIO convolutions with explicit padding (every convolution of these ResNets,
    "SAME"/"VALID" padding included) a custom VJP writes both gradients as NHWC/HWIO
    convolutions (:func:`_kernel_grad`, :func:`_input_grad`) in programs lowered for the CPU
    (``jax.lax.platform_dependent``: the platform the program is lowered for, never the host's
    default backend). TPU and GPU programs keep ``jax.lax``'s own gradients, which their
    compilers lay out themselves: on a TPU the custom VJP costs 4-7% of the step and up to 22%
    more temporaries (docs/accelerators.md, "Planning a TPU run"). On the CPU:

    * ``jax.lax``'s own transposes are convolutions with other dimension numbers (kernel
      gradient ``f01b_i01o->01bf``, input gradient ``b01f_01oi->b01f``). XLA:CPU rewrites them
      into NHWC/HWIO ones, which its fast convolution kernels (Eigen, YNNPACK) need, only in
      the entry computation (its ``ConvCanonicalization`` pass). Inside a loop body
      (``jax.lax.scan``/``map``/``fori_loop``, e.g. the chunk loop of ``dhel_jax.grad_cache``)
      they stay as they are and fall to a naive loop-nest convolution, tens of times slower
      (docs/large_batches.md, "Time").
    * The input gradient of a strided convolution is computed phase by phase
      (:func:`_strided_input_grad`): the forward's FLOPs instead of s_h * s_w times them.

    Anything else goes to ``jax.lax.conv_general_dilated`` unchanged. Pass it as ``nn.Conv``'s
    ``conv_general_dilated``.
    """
    plain = (
        all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1
        and precision is None
        and not kwargs
        and lhs.ndim == 4
        and dimension_numbers is not None
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )
    if not plain:
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )
    if isinstance(padding, str):  # "SAME" / "VALID"
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    strides = tuple(int(s) for s in window_strides)
    # Chosen per lowering platform, not by the host's backend: a program lowered for "tpu" or
    # "cuda" on a CPU host (dhel-compile) gets XLA's own gradients too.
    return jax.lax.platform_dependent(
        lhs,
        rhs,
        cpu=lambda x, w: _conv(x, w, strides, pads),
        default=lambda x, w: jax.lax.conv_general_dilated(
            x, w, strides, pads, dimension_numbers=_NHWC
        ),
    )


# He (Kaiming) normal with fan_out, as torchvision initialises ResNet convolutions.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _ResidualBlock(nn.Module):
    """The fields and the shortcut that :class:`BasicBlock` and :class:`BottleneckBlock` share.

    The block's output is ``relu(shortcut(x) + y)``: ``shortcut`` is the identity, or a strided
    1x1 projection with BatchNorm (``conv_proj``, ``norm_proj``) where ``x`` and ``y`` differ in
    shape; ``y`` ends in a BatchNorm whose scale starts at zero with ``zero_init_residual``, so
    each block starts as the identity (Goyal et al., 2017; SimCLR).
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: tuple[int, int] = (1, 1)
    zero_init_residual: bool = True

    expansion: ClassVar[int] = 1

    @nn.nowrap
    def _last_norm(self) -> nn.Module:
        init = (
            nn.initializers.zeros_init() if self.zero_init_residual else nn.initializers.ones_init()
        )
        return self.norm(scale_init=init)

    @nn.nowrap
    def _add_shortcut(self, x: Array, y: Array) -> Array:
        if x.shape != y.shape:
            x = self.conv(self.filters * self.expansion, (1, 1), self.strides, name="conv_proj")(x)
            x = self.norm(name="norm_proj")(x)
        return nn.relu(x + y)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; expansion 1."""

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = self.conv(self.filters, (3, 3), self.strides, padding=((1, 1), (1, 1)))(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters, (3, 3), padding=((1, 1), (1, 1)))(y)
        return self._add_shortcut(x, self._last_norm()(y))


class BottleneckBlock(_ResidualBlock):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4) convolutions with a shortcut; expansion 4."""

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = self.conv(self.filters, (3, 3), self.strides, padding=((1, 1), (1, 1)))(y)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters * self.expansion, (1, 1))(y)
        return self._add_shortcut(x, self._last_norm()(y))


def _batch_norm(module: ResNet | ProjectionHead, train: bool) -> ModuleDef:
    """``nn.BatchNorm`` with ``module``'s momentum, epsilon, dtypes and cross-device axis; batch
    statistics in training, the running averages otherwise."""
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=module.bn_momentum,
        epsilon=module.bn_epsilon,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        axis_name=module.bn_axis_name,
    )


class ResNet(nn.Module):
    """ResNet encoder: (B, H, W, C) images -> (B, F) globally average-pooled features.

    Stage ``i`` has ``stage_sizes[i]`` blocks of width ``num_filters * 2**i`` (times the block's
    expansion); every stage after the first halves the resolution. ``F = num_filters *
    2**(len(stage_sizes) - 1) * block_cls.expansion`` (512 for ResNet-18/34, 2048 for ResNet-50).

    Attributes:
      stage_sizes: number of blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      block_cls: ``BasicBlock`` or ``BottleneckBlock``.
      num_filters: width of the stem and the first stage.
      stem: ``"cifar"`` (3x3 stride 1, no max-pool), ``"cifar_stride2"`` (3x3 stride 2, no
        max-pool) or ``"imagenet"`` (7x7 stride 2 + max-pool).
      dtype: compute dtype (float32 or bfloat16); parameters stay ``param_dtype``.
      param_dtype: dtype of parameters and BatchNorm statistics.
      bn_momentum: running-average decay of BatchNorm statistics (torch momentum 0.1 == 0.9).
      bn_epsilon: BatchNorm variance epsilon.
      zero_init_residual: zero-initialise the last BatchNorm gamma of every residual block.
      bn_axis_name: mesh axis to average BatchNorm statistics over inside ``shard_map``/``pmap``;
        ``None`` under ``jax.jit`` with sharded arrays (XLA already reduces globally).
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_filters: int = 64
    stem: str = "cifar"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    zero_init_residual: bool = True
    bn_axis_name: str | None = None

    @property
    def num_features(self) -> int:
        """The feature dimension F of the output."""
        return self.num_filters * 2 ** (len(self.stage_sizes) - 1) * self.block_cls.expansion

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        check_choice(self.stem, "stem", STEMS, fn="ResNet")
        if x.ndim != 4:
            raise ValueError(
                f"ResNet: expects images of shape (B, H, W, C); got shape {tuple(x.shape)}."
            )
        conv = functools.partial(
            nn.Conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_kernel_init,
            conv_general_dilated=conv_general_dilated,
        )
        norm = _batch_norm(self, train)
        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = conv(self.num_filters, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="stem_conv")(
                x
            )
            x = nn.relu(norm(name="stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            stride = (2, 2) if self.stem == "cifar_stride2" else (1, 1)
            x = conv(self.num_filters, (3, 3), stride, padding=((1, 1), (1, 1)), name="stem_conv")(
                x
            )
            x = nn.relu(norm(name="stem_bn")(x))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = self.block_cls(
                    self.num_filters * 2**i,
                    conv=conv,
                    norm=norm,
                    strides=(2, 2) if i > 0 and j == 0 else (1, 1),
                    zero_init_residual=self.zero_init_residual,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x)
        # Pool in float32: a bf16 mean over many positions loses precision for nothing.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class ProjectionHead(nn.Module):
    """SimCLR projection head g: (B, F) features -> (B, out_dim) float32 projections.

    ``num_layers - 1`` blocks of Linear(hidden_dim, no bias) -> BatchNorm -> ReLU, then a final
    Linear(out_dim, with bias). The default is Linear-BN-ReLU-Linear (the paper's ResNet-18
    setting 512 -> 512 -> 128). The hidden Linear layers have no bias because the following
    BatchNorm's shift makes it redundant. ``output_bn`` adds a BatchNorm without learnable
    scale/shift after the last Linear (SimCLR v2 style); off by default.
    """

    hidden_dim: int = 512
    out_dim: int = 128
    num_layers: int = 2
    output_bn: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, h: Array, train: bool) -> Array:
        if self.num_layers < 1:
            raise ValueError(f"ProjectionHead: num_layers must be >= 1; got {self.num_layers}.")
        if h.ndim != 2:
            raise ValueError(
                f"ProjectionHead: expects features of shape (B, F); got shape {tuple(h.shape)}."
            )
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = _batch_norm(self, train)
        z = jnp.asarray(h, self.dtype)
        for i in range(self.num_layers - 1):
            z = dense(self.hidden_dim, use_bias=False, name=f"hidden{i + 1}")(z)
            z = nn.relu(norm(name=f"hidden{i + 1}_bn")(z))
        z = dense(self.out_dim, name="output")(z)
        if self.output_bn:
            z = norm(use_scale=False, use_bias=False, name="output_bn")(z)
        return z.astype(jnp.float32)


class ContrastiveModel(nn.Module):
    """Encoder f and projection head g: x -> {"features": f(x), "projections": g(f(x))}.

    Both outputs are float32; ``features`` (B, F) are what linear probes use, ``projections``
    (B, P) are what the contrastive loss uses.
    """

    encoder: nn.Module
    head: nn.Module

    def __call__(self, x: Array, train: bool) -> dict[str, Array]:
        features = self.encoder(x, train=train)
        projections = self.head(features, train=train)
        return {
            "features": features.astype(jnp.float32),
            "projections": projections.astype(jnp.float32),
        }


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
# CPU default (Fashion-MNIST): a real ResNet-8 (stem + 3 stages of one basic block, widths
# 32-64-128, F = 128) that trains at a usable speed on two CPU cores.
ResNetSmall = functools.partial(ResNet, stage_sizes=(1, 1, 1), block_cls=BasicBlock, num_filters=32)
# For tests: two stages of one basic block, widths 4-8 (F = 8).
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, num_filters=4)

MODELS: dict[str, Callable[..., ResNet]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet_small": ResNetSmall,
    "resnet_tiny": ResNetTiny,
}

DTYPES: dict[str, Dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def init_variables(model: nn.Module, rng: Array, image_shape: Sequence[int]) -> dict[str, Any]:
    """``{"params": ..., "batch_stats": ...}`` of ``model`` initialised from the PRNG key ``rng``
    for images of shape ``image_shape`` = (H, W, C)."""
    variables = model.init(rng, jnp.zeros((2, *image_shape), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def get_model(
    name: str,
    *,
    stem: str = "cifar",
    head_hidden_dim: int = 512,
    head_out_dim: int = 128,
    head_num_layers: int = 2,
    dtype: str = "float32",
    bn_axis_name: str | None = None,
    **encoder_kwargs: Any,
) -> ContrastiveModel:
    """Builds ``ContrastiveModel(encoder=MODELS[name](...), head=ProjectionHead(...))``.

    Args:
      name: one of ``MODELS``.
      stem: one of ``STEMS``.
      head_hidden_dim, head_out_dim, head_num_layers: the projection head's dimensions.
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"`` (parameters stay float32).
      bn_axis_name: see ``ResNet``; only for ``shard_map``/``pmap`` callers.
      **encoder_kwargs: further ``ResNet`` attributes (``zero_init_residual``, ``num_filters``,
        ``bn_momentum``, ...).
    """
    check_choice(name, "model name", tuple(MODELS), fn="get_model")
    check_choice(stem, "stem", STEMS, fn="get_model")
    dtype_name = str(jnp.dtype(dtype)) if not isinstance(dtype, str) else dtype
    check_choice(dtype_name, "dtype", tuple(DTYPES), fn="get_model")
    compute_dtype = DTYPES[dtype_name]
    encoder = MODELS[name](
        stem=stem, dtype=compute_dtype, bn_axis_name=bn_axis_name, **encoder_kwargs
    )
    head = ProjectionHead(
        hidden_dim=head_hidden_dim,
        out_dim=head_out_dim,
        num_layers=head_num_layers,
        dtype=compute_dtype,
        bn_axis_name=bn_axis_name,
    )
    return ContrastiveModel(encoder=encoder, head=head)
