"""Quantization-aware training (QAT) of MobileNetV3 with torch's eager-mode semantics.

Builds the model torchvision's ``references/classification/train_quantization.py`` trains:
``quantization.mobilenet_v3_large(quantize=False)``, ``fuse_model(is_qat=True)``,
``qconfig = get_default_qat_qconfig(backend)``, ``prepare_qat``. NHWC, float32, NNX; module and
buffer names follow torch's, so ``porting.qat`` maps its state_dict declaratively (both ways), and
``model.convert()`` gives the integer model of ``mbv3_jax.models.quantization`` as torch's
``convert`` does.

Every quantization point is torch's ``FusedMovingAvgObsFakeQuantize`` (what the default QAT qconfigs
build; its C++ kernel, not the Python ``FakeQuantize`` + observer pair):

* observer: running min / max, initialised from the first batch (while they are +-inf), then
  ``running + c * (batch - running)`` with c = 0.01 in float32, the product rounded first;
* qparams from the running min / max on every call with fake quant on (FBGEMM's
  ``ChooseQuantizationParams``: double intermediates (emulated), symmetric range for weights, the
  6.1e-5 small-scale cutoff, zero point nudged with round-half-even). ``convert`` instead uses the
  observer's Python ``calculate_qparams`` (eps floor; symmetric ``max|w| / 127.5``, not ``/ 127``);
* fake quant ``(clamp(round(x * (1 / s)) + zp, qmin, qmax) - zp) * s`` (round half to even), and
  its straight-through gradient: the incoming gradient where ``round(x * (1 / s)) + zp`` lies in
  ``[qmin, qmax]``, zero elsewhere; none to the scale / zero point (buffers in torch).

Activations are quint8 (0..255 for "qnnpack" / "onednn", 0..127 with x86 / fbgemm's
``reduce_range``), weights qint8 symmetric, per tensor ("qnnpack") or per output channel (the
others). Hardsigmoid has torch's fixed qparams (1/256, 0). ``observer_enabled`` /
``fake_quant_enabled`` and each ConvBn's ``frozen`` flag are state: ``model.disable_observer()`` /
``model.freeze_bn_stats()`` (what the recipe applies after epochs 4 and 3) change values, not the
compiled programs. As in torch, observers keep averaging in eval mode until disabled.

Conv + BatchNorm (``ConvBn2d`` / ``ConvBnReLU2d``) follow torch's ``_forward_approximate``: the
weight scaled by ``gamma / sqrt(running_var + eps)``, fake-quantized, convolved, the output divided
by that factor, then the real BatchNorm (batch statistics in training, running ones in eval mode or
once frozen).

Numerics: "xla" (default) computes convolutions and reductions XLA's way; values then differ from
torch's in the last float bits, and an activation on a rounding boundary goes to the neighbouring
step (the gradients of a model at 96 px differed from torch's by ~10% that way). "torch_avx2"
computes every float32 operation in torch's CPU order (``mbv3_jax.torch_numerics``): measured
bit-identical to torch 2.14 here, forward, observers, BatchNorm statistics, convert; for parity
checks (slower: FMA chains instead of dots).

Running: ``model(x)`` compiles the whole forward pass (long to compile: ~220 fake quants); inside
your own ``nnx.jit`` it is inlined. ``model.forward(x)`` run eagerly executes layer by layer, every
layer computation a small jitted function shared by all layers of its kind and shape (quick to
start; what the parity tests do, gradients included: with "torch_avx2" each layer's gradient is the
VJP of its "xla" twin, jitted once per layer signature).

No JAX quantization library is used: qwix 0.1.8 and aqtp 0.9.0 (both install and import with this
jax / flax) compute scales as ``absmax / (qmax + 0.5)`` or ``(max - min) / range`` without FBGEMM's
nudging, quantize by division (or round ``x / s + zp`` instead of ``round(x * (1 / s)) + zp``),
have no uint8 asymmetric type (qwix) or only float offsets (aqtp), and average calibration
statistics by count rather than torch's exponential moving average: none gives torch's numbers,
which a fake-quant parity product needs to the bit (a value moving across a rounding boundary is a
whole quantization step).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax import backend
from mbv3_jax import torch_numerics as tn
from mbv3_jax.models.mobilenetv3 import (
    BlockConfig,
    check_images,
    features_out_channels,
    make_divisible,
    mobilenet_v3_config,
)
from mbv3_jax.runtime import Dropout, List, Model, Module
from mbv3_jax.torch_numerics import divide, reciprocal, rounded

Array = jax.Array

# FBGEMM's SMALL_SCALE_THRESHOLD (fp16's smallest normal: scales below it are raised to it).
SMALL_SCALE_THRESHOLD = np.float32(6.1e-5)
# torch's observers: eps = torch.finfo(torch.float32).eps (used by calculate_qparams / convert).
OBSERVER_EPS = np.float32(np.finfo(np.float32).eps)
# Hardsigmoid's FixedQParamsFakeQuantize (default_fixed_qparams_range_0to1_fake_quant).
HARDSIGMOID_SCALE = np.float32(1.0 / 256.0)


# ------------------------------------------------------------------------------------------------
# Fake quantization


def _fake_quant_values(x: Array, scale: Array, zero_point: Array, quant_min: int, quant_max: int):
    """torch's fake_quantize_*_cachemask kernels: (output, mask); scale / zero point broadcast over
    the last axis (per channel: the output-channel axis of an HWIO or (in, out) kernel)."""
    inv = reciprocal(scale)
    q = jnp.round(x * inv) + zero_point.astype(jnp.float32)
    mask = (q >= quant_min) & (q <= quant_max)
    # Rounded: an add downstream (the residual) must not absorb this product into an FMA.
    y = rounded((jnp.clip(q, quant_min, quant_max) - zero_point.astype(jnp.float32)) * scale)
    return y, mask


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def fake_quantize(x: Array, scale: Array, zero_point: Array, quant_min: int, quant_max: int) -> Array:
    """``(clamp(round(x * (1 / s)) + zp, qmin, qmax) - zp) * s`` with round half to even, and torch's
    straight-through gradient (passed where the rounded value is inside [qmin, qmax], else 0).
    ``scale`` (float32) / ``zero_point`` (int32) are (1,) per tensor or (C,) over the last axis."""
    return _fake_quant_values(x, scale, zero_point, quant_min, quant_max)[0]


@fake_quantize.defjvp
def _fake_quantize_jvp(quant_min, quant_max, primals, tangents):
    x, scale, zero_point = primals
    y, mask = _fake_quant_values(x, scale, zero_point, quant_min, quant_max)
    return y, jnp.where(mask, tangents[0], jnp.zeros_like(tangents[0]))


# ------------------------------------------------------------------------------------------------
# Observer arithmetic (torch's fused_moving_avg_obs_fake_quant kernel, float32 only)


def _f32(x: Any) -> Array:
    return jnp.asarray(x, jnp.float32)


def moving_average(running: Array, current: Array, averaging_constant: float) -> Array:
    """``running + c * (current - running)`` (product rounded first, as torch's kernel), or
    ``current`` while ``running`` is +-inf (never observed)."""
    step = rounded(_f32(averaging_constant) * (current - running))
    return jnp.where(jnp.isinf(running), current, running + step)


def _sum_over(a: Array, b: Array, divisor: int) -> Array:
    """float32 ``(a + b) / divisor`` rounded once from the exact value (a, b >= 0), which is what
    FBGEMM's ``float((double(max) - min) / (qmax - qmin))`` gives (it rounds twice: the two can
    differ only where the quotient lies within 2**-53 of a float32 midpoint)."""
    return tn.divide_pair(*tn.two_sum(a, b), divisor)


def choose_qparams(
    min_val: Array, max_val: Array, quant_min: int, quant_max: int, symmetric: bool
) -> tuple[Array, Array]:
    """FBGEMM's ``ChooseQuantizationParams(min, max, qmin, qmax, preserve_sparsity=symmetric)`` in
    float32 (elementwise over per-channel min / max). Returns (scale float32, zero_point int32).

    The double-precision steps are emulated: the scale exactly (see ``_sum_over``); the zero point's
    ``nearbyint(qmin - min / scale)`` in float32, which can round the other way only where that
    value is within ~1e-5 of a half-integer (it then moves the clamp bounds by one step)."""
    f32 = jnp.float32
    mn, mx = min_val.astype(f32), max_val.astype(f32)
    if symmetric:
        both = (mn < 0) & (mx > 0)
        sym_min = -((quant_max - quant_min) // 2 + 1)
        sym_max = (quant_max - quant_min) // 2
        max_scale = jnp.maximum(jnp.abs(divide(mn, sym_min)), jnp.abs(divide(mx, sym_max)))
        mn = jnp.where(both, rounded(max_scale * _f32(sym_min)), mn)
        mx = jnp.where(both, rounded(max_scale * _f32(sym_max)), mx)
    mn = jnp.minimum(mn, _f32(0.0))
    mx = jnp.maximum(mx, _f32(0.0))
    span = quant_max - quant_min
    scale = _sum_over(mx, -mn, span)
    scale = jnp.where((scale == 0) | jnp.isinf(_f32(1.0) / scale), _f32(0.1), scale)
    small = scale < SMALL_SCALE_THRESHOLD
    amplifier = SMALL_SCALE_THRESHOLD / scale
    mn_small = jnp.where(
        mn == 0, mn, jnp.where(mx == 0, -SMALL_SCALE_THRESHOLD * _f32(span), rounded(mn * amplifier))
    )
    mx_small = jnp.where(
        mn == 0, SMALL_SCALE_THRESHOLD * _f32(span), jnp.where(mx == 0, mx, rounded(mx * amplifier))
    )
    mn = jnp.where(small, mn_small, mn)
    mx = jnp.where(small, mx_small, mx)
    scale = jnp.where(small, SMALL_SCALE_THRESHOLD, scale)
    from_min, from_max = mn / scale, mx / scale
    err_min = _f32(abs(quant_min)) - jnp.abs(from_min)
    err_max = _f32(abs(quant_max)) - jnp.abs(from_max)
    initial = jnp.where(err_min < err_max, _f32(quant_min) - from_min, _f32(quant_max) - from_max)
    if symmetric:
        initial = jnp.where((mn < 0) & (mx > 0), _f32((quant_min + quant_max) / 2), initial)
    zero_point = jnp.round(jnp.clip(initial, quant_min, quant_max)).astype(jnp.int32)
    return scale, zero_point


def observer_qparams(
    min_val: np.ndarray, max_val: np.ndarray, quant_min: int, quant_max: int, symmetric: bool, eps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """torch's Python ``MinMaxObserver._calculate_qparams`` in numpy float32 (what ``convert``
    quantizes with; it differs from the fused kernel's qparams: symmetric ``max|w| / 127.5``, not
    ``/ 127``). A never-run observer (+-inf) gives (1.0, 0) as torch does."""
    f32 = np.float32
    mn, mx = np.asarray(min_val, f32), np.asarray(max_val, f32)
    eps = np.asarray(eps, f32).reshape(-1)[0]
    if np.any(np.isinf(mn)) or np.any(np.isinf(mx)):
        return np.ones(mn.shape, f32), np.zeros(mn.shape, np.int64)
    min_neg = np.minimum(mn, f32(0))
    max_pos = np.maximum(mx, f32(0))
    if symmetric:
        max_pos = np.maximum(-min_neg, max_pos)
        scale = np.maximum(max_pos / f32((quant_max - quant_min) / 2), eps)
        zero_point = np.zeros(scale.shape, np.int64)
    else:
        scale = np.maximum((max_pos - min_neg) / f32(quant_max - quant_min), eps)
        zero_point = quant_min - np.rint(min_neg / scale).astype(np.int64)
        zero_point = np.clip(zero_point, quant_min, quant_max)
    return scale.astype(f32), zero_point


# ------------------------------------------------------------------------------------------------
# qconfigs and state


@dataclasses.dataclass(frozen=True)
class QATQConfig:
    """The numbers behind torch's ``get_default_qat_qconfig(backend)``: both are
    FusedMovingAvgObsFakeQuantize with averaging constant 0.01; activations quint8, weights qint8
    symmetric (per tensor or per output channel)."""

    backend: str
    activation_quant_min: int
    activation_quant_max: int
    weight_per_channel: bool
    weight_quant_min: int = -128
    weight_quant_max: int = 127
    averaging_constant: float = 0.01


QAT_QCONFIGS: dict[str, QATQConfig] = {
    "qnnpack": QATQConfig("qnnpack", 0, 255, weight_per_channel=False),
    # reduce_range: 7-bit activations (FBGEMM's vpmaddubsw saturates with 8 bits without VNNI).
    "x86": QATQConfig("x86", 0, 127, weight_per_channel=True),
    "fbgemm": QATQConfig("fbgemm", 0, 127, weight_per_channel=True),
    "onednn": QATQConfig("onednn", 0, 255, weight_per_channel=True),
}
# "xla": XLA's own convolutions / reductions (fast; float32 results differ from torch's in the last
# bits, which fake quantization turns into occasional one-step differences). "torch_avx2": torch's
# CPU operation order (see mbv3_jax.torch_numerics), for bit-for-bit parity checks.
NUMERICS = ("xla", "torch_avx2")


def qat_qconfig(backend: str) -> QATQConfig:
    try:
        return QAT_QCONFIGS[backend]
    except KeyError:
        raise ValueError(f"unknown QAT backend {backend!r}; expected one of {sorted(QAT_QCONFIGS)}") from None


class QuantState(nnx.BatchStat):
    """A fake-quant / observer buffer (in torch's state_dict); optimizers leave it alone."""


class QATFlag(nnx.Variable):
    """Training-schedule state with no torch state_dict entry (a ConvBn's ``freeze_bn``)."""


def _host(value: Any, dtype: Any, shape: tuple[int, ...] = ()) -> Array:
    # Made on the host: jnp.full would compile one small program per shape.
    return jnp.asarray(np.full(shape, value, dtype=np.dtype(dtype)))


def _on(flag: Array) -> Array:
    return flag.reshape(-1)[0] != 0


# The per-layer computations below are jitted functions: inside a model-level jit they are inlined,
# and run eagerly (``model.forward``) each is compiled once per shape and configuration and shared
# by every layer that matches (the observer arithmetic, ~100 ops, by all ~220 fake quants).


def _leaf(*static_argnames: str, backward: Callable | None = None) -> Callable:
    """Decorator for a per-layer computation with static keyword arguments: jitted, with a custom
    VJP where it matters. ``backward(args, cotangent, **static)`` gives it explicitly (elementwise
    ops); without it, for numerics other than "xla" the gradient is the VJP of the same computation
    in "xla" numerics (torch's operation order matters for values, not for gradients:
    differentiating an emulation would differentiate its rounding-error terms). Run eagerly,
    a gradient then reuses the compiled forward programs and compiles one backward program per
    layer signature."""

    def wrap(fn: Callable) -> Callable:
        jitted = jax.jit(fn, static_argnames=static_argnames)

        @functools.cache
        def with_gradient(statics: tuple) -> Callable:
            kwargs = dict(statics)
            if backward is not None:
                bwd = jax.jit(functools.partial(backward, **kwargs))
            else:
                plain = functools.partial(fn, **{**kwargs, "numerics": "xla"})
                bwd = jax.jit(lambda args, cotangent: jax.vjp(plain, *args)[1](cotangent))

            @jax.custom_vjp
            def f(*args):
                return jitted(*args, **kwargs)

            f.defvjp(lambda *args: (jitted(*args, **kwargs), args), bwd)
            return f

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if backward is None and kwargs.get("numerics", "xla") == "xla":
                return jitted(*args, **kwargs)
            return with_gradient(tuple(sorted(kwargs.items())))(*args)

        return call

    return wrap


@functools.partial(jax.jit, static_argnames=("quant_min", "quant_max", "symmetric", "averaging_constant"))
def observer_step(
    min_val: Array,
    max_val: Array,
    batch_min: Array,
    batch_max: Array,
    scale: Array,
    zero_point: Array,
    observer_enabled: Array,
    fake_quant_enabled: Array,
    *,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    averaging_constant: float,
) -> tuple[Array, Array, Array, Array]:
    """The state update of torch's fused_moving_avg_obs_fake_quant: (min, max, scale, zero_point)."""
    observe, quantize = _on(observer_enabled), _on(fake_quant_enabled)
    mn = jnp.where(observe, moving_average(min_val, batch_min, averaging_constant), min_val)
    mx = jnp.where(observe, moving_average(max_val, batch_max, averaging_constant), max_val)
    new_scale, new_zero_point = choose_qparams(mn, mx, quant_min, quant_max, symmetric)
    scale = jnp.where(quantize, new_scale.reshape(scale.shape), scale)
    zero_point = jnp.where(quantize, new_zero_point.reshape(zero_point.shape), zero_point)
    return mn, mx, scale, zero_point


@functools.partial(jax.jit, static_argnums=(1,))
def batch_min_max(x: Array, per_channel: bool) -> tuple[Array, Array]:
    """What the observer sees: min / max of ``x``, over all but the last axis if per channel.
    Callers pass ``stop_gradient(x)`` (outside: an eager gradient then never traces this)."""
    axes = tuple(range(x.ndim - 1)) if per_channel else None
    return jnp.min(x, axis=axes), jnp.max(x, axis=axes)


def _fake_quantize_if_backward(args, cotangent, *, quant_min: int, quant_max: int):
    x, scale, zero_point, fake_quant_enabled = args
    _, mask = _fake_quant_values(x, scale, zero_point, quant_min, quant_max)
    passed = jnp.where(_on(fake_quant_enabled) & ~mask, jnp.zeros_like(cotangent), cotangent)
    return passed, None, None, None


@_leaf("quant_min", "quant_max", backward=_fake_quantize_if_backward)
def fake_quantize_if(
    x: Array, scale: Array, zero_point: Array, fake_quant_enabled: Array, *, quant_min: int, quant_max: int
) -> Array:
    """``fake_quantize`` where ``fake_quant_enabled``, else ``x`` (straight-through gradient)."""
    return jnp.where(_on(fake_quant_enabled), fake_quantize(x, scale, zero_point, quant_min, quant_max), x)


# ------------------------------------------------------------------------------------------------
# Fake-quant modules


class FakeQuantize(Module):
    """torch's ``FusedMovingAvgObsFakeQuantize`` with a MovingAverage(PerChannel)MinMaxObserver.

    Variables use torch's buffer names and shapes: ``fake_quant_enabled`` / ``observer_enabled``
    (1,), ``scale`` / ``zero_point`` (1,) or (C,), the observer's ``min_val`` / ``max_val`` () or (C,)
    (+-inf until the first observation) and ``eps`` (1,). Per channel means over the last axis (the
    output channels of an HWIO / (in, out) kernel). Every call, as torch's fused kernel:
    observe (if enabled), then with fake quant enabled recompute ``scale`` / ``zero_point`` from the
    running min / max and fake-quantize, else return ``x`` unchanged.
    """

    def __init__(
        self,
        quant_min: int,
        quant_max: int,
        *,
        symmetric: bool = False,
        channels: int | None = None,
        averaging_constant: float = 0.01,
    ):
        self.quant_min, self.quant_max, self.symmetric = quant_min, quant_max, symmetric
        self.averaging_constant = averaging_constant
        self.per_channel = channels is not None
        qshape = (channels,) if channels is not None else (1,)
        stat_shape = (channels,) if channels is not None else ()
        self.fake_quant_enabled = QuantState(_host(1, np.int32, (1,)))
        self.observer_enabled = QuantState(_host(1, np.int32, (1,)))
        self.scale = QuantState(_host(1.0, np.float32, qshape))
        self.zero_point = QuantState(_host(0, np.int32, qshape))
        self.min_val = QuantState(_host(np.inf, np.float32, stat_shape))
        self.max_val = QuantState(_host(-np.inf, np.float32, stat_shape))
        self.eps = QuantState(_host(OBSERVER_EPS, np.float32, (1,)))

    def weight_qparams(self, weight: Array) -> tuple[Array, Array, Array]:
        """Observe a weight (no gradient through the observer): (scale, zero_point, fake-quant flag),
        what ``conv2d`` / ``linear`` take to fake-quantize it."""
        batch_min, batch_max = batch_min_max(jax.lax.stop_gradient(weight), self.per_channel)
        return (*self.update(batch_min, batch_max), self.fake_quant_enabled[...])

    def update(self, batch_min: Array, batch_max: Array) -> tuple[Array, Array]:
        """Observe a batch's min / max and return the (scale, zero_point) to fake-quantize it with."""
        mn, mx, scale, zero_point = observer_step(
            self.min_val[...],
            self.max_val[...],
            batch_min,
            batch_max,
            self.scale[...],
            self.zero_point[...],
            self.observer_enabled[...],
            self.fake_quant_enabled[...],
            quant_min=self.quant_min,
            quant_max=self.quant_max,
            symmetric=self.symmetric,
            averaging_constant=self.averaging_constant,
        )
        self.min_val.set_value(mn)
        self.max_val.set_value(mx)
        self.scale.set_value(scale)
        self.zero_point.set_value(zero_point)
        return scale, zero_point

    def apply(self, x: Array, scale: Array, zero_point: Array) -> Array:
        return fake_quantize_if(
            x,
            scale,
            zero_point,
            self.fake_quant_enabled[...],
            quant_min=self.quant_min,
            quant_max=self.quant_max,
        )

    def __call__(self, x: Array) -> Array:
        scale, zero_point = self.update(*batch_min_max(jax.lax.stop_gradient(x), self.per_channel))
        return self.apply(x, scale, zero_point)

    def calculate_qparams(self) -> tuple[np.ndarray, np.ndarray]:
        """The observer's Python qparams (what ``convert`` uses), shaped like ``scale``."""
        scale, zero_point = observer_qparams(
            np.asarray(self.min_val[...]),
            np.asarray(self.max_val[...]),
            self.quant_min,
            self.quant_max,
            self.symmetric,
            np.asarray(self.eps[...]),
        )
        return scale.reshape(self.scale.shape), zero_point.reshape(self.zero_point.shape)

    def observed_qparams(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What ``convert`` does with a weight: run this fake quant on it once (the observer, if
        enabled, averages its min / max in), then ``calculate_qparams``. State is not changed."""
        f32 = np.float32
        mn, mx = np.asarray(self.min_val[...], f32), np.asarray(self.max_val[...], f32)
        if int(np.asarray(self.observer_enabled[...]).reshape(-1)[0]):
            axes = tuple(range(weight.ndim - 1)) if self.per_channel else None
            c = f32(self.averaging_constant)
            for_min, for_max = weight.min(axis=axes), weight.max(axis=axes)
            mn = np.where(np.isinf(mn), for_min, mn + c * (for_min - mn)).astype(f32)
            mx = np.where(np.isinf(mx), for_max, mx + c * (for_max - mx)).astype(f32)
        scale, zero_point = observer_qparams(
            mn, mx, self.quant_min, self.quant_max, self.symmetric, np.asarray(self.eps[...])
        )
        return scale, zero_point


class FixedQParamsFakeQuantize(Module):
    """torch's ``FixedQParamsFakeQuantize`` (hardsigmoid: scale 1/256, zero point 0, quint8).
    ``observer_scale`` / ``observer_zero_point`` are its FixedQParamsObserver's buffers (the same
    tensors as ``scale`` / ``zero_point`` in torch, two state_dict entries)."""

    def __init__(self, scale: float = float(HARDSIGMOID_SCALE), zero_point: int = 0):
        self.quant_min, self.quant_max = 0, 255
        self.fake_quant_enabled = QuantState(_host(1, np.int32, (1,)))
        self.observer_enabled = QuantState(_host(1, np.int32, (1,)))
        self.scale = QuantState(_host(scale, np.float32, (1,)))
        self.zero_point = QuantState(_host(zero_point, np.int32, (1,)))
        self.observer_scale = QuantState(_host(scale, np.float32, (1,)))
        self.observer_zero_point = QuantState(_host(zero_point, np.int32, (1,)))

    def __call__(self, x: Array) -> Array:
        return fake_quantize_if(
            x,
            self.scale[...],
            self.zero_point[...],
            self.fake_quant_enabled[...],
            quant_min=self.quant_min,
            quant_max=self.quant_max,
        )


# ------------------------------------------------------------------------------------------------
# Activations with torch's CPU formulas (division by 6, not by XLA's rounded 1/6) and derivatives


@_leaf(backward=lambda args, g: (jnp.where(args[0] > 0, g, jnp.zeros_like(g)),))
def relu(x: Array) -> Array:
    return jnp.maximum(x, 0)


def _hardswish_backward(args, g):
    (x,) = args
    slope = jnp.where(x < -3, 0.0, jnp.where(x <= 3, divide(x, 3) + 0.5, 1.0)).astype(g.dtype)
    return (g * slope,)


@_leaf(backward=_hardswish_backward)
def hardswish(x: Array) -> Array:
    """``x * min(max(x + 3, 0), 6) / 6`` as torch's vectorised CPU kernel computes it."""
    return divide(x * jnp.clip(x + 3, 0, 6), 6)


def _hardsigmoid_backward(args, g):
    (x,) = args
    return (jnp.where((x > -3) & (x < 3), divide(g, 6), jnp.zeros_like(g)),)


@_leaf(backward=_hardsigmoid_backward)
def hardsigmoid(x: Array) -> Array:
    """``min(max(x + 3, 0), 6) / 6`` as torch's vectorised CPU kernel computes it."""
    return divide(jnp.clip(x + 3, 0, 6), 6)


# ------------------------------------------------------------------------------------------------
# Convolution / linear / BatchNorm with a choice of numerics


def _xla_conv(x: Array, kernel: Array, bias: Array | None, stride: int, padding: int, groups: int) -> Array:
    # Dense kxk convs stay XLA's on the CPU too: the bit-exact parity mode relies on Eigen's order.
    y = backend.conv2d(x, kernel, stride=stride, padding=padding, groups=groups, dense_rewrites=False)
    return y if bias is None else y + bias


@_leaf("stride", "padding", "groups", "numerics", "weight_range")
def conv2d(
    x: Array,
    kernel: Array,
    bias: Array | None,
    weight_qparams: tuple[Array, Array, Array] | None = None,
    *,
    stride: int,
    padding: int,
    groups: int,
    numerics: str,
    weight_range: tuple[int, int] = (-128, 127),
) -> Array:
    """``F.conv2d`` for NHWC ``x`` / HWIO ``kernel``, the kernel first fake-quantized with
    ``weight_qparams`` = (scale, zero_point, fake_quant_enabled) if given; "torch_avx2": oneDNN's
    values, XLA's gradient."""
    if weight_qparams is not None:
        kernel = fake_quantize_if(
            kernel, *weight_qparams, quant_min=weight_range[0], quant_max=weight_range[1]
        )
    if numerics == "xla":
        return _xla_conv(x, kernel, bias, stride, padding, groups)
    return tn.onednn_conv(x, kernel, bias, stride=stride, padding=padding, groups=groups)


@_leaf("numerics", "weight_range")
def linear(
    x: Array,
    kernel: Array,
    bias: Array,
    weight_qparams: tuple[Array, Array, Array] | None = None,
    *,
    numerics: str,
    weight_range: tuple[int, int] = (-128, 127),
) -> Array:
    """``F.linear`` for an (in, out) kernel (fake-quantized first, as ``conv2d``); "torch_avx2":
    MKL's values (>= 4 rows), XLA's gradient."""
    if weight_qparams is not None:
        kernel = fake_quantize_if(
            kernel, *weight_qparams, quant_min=weight_range[0], quant_max=weight_range[1]
        )
    if numerics == "xla":
        return jnp.dot(x, kernel) + bias
    return tn.mkl_linear(x, kernel, bias)


def _bn_train_plain(x: Array, weight: Array, bias: Array, eps: float):
    axes = tuple(range(x.ndim - 1))
    n = int(np.prod(x.shape[:-1]))
    mean = jnp.mean(x, axis=axes)
    var_sum = jnp.sum(jnp.square(x - mean), axis=axes)
    inv_std = jax.lax.rsqrt(var_sum / n + eps)
    alpha = inv_std * weight
    return x * alpha + (bias - mean * alpha), mean, var_sum


def _bn_train_torch(x: Array, weight: Array, bias: Array, eps: float):
    alpha, beta, mean, var_sum = tn.batch_norm_train_affine(x, weight, bias, eps)
    return x * alpha + beta, mean, var_sum


@_leaf("numerics")
def spatial_mean(x: Array, *, numerics: str) -> Array:
    """``adaptive_avg_pool2d(x, 1)`` of NHWC ``x`` as (N, C)."""
    if numerics == "xla":
        return jnp.mean(x, axis=(1, 2))
    return tn.spatial_mean(x)


def batch_norm(
    x: Array,
    weight: Array,
    bias: Array,
    running_mean: Array,
    running_var: Array,
    count: Array,
    frozen: Array,
    *,
    eps: float,
    momentum: float,
    numerics: str,
    training: bool,
) -> tuple[Array, Array, Array, Array]:
    """BatchNorm2d over the last axis with torch's CPU formulas: (y, running_mean, running_var,
    num_batches_tracked). ``y = x * alpha + beta`` (one FMA, as torch's vectorised loop), with
    (alpha, beta) from the batch statistics when ``training`` and not ``frozen`` (the statistics
    then updated), else from the running ones."""
    alpha, beta = tn.batch_norm_eval_affine(weight, bias, running_mean, running_var, eps)
    y_running = x * alpha + beta
    if not training:
        return y_running, running_mean, running_var, count
    n = int(np.prod(x.shape[:-1]))
    if numerics == "xla":
        y_batch, mean, var_sum = _bn_train_plain(x, weight, bias, eps)
    else:
        y_batch, mean, var_sum = _bn_train_torch(x, weight, bias, eps)
    mean, var_sum = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var_sum)
    new_mean, new_var = tn.batch_norm_running_stats(running_mean, running_var, mean, var_sum, n, momentum)
    is_frozen = frozen != 0
    return (
        jnp.where(is_frozen, y_running, y_batch),
        jnp.where(is_frozen, running_mean, new_mean),
        jnp.where(is_frozen, running_var, new_var),
        jnp.where(is_frozen, count, count + 1).astype(count.dtype),
    )


@_leaf("eps", "momentum", "numerics", "training", "fused_relu", "per_channel")
def conv_bn_output(
    conv: Array,
    scale_factor: Array,
    weight: Array,
    bias: Array,
    running_mean: Array,
    running_var: Array,
    count: Array,
    frozen: Array,
    *,
    eps: float,
    momentum: float,
    numerics: str,
    training: bool,
    fused_relu: bool,
    per_channel: bool = False,
) -> tuple[tuple[Array, Array, Array, Array], tuple[Array, Array]]:
    """The rest of ``_forward_approximate`` after the conv: ``bn(conv / scale_factor)``, ReLU if
    fused; also the output's min / max for its fake quant's observer."""
    y = tn.true_divide(conv, scale_factor)
    y, mean, var, count = batch_norm(
        y,
        weight,
        bias,
        running_mean,
        running_var,
        count,
        frozen,
        eps=eps,
        momentum=momentum,
        numerics=numerics,
        training=training,
    )
    if fused_relu:
        y = relu(y)
    seen = jax.lax.stop_gradient(y)
    axes = tuple(range(y.ndim - 1)) if per_channel else None
    return (y, mean, var, count), (jnp.min(seen, axis=axes), jnp.max(seen, axis=axes))


@_leaf("eps", "numerics", "per_channel")
def fold_batch_norm(
    kernel: Array, weight: Array, running_var: Array, *, eps: float, numerics: str, per_channel: bool
) -> tuple[Array, Array, tuple[Array, Array]]:
    """``_forward_approximate``'s weight side: (kernel * scale_factor, scale_factor, its min / max),
    ``scale_factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)`` (torch.sqrt is MKL's)."""
    sqrt = jnp.sqrt if numerics == "xla" else tn.torch_sqrt
    scale_factor = tn.true_divide(weight, sqrt(running_var + np.float32(eps)))
    scaled = kernel * scale_factor
    return scaled, scale_factor, batch_min_max(jax.lax.stop_gradient(scaled), per_channel)


_batch_norm_jit = _leaf("eps", "momentum", "numerics", "training")(batch_norm)


class BatchNorm(Module):
    """The BatchNorm2d inside torch's ConvBn QAT modules (NHWC, torch's CPU formulas, see
    ``batch_norm``). Training mode normalises with batch statistics unless ``frozen`` (torch's
    ``freeze_bn_stats``, a traced flag here); eval mode with the running ones."""

    def __init__(
        self, num_features: int, *, eps: float = 1e-3, momentum: float = 0.01, numerics: str = "xla"
    ):
        self.num_features, self.eps, self.momentum, self.numerics = num_features, eps, momentum, numerics
        self.use_running_average = False
        self.scale = nnx.Param(_host(1.0, np.float32, (num_features,)))
        self.bias = nnx.Param(_host(0.0, np.float32, (num_features,)))
        self.mean = nnx.BatchStat(_host(0.0, np.float32, (num_features,)))
        self.var = nnx.BatchStat(_host(1.0, np.float32, (num_features,)))
        self.num_batches_tracked = nnx.BatchStat(_host(0, np.int32))
        self.frozen = QATFlag(_host(0, np.int32))

    def __call__(self, x: Array) -> Array:
        training = not self.use_running_average
        if training and int(np.prod(x.shape[:-1])) <= 1:
            raise ValueError(
                f"BatchNorm in train mode needs more than 1 value per channel, got input {x.shape}"
            )
        y, mean, var, count = _batch_norm_jit(
            x,
            self.scale[...],
            self.bias[...],
            self.mean[...],
            self.var[...],
            self.num_batches_tracked[...],
            self.frozen[...],
            eps=self.eps,
            momentum=self.momentum,
            numerics=self.numerics,
            training=training,
        )
        if training:
            self.mean.set_value(mean)
            self.var.set_value(var)
            self.num_batches_tracked.set_value(count)
        return y


# ------------------------------------------------------------------------------------------------
# QAT layers (torch.ao.nn.intrinsic.qat / torch.ao.nn.qat modules after prepare_qat)


def _weight_fake_quant(qconfig: QATQConfig, channels: int) -> FakeQuantize:
    return FakeQuantize(
        qconfig.weight_quant_min,
        qconfig.weight_quant_max,
        symmetric=True,
        channels=channels if qconfig.weight_per_channel else None,
        averaging_constant=qconfig.averaging_constant,
    )


def _activation_fake_quant(qconfig: QATQConfig) -> FakeQuantize:
    return FakeQuantize(
        qconfig.activation_quant_min,
        qconfig.activation_quant_max,
        averaging_constant=qconfig.averaging_constant,
    )


def _kernel(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> nnx.Param:
    seed = np.asarray(jax.random.key_data(rngs.params())).ravel()
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * np.float32(std)
    return nnx.Param(jnp.asarray(values))


class ConvBn(Module):
    """``ConvBn2d`` / ``ConvBnReLU2d`` (QAT, torch's ``_forward_approximate``), then the output
    fake quant. ``kernel`` HWIO; ``bn`` the real BatchNorm; ``weight_fake_quant`` sees
    ``kernel * gamma / sqrt(running_var + eps)``; the conv output is divided by that factor again
    before the BatchNorm."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        relu: bool,
        qconfig: QATQConfig,
        numerics: str,
        rngs: nnx.Rngs,
    ):
        self.stride, self.padding, self.groups = stride, (kernel_size - 1) // 2, groups
        self.relu, self.numerics = relu, numerics
        shape = (kernel_size, kernel_size, in_channels // groups, out_channels)
        self.kernel = _kernel(rngs, shape, float(np.sqrt(2.0 / (out_channels * kernel_size * kernel_size))))
        self.bn = BatchNorm(out_channels, numerics=numerics)
        self.weight_fake_quant = _weight_fake_quant(qconfig, out_channels)
        self.activation_post_process = _activation_fake_quant(qconfig)

    def __call__(self, x: Array) -> Array:
        bn, wfq = self.bn, self.weight_fake_quant
        scaled, scale_factor, weight_min_max = fold_batch_norm(
            self.kernel[...],
            bn.scale[...],
            bn.var[...],
            eps=bn.eps,
            numerics=self.numerics,
            per_channel=wfq.per_channel,
        )
        weight_qparams = (*wfq.update(*weight_min_max), wfq.fake_quant_enabled[...])
        y = conv2d(
            x,
            scaled,
            None,
            weight_qparams,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            numerics=self.numerics,
            weight_range=(wfq.quant_min, wfq.quant_max),
        )
        training = not bn.use_running_average
        if training and int(np.prod(y.shape[:-1])) <= 1:
            raise ValueError(f"BatchNorm in train mode needs more than 1 value per channel, got {y.shape}")
        (y, mean, var, count), out_min_max = conv_bn_output(
            y,
            scale_factor,
            bn.scale[...],
            bn.bias[...],
            bn.mean[...],
            bn.var[...],
            bn.num_batches_tracked[...],
            bn.frozen[...],
            eps=bn.eps,
            momentum=bn.momentum,
            numerics=self.numerics,
            training=training,
            fused_relu=self.relu,
        )
        if training:
            bn.mean.set_value(mean)
            bn.var.set_value(var)
            bn.num_batches_tracked.set_value(count)
        apq = self.activation_post_process
        return apq.apply(y, *apq.update(*out_min_max))


class Conv(Module):
    """``Conv2d`` / ``ConvReLU2d`` (QAT, with bias: the SE block's fc1 / fc2), then the output fake quant."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        relu: bool,
        qconfig: QATQConfig,
        numerics: str,
        rngs: nnx.Rngs,
    ):
        self.relu, self.numerics = relu, numerics
        self.kernel = _kernel(rngs, (1, 1, in_channels, out_channels), float(np.sqrt(2.0 / out_channels)))
        self.bias = nnx.Param(_host(0.0, np.float32, (out_channels,)))
        self.weight_fake_quant = _weight_fake_quant(qconfig, out_channels)
        self.activation_post_process = _activation_fake_quant(qconfig)

    def __call__(self, x: Array) -> Array:
        wfq = self.weight_fake_quant
        weight_qparams = wfq.weight_qparams(self.kernel[...])
        y = conv2d(
            x,
            self.kernel[...],
            self.bias[...],
            weight_qparams,
            stride=1,
            padding=0,
            groups=1,
            numerics=self.numerics,
            weight_range=(wfq.quant_min, wfq.quant_max),
        )
        if self.relu:
            y = relu(y)
        return self.activation_post_process(y)


class Linear(Module):
    """``torch.ao.nn.qat.Linear`` ((in, out) kernel), then the output fake quant."""

    def __init__(
        self, in_features: int, out_features: int, *, qconfig: QATQConfig, numerics: str, rngs: nnx.Rngs
    ):
        self.numerics = numerics
        self.kernel = _kernel(rngs, (in_features, out_features), 0.01)
        self.bias = nnx.Param(_host(0.0, np.float32, (out_features,)))
        self.weight_fake_quant = _weight_fake_quant(qconfig, out_features)
        self.activation_post_process = _activation_fake_quant(qconfig)

    def __call__(self, x: Array) -> Array:
        wfq = self.weight_fake_quant
        weight_qparams = wfq.weight_qparams(self.kernel[...])
        y = linear(
            x,
            self.kernel[...],
            self.bias[...],
            weight_qparams,
            numerics=self.numerics,
            weight_range=(wfq.quant_min, wfq.quant_max),
        )
        return self.activation_post_process(y)


class Observed(Module):
    """A module whose only QAT state is its output fake quant: QuantStub, Hardswish and the
    FloatFunctional ``skip_add`` / ``skip_mul`` (torch's ``activation_post_process`` child)."""

    def __init__(self, qconfig: QATQConfig):
        self.activation_post_process = _activation_fake_quant(qconfig)


class QuantStub(Observed):
    def __call__(self, x: Array) -> Array:
        return self.activation_post_process(x)


class Hardswish(Observed):
    def __call__(self, x: Array) -> Array:
        return self.activation_post_process(hardswish(x))


class Hardsigmoid(Module):
    """Hardsigmoid with torch's fixed-qparams fake quant."""

    def __init__(self):
        self.activation_post_process = FixedQParamsFakeQuantize()

    def __call__(self, x: Array) -> Array:
        return self.activation_post_process(hardsigmoid(x))


class FloatFunctional(Observed):
    def add(self, x: Array, y: Array) -> Array:
        return self.activation_post_process(x + y)

    def mul(self, x: Array, y: Array) -> Array:
        return self.activation_post_process(x * y)


class ConvNormActivation(Module):
    """A fused Conv2dNormActivation: ``conv`` (torch ``.0``: ConvBn2d / ConvBnReLU2d) and, for
    hardswish, ``act`` (torch ``.2``); ``.1`` (and ``.2`` after a ReLU) are Identity."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        activation: str | None,
        qconfig: QATQConfig,
        numerics: str,
        rngs: nnx.Rngs,
    ):
        if activation not in (None, "relu", "hardswish"):
            raise ValueError(f"activation must be None, 'relu' or 'hardswish', got {activation!r}")
        self.conv = ConvBn(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            groups=groups,
            relu=activation == "relu",
            qconfig=qconfig,
            numerics=numerics,
            rngs=rngs,
        )
        self.act = Hardswish(qconfig) if activation == "hardswish" else None

    def __call__(self, x: Array) -> Array:
        y = self.conv(x)
        return y if self.act is None else self.act(y)


class SqueezeExcitation(Module):
    """QuantizableSqueezeExcitation: avgpool, fc1 (ConvReLU2d), fc2, hardsigmoid, ``skip_mul``."""

    def __init__(
        self, channels: int, squeeze_channels: int, *, qconfig: QATQConfig, numerics: str, rngs: nnx.Rngs
    ):
        self.numerics = numerics
        common = dict(qconfig=qconfig, numerics=numerics, rngs=rngs)
        self.fc1 = Conv(channels, squeeze_channels, relu=True, **common)
        self.fc2 = Conv(squeeze_channels, channels, relu=False, **common)
        self.scale_activation = Hardsigmoid()
        self.skip_mul = FloatFunctional(qconfig)

    def __call__(self, x: Array) -> Array:
        s = spatial_mean(x, numerics=self.numerics)[:, None, None, :]
        s = self.scale_activation(self.fc2(self.fc1(s)))
        return self.skip_mul.mul(s, x)


class InvertedResidual(Module):
    """QuantizableInvertedResidual; the residual is ``skip_add.add(x, block(x))``."""

    def __init__(self, cfg: BlockConfig, *, qconfig: QATQConfig, numerics: str, rngs: nnx.Rngs):
        self.use_res_connect = cfg.stride == 1 and cfg.input_channels == cfg.out_channels
        act = "hardswish" if cfg.use_hs else "relu"
        common = dict(qconfig=qconfig, numerics=numerics, rngs=rngs)
        layers: list[nnx.Module] = []
        if cfg.expanded_channels != cfg.input_channels:
            layers.append(
                ConvNormActivation(cfg.input_channels, cfg.expanded_channels, 1, activation=act, **common)
            )
        if cfg.dilation > 1:
            raise NotImplementedError("torchvision's quantizable MobileNetV3 is not dilated")
        layers.append(
            ConvNormActivation(
                cfg.expanded_channels,
                cfg.expanded_channels,
                cfg.kernel,
                stride=cfg.stride,
                groups=cfg.expanded_channels,
                activation=act,
                **common,
            )
        )
        if cfg.use_se:
            squeeze = make_divisible(cfg.expanded_channels // 4, 8)
            layers.append(SqueezeExcitation(cfg.expanded_channels, squeeze, **common))
        layers.append(
            ConvNormActivation(cfg.expanded_channels, cfg.out_channels, 1, activation=None, **common)
        )
        self.block = List(layers)
        # Every block has one, as in torchvision (its observer never runs without a residual).
        self.skip_add = FloatFunctional(qconfig)

    def __call__(self, x: Array) -> Array:
        y = x
        for layer in self.block:
            y = layer(y)
        return self.skip_add.add(x, y) if self.use_res_connect else y


# ------------------------------------------------------------------------------------------------
# The model


@nnx.jit
def _compiled_forward(model: nnx.Module, x: Array) -> Array:
    return model.forward(x)


def _is_traced(*trees: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


class QATMobileNetV3(Model):
    """torchvision's ``QuantizableMobileNetV3`` after ``fuse_model(is_qat=True)`` and
    ``prepare_qat`` with ``get_default_qat_qconfig(backend)``: float32, NHWC, every quantization
    point a fake quant with torch's semantics (see the module docstring).

    ``model(x)`` runs compiled and writes back the observer / BatchNorm state; inside your own
    ``nnx.jit`` / ``nnx.grad`` it runs inline. As in torch, observers keep updating in eval mode
    until ``disable_observer()``. A freshly built model is in train mode.
    """

    def __init__(
        self,
        inverted_residual_setting: Sequence[BlockConfig],
        last_channel: int,
        num_classes: int = 1000,
        dropout: float = 0.2,
        *,
        backend: str = "qnnpack",
        numerics: str = "xla",
        rngs: nnx.Rngs | None = None,
        architecture: dict[str, Any] | None = None,
    ):
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
        if not inverted_residual_setting:
            raise ValueError("inverted_residual_setting should not be empty")
        qconfig = qat_qconfig(backend)
        table = list(inverted_residual_setting)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.backend, self.numerics, self.num_classes = backend, numerics, num_classes
        common = dict(qconfig=qconfig, numerics=numerics, rngs=rngs)
        self.quant = QuantStub(qconfig)
        layers: list[nnx.Module] = [
            ConvNormActivation(3, table[0].input_channels, 3, stride=2, activation="hardswish", **common)
        ]
        for cfg in table:
            layers.append(InvertedResidual(cfg, **common))
        last_out = features_out_channels(table)
        layers.append(
            ConvNormActivation(table[-1].out_channels, last_out, 1, activation="hardswish", **common)
        )
        self.features = List(layers)
        self.classifier_hidden = Linear(last_out, last_channel, **common)
        self.classifier_act = Hardswish(qconfig)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.classifier_out = Linear(last_channel, num_classes, **common)
        if architecture is None:
            architecture = {
                "builder": "QATMobileNetV3",
                "kwargs": {
                    "inverted_residual_setting": [dataclasses.asdict(c) for c in table],
                    "last_channel": last_channel,
                    "num_classes": num_classes,
                    "dropout": dropout,
                    "backend": backend,
                    "numerics": numerics,
                },
            }
        self.architecture_json = json.dumps(architecture, sort_keys=True)

    @property
    def qconfig(self) -> QATQConfig:
        return qat_qconfig(self.backend)

    def __call__(self, x: Array) -> Array:
        """Logits (N, num_classes) for normalized NHWC float images (N, H, W, 3)."""
        check_images(x)
        if _is_traced(x, nnx.state(self, nnx.Param)):
            return self.forward(x)
        return _compiled_forward(self, x)

    def forward(self, x: Array) -> Array:
        """The traceable forward pass (QuantStub ... classifier; DeQuantStub is the identity)."""
        x = self.quant(x)
        for layer in self.features:
            x = layer(x)
        x = spatial_mean(x, numerics=self.numerics)
        x = self.classifier_act(self.classifier_hidden(x))
        x = self.dropout(x)
        return self.classifier_out(x)

    # -- torch.ao.quantization's QAT switches, as state (no recompilation) ------------------------

    def _fake_quants(self) -> list[nnx.Module]:
        return [m for _, m in nnx.iter_graph(self) if isinstance(m, (FakeQuantize, FixedQParamsFakeQuantize))]

    def _set_flag(self, name: str, on: bool | Array) -> None:
        for module in self._fake_quants():
            var = getattr(module, name)
            var.set_value(_flag_value(on, var))

    def enable_observer(self, enabled: bool = True) -> QATMobileNetV3:
        """``model.apply(torch.ao.quantization.enable_observer)``."""
        self._set_flag("observer_enabled", enabled)
        return self

    def disable_observer(self) -> QATMobileNetV3:
        """``model.apply(torch.ao.quantization.disable_observer)`` (the recipe: after epoch 4)."""
        return self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> QATMobileNetV3:
        """``model.apply(torch.ao.quantization.enable_fake_quant)``."""
        self._set_flag("fake_quant_enabled", enabled)
        return self

    def disable_fake_quant(self) -> QATMobileNetV3:
        """``model.apply(torch.ao.quantization.disable_fake_quant)``."""
        return self.enable_fake_quant(False)

    def freeze_bn_stats(self, frozen: bool = True) -> QATMobileNetV3:
        """``model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)`` (the recipe: after epoch 3):
        every ConvBn normalises with its running statistics and stops updating them."""
        for _, module in nnx.iter_graph(self):
            if isinstance(module, BatchNorm):
                module.frozen.set_value(_flag_value(frozen, module.frozen))
        return self

    def update_bn_stats(self) -> QATMobileNetV3:
        """``model.apply(torch.ao.nn.intrinsic.qat.update_bn_stats)``: undo ``freeze_bn_stats``."""
        return self.freeze_bn_stats(False)

    def set_schedule(self, *, observe: bool | Array, freeze_bn: bool | Array) -> QATMobileNetV3:
        """Both recipe switches at once; the flags may be traced values (a training step derives
        them from its step number: see ``train.trainer``)."""
        self.enable_observer(observe)
        return self.freeze_bn_stats(freeze_bn)

    def convert(self, backend: str = "qnnpack") -> nnx.Module:
        """``torch.ao.quantization.convert``: the integer model (see ``qat.convert``)."""
        return convert(self, backend)


def _flag_value(on: bool | Array, var: nnx.Variable) -> Array:
    """A 0 / 1 flag of ``var``'s shape and dtype from a Python bool or a (traced) boolean."""
    if isinstance(on, bool | int | np.bool_):
        return _host(int(on), var.dtype, var.shape)
    return jnp.broadcast_to(jnp.asarray(on).astype(var.dtype), var.shape)


def from_float(
    model: nnx.Module, *, backend: str = "qnnpack", numerics: str = "xla", seed: int = 0
) -> QATMobileNetV3:
    """The QAT model torchvision's ``train_quantization.py`` starts from: the quantizable model
    loaded with a float ``MobileNetV3``'s weights (``mbv3_jax.models`` classifier, e.g. ported
    torchvision weights or a ``mbv3-train`` result), ``fuse_model(is_qat=True)``, ``prepare_qat``
    with ``get_default_qat_qconfig(backend)``: each conv's weight and its BatchNorm (parameters,
    running statistics, momentum) go into the ConvBn, every observer starts empty. Strict: every
    float parameter and statistic is used once and every QAT one filled, else a ValueError naming
    the variable. MobileNetV3-Large at its defaults becomes ``qat_mobilenet_v3_large`` (what
    ``convert`` turns into torchvision's ``quantized_mobilenet_v3_large``); any other table
    (Small, a truncated table, another width) a ``QATMobileNetV3`` with that table."""
    from mbv3_jax.models.mobilenetv3 import MobileNetV3

    if not isinstance(model, MobileNetV3):
        raise TypeError(f"from_float needs a float MobileNetV3 classifier, got {type(model).__name__}")
    arch = model.architecture
    kwargs = dict(arch["kwargs"])
    if kwargs.get("dtype") not in (None, "float32") or kwargs.get("param_dtype") not in (None, "float32"):
        raise ValueError(
            f"QAT starts from a float32 model; this one has dtype {kwargs.get('dtype')} / "
            f"param_dtype {kwargs.get('param_dtype')}"
        )
    dropout = float(kwargs.get("dropout", 0.2))
    if arch["builder"] == "MobileNetV3":
        table = [BlockConfig(**row) for row in kwargs["inverted_residual_setting"]]
        last_channel = int(kwargs["last_channel"])
    else:
        table, last_channel = mobilenet_v3_config(
            arch["builder"],
            kwargs.get("width_mult", 1.0),
            kwargs.get("reduced_tail", False),
            kwargs.get("dilated", False),
        )
    large_table, large_last = mobilenet_v3_config("mobilenet_v3_large", 1.0, False, False)
    rngs = nnx.Rngs(seed)
    if table == large_table and last_channel == large_last:
        qmodel = qat_mobilenet_v3_large(
            num_classes=model.num_classes, dropout=dropout, backend=backend, numerics=numerics, rngs=rngs
        )
    else:
        qmodel = QATMobileNetV3(
            table, last_channel, model.num_classes, dropout, backend=backend, numerics=numerics, rngs=rngs
        )
    _copy_float_weights(model, qmodel)
    return qmodel


def _qat_path(path: tuple) -> tuple:
    """A float MobileNetV3 variable path -> the fused QAT model's: a Conv2dNormActivation's
    BatchNorm moves into its ConvBn (``features.3.block.0.bn.scale`` -> ``...block.0.conv.bn.scale``)."""
    return path[:-2] + ("conv", "bn", path[-1]) if len(path) >= 2 and path[-2] == "bn" else path


def _copy_float_weights(model: nnx.Module, qmodel: QATMobileNetV3) -> None:
    from mbv3_jax.layers import BatchNorm as FloatBatchNorm

    def variables(m: nnx.Module, kind: type) -> dict[tuple, nnx.Variable]:
        return {tuple(p): v for p, v in nnx.iter_graph(m) if isinstance(v, kind)}

    float_vars = variables(model, nnx.Param | nnx.BatchStat)
    targets = {
        p: v for p, v in variables(qmodel, nnx.Param | nnx.BatchStat).items() if not isinstance(v, QuantState)
    }
    problems, used = [], set()
    for path, var in float_vars.items():
        target = targets.get(_qat_path(path))
        name = ".".join(map(str, path))
        if target is None:
            problems.append(f"{name} has no place in the QAT model")
        elif tuple(var.shape) != tuple(target.shape):
            problems.append(f"{name}: float {tuple(var.shape)} vs QAT {tuple(target.shape)}")
        else:
            used.add(_qat_path(path))
    problems += [
        f"QAT variable {'.'.join(map(str, p))} has no float source" for p in targets if p not in used
    ]
    if problems:
        raise ValueError("from_float: the float model does not fit the QAT model: " + "; ".join(problems[:5]))
    for path, var in float_vars.items():
        target = targets[_qat_path(path)]
        target.set_value(jnp.asarray(np.asarray(var.get_value()), target.get_value().dtype))
    qat_bn = {tuple(p): m for p, m in nnx.iter_graph(qmodel) if isinstance(m, BatchNorm)}
    for path, bn in nnx.iter_graph(model):
        if not isinstance(bn, FloatBatchNorm):
            continue
        qbn = qat_bn[_qat_path((*path, "_"))[:-1]]  # the module path, mapped as its variables are
        if not np.isclose(bn.eps, qbn.eps):
            raise ValueError(
                f"from_float: {'.'.join(map(str, path))} has BatchNorm eps {bn.eps}, QAT {qbn.eps}"
            )
        qbn.momentum = bn.momentum


def qat_mobilenet_v3_large(
    *,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    reduced_tail: bool = False,
    dropout: float = 0.2,
    backend: str = "qnnpack",
    numerics: str = "xla",
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
) -> QATMobileNetV3:
    """torchvision's ``quantization.mobilenet_v3_large(quantize=False)`` prepared for QAT as
    torchvision's ``train_quantization.py`` does (``backend`` picks the default QAT qconfig).
    Random init; load a QAT-prepared torchvision state_dict with
    ``porting.load_torchvision("qat_mobilenet_v3_large", ...)``."""
    table, last_channel = mobilenet_v3_config("mobilenet_v3_large", width_mult, reduced_tail, False)
    kwargs = dict(
        num_classes=num_classes,
        width_mult=width_mult,
        reduced_tail=reduced_tail,
        dropout=dropout,
        backend=backend,
        numerics=numerics,
    )
    return QATMobileNetV3(
        table,
        last_channel,
        num_classes,
        dropout,
        backend=backend,
        numerics=numerics,
        rngs=rngs if rngs is not None else nnx.Rngs(seed),
        architecture={"builder": "qat_mobilenet_v3_large", "kwargs": kwargs},
    )


# ------------------------------------------------------------------------------------------------
# convert: the QAT model -> the integer model (torch.ao.quantization.convert)


def _set(var: nnx.Variable, value: Any) -> None:
    var.set_value(jnp.asarray(np.asarray(value).reshape(var.shape).astype(np.dtype(var.dtype))))


def _quantize_weight(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """torch.quantize_per_tensor(w, s, 0, qint8): ``clamp(round(w * (1 / s)), -128, 127)``."""
    inv = np.float32(1) / np.float32(scale.reshape(-1)[0])
    return np.clip(np.rint(weight * inv), -128, 127).astype(np.int8)


def _convert_weighted(qlayer: nnx.Module, weight: np.ndarray, bias: np.ndarray, layer: nnx.Module) -> None:
    """A quantized Conv2d / Linear from the float weight / bias and the QAT layer's fake quants."""
    scale, _ = layer.weight_fake_quant.observed_qparams(weight)
    _set(qlayer.kernel, _quantize_weight(weight, scale))
    _set(qlayer.weight_scale, scale)
    _set(qlayer.bias, bias)
    _convert_output(qlayer, layer)


def _convert_output(qlayer: nnx.Module, layer: nnx.Module) -> None:
    scale, zero_point = layer.activation_post_process.calculate_qparams()
    _set(qlayer.scale, scale)
    _set(qlayer.zero_point, zero_point)


def _fold_for_convert(conv: ConvBn) -> tuple[np.ndarray, np.ndarray]:
    """torch.nn.utils.fuse_conv_bn_weights, float32 step by step (torch.rsqrt = 1 / sqrt)."""
    f32 = np.float32
    bn = conv.bn
    gamma, beta = np.asarray(bn.scale[...], f32), np.asarray(bn.bias[...], f32)
    mean, var = np.asarray(bn.mean[...], f32), np.asarray(bn.var[...], f32)
    rsqrt = f32(1) / np.sqrt(var + f32(bn.eps))
    weight = np.asarray(conv.kernel[...], f32) * (gamma * rsqrt)
    bias = (((np.zeros_like(mean) - mean) * rsqrt) * gamma + beta).astype(f32)
    return weight.astype(f32), bias


def convert(model: QATMobileNetV3, backend: str = "qnnpack") -> nnx.Module:
    """``torch.ao.quantization.convert`` of the QAT model: the integer
    ``mbv3_jax.models.quantization.QuantizedMobileNetV3`` (``backend``: whose requantization it
    follows). BatchNorm folded into the convs (``fuse_conv_bn_weights``), each weight run once
    more through its fake quant's observer (if enabled) and quantized with the observer's Python
    qparams, every output's qparams from its observer. Needs per-tensor weights (the "qnnpack" QAT
    qconfig): the integer model has no per-channel weights."""
    from mbv3_jax.models import quantization

    if model.qconfig.weight_per_channel:
        raise NotImplementedError(
            f"the {model.backend!r} QAT qconfig quantizes weights per channel; the integer model "
            "(mbv3_jax.models.quantization) takes per-tensor weights: train with backend='qnnpack'"
        )
    arch = model.architecture
    kwargs = dict(arch["kwargs"])
    if arch["builder"] == "qat_mobilenet_v3_large":
        qmodel = quantization.mobilenet_v3_large(
            num_classes=kwargs["num_classes"],
            width_mult=kwargs["width_mult"],
            reduced_tail=kwargs["reduced_tail"],
            backend=backend,
        )
    else:
        table = [BlockConfig(**row) for row in kwargs["inverted_residual_setting"]]
        qmodel = quantization.QuantizedMobileNetV3(
            table, kwargs["last_channel"], kwargs["num_classes"], backend=backend
        )
    _convert_output(qmodel.quant, model.quant)

    def conv_norm_act(q: nnx.Module, layer: ConvNormActivation) -> None:
        weight, bias = _fold_for_convert(layer.conv)
        _convert_weighted(q.conv, weight, bias, layer.conv)
        if layer.act is not None:
            _convert_output(q.act, layer.act)

    for q, layer in zip(qmodel.features, model.features, strict=True):
        if isinstance(layer, ConvNormActivation):
            conv_norm_act(q, layer)
            continue
        for qsub, sub in zip(q.block, layer.block, strict=True):
            if isinstance(sub, ConvNormActivation):
                conv_norm_act(qsub, sub)
            else:  # SqueezeExcitation
                for name in ("fc1", "fc2"):
                    fc = getattr(sub, name)
                    _convert_weighted(
                        getattr(qsub, name), np.asarray(fc.kernel[...]), np.asarray(fc.bias[...]), fc
                    )
                _convert_output(qsub.skip_mul, sub.skip_mul)
        _convert_output(q.skip_add, layer.skip_add)
    for name in ("classifier_hidden", "classifier_out"):
        fc = getattr(model, name)
        _convert_weighted(getattr(qmodel, name), np.asarray(fc.kernel[...]), np.asarray(fc.bias[...]), fc)
    _convert_output(qmodel.classifier_act, model.classifier_act)
    qmodel.eval()
    return qmodel
