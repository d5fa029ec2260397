"""COCO box mAP as torchvision's detection references compute it (``CocoEvaluator`` with
``iou_types=["bbox"]``): detections mapped back to each image's original size, written as COCO results
(xywh boxes), scored by pycocotools' ``COCOeval`` against a COCO ground-truth object.

torchvision evaluates batch by batch and merges the per-image records before ``accumulate``; that is
the same computation as one ``COCOeval.evaluate`` over all the evaluated images, which is what
:func:`coco_stats` runs. The evaluated images are the ones detections were given for (an image without
detections still counts: its boxes are missed), as torchvision sets ``params.imgIds`` to the images seen.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mbv3_jax.models.detection_utils import unpad_detections

# COCOeval.stats, in its order: AP at IoU .50:.95 / .50 / .75, AP small / medium / large (100
# detections), AR with 1 / 10 / 100 detections, AR small / medium / large (100 detections).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _quiet() -> contextlib.AbstractContextManager:
    """Swallow pycocotools' progress prints (it has no switch for them); results are read from objects."""
    return contextlib.redirect_stdout(io.StringIO())


def original_frame_detections(
    out: Mapping[str, Any], resized_sizes: Sequence[Sequence[int]], original_sizes: Sequence[Sequence[int]]
) -> list[dict[str, np.ndarray]]:
    """Per image, the first ``out["num_detections"][i]`` of the model's padded ``boxes`` (xyxy, input
    frame), ``scores`` and ``labels``, boxes scaled to the original (height, width) as torchvision's
    ``GeneralizedRCNNTransform.postprocess`` does (float32 ratios original / resized, per axis)."""
    return unpad_detections(out, resized_sizes, original_sizes)


def coco_results(
    image_ids: Sequence[int],
    detections: Sequence[Mapping[str, Any]],
    label_to_category: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """COCO result records ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` of per-image
    detections (xyxy boxes in the original frame), as ``CocoEvaluator.prepare_for_coco_detection``.

    Widths and heights are float32 differences, as torchvision's ``convert_to_xywh`` on its float32
    boxes; the category is the label itself (torchvision's COCO models predict category ids) unless
    ``label_to_category`` maps labels to ids.
    """
    if len(image_ids) != len(detections):
        raise ValueError(f"got {len(image_ids)} image ids but {len(detections)} detection sets")
    mapping = None if label_to_category is None else np.asarray(label_to_category)
    results = []
    for image_id, det in zip(image_ids, detections, strict=True):
        boxes = np.asarray(det["boxes"], np.float32).reshape(-1, 4)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        scores = np.asarray(det["scores"], np.float32).reshape(-1)
        labels = np.asarray(det["labels"]).reshape(-1).astype(np.int64)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels"
            )
        if mapping is not None:
            labels = mapping[labels]
        # tolist() turns float32 into the Python floats of the same values, as torch's tolist() does.
        for box, score, label in zip(xywh.tolist(), scores.tolist(), labels.tolist(), strict=True):
            results.append(
                {"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": score}
            )
    return results


def coco_ground_truth(images: Sequence[Mapping[str, Any]], categories: Sequence[int] | None = None) -> Any:
    """A pycocotools ``COCO`` of in-memory annotations, as torchvision's ``convert_to_coco_api``.

    Each image is ``{"id", "height", "width", "boxes": (G, 4) xyxy, "labels": (G,)}`` with optional
    ``"area"`` (default: the float32 box area, what torchvision's own non-COCO datasets give) and
    ``"iscrowd"`` (default 0). Annotation ids count from 1 (pycocotools skips id 0); categories are
    ``categories`` or, as torchvision, the labels that occur (a category with no ground truth does not
    change the stats: COCOeval leaves it out of every mean).
    """
    from pycocotools.coco import COCO

    dataset: dict[str, list] = {"images": [], "categories": [], "annotations": []}
    seen: set[int] = set()
    ann_id = 1
    for img in images:
        image_id = int(img["id"])
        dataset["images"].append({"id": image_id, "height": int(img["height"]), "width": int(img["width"])})
        boxes = np.asarray(img["boxes"], np.float32).reshape(-1, 4)
        wh = boxes[:, 2:] - boxes[:, :2]
        xywh = np.concatenate([boxes[:, :2], wh], axis=1)
        labels = np.asarray(img["labels"]).reshape(-1).astype(np.int64)
        area = np.asarray(img["area"]).reshape(-1) if "area" in img else wh[:, 0] * wh[:, 1]
        iscrowd = (
            np.asarray(img["iscrowd"]).reshape(-1) if "iscrowd" in img else np.zeros(len(boxes), np.int64)
        )
        if not len(boxes) == len(labels) == len(area) == len(iscrowd):
            raise ValueError(f"image {image_id}: boxes, labels, area and iscrowd differ in length")
        for box, label, a, crowd in zip(
            xywh.tolist(), labels.tolist(), area.tolist(), iscrowd.tolist(), strict=True
        ):
            dataset["annotations"].append(
                {
                    "image_id": image_id,
                    "bbox": box,
                    "category_id": int(label),
                    "area": a,
                    "iscrowd": int(crowd),
                    "id": ann_id,
                }
            )
            seen.add(int(label))
            ann_id += 1
    cats = sorted(seen) if categories is None else sorted({int(c) for c in categories} | seen)
    dataset["categories"] = [{"id": c} for c in cats]
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def coco_stats(
    coco_gt: Any, results: Sequence[Mapping[str, Any]], image_ids: Sequence[int] | None = None
) -> dict[str, float]:
    """The 12 COCO box stats (:data:`STAT_NAMES`, fractions; -1 where undefined, e.g. no ground truth of
    that size) of ``results`` on the images ``image_ids`` (default: every ground-truth image), by
    pycocotools' ``COCOeval(iouType="bbox")``. Neither the ground truth nor the results are modified
    (pycocotools writes into both).

    pycocotools only: faster-coco-eval 1.8.0 differs from it in the last bit (up to 1.1e-16) on some
    data sets, and this module promises torchvision's numbers exactly.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dts = copy.deepcopy(list(results))
    with _quiet():
        gt = COCO()
        gt.dataset = copy.deepcopy(coco_gt.dataset)
        gt.createIndex()
        # torchvision: an empty COCO() when there is nothing to load (loadRes fails on []).
        dt = gt.loadRes(dts) if dts else COCO()
        evaluator = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = [int(i) for i in image_ids]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)}


def write_results_json(path: str | os.PathLike, results: Sequence[Mapping[str, Any]]) -> None:
    """Write COCO results as a JSON list, atomically: a temporary file in the same directory, then
    ``os.replace``, so a reader (or a crash) never sees half a file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # A unique name beside the target (os.replace is atomic only within one file system); opened with
    # "x" so it is new and gets the usual permissions (mkstemp's are owner-only).
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x") as f:
            json.dump(list(results), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class CocoDetectionEvaluator:
    """Collects a stream of padded detection batches as COCO results and scores them at the end, as
    torchvision's ``CocoEvaluator`` over its ``update`` calls."""

    def __init__(self, coco_gt: Any, label_to_category: Sequence[int] | None = None):
        self.coco_gt = coco_gt
        self.label_to_category = label_to_category
        self.image_ids: list[int] = []
        self.results: list[dict[str, Any]] = []

    def update(
        self,
        image_ids: Sequence[int],
        out: Mapping[str, Any],
        resized_sizes: Sequence[Sequence[int]],
        original_sizes: Sequence[Sequence[int]],
    ) -> None:
        """Add one batch: the model's padded output (``boxes``, ``scores``, ``labels``, ``num_detections``)
        for the images ``image_ids``, of input sizes ``resized_sizes`` and original sizes
        ``original_sizes`` ((height, width) each). Padding images of a last batch are left out by
        passing only the real images' ids and sizes."""
        image_ids = [int(i) for i in image_ids]
        dets = original_frame_detections(out, resized_sizes, original_sizes)[: len(image_ids)]
        self.image_ids.extend(image_ids)
        self.results.extend(coco_results(image_ids, dets, self.label_to_category))

    def compute(self) -> dict[str, float]:
        """The 12 COCO stats over the images seen so far."""
        if not self.image_ids:
            raise ValueError("no images were evaluated")
        return coco_stats(self.coco_gt, self.results, sorted(set(self.image_ids)))

    def write(self, path: str | os.PathLike) -> None:
        """Write the results collected so far as a COCO results JSON file (atomically)."""
        write_results_json(path, self.results)
