"""Detection ops against torchvision: boxes, BoxCoder, NMS / batched NMS, RoIAlign, anchors.

Inputs are random and adversarial (ties, identical / degenerate / inverted boxes, boxes outside the
image, empty sets, IoUs exactly at the threshold). NMS must return torchvision's indices in
torchvision's order; RoIAlign and anchors are compared bit for bit or to ~1e-6.
"""

from __future__ import annotations

from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from extras import HAVE_TORCH, needs_torch

from mbv3_jax.ops import (
    AnchorGenerator,
    BoxCoder,
    DefaultBoxGenerator,
    batched_nms,
    batched_nms_padded,
    box_area,
    box_iou,
    clip_boxes_to_image,
    level_mapper,
    multiscale_roi_align,
    nms,
    nms_padded,
    remove_small_boxes,
    remove_small_boxes_mask,
    roi_align,
)

if HAVE_TORCH:  # the optional "torch" extra: without it the needs_torch tests skip, the others run
    import torch
    import torchvision
    from torchvision.models.detection._utils import BoxCoder as TorchBoxCoder
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchAnchorGenerator
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator as TorchDefaultBoxGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import boxes as tv_boxes
    from torchvision.ops.poolers import LevelMapper

F32 = np.float32


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _random_boxes(rng, n, extent=100.0, max_size=40.0, grid=None):
    xy = rng.uniform(0, extent, (n, 2))
    wh = rng.uniform(0.5, max_size, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    if grid:  # coordinates on a 1/grid pixel lattice: many exactly equal overlaps
        boxes = np.round(boxes * grid) / grid
    return boxes.astype(F32)


def _adversarial_boxes(rng):
    """Identical, nested, zero-size, inverted and far-outside boxes plus a random cluster."""
    special = np.array(
        [
            [10, 10, 20, 20],
            [10, 10, 20, 20],  # identical
            [10, 10, 20, 20],
            [12, 12, 18, 18],  # nested
            [15, 15, 15, 25],  # zero width
            [15, 15, 25, 15],  # zero height
            [15, 15, 15, 15],  # a point
            [30, 30, 20, 40],  # inverted x
            [30, 40, 40, 30],  # inverted y
            [-50, -50, -10, -10],  # outside the image
            [-5, -5, 5, 5],
            [1e4, 1e4, 1.1e4, 1.2e4],
            [0, 0, 10, 10],
            [0, 0, 10, 3],  # IoU with the previous one: exactly 0.3 in float32 (> 0.3 as a double)
            [0, 0, 10, 7],  # 0.7
            [0, 0, 10, 5],  # 0.5
        ],
        F32,
    )
    return np.concatenate([special, _random_boxes(rng, 48, 30, 15)], axis=0)


# ------------------------------------------------------------------------------------------------
# box utilities
# ------------------------------------------------------------------------------------------------


@needs_torch
def test_box_area_and_iou_match_torchvision():
    rng = np.random.default_rng(0)
    a = np.concatenate([_adversarial_boxes(rng), _random_boxes(rng, 100, grid=4)])
    b = np.concatenate([_random_boxes(rng, 70), a[:20]])
    np.testing.assert_array_equal(np.asarray(jax.jit(box_area)(a)), tv_boxes.box_area(_t(a)).numpy())
    got = np.asarray(jax.jit(box_iou)(a, b))
    ref = tv_boxes.box_iou(_t(a), _t(b)).numpy()
    assert np.isnan(ref).any()  # two empty boxes: 0 / 0, as in torch
    np.testing.assert_array_equal(got, ref)  # same float32 ops in the same order: bit-identical
    assert box_iou(a[:0], b).shape == (0, b.shape[0])


@needs_torch
def test_clip_and_remove_small_boxes_match_torchvision():
    rng = np.random.default_rng(1)
    boxes = np.concatenate([_adversarial_boxes(rng), rng.uniform(-300, 900, (200, 4)).astype(F32)])
    for size in [(480, 640), (1, 1), (333, 517)]:
        got = jax.jit(clip_boxes_to_image, static_argnums=1)(boxes, size)
        np.testing.assert_array_equal(np.asarray(got), tv_boxes.clip_boxes_to_image(_t(boxes), size).numpy())
    # Sides exactly at, just below and just above min_size (float32 comparison as in torch).
    for min_size in [1e-3, 1e-2, 1.0, 0.3]:
        m = F32(min_size)
        sides = np.array([m, np.nextafter(m, F32(0)), np.nextafter(m, F32(1)), 0, -1, 5], F32)
        edge = np.stack([np.zeros(6, F32), np.zeros(6, F32), sides, sides[::-1]], axis=1)
        edge = np.concatenate([edge, boxes])
        ref = tv_boxes.remove_small_boxes(_t(edge), min_size).numpy()
        np.testing.assert_array_equal(remove_small_boxes(edge, min_size), ref)
        mask = jax.jit(remove_small_boxes_mask, static_argnums=1)(edge, min_size)
        np.testing.assert_array_equal(np.nonzero(np.asarray(mask))[0], ref)


@needs_torch
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (2.0, 3.0, 7.0, 0.5)])
def test_box_coder_matches_torchvision(weights):
    rng = np.random.default_rng(2)
    boxes = _random_boxes(rng, 300, 800, 300)
    codes = (rng.standard_normal((300, 4 * 3)) * 2).astype(F32)
    codes[:5, 2::4] = 20.0  # beyond bbox_xform_clip: clamped before exp
    codes[5:10, 3::4] = -30.0
    coder, ref_coder = BoxCoder(weights), TorchBoxCoder(weights)

    got = np.asarray(jax.jit(coder.decode)(codes, boxes))
    ref = ref_coder.decode(_t(codes), [_t(boxes)]).numpy()
    assert got.shape == ref.shape == (300, 3, 4)
    # Everything but exp is bit-identical; XLA's and torch's expf differ by at most 1 ulp, which
    # becomes an ulp of the box half-size (<= the largest coordinate of the box) after ctr -/+ w/2.
    _assert_within_ulps(got, ref, 2)
    assert (got == ref).mean() > 0.9
    single = coder.decode_single(jnp.asarray(codes), jnp.asarray(boxes))
    _assert_within_ulps(np.asarray(single), ref_coder.decode_single(_t(codes), _t(boxes)).numpy(), 2)

    gt = _random_boxes(rng, 300, 800, 300)
    got = np.asarray(jax.jit(coder.encode)(gt, boxes))
    ref = ref_coder.encode_single(_t(gt), _t(boxes)).numpy()
    np.testing.assert_array_equal(got[:, :2], ref[:, :2])  # dx, dy: no transcendental, bit-identical
    np.testing.assert_allclose(got[:, 2:], ref[:, 2:], rtol=1e-6, atol=1e-6)  # logf: <= 1 ulp apart


def _assert_within_ulps(got: np.ndarray, ref: np.ndarray, ulps: int) -> None:
    """|got - ref| <= ulps * spacing(largest |coordinate| of the same box)."""
    got, ref = got.reshape(-1, 4), ref.reshape(-1, 4)
    tol = ulps * np.spacing(np.abs(ref).max(axis=1, keepdims=True).astype(F32))
    assert (np.abs(got - ref) <= tol).all(), np.abs(got - ref).max()


# ------------------------------------------------------------------------------------------------
# NMS
# ------------------------------------------------------------------------------------------------


def _kernel_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """torchvision's CPU NMS kernel IoU of box ``a`` against rows of ``b``, in numpy float32."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = np.maximum(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), F32(0))
    h = np.maximum(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), F32(0))
    inter = w * h
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area_a + area_b - inter)


def _nms_cases():
    rng = np.random.default_rng(3)
    cases = []
    for n in [1, 7, 200, 1500]:
        cases.append((f"random{n}", _random_boxes(rng, n, 100 + n / 2), rng.random(n).astype(F32), 0.5))
    b = _random_boxes(rng, 300, 60, 30, grid=2)
    cases.append(("ties", b, (rng.integers(0, 4, 300) / 4).astype(F32), 0.5))
    cases.append(("all_equal_scores", b, np.full(300, 0.5, F32), 0.3))
    b = _adversarial_boxes(rng)
    s = rng.integers(0, 3, len(b)).astype(F32)
    s[:4] = 2.0
    cases.append(("adversarial", b, s, 0.3))
    cases.append(("adversarial_07", b, s, 0.7))
    s = rng.random(len(b)).astype(F32)
    s[[3, 7, 11]] = np.nan
    s[[1, 2]] = -0.0
    s[[4, 5]] = 0.0
    cases.append(("nan_and_signed_zero_scores", b, s, 0.5))
    # A dense cluster with the threshold set to the exact double value of IoUs against the top
    # box (ovr > thr must be False for those, True for anything one ulp above): catches any
    # rounding difference in the IoU (areas, FMA contraction) or in the threshold comparison.
    b = (np.array([50, 50, 90, 90]) + rng.normal(0, 3, (400, 4))).astype(F32)
    s = rng.random(400).astype(F32)
    ious = _kernel_iou(b[np.argmax(s)], b)
    for q in [0.2, 0.5, 0.8]:
        thr = float(np.quantile(ious[np.isfinite(ious)], q, method="nearest"))
        cases.append((f"iou_on_threshold_q{q}", b, s, thr))
        cases.append((f"iou_below_threshold_q{q}", b, s, float(np.nextafter(thr, 0.0))))
    cases.append(("threshold_0", b, s, 0.0))
    cases.append(("threshold_1", b, s, 1.0))
    return cases


_NMS_CASES = _nms_cases()


@needs_torch
@pytest.mark.parametrize("name,boxes,scores,thr", _NMS_CASES, ids=[c[0] for c in _NMS_CASES])
def test_nms_matches_torchvision(name, boxes, scores, thr):
    ref = torchvision.ops.nms(_t(boxes), _t(scores), thr).numpy()
    got = nms(boxes, scores, thr)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref)


@needs_torch
def test_nms_on_threshold_pairs():
    """IoU of exactly 0.3 / 0.7 / 0.5 in float32: torch compares it with the double threshold."""
    base = np.array([0, 0, 10, 10], F32)
    for h, thr in [(3, 0.3), (7, 0.7), (5, 0.5), (3, 0.30000001192092896), (7, 0.6999999880790710)]:
        b = np.stack([base, np.array([0, 0, 10, h], F32)])
        s = np.array([1.0, 0.5], F32)
        np.testing.assert_array_equal(nms(b, s, thr), torchvision.ops.nms(_t(b), _t(s), thr).numpy())
    # 3/10 rounds above 0.3: torch suppresses the second box although "IoU == threshold".
    assert nms(np.array([base, [0, 0, 10, 3]], F32), np.array([1, 0.5], F32), 0.3).tolist() == [0]


def test_nms_empty():
    assert nms(np.zeros((0, 4), F32), np.zeros((0,), F32), 0.5).shape == (0,)
    assert batched_nms(np.zeros((0, 4), F32), np.zeros((0,), F32), np.zeros((0,), np.int64), 0.5).shape == (
        0,
    )
    keep, count = nms_padded(jnp.zeros((0, 4)), jnp.zeros((0,)), jnp.zeros((0,), bool), 0.5, 5)
    assert keep.tolist() == [-1] * 5 and int(count) == 0
    keep, count = nms_padded(jnp.zeros((8, 4)), jnp.zeros((8,)), jnp.zeros((8,), bool), 0.5, 5)
    assert keep.tolist() == [-1] * 5 and int(count) == 0


@needs_torch
def test_nms_padded_under_jit_with_padding_and_truncation():
    rng = np.random.default_rng(4)
    n, size = 300, 512
    boxes = _random_boxes(rng, n, 80, 30, grid=2)
    scores = (rng.integers(0, 6, n) / 6).astype(F32)
    # Scatter the real rows among padding rows that would otherwise win (high scores, big boxes).
    slots = np.sort(rng.choice(size, n, replace=False))
    pb = np.tile(np.array([[0, 0, 200, 200]], F32), (size, 1))
    ps = np.full(size, 10.0, F32)
    valid = np.zeros(size, bool)
    pb[slots], ps[slots], valid[slots] = boxes, scores, True
    ref = torchvision.ops.nms(_t(boxes), _t(scores), 0.45).numpy()

    @jax.jit
    def step(b, s, v):  # as inside a model step: thresholds and sizes static
        return nms_padded(b, s, v, 0.45, 64)

    keep, count = step(pb, ps, valid)
    keep, count = np.asarray(keep), int(count)
    assert count == min(64, len(ref))
    np.testing.assert_array_equal(keep[:count], slots[ref[:64]])
    assert (keep[count:] == -1).all()


def _batched_cases():
    rng = np.random.default_rng(5)
    cases = []
    for n in [50, 1000, 1001, 2500]:  # numel 4000 is the CPU switch: 1000 boxes -> offset trick
        b = _random_boxes(rng, n, 40 + n / 10, 30)
        cases.append((f"random{n}", b, rng.random(n).astype(F32), rng.integers(0, 5, n), 0.5))
    b = _random_boxes(rng, 400, 50, 25, grid=4)
    cases.append(("ties_trick", b, (rng.integers(0, 5, 400) / 5).astype(F32), rng.integers(0, 3, 400), 0.4))
    # Negative coordinates: the offset trick can make boxes of different classes overlap.
    b = _random_boxes(rng, 300, 60, 30) - F32(45)
    cases.append(("negative_coords", b, rng.random(300).astype(F32), rng.integers(0, 4, 300), 0.3))
    b = np.concatenate([_adversarial_boxes(rng)] * 3)
    cases.append(("adversarial", b, rng.random(len(b)).astype(F32), np.repeat([0, 1, 7], len(b) // 3), 0.5))
    # Non-integer coordinates and a large class id: the offsets round the coordinates.
    b = _random_boxes(rng, 600, 30, 20) + F32(0.123)
    cases.append(("offset_rounding", b, rng.random(600).astype(F32), rng.integers(0, 90, 600), 0.6))
    return cases


_BATCHED_CASES = _batched_cases()


@needs_torch
@pytest.mark.parametrize("name,boxes,scores,idxs,thr", _BATCHED_CASES, ids=[c[0] for c in _BATCHED_CASES])
def test_batched_nms_matches_torchvision(name, boxes, scores, idxs, thr):
    ref = torchvision.ops.batched_nms(_t(boxes), _t(scores), _t(idxs), thr).numpy()
    np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, thr), ref)


@needs_torch
def test_batched_nms_paths():
    """Both torchvision algorithms are reproduced; the switch follows the number of *valid* boxes."""
    rng = np.random.default_rng(6)
    n = 1200
    boxes = _random_boxes(rng, n, 120, 40) + F32(0.37)
    scores = rng.random(n).astype(F32)
    idxs = rng.integers(0, 6, n)
    trick = tv_boxes._batched_nms_coordinate_trick(_t(boxes), _t(scores), _t(idxs), 0.5).numpy()
    vanilla = tv_boxes._batched_nms_vanilla(_t(boxes), _t(scores), _t(idxs), 0.5).numpy()
    np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, 0.5), vanilla)  # 4800 > 4000
    np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, 0.5, vanilla_numel=100_000), trick)  # CUDA

    # Padded: 900 valid boxes of 1200 -> numel 3600 -> the offset trick, offsets from valid boxes only.
    valid = np.zeros(n, bool)
    valid[rng.choice(n, 900, replace=False)] = True
    boxes_big = boxes.copy()
    boxes_big[~valid] = 1e6  # would change boxes.max() if padding leaked into the offsets
    sel = np.nonzero(valid)[0]
    ref = torchvision.ops.batched_nms(_t(boxes[sel]), _t(scores[sel]), _t(idxs[sel]), 0.5).numpy()
    keep, count = jax.jit(batched_nms_padded, static_argnums=(4, 5))(boxes_big, scores, idxs, valid, 0.5, n)
    np.testing.assert_array_equal(np.asarray(keep)[: int(count)], sel[ref])


@needs_torch
def test_batched_nms_vanilla_ties_keep_the_same_set():
    """Per-class path with tied scores: torch re-sorts the kept boxes with an unstable sort, so only
    the kept set and the score sequence are defined; both match."""
    rng = np.random.default_rng(7)
    n = 1100
    boxes = _random_boxes(rng, n, 100, 30, grid=2)
    scores = (rng.integers(0, 8, n) / 8).astype(F32)
    idxs = rng.integers(0, 3, n)
    ref = torchvision.ops.batched_nms(_t(boxes), _t(scores), _t(idxs), 0.5).numpy()
    got = batched_nms(boxes, scores, idxs, 0.5)
    np.testing.assert_array_equal(np.sort(got), np.sort(ref))
    np.testing.assert_array_equal(scores[got], scores[ref])


# ------------------------------------------------------------------------------------------------
# RoIAlign
# ------------------------------------------------------------------------------------------------


def _rois(rng, k, n_images, extent):
    xy = rng.uniform(-0.3 * extent, 1.1 * extent, (k, 2))
    wh = rng.uniform(-0.1 * extent, 0.7 * extent, (k, 2))  # some inverted
    rois = np.concatenate([rng.integers(0, n_images, (k, 1)), xy, xy + wh], axis=1).astype(F32)
    rois[:8, 1:] = np.round(rois[:8, 1:])  # pixel-aligned: sample positions on integers
    rois[8] = [0, 10, 10, 10, 10]  # empty
    rois[9] = [n_images - 1, 0, 0, extent, extent]  # the whole map
    rois[10] = [0, -3 * extent, -3 * extent, -2 * extent, -2 * extent]  # entirely outside: zeros
    rois[11] = [0, extent - 1, extent - 1, 2 * extent, 2 * extent]  # across the far edge
    return rois


def _assert_roi_close(got, ref):
    scale = max(float(np.abs(ref).max()), 1e-30)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-5)


_ROI_GEOMETRY = [(0.25, (7, 7)), (1 / 3, (5, 4)), (1.0, (2, 3))]  # spatial_scale, output_size


@needs_torch
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 1, 3, 0, -1])
def test_roi_align_matches_torchvision(aligned, sampling_ratio):
    rng = np.random.default_rng(8 + sampling_ratio)
    feats = rng.standard_normal((2, 13, 17, 6)).astype(F32)
    rois = _rois(rng, 48, 2, 60.0)
    if aligned and sampling_ratio <= 0:
        # torch sizes a std::vector by the adaptive grid, negative for an inverted aligned RoI, and
        # throws; keep those RoIs upright (ours gives 0 for them: no samples).
        rois[:, 3:] = np.maximum(rois[:, 3:], rois[:, 1:3])
    scale, out = _ROI_GEOMETRY[(sampling_ratio + int(aligned)) % 3]
    ref = torchvision.ops.roi_align(
        _t(feats.transpose(0, 3, 1, 2)), _t(rois), out, scale, sampling_ratio, aligned
    )
    # Under jit the adaptive grid needs a static bound: ceil(largest RoI side * scale / out).
    longest = float((np.maximum(rois[:, 3:] - rois[:, 1:3], 1) * scale).max())
    bound = None if sampling_ratio > 0 else int(np.ceil(longest / min(out)))
    fn = jax.jit(lambda f, r: roi_align(f, r, out, scale, sampling_ratio, aligned, max_sampling_grid=bound))
    _assert_roi_close(fn(feats, rois), ref.permute(0, 2, 3, 1).numpy())


@needs_torch
def test_roi_align_adaptive_eager_bound():
    """Outside jit the adaptive grid bound is computed from the RoIs."""
    rng = np.random.default_rng(12)
    feats = rng.standard_normal((1, 9, 11, 2)).astype(F32)
    rois = _rois(rng, 12, 1, 40.0)
    ref = torchvision.ops.roi_align(_t(feats.transpose(0, 3, 1, 2)), _t(rois), 3, 0.25, -1)
    got = roi_align(jnp.asarray(feats), jnp.asarray(rois), 3, 0.25, -1)
    _assert_roi_close(got, ref.permute(0, 2, 3, 1).numpy())


@needs_torch
def test_roi_align_adaptive_under_jit_needs_a_bound():
    rng = np.random.default_rng(9)
    feats = rng.standard_normal((1, 20, 20, 3)).astype(F32)
    rois = _rois(rng, 16, 1, 20.0)
    with pytest.raises(ValueError, match="max_sampling_grid"):
        jax.jit(lambda f, r: roi_align(f, r, 3, 1.0, 0))(feats, rois)
    ref = torchvision.ops.roi_align(_t(feats.transpose(0, 3, 1, 2)), _t(rois), 3, 1.0, 0)
    got = jax.jit(lambda f, r: roi_align(f, r, 3, 1.0, 0, max_sampling_grid=10))(feats, rois)
    _assert_roi_close(got, ref.permute(0, 2, 3, 1).numpy())
    # A bound that is too small for some RoIs makes exactly those RoIs NaN (never silently wrong).
    small = np.asarray(jax.jit(lambda f, r: roi_align(f, r, 3, 1.0, 0, max_sampling_grid=2))(feats, rois))
    roi_size = np.maximum(rois[:, 3:] - rois[:, 1:3], 1)
    too_big = np.ceil(roi_size / 3).max(axis=1) > 2
    assert too_big.any() and np.isnan(small[too_big]).all() and not np.isnan(small[~too_big]).any()


def test_roi_align_empty_rois():
    feats = jnp.ones((1, 5, 5, 4))
    assert roi_align(feats, jnp.zeros((0, 5)), 7, 0.5, 2).shape == (0, 7, 7, 4)


@needs_torch
def test_multiscale_roi_align_fpn_levels_match_torchvision():
    """Four FPN levels (strides 4..32), boxes spanning all levels, degenerate boxes, padded batch."""
    rng = np.random.default_rng(10)
    padded, sizes = (256, 320), [(256, 301), (240, 320)]
    feats = [rng.standard_normal((2, padded[0] // s, padded[1] // s, 4)).astype(F32) for s in (4, 8, 16, 32)]
    k = 40
    xy = rng.uniform(0, 250, (2, k, 2))
    wh = np.exp(rng.uniform(0, np.log(400), (2, k, 2)))
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(F32)
    boxes[0, :4] = [
        [10, 10, 10, 10],
        [50, 10, 40, 60],
        [0, 0, 224, 224],
        [0, 0, 112, 112],
    ]  # empty, negative area
    pooler = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)
    x = OrderedDict(
        (n, _t(f.transpose(0, 3, 1, 2))) for n, f in zip(["p2", "p3", "p4", "p5"], feats, strict=True)
    )
    ref = pooler(x, [_t(b) for b in boxes], sizes).permute(0, 2, 3, 1).numpy()
    assert pooler.scales == [0.25, 0.125, 0.0625, 0.03125]

    got = jax.jit(lambda fs, b: multiscale_roi_align(fs, b, sizes, 7, 2))(feats, boxes)
    _assert_roi_close(got, ref)
    assert (np.asarray(got)[1] == 0).all()  # negative area: NaN level in torch -> the RoI stays zero

    levels = np.asarray(level_mapper(jnp.asarray(boxes.reshape(-1, 4)), 2, 5))
    ref_levels = LevelMapper(2, 5)([_t(b) for b in boxes]).numpy()
    finite = ~np.isnan(tv_boxes.box_area(_t(boxes.reshape(-1, 4))).sqrt().numpy())
    np.testing.assert_array_equal(levels[finite], ref_levels[finite])


@needs_torch
def test_multiscale_roi_align_mobilenet_fpn_layout():
    """fasterrcnn_mobilenet_v3_large(_320)_fpn: MultiScaleRoIAlign(['0', '1', '2', '3']) over the FPN
    outputs '0', '1', 'pool' -> maps '0' and '1', both stride 32 -> k_min = k_max = 5: all RoIs pool
    from '0' at scale 1/32."""
    rng = np.random.default_rng(11)
    sizes = [(320, 427), (299, 448)]  # padded batch: 320 x 448
    f0, f1 = (rng.standard_normal((2, 10, 14, 8)).astype(F32) for _ in range(2))
    pool = f1[:, ::2, ::2]
    boxes = np.concatenate([_random_boxes(rng, 30, 300, 200), _random_boxes(rng, 30, 300, 200)]).reshape(
        2, 30, 4
    )
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    x = OrderedDict([("0", _t(f0.transpose(0, 3, 1, 2))), ("1", _t(f1.transpose(0, 3, 1, 2)))])
    x["pool"] = _t(pool.transpose(0, 3, 1, 2))
    ref = pooler(x, [_t(b) for b in boxes], sizes).permute(0, 2, 3, 1).numpy()
    assert pooler.scales == [1 / 32, 1 / 32]
    assert (pooler.map_levels.k_min, pooler.map_levels.k_max) == (5, 5)
    got = jax.jit(lambda a, b, bx: multiscale_roi_align([a, b], bx, sizes, 7, 2))(f0, f1, boxes)
    _assert_roi_close(got, ref)
    single = torchvision.ops.roi_align(x["0"], [_t(b) for b in boxes], 7, 1 / 32, 2)
    np.testing.assert_array_equal(ref, single.permute(0, 2, 3, 1).numpy())


# ------------------------------------------------------------------------------------------------
# Anchors
# ------------------------------------------------------------------------------------------------


def _torch_anchors(gen, image_hw, feature_hws):
    images = ImageList(torch.zeros(1, 3, *image_hw), [tuple(image_hw)])
    return gen(images, [torch.zeros(1, 1, *hw) for hw in feature_hws])[0].numpy()


@needs_torch
@pytest.mark.parametrize(
    "sizes,ratios,image_hw,feature_hws",
    [
        # fasterrcnn_mobilenet_v3_large_fpn: 15 anchors per location on '0', '1', 'pool'.
        (((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3, (800, 1088), [(25, 34), (25, 34), (13, 17)]),
        (((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3, (320, 480), [(10, 15), (10, 15), (5, 8)]),
        # Strides from integer division: 797 // 13 = 61, 1001 // 17 = 58.
        (((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3, (797, 1001), [(25, 32), (13, 17), (7, 9)]),
        # ResNet-FPN style and odd aspect ratios (sqrt / 1/x / round-half-even in float32).
        (((32,), (64,), (128,), (256,), (512,)), ((0.25, 0.7, 1.3, 3.1),) * 5, (512, 640),
         [(128, 160), (64, 80), (32, 40), (16, 20), (8, 10)]),
    ],
)  # fmt: skip
def test_anchor_generator_matches_torchvision(sizes, ratios, image_hw, feature_hws):
    ours = AnchorGenerator(sizes, ratios)
    ref = _torch_anchors(TorchAnchorGenerator(sizes, ratios), image_hw, feature_hws)
    got = ours(image_hw, feature_hws)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    assert ours.num_anchors_per_location() == TorchAnchorGenerator(sizes, ratios).num_anchors_per_location()


@needs_torch
@pytest.mark.parametrize(
    "kwargs,image_hw,feature_hws,count",
    [
        # ssdlite320_mobilenet_v3_large
        (dict(aspect_ratios=[[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95), (320, 320),
         [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)], 3234),
        # SSD300 (explicit scales and steps)
        (dict(aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]],
              scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300]),
         (300, 300), [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)], 8732),
        (dict(aspect_ratios=[[2, 3]] * 3, clip=False), (224, 288), [(7, 9), (4, 5), (2, 3)],
         6 * (63 + 20 + 6)),
    ],
)  # fmt: skip
def test_default_box_generator_matches_torchvision(kwargs, image_hw, feature_hws, count):
    ref = _torch_anchors(TorchDefaultBoxGenerator(**kwargs), image_hw, feature_hws)
    got = DefaultBoxGenerator(**kwargs)(image_hw, feature_hws)
    assert got.shape == ref.shape == (count, 4)
    np.testing.assert_array_equal(got, ref)


# ------------------------------------------------------------------------------------------------
# Matcher, SSDMatcher, balanced sampler


def _case_id(value) -> str:
    return value if isinstance(value, str) else ""


def _quality_cases():
    if not HAVE_TORCH:  # the cases need torchvision's box_iou; their tests skip
        return
    rng = np.random.default_rng(7)
    gt = _random_boxes(rng, 5, extent=80.0, max_size=50.0, grid=2)
    preds = np.concatenate([_random_boxes(rng, 300, grid=2), gt[:2], gt[:1]])  # exact copies: ties
    yield "random", np.asarray(tv_boxes.box_iou(_t(gt), _t(preds)))
    far = np.array([[500, 500, 510, 510]], F32)  # a gt that overlaps nothing: highest quality 0
    yield "gt without overlap", np.asarray(tv_boxes.box_iou(_t(np.concatenate([gt, far])), _t(preds)))
    lattice = np.round(rng.uniform(0, 1, (4, 60)) * 4) / 4  # many exact ties and threshold values
    yield "lattice", lattice.astype(F32)


@needs_torch
@pytest.mark.parametrize("name,quality", list(_quality_cases()), ids=_case_id)
@pytest.mark.parametrize("high,low,allow", [(0.7, 0.3, True), (0.5, 0.5, False), (0.5, 0.25, False)])
def test_matcher_matches_torchvision(name, quality, high, low, allow):
    from torchvision.models.detection._utils import Matcher as TorchMatcher

    from mbv3_jax.ops.matcher import match

    ref = TorchMatcher(high, low, allow)(_t(quality)).numpy()
    g = quality.shape[0]
    # Padded: two extra gt rows and 7 extra predictions that must not change anything.
    padded = np.pad(quality, ((0, 2), (0, 7)), constant_values=0.9)
    gt_valid = np.arange(g + 2) < g
    pred_valid = np.arange(quality.shape[1] + 7) < quality.shape[1]
    got = match(jnp.asarray(padded), jnp.asarray(gt_valid), high, low, allow, jnp.asarray(pred_valid))
    got = np.asarray(got)
    np.testing.assert_array_equal(got[: quality.shape[1]], ref)
    unpadded = np.asarray(match(jnp.asarray(quality), jnp.ones(g, bool), high, low, allow))
    np.testing.assert_array_equal(unpadded, ref)


def test_matcher_without_ground_truth_is_all_background():
    from mbv3_jax.ops.matcher import match

    got = match(jnp.full((3, 10), 0.8), jnp.zeros(3, bool), 0.7, 0.3, True)
    np.testing.assert_array_equal(np.asarray(got), -1)


@needs_torch
@pytest.mark.parametrize("name,quality", list(_quality_cases()), ids=_case_id)
def test_ssd_matcher_matches_torchvision(name, quality):
    from torchvision.models.detection._utils import SSDMatcher

    from mbv3_jax.ops.matcher import ssd_match

    ref = SSDMatcher(0.5)(_t(quality)).numpy()
    g = quality.shape[0]
    padded = np.pad(quality, ((0, 3), (0, 0)), constant_values=1.0)
    got = ssd_match(jnp.asarray(padded), jnp.asarray(np.arange(g + 3) < g), 0.5)
    np.testing.assert_array_equal(np.asarray(got), ref)


def test_balanced_sampler_counts_and_take_all():
    from mbv3_jax.ops.matcher import balanced_sample

    labels = np.random.default_rng(3).integers(-1, 3, 400)
    pos, neg = jnp.asarray(labels >= 1), jnp.asarray(labels == 0)
    key = jax.random.key(0)
    sp, sn = balanced_sample(pos, neg, 64, 0.25, key)
    assert int(sp.sum()) == 16 and int(sn.sum()) == 48
    assert not np.any(np.asarray(sp) & ~np.asarray(pos)) and not np.any(np.asarray(sn) & ~np.asarray(neg))
    sp2, _ = balanced_sample(pos, neg, 64, 0.25, jax.random.key(1))
    assert not np.array_equal(np.asarray(sp), np.asarray(sp2))  # a random draw
    # torchvision's counts when there are too few positives: the rest are negatives.
    sp, sn = balanced_sample(pos, neg, 10_000, 0.5, key)
    np.testing.assert_array_equal(np.asarray(sp), np.asarray(pos))
    np.testing.assert_array_equal(np.asarray(sn), np.asarray(neg))
