"""Segmentation and detection metrics equal torchvision's references' numbers: the confusion-matrix
metrics of references/segmentation (mIoU, pixel accuracy) and the COCO box mAP of
references/detection (CocoEvaluator over pycocotools). Torch-free; the COCO tests need pycocotools."""

import contextlib
import copy
import importlib.util
import io
import json

import jax
import numpy as np
import pytest

from train.detection_eval import (
    STAT_NAMES,
    CocoDetectionEvaluator,
    coco_ground_truth,
    coco_results,
    coco_stats,
    original_frame_detections,
    write_results_json,
)
from train.segmentation_eval import ConfusionMatrix, confusion_matrix, metrics_from_matrix

needs_pycocotools = pytest.mark.skipif(
    importlib.util.find_spec("pycocotools") is None,
    reason="needs pycocotools, which scores COCO mAP (pip install pycocotools, or the 'train' extra)",
)

# ------------------------------------------------------------------------------------------------
# Segmentation

N_CLASSES = 5


def random_masks(seed: int, shape=(6, 17, 23), n=N_CLASSES, ignore_frac=0.1):
    """Targets in [0, n) with some 255 (ignore) pixels, and predictions in [0, n)."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, n, shape).astype(np.uint8)
    target[rng.random(shape) < ignore_frac] = 255
    pred = rng.integers(0, n, shape).astype(np.int32)
    return target, pred


def direct_counts(target, pred, n):
    """The confusion matrix by counting pixel pairs one class pair at a time."""
    t, p = target.reshape(-1).astype(np.int64), pred.reshape(-1)
    return np.array([[np.sum((t == i) & (p == j)) for j in range(n)] for i in range(n)], np.int64)


def torchvision_reference(mat):
    """references/segmentation/utils.py ConfusionMatrix.compute() and the mIoU its __str__ prints: with
    h = mat as float, acc_global = diag(h).sum() / h.sum(), acc = diag(h) / h.sum(1),
    iu = diag(h) / (h.sum(1) + h.sum(0) - diag(h)), mean IoU = iu.mean() (NaN-propagating). torch casts
    to float32 (``self.mat.float()``), so this returns both the float32 and the float64 evaluation."""
    out = {}
    for dtype in (np.float32, np.float64):
        h = mat.astype(dtype)
        d = np.diag(h)
        with np.errstate(divide="ignore", invalid="ignore"):
            iu = d / (h.sum(1) + h.sum(0) - d)
            out[dtype] = (d.sum() / h.sum(), d / h.sum(1), iu, iu.mean())
    return out


def test_confusion_matrix_counts_and_batch_sums():
    target, pred = random_masks(0)
    jitted = jax.jit(confusion_matrix, static_argnums=2)
    whole = np.asarray(jitted(target, pred, N_CLASSES))
    assert whole.dtype == np.int32
    expected = direct_counts(target, pred, N_CLASSES)
    np.testing.assert_array_equal(whole, expected)
    assert whole.sum() == np.sum(target != 255)  # the 255 pixels are skipped

    # Per-batch matrices (as a sharded eval step returns them) sum to the whole set's.
    acc = ConfusionMatrix(N_CLASSES)
    for i in range(0, len(target), 2):
        acc.add(jitted(target[i : i + 2], pred[i : i + 2], N_CLASSES))
    assert acc.mat.dtype == np.int64
    np.testing.assert_array_equal(acc.mat, expected)

    # The host-side update (torchvision's bincount) agrees.
    host = ConfusionMatrix(N_CLASSES)
    for t, p in zip(target, pred, strict=True):
        host.update(t, p)
    np.testing.assert_array_equal(host.mat, expected)
    host.reset()
    assert host.mat.sum() == 0


def test_valid_mask_equals_ignore_index():
    target, pred = random_masks(1)
    valid = np.ones(target.shape, bool)
    valid[-2:] = False  # e.g. padding images of a last batch
    ignored = target.copy()
    ignored[~valid] = 255
    np.testing.assert_array_equal(
        confusion_matrix(target, pred, N_CLASSES, valid), confusion_matrix(ignored, pred, N_CLASSES)
    )


def test_metrics_equal_direct_and_torchvision_formulas():
    target, pred = random_masks(2, shape=(4, 31, 29))
    acc = ConfusionMatrix(N_CLASSES)
    acc.add(confusion_matrix(target, pred, N_CLASSES))
    m = acc.compute()

    # Directly from the masks: accuracy over the counted pixels, IoU = |pred & target| / |pred | target|.
    keep = target != 255
    t, p = target[keep], pred[keep]
    assert m.pixel_acc == pytest.approx(np.mean(t == p), rel=1e-12)
    for c in range(N_CLASSES):
        assert m.class_acc[c] == pytest.approx(np.sum((t == c) & (p == c)) / np.sum(t == c), rel=1e-12)
        assert m.iou[c] == pytest.approx(np.sum((t == c) & (p == c)) / np.sum((t == c) | (p == c)), rel=1e-12)
    assert m.miou == pytest.approx(np.mean(m.iou), rel=1e-12)

    ref = torchvision_reference(acc.mat)
    acc_global, class_acc, iu, miou = ref[np.float64]
    assert m.pixel_acc == acc_global and m.miou == miou
    np.testing.assert_array_equal(m.class_acc, class_acc)
    np.testing.assert_array_equal(m.iou, iu)
    # torch's float32 evaluation differs by float32 rounding only.
    acc_global32, class_acc32, iu32, miou32 = ref[np.float32]
    np.testing.assert_allclose([m.pixel_acc, m.miou], [acc_global32, miou32], rtol=1e-6)
    np.testing.assert_allclose(m.iou, iu32, rtol=1e-6)
    np.testing.assert_allclose(m.class_acc, class_acc32, rtol=1e-6)


def test_absent_classes_give_nan_as_torchvision():
    # Class 3 is never in the targets but predicted; class 4 is in neither.
    target = np.array([[0, 0, 1, 2, 255], [1, 1, 2, 2, 0]])
    pred = np.array([[0, 3, 1, 2, 4], [1, 0, 2, 3, 0]])
    m = metrics_from_matrix(confusion_matrix(target, pred, N_CLASSES))
    assert np.isnan(m.class_acc[3]) and m.iou[3] == 0.0  # no target pixels: 0/0 accuracy, IoU 0/1
    assert np.isnan(m.class_acc[4]) and np.isnan(m.iou[4])  # absent everywhere: 0/0
    assert np.isnan(m.miou)  # torchvision prints "mean IoU: nan"
    assert np.isnan(torchvision_reference(direct_counts(target, pred, N_CLASSES))[np.float32][3])
    assert m.miou_present == pytest.approx(np.mean(m.iou[:4]))
    assert str(m).splitlines()[-1] == "mean IoU: nan"
    assert str(m).splitlines()[0] == f"global correct: {m.pixel_acc * 100:.1f}"


# ------------------------------------------------------------------------------------------------
# Detection

# Hand-made ground truth: (id, height, width, boxes xyxy, labels). Two categories (1 and 3), boxes of
# all three COCO sizes (small < 32^2 <= medium < 96^2 <= large).
GT_IMAGES = [
    (1, 200, 300, [[10, 10, 60, 50], [100, 120, 250, 190], [200, 20, 220, 35]], [1, 3, 1]),
    (2, 150, 150, [[5, 5, 40, 40], [60, 60, 140, 145]], [3, 1]),
    (3, 400, 400, [[0, 0, 200, 300], [300, 300, 310, 312]], [1, 3]),
    (7, 100, 120, [[20, 30, 70, 90]], [1]),  # no detections at all
]

# Detections in the original frame: jittered hits, a false positive, a duplicate, a wrong class, a
# missed small box (image 3) and an image without detections (7).
DETECTIONS = {
    1: (
        [[11, 9, 62, 52], [98, 121, 249, 193], [201, 21, 219, 36], [150, 10, 190, 60]],
        [0.9, 0.8, 0.3, 0.6],
        [1, 3, 1, 3],
    ),
    2: ([[6, 4, 41, 42], [62, 58, 139, 144], [61, 61, 138, 146]], [0.7, 0.95, 0.4], [3, 1, 1]),
    3: ([[3, 2, 198, 305], [50, 50, 90, 90]], [0.85, 0.5], [1, 1]),
    7: ([], [], []),
}


def gt_inputs():
    return [
        {"id": i, "height": h, "width": w, "boxes": np.array(b, np.float32), "labels": np.array(lab)}
        for i, h, w, b, lab in GT_IMAGES
    ]


def hand_gt_dataset():
    """The COCO ground-truth dict written out by hand: xywh boxes, area = w * h, iscrowd 0, ids from 1."""
    images, anns, ann_id = [], [], 1
    for i, h, w, boxes, labels in GT_IMAGES:
        images.append({"id": i, "height": h, "width": w})
        for (x1, y1, x2, y2), lab in zip(boxes, labels, strict=True):
            bw, bh = x2 - x1, y2 - y1
            anns.append(
                {
                    "image_id": i,
                    "bbox": [x1, y1, bw, bh],
                    "category_id": lab,
                    "area": bw * bh,
                    "iscrowd": 0,
                    "id": ann_id,
                }
            )
            ann_id += 1
    return {"images": images, "categories": [{"id": 1}, {"id": 3}], "annotations": anns}


def hand_results():
    """COCO result records written out by hand (xywh)."""
    return [
        {"image_id": i, "category_id": lab, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(np.float32(s))}
        for i, (boxes, scores, labels) in DETECTIONS.items()
        for (x1, y1, x2, y2), s, lab in zip(boxes, scores, labels, strict=True)
    ]


def torchvision_coco_evaluator(gt_dataset, batches):
    """references/detection/coco_eval.py CocoEvaluator(iou_types=["bbox"]) without torch: per update, the
    batch's results loaded with COCO.loadRes (an empty COCO() when there are none), params.imgIds = the
    batch's images, evaluate() and evalImgs reshaped (K, A, I); then the batches' records concatenated
    along images, the unique sorted image ids kept, evalImgs / params.imgIds / _paramsEval set, and
    accumulate() + summarize(). Returns COCOeval.stats."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt_dataset)
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, iouType="bbox")
        all_ids, all_evals = [], []
        for img_ids, results in batches:
            coco_dt = COCO.loadRes(coco_gt, copy.deepcopy(results)) if results else COCO()
            coco_eval.cocoDt = coco_dt
            coco_eval.params.imgIds = list(img_ids)
            coco_eval.evaluate()
            p = coco_eval.params
            all_ids.extend(p.imgIds)
            all_evals.append(np.asarray(coco_eval.evalImgs).reshape(-1, len(p.areaRng), len(p.imgIds)))
        merged_ids, idx = np.unique(np.array(all_ids), return_index=True)
        merged = np.concatenate(all_evals, 2)[..., idx]
        coco_eval.evalImgs = list(merged.flatten())
        coco_eval.params.imgIds = list(merged_ids)
        coco_eval._paramsEval = copy.deepcopy(coco_eval.params)
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(s) for s in coco_eval.stats]


@needs_pycocotools
def test_ground_truth_as_convert_to_coco_api():
    gt = coco_ground_truth(gt_inputs())
    assert gt.dataset == hand_gt_dataset()
    assert sorted(gt.getImgIds()) == [1, 2, 3, 7] and sorted(gt.getCatIds()) == [1, 3]
    # Given areas and crowd flags are kept; extra categories are listed.
    img = dict(gt_inputs()[1], area=np.array([7.5, 8.0]), iscrowd=np.array([0, 1]))
    gt2 = coco_ground_truth([img], categories=[5])
    assert [a["area"] for a in gt2.dataset["annotations"]] == [7.5, 8.0]
    assert [a["iscrowd"] for a in gt2.dataset["annotations"]] == [0, 1]
    assert gt2.dataset["categories"] == [{"id": 1}, {"id": 3}, {"id": 5}]


@needs_pycocotools
def test_map_equals_pycocotools_and_torchvision_evaluator():
    gt = coco_ground_truth(gt_inputs())
    ids = list(DETECTIONS)
    dets = [
        {
            "boxes": np.array(b, np.float32).reshape(-1, 4),
            "scores": np.array(s, np.float32),
            "labels": np.array(lab),
        }
        for b, s, lab in DETECTIONS.values()
    ]
    results = coco_results(ids, dets)
    assert results == hand_results()
    before = copy.deepcopy(results)
    stats = coco_stats(gt, results, ids)
    assert results == before  # pycocotools' loadRes writes into its input; ours is left alone
    assert list(stats) == list(STAT_NAMES)

    # The same stats, to the bit, as torchvision's batch-wise CocoEvaluator on the hand-written data.
    by_image = {i: [r for r in hand_results() if r["image_id"] == i] for i in ids}
    batches = [([1, 2], by_image[1] + by_image[2]), ([3], by_image[3]), ([7], by_image[7])]
    reference = torchvision_coco_evaluator(hand_gt_dataset(), batches)
    assert list(stats.values()) == reference
    # The data exercise every stat: misses, false positives, all sizes (none is undefined).
    assert all(0.0 < v < 1.0 for v in stats.values())
    # Leaving out the image without detections changes the numbers (its box is then not missed).
    assert coco_stats(gt, results, [1, 2, 3]) != stats
    # No detections at all: torchvision's empty COCO() path, every stat 0.
    assert coco_stats(gt, [], ids) == dict.fromkeys(STAT_NAMES, 0.0)
    assert torchvision_coco_evaluator(hand_gt_dataset(), [(ids, [])]) == [0.0] * 12


def test_rescale_to_original_size():
    # Image 0: input (300, 200) of an original (600, 800): ratios h 2, w 4, exact by hand.
    # Image 1: input (320, 427) of (480, 640): w ratio float32(640) / float32(427), h 1.5.
    out = {
        "boxes": np.array(
            [
                [[1.5, 2.5, 10.0, 20.0], [0.0, 0.0, 200.0, 300.0], [9, 9, 9, 9]],
                [[10.0, 20.0, 100.0, 200.0], [7, 7, 7, 7], [9, 9, 9, 9]],
            ],
            np.float32,
        ),
        "scores": np.array([[0.9, 0.5, 0.1], [0.8, 0.2, 0.1]], np.float32),
        "labels": np.array([[1, 3, 1], [3, 1, 1]]),
        "num_detections": np.array([2, 1]),
    }
    dets = original_frame_detections(out, [(300, 200), (320, 427)], [(600, 800), (480, 640)])
    np.testing.assert_array_equal(dets[0]["boxes"], [[6.0, 5.0, 40.0, 40.0], [0.0, 0.0, 800.0, 600.0]])
    rw = np.float32(640) / np.float32(427)
    expected = np.array([10 * rw, 20 * 1.5, 100 * rw, 200 * 1.5], np.float32)
    assert dets[1]["boxes"].dtype == np.float32
    np.testing.assert_array_equal(dets[1]["boxes"], [expected])
    np.testing.assert_allclose(dets[1]["boxes"][0], [10 * 640 / 427, 30, 100 * 640 / 427, 300], rtol=1e-6)
    np.testing.assert_array_equal(dets[0]["labels"], [1, 3])
    np.testing.assert_array_equal(dets[1]["scores"], np.float32([0.8]))
    res = coco_results([11, 12], dets)
    assert [r["bbox"] for r in res] == [
        [6.0, 5.0, 34.0, 35.0],
        [0.0, 0.0, 800.0, 600.0],
        [*expected[:2].tolist(), *(expected[2:] - expected[:2]).tolist()],
    ]
    assert [(r["image_id"], r["category_id"]) for r in res] == [(11, 1), (11, 3), (12, 3)]
    # A label -> category table, for datasets whose labels are not COCO ids.
    assert [r["category_id"] for r in coco_results([11], [dets[0]], label_to_category=[0, 5, 6, 9])] == [5, 9]


@needs_pycocotools
def test_evaluator_on_padded_batches():
    # The model's padded output in a half-size input frame (exact float32 ratio 2), in two batches,
    # the last with a padding image; gives the same stats as the original-frame detections.
    gt = coco_ground_truth(gt_inputs())
    sizes = {i: (h, w) for i, h, w, _, _ in GT_IMAGES}
    ev = CocoDetectionEvaluator(gt)
    for batch in ([1, 2], [3, 7]):
        out = {k: [] for k in ("boxes", "scores", "labels", "num_detections")}
        for i in [*batch, batch[-1]]:  # a repeated last image stands for padding, left out below
            b, s, lab = DETECTIONS[i]
            pad = 5 - len(s)
            out["boxes"].append(
                np.concatenate([np.array(b, np.float32).reshape(-1, 4) / 2, np.full((pad, 4), 3.0)])
            )
            out["scores"].append(np.concatenate([np.array(s, np.float32), np.zeros(pad, np.float32)]))
            out["labels"].append(np.concatenate([np.array(lab, np.int64), np.ones(pad, np.int64)]))
            out["num_detections"].append(len(s))
        out = {k: np.stack(v) for k, v in out.items()}
        resized = [(sizes[i][0] // 2, sizes[i][1] // 2) for i in batch]
        ev.update(batch, out, resized, [sizes[i] for i in batch])
    assert ev.results == hand_results()
    assert ev.compute() == coco_stats(gt, hand_results(), list(DETECTIONS))


def test_results_json_round_trip(tmp_path):
    results = hand_results()
    path = tmp_path / "detections.json"
    path.write_text("old")
    write_results_json(path, results)
    with open(path) as f:
        assert json.load(f) == results
    assert [p.name for p in tmp_path.iterdir()] == ["detections.json"]  # no temporary file left
