"""Box utilities and non-maximum suppression, numerically equal to ``torchvision.ops`` (float32, CPU).

Boxes are ``(x1, y1, x2, y2)`` float32 arrays. Everything that the detection models call inside a
compiled step (``box_iou``, ``BoxCoder``, ``clip_boxes_to_image``, ``remove_small_boxes_mask``,
``nms_padded``, ``batched_nms_padded``) has static shapes and runs under ``jax.jit``; variable-length
sets are fixed-size arrays plus a ``valid`` mask. ``nms``, ``batched_nms`` and ``remove_small_boxes``
are eager conveniences returning index arrays, as torchvision's functions do.

Three float32 facts drive the code (all measured with the pinned jax/XLA:CPU and torch):

- XLA:CPU contracts ``a * b + c`` into a fused multiply-add (one rounding instead of two), where
  torchvision's kernels round the product first. Products that feed an addition go through
  ``_rounded`` (``nextafter(x, x)``, an identity that XLA cannot see through), so the sum is formed
  from the rounded product as in torch. This keeps NMS decisions at an IoU exactly on the threshold
  identical to torch's.
- XLA rewrites ``a / broadcast(b)`` (division by a constant or by a broadcast scalar/row) as
  ``a * (1 / b)``, which is not correctly rounded. ``_divide`` hands XLA a full-size divisor behind an
  optimization barrier, which keeps the true IEEE division torch performs.
- torchvision's NMS kernel compares the float32 IoU with the threshold as a C++ ``double``; the
  comparison is reproduced exactly with the largest float32 not above the threshold.

``jnp.exp`` / ``jnp.log`` are not bit-identical to torch's (either may be 1 ulp off the true value),
so ``BoxCoder`` agrees with torchvision to ~1 ulp, not bit for bit; everything else here is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "BoxCoder",
    "batched_nms",
    "batched_nms_padded",
    "box_area",
    "box_iou",
    "clip_boxes_to_image",
    "nms",
    "nms_padded",
    "remove_small_boxes",
    "remove_small_boxes_mask",
]

# torchvision.ops.batched_nms on CPU: per-class NMS ("vanilla") when boxes.numel() > 4000, the
# coordinate-offset trick otherwise (the threshold is 100_000 on CUDA).
TORCHVISION_CPU_VANILLA_NUMEL = 4000


@jax.custom_jvp
def _rounded(x: jax.Array) -> jax.Array:
    """``x`` unchanged, but opaque to XLA's multiply-add contraction (see the module docstring).
    Differentiable: the identity's derivative (``nextafter`` itself has no rule)."""
    return jnp.nextafter(x, x)


@_rounded.defjvp
def _rounded_jvp(primals, tangents):
    return _rounded(primals[0]), tangents[0]


def _divide(a: jax.Array, b: jax.Array | float) -> jax.Array:
    """IEEE ``a / b`` (broadcasting); XLA would turn a broadcast divisor into a reciprocal multiply."""
    a, b = jnp.broadcast_arrays(jnp.asarray(a), jnp.asarray(b, jnp.result_type(a)))
    return a / lax.optimization_barrier(b)


def box_area(boxes: jax.Array) -> jax.Array:
    """``torchvision.ops.box_area`` (xyxy): ``(x2 - x1) * (y2 - y1)``, negative for inverted boxes."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """``torchvision.ops.box_iou``: (..., N, 4) x (..., M, 4) -> (..., N, M), same float32 op order.

    ``inter / (area1 + area2 - inter)`` with the overlap clamped at 0; 0/0 (two empty boxes) is NaN
    as in torch.
    """
    area1 = _rounded(box_area(boxes1))
    area2 = _rounded(box_area(boxes2))
    lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = jnp.clip(rb - lt, min=0)
    inter = _rounded(wh[..., 0] * wh[..., 1])
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union


def clip_boxes_to_image(boxes: jax.Array, size_hw: Sequence[int] | jax.Array) -> jax.Array:
    """``torchvision.ops.clip_boxes_to_image``: x into [0, width], y into [0, height]."""
    height, width = size_hw[0], size_hw[1]
    x = jnp.clip(boxes[..., 0::2], 0, width)
    y = jnp.clip(boxes[..., 1::2], 0, height)
    return jnp.stack((x, y), axis=-1).reshape(boxes.shape)


def remove_small_boxes_mask(boxes: jax.Array, min_size: float) -> jax.Array:
    """Mask form of ``torchvision.ops.remove_small_boxes``: ``(w >= min_size) & (h >= min_size)``.

    torch compares the float32 sides with ``min_size`` rounded to float32, as jnp does here.
    """
    ws = boxes[..., 2] - boxes[..., 0]
    hs = boxes[..., 3] - boxes[..., 1]
    return (ws >= min_size) & (hs >= min_size)


def remove_small_boxes(boxes: jax.Array | np.ndarray, min_size: float) -> np.ndarray:
    """``torchvision.ops.remove_small_boxes`` (eager): int64 indices of the boxes that are kept."""
    return np.nonzero(np.asarray(remove_small_boxes_mask(jnp.asarray(boxes, jnp.float32), min_size)))[0]


class BoxCoder:
    """``torchvision.models.detection._utils.BoxCoder``: (dx, dy, dw, dh) regression codes.

    ``weights`` divide the codes on decode (and multiply the targets on encode); ``dw``/``dh`` are
    clamped at ``bbox_xform_clip`` before ``exp``. Faster R-CNN uses (1, 1, 1, 1) in the RPN and
    (10, 10, 5, 5) in the box head; SSD uses (10, 10, 5, 5).
    """

    def __init__(
        self, weights: tuple[float, float, float, float], bbox_xform_clip: float = math.log(1000.0 / 16)
    ) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    def encode(self, reference_boxes: jax.Array, proposals: jax.Array) -> jax.Array:
        """``encode_single``: the codes that map ``proposals`` (N, 4) onto ``reference_boxes`` (N, 4).

        torchvision's ``encode`` takes per-image lists and concatenates them; pass the concatenation.
        """
        wx, wy, ww, wh = (jnp.asarray(w, reference_boxes.dtype) for w in self.weights)
        px1, py1, px2, py2 = (proposals[:, i] for i in range(4))
        gx1, gy1, gx2, gy2 = (reference_boxes[:, i] for i in range(4))
        ex_w = px2 - px1
        ex_h = py2 - py1
        ex_cx = px1 + 0.5 * ex_w
        ex_cy = py1 + 0.5 * ex_h
        gt_w = gx2 - gx1
        gt_h = gy2 - gy1
        gt_cx = gx1 + 0.5 * gt_w
        gt_cy = gy1 + 0.5 * gt_h
        dx = wx * (gt_cx - ex_cx) / ex_w
        dy = wy * (gt_cy - ex_cy) / ex_h
        dw = ww * jnp.log(gt_w / ex_w)
        dh = wh * jnp.log(gt_h / ex_h)
        return jnp.stack((dx, dy, dw, dh), axis=1)

    def decode_single(self, rel_codes: jax.Array, boxes: jax.Array) -> jax.Array:
        """``decode_single``: codes (N, 4K) applied to boxes (N, 4) -> (N, 4K) boxes."""
        boxes = boxes.astype(rel_codes.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights

        wx, wy, ww, wh = self.weights
        dx = _divide(rel_codes[:, 0::4], wx)
        dy = _divide(rel_codes[:, 1::4], wy)
        # torch.clamp(max=...) rounds the bound to float32 and propagates NaN, as jnp.minimum does.
        dw = jnp.minimum(_divide(rel_codes[:, 2::4], ww), self.bbox_xform_clip)
        dh = jnp.minimum(_divide(rel_codes[:, 3::4], wh), self.bbox_xform_clip)

        pred_ctr_x = _rounded(dx * widths[:, None]) + ctr_x[:, None]
        pred_ctr_y = _rounded(dy * heights[:, None]) + ctr_y[:, None]
        pred_w = jnp.exp(dw) * widths[:, None]
        pred_h = jnp.exp(dh) * heights[:, None]
        c_to_c_w = 0.5 * pred_w
        c_to_c_h = 0.5 * pred_h
        pred = jnp.stack(
            (pred_ctr_x - c_to_c_w, pred_ctr_y - c_to_c_h, pred_ctr_x + c_to_c_w, pred_ctr_y + c_to_c_h),
            axis=2,
        )
        return pred.reshape(pred.shape[0], -1)

    def decode(self, rel_codes: jax.Array, boxes: jax.Array | Sequence[jax.Array]) -> jax.Array:
        """``decode``: codes (N, 4K) (or anything reshapeable to it) and boxes -> (N, K, 4).

        ``boxes`` may be the per-image list torchvision takes; it is concatenated.
        """
        if not isinstance(boxes, (jax.Array, np.ndarray)):
            boxes = jnp.concatenate([jnp.asarray(b) for b in boxes], axis=0)
        n = boxes.shape[0]
        if n > 0:
            rel_codes = rel_codes.reshape(n, -1)
        pred = self.decode_single(rel_codes, boxes)
        return pred.reshape(n, -1, 4) if n > 0 else pred


# ------------------------------------------------------------------------------------------------
# Non-maximum suppression
# ------------------------------------------------------------------------------------------------


def _threshold_f32(iou_threshold: float) -> np.float32:
    """The largest float32 ``t`` with ``t <= iou_threshold``: for a float32 IoU ``v``,
    ``v > t`` exactly when ``v > iou_threshold`` in double, which is the comparison torchvision's
    kernel makes (float32 IoU against a C++ ``double``)."""
    t = np.float32(iou_threshold)
    if float(t) > float(iou_threshold):
        t = np.nextafter(t, np.float32(-np.inf))
    return t


def _descending_order(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """Indices of the valid scores in torch's stable descending order, invalid ones last.

    torch's CPU sort puts NaN first (NaN counts as the largest value), treats -0.0 == 0.0 and keeps
    equal scores in index order (the NMS kernel's sort is stable; verified against the installed
    build for N up to 40k).
    """
    n = scores.shape[0]
    is_nan = jnp.isnan(scores)
    rank = jnp.where(valid, jnp.where(is_nan, 0, 1), 2).astype(jnp.int32)
    # Negate for an ascending sort; map -0.0 and 0.0 to one key so they tie as in torch.
    key = jnp.where(is_nan | ~valid | (scores == 0), jnp.zeros_like(scores), -scores)
    _, _, order = lax.sort((rank, key, jnp.arange(n, dtype=jnp.int32)), num_keys=2, is_stable=True)
    return order


def _greedy_nms(
    boxes: jax.Array,
    scores: jax.Array,
    valid: jax.Array,
    classes: jax.Array | None,
    class_aware: jax.Array | bool,
    threshold: jax.Array,
    max_output: int,
) -> tuple[jax.Array, jax.Array]:
    """torchvision's CPU NMS kernel, greedy over the sorted boxes, as a ``while_loop``.

    Each iteration keeps the first still-alive box in score order and suppresses every box whose
    IoU with it is ``> threshold`` (only boxes of the same class when ``class_aware``). The
    loop runs once per *kept* box (O(kept x N) work, no N x N matrix) and stops at ``max_output``.
    The IoU is the kernel's expression: ``inter / (area_i + area_j - inter)`` with
    ``w = max(0, min(x2) - max(x1))`` etc., written with the selects of ``std::max``/``std::min``.
    """
    n = boxes.shape[0]
    keep = jnp.full((max_output,), -1, jnp.int32)
    if n == 0 or max_output == 0:
        return keep, jnp.zeros((), jnp.int32)

    order = _descending_order(scores, valid)
    sorted_boxes = boxes[order]
    x1, y1, x2, y2 = (sorted_boxes[:, i] for i in range(4))
    areas = _rounded((x2 - x1) * (y2 - y1))
    alive = valid[order]
    sorted_classes = None if classes is None else classes[order]

    def cond(state):
        count, alive, _, nxt = state
        return (count < max_output) & alive[nxt]

    def body(state):
        count, alive, keep, i = state
        ix1, iy1, ix2, iy2, iarea = x1[i], y1[i], x2[i], y2[i], areas[i]
        xx1 = jnp.where(ix1 < x1, x1, ix1)  # std::max(ix1, x1[j])
        yy1 = jnp.where(iy1 < y1, y1, iy1)
        xx2 = jnp.where(x2 < ix2, x2, ix2)  # std::min(ix2, x2[j])
        yy2 = jnp.where(y2 < iy2, y2, iy2)
        dw = xx2 - xx1
        dh = yy2 - yy1
        w = jnp.where(dw > 0, dw, 0.0)
        h = jnp.where(dh > 0, dh, 0.0)
        inter = _rounded(w * h)
        ovr = inter / (iarea + areas - inter)
        suppress = ovr > threshold
        if sorted_classes is not None:
            suppress = suppress & ((sorted_classes == sorted_classes[i]) | jnp.logical_not(class_aware))
        alive = (alive & ~suppress).at[i].set(False)
        keep = keep.at[count].set(order[i])
        # argmax of a bool array is the first True (0 when none is left; cond checks alive[0]).
        return count + 1, alive, keep, jnp.argmax(alive).astype(jnp.int32)

    init = (jnp.zeros((), jnp.int32), alive, keep, jnp.argmax(alive).astype(jnp.int32))
    count, _, keep, _ = lax.while_loop(cond, body, init)
    return keep, count


# The compiled programs take the threshold as a traced float32 (already converted by
# _threshold_f32), so eager calls with different thresholds share one compilation per shape.
@partial(jax.jit, static_argnames=("max_output",))
def _nms_program(boxes, scores, valid, threshold, max_output):
    return _greedy_nms(boxes, scores, valid, None, False, threshold, max_output)


@partial(jax.jit, static_argnames=("max_output", "vanilla_numel"))
def _batched_nms_program(boxes, scores, idxs, valid, threshold, max_output, vanilla_numel):
    num_valid = jnp.sum(valid.astype(jnp.int32))
    use_vanilla = 4 * num_valid > vanilla_numel
    # _batched_nms_coordinate_trick: offsets = idxs.to(boxes) * (boxes.max() + 1), in float32,
    # with the max over the valid boxes only.
    max_coordinate = jnp.max(jnp.where(valid[:, None], boxes, -jnp.inf)) if boxes.shape[0] else 0.0
    offsets = _rounded(idxs.astype(jnp.float32) * (max_coordinate + 1.0))
    boxes_for_nms = jnp.where(use_vanilla, boxes, boxes + offsets[:, None])
    return _greedy_nms(boxes_for_nms, scores, valid, idxs, use_vanilla, threshold, max_output)


def nms_padded(
    boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_threshold: float, max_output: int
) -> tuple[jax.Array, jax.Array]:
    """``torchvision.ops.nms`` with static shapes; runs under ``jax.jit``.

    Args:
        boxes: (N, 4) float32; scores: (N,); valid: (N,) bool, False for padding rows (ignored).
        iou_threshold: a Python float (a model constant); a box is dropped when its IoU with a
            kept, higher-scored box is ``> iou_threshold`` (strict, compared as torch does).
        max_output: static; at most this many indices are returned.

    Returns:
        ``(keep, num_kept)``: int32[max_output] indices into ``boxes`` in torch's order (descending
        score, equal scores by ascending index, NaN scores first), padded with -1;
        ``keep[:num_kept]`` equals ``torchvision.ops.nms`` of the valid rows, mapped back to the
        padded indexing and truncated to ``max_output``.
    """
    return _nms_program(
        jnp.asarray(boxes, jnp.float32),
        jnp.asarray(scores),
        jnp.asarray(valid, bool),
        jnp.asarray(_threshold_f32(iou_threshold)),
        max_output=int(max_output),
    )


def batched_nms_padded(
    boxes: jax.Array,
    scores: jax.Array,
    idxs: jax.Array,
    valid: jax.Array,
    iou_threshold: float,
    max_output: int,
    vanilla_numel: int = TORCHVISION_CPU_VANILLA_NUMEL,
) -> tuple[jax.Array, jax.Array]:
    """``torchvision.ops.batched_nms`` (NMS within each category ``idxs``) with static shapes.

    torchvision picks one of two algorithms by ``boxes.numel()`` of the boxes it is given (here
    ``4 * valid.sum()``, decided at run time): above ``vanilla_numel`` (4000 on CPU, pass 100_000
    to mirror CUDA) a separate NMS per category; otherwise one NMS over the boxes shifted by
    ``idxs * (boxes.max() + 1)``. The shift rounds the coordinates and hence the IoUs, so
    near-threshold decisions differ between the two; both are reproduced exactly (the shifted
    boxes with the same float32 ops; note that boxes with negative coordinates can then overlap
    across categories, as in torch).

    Order: descending score, equal scores by index. That is torch's order for the offset path;
    the per-category path re-sorts the kept boxes with torch's *unstable* sort, whose order among
    exactly equal scores is not reproduced (the kept set is).

    Returns ``(keep, num_kept)`` as ``nms_padded``.
    """
    return _batched_nms_program(
        jnp.asarray(boxes, jnp.float32),
        jnp.asarray(scores),
        jnp.asarray(idxs),
        jnp.asarray(valid, bool),
        jnp.asarray(_threshold_f32(iou_threshold)),
        max_output=int(max_output),
        vanilla_numel=int(vanilla_numel),
    )


def _bucket(n: int) -> int:
    """Pad eager inputs to a power of two (>= 64) so repeated calls reuse a few compilations."""
    return max(64, 1 << max(0, n - 1).bit_length())


def _pad(n: int, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    size = _bucket(n)
    out = []
    for a in arrays:
        padded = np.zeros((size,) + a.shape[1:], a.dtype)
        padded[:n] = a
        out.append(padded)
    valid = np.zeros(size, bool)
    valid[:n] = True
    return (*out, valid)


def nms(boxes: jax.Array | np.ndarray, scores: jax.Array | np.ndarray, iou_threshold: float) -> np.ndarray:
    """``torchvision.ops.nms`` (eager): int64 indices of the kept boxes, by decreasing score."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    n = boxes.shape[0]
    if n == 0:
        return np.zeros((0,), np.int64)
    pb, ps, valid = _pad(n, boxes, scores)
    keep, count = nms_padded(pb, ps, valid, float(iou_threshold), len(valid))
    return np.asarray(keep)[: int(count)].astype(np.int64)


def batched_nms(
    boxes: jax.Array | np.ndarray,
    scores: jax.Array | np.ndarray,
    idxs: jax.Array | np.ndarray,
    iou_threshold: float,
    vanilla_numel: int = TORCHVISION_CPU_VANILLA_NUMEL,
) -> np.ndarray:
    """``torchvision.ops.batched_nms`` (eager): int64 indices of the kept boxes, by decreasing score."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    idxs = np.asarray(idxs).reshape(-1).astype(np.int32)
    n = boxes.shape[0]
    if n == 0:
        return np.zeros((0,), np.int64)
    pb, ps, pi, valid = _pad(n, boxes, scores, idxs)
    keep, count = batched_nms_padded(pb, ps, pi, valid, float(iou_threshold), len(valid), vanilla_numel)
    return np.asarray(keep)[: int(count)].astype(np.int64)
