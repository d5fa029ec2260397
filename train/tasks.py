"""What the trainer trains: each task turns a batch of (images, targets) into a loss and eval metrics.

The trainer core (mesh, optimizer, checkpoints, exact resume, logging) is the same for every task; a
task supplies the loss of a train step, what an eval step returns per batch (sums, which :meth:`combine`
adds on the host, so any eval set reduces to a few numbers; detection concatenates its detections)
and how those become the reported metrics. ``best_metric`` ranks checkpoints (``checkpoint.keep_best``)
and picks ``mbv3-average``'s best run; ``train_metric`` is the per-batch number logged in train rows.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.losses import segmentation_loss
from train.segmentation_eval import confusion_matrix, metrics_from_matrix

if TYPE_CHECKING:
    import os

SEGMENTATION_IGNORE_INDEX = 255


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """torch ``CrossEntropyLoss(label_smoothing=...)``, mean over the batch (in at least float32)."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return optax.softmax_cross_entropy(logits, optax.smooth_labels(onehot, label_smoothing)).mean()


class _SummedEval:
    """Eval outputs that are per-batch sums: the host adds them, batch after batch."""

    @staticmethod
    def combine(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        total = dict(batches[0])
        for batch in batches[1:]:
            total = {k: total[k] + batch[k] for k in total}
        return total


@dataclasses.dataclass(frozen=True)
class Classification(_SummedEval):
    """Image classification: torch's cross-entropy (optionally label-smoothed); eval top-1 / top-5 /
    loss over the eval set (padding images weigh 0)."""

    label_smoothing: float = 0.0
    kind: ClassVar[str] = "classification"
    best_metric: ClassVar[str] = "top1"
    train_metric: ClassVar[str] = "top1"
    ema_metrics: ClassVar[tuple[str, ...]] = ("top1", "top5")

    def loss(
        self, model: Any, images: jax.Array, labels: jax.Array, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(loss, the batch's top-1 accuracy)."""
        logits = model.forward(images)
        loss = cross_entropy(logits, labels, self.label_smoothing)
        return loss, jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))

    def eval_sums(
        self, model: Any, images: jax.Array, labels: jax.Array, weights: jax.Array
    ) -> dict[str, jax.Array]:
        logits = model.forward(images)
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        k = min(5, logits.shape[-1])
        _, top = jax.lax.top_k(logits, k)
        top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        topk = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {
            "loss": jnp.sum(loss * weights),
            "top1": jnp.sum(top1 * weights),
            "top5": jnp.sum(topk * weights),
            "count": jnp.sum(weights),
        }

    def finalize(
        self, sums: dict[str, np.ndarray], results_path: str | os.PathLike | None = None
    ) -> dict[str, float]:
        count = float(sums["count"])
        return {k: float(v) / count for k, v in sums.items() if k != "count"} | {"count": count}

    def summary(self, metrics: dict[str, float]) -> str:
        return f"top-1 {metrics['top1']:.4f} top-5 {metrics['top5']:.4f} loss {metrics['loss']:.4f}"


@dataclasses.dataclass(frozen=True)
class Segmentation(_SummedEval):
    """Semantic segmentation as torchvision's references/segmentation train it: cross-entropy over the
    pixels whose label is not 255, plus ``aux_weight`` times the aux head's (DeepLabV3 with
    ``aux_loss``); eval: the confusion matrix of the whole eval set, its mIoU and pixel accuracy
    (torchvision's ``ConfusionMatrix``), and the mean loss per counted pixel."""

    num_classes: int
    aux_weight: float = 0.5
    kind: ClassVar[str] = "segmentation"
    best_metric: ClassVar[str] = "miou"
    train_metric: ClassVar[str] = "pixel_acc"
    ema_metrics: ClassVar[tuple[str, ...]] = ("miou",)

    def loss(
        self, model: Any, images: jax.Array, masks: jax.Array, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(loss, the batch's pixel accuracy over labelled pixels)."""
        out = model.forward(images)
        loss = segmentation_loss(out, masks, self.aux_weight)
        keep = masks != SEGMENTATION_IGNORE_INDEX
        correct = (jnp.argmax(out["out"], -1) == masks) & keep
        return loss, jnp.sum(correct) / jnp.maximum(jnp.sum(keep), 1)

    def eval_sums(
        self, model: Any, images: jax.Array, masks: jax.Array, weights: jax.Array
    ) -> dict[str, jax.Array]:
        logits = model.forward(images)["out"]
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        counted = (masks != SEGMENTATION_IGNORE_INDEX) & (weights[:, None, None] > 0)
        per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(counted, masks, 0))
        return {
            "confusion": confusion_matrix(masks, jnp.argmax(logits, -1), self.num_classes, counted),
            "loss": jnp.sum(jnp.where(counted, per_pixel, 0.0)),
            "pixels": jnp.sum(counted).astype(jnp.float32),
            "count": jnp.sum(weights),
        }

    def finalize(
        self, sums: dict[str, np.ndarray], results_path: str | os.PathLike | None = None
    ) -> dict[str, float]:
        m = metrics_from_matrix(sums["confusion"])
        return {
            "miou": m.miou,
            "pixel_acc": m.pixel_acc,
            "loss": float(sums["loss"]) / max(float(sums["pixels"]), 1.0),
            "count": float(sums["count"]),
        }

    def summary(self, metrics: dict[str, float]) -> str:
        return (
            f"mIoU {metrics['miou']:.4f} pixel accuracy {metrics['pixel_acc']:.4f} loss {metrics['loss']:.4f}"
        )


@dataclasses.dataclass(frozen=True)
class Detection:
    """Object detection as torchvision's references/detection train it: the model's train-mode losses,
    summed (SSD: box regression + classification; Faster R-CNN: its four, with the step's key for the
    samplers); eval: COCO box mAP by pycocotools over every eval image's detections, rescaled to the
    image's original size, against its ground truth (crowd regions included), as torchvision's
    ``CocoEvaluator``. Without COCO's mask areas the small / medium / large split goes by box area.

    ``keep_ratio``: a Faster R-CNN (images resized keeping their aspect ratio, each one's size in the
    targets' ``image_size``, padded to the batch's shape, which also sets RoIAlign's scales as
    torchvision's padded batch does)."""

    num_classes: int
    category_ids: tuple[int, ...] | None = None  # written to the results JSON for labels 1.. (else labels)
    keep_ratio: bool = False
    kind: ClassVar[str] = "detection"
    best_metric: ClassVar[str] = "map"
    train_metric: ClassVar[str] = "box_loss"
    ema_metrics: ClassVar[tuple[str, ...]] = ("map",)

    def loss(
        self, model: Any, images: jax.Array, targets: dict[str, jax.Array], key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(the summed losses, the box regression loss of the detections: SSD's, or the RoI heads')."""
        boxes, labels, valid = targets["boxes"], targets["labels"], targets["valid"]
        if self.keep_ratio:
            hw = tuple(images.shape[1:3])
            losses = model.forward_train(images, targets["image_size"], boxes, labels, valid, key, hw)
            return sum(losses.values()), losses["loss_box_reg"]
        losses = model.losses(images, boxes, labels, valid)
        return sum(losses.values()), losses["bbox_regression"]

    def eval_sums(
        self, model: Any, images: jax.Array, targets: dict[str, jax.Array], weights: jax.Array
    ) -> dict[str, jax.Array]:
        """The batch's detections (in the model's input frame) with its ground truth and weights."""
        if self.keep_ratio:
            det = model.forward_detect(images, targets["image_size"], tuple(images.shape[1:3]))
        else:
            det = model.forward_detect(images)
        return {f"det_{k}": v for k, v in det.items()} | targets | {"weights": weights}

    @staticmethod
    def combine(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def finalize(
        self, sums: dict[str, np.ndarray], results_path: str | os.PathLike | None = None
    ) -> dict[str, float]:
        """COCO stats of the evaluated images (padding rows dropped); ``results_path``: also write their
        detections there as a COCO results JSON (atomically)."""
        from train.detection_eval import (
            coco_ground_truth,
            coco_results,
            coco_stats,
            original_frame_detections,
            write_results_json,
        )

        real = np.flatnonzero(sums["weights"] > 0)
        ids = [int(i) for i in sums["image_id"][real]]
        sizes = [tuple(int(v) for v in sums["size"][i]) for i in real]
        ground_truth = []
        for i, image_id, (h, w) in zip(real, ids, sizes, strict=True):
            valid = sums["valid"][i]
            ground_truth.append(
                {
                    "id": image_id,
                    "height": h,
                    "width": w,
                    "boxes": sums["boxes"][i][valid],
                    "labels": sums["labels"][i][valid],
                    "iscrowd": sums["crowd"][i][valid].astype(np.int64),
                }
            )
        coco_gt = coco_ground_truth(ground_truth, categories=range(1, self.num_classes))
        outputs = {k: sums[f"det_{k}"][real] for k in ("boxes", "scores", "labels", "num_detections")}
        resized = [tuple(int(v) for v in sums["image_size"][i]) for i in real]
        detections = original_frame_detections(outputs, resized, sizes)
        results = coco_results(ids, detections)
        stats = coco_stats(coco_gt, results, ids)
        if results_path is not None:
            if self.category_ids is not None:  # the data's own category ids, to score against its file
                results = coco_results(ids, detections, (0, *self.category_ids))
            write_results_json(results_path, results)
        return {"map": stats["AP"], "map50": stats["AP50"], "map75": stats["AP75"], "count": float(len(ids))}

    def summary(self, metrics: dict[str, float]) -> str:
        return f"mAP {metrics['map']:.4f} mAP@0.5 {metrics['map50']:.4f} mAP@0.75 {metrics['map75']:.4f}"


Task = Classification | Segmentation | Detection
