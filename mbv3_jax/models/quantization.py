"""torchvision's quantized MobileNetV3-Large (``models/quantization/mobilenetv3.py``) as an integer
inference model in JAX/Flax NNX, NHWC.

What torch's eager-mode ``convert`` produces, op for op: the float input is quantized to uint8
(``QuantStub``), every Conv2dNormActivation is one quantized conv (BatchNorm folded, ReLU fused as a
clamp at the output zero point), hardswish / hardsigmoid / adaptive average pooling / the SE
multiply / the residual add are quantized ops with their own output scale and zero point, and the
logits are dequantized at the end. Weights are int8 per-tensor (symmetric), activations uint8,
dense products accumulate in int32 (int8 x int8 dots with ``preferred_element_type``: a 1x1 conv
over 960 channels can exceed 2**24); depthwise sums (<= 25 terms) are exact in float32.

The requantization arithmetic follows one of torch's quantized engines, chosen by ``backend``:

* ``"qnnpack"`` (default: torchvision's published quantized weights are QNNPACK ones, its meta
  ``backend``): conv / linear bias quantized to int32 with scale ``s_in * s_w``, the int32 sum times
  ``(s_in * s_w) * (1 / s_out)`` in float32, rounded half to even; residual add in QNNPACK's
  fixed-point arithmetic (rounding half away from zero); average pooling scaled by
  ``s_in / (s_out * n)``.
* ``"x86"`` / ``"fbgemm"`` (FBGEMM kernels): float bias added after the int32 sum as
  ``bias * (1 / (s_in * s_w))``, scaled by ``(s_in * s_w) / s_out``; residual add dequantizes,
  adds in float32 and requantizes; average pooling scaled by ``1 / (1 / ((s_in / s_out) / n))``.
* ``"x86_vnni"``: torch's x86 engine on a CPU with AVX512-VNNI (Linux), which packs every conv
  with at most 100 groups and symmetric weights for oneDNN (``should_use_onednn_quant``): those
  convs follow oneDNN's output stage (``_onednn_requantize``), the rest (depthwise convs with more
  groups, the linears, add, pooling) FBGEMM's as ``"x86"``.
* ``"x86_amx"``: as ``"x86_vnni"`` on a CPU with AMX-INT8, where oneDNN runs the dense convs on its
  AMX kernels, which multiply the int32 sum by one precomputed scale ``s_in * s_w``
  (``_onednn_requantize`` with ``combined_scales``); its depthwise convs scale as on ``"x86_vnni"``.
  ``porting.torchvision_io.x86_backend_here()`` tells which of these torch runs on this CPU.

Hardswish, hardsigmoid (fixed output scale 1/256, zero point 0) and the SE multiply compute the
same function on both engines. Every float32 step is written in torch's operation order, so that
every op's uint8 output equals torch's (tests/test_quantized_parity.py compares them).

Limits of the "x86" parity, both torch's: without AVX512-VNNI, FBGEMM multiplies uint8 x int8 with
vpmaddubsw, whose int16 pair sums saturate on full-range activations, so a model calibrated with
the qnnpack qconfig (8-bit activations) is not integer arithmetic on the x86 engine (figures in
docs/performance.md); with 7-bit activations (``reduce_range``, torch's x86 qconfig) it is, and this
model matches it. (oneDNN's VNNI kernels accumulate in int32 without saturating.)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax import torch_numerics as tn
from mbv3_jax.backend import eval_micro_batches, integer_depthwise_conv, unfused
from mbv3_jax.models.backbone import (
    BlockConfig,
    Chain,
    InvertedResidual,
    build_features,
    check_builder_args,
    check_images,
    features_out_channels,
    mobilenet_v3_config,
    table_architecture,
)
from mbv3_jax.models.mobilenetv3 import CPU_EVAL_MICRO_BATCH
from mbv3_jax.runtime import Model, Module, call_compiled

Array = jax.Array

BACKENDS = ("qnnpack", "x86", "fbgemm", "x86_vnni", "x86_amx")
# torch's x86 engine on an AVX512-VNNI CPU (Linux) packs convs with at most this many groups and
# symmetric weights for oneDNN instead of FBGEMM (``should_use_onednn_quant``).
ONEDNN_MAX_GROUPS = 100
# torch's fixed output quantization of a quint8 hardsigmoid (both engines).
HARDSIGMOID_SCALE = 1.0 / 256.0
HARDSIGMOID_ZERO_POINT = 0
# The largest float32 below 2**31 (clamps before a float -> int32 conversion).
_INT32_FLOAT_MAX = 2147483520.0


class QArray(NamedTuple):
    """A per-tensor affine quantized tensor: ``real = scale * (values - zero_point)``."""

    values: Array  # uint8
    scale: Array  # float32 scalar
    zero_point: Array  # int32 scalar

    def dequantize(self) -> Array:
        return (self.values.astype(jnp.int32) - self.zero_point).astype(jnp.float32) * self.scale


# ------------------------------------------------------------------------------------------------
# Arithmetic (float32 steps in torch's order; jnp.round rounds half to even like nearbyint/cvtps2dq)


def _f32(x: Any) -> Array:
    return jnp.asarray(x, jnp.float32)


def _to_uint8(rounded: Array, zero_point: Array, low: Array | int = 0) -> Array:
    """``clamp(rounded + zero_point, low, 255)`` as uint8; ``rounded`` holds float32 integers.

    Clamping before the int conversion (rounding is monotonic) keeps huge values from overflowing.
    """
    zp = zero_point.astype(jnp.float32)
    q = jnp.clip(rounded, _f32(low) - zp, 255.0 - zp).astype(jnp.int32) + zero_point
    return q.astype(jnp.uint8)


def quantize(x: Array, scale: Array, zero_point: Array) -> QArray:
    """torch.quantize_per_tensor to quint8 (FBGEMM's Quantize: ``round(x * (1 / s)) + zp``)."""
    inv = _f32(1.0) / scale
    return QArray(_to_uint8(jnp.round(x.astype(jnp.float32) * inv), zero_point), scale, zero_point)


def requantize_accumulator(
    acc: Array,
    bias: Array | None,
    in_scale: Array,
    weight_scale: Array,
    out_scale: Array,
    out_zero_point: Array,
    relu: bool,
    backend: str,
) -> QArray:
    """int32 conv / linear sums (channels last) -> uint8, as the engine's output stage does."""
    act_times_w = in_scale * weight_scale
    if backend in ("onednn", "onednn_combined_scales"):
        return _onednn_requantize(
            acc,
            bias,
            in_scale,
            weight_scale,
            out_scale,
            out_zero_point,
            relu,
            combined_scales=backend == "onednn_combined_scales",
        )
    if backend == "qnnpack":
        # QuantizeBias: quantize_per_tensor(bias, s_in * s_w, 0, qint32); requantization scale
        # (s_w * s_in) * (1 / s_out) (generate_requantization_scales); int32 sum * scale, rounded.
        if bias is not None:
            qbias = jnp.round(bias * (_f32(1.0) / act_times_w))
            acc = acc + jnp.clip(qbias, -_INT32_FLOAT_MAX, _INT32_FLOAT_MAX).astype(jnp.int32)
        multiplier = act_times_w * (_f32(1.0) / out_scale)
        scaled = acc.astype(jnp.float32) * multiplier
    else:
        # FBGEMM ReQuantizeOutput with a float bias: (float(acc) + bias * (1 / (s_in * s_w))) times
        # multiplier = (s_in * s_w) / s_out (a division here, not a reciprocal).
        multiplier = act_times_w / out_scale
        total = acc.astype(jnp.float32)
        if bias is not None:
            total = total + bias * (_f32(1.0) / act_times_w)
        scaled = total * multiplier
    low = out_zero_point if relu else 0
    return QArray(_to_uint8(jnp.round(scaled), out_zero_point, low), out_scale, out_zero_point)


def _onednn_requantize(
    acc: Array,
    bias: Array | None,
    in_scale: Array,
    weight_scale: Array,
    out_scale: Array,
    out_zero_point: Array,
    relu: bool,
    *,
    combined_scales: bool = False,
) -> QArray:
    """oneDNN's int8 convolution output stage as torch's x86 engine runs it: the float32 sum times
    the scales, plus the float bias, ReLU, times ``1 / s_out``, plus the zero point, saturated and
    rounded half to even; each product rounded before the add that follows (no FMA). The scales come
    in one of two forms, each the one that reproduces torch's output on its CPUs: times ``s_in`` then
    times ``s_w`` (AVX512-VNNI kernels), or, with ``combined_scales`` (AMX kernels), times one
    precomputed ``(1 / (1 / s_in)) * s_w`` (torch hands oneDNN ``1 / s_in``, which inverts it)."""
    acc = acc.astype(jnp.float32)
    if combined_scales:
        y = acc * (tn.reciprocal(tn.reciprocal(in_scale)) * weight_scale)
    else:
        y = acc * in_scale * weight_scale
    y = tn.rounded(y)
    if bias is not None:
        y = y + bias
    if relu:
        y = jnp.maximum(y, _f32(0.0))
    y = tn.rounded(y * tn.reciprocal(out_scale)) + out_zero_point.astype(jnp.float32)
    return QArray(jnp.round(jnp.clip(y, 0.0, 255.0)).astype(jnp.uint8), out_scale, out_zero_point)


def _conv_requantization(backend: str, groups: int, in_channels: int) -> str:
    """Whose output stage a conv follows: on the oneDNN backends, convs with at most
    ONEDNN_MAX_GROUPS groups are oneDNN's, and on AMX its dense convs combine the scales."""
    if backend not in ("x86_vnni", "x86_amx") or groups > ONEDNN_MAX_GROUPS:
        return backend
    depthwise = groups > 1 and groups == in_channels
    return "onednn_combined_scales" if backend == "x86_amx" and not depthwise else "onednn"


def integer_conv(x: QArray, kernel: Array, *, stride: int, padding: int, dilation: int, groups: int) -> Array:
    """``sum((x - zp) * w)`` in int32 for an int8 HWIO kernel; padding reads as the zero point.

    Dense convs run int8 x int8 -> int32: x - 128 fits int8 exactly, and the difference to x - zp
    is a per-output-channel constant, (128 - zp) * sum(w) (the padded border holds zp too).
    Depthwise convs run in float32 on x - zp (``mbv3_jax.backend.integer_depthwise_conv``): each
    term is at most 255 * 128 in magnitude, so with k*k <= 25 terms every partial sum is an integer
    below 2**24, exact in any order.
    """
    values, zp = x.values, x.zero_point
    kh, kw, cin_g, cout = kernel.shape
    if groups > 1 and groups == cout and cin_g == 1:
        xc = values.astype(jnp.float32) - zp.astype(jnp.float32)
        return integer_depthwise_conv(xc, kernel, stride=stride, padding=padding, dilation=dilation)
    # uint8 -> int8 by flipping the top bit: v - 128.
    centered = (values.astype(jnp.int32) - 128).astype(jnp.int8)
    correction = (128 - zp) * jnp.sum(kernel.astype(jnp.int32), axis=(0, 1, 2))
    if kh == kw == 1 and stride == 1 and groups == 1 and padding == 0:
        n, h, w, c = centered.shape
        acc = jax.lax.dot_general(
            centered.reshape(n * h * w, c),
            kernel[0, 0],
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.int32,
        ).reshape(n, h, w, cout)
        return acc + correction
    if padding:
        pad_value = (zp - 128).astype(jnp.int8)
        centered = jnp.pad(
            centered, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=pad_value
        )
    if groups == 1:
        # im2col + one int8 dot: portable where integer convolutions are not (cuDNN has no int32
        # output convolution for arbitrary channel counts); the stem conv has 3 input channels.
        patches = _patches(centered, kh, kw, stride, dilation)
        n, oh, ow, k = patches.shape
        acc = jax.lax.dot_general(
            patches.reshape(n * oh * ow, k),
            kernel.reshape(k, cout),
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.int32,
        ).reshape(n, oh, ow, cout)
        return acc + correction
    acc = jax.lax.conv_general_dilated(
        centered,
        kernel,
        window_strides=(stride, stride),
        padding="VALID",
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        preferred_element_type=jnp.int32,
    )
    return acc + correction


def _patches(x: Array, kh: int, kw: int, stride: int, dilation: int) -> Array:
    """(N, OH, OW, kh*kw*C) windows of an (already padded) NHWC tensor, in HWIO kernel order."""
    n, h, w, c = x.shape
    out_h = (h - dilation * (kh - 1) - 1) // stride + 1
    out_w = (w - dilation * (kw - 1) - 1) // stride + 1
    taps = [
        jax.lax.slice(
            x,
            (0, i * dilation, j * dilation, 0),
            (n, i * dilation + (out_h - 1) * stride + 1, j * dilation + (out_w - 1) * stride + 1, c),
            (1, stride, stride, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(taps, axis=-1)


def integer_linear(x: QArray, kernel: Array) -> Array:
    """``sum((x - zp) * w)`` in int32 for (N, in) uint8 and an int8 (in, out) kernel."""
    centered = (x.values.astype(jnp.int32) - 128).astype(jnp.int8)
    acc = jax.lax.dot_general(centered, kernel, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return acc + (128 - x.zero_point) * jnp.sum(kernel.astype(jnp.int32), axis=0)


def _dequantize_levels(x: QArray) -> Array:
    """``s * (q - zp)`` in float32, per element: the dequantized value each uint8 level stands for."""
    return x.scale * (x.values.astype(jnp.int32) - x.zero_point).astype(jnp.float32)


# Per element rather than as QNNPACK's 256-entry lookup tables (each entry is the same float32
# formula, so results are identical), because XLA:CPU fuses the arithmetic into the producing conv's
# vectorized loop, where a table gather would keep that loop scalar.
def hardswish(x: QArray, out_scale: Array, out_zero_point: Array) -> QArray:
    """quantized::hardswish. QNNPACK builds a table of ``x * clamp(x + 3, 0, 6) / 6`` then
    ``(1 / s_out) * y + zp`` clamped and rounded; torch's x86 kernel evaluates the same float
    formula per element (its dequantize uses an FMA; the outputs agree, see docs/performance.md)."""
    v = _dequantize_levels(x)
    y = (v * jnp.clip(v + 3.0, 0.0, 6.0)) / 6.0
    scaled = (_f32(1.0) / out_scale) * y + out_zero_point.astype(jnp.float32)
    values = jnp.round(jnp.clip(scaled, 0.0, 255.0)).astype(jnp.uint8)
    return QArray(values, out_scale, out_zero_point)


def hardsigmoid(x: QArray) -> QArray:
    """quantized hardsigmoid with torch's fixed output qparams (1/256, 0)."""
    v = _dequantize_levels(x)
    y = jnp.clip(v + 3.0, 0.0, 6.0) / 6.0
    values = jnp.round(jnp.clip(_f32(256.0) * y, 0.0, 255.0)).astype(jnp.uint8)
    return QArray(values, _f32(HARDSIGMOID_SCALE), jnp.asarray(HARDSIGMOID_ZERO_POINT, jnp.int32))


def multiply(a: QArray, b: QArray, out_scale: Array, out_zero_point: Array) -> QArray:
    """quantized::mul (both engines): integer product times ``s_a * s_b * (1 / s_out)``, rounded."""
    prod = (a.values.astype(jnp.int32) - a.zero_point) * (b.values.astype(jnp.int32) - b.zero_point)
    multiplier = (a.scale * b.scale) * (_f32(1.0) / out_scale)
    scaled = prod.astype(jnp.float32) * multiplier
    return QArray(_to_uint8(jnp.round(scaled), out_zero_point), out_scale, out_zero_point)


def _qnnpack_add_params(a_scale: Array, b_scale: Array, out_scale: Array) -> tuple[Array, Array, Array]:
    """pytorch_qnnp_compute_add_quantization_params (x86): multipliers in [0, 2**22) and a shift."""
    a_ratio = a_scale / out_scale
    b_ratio = b_scale / out_scale
    max_ratio = jnp.maximum(a_ratio, b_ratio)
    exponent = (jax.lax.bitcast_convert_type(max_ratio, jnp.int32) >> 23) - 127
    shift = 21 - exponent
    # 2**shift as a float32 built from its exponent bits, exactly as QNNPACK does.
    scale_multiplier = jax.lax.bitcast_convert_type((shift + 127) << 23, jnp.float32)
    a_mult = jnp.round(a_ratio * scale_multiplier).astype(jnp.int32)
    b_mult = jnp.round(b_ratio * scale_multiplier).astype(jnp.int32)
    return a_mult, b_mult, shift


def add(a: QArray, b: QArray, out_scale: Array, out_zero_point: Array, backend: str) -> QArray:
    """quantized::add of two equally shaped tensors."""
    if backend == "qnnpack":
        # QNNPACK q8vadd: a * m_a + b * m_b - (za * m_a + zb * m_b), arithmetic shift right with
        # rounding half away from zero, plus the output zero point, clamped.
        a_mult, b_mult, shift = _qnnpack_add_params(a.scale, b.scale, out_scale)
        acc = (a.values.astype(jnp.int32) - a.zero_point) * a_mult + (
            b.values.astype(jnp.int32) - b.zero_point
        ) * b_mult
        mask = (jnp.int32(1) << shift) - 1
        remainder = (acc & mask) - (acc < 0).astype(jnp.int32)
        y = (acc >> shift) + (remainder > (mask >> 1)).astype(jnp.int32) + out_zero_point
        return QArray(jnp.clip(y, 0, 255).astype(jnp.uint8), out_scale, out_zero_point)
    # torch's generic qadd kernel: dequantize both, add in float32, quantize with 1 / s_out.
    c = a.dequantize() + b.dequantize()
    scaled = c * (_f32(1.0) / out_scale)
    return QArray(_to_uint8(jnp.round(scaled), out_zero_point), out_scale, out_zero_point)


def global_average_pool(x: QArray, backend: str) -> QArray:
    """adaptive_avg_pool2d(x, 1) on a quantized NHWC tensor; the output keeps x's qparams."""
    n_pixels = x.values.shape[1] * x.values.shape[2]
    acc = jnp.sum(x.values.astype(jnp.int32), axis=(1, 2), keepdims=True) - x.zero_point * n_pixels
    if backend == "qnnpack":
        # QNNPACK average pooling: int32 sum of (x - zp) times s_in / (s_out * n).
        multiplier = x.scale / (x.scale * _f32(n_pixels))
    else:
        # torch's NHWC kernel: multiplier = s_in / s_out / n, quantized through
        # quantize_vec(1 / multiplier), which multiplies by 1 / (1 / multiplier).
        multiplier = _f32(1.0) / (_f32(1.0) / ((x.scale / x.scale) / _f32(n_pixels)))
    scaled = acc.astype(jnp.float32) * multiplier
    return QArray(_to_uint8(jnp.round(scaled), x.zero_point), x.scale, x.zero_point)


# ------------------------------------------------------------------------------------------------
# Modules. Variables: int8 kernels (HWIO / (in, out)), float32 bias and per-tensor weight scale as
# parameters; each op's output scale / zero point as BatchStat (they are buffers in torch). The
# engine whose rounding an op follows is fixed when the model is built.


# Variables are made on the host: jnp.zeros would compile one small program per shape.
def _scalar(value: float, dtype: Any) -> Array:
    return jnp.asarray(np.asarray(value, dtype=np.dtype(dtype)))


def _zeros(shape: tuple[int, ...], dtype: Any) -> Array:
    return jnp.asarray(np.zeros(shape, dtype=np.dtype(dtype)))


# The list ``quantized_intermediates`` collects (name, uint8 values) into while a forward pass is
# traced; None otherwise.
_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("mbv3_int8_trace", default=None)


@contextlib.contextmanager
def _recording() -> Iterator[list]:
    trace: list = []
    token = _RECORDING.set(trace)
    try:
        yield trace
    finally:
        _RECORDING.reset(token)


def _record(name: str, y: QArray) -> QArray:
    trace = _RECORDING.get()
    if trace is not None:
        trace.append((name, y.values))
    return y


class QuantStub(Module):
    """torch's ``Quantize`` module: float -> quint8 with a calibrated scale / zero point."""

    def __init__(self, name: str = "quant"):
        self.name = name
        self.scale = nnx.BatchStat(_scalar(1.0, np.float32))
        self.zero_point = nnx.BatchStat(_scalar(0, np.int32))

    def __call__(self, x: Array) -> QArray:
        return _record(self.name, quantize(x, self.scale[...], self.zero_point[...]))


class OutputQParams(Module):
    """An op whose only state is its output scale / zero point (hardswish, add, mul)."""

    def __init__(self, name: str):
        self.name = name
        self.scale = nnx.BatchStat(_scalar(1.0, np.float32))
        self.zero_point = nnx.BatchStat(_scalar(0, np.int32))

    def qparams(self) -> tuple[Array, Array]:
        return self.scale[...], self.zero_point[...]


class QHardswish(OutputQParams):
    """torch.ao.nn.quantized.Hardswish."""

    def op_names(self) -> list[str]:
        return [self.name]

    def __call__(self, x: QArray) -> QArray:
        return _record(self.name, hardswish(x, *self.qparams()))


class QFloatFunctional(OutputQParams):
    """torch.ao.nn.quantized.QFunctional: ``skip_add`` (the residual, in ``backend``'s arithmetic)."""

    def __init__(self, name: str, backend: str):
        super().__init__(name)
        self.backend = backend

    def add(self, x: QArray, y: QArray) -> QArray:
        return _record(self.name, add(x, y, *self.qparams(), self.backend))


class QConv2d(Module):
    """torch.ao.nn.quantized.Conv2d / ConvReLU2d (conv + folded BatchNorm, optional fused ReLU)."""

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
        relu: bool = False,
        backend: str,
        name: str,
    ):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
        self.name = name
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.relu = groups, relu
        self.requantization = _conv_requantization(backend, groups, in_channels)
        shape = (kernel_size, kernel_size, in_channels // groups, out_channels)
        self.kernel = nnx.Param(_zeros(shape, np.int8))
        self.weight_scale = nnx.Param(_scalar(1.0, np.float32))
        self.bias = nnx.Param(_zeros((out_channels,), np.float32))
        self.scale = nnx.BatchStat(_scalar(1.0, np.float32))
        self.zero_point = nnx.BatchStat(_scalar(0, np.int32))

    def op_names(self) -> list[str]:
        return [self.name]

    def __call__(self, x: QArray) -> QArray:
        acc = integer_conv(
            x,
            self.kernel[...],
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )
        y = requantize_accumulator(
            acc,
            self.bias[...],
            x.scale,
            self.weight_scale[...],
            self.scale[...],
            self.zero_point[...],
            self.relu,
            self.requantization,
        )
        return _record(self.name, y)


class QLinear(Module):
    """torch.ao.nn.quantized.Linear: int8 (in, out) kernel, float32 bias."""

    def __init__(self, in_features: int, out_features: int, *, backend: str, name: str):
        self.name = name
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.kernel = nnx.Param(_zeros((in_features, out_features), np.int8))
        self.weight_scale = nnx.Param(_scalar(1.0, np.float32))
        self.bias = nnx.Param(_zeros((out_features,), np.float32))
        self.scale = nnx.BatchStat(_scalar(1.0, np.float32))
        self.zero_point = nnx.BatchStat(_scalar(0, np.int32))

    def op_names(self) -> list[str]:
        return [self.name]

    def __call__(self, x: QArray) -> QArray:
        acc = integer_linear(x, self.kernel[...])
        y = requantize_accumulator(
            acc,
            self.bias[...],
            x.scale,
            self.weight_scale[...],
            self.scale[...],
            self.zero_point[...],
            False,
            self.backend,
        )
        return _record(self.name, y)


class QConvNormActivation(Module):
    """A converted Conv2dNormActivation: ``conv`` (torch ``.0``) and optional hardswish (``.2``);
    a ReLU is fused into the conv (``ConvReLU2d``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        activation: str | None,
        backend: str,
        name: str,
    ):
        if activation not in (None, "relu", "hardswish"):
            raise ValueError(f"activation must be None, 'relu' or 'hardswish', got {activation!r}")
        self.conv = QConv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2 * dilation,
            dilation=dilation,
            groups=groups,
            relu=activation == "relu",
            backend=backend,
            name=f"{name}.0",
        )
        self.act = QHardswish(f"{name}.2") if activation == "hardswish" else None

    def op_names(self) -> list[str]:
        return self.conv.op_names() + ([] if self.act is None else self.act.op_names())

    def __call__(self, x: QArray) -> QArray:
        if _RECORDING.get() is None and (self.act is not None or self.conv.groups > 1):
            # Into its own buffer: the output of a depthwise conv or a hardswish feeds a depthwise
            # conv's taps or both SE pooling and the SE multiply, and fused into those consumers
            # XLA:CPU recomputes the conv for each.
            return unfused(self._forward, x)
        return self._forward(x)

    def _forward(self, x: QArray) -> QArray:
        y = self.conv(x)
        return y if self.act is None else self.act(y)


class QSqueezeExcitation(Module):
    """QuantizableSqueezeExcitation after convert: avgpool, fc1 (ConvReLU2d), fc2, hardsigmoid,
    ``skip_mul.mul(scale, input)``."""

    def __init__(self, channels: int, squeeze_channels: int, *, backend: str, name: str):
        self.name, self.backend = name, backend
        self.fc1 = QConv2d(channels, squeeze_channels, 1, relu=True, backend=backend, name=f"{name}.fc1")
        self.fc2 = QConv2d(squeeze_channels, channels, 1, backend=backend, name=f"{name}.fc2")
        self.skip_mul = OutputQParams(f"{name}.skip_mul")

    def op_names(self) -> list[str]:
        n = self.name
        return [f"{n}.avgpool", f"{n}.fc1", f"{n}.fc2", f"{n}.scale_activation", f"{n}.skip_mul"]

    def __call__(self, x: QArray) -> QArray:
        s = _record(f"{self.name}.avgpool", global_average_pool(x, self.backend))
        s = self.fc2(self.fc1(s))
        s = _record(f"{self.name}.scale_activation", hardsigmoid(s))
        return _record(self.skip_mul.name, multiply(s, x, *self.skip_mul.qparams()))


@dataclasses.dataclass(frozen=True)
class QuantizedLayers:
    """The int8 model's layers for ``backbone.build_features``, requantizing as ``backend``."""

    backend: str

    def conv_norm_activation(self, *args: Any, **kwargs: Any) -> QConvNormActivation:
        return QConvNormActivation(*args, **kwargs, backend=self.backend)

    def squeeze_excitation(self, channels: int, squeeze_channels: int, *, name: str) -> QSqueezeExcitation:
        return QSqueezeExcitation(channels, squeeze_channels, backend=self.backend, name=name)

    def sequential(self, layers: list[nnx.Module]) -> Chain:
        return Chain(layers)

    def skip_add(self, name: str) -> QFloatFunctional:
        # Every block has one, as in torchvision: without a residual it is never called and keeps
        # default qparams, but its buffers are in the state_dict all the same.
        return QFloatFunctional(name, self.backend)


def _layer_op_names(layer: nnx.Module) -> list[str]:
    """torch names of the ops a ``features`` layer records, in execution order."""
    if isinstance(layer, InvertedResidual):
        names = [name for sub in layer.block for name in sub.op_names()]
        return names + ([layer.skip_add.name] if layer.use_res_connect else [])
    return layer.op_names()


class QuantizedMobileNetV3(Model):
    """torchvision's ``QuantizableMobileNetV3`` after ``convert``: uint8 activations, int8 weights.

    ``model(x)`` takes normalized float NHWC images (as torchvision's preset makes them) and returns
    float32 logits, compiled once per input shape. ``quantized_intermediates(x)`` returns the uint8
    output of every quantized op, named like torch's modules, in execution order.
    ``backend`` selects whose rounding the requantization follows ("qnnpack", "x86", "x86_vnni" or "x86_amx";
    "fbgemm" computes as "x86"); it is fixed when the model is built.
    """

    def __init__(
        self,
        inverted_residual_setting: Sequence[BlockConfig],
        last_channel: int,
        num_classes: int = 1000,
        *,
        backend: str = "qnnpack",
        architecture: dict[str, Any] | None = None,
        eval_micro_batch: int | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not inverted_residual_setting:
            raise ValueError("inverted_residual_setting should not be empty")
        num_classes = check_builder_args("QuantizedMobileNetV3", num_classes=num_classes)["num_classes"]
        table = list(inverted_residual_setting)
        self.backend = backend
        self.num_classes = num_classes
        # None: CPU_EVAL_MICRO_BATCH on CPU, the whole batch elsewhere; 0: always the whole batch.
        self.eval_micro_batch = eval_micro_batch
        self.quant = QuantStub()
        self.features = build_features(table, QuantizedLayers(backend))
        last_out = features_out_channels(table)
        self.classifier_hidden = QLinear(last_out, last_channel, backend=backend, name="classifier.0")
        self.classifier_act = QHardswish("classifier.1")
        self.classifier_out = QLinear(last_channel, num_classes, backend=backend, name="classifier.3")
        if architecture is None:
            architecture = table_architecture(
                "QuantizedMobileNetV3", table, last_channel, num_classes, backend=backend
            )
        self.architecture_json = json.dumps(architecture, sort_keys=True)

    def op_names(self) -> list[str]:
        """torch module names of the ops ``quantized_intermediates`` returns, in execution order."""
        names = [self.quant.name, *(name for layer in self.features for name in _layer_op_names(layer))]
        names.append("avgpool")
        for layer in (self.classifier_hidden, self.classifier_act, self.classifier_out):
            names += layer.op_names()
        return names

    def __call__(self, x: Array) -> Array:
        """Float32 logits (N, num_classes) for normalized NHWC float images (N, H, W, 3)."""
        check_images(x)
        return call_compiled(self, "forward", x)

    def quantized_intermediates(self, x: Array) -> list[tuple[str, Array]]:
        """``[(torch module name, uint8 NHWC / (N, C) array), ...]`` for every quantized op."""
        check_images(x)
        values = call_compiled(self, "forward_intermediates", x)
        return list(zip(self.op_names(), values, strict=True))

    # -- traceable implementations ----------------------------------------------------------------

    def _run(self, x: Array) -> QArray:
        q = self.quant(x)
        for layer in self.features:
            q = layer(q)
        q = _record("avgpool", global_average_pool(q, self.backend))
        q = QArray(q.values.reshape(q.values.shape[0], -1), q.scale, q.zero_point)
        q = self.classifier_act(self.classifier_hidden(q))
        # classifier.2 is Dropout: the identity at inference.
        return self.classifier_out(q)

    def forward(self, x: Array) -> Array:
        # DeQuantStub.
        return self._in_micro_batches(lambda xb: self._run(xb).dequantize(), x)

    def forward_intermediates(self, x: Array) -> list[Array]:
        def run(xb: Array) -> list[Array]:
            with _recording() as trace:
                self._run(xb)
            return [values for _, values in trace]

        return self._in_micro_batches(run, x)

    def _in_micro_batches(self, fn, x: Array):
        """On CPU, run ``fn`` over micro-batches (lax.map) so activations stay in cache, as
        MobileNetV3 does (every op is per sample, so results do not change)."""
        return eval_micro_batches(fn, x, self.eval_micro_batch, CPU_EVAL_MICRO_BATCH)


def mobilenet_v3_large(
    *,
    weights: Any = None,
    progress: bool = True,
    quantize: bool = True,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    reduced_tail: bool = False,
    dilated: bool = False,
    dropout: float = 0.2,
    backend: str = "qnnpack",
) -> QuantizedMobileNetV3:
    """torchvision's ``quantization.mobilenet_v3_large(quantize=True, ...)`` as an integer model.

    The model is empty (int8 zeros, scales 1): load torchvision weights with
    ``porting.load_torchvision("quantized_mobilenet_v3_large", ...)``. ``dropout`` is accepted for
    torchvision's signature (inference only). ``backend``: whose requantization rounding to follow.
    """
    del progress
    if weights is not None:
        raise ValueError(
            "quantized_mobilenet_v3_large(weights=...) needs torch: use "
            f"porting.load_torchvision('quantized_mobilenet_v3_large', {weights!r})"
        )
    if not quantize:
        raise ValueError("quantize=False is the float model: use mbv3_jax.models.mobilenet_v3_large")
    checked = check_builder_args(
        "quantized_mobilenet_v3_large", num_classes=num_classes, dropout=dropout, width_mult=width_mult
    )
    num_classes, width_mult = checked["num_classes"], checked["width_mult"]
    table, last_channel = mobilenet_v3_config("mobilenet_v3_large", width_mult, reduced_tail, dilated)
    kwargs = dict(
        num_classes=num_classes,
        width_mult=width_mult,
        reduced_tail=reduced_tail,
        dilated=dilated,
        backend=backend,
    )
    return QuantizedMobileNetV3(
        table,
        last_channel,
        num_classes,
        backend=backend,
        architecture={"builder": "quantized_mobilenet_v3_large", "kwargs": kwargs},
    )
