"""QAT layers (torch.ao.nn.intrinsic.qat / torch.ao.nn.qat modules after ``prepare_qat``) with a
choice of numerics, and ``QATLayers``, what the QAT model plugs into the shared backbone."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax import backend
from mbv3_jax import torch_numerics as tn
from mbv3_jax.models.backbone import Chain
from mbv3_jax.models.qat.fake_quant import (
    FakeQuantize,
    FixedQParamsFakeQuantize,
    QATFlag,
    QATQConfig,
    batch_min_max,
    fake_quantize_if,
    host_constant,
    layer_computation,
)
from mbv3_jax.runtime import Module
from mbv3_jax.torch_numerics import divide

Array = jax.Array


# ------------------------------------------------------------------------------------------------
# Activations with torch's CPU formulas (division by 6, not by XLA's rounded 1/6) and derivatives


@layer_computation(backward=lambda args, g: (jnp.where(args[0] > 0, g, jnp.zeros_like(g)),))
def relu(x: Array) -> Array:
    return jnp.maximum(x, 0)


def _hardswish_backward(args, g):
    (x,) = args
    slope = jnp.where(x < -3, 0.0, jnp.where(x <= 3, divide(x, 3) + 0.5, 1.0)).astype(g.dtype)
    return (g * slope,)


@layer_computation(backward=_hardswish_backward)
def hardswish(x: Array) -> Array:
    """``x * min(max(x + 3, 0), 6) / 6`` as torch's vectorised CPU kernel computes it."""
    return divide(x * jnp.clip(x + 3, 0, 6), 6)


def _hardsigmoid_backward(args, g):
    (x,) = args
    return (jnp.where((x > -3) & (x < 3), divide(g, 6), jnp.zeros_like(g)),)


@layer_computation(backward=_hardsigmoid_backward)
def hardsigmoid(x: Array) -> Array:
    """``min(max(x + 3, 0), 6) / 6`` as torch's vectorised CPU kernel computes it."""
    return divide(jnp.clip(x + 3, 0, 6), 6)


# ------------------------------------------------------------------------------------------------
# Convolution / linear / BatchNorm with a choice of numerics


def _xla_conv(x: Array, kernel: Array, bias: Array | None, stride: int, padding: int, groups: int) -> Array:
    # Dense kxk convs stay XLA's on the CPU too: the bit-exact parity mode relies on Eigen's order.
    y = backend.conv2d(x, kernel, stride=stride, padding=padding, groups=groups, dense_rewrites=False)
    return y if bias is None else y + bias


@layer_computation("stride", "padding", "groups", "numerics", "weight_range")
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


@layer_computation("numerics", "weight_range")
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


@layer_computation("numerics")
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


@layer_computation("eps", "momentum", "numerics", "training", "fused_relu", "per_channel")
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


@layer_computation("eps", "numerics", "per_channel")
def fold_batch_norm(
    kernel: Array, weight: Array, running_var: Array, *, eps: float, numerics: str, per_channel: bool
) -> tuple[Array, Array, tuple[Array, Array]]:
    """``_forward_approximate``'s weight side: (kernel * scale_factor, scale_factor, its min / max),
    ``scale_factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)`` (torch.sqrt is MKL's)."""
    sqrt = jnp.sqrt if numerics == "xla" else tn.torch_sqrt
    scale_factor = tn.true_divide(weight, sqrt(running_var + np.float32(eps)))
    scaled = kernel * scale_factor
    return scaled, scale_factor, batch_min_max(jax.lax.stop_gradient(scaled), per_channel)


_batch_norm_jit = layer_computation("eps", "momentum", "numerics", "training")(batch_norm)


class BatchNorm(Module):
    """The BatchNorm2d inside torch's ConvBn QAT modules (NHWC, torch's CPU formulas, see
    ``batch_norm``). Training mode normalises with batch statistics unless ``frozen`` (torch's
    ``freeze_bn_stats``, a traced flag here); eval mode with the running ones."""

    def __init__(
        self, num_features: int, *, eps: float = 1e-3, momentum: float = 0.01, numerics: str = "xla"
    ):
        self.num_features, self.eps, self.momentum, self.numerics = num_features, eps, momentum, numerics
        self.use_running_average = False
        self.scale = nnx.Param(host_constant(1.0, np.float32, (num_features,)))
        self.bias = nnx.Param(host_constant(0.0, np.float32, (num_features,)))
        self.mean = nnx.BatchStat(host_constant(0.0, np.float32, (num_features,)))
        self.var = nnx.BatchStat(host_constant(1.0, np.float32, (num_features,)))
        self.num_batches_tracked = nnx.BatchStat(host_constant(0, np.int32))
        self.frozen = QATFlag(host_constant(0, np.int32))

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
        self.bias = nnx.Param(host_constant(0.0, np.float32, (out_channels,)))
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
        self.bias = nnx.Param(host_constant(0.0, np.float32, (out_features,)))
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


@dataclasses.dataclass(frozen=True)
class QATLayers:
    """The QAT model's layers for ``backbone.build_features``: fused ConvBn(ReLU) with fake quants,
    QuantizableSqueezeExcitation and an observed ``skip_add``."""

    qconfig: QATQConfig
    numerics: str
    rngs: nnx.Rngs

    def conv_norm_activation(
        self, *args: Any, name: str, dilation: int = 1, **kwargs: Any
    ) -> ConvNormActivation:
        if dilation > 1:
            raise NotImplementedError("torchvision's quantizable MobileNetV3 is not dilated")
        return ConvNormActivation(
            *args, **kwargs, qconfig=self.qconfig, numerics=self.numerics, rngs=self.rngs
        )

    def squeeze_excitation(self, channels: int, squeeze_channels: int, *, name: str) -> SqueezeExcitation:
        return SqueezeExcitation(
            channels, squeeze_channels, qconfig=self.qconfig, numerics=self.numerics, rngs=self.rngs
        )

    def sequential(self, layers: list[nnx.Module]) -> Chain:
        return Chain(layers)

    def skip_add(self, name: str) -> FloatFunctional:
        return FloatFunctional(self.qconfig)
