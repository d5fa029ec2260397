"""MobileNetV3-Large/Small (torchvision's ``models/mobilenetv3.py``) as Flax NNX modules, NHWC.

Module and attribute names mirror torchvision's (``features[i].block[j]``, ``fc1``/``fc2``) so
that the weight mapping in ``porting`` stays a short declarative table.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax import backend
from mbv3_jax.layers import (
    ConvNormActivation,
    DType,
    Linear,
    Sequential,
    SqueezeExcitation,
    hardswish,
)
from mbv3_jax.runtime import Dropout, List, Model, Module, call_compiled, is_frozen

# torchvision's MobileNetV3 BatchNorm: BatchNorm2d(eps=0.001, momentum=0.01).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
# ConvNormActivation keyword arguments of torchvision's MobileNetV3 BatchNorm.
MOBILENET_NORM: dict[str, Any] = dict(bn_eps=BN_EPS, bn_momentum=BN_MOMENTUM)
# Eval micro-batch on CPU (keeps activations in L3); see MobileNetV3._in_micro_batches.
CPU_EVAL_MICRO_BATCH = 8


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


class InvertedResidual(Module):
    """Expand 1x1 (if needed) -> depthwise kxk -> SE (optional) -> project 1x1; residual if shapes allow."""

    def __init__(
        self,
        cfg: BlockConfig,
        *,
        dtype: DType | None,
        param_dtype: DType,
        rngs: nnx.Rngs,
        norm: dict[str, Any] | None = None,
    ):
        self.use_res_connect = cfg.stride == 1 and cfg.input_channels == cfg.out_channels
        act = "hardswish" if cfg.use_hs else "relu"
        common = dict(**(norm or MOBILENET_NORM), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        layers: list[nnx.Module] = []
        if cfg.expanded_channels != cfg.input_channels:
            layers.append(
                ConvNormActivation(cfg.input_channels, cfg.expanded_channels, 1, activation=act, **common)
            )
        # A dilated block keeps its resolution: torchvision forces the depthwise stride to 1.
        stride = 1 if cfg.dilation > 1 else cfg.stride
        layers.append(
            ConvNormActivation(
                cfg.expanded_channels,
                cfg.expanded_channels,
                cfg.kernel,
                stride=stride,
                dilation=cfg.dilation,
                groups=cfg.expanded_channels,
                activation=act,
                **common,
            )
        )
        if cfg.use_se:
            squeeze = make_divisible(cfg.expanded_channels // 4, 8)
            layers.append(
                SqueezeExcitation(
                    cfg.expanded_channels, squeeze, dtype=dtype, param_dtype=param_dtype, rngs=rngs
                )
            )
        layers.append(
            ConvNormActivation(cfg.expanded_channels, cfg.out_channels, 1, activation=None, **common)
        )
        self.block = Sequential(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        result = self.block(x)
        return x + result if self.use_res_connect else result


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


def features_out_channels(table: Sequence[BlockConfig]) -> int:
    """Channels of the last ``features`` layer (the 1x1 conv to 6x the last block's outputs)."""
    return 6 * table[-1].out_channels


def mobilenet_v3_features(
    table: Sequence[BlockConfig],
    *,
    dtype: DType | None,
    param_dtype: DType,
    rngs: nnx.Rngs,
    norm: dict[str, Any] | None = None,
) -> List:
    """torchvision's ``MobileNetV3.features``: stem, one InvertedResidual per row, last 1x1 conv.

    Classifiers, segmentation and detection models share it (torchvision numbers the layers the
    same way in all of them). ``norm``: the BatchNorm keyword arguments of ConvNormActivation
    (default MobileNetV3's eps 1e-3 / momentum 0.01; detection passes torch's defaults or frozen).
    """
    norm = norm or MOBILENET_NORM
    common = dict(**norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    layers: list[nnx.Module] = [
        ConvNormActivation(3, table[0].input_channels, 3, stride=2, activation="hardswish", **common)
    ]
    for cfg in table:
        layers.append(InvertedResidual(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, norm=norm))
    layers.append(
        ConvNormActivation(
            table[-1].out_channels, features_out_channels(table), 1, activation="hardswish", **common
        )
    )
    return List(layers)


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


def frozen_backbone_filter(
    stages: Sequence[int], trainable_layers: int, num_layers: int, prefix: tuple[str, ...]
) -> Any:
    """nnx filter of the parameters torchvision's ``_mobilenet_extractor`` trains: all but the
    backbone layers (under ``prefix``) before the last ``trainable_layers`` stages, on which
    torchvision sets ``requires_grad=False``. For ``nnx.Optimizer(model, tx, wrt=...)``."""
    freeze_before = num_layers if trainable_layers == 0 else stages[len(stages) - trainable_layers]
    depth = len(prefix)

    def frozen(path: tuple, _value: Any) -> bool:
        return len(path) > depth and tuple(path[:depth]) == prefix and int(path[depth]) < freeze_before

    return nnx.All(nnx.Param, nnx.Not(frozen))


class MobileNetV3(Model):
    """torchvision's ``MobileNetV3``: ``features`` (stem, blocks, last conv), avgpool, classifier.

    Calling the model runs compiled (one program per input shape); inside your own jit/grad it
    runs inline. Like torchvision, a freshly built model is in train mode: call ``.eval()``.
    """

    def __init__(
        self,
        inverted_residual_setting: Sequence[BlockConfig],
        last_channel: int,
        num_classes: int = 1000,
        dropout: float = 0.2,
        *,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs | None = None,
        architecture: dict[str, Any] | None = None,
        eval_micro_batch: int | None = None,
    ):
        if not inverted_residual_setting:
            raise ValueError("inverted_residual_setting should not be empty")
        if not all(isinstance(c, BlockConfig) for c in inverted_residual_setting):
            raise TypeError("inverted_residual_setting should be a sequence of BlockConfig")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.features = mobilenet_v3_features(
            inverted_residual_setting, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        last_out = features_out_channels(inverted_residual_setting)
        self.classifier_hidden = Linear(
            last_out, last_channel, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.dropout = Dropout(dropout, rngs=rngs)
        self.classifier_out = Linear(
            last_channel, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.num_classes = num_classes
        self.dtype = dtype
        # None: 8 on CPU, whole batch elsewhere; 0: always the whole batch.
        self.eval_micro_batch = eval_micro_batch
        if architecture is None:
            architecture = {
                "builder": "MobileNetV3",
                "kwargs": {
                    "inverted_residual_setting": [dataclasses.asdict(c) for c in inverted_residual_setting],
                    "last_channel": last_channel,
                    "num_classes": num_classes,
                    "dropout": dropout,
                },
            }
        # Kept as a JSON string: static, hashable, and what ``mbv3_jax.save`` records.
        self.architecture_json = dump_architecture(architecture, dtype, param_dtype)

    # -- public API -------------------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.features)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits (N, num_classes) for normalized NHWC float images (N, H, W, 3)."""
        check_images(x)
        return call_compiled(self, "forward", x)

    def extract_features(self, x: jax.Array, stages: Sequence[int]) -> dict[int, jax.Array]:
        """Outputs of ``features[i]`` for each i in ``stages`` (torchvision's numbering), NHWC.

        Stops after the deepest requested stage, so early stages cost only what they need.
        """
        check_images(x)
        stages = tuple(sorted({int(s) for s in stages}))
        if not stages or stages[0] < 0 or stages[-1] >= self.num_stages:
            raise ValueError(f"stages must be in [0, {self.num_stages - 1}], got {stages}")
        return call_compiled(self, "forward_features", x, static_args=(stages,))

    # -- traceable implementations (run under jit) ------------------------------------------------

    def forward_features(self, x: jax.Array, stages: tuple[int, ...]) -> dict[int, jax.Array]:
        return self._in_micro_batches(lambda xb: self._features(xb, stages), x)

    def forward(self, x: jax.Array) -> jax.Array:
        return self._in_micro_batches(self._logits, x)

    def _features(self, x: jax.Array, stages: tuple[int, ...]) -> dict[int, jax.Array]:
        return run_stages(self.features, x, stages)

    def _logits(self, x: jax.Array) -> jax.Array:
        for layer in self.features:
            x = layer(x)
        x = jnp.mean(x, axis=(1, 2))
        x = hardswish(self.classifier_hidden(x))
        x = self.dropout(x)
        return self.classifier_out(x)

    def _in_micro_batches(self, fn, x: jax.Array):
        """Eval on the CPU: ``fn`` over micro-batches, so activations stay in cache. Only when every
        BatchNorm uses running statistics and dropout is off: each sample's result is then
        independent of the others."""
        requested = self.eval_micro_batch if is_frozen(self) else 0
        return backend.eval_micro_batches(fn, x, requested, CPU_EVAL_MICRO_BATCH)


def dump_architecture(architecture: dict[str, Any], dtype: DType | None, param_dtype: DType) -> str:
    kwargs = dict(architecture["kwargs"])
    if dtype is not None:
        kwargs["dtype"] = np.dtype(dtype).name
    if np.dtype(param_dtype) != np.float32:
        kwargs["param_dtype"] = np.dtype(param_dtype).name
    return json.dumps({"builder": architecture["builder"], "kwargs": kwargs}, sort_keys=True)


def _mobilenet_v3(arch: str, builder_args: dict[str, Any]) -> MobileNetV3:
    args = dict(builder_args)
    weights, dtype, param_dtype = args.pop("weights"), args.pop("dtype"), args.pop("param_dtype")
    rngs, seed = args.pop("rngs"), args.pop("seed")
    if weights is not None:
        raise ValueError(
            f"{arch}(weights=...) needs torch: use porting.load_torchvision({arch!r}, {weights!r}) "
            "to convert torchvision weights, or mbv3_jax.load(directory) for a saved model"
        )
    table, last_channel = mobilenet_v3_config(arch, args["width_mult"], args["reduced_tail"], args["dilated"])
    return MobileNetV3(
        table,
        last_channel,
        args["num_classes"],
        args["dropout"],
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs if rngs is not None else nnx.Rngs(seed),
        architecture={"builder": arch, "kwargs": args},
    )


def mobilenet_v3_large(
    *,
    weights: Any = None,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    reduced_tail: bool = False,
    dilated: bool = False,
    dropout: float = 0.2,
    dtype: DType | None = None,
    param_dtype: DType = jnp.float32,
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
) -> MobileNetV3:
    """MobileNetV3-Large with torchvision's arguments. ``dtype=jnp.bfloat16`` computes in bf16."""
    return _mobilenet_v3("mobilenet_v3_large", locals())


def mobilenet_v3_small(
    *,
    weights: Any = None,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    reduced_tail: bool = False,
    dilated: bool = False,
    dropout: float = 0.2,
    dtype: DType | None = None,
    param_dtype: DType = jnp.float32,
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
) -> MobileNetV3:
    """MobileNetV3-Small with torchvision's arguments. ``dtype=jnp.bfloat16`` computes in bf16."""
    return _mobilenet_v3("mobilenet_v3_small", locals())
