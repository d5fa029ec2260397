"""Model builders, by torchvision's names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from mbv3_jax.models import qat, quantization
from mbv3_jax.models.detection import (
    FasterRCNN,
    FasterRCNNConfig,
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
)
from mbv3_jax.models.mobilenetv3 import (
    BlockConfig,
    InvertedResidual,
    MobileNetV3,
    make_divisible,
    mobilenet_v3_config,
    mobilenet_v3_large,
    mobilenet_v3_small,
)
from mbv3_jax.models.segmentation import (
    FCN,
    LRASPP,
    DeepLabV3,
    SegmentationModel,
    deeplabv3_mobilenet_v3_large,
    fcn_mobilenet_v3_large,
    lraspp_mobilenet_v3_large,
)
from mbv3_jax.models.ssdlite import SSD, SSDConfig, ssdlite320_mobilenet_v3_large

# torchvision name -> builder. Later model families register here too.
BUILDERS: dict[str, Callable[..., nnx.Module]] = {
    "mobilenet_v3_large": mobilenet_v3_large,
    "mobilenet_v3_small": mobilenet_v3_small,
    "lraspp_mobilenet_v3_large": lraspp_mobilenet_v3_large,
    "deeplabv3_mobilenet_v3_large": deeplabv3_mobilenet_v3_large,
    "fcn_mobilenet_v3_large": fcn_mobilenet_v3_large,
    "fasterrcnn_mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn,
    "fasterrcnn_mobilenet_v3_large_320_fpn": fasterrcnn_mobilenet_v3_large_320_fpn,
    "ssdlite320_mobilenet_v3_large": ssdlite320_mobilenet_v3_large,
    "quantized_mobilenet_v3_large": quantization.mobilenet_v3_large,
}
# Quantization-aware training models: built by mbv3_jax.models.qat (rebuilt from their architecture
# record by build_from_architecture), kept out of BUILDERS / list_models(): mbv3-parity's float flow
# does not apply to them (tests/test_qat_parity.py checks them).
QAT_BUILDERS: dict[str, Callable[..., nnx.Module]] = {"qat_mobilenet_v3_large": qat.qat_mobilenet_v3_large}


def list_models() -> list[str]:
    return sorted(BUILDERS)


def get_model(name: str, **kwargs: Any) -> nnx.Module:
    """Build a model by its torchvision name, e.g. ``get_model("mobilenet_v3_small", num_classes=10)``."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    return builder(**kwargs)


def build_from_architecture(architecture: dict[str, Any]) -> nnx.Module:
    """Rebuild a model from its ``model.architecture`` record (what ``mbv3_jax.save`` stores)."""
    import jax.numpy as jnp

    builder, kwargs = architecture["builder"], dict(architecture["kwargs"])
    for key in ("dtype", "param_dtype"):
        if key in kwargs:
            kwargs[key] = jnp.dtype(kwargs[key])
    if builder == "MobileNetV3":
        table = [BlockConfig(**row) for row in kwargs.pop("inverted_residual_setting")]
        return MobileNetV3(table, architecture=architecture, **kwargs)
    if builder == "QuantizedMobileNetV3":
        table = [BlockConfig(**row) for row in kwargs.pop("inverted_residual_setting")]
        return quantization.QuantizedMobileNetV3(table, architecture=architecture, **kwargs)
    if builder == "QATMobileNetV3":
        table = [BlockConfig(**row) for row in kwargs.pop("inverted_residual_setting")]
        return qat.QATMobileNetV3(table, architecture=architecture, **kwargs)
    if builder in QAT_BUILDERS:
        return QAT_BUILDERS[builder](**kwargs)
    return get_model(builder, **kwargs)


__all__ = [
    "BUILDERS",
    "QAT_BUILDERS",
    "BlockConfig",
    "DeepLabV3",
    "FCN",
    "FasterRCNN",
    "FasterRCNNConfig",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "LRASPP",
    "SegmentationModel",
    "SSD",
    "SSDConfig",
    "ssdlite320_mobilenet_v3_large",
    "deeplabv3_mobilenet_v3_large",
    "fcn_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
    "InvertedResidual",
    "MobileNetV3",
    "build_from_architecture",
    "get_model",
    "list_models",
    "make_divisible",
    "mobilenet_v3_config",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "qat",
    "quantization",
]
