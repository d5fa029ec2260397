"""MobileNetV3-Large/Small (torchvision's ``models/mobilenetv3.py``) as Flax NNX modules, NHWC.

The float model: the shared backbone (``mbv3_jax.models.backbone``) with conv-BN-activation
layers, and the classifier head. Module and attribute names mirror torchvision's
(``features[i].block[j]``, ``fc1``/``fc2``) so that the weight mapping in ``porting`` stays a short
declarative table.
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
    FloatFunctional,
    Linear,
    Sequential,
    SqueezeExcitation,
    hardswish,
)
from mbv3_jax.models.backbone import (
    BlockConfig,
    InvertedResidual,
    build_features,
    check_builder_args,
    check_images,
    features_out_channels,
    make_divisible,
    mobilenet_v3_config,
    run_stages,
    stage_indices,
    table_architecture,
)
from mbv3_jax.runtime import Dropout, List, Model, call_compiled, is_frozen

__all__ = [  # the backbone's names are re-exported: builders and users import them from here
    "BlockConfig",
    "FloatLayers",
    "InvertedResidual",
    "MobileNetV3",
    "check_builder_args",
    "check_images",
    "features_out_channels",
    "make_divisible",
    "mobilenet_v3_config",
    "mobilenet_v3_features",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "run_stages",
    "stage_indices",
]

# torchvision's MobileNetV3 BatchNorm: BatchNorm2d(eps=0.001, momentum=0.01).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
# ConvNormActivation keyword arguments of torchvision's MobileNetV3 BatchNorm.
MOBILENET_NORM: dict[str, Any] = dict(bn_eps=BN_EPS, bn_momentum=BN_MOMENTUM)
# Eval micro-batch on CPU (keeps activations in L3); see MobileNetV3._in_micro_batches.
CPU_EVAL_MICRO_BATCH = 8


@dataclasses.dataclass(frozen=True)
class FloatLayers:
    """The float model's layers for ``backbone.build_features``: torchvision's
    Conv2dNormActivation, SqueezeExcitation and Sequential. ``norm``: the BatchNorm keyword
    arguments of ConvNormActivation (default MobileNetV3's eps 1e-3 / momentum 0.01; detection passes
    torch's defaults or frozen)."""

    dtype: DType | None
    param_dtype: DType
    rngs: nnx.Rngs
    norm: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(MOBILENET_NORM))

    def conv_norm_activation(self, *args: Any, name: str, **kwargs: Any) -> ConvNormActivation:
        return ConvNormActivation(
            *args, **kwargs, **self.norm, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs
        )

    def squeeze_excitation(self, channels: int, squeeze_channels: int, *, name: str) -> SqueezeExcitation:
        return SqueezeExcitation(
            channels, squeeze_channels, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs
        )

    def sequential(self, layers: list[nnx.Module]) -> Sequential:
        return Sequential(layers)

    def skip_add(self, name: str) -> FloatFunctional:
        return FloatFunctional()


def mobilenet_v3_features(
    table: Sequence[BlockConfig],
    *,
    dtype: DType | None,
    param_dtype: DType,
    rngs: nnx.Rngs,
    norm: dict[str, Any] | None = None,
) -> List:
    """The float ``features`` (see ``backbone.build_features``) with ``FloatLayers``."""
    layers = FloatLayers(dtype, param_dtype, rngs, dict(norm or MOBILENET_NORM))
    return build_features(table, layers)


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
        checked = check_builder_args(
            "MobileNetV3", num_classes=num_classes, dropout=dropout, dtype=dtype, param_dtype=param_dtype
        )
        num_classes, dropout = checked["num_classes"], checked["dropout"]
        dtype, param_dtype = checked.get("dtype"), checked["param_dtype"]
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
            architecture = table_architecture(
                "MobileNetV3", inverted_residual_setting, last_channel, num_classes, dropout=dropout
            )
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
        # The classifier runs once on the whole batch: inside the micro-batches it would read its
        # weights (10 MB for Large) once per micro-batch.
        return self._classifier(self._in_micro_batches(self._pooled_features, x))

    def _features(self, x: jax.Array, stages: tuple[int, ...]) -> dict[int, jax.Array]:
        return run_stages(self.features, x, stages)

    def _pooled_features(self, x: jax.Array) -> jax.Array:
        for layer in self.features:
            x = layer(x)
        return jnp.mean(x, axis=(1, 2))

    def _classifier(self, x: jax.Array) -> jax.Array:
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
    checked = check_builder_args(
        arch,
        num_classes=args["num_classes"],
        dropout=args["dropout"],
        width_mult=args["width_mult"],
        dtype=dtype,
        param_dtype=param_dtype,
    )
    dtype, param_dtype = checked.pop("dtype", None), checked.pop("param_dtype")
    args.update(checked)
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
