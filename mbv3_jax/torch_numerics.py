"""float32 arithmetic in the order torch's CPU kernels use, for bit-for-bit parity.

Quantization-aware training rounds activations to a grid after every layer: a value that differs
from torch's in its last bit can land on the other side of a rounding boundary and move a whole
quantization step. A parity model therefore needs torch's float32 results exactly, not to within
an ulp. This module reproduces, measured against torch 2.14 on an AVX2 CPU (see
tests/test_qat_parity.py):

* oneDNN convolutions: one fused multiply-add per product, in (kh, kw, input channel) order,
  1x1 convolutions in blocks of 128 input channels (each block summed from zero, or from the bias
  for the first, the block sums added in order); depthwise ones tap by tap;
* MKL's sgemm for ``F.linear`` with at least 4 rows: blocks of 192 (bias first, then each block's
  FMA chain added; two halves for sizes between 192 and 384);
* BatchNorm2d: batch statistics summed in double (emulated here with float-float pairs),
  ``1 / sqrt(var + eps)`` in double, output ``fma(x, alpha, fma(-mean, alpha, beta))``; running
  statistics updated in float / double as ``batch_norm_cpu_update_stats_template`` does;
* ``x.mean((2, 3))`` (adaptive average pooling to 1x1): torch's cascade sum over 8-wide vectors.

XLA needs two kinds of help to compute what torch computes: it contracts ``a + b * c`` into an
FMA (torch's elementwise kernels round the product first), and it rewrites a division by a
constant into a multiplication by the rounded reciprocal. ``rounded`` and ``divide`` prevent
both. Where torch does fuse (oneDNN, MKL, the vectorised BatchNorm), the code is written
``a * b + c`` and relies on XLA:CPU's contraction, which the parity tests check.

These orders are those of the kernels torch dispatches to on AVX2; AVX-512 builds of oneDNN /
MKL block differently.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# oneDNN's 1x1 convolution reduces over input channels in blocks of this size (AVX2, measured).
ONEDNN_1X1_BLOCK = 128
# MKL's sgemm (F.linear with >= 4 rows) reduces in blocks of this size (AVX2, measured).
MKL_SGEMM_BLOCK = 192
MKL_SGEMM_MIN_ROWS = 4


def _f32(x: Any) -> Array:
    return jnp.asarray(x, jnp.float32)


def _opaque_one(x: Array) -> Array:
    """1.0 (0.0 where x is NaN), which the compiler cannot fold."""
    return (x == x).astype(jnp.float32)


def rounded(product: Array) -> Array:
    """``product``, kept rounded to float32 where an add consumes it.

    XLA:CPU contracts ``a + b * c`` into one FMA (measured; ``optimization_barrier`` and
    ``reduce_precision`` are optimised away), torch's elementwise kernels round the product first.
    Times a 1.0 that the compiler cannot prove, a contraction, if any, is ``fma(product, 1, a)``:
    exact, so the sum is rounded from the rounded product, as in torch."""
    return product * _opaque_one(product)


def divide(x: Array, divisor: float) -> Array:
    """``x / divisor`` as a division: XLA rewrites a division by a constant into a multiplication
    by its rounded reciprocal (measured), which differs from torch's division in the last bit."""
    return x / (_f32(divisor) * _opaque_one(x))


def true_divide(x: Array, y: Array) -> Array:
    """``x / y`` elementwise, also when ``y`` is broadcast (per channel): XLA would otherwise
    multiply by the rounded reciprocal of the broadcast operand (measured)."""
    return x / (y * _opaque_one(x))


def reciprocal(x: Array) -> Array:
    """``1 / x`` as a division (not XLA's rsqrt / reciprocal rewrites of ``1 / sqrt(x)``).

    The divisor is kept from being a division itself: XLA rewrites ``a / (b / c)`` into
    ``(a * c) / b``, which turns ``reciprocal(reciprocal(x))`` into ``x``."""
    return _opaque_one(x) / rounded(x)


# ------------------------------------------------------------------------------------------------
# torch.sqrt on float32 CPU tensors: MKL's vsSqrt (VML, high-accuracy mode)
#
# On Intel CPUs MKL runs its AVX2 kernel, which is correctly rounded (jnp.sqrt). On other CPUs it
# runs its generic kernel (mkl_vml_kernel_sSqrt_EXHAynn, measured on AMD EPYC): rsqrtps, then
# Newton steps in SSE float arithmetic; 16% of results are 1 ulp from the correctly rounded root.
# rsqrtps is hardware-defined; on this AMD CPU it depends only on the exponent's parity and the
# top 12 mantissa bits (checked over all mantissas) and scales exactly by powers of 4. Its table:
# entries k * 2**-13 for x in [1, 2) (row 0, from k = 8191) and [2, 4) (row 1, from k = 5792),
# stored as the zlib-compressed, base64-encoded steps k[i] - k[i + 1] (0, 1 or 2) of each row.
_RSQRTPS_STEPS = (
    "eNrdlgkOwzAIBBf+/+hKvRx8UQrGbptGZLKDI1mRAtH9h0chpjkT+Xxy+l5GJ7/e44n7Sb67wp6jXKNhVvLVjGC/n4udEcxK"
    "vpoR7Nc5F7r+h2z1dzM0v5jdujrH4n61Pq/l/nzPCPaj846PpkyYjX42w+qTPEhhHJa7ffzXgW/7qv2og1Fu9bNz1bc0d5ic"
    "/bv5jfV2DBhGP3q9aB/izuv9KJyd7/CNLS7Ofp7OMvPW09bT+02DNSs5ggd5BPtNLkbi8oUYMRt9K2Nx/yh/FTaOnnzwKGxj"
    "8UW8hlNGcJ7t48/GWVhzZZDw5l4/ur/hzWMokvsnfmccXJ9n+21/4KzyAxVoX3w5F84ZRt/aj+T1cNh6Xt+8XuDav8h1hsXP"
    "RnJ/tJ+9XnTe+s/rwanl2f5p/ac/Tztv4CUP/w=="
)
_RSQRTPS_FIRST = (8191, 5792)


@functools.cache
def _rsqrtps_table() -> np.ndarray:
    import base64
    import zlib

    steps = np.frombuffer(zlib.decompress(base64.b64decode("".join(_RSQRTPS_STEPS))), np.uint8)
    steps = steps.astype(np.int64).reshape(2, 4095)
    k = np.concatenate([np.asarray(_RSQRTPS_FIRST)[:, None], -steps], axis=1).cumsum(axis=1)
    return (k * 2.0**-13).astype(np.float32).reshape(-1)


def rsqrtps(x: Array) -> Array:
    """x86 ``rsqrtps`` as this AMD CPU computes it, for positive normal float32 ``x``."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    exponent = ((bits >> 23) & 0xFF) - 127
    parity = exponent & 1
    index = parity * 4096 + ((bits >> 11) & 0xFFF)
    r = jnp.take(jnp.asarray(_rsqrtps_table()), index)
    half = (exponent - parity) // 2  # x = 4**half * y, y in [1, 4)
    return r * jax.lax.bitcast_convert_type((127 - half) << 23, jnp.float32)


def mkl_generic_sqrt(x: Array) -> Array:
    """MKL's generic vsSqrt kernel (non-Intel CPUs): every product rounded (SSE, no FMA).
    Zero, negative, subnormal, infinite and near-FLT_MAX inputs take MKL's rare path, here jnp.sqrt."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    special = (bits + jnp.int32(0x7F800000)) > jnp.int32(-16781312)  # the kernel's own test
    safe = jnp.where(special, _f32(1.0), x)
    r = rsqrtps(safe)
    s = rounded(safe * r)
    h = r * _f32(0.5)
    t = _f32(0.5) - rounded(s * h)
    s1 = rounded(s * t) + s
    h1 = rounded(h * t) + h
    e = safe - rounded(s1 * s1)
    return jnp.where(special, jnp.sqrt(x), rounded(e * h1) + s1)


@functools.cache
def cpu_vendor() -> str:
    """The host CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...; "" if unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def torch_sqrt(x: Array) -> Array:
    """``torch.sqrt`` of a float32 CPU tensor on this host: correctly rounded on Intel CPUs,
    MKL's generic kernel elsewhere (see ``mkl_generic_sqrt``)."""
    return jnp.sqrt(x) if cpu_vendor() == "GenuineIntel" else mkl_generic_sqrt(x)


# ------------------------------------------------------------------------------------------------
# Error-free transformations (no FMA needed: products split into 12-bit halves by masking)


def two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """``s + e == a + b`` exactly, ``s = fl(a + b)`` (Knuth; XLA does not reassociate adds)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def fast_two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """``two_sum`` for ``|a| >= |b|``."""
    s = a + b
    return s, b - (s - a)


def _split(a: Array) -> tuple[Array, Array]:
    hi = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFFF000), jnp.float32
    )
    return hi, a - hi


def two_prod(a: Array, b: Array) -> tuple[Array, Array]:
    """``p + e == a * b`` exactly, ``p = fl(a * b)`` (Dekker, with mask splitting: every partial
    product is exact, so an FMA contraction anywhere leaves the result unchanged)."""
    p = rounded(a * b)
    ah, al = _split(a)
    bh, bl = _split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def divide_pair(hi: Array, lo: Array, n: int) -> Array:
    """float32 ``(hi + lo) / n`` for a float-float pair and an integer ``0 < n < 2**24``, rounded
    once (what ``(float)(double_sum / n)`` gives, but for double rounding within 2**-53)."""
    q = divide(hi, n)
    p, pe = two_prod(q, _f32(n))
    r = ((hi - p) - pe) + lo
    return q + divide(r, n)


def accurate_sum(x: Array, axis: int | tuple[int, ...]) -> tuple[Array, Array]:
    """The sum of ``x`` over ``axis`` as a normalised float-float pair (hi = fl(hi + lo)), accurate
    to ~2**-44 of sum |x|: what torch's double accumulators give, once rounded to float32."""

    def combine(a, b):
        (ah, al), (bh, bl) = a, b
        s, e = two_sum(ah, bh)
        t, f = two_sum(al, bl)
        s, e = fast_two_sum(s, e + t)
        return fast_two_sum(s, e + f)

    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    zero = jnp.zeros((), x.dtype)
    return jax.lax.reduce((x, jnp.zeros_like(x)), (zero, zero), combine, axes)


# ------------------------------------------------------------------------------------------------
# BatchNorm2d (aten/src/ATen/native/cpu/batch_norm_kernel.cpp, Normalization.cpp)


def batch_norm_stats(x: Array) -> tuple[Array, Array]:
    """``batch_norm_cpu_collect_stats_contiguous_impl`` for NHWC ``x``: per-channel float32 mean
    (double sum / n) and var_sum (double sum of the float32 squares ``(x - mean)**2``)."""
    axes = tuple(range(x.ndim - 1))
    n = math.prod(x.shape[a] for a in axes)
    mean = divide_pair(*accurate_sum(x, axes), n)
    d = x - mean
    hi, lo = accurate_sum(rounded(d * d), axes)
    return mean, hi


def inv_std_double(var: Array, eps: float) -> Array:
    """float32 ``1 / sqrt((double)var + eps)`` evaluated in double (torch's ``InvStd<double>``),
    via one Newton step on float-float residuals."""
    eps_hi = np.float32(eps)
    eps_lo = np.float32(eps - float(eps_hi))
    th, tl = two_sum(var, _f32(eps_hi))
    tl = tl + _f32(eps_lo)
    y0 = reciprocal(jnp.sqrt(th))
    a, ae = two_prod(y0, y0)
    b, be = two_prod(th, a)
    rho = (((_f32(1.0) - b) - be) - rounded(th * ae)) - rounded(tl * a)
    return y0 + rounded(rounded(y0 * rho) * _f32(0.5))


def batch_norm_train_affine(
    x: Array, weight: Array, bias: Array, eps: float
) -> tuple[Array, Array, Array, Array]:
    """Training-mode BatchNorm2d's (alpha, beta, mean, var_sum) over the leading axes of ``x``;
    the output is ``x * alpha + beta`` (one FMA in torch's vectorised loop)."""
    n = math.prod(x.shape[:-1])
    mean, var_sum = batch_norm_stats(x)
    inv_std = inv_std_double(divide(var_sum, n), eps)
    alpha = inv_std * weight
    beta = bias - mean * alpha  # one FMA in torch
    return alpha, beta, mean, var_sum


def batch_norm_eval_affine(
    weight: Array, bias: Array, running_mean: Array, running_var: Array, eps: float
) -> tuple[Array, Array]:
    """Eval-mode BatchNorm2d's (alpha, beta): ``1 / sqrt(var + eps)`` in float32."""
    inv_std = reciprocal(jnp.sqrt(running_var + _f32(eps)))
    alpha = inv_std * weight
    return alpha, bias - running_mean * alpha


def batch_norm_running_stats(
    running_mean: Array, running_var: Array, mean: Array, var_sum: Array, n: int, momentum: float
) -> tuple[Array, Array]:
    """``batch_norm_cpu_update_stats_template``: ``m * mean + (1 - m) * rm`` in float32,
    ``m * unbiased + (1 - m) * rv`` with the first product exact (double) and the sum rounded once."""
    m = np.float32(momentum)
    keep = np.float32(1) - m
    new_mean = rounded(_f32(m) * mean) + rounded(_f32(keep) * running_mean)
    unbiased = divide(var_sum, n - 1)
    ph, pl = two_prod(_f32(m), unbiased)
    s, e = two_sum(ph, rounded(_f32(keep) * running_var))
    return new_mean, s + (e + pl)


# ------------------------------------------------------------------------------------------------
# Spatial mean: x.mean((2, 3)) on NCHW (aten/src/ATen/native/cpu/SumKernel.cpp cascade sum)


def _ceil_log2(v: int) -> int:
    return 0 if v <= 1 else (v - 1).bit_length()


def _multi_row_sum(load: Callable[[int, int], Array], nrows: int, size: int) -> list[Array]:
    """``multi_row_sum``: ``nrows`` interleaved accumulators, summed in levels of 2**level_power."""
    num_levels = 4
    level_power = max(4, _ceil_log2(size) // num_levels)
    level_step = 1 << level_power
    level_mask = level_step - 1
    acc: list[list[Array | None]] = [[None] * nrows for _ in range(num_levels)]

    def add(a: Array | None, b: Array | None) -> Array | None:
        if a is None:
            return b
        return a if b is None else a + b

    i = 0
    while i + level_step <= size:
        for _ in range(level_step):
            for k in range(nrows):
                acc[0][k] = add(acc[0][k], load(i, k))
            i += 1
        for j in range(1, num_levels):
            for k in range(nrows):
                acc[j][k] = add(acc[j][k], acc[j - 1][k])
                acc[j - 1][k] = None
            if i & (level_mask << (j * level_power)):
                break
    while i < size:
        for k in range(nrows):
            acc[0][k] = add(acc[0][k], load(i, k))
        i += 1
    for j in range(1, num_levels):
        for k in range(nrows):
            acc[0][k] = add(acc[0][k], acc[j][k])
    return acc[0]  # type: ignore[return-value]


def _row_sum(load: Callable[[int], Array], size: int) -> Array | None:
    """``row_sum``: four interleaved partial sums (ilp), the leftovers into the first."""
    ilp = 4
    size_ilp = size // ilp
    partial = _multi_row_sum(lambda i, k: load(i * ilp + k), ilp, size_ilp)
    for i in range(size_ilp * ilp, size):
        partial[0] = load(i) if partial[0] is None else partial[0] + load(i)
    total = partial[0]
    for k in range(1, ilp):
        if partial[k] is not None:
            total = partial[k] if total is None else total + partial[k]
    return total


def spatial_sum(x: Array) -> Array:
    """``x.sum((2, 3))`` of torch's NCHW layout, for NHWC ``x``: (N, C). The H*W values of a
    channel are contiguous in NCHW; torch's vectorised inner sum runs 8-wide vectors (AVX2)
    through ``row_sum`` and adds the tail, then the 8 lanes, to a scalar."""
    n_, h, w, c = x.shape
    size = h * w
    rows = x.reshape(n_, size, c)
    lanes = 8
    if size < lanes:
        total = _row_sum(lambda i: rows[:, i], size)
        return total if total is not None else jnp.zeros((n_, c), x.dtype)
    vec_size = size // lanes
    vec = _row_sum(lambda i: rows[:, i * lanes : (i + 1) * lanes], vec_size)
    final = None
    for k in range(vec_size * lanes, size):
        final = rows[:, k] if final is None else final + rows[:, k]
    for lane in range(lanes):
        final = vec[:, lane] if final is None else final + vec[:, lane]
    return final


def spatial_mean(x: Array) -> Array:
    """``x.mean((2, 3))`` (what ``adaptive_avg_pool2d(x, 1)`` runs): the cascade sum / (H*W)."""
    return divide(spatial_sum(x), x.shape[1] * x.shape[2])


# ------------------------------------------------------------------------------------------------
# Convolution / linear in oneDNN's and MKL's order (values only: mbv3_jax.models.qat takes their
# gradients from XLA's own convolution / dot)


def _zeros(like: Array, shape: tuple[int, ...]) -> Array:
    """Zeros the compiler cannot fold: an FMA chain must start with ``fma(x0, w0, 0)``. From a
    constant zero, XLA drops the add, and ``x0 * w0 + x1 * w1`` may then contract either product
    (measured: it contracts the first, torch the second)."""
    return jnp.broadcast_to(like * _f32(0.0), shape)


def blocked_matmul(xs: Array, ws: Array, bias: Array | None, block: int, bias_first_block: bool) -> Array:
    """A (M, K) x (K, O) product reduced in blocks of ``block``: each block an FMA chain from zero
    (from the bias for the first block if ``bias_first_block``), block sums added in order; else
    the bias is the starting value of that running sum (MKL).

    One loop runs all blocks side by side (a fori_loop: it compiles in half the time of a scan);
    the last block is padded with zero products, which leave an FMA chain unchanged."""
    m, k = xs.shape
    o = ws.shape[1]
    width = min(block, k)
    blocks = -(-k // width)
    pad = blocks * width - k
    if pad:
        xs = jnp.pad(xs, ((0, 0), (0, pad)))
        ws = jnp.pad(ws, ((0, pad), (0, 0)))
    xb = xs.reshape(m, blocks, width).transpose(2, 1, 0)  # (width, blocks, M)
    wb = ws.reshape(blocks, width, o).transpose(1, 0, 2)  # (width, blocks, O)
    init = _zeros(xs[:1, :1], (blocks, m, o))
    if bias is not None and bias_first_block:
        init = init.at[0].set(jnp.broadcast_to(bias, (m, o)).astype(xs.dtype))

    def body(step, acc):
        xk = jax.lax.dynamic_index_in_dim(xb, step, keepdims=False)
        wk = jax.lax.dynamic_index_in_dim(wb, step, keepdims=False)
        return acc + xk[:, :, None] * wk[:, None, :]

    parts = jax.lax.fori_loop(0, width, body, init)
    total = jnp.broadcast_to(bias, (m, o)) if bias is not None and not bias_first_block else None
    for i in range(blocks):
        total = parts[i] if total is None else total + parts[i]
    return total


def _taps(x: Array, kh: int, kw: int, stride: int, padding: int) -> tuple[list[Array], int, int]:
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    n, h, w, c = x.shape
    out_h = (h - kh) // stride + 1
    out_w = (w - kw) // stride + 1
    taps = [
        jax.lax.slice(
            x,
            (0, i, j, 0),
            (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
            (1, stride, stride, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return taps, out_h, out_w


def onednn_conv(
    x: Array, kernel: Array, bias: Array | None, *, stride: int, padding: int, groups: int
) -> Array:
    """torch's CPU ``F.conv2d`` (oneDNN, AVX2) for NHWC ``x`` and an HWIO kernel: depthwise,
    1x1 stride-1, or dense with at most 128 input channels (what MobileNetV3 has)."""
    kh, kw, cin_g, cout = kernel.shape
    cin = x.shape[-1]
    if groups == cin == cout and cin_g == 1:
        taps, _, _ = _taps(x, kh, kw, stride, padding)
        acc = _zeros(taps[0], taps[0].shape) if bias is None else jnp.broadcast_to(bias, taps[0].shape)
        for t, tap in enumerate(taps):
            acc = acc + tap * kernel[t // kw, t % kw, 0]
        return acc
    if groups != 1:
        raise NotImplementedError(f"grouped convolution (groups={groups}) is not modelled")
    if kh == kw == 1 and stride == 1 and padding == 0:
        n, h, w, _ = x.shape
        y = blocked_matmul(x.reshape(-1, cin), kernel[0, 0], bias, ONEDNN_1X1_BLOCK, True)
        return y.reshape(n, h, w, cout)
    if cin > ONEDNN_1X1_BLOCK:
        raise NotImplementedError("dense KxK convolutions over more than 128 channels are not modelled")
    taps, out_h, out_w = _taps(x, kh, kw, stride, padding)
    n = x.shape[0]
    shape = (n, out_h, out_w, cout)
    acc = _zeros(taps[0][..., :1], shape) if bias is None else jnp.broadcast_to(bias, shape)
    for t, tap in enumerate(taps):
        for ch in range(cin):
            acc = acc + tap[..., ch : ch + 1] * kernel[t // kw, t % kw, ch]
    return acc


def mkl_linear(x: Array, kernel: Array, bias: Array | None) -> Array:
    """torch's CPU ``F.linear`` (MKL sgemm, AVX2) for (M, in) ``x`` and an (in, out) kernel, M >= 4.

    Measured blocking of the reduction: one block up to 192, two equal halves below 384 (even
    sizes), blocks of 192 from 384 on (the remainder last). Odd sizes above 192 block otherwise."""
    k = x.shape[1]
    if x.shape[0] < MKL_SGEMM_MIN_ROWS:
        raise NotImplementedError(f"MKL's order for fewer than {MKL_SGEMM_MIN_ROWS} rows is not modelled")
    if k > MKL_SGEMM_BLOCK and k % 2:
        raise NotImplementedError(
            f"MKL's order for an odd reduction size {k} > {MKL_SGEMM_BLOCK} is not modelled"
        )
    block = k // 2 if MKL_SGEMM_BLOCK < k < 2 * MKL_SGEMM_BLOCK else MKL_SGEMM_BLOCK
    return blocked_matmul(x, kernel, bias, block, False)
