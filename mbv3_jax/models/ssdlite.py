"""SSDlite320 with a MobileNetV3-Large backbone (torchvision's ``ssdlite320_mobilenet_v3_large``).

Same modules, parameter names and semantics as ``torchvision.models.detection.ssdlite``:

* transform: normalize with mean = std = 0.5 (pixels to [-1, 1]), bilinear resize (no antialias)
  of every image to exactly 320x320 (``fixed_size``; no padding);
* backbone: ``features`` of MobileNetV3-Large (reduced tail for the COCO weights, BatchNorm eps
  0.001 / momentum 0.03), read at two places: torchvision's C4 split inside ``features[13]`` (the
  output of its expand conv, 672 ch at 20x20, belongs to the first part) and the last layer
  (10x10); then four extra blocks (1x1 to half the channels, depthwise 3x3 stride 2, 1x1; ReLU6)
  down to 5x5, 3x3, 2x2, 1x1;
* heads: per map a depthwise 3x3 + BN + ReLU6 then a 1x1 conv with bias, for class logits
  (``num_classes`` x 6 default boxes) and box codes (4 x 6);
* default boxes: ``DefaultBoxGenerator`` ([2, 3] x 6 maps, scales 0.2..0.95): 3,234 boxes;
* post-processing: softmax, decode (weights 10, 10, 5, 5), clip, per class score > 0.001 and the
  top 300, batched NMS 0.55, the best 300;
* train mode: torchvision's SSD losses (SSDMatcher at IoU 0.5, smooth-L1 box regression over the
  matched default boxes, cross-entropy with 3:1 hard negative mining), both divided by the number
  of matched default boxes.

JAX's module tree keeps MobileNetV3's own numbering: ``backbone.features`` is the classifier's
17-layer ``features`` (torchvision regroups the same layers into ``backbone.features.0`` and
``backbone.features.1`` around the C4 split; ``porting.rules`` maps the two namings).
The eval path is one ``jax.jit`` program per batch size (every image is resized to 320x320) with
static shapes: a fixed top-k per class and padded NMS, run on the 1,024 best candidates first
(see :meth:`SSD.postprocess_detections`: the same result as on all 27,000, and cheaper). The losses
are a traceable method over padded ground truth (a fixed number of boxes per image plus a
validity mask), so ``nnx.value_and_grad`` differentiates them.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax.layers import Conv2d, ConvNormActivation, DType, normal_init
from mbv3_jax.models.detection_utils import (
    BOX_CODER_WEIGHTS,
    check_builder_options,
    cross_entropy,
    gather_kept,
    is_training,
    norm_options,
    normalize_and_resize_images,
    pad_targets,
    reject_weights,
    resized_targets,
    smooth_l1,
    unpad_detections,
)
from mbv3_jax.models.mobilenetv3 import (
    BlockConfig,
    check_builder_args,
    dump_architecture,
    features_out_channels,
    frozen_backbone_filter,
    mobilenet_v3_config,
    mobilenet_v3_features,
    stage_indices,
)
from mbv3_jax.ops.anchors import DefaultBoxGenerator
from mbv3_jax.ops.boxes import BoxCoder, batched_nms_padded, box_iou, clip_boxes_to_image
from mbv3_jax.ops.matcher import ssd_match
from mbv3_jax.runtime import List, Model, Module, call_compiled

SIZE = (320, 320)  # (width, height) as torchvision's ``size``; square, so the order never matters
INPUT_HW = (SIZE[1], SIZE[0])  # torchvision: size = [fixed_size[1], fixed_size[0]]
# torchvision's SSDlite norm_layer: partial(BatchNorm2d, eps=0.001, momentum=0.03).
SSDLITE_NORM: dict[str, Any] = dict(norm="batch", bn_eps=0.001, bn_momentum=0.03)
EXTRA_DEPTHS = (512, 256, 256, 128)
# NMS first runs on this many best candidates (more than torchvision's CPU path switch at 1,000).
NMS_FIRST_CANDIDATES = 1024
MIN_GT_SLOTS = 8  # ground truth is padded to a power of two >= this (few compiled loss programs)


@dataclasses.dataclass(frozen=True)
class SSDConfig:
    """torchvision ``SSD`` keyword arguments (with ``ssdlite320_mobilenet_v3_large``'s defaults)."""

    num_classes: int = 91
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    score_thresh: float = 0.001
    nms_thresh: float = 0.55
    detections_per_img: int = 300
    iou_thresh: float = 0.5
    topk_candidates: int = 300
    positive_fraction: float = 0.25

    @property
    def neg_to_pos_ratio(self) -> float:
        return (1.0 - self.positive_fraction) / self.positive_fraction


# ------------------------------------------------------------------------------------------------
# Modules


def _extra_block(in_channels: int, out_channels: int, norm: dict[str, Any], kw: dict[str, Any]) -> List:
    """1x1 to ``out/2`` -> depthwise 3x3 stride 2 -> 1x1 to ``out``, each with BN and ReLU6."""
    mid = out_channels // 2
    common = {**norm, **kw}
    return List(
        [
            ConvNormActivation(in_channels, mid, 1, activation="relu6", **common),
            ConvNormActivation(mid, mid, 3, stride=2, groups=mid, activation="relu6", **common),
            ConvNormActivation(mid, out_channels, 1, activation="relu6", **common),
        ]
    )


class SSDLiteFeatureExtractorMobileNet(Module):
    """MobileNetV3 ``features`` read at the C4 split (inside ``features[c4_pos]``, after its expand
    conv) and at the end, then the extra blocks: six maps, highest resolution first."""

    def __init__(
        self, table: Sequence[BlockConfig], c4_pos: int, *, norm: dict[str, Any], kw: dict[str, Any]
    ):
        self.features = mobilenet_v3_features(table, norm=norm, **kw)
        block = self.features[c4_pos]
        if block.use_res_connect:
            raise ValueError("backbone[c4_pos].use_res_connect should be False")
        if len(block.block) < 2 or table[c4_pos - 1].expanded_channels == table[c4_pos - 1].input_channels:
            raise ValueError(f"features[{c4_pos}] has no expand conv to split after")
        self.c4_pos = c4_pos
        channels = [features_out_channels(table), *EXTRA_DEPTHS]
        self.extra = List(
            [_extra_block(channels[i], channels[i + 1], norm, kw) for i in range(len(EXTRA_DEPTHS))]
        )
        self.out_channels = (table[c4_pos - 1].expanded_channels, *channels)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        for i in range(self.c4_pos):
            x = self.features[i](x)
        split = self.features[self.c4_pos].block
        x = split[0](x)  # torchvision's first part ends with the C4 expand conv
        outputs = [x]
        for j in range(1, len(split)):  # no residual: checked in __init__
            x = split[j](x)
        for i in range(self.c4_pos + 1, len(self.features)):
            x = self.features[i](x)
        outputs.append(x)
        for block in self.extra:
            for layer in block:
                x = layer(x)
            outputs.append(x)
        return outputs


class SSDLiteScoringHead(Module):
    """Per map: depthwise 3x3 + BN + ReLU6, then a 1x1 conv to ``num_columns`` x anchors; outputs
    (N, sum H*W*A, num_columns) in torchvision's (y, x, anchor) order (NHWC channels are a*K + k,
    as torch's NCHW channels, so a plain reshape gives that order)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_anchors: Sequence[int],
        num_columns: int,
        *,
        norm: dict[str, Any],
        kw: dict[str, Any],
    ):
        self.module_list = List(
            [
                List(
                    [
                        ConvNormActivation(c, c, 3, groups=c, activation="relu6", **norm, **kw),
                        Conv2d(c, num_columns * a, 1, **kw),
                    ]
                )
                for c, a in zip(in_channels, num_anchors, strict=True)
            ]
        )
        self.num_columns = num_columns

    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        results = []
        for block, x in zip(self.module_list, features, strict=True):
            y = block[1](block[0](x))
            results.append(y.reshape(y.shape[0], -1, self.num_columns))
        return jnp.concatenate(results, axis=1)


class SSDLiteHead(Module):
    def __init__(
        self,
        in_channels: Sequence[int],
        num_anchors: Sequence[int],
        num_classes: int,
        *,
        norm: dict[str, Any],
        kw: dict[str, Any],
    ):
        self.classification_head = SSDLiteScoringHead(in_channels, num_anchors, num_classes, norm=norm, kw=kw)
        self.regression_head = SSDLiteScoringHead(in_channels, num_anchors, 4, norm=norm, kw=kw)

    def __call__(self, features: Sequence[jax.Array]) -> dict[str, jax.Array]:
        return {
            "bbox_regression": self.regression_head(features),
            "cls_logits": self.classification_head(features),
        }


# ------------------------------------------------------------------------------------------------
# The model


class SSD(Model):
    """``model(images)`` in eval mode: a list (one per image) of {"boxes", "scores", "labels"} with
    boxes (x1, y1, x2, y2) in the original image's pixels. Images: HWC float in [0, 1], any sizes.

    ``model(images, targets)`` in train mode: torchvision's losses {"bbox_regression",
    "classification"} for targets [{"boxes": (G, 4) in the image's pixels, "labels": (G,)}, ...];
    BatchNorm uses batch statistics and updates its running statistics. For gradients, call the
    traceable :meth:`losses` on :meth:`training_batch`'s arrays inside ``nnx.value_and_grad`` and
    optimize ``model.trainable_filter()`` (torchvision's ``trainable_backbone_layers``).

    Like torchvision, a new model is in train mode: call ``.eval()`` for inference.
    """

    keeps_aspect_ratio: ClassVar[bool] = False  # the transform resizes every image to 320 x 320
    backbone_features: ClassVar[tuple[str, ...]] = ("backbone", "features")  # MobileNetV3-Large's features

    def __init__(
        self,
        builder: str,
        kwargs: dict[str, Any],
        config: SSDConfig,
        *,
        reduced_tail: bool,
        norm: dict[str, Any],
        dtype: DType | None,
        param_dtype: DType,
        rngs: nnx.Rngs,
    ):
        self.config = config
        table, _ = mobilenet_v3_config("mobilenet_v3_large", 1.0, reduced_tail, False)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        stages = stage_indices(table)  # C0..C5 in features: 0, 2, 4, 7, 13, 16
        self._stage_indices = tuple(stages)
        self.backbone = SSDLiteFeatureExtractorMobileNet(table, stages[-2], norm=norm, kw=kw)
        self.anchor_generator = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
        num_anchors = self.anchor_generator.num_anchors_per_location()
        out_channels = self.backbone.out_channels
        if len(out_channels) != len(self.anchor_generator.aspect_ratios):
            raise ValueError(
                f"The length of the output channels from the backbone {len(out_channels)} do not match "
                f"the length of the anchor generator aspect ratios {len(self.anchor_generator.aspect_ratios)}"
            )
        self.head = SSDLiteHead(out_channels, num_anchors, config.num_classes, norm=norm, kw=kw)
        # torchvision's _normal_init on the backbone (no backbone weights), extras and heads:
        # every conv N(0, 0.03), biases 0.
        for _, module in nnx.iter_modules(self):
            if isinstance(module, Conv2d):
                module.kernel.set_value(normal_init(rngs, module.kernel.shape, 0.03, param_dtype))
                if module.bias is not None:
                    module.bias.set_value(jnp.zeros_like(module.bias.get_value()))
        self.num_classes = config.num_classes
        self.dtype = dtype
        self.deterministic = False  # train mode, as a new torchvision model; .eval() sets it
        self.architecture_json = dump_architecture({"builder": builder, "kwargs": kwargs}, dtype, param_dtype)

    # -- public API -------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Any]) -> tuple[jax.Array, list[tuple[int, int]]]:
        """(normalized NHWC batch at 320x320, original (h, w) per image)."""
        cfg = self.config
        resized, _, originals = normalize_and_resize_images(
            images, cfg.image_mean, cfg.image_std, lambda h, w: INPUT_HW
        )
        return jnp.stack(resized), originals

    def prepare_targets(
        self,
        targets: Sequence[Mapping[str, Any]],
        original_sizes: Sequence[tuple[int, int]],
        max_boxes: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Targets in the 320x320 frame, padded: boxes (N, G, 4) float32, labels (N, G) int32, valid
        (N, G) bool. G is ``max_boxes``, or the largest count rounded up to a power of two (>= 8) so
        that a stream of batches compiles few loss programs.

        torchvision's checks (float (G, 4) boxes with positive width and height, integer labels in
        [0, num_classes)), then its ``resize_boxes`` (float32 ratios 320 / original).
        """
        boxes_list, labels_list = resized_targets(
            targets, original_sizes, [INPUT_HW] * len(original_sizes), self.num_classes
        )
        # Padding rows: a unit box (finite regression targets), never matched (valid=False).
        return pad_targets(
            boxes_list, labels_list, min_slots=MIN_GT_SLOTS, pad_box=(0.0, 0.0, 1.0, 1.0), max_boxes=max_boxes
        )

    def training_batch(
        self, images: Sequence[Any], targets: Sequence[Mapping[str, Any]], max_boxes: int | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``(batch, gt_boxes, gt_labels, gt_valid)`` for :meth:`losses` (see :meth:`prepare_targets`)."""
        batch, originals = self.preprocess(images)
        boxes, labels, valid = self.prepare_targets(targets, originals, max_boxes)
        return batch, jnp.asarray(boxes), jnp.asarray(labels), jnp.asarray(valid)

    def trainable_filter(self) -> Any:
        """An nnx filter of the parameters torchvision trains: all but the backbone ``features``
        before the last ``trainable_backbone_layers`` stages (torchvision's ``_mobilenet_extractor``
        sets ``requires_grad=False`` on those; the default 6 trains everything). Use it as
        ``nnx.Optimizer(model, tx, wrt=model.trainable_filter())``."""
        return frozen_backbone_filter(
            self._stage_indices,
            self.trainable_backbone_layers,
            len(self.backbone.features),
            ("backbone", "features"),
        )

    def __call__(
        self, images: Sequence[Any], targets: Sequence[Mapping[str, Any]] | None = None
    ) -> list[dict[str, np.ndarray]] | dict[str, jax.Array]:
        batch, originals = self.preprocess(images)
        if is_training(self):
            if targets is None:
                raise ValueError("targets should not be none when in training mode")
            boxes, labels, valid = self.prepare_targets(targets, originals)
            return call_compiled(
                self, "losses", batch, jnp.asarray(boxes), jnp.asarray(labels), jnp.asarray(valid)
            )
        return unpad_detections(self.detect_batch(batch), [INPUT_HW] * len(originals), originals)

    def detect_batch(self, batch: jax.Array) -> dict[str, jax.Array]:
        """Fixed-size detections (boxes in the 320x320 frame) for a preprocessed batch (compiled)."""
        return call_compiled(self, "forward_detect", batch)

    # -- traceable implementations ----------------------------------------------------------------

    def _anchors(self, batch: jax.Array, features: Sequence[jax.Array]) -> jax.Array:
        # Static shapes: computed on the host at trace time, a constant of the program.
        dtype = np.dtype(jnp.promote_types(features[0].dtype, jnp.float32))
        return jnp.asarray(self.anchor_generator(batch.shape[1:3], [f.shape[1:3] for f in features], dtype))

    def head_outputs(self, batch: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
        """({"bbox_regression": (N, 3234, 4), "cls_logits": (N, 3234, C)} in at least float32, default
        boxes)."""
        features = self.backbone(batch)
        out = {k: v.astype(jnp.promote_types(v.dtype, jnp.float32)) for k, v in self.head(features).items()}
        return out, self._anchors(batch, features)

    def forward_detect(self, batch: jax.Array) -> dict[str, jax.Array]:
        head, anchors = self.head_outputs(batch)
        return self.postprocess_detections(head, anchors, batch.shape[1:3])

    def postprocess_detections(
        self, head_outputs: Mapping[str, jax.Array], anchors: jax.Array, image_hw: tuple[int, int]
    ) -> dict[str, jax.Array]:
        """torchvision's ``SSD.postprocess_detections`` with static shapes: per image at most
        ``detections_per_img`` boxes (in the ``image_hw`` frame), scores, labels, and their count.

        torchvision's candidates are, per class, the top ``topk_candidates`` of the scores above
        ``score_thresh``; batched NMS runs over all of them (90 x 300 here). Greedy NMS lets a box
        be suppressed only by higher-scored ones, so the best ``m`` candidates decide it alone
        whenever ``detections_per_img`` of them survive or there are no others; then NMS runs on
        those ``m`` (m = 1,024 > 1,000: the same side of torchvision's switch between per-class NMS
        and the coordinate-offset trick as all candidates). They are the best ``m`` (class, anchor)
        scores overall unless a class has more than ``topk_candidates`` of them (then its per-class
        top-k is taken first). Otherwise NMS runs over every candidate. Same result either way.
        """
        cfg = self.config
        coder = BoxCoder(BOX_CODER_WEIGHTS)
        num_anchors, num_classes = head_outputs["cls_logits"].shape[1:]
        groups = num_classes - 1
        k = min(cfg.topk_candidates, num_anchors)
        det_n = cfg.detections_per_img
        m = min(groups * k, max(NMS_FIRST_CANDIDATES, det_n))
        labels = jnp.arange(1, num_classes, dtype=jnp.int32)

        def postprocess_one(args):
            regression, logits = args
            boxes = clip_boxes_to_image(coder.decode_single(regression, anchors), image_hw)
            scores = jax.nn.softmax(logits, axis=-1)[:, 1:].T  # (classes without background, anchors)
            passing = scores > cfg.score_thresh
            masked = jnp.where(passing, scores, -jnp.inf)

            def per_class_top_k():  # torchvision's candidates, class by class (flattened: c * k + j)
                top, idx = jax.lax.top_k(masked, k)
                return top.reshape(-1), idx.reshape(-1), jnp.repeat(labels, k)

            def detections(cand_scores, cand_anchors, cand_labels):
                cand_boxes = boxes[cand_anchors]
                valid = cand_scores > -jnp.inf
                keep, kept = batched_nms_padded(
                    cand_boxes, cand_scores, cand_labels, valid, cfg.nms_thresh, det_n
                )
                return *gather_kept(keep, kept, cand_boxes, cand_scores, cand_labels), kept

            # The best m candidates (score order; equal scores by class, then anchor, as torch's).
            top, flat = jax.lax.top_k(masked.reshape(-1), m)
            group = flat // num_anchors
            per_group = jnp.zeros((groups,), jnp.int32).at[group].add((top > -jnp.inf).astype(jnp.int32))

            def capped(_):  # some class has more than k of them: its top-k first
                all_top, all_anchors, all_labels = per_class_top_k()
                best, pos = jax.lax.top_k(all_top, m)
                return best, all_anchors[pos], all_labels[pos]

            selected = jax.lax.cond(
                jnp.any(per_group > k), capped, lambda _: (top, flat % num_anchors, labels[group]), None
            )
            first = detections(*selected)
            num_candidates = jnp.sum(jnp.minimum(jnp.sum(passing, axis=1), k))
            decided = (first[3] >= det_n) | (num_candidates <= m)
            return jax.lax.cond(decided, lambda _: first, lambda _: detections(*per_class_top_k()), None)

        # lax.map, not vmap: the NMS over every candidate runs only for images that need it.
        boxes, scores, labels_out, num = jax.lax.map(
            postprocess_one, (head_outputs["bbox_regression"], head_outputs["cls_logits"])
        )
        return dict(boxes=boxes, scores=scores, labels=labels_out, num_detections=num)

    def losses(
        self, batch: jax.Array, gt_boxes: jax.Array, gt_labels: jax.Array, gt_valid: jax.Array
    ) -> dict[str, jax.Array]:
        """The train-mode forward: torchvision's losses {"bbox_regression", "classification"} for a
        preprocessed batch and padded targets (as :meth:`prepare_targets` returns them)."""
        head, anchors = self.head_outputs(batch)
        return self.compute_loss(head, anchors, gt_boxes, gt_labels, gt_valid)

    def compute_loss(
        self,
        head_outputs: Mapping[str, jax.Array],
        anchors: jax.Array,
        gt_boxes: jax.Array,
        gt_labels: jax.Array,
        gt_valid: jax.Array,
    ) -> dict[str, jax.Array]:
        """torchvision's ``SSD.compute_loss`` (with its SSDMatcher step) on head outputs (N, A, 4) /
        (N, A, C), default boxes (A, 4) and padded targets in the 320x320 frame.

        Hard negative mining keeps, per image, the ``3 x #positives`` negatives with the largest
        cross-entropy (rank in a descending sort below the count, as torchvision; the sum over
        them does not depend on how equal losses are ordered).
        """
        cfg = self.config
        head = head_outputs
        coder = BoxCoder(BOX_CODER_WEIGHTS)
        # Matching and box targets in the head's precision, as torchvision's anchors and targets are in
        # the images' dtype: float32 targets in a float64 run would round differently per device layout.
        dtype = head["bbox_regression"].dtype
        anchors, gt_boxes = anchors.astype(dtype), gt_boxes.astype(dtype)

        def per_image(regression, logits, boxes, labels, valid):
            matched = ssd_match(box_iou(boxes, anchors), valid, cfg.iou_thresh)
            foreground = matched >= 0
            safe = jnp.maximum(matched, 0)
            target_regression = coder.encode(boxes[safe], anchors)
            # Only matched rows count; zeros elsewhere keep the masked branch finite for autodiff.
            target_regression = jnp.where(foreground[:, None], target_regression, 0.0)
            box_loss = jnp.sum(
                jnp.where(foreground[:, None], smooth_l1(regression - target_regression, 1.0), 0.0)
            )
            cls_target = jnp.where(foreground, labels[safe], 0)
            ce = cross_entropy(logits, cls_target)
            positive = cls_target > 0
            num_negative = cfg.neg_to_pos_ratio * jnp.sum(positive)
            negative_loss = jax.lax.stop_gradient(jnp.where(positive, -jnp.inf, ce))
            order = jnp.argsort(-negative_loss, stable=True)  # descending
            rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
            background = rank < num_negative
            cls_loss = jnp.sum(jnp.where(positive, ce, 0.0)) + jnp.sum(jnp.where(background, ce, 0.0))
            return box_loss, cls_loss, jnp.sum(foreground)

        box_loss, cls_loss, num_foreground = jax.vmap(per_image)(
            head["bbox_regression"], head["cls_logits"], gt_boxes, gt_labels, gt_valid
        )
        n = jnp.maximum(1, jnp.sum(num_foreground)).astype(jnp.float32)
        return {"bbox_regression": jnp.sum(box_loss) / n, "classification": jnp.sum(cls_loss) / n}


# ------------------------------------------------------------------------------------------------
# Builder


def ssdlite320_mobilenet_v3_large(
    *,
    weights: Any = None,
    num_classes: int | None = None,
    weights_backbone: Any = None,
    trainable_backbone_layers: int | None = None,
    norm_layer: Mapping[str, Any] | None = None,
    reduced_tail: bool | None = None,
    dtype: DType | None = None,
    param_dtype: DType = jnp.float32,
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> SSD:
    """SSDlite320 with MobileNetV3-Large, torchvision's arguments (without ``progress``).

    ``kwargs`` are ``SSD``'s: score_thresh (0.001), nms_thresh (0.55), detections_per_img (300),
    topk_candidates (300), iou_thresh (0.5), positive_fraction (0.25), image_mean / image_std
    (0.5); ``size`` is fixed at 320x320 and ignored with a warning, as in torchvision.

    ``norm_layer``: instead of a torch callable, a dict: ``{"norm": "batch", "bn_eps": ...,
    "bn_momentum": ...}`` (BatchNorm2d) or ``{"norm": "frozen", "bn_eps": ...}``
    (FrozenBatchNorm2d); missing values are torch's defaults (1e-5, 0.1). None is torchvision's
    default, BatchNorm2d(eps=0.001, momentum=0.03).

    ``reduced_tail``: torchvision halves the last blocks' channels when the backbone is not built
    from ImageNet weights (``weights_backbone=None``, e.g. for the COCO weights). Here weights are
    always loaded afterwards, so the default is that reduced tail; ``porting.load_torchvision``
    picks False for ``weights_backbone`` and reads it off any full checkpoint.

    ``trainable_backbone_layers`` (0..6, default 6) is recorded on the model for optimizers to use
    (torchvision freezes the stages before it; without trained weights it forces 6).
    """
    builder = "ssdlite320_mobilenet_v3_large"
    reject_weights(builder, weights, weights_backbone)
    if "size" in kwargs:
        warnings.warn("The size of the model is already fixed; ignoring the parameter.", stacklevel=2)
        kwargs.pop("size")
    check_builder_options(builder, kwargs, SSDConfig, trainable_backbone_layers)
    checked = check_builder_args(
        builder,
        num_classes=91 if num_classes is None else num_classes,
        min_classes=1,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    num_classes, dtype, param_dtype = checked["num_classes"], checked.get("dtype"), checked["param_dtype"]
    reduced_tail = True if reduced_tail is None else bool(reduced_tail)
    options = {
        k: tuple(float(x) for x in v) if k in ("image_mean", "image_std") else v for k, v in kwargs.items()
    }
    config = SSDConfig(num_classes=num_classes, **options)
    record: dict[str, Any] = {"num_classes": num_classes, "reduced_tail": reduced_tail}
    if norm_layer is not None:
        record["norm_layer"] = dict(norm_layer)
    if trainable_backbone_layers is not None:
        record["trainable_backbone_layers"] = trainable_backbone_layers
    record.update({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})
    model = SSD(
        builder,
        record,
        config,
        reduced_tail=reduced_tail,
        norm=dict(SSDLITE_NORM) if norm_layer is None else norm_options(norm_layer),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs if rngs is not None else nnx.Rngs(seed),
    )
    model.trainable_backbone_layers = 6 if trainable_backbone_layers is None else trainable_backbone_layers
    return model


__all__ = ["SSD", "SSDConfig", "ssdlite320_mobilenet_v3_large"]
