"""Float MobileNetV3 -> QAT model (``from_float``: fuse + ``prepare_qat`` with a float model's
weights) and QAT model -> integer model (``convert``: torch.ao.quantization.convert)."""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax.layers import BatchNorm as FloatBatchNorm
from mbv3_jax.models import quantization
from mbv3_jax.models.backbone import BlockConfig, mobilenet_v3_config
from mbv3_jax.models.mobilenetv3 import MobileNetV3
from mbv3_jax.models.qat.fake_quant import QuantState
from mbv3_jax.models.qat.layers import BatchNorm, ConvBn, ConvNormActivation
from mbv3_jax.models.qat.model import QATMobileNetV3, qat_mobilenet_v3_large
from mbv3_jax.variables import copy_by_path, describe_mismatch, variables_by_path


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
    copy_by_path(
        variables_by_path(model),
        variables_by_path(qmodel, exclude=QuantState),
        _qat_path,
        context="from_float: the float model does not fit the QAT model",
        describe=functools.partial(describe_mismatch, source="float model", target="QAT model"),
    )
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
