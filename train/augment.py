"""torchvision's classification training transforms on the host (PIL + numpy), per image, seeded.

``ClassificationPresetTrain`` of torchvision's references: RandomResizedCrop -> RandomHorizontalFlip ->
AutoAugment(IMAGENET) -> ToTensor/Normalize -> RandomErasing. The algorithms (crop sampling, policy
table, magnitude bins, erasing sampling) follow torchvision; the pixel operations are PIL's, so
augmented pixels are not bit-identical to torchvision's (they are random anyway). Eval uses the
torch-exact preset of :mod:`mbv3_jax.transforms`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from mbv3_jax.transforms import (
    as_rgb_uint8,
    center_crop,
    classification_preset,
    normalize_uint8,
    resize_uint8,
)

__all__ = [
    "AUTO_AUGMENT_POLICIES",
    "TrainTransform",
    "auto_augment",
    "eval_transform",
    "random_erasing",
    "random_resized_crop",
]


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: ``(top, left, h, w)``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    rng: np.random.Generator, img: Image.Image, size: int, scale: Sequence[float] = (0.08, 1.0)
) -> Image.Image:
    """Crop a random area/aspect box and resize it to ``size`` x ``size`` (bilinear, antialiased)."""
    top, left, h, w = random_resized_crop_box(rng, img.height, img.width, scale)
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))


# torchvision AutoAugmentPolicy.IMAGENET: pairs of (op, probability, magnitude bin).
AUTO_AUGMENT_POLICIES: dict[str, list[tuple[tuple[str, float, int | None], ...]]] = {
    "imagenet": [
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
        (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
        (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
        (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
        (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
        (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
        (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ]
}

_NUM_BINS = 10
_SIGNED = {
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
}


def _magnitude(op: str, bin_: int, width: int, height: int) -> float:
    """torchvision ``AutoAugment._augmentation_space(10, (H, W))`` at ``bin_``."""
    frac = bin_ / (_NUM_BINS - 1)
    if op in ("ShearX", "ShearY"):
        return 0.3 * frac
    if op == "TranslateX":
        return 150.0 / 331.0 * width * frac
    if op == "TranslateY":
        return 150.0 / 331.0 * height * frac
    if op == "Rotate":
        return 30.0 * frac
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 0.9 * frac
    if op == "Posterize":
        return float(8 - int(round(bin_ / ((_NUM_BINS - 1) / 4))))
    if op == "Solarize":
        return 255.0 * (1 - frac)
    return 0.0


def _apply_op(img: Image.Image, op: str, magnitude: float) -> Image.Image:
    if op == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, magnitude, 0, 0, 1, 0), Image.NEAREST)
    if op == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, magnitude, 1, 0), Image.NEAREST)
    if op == "TranslateX":
        return img.transform(img.size, Image.AFFINE, (1, 0, -int(magnitude), 0, 1, 0), Image.NEAREST)
    if op == "TranslateY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, -int(magnitude)), Image.NEAREST)
    if op == "Rotate":
        return img.rotate(magnitude, Image.NEAREST)
    if op == "Brightness":
        return ImageEnhance.Brightness(img).enhance(1.0 + magnitude)
    if op == "Color":
        return ImageEnhance.Color(img).enhance(1.0 + magnitude)
    if op == "Contrast":
        return ImageEnhance.Contrast(img).enhance(1.0 + magnitude)
    if op == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(1.0 + magnitude)
    if op == "Posterize":
        return ImageOps.posterize(img, int(magnitude))
    if op == "Solarize":
        return ImageOps.solarize(img, magnitude)
    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    if op == "Invert":
        return ImageOps.invert(img)
    raise ValueError(f"unknown AutoAugment op {op!r}")


def auto_augment(rng: np.random.Generator, img: Image.Image, policy: str = "imagenet") -> Image.Image:
    """torchvision ``AutoAugment(policy)``: one random sub-policy, each op with its probability."""
    try:
        policies = AUTO_AUGMENT_POLICIES[policy]
    except KeyError:
        raise ValueError(
            f"unknown AutoAugment policy {policy!r}; known: {sorted(AUTO_AUGMENT_POLICIES)}"
        ) from None
    sub = policies[int(rng.integers(len(policies)))]
    probs = rng.random(2)
    signs = rng.integers(2, size=2)
    for i, (op, p, bin_) in enumerate(sub):
        if probs[i] <= p:
            magnitude = _magnitude(op, bin_, img.width, img.height) if bin_ is not None else 0.0
            if op in _SIGNED and signs[i] == 0:
                magnitude = -magnitude
            img = _apply_op(img, op, magnitude)
    return img


def random_erasing(
    rng: np.random.Generator,
    x: np.ndarray,
    p: float = 0.5,
    scale: Sequence[float] = (0.02, 0.33),
    ratio: Sequence[float] = (0.3, 3.3),
) -> np.ndarray:
    """torchvision ``RandomErasing(p, value=0)`` on a normalized HWC float image (in place)."""
    if rng.random() >= p:
        return x
    height, width = x.shape[:2]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        erase_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(erase_area * aspect)))
        w = int(round(math.sqrt(erase_area / aspect)))
        if not (h < height and w < width):
            continue
        i, j = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        x[i : i + h, j : j + w] = 0.0
        return x
    return x


@dataclass(frozen=True)
class TrainTransform:
    """uint8 HWC image + a per-example generator -> normalized float32 HWC ``crop`` x ``crop``."""

    crop: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    random_resized_crop: bool = True
    hflip: bool = True
    auto_augment: str | None = "imagenet"
    random_erasing: float = 0.2
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = as_rgb_uint8(img)
        if self.random_resized_crop:
            pil = random_resized_crop(rng, Image.fromarray(x), self.crop, self.scale)
        else:  # deterministic geometry: the shorter side to ``crop``, center crop (eval's at crop size)
            if x.shape[:2] != (self.crop, self.crop):
                x = center_crop(resize_uint8(x, self.crop), self.crop, self.crop)
            pil = Image.fromarray(x)
        if self.hflip and rng.random() < 0.5:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        if self.auto_augment:
            pil = auto_augment(rng, pil, self.auto_augment)
        out = normalize_uint8(np.asarray(pil), self.mean, self.std).copy()
        if self.random_erasing > 0:
            out = random_erasing(rng, out, self.random_erasing)
        return out


def eval_transform(resize: int, crop: int, mean: Sequence[float], std: Sequence[float]):
    """torchvision's eval preset (resize the shorter side, center crop, normalize), torch-exact."""
    return classification_preset(resize, crop, mean, std)


# --------------------------------------------------------------------------------------------------
# Segmentation (torchvision's references/segmentation presets)


def _resize_pair(image: Image.Image, mask: Image.Image, short: int) -> tuple[Image.Image, Image.Image]:
    """The shorter side to ``short``: the image bilinearly (antialiased, as torchvision's
    ``antialias=True``), the mask by nearest neighbour, as ``RandomResize`` does."""
    from train.batching import shorter_side_size

    h, w = shorter_side_size(image.height, image.width, short)
    if (h, w) == (image.height, image.width):
        return image, mask
    return image.resize((w, h), Image.BILINEAR), mask.resize((w, h), Image.NEAREST)


def _pad_pair(image: np.ndarray, mask: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad at the bottom and right to at least (height, width): image with 0, mask with 255 (ignored),
    as the reference's ``pad_if_smaller``."""
    ph, pw = max(0, height - image.shape[0]), max(0, width - image.shape[1])
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=255)
    return image, mask


@dataclass(frozen=True)
class SegmentationTrainTransform:
    """torchvision's ``SegmentationPresetTrain``: RandomResize(0.5 x base, 2 x base) of the shorter
    side (``resize_range``), RandomHorizontalFlip, RandomCrop(crop) after padding to it (image 0,
    mask 255), normalize. uint8 HWC image + (H, W) mask + generator -> (normalized float32
    crop x crop x 3, int32 mask)."""

    base_size: int = 520
    crop: int = 480
    hflip: bool = True
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    resize_range: tuple[float, float] = (0.5, 2.0)

    def __call__(
        self, img: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        # torchvision: random.randint(min_size, max_size), both ends included.
        low, high = (int(f * self.base_size) for f in self.resize_range)
        short = int(rng.integers(low, high + 1))
        image, target = _resize_pair(Image.fromarray(as_rgb_uint8(img)), Image.fromarray(mask), short)
        if self.hflip and rng.random() < 0.5:
            image, target = image.transpose(Image.FLIP_LEFT_RIGHT), target.transpose(Image.FLIP_LEFT_RIGHT)
        x, m = _pad_pair(np.asarray(image), np.asarray(target), self.crop, self.crop)
        i = int(rng.integers(0, x.shape[0] - self.crop + 1))
        j = int(rng.integers(0, x.shape[1] - self.crop + 1))
        x, m = x[i : i + self.crop, j : j + self.crop], m[i : i + self.crop, j : j + self.crop]
        return normalize_uint8(x, self.mean, self.std), m.astype(np.int32)


@dataclass(frozen=True)
class SegmentationEvalTransform:
    """torchvision's ``SegmentationPresetEval`` (the shorter side to ``resize``, normalize). ``size``:
    then padded at the bottom and right to ``size`` x ``size`` (image 0, mask 255: padding is not
    scored), every eval batch one shape; None: each image at its own size, as torchvision evaluates
    (batched by shape, :mod:`train.batching`)."""

    resize: int = 520
    size: int | None = 520
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __call__(self, img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        image, target = _resize_pair(Image.fromarray(as_rgb_uint8(img)), Image.fromarray(mask), self.resize)
        x, m = np.asarray(image), np.asarray(target)
        if self.size is None:
            return normalize_uint8(x, self.mean, self.std), m.astype(np.int32)
        if max(x.shape[:2]) > self.size:
            raise ValueError(
                f"an eval image resized to {x.shape[0]}x{x.shape[1]} is larger than the eval size "
                f"{self.size}: raise data.eval_crop (the padded eval size) to at least {max(x.shape[:2])}"
            )
        x, m = _pad_pair(x, m, self.size, self.size)
        return normalize_uint8(x, self.mean, self.std), m.astype(np.int32)


# --------------------------------------------------------------------------------------------------
# Detection (torchvision's references/detection presets, fixed-size models such as SSDlite320)


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 HWC resized as ``F.interpolate(mode="bilinear", align_corners=False)`` without antialias
    (torchvision's detection transform; the same source taps and weights as the model's own resize)."""
    from mbv3_jax.ops.interpolate import linear_taps

    for axis, size in ((1, width), (0, height)):  # width first, as torch
        if x.shape[axis] != size:
            i0, i1, w0, w1 = linear_taps(x.shape[axis], size, "float32")
            shape = [1, 1, 1]
            shape[axis] = size
            x = np.take(x, i0, axis) * w0.reshape(shape) + np.take(x, i1, axis) * w1.reshape(shape)
    return x


def random_iou_crop(
    rng: np.random.Generator,
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    min_scale: float = 0.3,
    max_scale: float = 1.0,
    min_aspect_ratio: float = 0.5,
    max_aspect_ratio: float = 2.0,
    options: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
    trials: int = 40,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torchvision's ``RandomIoUCrop`` (SSD's sampler): draw a minimum IoU (1.0: keep the image), then
    up to ``trials`` crops of 0.3-1 of each side with aspect 1/2-2; the first that contains some box
    centre and overlaps one such box with at least that IoU wins, keeping the boxes whose centre it
    contains, shifted and clamped to it. Like torchvision it draws again until an option succeeds,
    which always ends because 1.0 is an option; an image without boxes is returned as it is."""
    h, w = image.shape[:2]
    if len(boxes) == 0:
        return image, boxes, labels
    while True:
        min_iou = options[int(rng.integers(len(options)))]
        if min_iou >= 1.0:
            return image, boxes, labels
        for _ in range(trials):
            r = min_scale + (max_scale - min_scale) * rng.random(2)
            new_w, new_h = int(w * r[0]), int(h * r[1])
            if new_h == 0 or not min_aspect_ratio <= new_w / new_h <= max_aspect_ratio:
                continue
            r = rng.random(2)
            left, top = int((w - new_w) * r[0]), int((h - new_h) * r[1])
            right, bottom = left + new_w, top + new_h
            if left == right or top == bottom:
                continue
            cx = 0.5 * (boxes[:, 0] + boxes[:, 2])
            cy = 0.5 * (boxes[:, 1] + boxes[:, 3])
            inside = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
            if not inside.any():
                continue
            kept = boxes[inside]
            ix = np.clip(np.minimum(kept[:, 2], right) - np.maximum(kept[:, 0], left), 0, None)
            iy = np.clip(np.minimum(kept[:, 3], bottom) - np.maximum(kept[:, 1], top), 0, None)
            inter = ix * iy
            areas = (kept[:, 2] - kept[:, 0]) * (kept[:, 3] - kept[:, 1])
            if (inter / (areas + new_w * new_h - inter)).max() < min_iou:
                continue
            kept = kept - np.array([left, top, left, top], kept.dtype)
            kept[:, 0::2] = np.clip(kept[:, 0::2], 0, new_w)
            kept[:, 1::2] = np.clip(kept[:, 1::2], 0, new_h)
            return image[top:bottom, left:right], kept, labels[inside]


def _detection_input(
    img: np.ndarray,
    boxes: np.ndarray,
    size: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    keep_ratio: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torchvision's ``GeneralizedRCNNTransform``: normalize, resize, and the boxes by the float32
    ratios ``new / old``; returns (image, boxes, its (h, w) after the resize). A fixed-size model
    (SSDlite) resizes to ``size`` x ``size``; ``keep_ratio=(min_size, max_size)`` (Faster R-CNN)
    scales the shorter side to min_size unless the longer would pass max_size, then pads at the
    bottom and right to ``size`` x ``size`` (one shape for every batch), or with ``size`` None leaves
    the padding to the batch (:mod:`train.batching`; torchvision pads to the batch's largest image,
    rounded up to 32)."""
    from mbv3_jax.models.detection import resized_size
    from mbv3_jax.models.detection_utils import resize_boxes

    h, w = img.shape[:2]
    if keep_ratio is None and size is None:
        raise ValueError("a fixed-size detection model needs its input size")
    out_h, out_w = (size, size) if keep_ratio is None else resized_size(h, w, *keep_ratio)
    x = resize_bilinear(normalize_uint8(img, mean, std), out_h, out_w)
    if size is not None and (out_h, out_w) != (size, size):
        x = np.pad(x, ((0, size - out_h), (0, size - out_w), (0, 0)))
    return x, resize_boxes(boxes, (h, w), (out_h, out_w)), np.asarray([out_h, out_w], np.int32)


@dataclass(frozen=True)
class DetectionTrainTransform:
    """torchvision's ``DetectionPresetTrain``: ``ssdlite`` (RandomIoUCrop, RandomHorizontalFlip) or
    ``hflip`` (``iou_crop=False``); then the model's transform (:func:`_detection_input`). uint8 HWC
    image, (G, 4) xyxy pixel boxes, (G,) labels, generator -> (float32 size x size x 3, targets padded
    to ``max_boxes``: ``boxes`` in the resized frame, ``labels``, ``valid``, and ``image_size``, the
    resized image's (h, w) within the padding)."""

    size: int | None = 320  # None (with keep_ratio): not padded here, the batch pads
    max_boxes: int = 100
    iou_crop: bool = True
    hflip: bool = True
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    keep_ratio: tuple[int, int] | None = None  # (min_size, max_size): Faster R-CNN's resize

    def __call__(
        self, img: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator, name: str = ""
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        from train.coco_data import pad_targets

        img = as_rgb_uint8(img)
        if self.iou_crop:
            img, boxes, labels = random_iou_crop(rng, img, boxes, labels)
        if self.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
            boxes = np.stack(
                [img.shape[1] - boxes[:, 2], boxes[:, 1], img.shape[1] - boxes[:, 0], boxes[:, 3]], 1
            )
        x, boxes, hw = _detection_input(
            np.ascontiguousarray(img), boxes, self.size, self.mean, self.std, self.keep_ratio
        )
        out_boxes, out_labels, valid = pad_targets(boxes, labels, self.max_boxes, name=name)
        return x, {"boxes": out_boxes, "labels": out_labels, "valid": valid, "image_size": hw}


@dataclass(frozen=True)
class DetectionEvalTransform:
    """The model's transform (:func:`_detection_input`) with the ground truth kept in the original
    frame for COCO evaluation: targets ``boxes`` (xyxy pixels), ``labels``, ``valid``, ``crowd`` padded
    to ``max_boxes``, ``size`` (the original height, width) and ``image_size`` (the resized one)."""

    size: int | None = 320  # None (with keep_ratio): not padded here, the batch pads
    max_boxes: int = 100
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    keep_ratio: tuple[int, int] | None = None

    def __call__(
        self, img: np.ndarray, boxes: np.ndarray, labels: np.ndarray, crowd: np.ndarray, name: str = ""
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        from train.coco_data import pad_targets

        img = as_rgb_uint8(img)
        x, _, hw = _detection_input(img, boxes, self.size, self.mean, self.std, self.keep_ratio)
        out_boxes, out_labels, valid = pad_targets(boxes, labels, self.max_boxes, name=name)
        out_crowd = np.zeros(self.max_boxes, bool)
        out_crowd[: len(crowd)] = crowd
        size = np.asarray(img.shape[:2], np.int32)
        targets = {"boxes": out_boxes, "labels": out_labels, "valid": valid, "crowd": out_crowd, "size": size}
        return x, targets | {"image_size": hw}
