"""The QAT MobileNetV3 classifier: the shared backbone with QAT layers, the classifier head, and
torch.ao.quantization's QAT switches as state."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax.models.backbone import (
    BlockConfig,
    build_features,
    check_builder_args,
    check_images,
    features_out_channels,
    mobilenet_v3_config,
    table_architecture,
)
from mbv3_jax.models.qat.fake_quant import (
    NUMERICS,
    FakeQuantize,
    FixedQParamsFakeQuantize,
    QATQConfig,
    host_constant,
    qat_qconfig,
)
from mbv3_jax.models.qat.layers import (
    BatchNorm,
    Hardswish,
    Linear,
    QATLayers,
    QuantStub,
    spatial_mean,
)
from mbv3_jax.runtime import Dropout, Model

Array = jax.Array


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
        checked = check_builder_args("QATMobileNetV3", num_classes=num_classes, dropout=dropout)
        num_classes, dropout = checked["num_classes"], checked["dropout"]
        qconfig = qat_qconfig(backend)
        table = list(inverted_residual_setting)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.backend, self.numerics, self.num_classes = backend, numerics, num_classes
        common = dict(qconfig=qconfig, numerics=numerics, rngs=rngs)
        self.quant = QuantStub(qconfig)
        self.features = build_features(table, QATLayers(**common))
        last_out = features_out_channels(table)
        self.classifier_hidden = Linear(last_out, last_channel, **common)
        self.classifier_act = Hardswish(qconfig)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.classifier_out = Linear(last_channel, num_classes, **common)
        if architecture is None:
            architecture = table_architecture(
                "QATMobileNetV3",
                table,
                last_channel,
                num_classes,
                dropout=dropout,
                backend=backend,
                numerics=numerics,
            )
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
        from mbv3_jax.models.qat.convert import convert  # convert builds on this module

        return convert(self, backend)


def _flag_value(on: bool | Array, var: nnx.Variable) -> Array:
    """A 0 / 1 flag of ``var``'s shape and dtype from a Python bool or a (traced) boolean."""
    if isinstance(on, bool | int | np.bool_):
        return host_constant(int(on), var.dtype, var.shape)
    return jnp.broadcast_to(jnp.asarray(on).astype(var.dtype), var.shape)


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
    checked = check_builder_args(
        "qat_mobilenet_v3_large", num_classes=num_classes, dropout=dropout, width_mult=width_mult
    )
    num_classes, dropout, width_mult = checked["num_classes"], checked["dropout"], checked["width_mult"]
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
