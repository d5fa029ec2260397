"""What the trainer trains: each task turns a batch of (images, targets) into a loss and eval metrics.

The trainer core (mesh, optimizer, checkpoints, exact resume, logging) is the same for every task; a
task supplies the loss of a train step, the per-batch sums an eval step returns (added across batches
on the device, so any eval set reduces to a few numbers) and how those sums become the reported
metrics. ``best_metric`` ranks checkpoints (``checkpoint.keep_best``) and picks ``mbv3-average``'s best
run; ``train_metric`` is the per-batch number logged in train rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.losses import segmentation_loss
from train.segmentation_eval import confusion_matrix, metrics_from_matrix

SEGMENTATION_IGNORE_INDEX = 255


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """torch ``CrossEntropyLoss(label_smoothing=...)``, mean over the batch (in at least float32)."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return optax.softmax_cross_entropy(logits, optax.smooth_labels(onehot, label_smoothing)).mean()


@dataclasses.dataclass(frozen=True)
class Classification:
    """Image classification: torch's cross-entropy (optionally label-smoothed); eval top-1 / top-5 /
    loss over the eval set (padding images weigh 0)."""

    label_smoothing: float = 0.0
    kind: ClassVar[str] = "classification"
    best_metric: ClassVar[str] = "top1"
    train_metric: ClassVar[str] = "top1"
    ema_metrics: ClassVar[tuple[str, ...]] = ("top1", "top5")

    def loss(self, model: Any, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
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

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        count = float(sums["count"])
        return {k: float(v) / count for k, v in sums.items() if k != "count"} | {"count": count}

    def summary(self, metrics: dict[str, float]) -> str:
        return f"top-1 {metrics['top1']:.4f} top-5 {metrics['top5']:.4f} loss {metrics['loss']:.4f}"


@dataclasses.dataclass(frozen=True)
class Segmentation:
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

    def loss(self, model: Any, images: jax.Array, masks: jax.Array) -> tuple[jax.Array, jax.Array]:
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

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
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


Task = Classification | Segmentation
