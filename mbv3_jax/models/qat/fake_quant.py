"""Fake quantization and observers with the arithmetic of torch's fused QAT kernel
(``FusedMovingAvgObsFakeQuantize``), the default QAT qconfigs, and the jitted per-layer computation
wrapper the QAT layers share."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax import torch_numerics as tn
from mbv3_jax.runtime import Module
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


def host_constant(value: Any, dtype: Any, shape: tuple[int, ...] = ()) -> Array:
    # Made on the host: jnp.full would compile one small program per shape.
    return jnp.asarray(np.full(shape, value, dtype=np.dtype(dtype)))


def flag_on(flag: Array) -> Array:
    return flag.reshape(-1)[0] != 0


# The per-layer computations below are jitted functions: inside a model-level jit they are inlined,
# and run eagerly (``model.forward``) each is compiled once per shape and configuration and shared
# by every layer that matches (the observer arithmetic, ~100 ops, by all ~220 fake quants).


def layer_computation(*static_argnames: str, backward: Callable | None = None) -> Callable:
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
    observe, quantize = flag_on(observer_enabled), flag_on(fake_quant_enabled)
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
    passed = jnp.where(flag_on(fake_quant_enabled) & ~mask, jnp.zeros_like(cotangent), cotangent)
    return passed, None, None, None


@layer_computation("quant_min", "quant_max", backward=_fake_quantize_if_backward)
def fake_quantize_if(
    x: Array, scale: Array, zero_point: Array, fake_quant_enabled: Array, *, quant_min: int, quant_max: int
) -> Array:
    """``fake_quantize`` where ``fake_quant_enabled``, else ``x`` (straight-through gradient)."""
    quantized = fake_quantize(x, scale, zero_point, quant_min, quant_max)
    return jnp.where(flag_on(fake_quant_enabled), quantized, x)


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
        self.fake_quant_enabled = QuantState(host_constant(1, np.int32, (1,)))
        self.observer_enabled = QuantState(host_constant(1, np.int32, (1,)))
        self.scale = QuantState(host_constant(1.0, np.float32, qshape))
        self.zero_point = QuantState(host_constant(0, np.int32, qshape))
        self.min_val = QuantState(host_constant(np.inf, np.float32, stat_shape))
        self.max_val = QuantState(host_constant(-np.inf, np.float32, stat_shape))
        self.eps = QuantState(host_constant(OBSERVER_EPS, np.float32, (1,)))

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
        self.fake_quant_enabled = QuantState(host_constant(1, np.int32, (1,)))
        self.observer_enabled = QuantState(host_constant(1, np.int32, (1,)))
        self.scale = QuantState(host_constant(scale, np.float32, (1,)))
        self.zero_point = QuantState(host_constant(zero_point, np.int32, (1,)))
        self.observer_scale = QuantState(host_constant(scale, np.float32, (1,)))
        self.observer_zero_point = QuantState(host_constant(zero_point, np.int32, (1,)))

    def __call__(self, x: Array) -> Array:
        return fake_quantize_if(
            x,
            self.scale[...],
            self.zero_point[...],
            self.fake_quant_enabled[...],
            quant_min=self.quant_min,
            quant_max=self.quant_max,
        )
