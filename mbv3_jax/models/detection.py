"""Faster R-CNN with a MobileNetV3-Large FPN backbone (torchvision's 800 px and 320 px models).

Same modules, parameter names and semantics as ``torchvision.models.detection``:

* transform: normalize, bilinear resize (no antialias) of each image so its shorter side is
  ``min_size`` (longer side at most ``max_size``), zero-pad the batch to a multiple of 32;
* backbone: ``features`` of MobileNetV3-Large (BatchNorm eps 1e-5, or FrozenBatchNorm2d for models
  built from trained weights, as torchvision does), FPN over features[13] and features[16] (both
  stride 32) plus a stride-64 max-pool level;
* RPN: a shared 3x3 conv head, anchors 32..512 x ratios 0.5/1/2 on each level, per-level top-k,
  sigmoid, clip, small-box and score filters, NMS per level;
* RoI heads: RoIAlign 7x7 (sampling ratio 2, aligned=False; torchvision's level mapper sends every
  box to the first FPN map here), TwoMLPHead, predictor, box decoding with its clamp,
  per-class NMS, top ``box_detections_per_img``.

Train mode (``model.train()``, ``model(images, targets)``) returns torchvision's four losses:
anchors and proposals (plus the ground-truth boxes) matched by IoU, positives and negatives drawn by
the balanced sampler, smooth-L1 and cross-entropy; no gradient flows through the proposals.

The heavy part runs as one ``jax.jit`` program per padded batch shape with static sizes: fixed
top-k, padded and masked NMS. Images are resized by small per-size programs first, so a stream
of photos of a few sizes compiles a few programs, not one per call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax import backend
from mbv3_jax.layers import Conv2d, DType, Linear, relu
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
    check_builder_args,
    dump_architecture,
    features_out_channels,
    frozen_backbone_filter,
    mobilenet_v3_config,
    mobilenet_v3_features,
    stage_indices,
)
from mbv3_jax.ops.anchors import AnchorGenerator
from mbv3_jax.ops.boxes import (
    BoxCoder,
    batched_nms_padded,
    box_iou,
    clip_boxes_to_image,
    remove_small_boxes_mask,
)
from mbv3_jax.ops.matcher import BELOW_LOW_THRESHOLD, balanced_sample, match
from mbv3_jax.ops.roi_align import infer_scale, roi_align
from mbv3_jax.ops.top_first_nms import batched_nms_top_first
from mbv3_jax.runtime import List, Model, Module, call_compiled

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
ANCHOR_SIZES = ((32, 64, 128, 256, 512),) * 3
ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * 3
FPN_CHANNELS = 256
SIZE_DIVISIBLE = 32


@dataclasses.dataclass(frozen=True)
class FasterRCNNConfig:
    """torchvision ``FasterRCNN`` keyword arguments (defaults of ``fasterrcnn_mobilenet_v3_large_fpn``)."""

    num_classes: int = 91
    min_size: int = 800
    max_size: int = 1333
    image_mean: tuple[float, ...] = IMAGE_MEAN
    image_std: tuple[float, ...] = IMAGE_STD
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_score_thresh: float = 0.05
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] | None = None


# ------------------------------------------------------------------------------------------------
# Modules


class FeaturePyramidNetwork(Module):
    """torchvision's FPN: 1x1 lateral convs, nearest top-down upsampling, 3x3 output convs."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, *, kw: dict[str, Any]):
        self.inner_blocks = List([Conv2d(c, out_channels, 1, **kw) for c in in_channels])
        self.layer_blocks = List(
            [Conv2d(out_channels, out_channels, 3, padding=1, **kw) for _ in in_channels]
        )

    def __call__(self, xs: Sequence[jax.Array]) -> list[jax.Array]:
        last_inner = self.inner_blocks[-1](xs[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(xs) - 2, -1, -1):
            lateral = self.inner_blocks[idx](xs[idx])
            last_inner = lateral + _resize_nearest(last_inner, lateral.shape[1:3])
            results.insert(0, self.layer_blocks[idx](last_inner))
        # LastLevelMaxPool: max_pool2d(kernel 1, stride 2) == every other pixel.
        results.append(results[-1][:, ::2, ::2, :])
        return results


def _resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """``F.interpolate(mode="nearest")``: source index floor(dst * in / out) in float32."""
    for axis, out in ((1, int(size[0])), (2, int(size[1]))):
        n = x.shape[axis]
        if n != out:
            scale = np.float32(n) / np.float32(out)
            idx = np.minimum((np.arange(out, dtype=np.float32) * scale).astype(np.int64), n - 1)
            x = jnp.take(x, idx, axis=axis)
    return x


class RPNHead(Module):
    def __init__(self, in_channels: int, num_anchors: int, *, kw: dict[str, Any]):
        self.conv = Conv2d(in_channels, in_channels, 3, padding=1, **kw)
        self.cls_logits = Conv2d(in_channels, num_anchors, 1, **kw)
        self.bbox_pred = Conv2d(in_channels, num_anchors * 4, 1, **kw)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        t = relu(self.conv(x))
        return self.cls_logits(t), self.bbox_pred(t)


class RPN(Module):
    def __init__(self, head: RPNHead):
        self.head = head


class TwoMLPHead(Module):
    """fc6 -> ReLU -> fc7 -> ReLU. fc6's kernel is stored (out, in) like torch's, with its input
    axis in (y, x, channel) order so the NHWC RoI features flatten directly; the porting layer
    permutes torch's channel-major inputs."""

    def __init__(self, in_features: int, representation: int, *, kw: dict[str, Any]):
        self.fc6 = Linear(in_features, representation, kernel_layout="out_in", **kw)
        self.fc7 = Linear(representation, representation, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return relu(self.fc7(relu(self.fc6(x.reshape(x.shape[0], -1)))))


class FastRCNNPredictor(Module):
    def __init__(self, in_channels: int, num_classes: int, *, kw: dict[str, Any]):
        self.cls_score = Linear(in_channels, num_classes, **kw)
        self.bbox_pred = Linear(in_channels, num_classes * 4, **kw)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(Module):
    def __init__(self, box_head: TwoMLPHead, box_predictor: FastRCNNPredictor):
        self.box_head = box_head
        self.box_predictor = box_predictor


class BackboneWithFPN(Module):
    def __init__(self, body: List, fpn: FeaturePyramidNetwork, return_stages: tuple[int, ...]):
        self.body = body
        self.fpn = fpn
        self.return_stages = return_stages

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        feats = []
        for i, layer in enumerate(self.body):
            x = layer(x)
            if i in self.return_stages:
                feats.append(x)
        return self.fpn(feats)


# ------------------------------------------------------------------------------------------------
# Host-side transform (torchvision's GeneralizedRCNNTransform)


def resized_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Output size of torchvision's resize: ``floor(side * min(min_size/short, max_size/long))``."""
    scale = min(min_size / min(h, w), max_size / max(h, w))  # Python floats, as torchvision
    return int(math.floor(h * scale)), int(math.floor(w * scale))


# ------------------------------------------------------------------------------------------------
# The model


class FasterRCNN(Model):
    """``model(images)`` in eval mode: a list (one per image) of {"boxes", "scores", "labels"} with
    boxes (x1, y1, x2, y2) in the original image's pixels. Images: HWC float in [0, 1], any sizes.

    Like torchvision, a new model is in train mode: call ``.eval()`` for inference.
    """

    # The transform resizes keeping each image's aspect ratio (shorter side min_size, longer at most
    # max_size); batches are padded to a common size.
    keeps_aspect_ratio: ClassVar[bool] = True
    backbone_features: ClassVar[tuple[str, ...]] = ("backbone", "body")  # MobileNetV3-Large's features

    def __init__(
        self,
        builder: str,
        kwargs: dict[str, Any],
        config: FasterRCNNConfig,
        *,
        frozen_batchnorm: bool,
        dtype: DType | None,
        param_dtype: DType,
        rngs: nnx.Rngs,
    ):
        self.config = config
        table, _ = mobilenet_v3_config("mobilenet_v3_large", 1.0, False, False)
        # torch's class defaults (eps 1e-5, momentum 0.1) for either norm layer.
        norm = norm_options({"norm": "frozen" if frozen_batchnorm else "batch"})
        body = mobilenet_v3_features(table, dtype=dtype, param_dtype=param_dtype, rngs=rngs, norm=norm)
        stages = stage_indices(table)
        self._stage_indices = tuple(stages)
        returned = (stages[-2], stages[-1])  # torchvision's _mobilenet_extractor: the last two stages
        in_channels = [table[stages[-2] - 1].out_channels, features_out_channels(table)]
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.backbone = BackboneWithFPN(
            body, FeaturePyramidNetwork(in_channels, FPN_CHANNELS, kw=kw), returned
        )
        self.anchor_generator = AnchorGenerator(ANCHOR_SIZES, ASPECT_RATIOS)
        num_anchors = self.anchor_generator.num_anchors_per_location()[0]
        self.rpn = RPN(RPNHead(FPN_CHANNELS, num_anchors, kw=kw))
        self.roi_heads = RoIHeads(
            TwoMLPHead(FPN_CHANNELS * 7 * 7, 1024, kw=kw),
            FastRCNNPredictor(1024, config.num_classes, kw=kw),
        )
        self.num_classes = config.num_classes
        self.dtype = dtype
        self.deterministic = False  # a new model is in train mode, as in torchvision
        self._sampler = _SamplerSeed()
        self.architecture_json = dump_architecture({"builder": builder, "kwargs": kwargs}, dtype, param_dtype)

    # -- public API -------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Any]) -> tuple[jax.Array, np.ndarray, list[tuple[int, int]]]:
        """(padded normalized NHWC batch, resized (h, w) per image, original (h, w) per image)."""
        cfg = self.config
        resized, sizes, originals = normalize_and_resize_images(
            images, cfg.image_mean, cfg.image_std, lambda h, w: resized_size(h, w, cfg.min_size, cfg.max_size)
        )
        pad_h = int(math.ceil(max(s[0] for s in sizes) / SIZE_DIVISIBLE) * SIZE_DIVISIBLE)
        pad_w = int(math.ceil(max(s[1] for s in sizes) / SIZE_DIVISIBLE) * SIZE_DIVISIBLE)
        batch = jnp.stack(
            [jnp.pad(r, ((0, pad_h - r.shape[0]), (0, pad_w - r.shape[1]), (0, 0))) for r in resized]
        )
        return batch, np.asarray(sizes, np.int32), originals

    def __call__(
        self,
        images: Sequence[Any],
        targets: Sequence[dict[str, Any]] | None = None,
        *,
        key: jax.Array | None = None,
    ) -> list[dict[str, np.ndarray]] | dict[str, jax.Array]:
        """Eval mode: detections per image. Train mode: torchvision's four losses for ``targets``
        (per image {"boxes": (G, 4) x1 y1 x2 y2 in the image's pixels, "labels": (G,) ints}).

        ``key`` seeds the train-mode samplers; without it each call draws a new one from the
        model's seed. For gradients, use :meth:`training_batch` and :meth:`forward_train`.
        """
        if is_training(self):
            if targets is None:
                raise ValueError(
                    "in train mode targets should be passed (or call model.eval() for detections)"
                )
            inputs, max_hw = self.training_batch(images, targets)
            if key is None:
                key = self._sampler.next_key()
            return call_compiled(self, "forward_train", *inputs, key, static_args=(max_hw,))
        batch, sizes, originals = self.preprocess(images)
        return unpad_detections(self.detect_batch(batch, sizes), sizes, originals)

    def detect_batch(self, batch: jax.Array, image_sizes: np.ndarray) -> dict[str, jax.Array]:
        """Fixed-size detections for a preprocessed batch (compiled per padded shape)."""
        # RoIAlign's scale: torchvision infers it from the feature size and the largest image.
        max_hw = (int(np.max(image_sizes[:, 0])), int(np.max(image_sizes[:, 1])))
        return call_compiled(self, "forward_detect", batch, jnp.asarray(image_sizes), static_args=(max_hw,))

    def rpn_proposals(self, batch: jax.Array, image_sizes: np.ndarray) -> dict[str, jax.Array]:
        """The RPN's outputs: decoded proposals before NMS (per-level top-k) and after NMS."""
        return call_compiled(self, "forward_rpn", batch, jnp.asarray(image_sizes))

    def training_batch(
        self, images: Sequence[Any], targets: Sequence[dict[str, Any]]
    ) -> tuple[tuple[jax.Array, ...], tuple[int, int]]:
        """Preprocessed images and padded targets for :meth:`forward_train`:
        ((batch, image_sizes, gt_boxes, gt_labels, gt_valid), max_hw).

        Boxes are scaled as torchvision's transform does (float32 ratios resized / original);
        ground truth is padded to a power of two per image so few programs get compiled.
        """
        batch, sizes, originals = self.preprocess(images)
        boxes_list, labels_list = resized_targets(targets, originals, sizes, self.num_classes)
        gt_boxes, gt_labels, gt_valid = pad_targets(
            boxes_list, labels_list, min_slots=1, pad_box=(0.0, 0.0, 0.0, 0.0)
        )
        max_hw = (int(np.max(sizes[:, 0])), int(np.max(sizes[:, 1])))
        inputs = (
            batch,
            jnp.asarray(sizes),
            jnp.asarray(gt_boxes),
            jnp.asarray(gt_labels),
            jnp.asarray(gt_valid),
        )
        return inputs, max_hw

    def trainable_filter(self) -> Any:
        """An nnx filter of the parameters torchvision trains: all but the backbone layers before
        the last ``trainable_backbone_layers`` stages (torchvision sets ``requires_grad=False``
        on those). Use it as ``nnx.Optimizer(model, tx, wrt=model.trainable_filter())``."""
        return frozen_backbone_filter(
            self._stage_indices, self.trainable_backbone_layers, len(self.backbone.body), ("backbone", "body")
        )

    # -- traceable implementations ----------------------------------------------------------------

    def _anchors(self, batch_hw: tuple[int, int], feats: Sequence[jax.Array]) -> np.ndarray:
        return self.anchor_generator(batch_hw, [f.shape[1:3] for f in feats])

    def _rpn_head(self, feats: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array, list[int]]:
        """Objectness logits (N, A) and box deltas (N, A, 4), anchors in (level, y, x, anchor) order."""
        n = feats[0].shape[0]
        logits, deltas, per_level = [], [], []
        for f in feats:
            lg, dl = self.rpn.head(f)
            logits.append(lg.reshape(n, -1))
            deltas.append(dl.reshape(n, -1, 4))
            per_level.append(lg.shape[1] * lg.shape[2] * lg.shape[3])
        objectness = _at_least_f32(jnp.concatenate(logits, axis=1))
        return objectness, _at_least_f32(jnp.concatenate(deltas, axis=1)), per_level

    def _rpn(self, feats: Sequence[jax.Array], batch_hw: tuple[int, int], image_sizes: jax.Array):
        objectness, deltas, per_level = self._rpn_head(feats)
        anchors = jnp.asarray(self._anchors(batch_hw, feats))
        return self._rpn_filter(objectness, deltas, per_level, anchors, image_sizes)

    def _rpn_filter(self, objectness, deltas, per_level, anchors, image_sizes) -> dict[str, jax.Array]:
        """torchvision's ``RegionProposalNetwork.filter_proposals`` (no gradient flows through)."""
        cfg = self.config
        objectness, deltas = jax.lax.stop_gradient(objectness), jax.lax.stop_gradient(deltas)
        coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        proposals = jax.vmap(lambda d: coder.decode_single(d, anchors))(deltas)
        training = is_training(self)
        pre_n = cfg.rpn_pre_nms_top_n_train if training else cfg.rpn_pre_nms_top_n_test
        post_n = cfg.rpn_post_nms_top_n_train if training else cfg.rpn_post_nms_top_n_test

        # Per level top-k of the logits (torchvision's _get_top_n_idx), then one candidate list.
        idx, lvl = [], []
        offset = 0
        for level, count in enumerate(per_level):
            k = min(pre_n, count)
            _, top = jax.lax.top_k(objectness[:, offset : offset + count], k)
            idx.append(top + offset)
            lvl.append(np.full((k,), level, np.int32))
            offset += count
        idx = jnp.concatenate(idx, axis=1)
        levels = jnp.asarray(np.concatenate(lvl))
        cand_boxes = jnp.take_along_axis(proposals, idx[..., None], axis=1)
        cand_scores = jax.nn.sigmoid(jnp.take_along_axis(objectness, idx, axis=1))

        def filter_one(boxes, scores, size):
            boxes = clip_boxes_to_image(boxes, size)
            valid = remove_small_boxes_mask(boxes, 1e-3) & (scores >= cfg.rpn_score_thresh)
            keep, count = batched_nms_padded(boxes, scores, levels, valid, cfg.rpn_nms_thresh, post_n)
            return boxes, valid, *gather_kept(keep, count, boxes, scores), count

        clipped, valid, kept_boxes, kept_scores, counts = jax.vmap(filter_one)(
            cand_boxes, cand_scores, image_sizes
        )
        return dict(
            candidates=clipped,  # per-level top-k, decoded and clipped: what NMS sees where valid
            candidate_scores=cand_scores,
            candidate_valid=valid,
            proposals=kept_boxes,
            proposal_scores=kept_scores,
            num_proposals=counts,
        )

    def forward_rpn(self, batch: jax.Array, image_sizes: jax.Array) -> dict[str, jax.Array]:
        feats = self.backbone(batch)
        return self._rpn(feats, batch.shape[1:3], image_sizes)

    def _box_head(self, feats: Sequence[jax.Array], proposals: jax.Array, max_hw: tuple[int, int]):
        """RoIAlign + TwoMLPHead + predictor on (N, K, 4) boxes: logits (N, K, C), deltas (N, K, C, 4)."""
        n, k = proposals.shape[:2]
        # MultiScaleRoIAlign over maps "0" and "1" (both stride 32): the level mapper's range is a
        # single level, so every box is pooled from map "0" (torchvision's own result here).
        scales = [infer_scale(f.shape[1:3], max_hw) for f in feats[:2]]
        if scales[0] != scales[1]:
            raise NotImplementedError(f"FPN maps at different scales {scales}: not this backbone")
        batch_idx = jnp.repeat(jnp.arange(n, dtype=jnp.float32), k)
        rois = jnp.concatenate([batch_idx[:, None], proposals.reshape(-1, 4)], axis=1)
        # RoIAlign in its own buffer: fused into fc6's operand, XLA:CPU would recompute every
        # sample's taps for each of the 12544 pooled values per RoI.
        pooled = backend.unfused(
            lambda f, r: roi_align(f, r, (7, 7), scales[0], 2, aligned=False), feats[0], rois
        )
        class_logits, box_regression = self.roi_heads.box_predictor(self.roi_heads.box_head(pooled))
        return (
            _at_least_f32(class_logits).reshape(n, k, -1),
            _at_least_f32(box_regression).reshape(n, k, -1, 4),
        )

    def forward_detect(self, batch: jax.Array, image_sizes: jax.Array, max_hw: tuple[int, int]):
        cfg = self.config
        feats = self.backbone(batch)
        rpn = self._rpn(feats, batch.shape[1:3], image_sizes)
        proposals, counts = rpn["proposals"], rpn["num_proposals"]
        k = proposals.shape[1]
        class_logits, box_regression = self._box_head(feats, proposals, max_hw)
        coder = BoxCoder(cfg.bbox_reg_weights or BOX_CODER_WEIGHTS)
        num_classes = class_logits.shape[-1]
        det_n = cfg.box_detections_per_img

        def candidates_one(logits, regression, props, count, size):
            boxes = coder.decode_single(regression.reshape(-1, 4), jnp.repeat(props, num_classes, axis=0))
            boxes = clip_boxes_to_image(boxes, size).reshape(k, num_classes, 4)
            scores = jax.nn.softmax(logits, axis=-1)
            labels = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), (k, num_classes))
            boxes, scores, labels = (
                boxes[:, 1:].reshape(-1, 4),
                scores[:, 1:].reshape(-1),
                labels[:, 1:].reshape(-1),
            )
            proposal_ok = jnp.repeat(jnp.arange(k) < count, num_classes - 1)
            valid = proposal_ok & (scores > cfg.box_score_thresh) & remove_small_boxes_mask(boxes, 1e-2)
            return boxes, scores, labels, valid

        boxes, scores, labels, valid = jax.vmap(candidates_one)(
            class_logits, box_regression, proposals, counts, image_sizes
        )

        def nms_one(args):
            # k x (classes - 1) candidates (13,500 at 320 px, 90,000 at 800 px) for 100 detections:
            # NMS decided on the best-scored ones first (same result as on all of them).
            b, s, lab, ok = args
            keep, kept = batched_nms_top_first(b, s, lab, ok, cfg.box_nms_thresh, det_n)
            return *gather_kept(keep, kept, b, s, lab), kept

        # lax.map, not vmap: each image falls back to the full NMS only when it needs to.
        boxes, scores, labels, num = jax.lax.map(nms_one, (boxes, scores, labels, valid))
        return dict(boxes=boxes, scores=scores, labels=labels, num_detections=num)

    def forward_train(
        self,
        batch: jax.Array,
        image_sizes: jax.Array,
        gt_boxes: jax.Array,
        gt_labels: jax.Array,
        gt_valid: jax.Array,
        key: jax.Array,
        max_hw: tuple[int, int],
    ) -> dict[str, jax.Array]:
        """torchvision's train-mode losses: loss_classifier, loss_box_reg (RoI heads) and
        loss_objectness, loss_rpn_box_reg (RPN). Proposals carry no gradient, as in torchvision."""
        cfg = self.config
        key_rpn, key_roi = jax.random.split(key)
        feats = self.backbone(batch)
        objectness, deltas, per_level = self._rpn_head(feats)
        anchors = jnp.asarray(self._anchors(batch.shape[1:3], feats))
        rpn = self._rpn_filter(objectness, deltas, per_level, anchors, image_sizes)
        n = batch.shape[0]

        # RPN: every anchor against the ground truth (torchvision's assign_targets_to_anchors).
        def rpn_targets(boxes, valid, k):
            matched = match(
                box_iou(boxes, anchors), valid, cfg.rpn_fg_iou_thresh, cfg.rpn_bg_iou_thresh, True
            )
            targets = BoxCoder((1.0, 1.0, 1.0, 1.0)).encode(boxes[jnp.maximum(matched, 0)], anchors)
            pos, neg = balanced_sample(
                matched >= 0,
                matched == BELOW_LOW_THRESHOLD,
                cfg.rpn_batch_size_per_image,
                cfg.rpn_positive_fraction,
                k,
            )
            # Zero where unused: encoding against a padded box gives inf, and NaN gradients.
            return jnp.where(pos[:, None], targets, 0.0), pos, neg

        rpn_reg_targets, rpn_pos, rpn_neg = jax.vmap(rpn_targets)(
            gt_boxes, gt_valid, jax.random.split(key_rpn, n)
        )
        rpn_sampled = jnp.maximum(jnp.sum(rpn_pos) + jnp.sum(rpn_neg), 1)
        bce = _bce_with_logits(objectness, rpn_pos.astype(objectness.dtype))
        loss_objectness = jnp.sum(jnp.where(rpn_pos | rpn_neg, bce, 0.0)) / rpn_sampled
        rpn_l1 = smooth_l1(deltas - rpn_reg_targets, 1.0 / 9.0).sum(-1)
        loss_rpn_box_reg = jnp.sum(jnp.where(rpn_pos, rpn_l1, 0.0)) / rpn_sampled

        # RoI heads: proposals plus the ground truth boxes (select_training_samples).
        proposals = jnp.concatenate([rpn["proposals"], gt_boxes], axis=1)
        post_n = rpn["proposals"].shape[1]
        proposal_valid = jnp.concatenate(
            [jnp.arange(post_n)[None, :] < rpn["num_proposals"][:, None], gt_valid], axis=1
        )

        def roi_targets(props, ok, boxes, labels, valid, k):
            quality = box_iou(boxes, props)
            matched = match(quality, valid, cfg.box_fg_iou_thresh, cfg.box_bg_iou_thresh, False, ok)
            safe = jnp.maximum(matched, 0)
            cls = jnp.where(matched >= 0, labels[safe], 0)
            coder = BoxCoder(cfg.bbox_reg_weights or BOX_CODER_WEIGHTS)
            targets = coder.encode(boxes[safe], props)
            pos, neg = balanced_sample(
                ok & (matched >= 0) & (cls >= 1),
                ok & (matched == BELOW_LOW_THRESHOLD),
                cfg.box_batch_size_per_image,
                cfg.box_positive_fraction,
                k,
            )
            return cls, jnp.where(pos[:, None], targets, 0.0), pos, neg

        cls, roi_reg_targets, roi_pos, roi_neg = jax.vmap(roi_targets)(
            proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, jax.random.split(key_roi, n)
        )
        # Only sampled boxes matter; the others are pooled too (static shapes) and masked out.
        class_logits, box_regression = self._box_head(feats, jax.lax.stop_gradient(proposals), max_hw)
        roi_sampled = jnp.maximum(jnp.sum(roi_pos) + jnp.sum(roi_neg), 1)
        ce = cross_entropy(class_logits, cls)
        loss_classifier = jnp.sum(jnp.where(roi_pos | roi_neg, ce, 0.0)) / roi_sampled
        per_class = jnp.take_along_axis(box_regression, cls[..., None, None], axis=2)[:, :, 0]
        roi_l1 = smooth_l1(per_class - roi_reg_targets, 1.0 / 9.0).sum(-1)
        loss_box_reg = jnp.sum(jnp.where(roi_pos, roi_l1, 0.0)) / roi_sampled
        return dict(
            loss_classifier=loss_classifier,
            loss_box_reg=loss_box_reg,
            loss_objectness=loss_objectness,
            loss_rpn_box_reg=loss_rpn_box_reg,
        )


def _at_least_f32(x: jax.Array) -> jax.Array:
    """Heads may compute in bf16; boxes and losses are float32 (float64 stays float64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _bce_with_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """torch's binary_cross_entropy_with_logits elementwise: (1 - y) x + log(1 + exp(-x)), stable."""
    return (1.0 - labels) * logits + jnp.logaddexp(0.0, -logits)


class _SamplerSeed:
    """Host-side counter for train-mode sampler keys (a plain object: not model state)."""

    def __init__(self, seed: int = 0):
        self.seed, self.calls = seed, 0

    def next_key(self) -> jax.Array:
        self.calls += 1
        return jax.random.fold_in(jax.random.key(self.seed), self.calls)


# ------------------------------------------------------------------------------------------------
# Builders


_320_DEFAULTS = dict(min_size=320, max_size=640, rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=150)


def _faster_rcnn(builder: str, args: dict[str, Any], defaults: dict[str, Any]) -> FasterRCNN:
    args = dict(args)
    weights, weights_backbone = args.pop("weights"), args.pop("weights_backbone")
    dtype, param_dtype, rngs, seed = (
        args.pop("dtype"),
        args.pop("param_dtype"),
        args.pop("rngs"),
        args.pop("seed"),
    )
    frozen = args.pop("frozen_batchnorm")
    reject_weights(builder, weights, weights_backbone)
    extra = args.pop("kwargs")
    num_classes = args.pop("num_classes")
    checked = check_builder_args(
        builder,
        num_classes=91 if num_classes is None else num_classes,
        min_classes=1,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    num_classes, dtype, param_dtype = checked["num_classes"], checked.get("dtype"), checked["param_dtype"]
    trainable = args.pop("trainable_backbone_layers")
    check_builder_options(builder, extra, FasterRCNNConfig, trainable)
    options = {**defaults, **extra, "num_classes": num_classes}
    config = FasterRCNNConfig(**options)
    record = {"num_classes": num_classes, "frozen_batchnorm": bool(frozen), **extra}
    if trainable is not None:
        record["trainable_backbone_layers"] = trainable
    model = FasterRCNN(
        builder,
        record,
        config,
        frozen_batchnorm=bool(frozen),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs if rngs is not None else nnx.Rngs(seed),
    )
    # torchvision: 3 trainable stages by default with pretrained weights, all 6 from scratch.
    model.trainable_backbone_layers = trainable if trainable is not None else (3 if frozen else 6)
    return model


def fasterrcnn_mobilenet_v3_large_fpn(
    *,
    weights: Any = None,
    num_classes: int | None = None,
    weights_backbone: Any = None,
    trainable_backbone_layers: int | None = None,
    frozen_batchnorm: bool = False,
    dtype: DType | None = None,
    param_dtype: DType = jnp.float32,
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN, MobileNetV3-Large FPN, 800 px (torchvision's arguments; ``kwargs`` are
    ``FasterRCNN``'s: min_size, max_size, rpn_* and box_* thresholds and top-n, ...).

    ``frozen_batchnorm``: torchvision uses FrozenBatchNorm2d when built from trained weights (what
    ``porting.load_torchvision`` does for detection checkpoints) and BatchNorm2d otherwise.
    """
    return _faster_rcnn("fasterrcnn_mobilenet_v3_large_fpn", locals(), {})


def fasterrcnn_mobilenet_v3_large_320_fpn(
    *,
    weights: Any = None,
    num_classes: int | None = None,
    weights_backbone: Any = None,
    trainable_backbone_layers: int | None = None,
    frozen_batchnorm: bool = False,
    dtype: DType | None = None,
    param_dtype: DType = jnp.float32,
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> FasterRCNN:
    """The low-resolution variant: min_size 320, max_size 640, RPN top-n 150 before and after NMS."""
    return _faster_rcnn("fasterrcnn_mobilenet_v3_large_320_fpn", locals(), _320_DEFAULTS)
