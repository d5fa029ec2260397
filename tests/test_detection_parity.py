"""Faster R-CNN MobileNetV3-Large FPN (800 px and 320 px) vs torchvision on real photos.

Calibrated random weights: backbone BatchNorm calibrated on the photos (through the detector's own
transform), heads random at a scale that spreads the scores. 4 photos of different sizes and
aspect ratios in one batch (padded as torchvision pads), fp32.
"""

import numpy as np
import pytest
import torch
import torchvision

import mbv3_jax
from porting import load_torchvision, to_torchvision
from porting.calibration import calibrated_detector_, sample_photos
from porting.parity import match_detections
from porting.torchvision_io import build_torchvision_model

PHOTOS = ("astronaut", "chelsea", "rocket", "hubble_deep_field")  # 1:1, 3:2, 3:2 (other size), 8:7
CONFIGS = [
    pytest.param("fasterrcnn_mobilenet_v3_large_320_fpn", {}, id="320"),
    pytest.param("fasterrcnn_mobilenet_v3_large_fpn", {"frozen_batchnorm": True}, id="800-frozen-bn"),
]
MATCH_FRACTION = 0.99
PROPOSAL_TOL = 1e-4

_cache: dict = {}


@pytest.fixture(scope="module")
def det_photos():
    photos = sample_photos(PHOTOS)
    return photos, [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in photos]


def calibrated_pair(name, kwargs, det_photos):
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _cache:
        torch.manual_seed(0)
        tv = build_torchvision_model(mbv3_jax.get_model(name, **kwargs).architecture)
        calibrated_detector_(tv, det_photos[1], seed=3)
        _cache[key] = (tv, load_torchvision(name, tv.state_dict(), **kwargs))
    return _cache[key]


def _torch_rpn_capture(tv, images):
    """torchvision's RPN: the boxes and scores its batched_nms sees, and its proposals."""
    captured = []
    original = torchvision.models.detection.rpn.box_ops.batched_nms

    def spy(boxes, scores, idxs, iou_threshold):
        keep = original(boxes, scores, idxs, iou_threshold)
        captured.append((boxes.numpy().copy(), scores.numpy().copy(), keep.numpy().copy()))
        return keep

    torchvision.models.detection.rpn.box_ops.batched_nms = spy
    try:
        with torch.no_grad():
            image_list, _ = tv.transform(images)
            features = tv.backbone(image_list.tensors)
            proposals, _ = tv.rpn(image_list, features)
    finally:
        torchvision.models.detection.rpn.box_ops.batched_nms = original
    return image_list, captured, [p.numpy() for p in proposals]


def _nearest(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest ``got`` row (max-abs distance) for each ``ref`` row."""
    index, distance = [], []
    for start in range(0, len(ref), 256):
        d = np.max(np.abs(ref[start : start + 256, None, :] - got[None, :, :]), axis=-1)
        index.append(np.argmin(d, axis=1))
        distance.append(np.min(d, axis=1))
    return np.concatenate(index), np.concatenate(distance)


@pytest.mark.parametrize("name,kwargs", CONFIGS)
def test_rpn_proposals(name, kwargs, det_photos):
    tv, model = calibrated_pair(name, kwargs, det_photos)
    photos, images = det_photos
    image_list, captured, tv_proposals = _torch_rpn_capture(tv, images)
    batch, sizes, _ = model.preprocess([p.astype(np.float32) / 255 for p in photos])
    # The transform: same resized sizes, same padded batch (normalize, bilinear, zero padding).
    assert [tuple(s) for s in sizes] == [tuple(s) for s in image_list.image_sizes]
    ref_batch = image_list.tensors.permute(0, 2, 3, 1).numpy()
    assert np.asarray(batch).shape == ref_batch.shape
    assert np.max(np.abs(np.asarray(batch) - ref_batch)) <= 1e-5 * np.max(np.abs(ref_batch))
    out = model.rpn_proposals(batch, sizes)
    for i, (boxes_t, scores_t, _) in enumerate(captured):
        valid = np.asarray(out["candidate_valid"][i])
        boxes_j = np.asarray(out["candidates"][i])[valid]
        scores_j = np.asarray(out["candidate_scores"][i])[valid]
        # Before NMS: the same candidates within 1e-4 relative. (Within a level, top-k lists them by
        # score; scores equal to ~1e-7 may swap places, so each is matched to its nearest.)
        assert boxes_j.shape == boxes_t.shape, (i, boxes_j.shape, boxes_t.shape)
        # Matched on (box / max|box|, score): many boxes clip to the same image-sized box.
        scale = np.max(np.abs(boxes_t))
        ref_rows = np.concatenate([boxes_t / scale, scores_t[:, None]], axis=1)
        got_rows = np.concatenate([boxes_j / scale, scores_j[:, None]], axis=1)
        nearest, distance = _nearest(ref_rows, got_rows)
        assert np.max(distance) <= PROPOSAL_TOL, (i, np.max(distance))
        assert len(np.unique(nearest)) == len(nearest)  # one-to-one
        # After NMS: the same set of proposals.
        n = int(out["num_proposals"][i])
        kept_j = np.asarray(out["proposals"][i, :n])
        assert n == len(tv_proposals[i]), (i, n, len(tv_proposals[i]))
        nearest, distance = _nearest(tv_proposals[i], kept_j)
        assert len(np.unique(nearest)) == n
        assert np.max(distance) <= PROPOSAL_TOL * np.max(np.abs(tv_proposals[i])), (i, np.max(distance))


@pytest.mark.parametrize("name,kwargs", CONFIGS)
def test_detections(name, kwargs, det_photos):
    tv, model = calibrated_pair(name, kwargs, det_photos)
    photos, images = det_photos
    with torch.no_grad():
        ref = [{k: v.numpy() for k, v in r.items()} for r in tv(images)]
    got = model([p.astype(np.float32) / 255 for p in photos])
    matched_ref = matched_got = total_ref = total_got = 0
    for r, g in zip(ref, got, strict=True):
        # The random heads spread the scores: no ties that would make the kept set arbitrary.
        assert len(np.unique(r["scores"])) == len(r["scores"])
        a, t = match_detections(r, g)
        matched_ref, total_ref = matched_ref + a, total_ref + t
        a, t = match_detections(g, r)
        matched_got, total_got = matched_got + a, total_got + t
    assert total_ref >= 100, total_ref  # enough detections to mean something
    assert matched_ref >= MATCH_FRACTION * total_ref, (matched_ref, total_ref)
    assert matched_got >= MATCH_FRACTION * total_got, (matched_got, total_got)


@pytest.mark.parametrize("name,kwargs", CONFIGS)
def test_round_trip(name, kwargs, det_photos):
    tv, model = calibrated_pair(name, kwargs, det_photos)
    state_dict = to_torchvision(model)
    reference = tv.state_dict()
    assert list(state_dict) == list(reference)
    for key, value in reference.items():
        assert torch.equal(state_dict[key], value), key
    assert model.architecture["kwargs"]["frozen_batchnorm"] == kwargs.get("frozen_batchnorm", False)
