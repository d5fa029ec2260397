"""Segmentation metrics as torchvision's references compute them: a confusion matrix over the pixels
whose target is a class (the ignore index 255 is skipped), then global pixel accuracy, per-class
accuracy, per-class IoU and their mean (mIoU).

The counting runs on the device, per batch (:func:`confusion_matrix`, jittable, int32), so a sharded
eval step returns one small (n, n) matrix instead of its masks; the host sums those in int64
(:class:`ConfusionMatrix`), as torchvision's ``ConfusionMatrix`` does over its ``update`` calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(target: Any, pred: Any, num_classes: int, valid: Any = None) -> jax.Array:
    """The (n, n) int32 counts ``[true class, predicted class]`` over the pixels of a batch, skipping
    pixels whose target is not in [0, n) (ignore index 255) and, if given, where ``valid`` is False.

    Jittable with ``num_classes`` static; ``target``, ``pred`` and ``valid`` have one shape (any: (N, H, W),
    flat, ...). Matrices of disjoint batches add up to the matrix of their union. Predictions outside
    [0, n) are not counted (torchvision's ``bincount(...).reshape(n, n)`` would fail on them; an argmax
    never makes one). int32 is exact for fewer than 2**31 pixels a batch.
    """
    n = int(num_classes)
    target = jnp.asarray(target).reshape(-1).astype(jnp.int32)
    pred = jnp.asarray(pred).reshape(-1).astype(jnp.int32)
    if target.shape != pred.shape:
        raise ValueError(f"target and pred differ in size: {target.shape} vs {pred.shape}")
    keep = (target >= 0) & (target < n) & (pred >= 0) & (pred < n)
    if valid is not None:
        keep = keep & jnp.asarray(valid).reshape(-1).astype(bool)
    # Skipped pixels go to an extra bucket n*n that is dropped: jnp.bincount clips negative indices to 0,
    # so masking by index value alone would miscount.
    idx = jnp.where(keep, n * target + pred, n * n)
    counts = jnp.bincount(idx, length=n * n + 1)[: n * n]
    return counts.reshape(n, n).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class SegmentationMetrics:
    """torchvision's ``ConfusionMatrix.compute()`` and the mIoU its ``__str__`` prints (fractions,
    not percentages).

    NaN, as in torchvision: ``class_acc[c]`` when class c never occurs in the targets; ``iou[c]`` when
    it occurs in neither targets nor predictions; ``pixel_acc`` when no pixel was counted. ``miou`` is
    the plain mean of ``iou``, so it is NaN as soon as one class is absent from both targets and
    predictions (torchvision prints "mean IoU: nan" then); :attr:`miou_present` is the mean over the
    other classes, for small evaluation sets that miss a class.
    """

    pixel_acc: float
    class_acc: np.ndarray
    iou: np.ndarray
    miou: float

    @property
    def miou_present(self) -> float:
        """Mean IoU over the classes present in the targets or the predictions (NaN-skipping mean)."""
        present = self.iou[~np.isnan(self.iou)]
        return float(present.mean()) if present.size else float("nan")

    def __str__(self) -> str:
        """torchvision's report, in percent with one decimal."""
        return (
            f"global correct: {self.pixel_acc * 100:.1f}\n"
            f"average row correct: {[f'{a:.1f}' for a in (self.class_acc * 100).tolist()]}\n"
            f"IoU: {[f'{a:.1f}' for a in (self.iou * 100).tolist()]}\n"
            f"mean IoU: {self.miou * 100:.1f}"
        )


def metrics_from_matrix(mat: Any) -> SegmentationMetrics:
    """Pixel accuracy, per-class accuracy, per-class IoU and mIoU of an (n, n) confusion matrix.

    torchvision's formulas: with h the matrix (rows = target, columns = prediction),
    ``diag(h).sum() / h.sum()``, ``diag(h) / h.sum(1)``, ``diag(h) / (h.sum(1) + h.sum(0) - diag(h))``,
    ``iou.mean()``. torchvision casts h to float32 first; this uses float64, so that counts above 2**24
    (a few dozen 520-pixel images) stay exact: the two differ by float32 rounding (~1e-7 relative).
    """
    h = np.asarray(mat).astype(np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {h.shape}")
    diag = np.diag(h)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 -> NaN on purpose, as in torch
        pixel_acc = diag.sum() / h.sum()
        class_acc = diag / h.sum(1)
        iou = diag / (h.sum(1) + h.sum(0) - diag)
    return SegmentationMetrics(float(pixel_acc), class_acc, iou, float(iou.mean()))


class ConfusionMatrix:
    """Host-side accumulator, torchvision's ``ConfusionMatrix`` without torch: int64 counts summed over
    batches, either per-batch matrices from :func:`confusion_matrix` (:meth:`add`) or masks
    (:meth:`update`)."""

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.mat = np.zeros((self.num_classes, self.num_classes), np.int64)

    def add(self, counts: Any) -> None:
        """Add a per-batch (n, n) count matrix (e.g. the device's int32 one)."""
        counts = np.asarray(counts)
        if counts.shape != self.mat.shape:
            raise ValueError(f"expected counts of shape {self.mat.shape}, got {counts.shape}")
        self.mat += counts.astype(np.int64)

    def update(self, target: Any, pred: Any) -> None:
        """torchvision's ``update(a, b)`` on the host: count ``n * target + pred`` over the pixels with
        ``0 <= target < n``."""
        n = self.num_classes
        target = np.asarray(target).reshape(-1)
        pred = np.asarray(pred).reshape(-1)
        k = (target >= 0) & (target < n)
        inds = n * target[k].astype(np.int64) + pred[k].astype(np.int64)
        self.mat += np.bincount(inds, minlength=n * n).reshape(n, n)

    def reset(self) -> None:
        """Zero the counts."""
        self.mat[...] = 0

    def compute(self) -> SegmentationMetrics:
        """The metrics of the counts so far (see :func:`metrics_from_matrix`)."""
        return metrics_from_matrix(self.mat)

    def __str__(self) -> str:
        return str(self.compute())
