"""The CPU kernels: convolutions computed another way because XLA:CPU runs them slowly.

Timings behind each choice are in docs/performance.md.

Each computes the same function as XLA's convolution (``mbv3_jax.ops.conv.xla_conv``); only the
summation order differs, at rounding level. ``mbv3_jax.backend`` decides where they are used (in
programs lowered for the CPU); nothing else should call them.

* depthwise convolutions as k*k shifted multiply-adds, with hand-written input and kernel gradients;
* 1x1 stride-1 convolutions as a matmul on a (N*H*W, C) view;
* dilated (atrous) dense convolutions as one matmul per kernel tap, skipping the padding;
* dense convolutions with few input channels (the RGB stem) as broadcast multiply-adds;
* ``own_buffers``: a computation kept out of its consumers' fusions;
* integer depthwise convolutions as exact float32 multiply-adds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mbv3_jax.ops.conv import explicitly_sharded, xla_conv

Array = jax.Array


def own_buffers(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` computed into its own buffers: XLA:CPU fuses a cheap producer into each of its
    consumers and recomputes it per consumer element; a conditional's branches are separate
    computations, so their results are written out. (``lax.optimization_barrier`` does not stop it:
    the CPU pipeline expands barriers before fusion.)

    Both branches are ``fn``, so the result never depends on the predicate, which only has to be a
    value XLA cannot fold at compile time. Differentiable (``lax.cond``).
    """
    leaves = [x for x in jax.tree.leaves(args) if getattr(x, "size", 0)]
    # An explicitly sharded operand has no element every device holds to probe: compute it fused.
    if not leaves or any(explicitly_sharded(x) for x in leaves):
        return fn(*args)
    # x == x is not foldable for a float (NaN); XLA folds it to true for an integer, hence the convert.
    probe = jnp.ravel(leaves[0])[0].astype(jnp.float32)
    return jax.lax.cond(probe == probe, fn, fn, *args)


def _strided_tap(x: Array, row0: int, col0: int, rows: int, cols: int, stride: int) -> Array:
    """x[:, row0::stride, col0::stride] limited to rows x cols: what one kernel tap multiplies."""
    n, _, _, c = x.shape
    end = (n, row0 + (rows - 1) * stride + 1, col0 + (cols - 1) * stride + 1, c)
    return jax.lax.slice(x, (0, row0, col0, 0), end, (1, stride, stride, 1))


def depthwise_shift_forward(x: Array, kernel: Array, stride: int, padding: int, dilation: int) -> Array:
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


# Kernels at least this wide have their kernel gradient summed over whole images in one reduction
# (narrower ones over image rows first): the faster choice for MobileNetV3's layers.
_KERNEL_GRAD_IMAGE_SUM_MIN_SIZE = 5


def _sum_together(terms: tuple[Array, ...], axes: tuple[int, ...]) -> tuple[Array, ...]:
    """Each of ``terms`` summed over ``axes``, all in one reduction: one pass over their shared
    operands instead of one pass per term, and the terms' products stay inside the reduction."""
    zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
    return jax.lax.reduce(terms, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)), axes)


def depthwise_kernel_grad(
    x: Array, g: Array, kernel_size: tuple[int, int], stride: int, padding: int, dilation: int
) -> Array:
    """d(sum(depthwise(x, k) * g)) / dk, shape (kh, kw, 1, C).

    Autodiff's version writes every strided tap of x out in full (XLA:CPU hands each per-tap
    reduction to a YNNPACK fusion that needs its operand in memory); here all taps' products are
    summed in one multi-output reduction that reads x and g once, over each image (wide kernels) or
    each image row (narrow ones), and the small partial sums are reduced after.
    """
    kh, kw = kernel_size
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    _, out_h, out_w, c = g.shape
    acc_dtype = jnp.promote_types(g.dtype, jnp.float32)
    x, g = x.astype(acc_dtype), g.astype(acc_dtype)
    products = tuple(
        _strided_tap(x, i * dilation, j * dilation, out_h, out_w, stride) * g
        for i in range(kh)
        for j in range(kw)
    )
    axes = (1, 2) if min(kh, kw) >= _KERNEL_GRAD_IMAGE_SUM_MIN_SIZE else (2,)
    partial_sums = jnp.stack(_sum_together(products, axes), axis=-2)  # (N[, rows], kh*kw, C)
    return jnp.sum(partial_sums, axis=tuple(range(partial_sums.ndim - 2))).reshape(kh, kw, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_conv_shift(x: Array, kernel: Array, stride: int, padding: int, dilation: int) -> Array:
    """Depthwise conv as k*k shifted multiply-adds. x: NHWC, kernel: (kh, kw, 1, C).

    Both gradients are written by hand (the input gradient in ``_depthwise_shift_bwd``, the kernel
    gradient in ``depthwise_kernel_grad``) because XLA:CPU runs autodiff's versions slowly.
    """
    return depthwise_shift_forward(x, kernel, stride, padding, dilation)


def _depthwise_shift_fwd(x, kernel, stride, padding, dilation):
    return depthwise_shift_forward(x, kernel, stride, padding, dilation), (x, kernel)


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
    # g is stuffed and padded once (written out by XLA) and read k*k times, because autodiff's
    # transpose sums k*k padded products in one fusion that re-evaluates g's producer (BatchNorm's
    # backward) for every tap and output element.
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    low_h, low_w = (kh - 1) * dilation - padding, (kw - 1) * dilation - padding
    stuffed = _stuffed_padded(g, (kh, kw), x.shape[1:3], stride, padding, dilation)
    dx = depthwise_shift_forward(stuffed, kernel[::-1, ::-1], 1, 0, dilation)
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

    For atrous convs (ASPP rates 12/24/36) most taps read mostly padding, which XLA:CPU still
    multiplies through and this skips. Same sums, other order.
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def few_channel_conv_taps(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    """Dense conv with few input channels (the RGB stem) as kh*kw*Cin broadcast multiply-adds.

    XLA:CPU hands it to Eigen's im2col convolution, whose patch packing of a 3-channel input is
    most of its cost. Sums are accumulated in at least float32. Gradients are autodiff's of XLA's
    convolution (the training path is unchanged).
    """
    return _few_channel_taps_forward(x, kernel, stride, padding)


def _few_channel_taps_forward(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    # Its own buffer: fused into its consumers (the next block's padded depthwise input and its
    # residual add), XLA:CPU would evaluate the kh*kw*Cin products once per consumer.
    return own_buffers(lambda x, kernel: _few_channel_taps(x, kernel, stride, padding), x, kernel)


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
    """Sum as a balanced tree: rounding error grows with log2(len) instead of len, and independent
    adds run faster than a chain."""
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
