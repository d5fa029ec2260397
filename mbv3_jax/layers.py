"""NHWC building blocks with torch semantics and a fast XLA:CPU path.

Every layer here computes the same function as its torch counterpart (same padding, same
BatchNorm statistics, same activation formulas). Two convolution kinds are rewritten on the CPU
because XLA:CPU runs them slowly (see ../shared/docs/cpu-performance-notes.md):

* depthwise convolutions become k*k shifted multiply-adds (XLA:CPU's grouped convolution runs at
  ~1 GFLOP/s and took ~90% of the model's time), with hand-written input and kernel gradients;
* 1x1 stride-1 convolutions become a matmul on a (N*H*W, C) view;
* dilated (atrous) dense convolutions become one matmul per kernel tap, skipping the padding;
* dense convolutions with few input channels (the RGB stem) become k*k*Cin broadcast multiply-adds.

On GPU/TPU the standard convolution is used. The maths is identical; summation order differs
only at rounding level.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax.ops.unfused import unfused
from mbv3_jax.runtime import Module

Array = jax.Array
DType = jnp.dtype | type


# ------------------------------------------------------------------------------------------------
# Activations: torch's exact formulas, and torch's derivative at the kinks (custom JVPs), so
# gradients agree even where an input sits exactly on a kink (jnp.maximum/clip split ties 0.5/0.5).


@jax.custom_jvp
def relu(x: Array) -> Array:
    return jnp.maximum(x, 0)


@relu.defjvp
def _relu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return relu(x), jnp.where(x > 0, t, jnp.zeros_like(t))


@jax.custom_jvp
def hardsigmoid(x: Array) -> Array:
    return jnp.clip(x + 3, 0, 6) / 6


@hardsigmoid.defjvp
def _hardsigmoid_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return hardsigmoid(x), jnp.where((x > -3) & (x < 3), t / 6, jnp.zeros_like(t))


@jax.custom_jvp
def hardswish(x: Array) -> Array:
    return x * jnp.clip(x + 3, 0, 6) / 6


@hardswish.defjvp
def _hardswish_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    slope = jnp.where(x < -3, 0.0, jnp.where(x <= 3, x / 3 + 0.5, 1.0)).astype(t.dtype)
    return hardswish(x), slope * t


@jax.custom_jvp
def relu6(x: Array) -> Array:
    """torch's ReLU6 (hardtanh(0, 6)); SSDlite's extra blocks and heads use it."""
    return jnp.clip(x, 0, 6)


@relu6.defjvp
def _relu6_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return relu6(x), jnp.where((x > 0) & (x < 6), t, jnp.zeros_like(t))


ACTIVATIONS: dict[str | None, Callable[[Array], Array] | None] = {
    None: None,
    "relu": relu,
    "relu6": relu6,
    "hardswish": hardswish,
    "hardsigmoid": hardsigmoid,
}


# ------------------------------------------------------------------------------------------------
# Convolution


def normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: DType) -> Array:
    """N(0, std^2) drawn on the host from a key of ``rngs.params``.

    jax.random draws compile one small program per parameter shape, which made building a
    MobileNetV3 take ~25 s eagerly; numpy, seeded from the JAX key, takes milliseconds.
    """
    seed = np.asarray(jax.random.key_data(rngs.params())).ravel()
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * np.float32(std)
    return jnp.asarray(values, dtype=dtype)


def _const(shape: tuple[int, ...], value: float, dtype: DType) -> Array:
    return jnp.asarray(np.full(shape, value, dtype=np.dtype(dtype)))


def _fast_cpu_path() -> bool:
    # Decided at trace time: each backend compiles its own program.
    return jax.default_backend() == "cpu"


def _strided_tap(x: Array, row0: int, col0: int, rows: int, cols: int, stride: int) -> Array:
    """x[:, row0::stride, col0::stride] limited to rows x cols: what one kernel tap multiplies."""
    n, _, _, c = x.shape
    end = (n, row0 + (rows - 1) * stride + 1, col0 + (cols - 1) * stride + 1, c)
    return jax.lax.slice(x, (0, row0, col0, 0), end, (1, stride, stride, 1))


def _depthwise_shift_forward(x: Array, kernel: Array, stride: int, padding: int, dilation: int) -> Array:
    kh, kw = kernel.shape[:2]
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    _, h, w, _ = x.shape
    out_h = (h - dilation * (kh - 1) - 1) // stride + 1
    out_w = (w - dilation * (kw - 1) - 1) // stride + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            term = _strided_tap(x, i * dilation, j * dilation, out_h, out_w, stride) * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


# Output rows are summed in up to this many groups before the final reduction (see below).
_KERNEL_GRAD_ROW_GROUPS = 8


def depthwise_kernel_grad(
    x: Array, g: Array, kernel_size: tuple[int, int], stride: int, padding: int, dilation: int
) -> Array:
    """d(sum(depthwise(x, k) * g)) / dk, shape (kh, kw, 1, C).

    Autodiff gives one strided tap of x times g per kernel element, each reduced over (N, H, W):
    XLA:CPU hands each reduction to a YNNPACK fusion that needs its operand in memory, so every
    tap is written out in full (25 copies of a 5x5 layer's input; ~20% of a training step). Here
    each tap's products are first summed over groups of output rows inside one loop fusion (no
    full-size tap is ever written), then the small partial sums are reduced once: the kernel
    gradient costs about half as much. Rows are split, not the batch: the batch may be sharded.
    """
    kh, kw = kernel_size
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    _, out_h, out_w, c = g.shape
    groups = max(d for d in range(1, _KERNEL_GRAD_ROW_GROUPS + 1) if out_h % d == 0)
    rows = out_h // groups
    acc_dtype = jnp.promote_types(g.dtype, jnp.float32)
    x, g = x.astype(acc_dtype), g.astype(acc_dtype)
    partial_sums = []
    for i in range(kh):
        for j in range(kw):
            acc = None
            for k in range(groups):
                tap = _strided_tap(x, i * dilation + stride * k * rows, j * dilation, rows, out_w, stride)
                term = tap * g[:, k * rows : (k + 1) * rows]
                acc = term if acc is None else acc + term
            partial_sums.append(acc)
    stacked = jnp.stack(partial_sums, axis=3)  # (N, rows, W, kh*kw, C)
    return jnp.sum(stacked, axis=(0, 1, 2)).reshape(kh, kw, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_conv_shift(x: Array, kernel: Array, stride: int, padding: int, dilation: int) -> Array:
    """Depthwise conv as k*k shifted multiply-adds. x: NHWC, kernel: (kh, kw, 1, C).

    Both gradients are written by hand (the input gradient in ``_depthwise_shift_bwd``, the kernel
    gradient in ``depthwise_kernel_grad``): XLA:CPU runs them several times faster than autodiff's.
    """
    return _depthwise_shift_forward(x, kernel, stride, padding, dilation)


def _depthwise_shift_fwd(x, kernel, stride, padding, dilation):
    return _depthwise_shift_forward(x, kernel, stride, padding, dilation), (x, kernel)


def _stuffed_padded(
    g: Array, kernel_hw: tuple[int, int], input_hw: tuple[int, int], stride: int, padding: int, dilation: int
) -> Array:
    """g with stride - 1 zeros between its pixels and the transposed convolution's border: the input
    gradient is then the flipped kernel slid over it (stride 1), computed like the forward pass."""
    pads = []
    for size, k, out in ((input_hw[0], kernel_hw[0], g.shape[1]), (input_hw[1], kernel_hw[1], g.shape[2])):
        low = (k - 1) * dilation - padding  # may be negative (then it crops): lax.pad allows it
        stuffed = (out - 1) * stride + 1
        pads.append((low, size + (k - 1) * dilation - low - stuffed, stride - 1))
    return jax.lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), pads[0], pads[1], (0, 0, 0)))


def _depthwise_shift_bwd(stride, padding, dilation, residuals, g):
    # Autodiff's transpose of the forward pads each tap's product (with interior zeros for stride 2)
    # and sums the k*k padded terms in one loop fusion that re-evaluates g's producer (BatchNorm's
    # backward) for every tap and output element (~160 ms of a training step for one stride-2
    # layer). Here g is stuffed and padded once (written out by XLA) and read k*k times.
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    low_h, low_w = (kh - 1) * dilation - padding, (kw - 1) * dilation - padding
    stuffed = _stuffed_padded(g, (kh, kw), x.shape[1:3], stride, padding, dilation)
    dx = _depthwise_shift_forward(stuffed, kernel[::-1, ::-1], 1, 0, dilation)
    if low_h >= 0 and low_w >= 0:
        # The kernel gradient reads g back from the written-out buffer: g's producer (BatchNorm's
        # backward) would otherwise be re-evaluated in each of the k*k tap loops. The factor is 1
        # (kernel values are finite) but hides from XLA that the slice undoes the pad, which it
        # would otherwise fold back into g.
        one = 1 + 0 * kernel[0, 0, 0, 0].astype(stuffed.dtype)
        g = _strided_tap(stuffed * one, low_h, low_w, g.shape[1], g.shape[2], stride)
    dk = depthwise_kernel_grad(x, g, kernel.shape[:2], stride, padding, dilation)
    return dx, dk.astype(kernel.dtype)


depthwise_conv_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def pointwise_conv_dot(x: Array, kernel: Array, precision=None) -> Array:
    """1x1 stride-1 conv as a matmul on the (N*H*W, C) view. kernel: (1, 1, Cin, Cout)."""
    n, h, w, c = x.shape
    y = jnp.dot(x.reshape(n * h * w, c), kernel[0, 0], precision=precision)
    return y.reshape(n, h, w, kernel.shape[-1])


def dilated_conv_taps(x: Array, kernel: Array, padding: int, dilation: int, precision=None) -> Array:
    """Stride-1 dense conv as one matmul per kernel tap over the region where that tap sees input.

    For atrous convs (ASPP rates 12/24/36 on a ~33x49 map) most taps read mostly padding; XLA:CPU
    still multiplies through it (rate 36: 169 ms), this skips it (13 ms). Same sums, other order.
    """
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    out_h, out_w = h + 2 * padding - dilation * (kh - 1), w + 2 * padding - dilation * (kw - 1)
    out = None
    for i in range(kh):
        for j in range(kw):
            di, dj = i * dilation - padding, j * dilation - padding  # input offset of this tap
            r0, r1 = max(0, -di), min(out_h, h - di)
            c0, c1 = max(0, -dj), min(out_w, w - dj)
            if r0 >= r1 or c0 >= c1:
                continue  # this tap only ever reads padding
            xs = x[:, r0 + di : r1 + di, c0 + dj : c1 + dj, :].reshape(-1, cin)
            y = jnp.dot(xs, kernel[i, j], precision=precision).reshape(n, r1 - r0, c1 - c0, cout)
            y = jnp.pad(y, ((0, 0), (r0, out_h - r1), (c0, out_w - c1), (0, 0)))
            out = y if out is None else out + y
    if out is None:
        return jnp.zeros((n, out_h, out_w, cout), x.dtype)
    return out


# Dense convs with at most this many input channels run as broadcast multiply-adds on the CPU.
_FEW_INPUT_CHANNELS = 4


def xla_conv(x: Array, kernel: Array, stride: int, padding: int, dilation: int = 1, groups: int = 1) -> Array:
    """XLA's own convolution, NHWC / HWIO, symmetric padding (what GPU/TPU run)."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def few_channel_conv_taps(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    """Dense conv with few input channels (the RGB stem) as kh*kw*Cin broadcast multiply-adds.

    XLA:CPU hands it to Eigen's im2col convolution, whose patch packing of a 3-channel input is
    most of its cost (stem of a 520x693 image: ~6.5-7 ms; this: ~3-4 ms). Sums are accumulated in at
    least float32. Gradients are autodiff's of XLA's convolution (the training path is unchanged).
    """
    return _few_channel_taps_forward(x, kernel, stride, padding)


def _few_channel_taps_forward(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    # Its own buffer: fused into its consumers (the next block's padded depthwise input and its
    # residual add), XLA:CPU would evaluate the kh*kw*Cin products once per consumer.
    return unfused(lambda x, kernel: _few_channel_taps(x, kernel, stride, padding), x, kernel)


def _few_channel_taps(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    kh, kw, cin, _ = kernel.shape
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xp, k = x.astype(acc_dtype), kernel.astype(acc_dtype)
    if padding:
        xp = jnp.pad(xp, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out_h = (xp.shape[1] - kh) // stride + 1
    out_w = (xp.shape[2] - kw) // stride + 1
    terms = []
    for i in range(kh):
        for j in range(kw):
            tap = _strided_tap(xp, i, j, out_h, out_w, stride)
            terms.extend(tap[..., c : c + 1] * k[i, j, c] for c in range(cin))
    return _pairwise_sum(terms).astype(x.dtype)


def _pairwise_sum(terms: list[Array]) -> Array:
    """Sum as a balanced tree: rounding error grows with log2(len) instead of len (27 stem terms:
    DeepLabV3's train-mode logits 9.7e-6 -> 8.4e-6 of max|logit| from torch), and faster (more
    independent adds)."""
    while len(terms) > 1:
        pairs = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
        terms = pairs + terms[len(terms) - len(terms) % 2 :]
    return terms[0]


def _few_channel_taps_fwd(x, kernel, stride, padding):
    return _few_channel_taps_forward(x, kernel, stride, padding), (x, kernel)


def _few_channel_taps_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda x, k: xla_conv(x, k, stride, padding), x, kernel)
    return vjp(g)


few_channel_conv_taps.defvjp(_few_channel_taps_fwd, _few_channel_taps_bwd)


class Conv2d(Module):
    """torch.nn.Conv2d in NHWC with symmetric padding; kernel stored HWIO (kh, kw, Cin/groups, Cout).

    ``impl``: "auto" (fast CPU rewrites on CPU, XLA convolution elsewhere), "xla", or "fast".
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        use_bias: bool = True,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.groups = dilation, groups
        self.dtype, self.impl = dtype, impl
        shape = (kernel_size, kernel_size, in_channels // groups, out_channels)
        # torchvision's MobileNetV3 init: kaiming normal, fan_out (torch ignores groups here).
        fan_out = out_channels * kernel_size * kernel_size
        std = float(np.sqrt(2.0 / fan_out))
        self.kernel = nnx.Param(normal_init(rngs, shape, std, param_dtype))
        self.bias = nnx.Param(_const((out_channels,), 0.0, param_dtype)) if use_bias else None

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels and self.groups > 1

    @property
    def is_pointwise(self) -> bool:
        return self.kernel_size == 1 and self.stride == 1 and self.groups == 1 and self.padding == 0

    def __call__(self, x: Array, padding: int | None = None) -> Array:
        """``padding`` overrides the layer's own (0: ``x`` already carries its zero border)."""
        p = self.padding if padding is None else padding
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        kernel = self.kernel[...].astype(dtype)
        fast = self.impl == "fast" or (self.impl == "auto" and _fast_cpu_path())
        if fast and self.is_depthwise:
            y = depthwise_conv_shift(x, kernel, self.stride, p, self.dilation)
        elif fast and self.is_pointwise and p == 0:
            y = pointwise_conv_dot(x, kernel)
        elif fast and self.groups == 1 and self.stride == 1 and self.dilation > 1:
            y = dilated_conv_taps(x, kernel, p, self.dilation)
        elif fast and self.groups == 1 and self.dilation == 1 and self.in_channels <= _FEW_INPUT_CHANNELS:
            y = few_channel_conv_taps(x, kernel, self.stride, p)
        else:
            y = xla_conv(x, kernel, self.stride, p, self.dilation, self.groups)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Linear(Module):
    """torch.nn.Linear. Default init N(0, 0.01) as torchvision's classifier.

    The kernel is stored (in, out), or (out, in) as torch stores it with ``kernel_layout="out_in"``:
    XLA:CPU multiplies a wide input (Faster R-CNN's fc6: 150 x 12544 @ 12544 x 1024) ~15% faster
    with the kernel's contraction axis minor.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kernel_layout: str = "in_out",
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if kernel_layout not in ("in_out", "out_in"):
            raise ValueError(f"kernel_layout must be 'in_out' or 'out_in', got {kernel_layout!r}")
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.kernel_layout = kernel_layout
        shape = (in_features, out_features) if kernel_layout == "in_out" else (out_features, in_features)
        self.kernel = nnx.Param(normal_init(rngs, shape, 0.01, param_dtype))
        self.bias = nnx.Param(_const((out_features,), 0.0, param_dtype))

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or x.dtype
        kernel = self.kernel[...].astype(dtype)
        contract = 0 if self.kernel_layout == "in_out" else 1
        y = jax.lax.dot_general(x.astype(dtype), kernel, (((x.ndim - 1,), (contract,)), ((), ())))
        return y + self.bias[...].astype(dtype)


# ------------------------------------------------------------------------------------------------
# BatchNorm with torch's semantics


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: Array, scale: Array, bias: Array, eps: float) -> tuple[Array, Array, Array]:
    """Normalise ``x`` (..., C) with its batch statistics: (y, mean, biased variance).

    torch's two-pass statistics. The VJP is written out (the textbook BatchNorm backward: two
    per-channel sums, then one elementwise pass); autodiff of the forward formula gives the same
    numbers with more full-size passes (BN + hardswish on 100352x64, forward and backward:
    ~59 -> ~39 ms).
    """
    return _batch_norm_train_fwd(x, scale, bias, eps)[0]


def _batch_norm_train_fwd(x, scale, bias, eps):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    centered = x - mean
    var = jnp.mean(jnp.square(centered), axis=axes)
    rstd = jax.lax.rsqrt(var + eps)
    return (centered * rstd * scale + bias, mean, var), (x, mean, rstd, scale)


def _batch_norm_train_bwd(eps, residuals, cotangents):
    x, mean, rstd, scale = residuals
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    xhat = (x - mean) * rstd
    dbias = jnp.sum(dy, axis=axes)
    dscale = jnp.sum(dy * xhat, axis=axes)
    dx = (scale * rstd) * (dy - dbias / n - xhat * (dscale / n))
    # The statistics themselves are outputs too (the running averages use them under
    # stop_gradient, so these cotangents are zeros in practice; kept for a correct VJP).
    dx = dx + dmean / n + xhat * (dvar * (2.0 / (n * rstd)))
    return dx, dscale, dbias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(Module):
    """torch.nn.BatchNorm2d over the last axis.

    Differences from ``nnx.BatchNorm`` that matter for parity: ``momentum`` is torch's (weight of
    the new batch), the running variance is updated with the *unbiased* batch variance, and
    ``num_batches_tracked`` is kept so checkpoints round-trip to torch with ``strict=True``.
    Under ``jax.jit`` with a sharded batch the statistics are over the global batch (SyncBN).
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        use_running_average: bool = False,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
    ):
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.use_running_average, self.dtype = use_running_average, dtype
        self.scale = nnx.Param(_const((num_features,), 1.0, param_dtype))
        self.bias = nnx.Param(_const((num_features,), 0.0, param_dtype))
        self.mean = nnx.BatchStat(_const((num_features,), 0.0, param_dtype))
        self.var = nnx.BatchStat(_const((num_features,), 1.0, param_dtype))
        self.num_batches_tracked = nnx.BatchStat(_const((), 0, jnp.int32))

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or x.dtype
        # Statistics in at least float32 (bf16 compute keeps fp32 statistics).
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        scale = self.scale[...].astype(stat_dtype)
        bias = self.bias[...].astype(stat_dtype)
        if self.use_running_average:
            # torch's CPU inference kernel folds BN into one multiply-add.
            inv = scale / jnp.sqrt(self.var[...].astype(stat_dtype) + self.eps)
            shift = bias - self.mean[...].astype(stat_dtype) * inv
            return (x.astype(stat_dtype) * inv + shift).astype(dtype)
        axes = tuple(range(x.ndim - 1))
        n = int(np.prod([x.shape[a] for a in axes]))
        if n <= 1:  # torch raises too: the batch variance of one value is meaningless
            raise ValueError(
                f"BatchNorm in train mode needs more than 1 value per channel, got input shape {x.shape} "
                "(a batch of one image through a pooled branch?): use a larger batch or model.eval()"
            )
        y, mean, var = batch_norm_train(x.astype(stat_dtype), scale, bias, self.eps)
        m = self.momentum
        unbiased = var * (n / (n - 1))
        stat = self.mean[...].dtype
        # set_value, not ``v[...] = x``: under a trace, flax's indexed assignment asks the tracer for
        # its sharding, and jax builds that AttributeError's message by walking the whole jaxpr so
        # far (quadratic: ~10 s of tracing for a train-mode SSDlite). Same value, same dtype.
        self.mean.set_value(((1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)).astype(stat))
        self.var.set_value(((1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)).astype(stat))
        count = self.num_batches_tracked[...]
        self.num_batches_tracked.set_value((count + 1).astype(count.dtype))
        return y.astype(dtype)


class FrozenBatchNorm(Module):
    """torchvision.ops.FrozenBatchNorm2d: a fixed per-channel affine from BN statistics.

    Its weight, bias and statistics are buffers in torch (not parameters), so here they are
    ``nnx.BatchStat`` variables: optimizers (which update ``nnx.Param``) leave them alone.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
    ):
        self.num_features, self.eps, self.dtype = num_features, eps, dtype
        self.scale = nnx.BatchStat(_const((num_features,), 1.0, param_dtype))
        self.bias = nnx.BatchStat(_const((num_features,), 0.0, param_dtype))
        self.mean = nnx.BatchStat(_const((num_features,), 0.0, param_dtype))
        self.var = nnx.BatchStat(_const((num_features,), 1.0, param_dtype))

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or x.dtype
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        # torch: scale = w * (rv + eps).rsqrt(); bias = b - rm * scale; x * scale + bias
        scale = self.scale[...].astype(stat_dtype) * jax.lax.rsqrt(
            self.var[...].astype(stat_dtype) + self.eps
        )
        shift = self.bias[...].astype(stat_dtype) - self.mean[...].astype(stat_dtype) * scale
        return (x.astype(stat_dtype) * scale + shift).astype(dtype)


class ConvNormActivation(Module):
    """torchvision's Conv2dNormActivation: conv (no bias) -> BatchNorm -> optional activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        activation: str | None = "relu",
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        norm: str = "batch",
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if norm not in ("batch", "frozen"):
            raise ValueError(f"norm must be 'batch' or 'frozen', got {norm!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {list(ACTIVATIONS)}")
        self.activation = activation
        self.conv = Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2 * dilation,
            dilation=dilation,
            groups=groups,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        if norm == "frozen":
            self.bn = FrozenBatchNorm(out_channels, eps=bn_eps, dtype=dtype, param_dtype=param_dtype)
        else:
            self.bn = BatchNorm(
                out_channels, eps=bn_eps, momentum=bn_momentum, dtype=dtype, param_dtype=param_dtype
            )

    def __call__(self, x: Array, padding: int | None = None) -> Array:
        y = self.conv(x, padding)
        shape = y.shape
        # Normalise on the (N*H*W, C) view: XLA:CPU runs the per-channel affine fused after a 1x1
        # conv (a dot) slower when the fusion indexes the 4-D shape. Batch-1 classifiers measured
        # here: Large 15.5 vs 18.6 ms, Small 6.9 vs 8.9 ms; identical outputs.
        y = self.bn(y.reshape(-1, shape[-1]))
        act = ACTIVATIONS[self.activation]
        y = y if act is None else act(y)
        return y.reshape(shape)


class SqueezeExcitation(Module):
    """torchvision's SqueezeExcitation with ReLU and hardsigmoid (MobileNetV3's variant)."""

    def __init__(
        self,
        channels: int,
        squeeze_channels: int,
        *,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Conv2d(channels, squeeze_channels, 1, **kw)
        self.fc2 = Conv2d(squeeze_channels, channels, 1, **kw)

    def __call__(self, x: Array) -> Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = hardsigmoid(self.fc2(relu(self.fc1(s))))
        return x * s
