"""Array ops shared by the model families (resizing; detection ops live alongside)."""

from mbv3_jax.ops.anchors import AnchorGenerator, DefaultBoxGenerator
from mbv3_jax.ops.boxes import (
    BoxCoder,
    batched_nms,
    batched_nms_padded,
    box_area,
    box_iou,
    clip_boxes_to_image,
    nms,
    nms_padded,
    remove_small_boxes,
    remove_small_boxes_mask,
)
from mbv3_jax.ops.interpolate import interpolate_bilinear, linear_taps
from mbv3_jax.ops.roi_align import infer_scale, level_mapper, multiscale_roi_align, roi_align
from mbv3_jax.ops.top_first_nms import batched_nms_top_first

__all__ = [
    "AnchorGenerator",
    "BoxCoder",
    "DefaultBoxGenerator",
    "batched_nms",
    "batched_nms_padded",
    "batched_nms_top_first",
    "box_area",
    "box_iou",
    "clip_boxes_to_image",
    "infer_scale",
    "interpolate_bilinear",
    "level_mapper",
    "linear_taps",
    "multiscale_roi_align",
    "nms",
    "nms_padded",
    "remove_small_boxes",
    "remove_small_boxes_mask",
    "roi_align",
]
