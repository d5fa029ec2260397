"""torchvision's QAT-prepared quantizable MobileNetV3-Large <-> ``mbv3_jax.models.qat``.

The torch side is what torchvision's ``references/classification/train_quantization.py`` trains:
``quantization.mobilenet_v3_large(quantize=False)``, ``fuse_model(is_qat=True)``,
``qconfig = get_default_qat_qconfig(backend)``, ``prepare_qat``. Its state_dict holds the weights,
BatchNorm statistics and every fake quant's buffers (flags, scale / zero_point, the observer's
running min / max and eps); the table below maps each of them, strictly, onto the JAX model.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from porting.mapping import (
    CONV_OIHW_TO_HWIO,
    LINEAR_TRANSPOSE,
    ZERO_POINT,
    Rule,
    Transform,
    WeightMappingError,
    batchnorm_rules,
    convert_to_jax,
    convert_to_torch,
    load_into,
)

QAT_MODELS = {"qat_mobilenet_v3_large", "QATMobileNetV3"}
# torch keeps the fake quant's on / off flags as int64 (uint8 for FixedQParamsFakeQuantize).
FLAG = Transform("int flag -> int32", lambda a: a.astype(np.int32), lambda a: a.astype(np.int64))


def fake_quant_rules(torch_prefix: str, jax_prefix: str) -> list[Rule]:
    """A FusedMovingAvgObsFakeQuantize at ``torch_prefix`` (regex) -> ``FakeQuantize`` at ``jax_prefix``."""
    tp, jp = torch_prefix, jax_prefix
    return [
        Rule(rf"{tp}\.(?P<flag>fake_quant_enabled|observer_enabled)", rf"{jp}.\g<flag>", FLAG),
        Rule(rf"{tp}\.scale", rf"{jp}.scale"),
        Rule(rf"{tp}\.zero_point", rf"{jp}.zero_point", ZERO_POINT),
        Rule(rf"{tp}\.activation_post_process\.(?P<stat>eps|min_val|max_val)", rf"{jp}.\g<stat>"),
    ]


def _qat_linear_rules(torch_prefix: str, jax_prefix: str) -> list[Rule]:
    tp, jp = torch_prefix, jax_prefix
    return [
        Rule(rf"{tp}\.weight", f"{jp}.kernel", LINEAR_TRANSPOSE),
        Rule(rf"{tp}\.bias", f"{jp}.bias"),
        *fake_quant_rules(rf"{tp}\.weight_fake_quant", f"{jp}.weight_fake_quant"),
        *fake_quant_rules(rf"{tp}\.activation_post_process", f"{jp}.activation_post_process"),
    ]


_LAYER = r"features\.(\d+(?:\.block\.\d+)?)"  # a Conv2dNormActivation: features.N[.block.M]
_BLOCK = r"features\.(\d+\.block\.\d+)"  # a block's SqueezeExcitation
_HARDSIGMOID = rf"{_BLOCK}\.scale_activation\.activation_post_process"

QAT_MOBILENET_V3_RULES: list[Rule] = [
    *fake_quant_rules(r"quant\.activation_post_process", "quant.activation_post_process"),
    # ConvBn2d / ConvBnReLU2d (.0) and Hardswish (.2)
    Rule(rf"{_LAYER}\.0\.weight", r"features.\1.conv.kernel", CONV_OIHW_TO_HWIO),
    *batchnorm_rules(rf"{_LAYER}\.0\.bn", r"features.\1.conv.bn"),
    *fake_quant_rules(rf"{_LAYER}\.0\.weight_fake_quant", r"features.\1.conv.weight_fake_quant"),
    *fake_quant_rules(rf"{_LAYER}\.0\.activation_post_process", r"features.\1.conv.activation_post_process"),
    *fake_quant_rules(rf"{_LAYER}\.2\.activation_post_process", r"features.\1.act.activation_post_process"),
    # SqueezeExcitation: fc1 (ConvReLU2d), fc2 (Conv2d), hardsigmoid (fixed qparams), skip_mul
    Rule(rf"{_BLOCK}\.(fc[12])\.weight", r"features.\1.\2.kernel", CONV_OIHW_TO_HWIO),
    Rule(rf"{_BLOCK}\.(fc[12])\.bias", r"features.\1.\2.bias"),
    *fake_quant_rules(rf"{_BLOCK}\.(fc[12])\.weight_fake_quant", r"features.\1.\2.weight_fake_quant"),
    *fake_quant_rules(
        rf"{_BLOCK}\.(fc[12])\.activation_post_process", r"features.\1.\2.activation_post_process"
    ),
    Rule(
        rf"{_HARDSIGMOID}\.(?P<flag>fake_quant_enabled|observer_enabled)",
        r"features.\1.scale_activation.activation_post_process.\g<flag>",
        FLAG,
    ),
    Rule(rf"{_HARDSIGMOID}\.scale", r"features.\1.scale_activation.activation_post_process.scale"),
    Rule(
        rf"{_HARDSIGMOID}\.zero_point",
        r"features.\1.scale_activation.activation_post_process.zero_point",
        ZERO_POINT,
    ),
    Rule(
        rf"{_HARDSIGMOID}\.activation_post_process\.scale",
        r"features.\1.scale_activation.activation_post_process.observer_scale",
    ),
    Rule(
        rf"{_HARDSIGMOID}\.activation_post_process\.zero_point",
        r"features.\1.scale_activation.activation_post_process.observer_zero_point",
        ZERO_POINT,
    ),
    *fake_quant_rules(
        rf"{_BLOCK}\.skip_mul\.activation_post_process", r"features.\1.skip_mul.activation_post_process"
    ),
    *fake_quant_rules(
        r"features\.(\d+)\.skip_add\.activation_post_process", r"features.\1.skip_add.activation_post_process"
    ),
    # classifier: Linear (.0), Hardswish (.1), Dropout (.2), Linear (.3)
    *_qat_linear_rules(r"classifier\.0", "classifier_hidden"),
    *fake_quant_rules(r"classifier\.1\.activation_post_process", "classifier_act.activation_post_process"),
    *_qat_linear_rules(r"classifier\.3", "classifier_out"),
]


@contextlib.contextmanager
def quiet_quantization() -> Iterator[None]:
    """torch.ao.quantization's deprecation notices and "observer not run" / reduce_range warnings
    say nothing about the conversion here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\.ao\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(quantiz|reduce_range).*", category=UserWarning)
        yield


def quantizable_torchvision(kwargs: Mapping[str, Any], quantize: bool = False) -> torch.nn.Module:
    """torchvision's (float) QuantizableMobileNetV3 for the kwargs of ``qat_mobilenet_v3_large``
    or of ``QATMobileNetV3`` (an explicit block table, as ``model.architecture`` records it).
    ``quantize``: torchvision's converted model instead (default qparams; run it under the engine
    its weights are packed for)."""
    from torchvision.models.mobilenetv3 import InvertedResidualConfig
    from torchvision.models.quantization import mobilenet_v3_large
    from torchvision.models.quantization.mobilenetv3 import _mobilenet_v3_model

    common = {k: v for k, v in kwargs.items() if k in ("num_classes", "dropout")}
    if "inverted_residual_setting" not in kwargs:
        sizes = {k: v for k, v in kwargs.items() if k in ("width_mult", "reduced_tail")}
        return mobilenet_v3_large(weights=None, quantize=quantize, **common, **sizes)
    table = []
    for row in kwargs["inverted_residual_setting"]:
        cfg = InvertedResidualConfig(**{**row, "width_mult": 1.0})
        # mbv3_jax stores final channel counts; don't let torchvision round them again.
        cfg.input_channels, cfg.expanded_channels = row["input_channels"], row["expanded_channels"]
        cfg.out_channels = row["out_channels"]
        table.append(cfg)
    return _mobilenet_v3_model(table, kwargs["last_channel"], None, False, quantize, **common)


def build_qat_torchvision(kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """torchvision's quantizable MobileNetV3, fused and ``prepare_qat``-ed with
    ``get_default_qat_qconfig(kwargs["backend"])``, in train mode (random init)."""
    with quiet_quantization():
        model = quantizable_torchvision(kwargs)
        model.train()
        model.fuse_model(is_qat=True)
        model.qconfig = torch.ao.quantization.get_default_qat_qconfig(kwargs.get("backend", "qnnpack"))
        model.train()
        torch.ao.quantization.prepare_qat(model, inplace=True)
    return model


def qat_tensors(state_dict: Mapping[str, Any], source: str = "checkpoint") -> dict[str, np.ndarray]:
    """The QAT state_dict as numpy arrays for the mapping table. A per-channel weight observer that
    has never run holds empty min / max (and a (1,) scale); they become the (C,) +-inf / 1.0 / 0 that
    the JAX model starts from (torch resizes them on the first forward)."""
    arrays: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise WeightMappingError(f"{source}: key {key!r} is not a tensor ({type(value).__name__})")
        # A copy: numpy() would pin the tensor's storage, and torch resizes a per-channel observer's
        # empty min / max on its first forward.
        arrays[key] = (
            value.detach().cpu().clone().numpy() if isinstance(value, torch.Tensor) else np.array(value)
        )
    for key in list(arrays):
        if not key.endswith(".weight_fake_quant.activation_post_process.min_val") or arrays[key].size:
            continue
        prefix = key[: -len(".weight_fake_quant.activation_post_process.min_val")]
        weight = arrays.get(prefix + ".weight")
        if weight is None:
            raise WeightMappingError(f"{source}: key {key!r} has no weight {prefix + '.weight'!r} next to it")
        channels = weight.shape[0]
        fq = prefix + ".weight_fake_quant"
        arrays[key] = np.full(channels, np.inf, np.float32)
        if fq + ".activation_post_process.max_val" in arrays:
            arrays[fq + ".activation_post_process.max_val"] = np.full(channels, -np.inf, np.float32)
        for name, fill in (("scale", 1.0), ("zero_point", 0)):
            if fq + "." + name in arrays and arrays[fq + "." + name].size == 1:
                arrays[fq + "." + name] = np.full(channels, fill, arrays[fq + "." + name].dtype)
    return arrays


def load_qat_state_dict(model: Any, state_dict: Mapping[str, Any], source: str = "state_dict") -> Any:
    """Load a QAT-prepared torchvision state_dict into an existing ``QATMobileNetV3`` (any block
    table), strictly: every tensor used once, every variable filled; errors name key and shapes."""
    arrays = convert_to_jax(
        qat_tensors(state_dict, source),
        model,
        QAT_MOBILENET_V3_RULES,
        context=f"{source} does not fit this QAT MobileNetV3 (another model or configuration?)",
    )
    load_into(model, arrays)
    return model


def qat_to_torchvision(model: Any) -> collections.OrderedDict[str, torch.Tensor]:
    """The JAX QAT model as the state_dict of torchvision's prepared QAT model, checked by loading
    it (``strict=True``) into one."""
    kwargs = model.architecture["kwargs"]
    tv_model = build_qat_torchvision(kwargs)
    reference = tv_model.state_dict()
    arrays = convert_to_torch(model, _qat_torch_shapes(model, reference), QAT_MOBILENET_V3_RULES)
    # (v.numpy() would pin the reference model's buffers, which loading must resize.)
    state_dict: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict(
        (k, torch.from_numpy(np.array(arrays[k])).to(v.dtype)) for k, v in reference.items()
    )
    state_dict._metadata = reference._metadata  # type: ignore[attr-defined]
    try:
        with quiet_quantization():
            tv_model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # would be a bug in the mapping table
        raise WeightMappingError(f"torchvision rejected the exported QAT state_dict: {e}") from e
    return state_dict


def _qat_torch_shapes(model: Any, reference: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """torch's shapes, except the per-channel observer buffers, which torch sizes on first use:
    those take the JAX model's (C,)."""
    shapes = {k: tuple(v.shape) for k, v in reference.items()}
    if model.qconfig.weight_per_channel:
        per_channel = ("min_val", "max_val", "scale", "zero_point")
        for key in reference:
            if ".weight_fake_quant." in key and key.rsplit(".", 1)[-1] in per_channel:
                prefix = key.split(".weight_fake_quant.")[0]
                shapes[key] = (reference[prefix + ".weight"].shape[0],)
    return shapes
