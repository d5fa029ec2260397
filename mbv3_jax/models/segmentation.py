"""Semantic segmentation on the dilated MobileNetV3-Large: LR-ASPP, DeepLabV3 and an FCN head.

Same modules and parameter names as ``torchvision.models.segmentation``; the backbone is
torchvision's ``features`` (``backbone.0`` ... ``backbone.16``) with the last two stages dilated
(output stride 16). Each model returns a dict of NHWC logits resized to the input size: "out",
and "aux" (an FCN head on the stride-8 features) when built with ``aux_loss=True``.

torchvision 0.29 has no MobileNetV3 FCN; :func:`fcn_mobilenet_v3_large` composes torchvision's
``FCNHead`` on the same backbone features as DeepLabV3 does, and ``porting`` builds the matching
torchvision ``FCN`` for parity and export.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax import backend
from mbv3_jax.layers import Conv2d, ConvNormActivation, DType
from mbv3_jax.models.mobilenetv3 import (
    check_builder_args,
    check_images,
    dump_architecture,
    features_out_channels,
    mobilenet_v3_config,
    mobilenet_v3_features,
    run_stages,
    stage_indices,
)
from mbv3_jax.ops import interpolate_bilinear
from mbv3_jax.runtime import Dropout, List, Model, Module, call_compiled, is_frozen, is_traced

# torch.nn.BatchNorm2d defaults, which torchvision's segmentation heads use.
HEAD_BN = dict(bn_eps=1e-5, bn_momentum=0.1)
DEFAULT_NUM_CLASSES = 21  # the VOC categories of torchvision's COCO-trained weights
IGNORE_INDEX = 255  # torchvision's segmentation references mark void pixels with 255
# Eval micro-batch on CPU; see SegmentationModel._in_micro_batches.
CPU_SEGMENTATION_MICRO_BATCH = 1


class LRASPPHead(Module):
    """Lite R-ASPP: gated 1x1 branch on the high features, upsampled, plus a low-level classifier."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int, *, kw):
        conv_kw = dict(dtype=kw["dtype"], param_dtype=kw["param_dtype"], rngs=kw["rngs"])
        self.cbr = ConvNormActivation(high_channels, inter_channels, 1, activation="relu", **HEAD_BN, **kw)
        self.scale = Conv2d(high_channels, inter_channels, 1, use_bias=False, **conv_kw)
        self.low_classifier = Conv2d(low_channels, num_classes, 1, **conv_kw)
        self.high_classifier = Conv2d(inter_channels, num_classes, 1, **conv_kw)

    def __call__(self, low: jax.Array, high: jax.Array) -> jax.Array:
        x = self.cbr(high)
        gate = jax.nn.sigmoid(self.scale(jnp.mean(high, axis=(1, 2), keepdims=True)))
        x = interpolate_bilinear(x * gate, low.shape[1:3])
        return self.low_classifier(low) + self.high_classifier(x)


class ASPP(Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3, and an image-pooling branch."""

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256, *, kw):
        branches = [ConvNormActivation(in_channels, out_channels, 1, activation="relu", **HEAD_BN, **kw)]
        for rate in atrous_rates:
            branches.append(
                ConvNormActivation(
                    in_channels, out_channels, 3, dilation=rate, activation="relu", **HEAD_BN, **kw
                )
            )
        self.convs = List(branches)
        self.pooling = ConvNormActivation(in_channels, out_channels, 1, activation="relu", **HEAD_BN, **kw)
        n_branches = len(branches) + 1
        self.project = ConvNormActivation(
            n_branches * out_channels, out_channels, 1, activation="relu", **HEAD_BN, **kw
        )
        self.dropout = Dropout(0.5, rngs=kw["rngs"])

    def __call__(self, x: jax.Array) -> jax.Array:
        outs = [branch(x) for branch in self.convs]
        pooled = self.pooling(jnp.mean(x, axis=(1, 2), keepdims=True))
        outs.append(interpolate_bilinear(pooled, x.shape[1:3]))
        return self.dropout(self.project(jnp.concatenate(outs, axis=-1)))


class DeepLabHead(Module):
    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (12, 24, 36), *, kw):
        self.aspp = ASPP(in_channels, atrous_rates, kw=kw)
        self.conv = ConvNormActivation(256, 256, 3, activation="relu", **HEAD_BN, **kw)
        self.classifier = Conv2d(
            256, num_classes, 1, dtype=kw["dtype"], param_dtype=kw["param_dtype"], rngs=kw["rngs"]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.classifier(self.conv(self.aspp(x)))


class FCNHead(Module):
    """torchvision's FCNHead: 3x3 conv to in/4 channels, BN, ReLU, dropout 0.1, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, *, kw):
        inter = in_channels // 4
        self.conv = ConvNormActivation(in_channels, inter, 3, activation="relu", **HEAD_BN, **kw)
        self.dropout = Dropout(0.1, rngs=kw["rngs"])
        self.classifier = Conv2d(
            inter, num_classes, 1, dtype=kw["dtype"], param_dtype=kw["param_dtype"], rngs=kw["rngs"]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.classifier(self.dropout(self.conv(x)))


class SegmentationModel(Model):
    """Dilated MobileNetV3-Large backbone + heads; ``model(x)`` returns {"out": ..., ["aux": ...]}.

    Calling the model runs compiled (one program per input shape). A new model is in train mode,
    as in torchvision: call ``.eval()`` for inference.
    """

    backbone_features: ClassVar[tuple[str, ...]] = ("backbone",)  # MobileNetV3-Large's (dilated) features

    def __init__(self, builder: str, kwargs: dict[str, Any], *, dtype, param_dtype, rngs: nnx.Rngs):
        table, _ = mobilenet_v3_config("mobilenet_v3_large", 1.0, False, True)
        self.backbone = mobilenet_v3_features(table, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        stages = stage_indices(table)
        # torchvision's choice: C2 (output stride 8) for low/aux, the last layer (stride 16) for high/out.
        self.low_stage, self.high_stage = stages[-4], stages[-1]
        self.low_channels = table[self.low_stage - 1].out_channels
        self.high_channels = features_out_channels(table)
        self.num_classes = kwargs["num_classes"]
        self.dtype = dtype
        # None: CPU_SEGMENTATION_MICRO_BATCH on CPU, the whole batch elsewhere; 0: the whole batch.
        self.eval_micro_batch: int | None = None
        self.architecture_json = dump_architecture({"builder": builder, "kwargs": kwargs}, dtype, param_dtype)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """Logits at the input resolution for normalized NHWC float images (N, H, W, 3)."""
        check_images(x)
        return call_compiled(self, "forward", x)

    def extract_features(self, x: jax.Array, stages: Sequence[int]) -> dict[int, jax.Array]:
        """Outputs of ``backbone[i]`` for each i in ``stages`` (torchvision's numbering), NHWC."""
        check_images(x)
        stages = tuple(sorted({int(s) for s in stages}))
        if not stages or stages[0] < 0 or stages[-1] >= len(self.backbone):
            raise ValueError(f"stages must be in [0, {len(self.backbone) - 1}], got {stages}")
        return call_compiled(self, "forward_features", x, static_args=(stages,))

    # -- traceable implementations (run under jit) ------------------------------------------------

    def forward(self, x: jax.Array) -> dict[str, jax.Array]:
        return self._in_micro_batches(self._segment, x)

    def forward_features(self, x: jax.Array, stages: tuple[int, ...]) -> dict[int, jax.Array]:
        return self._in_micro_batches(lambda xb: run_stages(self.backbone, xb, stages), x)

    def _segment(self, x: jax.Array) -> dict[str, jax.Array]:
        feats = run_stages(self.backbone, x, (self.low_stage, self.high_stage))
        size = x.shape[1:3]
        heads = self._heads(feats[self.low_stage], feats[self.high_stage])
        return {k: interpolate_bilinear(v, size) for k, v in heads.items()}

    def _in_micro_batches(self, fn, x: jax.Array):
        """Eval on the CPU: one image at a time (a 520 px image's activations nearly fill the L3).
        Only when every BatchNorm uses running statistics and dropout is off: the same function
        per image (to rounding: a whole-batch matmul is blocked differently)."""
        requested = self.eval_micro_batch if is_frozen(self) else 0
        return backend.eval_micro_batches(fn, x, requested, CPU_SEGMENTATION_MICRO_BATCH)

    def _heads(self, low: jax.Array, high: jax.Array) -> dict[str, jax.Array]:
        raise NotImplementedError


class LRASPP(SegmentationModel):
    def __init__(self, num_classes: int, inter_channels: int = 128, *, dtype, param_dtype, rngs):
        super().__init__(
            "lraspp_mobilenet_v3_large",
            {"num_classes": num_classes},
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.classifier = LRASPPHead(
            self.low_channels, self.high_channels, num_classes, inter_channels, kw=kw
        )

    def _heads(self, low, high):
        return {"out": self.classifier(low, high)}


class DeepLabV3(SegmentationModel):
    def __init__(
        self, builder: str, num_classes: int, aux_loss: bool, head: str, *, dtype, param_dtype, rngs
    ):
        super().__init__(
            builder,
            {"num_classes": num_classes, "aux_loss": aux_loss},
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if head == "deeplabv3":
            self.classifier = DeepLabHead(self.high_channels, num_classes, kw=kw)
        else:
            self.classifier = FCNHead(self.high_channels, num_classes, kw=kw)
        self.aux_classifier = FCNHead(self.low_channels, num_classes, kw=kw) if aux_loss else None

    def _heads(self, low, high):
        out = {"out": self.classifier(high)}
        if self.aux_classifier is not None:
            out["aux"] = self.aux_classifier(low)
        return out


class FCN(DeepLabV3):
    """FCN head on the dilated MobileNetV3-Large (torchvision's FCN class with its FCNHead)."""


def _check_builder_args(
    name: str, weights: Any, weights_backbone: Any, num_classes: Any, dtype: Any, param_dtype: Any
) -> dict[str, Any]:
    """Refuse trained weights (they need torch) and bad arguments; returns num_classes (None:
    torchvision's 21), dtype and param_dtype, checked."""
    if weights is not None or weights_backbone is not None:
        which = "weights" if weights is not None else "weights_backbone"
        raise ValueError(
            f"{name}({which}=...) needs torch: use porting.load_torchvision({name!r}, weights=..., "
            "weights_backbone=...) to convert torchvision weights, "
            "or mbv3_jax.load(directory) for a saved model"
        )
    num_classes = DEFAULT_NUM_CLASSES if num_classes is None else num_classes
    checked = check_builder_args(
        name, num_classes=num_classes, min_classes=1, dtype=dtype, param_dtype=param_dtype
    )
    checked.setdefault("dtype", None)
    return checked


def lraspp_mobilenet_v3_large(
    *,
    weights: Any = None,
    num_classes: int | None = None,
    weights_backbone: Any = None,
    aux_loss: bool | None = None,
    dtype: DType | None = None,
    param_dtype: DType = jnp.float32,
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
) -> LRASPP:
    """LR-ASPP on the dilated MobileNetV3-Large, as torchvision's (21 classes by default, no aux)."""
    args = _check_builder_args(
        "lraspp_mobilenet_v3_large", weights, weights_backbone, num_classes, dtype, param_dtype
    )
    if aux_loss:
        raise NotImplementedError("This model does not use auxiliary loss")  # torchvision's message
    return LRASPP(args.pop("num_classes"), **args, rngs=rngs if rngs is not None else nnx.Rngs(seed))


def deeplabv3_mobilenet_v3_large(
    *,
    weights: Any = None,
    num_classes: int | None = None,
    aux_loss: bool | None = None,
    weights_backbone: Any = None,
    dtype: DType | None = None,
    param_dtype: DType = jnp.float32,
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
) -> DeepLabV3:
    """DeepLabV3 (ASPP rates 12/24/36) on the dilated MobileNetV3-Large; ``aux_loss`` adds an FCN aux head."""
    args = _check_builder_args(
        "deeplabv3_mobilenet_v3_large", weights, weights_backbone, num_classes, dtype, param_dtype
    )
    return DeepLabV3(
        "deeplabv3_mobilenet_v3_large",
        args.pop("num_classes"),
        bool(aux_loss),
        "deeplabv3",
        **args,
        rngs=rngs if rngs is not None else nnx.Rngs(seed),
    )


def fcn_mobilenet_v3_large(
    *,
    weights: Any = None,
    num_classes: int | None = None,
    aux_loss: bool | None = None,
    weights_backbone: Any = None,
    dtype: DType | None = None,
    param_dtype: DType = jnp.float32,
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
) -> FCN:
    """FCN (torchvision's FCNHead on the 960-channel features) on the dilated MobileNetV3-Large.

    Not a torchvision builder (torchvision 0.29 has FCNs only on ResNets); same conventions.
    """
    args = _check_builder_args(
        "fcn_mobilenet_v3_large", weights, weights_backbone, num_classes, dtype, param_dtype
    )
    return FCN(
        "fcn_mobilenet_v3_large",
        args.pop("num_classes"),
        bool(aux_loss),
        "fcn",
        **args,
        rngs=rngs if rngs is not None else nnx.Rngs(seed),
    )


# ------------------------------------------------------------------------------------------------
# Labels for the loss


class LabelOutOfBoundsError(IndexError, ValueError):
    """A segmentation label outside [0, num_classes) that is not the ignore index. An IndexError,
    as torch's ``cross_entropy`` raises ("Target 21 is out of bounds."), and a ValueError (like
    numpy's AxisError, both)."""


def check_segmentation_labels(logits: Any, labels: Any, ignore_index: int = IGNORE_INDEX) -> None:
    """torch's checks of ``F.cross_entropy(logits, labels, ignore_index=...)`` targets, for NHWC
    ``logits`` (N, H, W, C) and ``labels`` (N, H, W): integer labels of the logits' batch and
    spatial shape, each in [0, C) or ``ignore_index``.

    The shape and dtype are checked always. The values only where ``labels`` are concrete (an
    eager call; it reads them on the host): under ``jit`` a raise cannot depend on data, so there
    use :func:`labels_out_of_bounds` (e.g. to make the loss NaN, as jnp's gather already does for
    a label >= C, instead of silently wrapping a negative one).
    """
    logits_shape, labels_shape = tuple(np.shape(logits)), tuple(np.shape(labels))
    if len(logits_shape) != 4 or labels_shape != logits_shape[:3]:
        raise ValueError(
            f"labels should have the logits' batch and spatial shape (N, H, W) = {logits_shape[:3]} "
            f"(logits NHWC {logits_shape}), got {labels_shape}"
        )
    dtype = labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"labels should be integer class indices, got dtype {dtype}")
    if is_traced(labels):
        return
    values = np.asarray(labels)
    bad = (values != ignore_index) & ((values < 0) | (values >= logits_shape[3]))
    if bad.any():
        first = values[bad].flat[0]
        raise LabelOutOfBoundsError(
            f"Target {first} is out of bounds. (labels should be in [0, {logits_shape[3]}) or the "
            f"ignore index {ignore_index}; {int(bad.sum())} pixels are not)"
        )


def labels_out_of_bounds(labels: jax.Array, num_classes: int, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Traceable: a boolean scalar, whether any label is outside [0, num_classes) and not
    ``ignore_index`` (what :func:`check_segmentation_labels` raises for on concrete labels)."""
    return jnp.any((labels != ignore_index) & ((labels < 0) | (labels >= num_classes)))
