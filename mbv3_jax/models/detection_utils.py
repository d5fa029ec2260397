"""What the detectors (Faster R-CNN and SSDlite) share: input checks, the host-side transform and
box resizing, loss terms, the gather after padded NMS, and the builders' argument checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax.ops.interpolate import interpolate_bilinear

HW = tuple[int, int]

# torchvision's box coder weights for the final boxes of both detectors (RoI heads and SSD).
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


# ------------------------------------------------------------------------------------------------
# Inputs and the host-side transform


def check_image_list(images: Any) -> list[Any]:
    """The images as a list, each checked to be an HWC float array with 3 channels."""
    if hasattr(images, "ndim") and images.ndim == 3:
        raise TypeError("expected a list of HWC images, got a single array: wrap it in a list")
    images = list(images)
    if not images:
        raise ValueError("expected at least one image")
    for i, img in enumerate(images):
        shape = getattr(img, "shape", None)
        if shape is None or len(shape) != 3 or shape[-1] != 3:
            raise ValueError(f"image {i}: expected an HWC float array with 3 channels, got shape {shape}")
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"image {i}: expected an image of at least 1x1 pixels, got shape {tuple(shape)}")
        if not jnp.issubdtype(img.dtype, jnp.floating):
            raise TypeError(f"image {i}: expected float pixels in [0, 1], got dtype {img.dtype}")
    return images


@partial(jax.jit, static_argnames=("size", "mean", "std"))
def normalize_and_resize(
    image: jax.Array, size: HW, mean: tuple[float, ...], std: tuple[float, ...]
) -> jax.Array:
    """torchvision's normalize, then bilinear resize (no antialias) of one HWC image to ``size`` (h, w)."""
    x = (image.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return interpolate_bilinear(x[None], size)[0]


def normalize_and_resize_images(
    images: Any, mean: tuple[float, ...], std: tuple[float, ...], size_of: Callable[[int, int], HW]
) -> tuple[list[jax.Array], list[HW], list[HW]]:
    """Checked images, each normalized and resized to ``size_of(h, w)``: (images, their (h, w),
    the original (h, w))."""
    resized, sizes, originals = [], [], []
    for img in check_image_list(images):
        h, w = int(img.shape[0]), int(img.shape[1])
        size = size_of(h, w)
        resized.append(normalize_and_resize(jnp.asarray(img), size, mean, std))
        sizes.append(size)
        originals.append((h, w))
    return resized, sizes, originals


def resize_boxes(boxes: np.ndarray, from_hw: Sequence[int], to_hw: Sequence[int]) -> np.ndarray:
    """torchvision's ``resize_boxes``: (x1, y1, x2, y2) boxes times the float32 ratios ``to / from``."""
    ratio_h = np.float32(to_hw[0]) / np.float32(from_hw[0])
    ratio_w = np.float32(to_hw[1]) / np.float32(from_hw[1])
    return boxes * np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)


def check_target(i: int, target: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's checks of target ``i``: float (G, 4) boxes with positive width and height and
    G integer labels in [0, num_classes), and finite boxes; returns them as float32 and int32."""
    if not isinstance(target, Mapping) or "boxes" not in target or "labels" not in target:
        raise ValueError(f"target {i}: expected a dict with 'boxes' and 'labels'")
    boxes = np.asarray(target["boxes"], np.float32)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"target {i}: expected boxes of shape (G, 4), got {boxes.shape}")
    labels = np.asarray(target["labels"])
    if labels.shape != (len(boxes),) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(
            f"target {i}: expected {len(boxes)} integer labels, got shape {labels.shape} {labels.dtype}"
        )
    not_finite = ~np.isfinite(boxes).all(axis=1)
    if not_finite.any():  # torchvision lets these through (NaN compares false) into a NaN loss
        j = int(np.argmax(not_finite))
        raise ValueError(f"target {i}: box {j} is {boxes[j].tolist()}; boxes must be finite")
    degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if degenerate.any():
        j = int(np.argmax(degenerate))
        raise ValueError(
            f"target {i}: all bounding boxes should have positive height and width; "
            f"box {j} is {boxes[j].tolist()}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"target {i}: labels should be in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    return boxes, labels.astype(np.int32)


def resized_targets(
    targets: Sequence[Mapping[str, Any]],
    original_sizes: Sequence[Sequence[int]],
    resized_sizes: Sequence[Sequence[int]],
    num_classes: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Checked targets, one per image, with boxes resized as their images were: (boxes, labels) lists."""
    targets = list(targets)
    if len(targets) != len(original_sizes):
        raise ValueError(f"got {len(original_sizes)} images but {len(targets)} targets")
    boxes_list, labels_list = [], []
    for i, (target, orig, size) in enumerate(zip(targets, original_sizes, resized_sizes, strict=True)):
        boxes, labels = check_target(i, target, num_classes)
        boxes_list.append(resize_boxes(boxes, orig, size))
        labels_list.append(labels)
    return boxes_list, labels_list


def pad_targets(
    boxes_list: Sequence[np.ndarray],
    labels_list: Sequence[np.ndarray],
    *,
    min_slots: int,
    pad_box: tuple[float, float, float, float],
    max_boxes: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground truth padded to G slots per image: boxes (N, G, 4) float32 (``pad_box`` in padding
    rows), labels (N, G) int32, valid (N, G) bool.

    G is ``max_boxes``, or the largest count rounded up to a power of two (at least ``min_slots``)
    so that a stream of batches compiles few programs.
    """
    most = max(len(b) for b in boxes_list)
    if max_boxes is None:
        max_boxes = max(min_slots, 1 << max(0, most - 1).bit_length())
    elif most > max_boxes:
        raise ValueError(f"a target has {most} boxes, more than max_boxes={max_boxes}")
    n = len(boxes_list)
    out_boxes = np.tile(np.array(pad_box, np.float32), (n, max_boxes, 1))
    out_labels = np.zeros((n, max_boxes), np.int32)
    valid = np.zeros((n, max_boxes), bool)
    for i, (b, lab) in enumerate(zip(boxes_list, labels_list, strict=True)):
        out_boxes[i, : len(b)] = b
        out_labels[i, : len(b)] = lab
        valid[i, : len(b)] = True
    return out_boxes, out_labels, valid


def unpad_detections(
    out: Mapping[str, Any], resized_sizes: Sequence[Sequence[int]], original_sizes: Sequence[Sequence[int]]
) -> list[dict[str, np.ndarray]]:
    """Per image, the first ``num_detections`` of the fixed-size outputs as {"boxes", "scores",
    "labels"}, boxes resized from the model's input frame back to the original image."""
    results = []
    for i, (size, orig) in enumerate(zip(resized_sizes, original_sizes, strict=True)):
        n = int(out["num_detections"][i])
        results.append(
            {
                "boxes": resize_boxes(np.asarray(out["boxes"][i, :n]), size, orig),
                "scores": np.asarray(out["scores"][i, :n]),
                "labels": np.asarray(out["labels"][i, :n]),
            }
        )
    return results


# ------------------------------------------------------------------------------------------------
# Traceable pieces


def is_training(model: nnx.Module) -> bool:
    """Whether ``model`` is in train mode (losses, random sampling): nnx's train() and eval() set
    ``deterministic`` on every module that has it."""
    return not model.deterministic


def smooth_l1(diff: jax.Array, beta: float) -> jax.Array:
    """torch's ``smooth_l1_loss`` elementwise (reduction "none") of a difference."""
    a = jnp.abs(diff)
    return jnp.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """torch's ``cross_entropy`` per row (reduction "none") of logits (..., C) and labels (...)."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[..., None], axis=-1)[..., 0]


def gather_kept(keep: jax.Array, count: jax.Array, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Each array's rows at padded NMS indices ``keep`` (the first ``count`` are real), zero in the
    padding slots so that outputs keep a static size."""
    safe = jnp.maximum(keep, 0)
    shown = jnp.arange(keep.shape[0]) < count
    return tuple(jnp.where(shown.reshape(shown.shape + (1,) * (a.ndim - 1)), a[safe], 0) for a in arrays)


# ------------------------------------------------------------------------------------------------
# Builders


def reject_weights(builder: str, weights: Any, weights_backbone: Any) -> None:
    """Raises where trained weights are asked for: converting torchvision's needs torch, which only
    ``porting`` uses."""
    if weights is not None or weights_backbone is not None:
        raise ValueError(
            f"{builder}(weights=...) needs torch: use porting.load_torchvision({builder!r}, ...) to convert "
            "torchvision weights, or mbv3_jax.load(directory) for a saved model"
        )


def check_builder_options(
    builder: str, kwargs: Mapping[str, Any], config_type: type, trainable_backbone_layers: int | None
) -> None:
    """Raises for keyword arguments that are not fields of ``config_type`` and for
    ``trainable_backbone_layers`` outside [0, 6]."""
    unknown = set(kwargs) - {f.name for f in dataclasses.fields(config_type)}
    if unknown:
        raise TypeError(f"{builder}: unexpected keyword arguments {sorted(unknown)}")
    if trainable_backbone_layers is not None and not 0 <= trainable_backbone_layers <= 6:
        raise ValueError(
            f"{builder}: trainable_backbone_layers should be in [0, 6], got {trainable_backbone_layers}"
        )


def norm_options(norm_layer: Mapping[str, Any]) -> dict[str, Any]:
    """ConvNormActivation options for a ``norm_layer`` record; missing keys take torch's class
    defaults (as passing ``nn.BatchNorm2d`` itself would: eps 1e-5, momentum 0.1)."""
    options = dict(norm_layer)
    kind = options.pop("norm", "batch")
    allowed = {"batch": {"bn_eps", "bn_momentum"}, "frozen": {"bn_eps"}}
    if kind not in allowed:
        raise ValueError(f"norm_layer['norm'] must be 'batch' or 'frozen', got {kind!r}")
    unknown = set(options) - allowed[kind]
    if unknown:
        raise TypeError(f"norm_layer: unexpected keys {sorted(unknown)} for norm {kind!r}")
    return {"norm": kind, "bn_eps": 1e-5, "bn_momentum": 0.1, **options}
