"""Top-1 / top-5 evaluation of a classifier over an iterable of batches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from tqdm.auto import tqdm


def topk_correct(logits: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the k highest logits, for each k."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (N, C) and labels (N,), got {logits.shape} and {labels.shape}")
    order = np.argsort(-logits, axis=-1, kind="stable")
    return {k: int(np.sum(np.any(order[:, :k] == labels[:, None], axis=-1))) for k in ks}


def evaluate(
    model: Any,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    total: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Eval-mode accuracy: ``{"top1", "top5", "count"}`` over ``(images NHWC float, labels)`` batches."""
    model.eval()
    correct = {1: 0, 5: 0}
    count = 0
    bar = tqdm(batches, total=total, desc="eval", unit="batch", disable=not progress)
    for images, labels in bar:
        logits = np.asarray(model(images))
        for k, v in topk_correct(logits, labels, (1, min(5, logits.shape[-1]))).items():
            correct[1 if k == 1 else 5] += v
        count += len(labels)
        bar.set_postfix(top1=f"{correct[1] / count:.4f}")
    if count == 0:
        raise ValueError("evaluate: no batches")
    return {"top1": correct[1] / count, "top5": correct[5] / count, "count": count}
