"""NHWC building blocks with torch semantics.

Every layer here computes the same function as its torch counterpart (same padding, same
BatchNorm statistics, same activation formulas). How a convolution is computed, and how a sequence
of layers is scheduled, is chosen in one place, ``mbv3_jax.backend`` (CPU kernels on the CPU,
XLA's generic ops elsewhere).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax import backend, torch_numerics
from mbv3_jax.runtime import List, Module

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


def _sixth(x: Array) -> Array:
    """``x / 6`` divided, as torch does: XLA:CPU would multiply by 1/6 rounded to float32, which
    is 0.3 ulp high and biases every activation the same way, an error that builds up layer after
    layer (the port's logits then drift from float64 faster than torchvision's)."""
    if x.dtype != jnp.float32:
        return x / 6  # bf16: its own rounding is 2**8 times coarser than the bias
    return torch_numerics.divide(x, 6)


@jax.custom_jvp
def hardsigmoid(x: Array) -> Array:
    return _sixth(jnp.clip(x + 3, 0, 6))


@hardsigmoid.defjvp
def _hardsigmoid_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return hardsigmoid(x), jnp.where((x > -3) & (x < 3), t / 6, jnp.zeros_like(t))


@jax.custom_jvp
def hardswish(x: Array) -> Array:
    return _sixth(x * jnp.clip(x + 3, 0, 6))


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

    Drawn with numpy, seeded from the JAX key, because eager jax.random draws compile one small
    program per parameter shape, which makes building a model slow.
    """
    seed = np.asarray(jax.random.key_data(rngs.params())).ravel()
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * np.float32(std)
    return jnp.asarray(values, dtype=dtype)


def _const(shape: tuple[int, ...], value: float, dtype: DType) -> Array:
    return jnp.asarray(np.full(shape, value, dtype=np.dtype(dtype)))


class Conv2d(Module):
    """torch.nn.Conv2d in NHWC with symmetric padding; kernel stored HWIO (kh, kw, Cin/groups, Cout).

    ``mbv3_jax.backend.conv2d`` picks how it is computed (a CPU kernel, or XLA's convolution).
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
        rngs: nnx.Rngs,
    ):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.groups = dilation, groups
        self.dtype = dtype
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
        y = backend.conv2d(
            x, kernel, stride=self.stride, padding=p, dilation=self.dilation, groups=self.groups
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Linear(Module):
    """torch.nn.Linear. Default init N(0, 0.01) as torchvision's classifier.

    The kernel is stored (in, out), or (out, in) as torch stores it with ``kernel_layout="out_in"``,
    because XLA:CPU multiplies a wide input (Faster R-CNN's fc6) faster with the kernel's
    contraction axis minor.
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
    per-channel sums, then one elementwise pass) because autodiff of the forward formula gives the
    same numbers with more full-size passes.
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
        # far, which makes tracing quadratic in the model's size.
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
        # conv (a dot) slower when the fusion indexes the 4-D shape (same outputs).
        y = self.bn(y.reshape(-1, shape[-1]))
        act = ACTIVATIONS[self.activation]
        y = y if act is None else act(y)
        return y.reshape(shape)


class SqueezeExcitation(Module):
    """torchvision's SqueezeExcitation with ReLU and hardsigmoid (MobileNetV3's variant)."""

    # Its input is read twice (pooled, then scaled): the backend may give it its own buffer.
    reads_input_twice = True

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


class Sequential(List):
    """torch.nn.Sequential: the layers applied in order (the backend may schedule them for the CPU)."""

    def __call__(self, x: Array) -> Array:
        return backend.run_sequential(list(self), x)


class FloatFunctional(Module):
    """torch's ``FloatFunctional`` of a float model: ``add`` is ``x + y`` (the QAT and int8 models
    observe or requantize the sum at the same place)."""

    def add(self, x: Array, y: Array) -> Array:
        return x + y
