"""The MobileNetV3 backbone shared by the float, QAT and int8 models (torchvision's
``models/mobilenetv3.py`` structure, which its quantizable model reuses).

The block table, the inverted residual and the ``features`` assembly (stem, blocks, last 1x1 conv)
are written once here; a model variant plugs its layers in through ``BlockLayers`` (float:
conv-BN-activation; QAT: fake-quantized ConvBn with observers; int8: requantizing convs).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax.runtime import List, Module


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of ``divisor``, never down by >10%."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One inverted-residual block (torchvision's ``InvertedResidualConfig``).

    Channel counts are stored after ``width_mult`` scaling, as torchvision does; build rows with
    :meth:`make` to apply the scaling, or give final channel counts directly.
    ``activation`` is "RE" (ReLU) or "HS" (hardswish).
    """

    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    activation: str
    stride: int
    dilation: int = 1

    def __post_init__(self):
        if self.activation not in ("RE", "HS"):
            raise ValueError(f"BlockConfig.activation must be 'RE' or 'HS', got {self.activation!r}")
        if self.stride not in (1, 2):
            raise ValueError(f"BlockConfig.stride must be 1 or 2, got {self.stride}")

    @staticmethod
    def adjust_channels(channels: int, width_mult: float) -> int:
        return make_divisible(channels * width_mult, 8)

    @classmethod
    def make(
        cls,
        input_channels: int,
        kernel: int,
        expanded_channels: int,
        out_channels: int,
        use_se: bool,
        activation: str,
        stride: int,
        dilation: int = 1,
        width_mult: float = 1.0,
    ) -> BlockConfig:
        adjust = cls.adjust_channels
        return cls(
            adjust(input_channels, width_mult),
            kernel,
            adjust(expanded_channels, width_mult),
            adjust(out_channels, width_mult),
            use_se,
            activation,
            stride,
            dilation,
        )

    @property
    def use_hs(self) -> bool:
        return self.activation == "HS"


def mobilenet_v3_config(
    arch: str, width_mult: float = 1.0, reduced_tail: bool = False, dilated: bool = False
) -> tuple[list[BlockConfig], int]:
    """The block table and ``last_channel`` of torchvision's ``_mobilenet_v3_conf``."""
    rd = 2 if reduced_tail else 1
    d = 2 if dilated else 1

    def row(*args: Any) -> BlockConfig:
        return BlockConfig.make(*args, width_mult=width_mult)

    if arch == "mobilenet_v3_large":
        table = [
            row(16, 3, 16, 16, False, "RE", 1, 1),
            row(16, 3, 64, 24, False, "RE", 2, 1),
            row(24, 3, 72, 24, False, "RE", 1, 1),
            row(24, 5, 72, 40, True, "RE", 2, 1),
            row(40, 5, 120, 40, True, "RE", 1, 1),
            row(40, 5, 120, 40, True, "RE", 1, 1),
            row(40, 3, 240, 80, False, "HS", 2, 1),
            row(80, 3, 200, 80, False, "HS", 1, 1),
            row(80, 3, 184, 80, False, "HS", 1, 1),
            row(80, 3, 184, 80, False, "HS", 1, 1),
            row(80, 3, 480, 112, True, "HS", 1, 1),
            row(112, 3, 672, 112, True, "HS", 1, 1),
            row(112, 5, 672, 160 // rd, True, "HS", 2, d),
            row(160 // rd, 5, 960 // rd, 160 // rd, True, "HS", 1, d),
            row(160 // rd, 5, 960 // rd, 160 // rd, True, "HS", 1, d),
        ]
        last_channel = BlockConfig.adjust_channels(1280 // rd, width_mult)
    elif arch == "mobilenet_v3_small":
        table = [
            row(16, 3, 16, 16, True, "RE", 2, 1),
            row(16, 3, 72, 24, False, "RE", 2, 1),
            row(24, 3, 88, 24, False, "RE", 1, 1),
            row(24, 5, 96, 40, True, "HS", 2, 1),
            row(40, 5, 240, 40, True, "HS", 1, 1),
            row(40, 5, 240, 40, True, "HS", 1, 1),
            row(40, 5, 120, 48, True, "HS", 1, 1),
            row(48, 5, 144, 48, True, "HS", 1, 1),
            row(48, 5, 288, 96 // rd, True, "HS", 2, d),
            row(96 // rd, 5, 576 // rd, 96 // rd, True, "HS", 1, d),
            row(96 // rd, 5, 576 // rd, 96 // rd, True, "HS", 1, d),
        ]
        last_channel = BlockConfig.adjust_channels(1024 // rd, width_mult)
    else:
        raise ValueError(
            f"unknown MobileNetV3 arch {arch!r}; expected mobilenet_v3_large or mobilenet_v3_small"
        )
    return table, last_channel


class BlockLayers(Protocol):
    """The layers a MobileNetV3 variant plugs into the shared structure. ``name`` is the layer's
    torch module name (``features.4.block.1``): the int8 model labels its intermediates with it."""

    def conv_norm_activation(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        activation: str | None,
        name: str,
    ) -> nnx.Module: ...

    def squeeze_excitation(self, channels: int, squeeze_channels: int, *, name: str) -> nnx.Module: ...

    def sequential(self, layers: list[nnx.Module]) -> nnx.Module: ...

    def skip_add(self, name: str) -> nnx.Module:
        """A module whose ``add(x, y)`` is the residual sum (torch's FloatFunctional)."""
        ...


class Chain(List):
    """Layers applied in order (torch.nn.Sequential) with no scheduling of their own: the QAT and
    int8 blocks (the float model's ``layers.Sequential`` lets the backend schedule them)."""

    def __call__(self, x: Any) -> Any:
        for layer in self:
            x = layer(x)
        return x


class InvertedResidual(Module):
    """Expand 1x1 (if needed) -> depthwise kxk -> SE (optional) -> project 1x1; residual if shapes allow."""

    def __init__(self, cfg: BlockConfig, layers: BlockLayers, *, name: str = ""):
        self.use_res_connect = cfg.stride == 1 and cfg.input_channels == cfg.out_channels
        act = "hardswish" if cfg.use_hs else "relu"
        block: list[nnx.Module] = []

        def prefix() -> str:
            return f"{name}.block.{len(block)}"

        if cfg.expanded_channels != cfg.input_channels:
            block.append(
                layers.conv_norm_activation(
                    cfg.input_channels, cfg.expanded_channels, 1, activation=act, name=prefix()
                )
            )
        # A dilated block keeps its resolution: torchvision forces the depthwise stride to 1.
        stride = 1 if cfg.dilation > 1 else cfg.stride
        block.append(
            layers.conv_norm_activation(
                cfg.expanded_channels,
                cfg.expanded_channels,
                cfg.kernel,
                stride=stride,
                dilation=cfg.dilation,
                groups=cfg.expanded_channels,
                activation=act,
                name=prefix(),
            )
        )
        if cfg.use_se:
            squeeze = make_divisible(cfg.expanded_channels // 4, 8)
            block.append(layers.squeeze_excitation(cfg.expanded_channels, squeeze, name=prefix()))
        block.append(
            layers.conv_norm_activation(
                cfg.expanded_channels, cfg.out_channels, 1, activation=None, name=prefix()
            )
        )
        self.block = layers.sequential(block)
        # Every block has one, as torchvision's quantizable block (never called without a residual).
        self.skip_add = layers.skip_add(f"{name}.skip_add")

    def __call__(self, x: jax.Array) -> jax.Array:
        result = self.block(x)
        return self.skip_add.add(x, result) if self.use_res_connect else result


def features_out_channels(table: Sequence[BlockConfig]) -> int:
    """Channels of the last ``features`` layer (the 1x1 conv to 6x the last block's outputs)."""
    return 6 * table[-1].out_channels


def build_features(table: Sequence[BlockConfig], layers: BlockLayers, *, prefix: str = "features") -> List:
    """torchvision's ``MobileNetV3.features``: stem, one InvertedResidual per row, last 1x1 conv.

    Classifiers, segmentation and detection models share it (torchvision numbers the layers the
    same way in all of them); ``prefix`` names the list in torch's module names.
    """
    features: list[nnx.Module] = [
        layers.conv_norm_activation(
            3, table[0].input_channels, 3, stride=2, activation="hardswish", name=f"{prefix}.0"
        )
    ]
    for cfg in table:
        features.append(InvertedResidual(cfg, layers, name=f"{prefix}.{len(features)}"))
    features.append(
        layers.conv_norm_activation(
            table[-1].out_channels,
            features_out_channels(table),
            1,
            activation="hardswish",
            name=f"{prefix}.{len(features)}",
        )
    )
    return List(features)


def check_images(x: Any, in_channels: int = 3) -> None:
    """Reject inputs the model would silently mis-read: wrong rank, NCHW, integer pixels."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"expected an array of images (N, H, W, {in_channels}), got {type(x).__name__}")
    if len(shape) != 4:
        raise ValueError(
            f"expected a batch of images (N, H, W, {in_channels}) in NHWC, got shape {tuple(shape)}"
        )
    if shape[-1] != in_channels:
        hint = (
            " (this looks like NCHW: transpose with x.transpose(0, 2, 3, 1))"
            if shape[1] == in_channels
            else ""
        )
        raise ValueError(
            f"expected NHWC images with {in_channels} channels last, got shape {tuple(shape)}{hint}"
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"expected float images (normalized, as mbv3_jax.transforms produces), got dtype {dtype}; "
            "convert uint8 photos with a preset from mbv3_jax.transforms"
        )
    if shape[1] == 0 or shape[2] == 0:
        raise ValueError(f"expected images of at least 1x1 pixels, got shape {tuple(shape)} (N, H, W, C)")


def run_stages(layers: Sequence[nnx.Module], x: jax.Array, stages: tuple[int, ...]) -> dict[int, jax.Array]:
    """Outputs of ``layers[i]`` for i in ``stages`` (sorted), stopping after the deepest one."""
    out = {}
    for i, layer in enumerate(layers):
        x = layer(x)
        if i in stages:
            out[i] = x
        if i >= stages[-1]:
            break
    return out


def stage_indices(table: Sequence[BlockConfig]) -> list[int]:
    """torchvision's C0..Cn positions in ``features``: the stem, each block whose depthwise conv
    has stride > 1 (``_is_cn``), and the last layer."""
    strided = [i + 1 for i, cfg in enumerate(table) if cfg.stride > 1]
    return [0, *strided, len(table) + 1]


# ------------------------------------------------------------------------------------------------
# Builder argument checks: every builder (classifiers, segmentation, detection, int8, QAT) and the
# model classes that take these arguments directly call this one function.

_UNSET: Any = object()


def check_builder_args(
    builder: str,
    *,
    num_classes: Any = _UNSET,
    min_classes: int = 0,
    dropout: Any = _UNSET,
    width_mult: Any = _UNSET,
    dtype: Any = _UNSET,
    param_dtype: Any = _UNSET,
) -> dict[str, Any]:
    """Check the builder arguments that are given and return them normalized: ``num_classes`` a
    Python int, ``dropout`` and ``width_mult`` Python floats (numpy scalars would not go into the
    JSON architecture record), dtypes as ``jnp.dtype`` objects ("bfloat16" works as jnp.bfloat16).

    Raises TypeError / ValueError naming ``builder``, the argument and its value, for what
    torch / torchvision refuse too (in their own words where they have a check: ``nn.Dropout``'s
    range, ``nn.Module.to``'s floating-point dtypes) or would fail on with an unrelated traceback:
    ``num_classes`` not an integer or below ``min_classes`` (1 for segmentation, whose heads
    cannot be initialised without output channels, and for the detectors, whose class 0 is the
    background; 0 gives a classifier (N, 0) logits, as in torch), ``dropout`` outside [0, 1],
    ``width_mult`` not a finite number > 0, ``dtype`` (None allowed: the inputs' dtype) or
    ``param_dtype`` not a floating-point dtype.
    """
    out: dict[str, Any] = {}
    if num_classes is not _UNSET:
        if isinstance(num_classes, bool | np.bool_) or not isinstance(num_classes, numbers.Integral):
            raise TypeError(
                f"{builder}: num_classes should be an integer, got {num_classes!r} "
                f"({type(num_classes).__name__})"
            )
        if num_classes < min_classes:
            raise ValueError(f"{builder}: num_classes should be >= {min_classes}, got {num_classes}")
        out["num_classes"] = operator.index(num_classes)
    if dropout is not _UNSET:
        p = _real(builder, "dropout", dropout)
        if not 0.0 <= p <= 1.0:  # nn.Dropout's check and message; NaN is refused too
            raise ValueError(f"{builder}: dropout probability has to be between 0 and 1, but got {dropout}")
        out["dropout"] = p
    if width_mult is not _UNSET:
        w = _real(builder, "width_mult", width_mult)
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"{builder}: width_mult should be a finite number > 0, got {width_mult}")
        out["width_mult"] = w
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is _UNSET or (name == "dtype" and value is None):
            continue
        parsed = _as_dtype(value)
        if parsed is None or not jnp.issubdtype(parsed, jnp.floating):
            got = parsed.name if parsed is not None else repr(value)
            raise TypeError(
                f"{builder}: {name} should be a floating-point dtype (jnp.float32, jnp.bfloat16, ...), "
                f"got {got}"
            )
        out[name] = parsed
    return out


def _real(builder: str, name: str, value: Any) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{builder}: {name} should be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _as_dtype(value: Any) -> np.dtype | None:
    """``value`` as a dtype, or None where it is not one (None included: np.dtype(None) is float64)."""
    if value is None:
        return None
    try:
        return jnp.dtype(value)
    except (TypeError, ValueError):
        return None


def table_architecture(
    builder: str, table: Sequence[BlockConfig], last_channel: int, num_classes: int, **kwargs: Any
) -> dict[str, Any]:
    """The architecture record of a model built from a block table (what ``mbv3_jax.save`` keeps)."""
    return {
        "builder": builder,
        "kwargs": {
            "inverted_residual_setting": [dataclasses.asdict(c) for c in table],
            "last_channel": last_channel,
            "num_classes": num_classes,
            **kwargs,
        },
    }
