"""Detection and segmentation targets from a COCO-format folder, checked up front, plus the static
shapes ``jax.jit`` needs (boxes padded to a fixed count, images padded to one of a few sizes).

:func:`load_coco_folder` reads ``annotations.json`` (COCO "instances": images, annotations,
categories) and finds every image file; masks are decoded only when asked for, one image at a time.

Labels: category ids map to contiguous labels 1..K in ascending id order (0 is background), so a
head for a folder with sparse ids (say 7, 42, 1000) has K + 1 outputs. torchvision's detection
references keep COCO's raw ids instead (``num_classes=91`` for COCO's 80 categories, ids 1..90):
``labels="category_id"`` does that, for torchvision's COCO weights. Either way ``CocoSet.category_ids``
keeps the map back to the file's ids (for writing COCO results).

What is dropped (counted in ``CocoSet.skipped`` and logged) and what is refused (a :class:`DataError`
naming the file, image, annotation id or shape), following torchvision's ``ConvertCocoPolysToMask``
and ``_coco_remove_images_without_annotations``:

* dropped: annotations of categories left out (``categories``); crowd annotations (``iscrowd=1``)
  from the boxes, as torchvision does (kept apart in ``crowd_boxes`` for evaluation, and in the
  semantic mask as torchvision's segmentation reference keeps them); boxes with x2 <= x1 or y2 <= y1
  after (x, y, w, h) -> (x1, y1, x2, y2) and clamping to the image (boxes partly outside the image
  are clamped to it, as torchvision does; wholly outside ones become empty and are dropped);
  polygons of fewer than 3 points (pycocotools would read 4 numbers as a box); with
  ``remove_images_without_annotations`` (torchvision does it for training), images with no
  annotation or only boxes at most 1 pixel wide or high.
* refused: a missing or malformed ``annotations.json`` (the JSON error's line and column), missing
  fields, duplicate image / annotation / category ids, annotations of an image or category the file
  does not list, boxes that are not 4 finite numbers, RLE masks whose size differs from their
  image's, image files that do not exist (the first few and the count), and an image whose decoded
  size differs from the json's (when read).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from train.data import DataError, _decode_rgb

log = logging.getLogger(__name__)

ANNOTATIONS_FILE = "annotations.json"
_MISSING_SHOWN = 5  # missing image files named in the error; the rest are counted


@dataclasses.dataclass(frozen=True)
class CocoImage:
    """One image's checked targets: boxes (G, 4) float32 (x1, y1, x2, y2) pixels, labels (G,) int32,
    the raw segmentations of those G annotations (None where absent) and the crowd annotations apart."""

    id: int
    file_name: str
    path: Path
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    annotation_ids: np.ndarray
    segmentations: tuple[Any, ...]
    crowd_boxes: np.ndarray
    crowd_labels: np.ndarray
    crowd_segmentations: tuple[Any, ...]


@dataclasses.dataclass
class CocoSet:
    """A checked COCO folder: ``images`` sorted by id (as torchvision's ``CocoDetection``), the label
    map (label ``k`` >= 1 is category ``category_ids[k - 1]``, or ``k`` itself with
    ``labels="category_id"``), class names indexed by label, and what loading dropped."""

    root: Path
    image_dir: Path
    images: list[CocoImage]
    category_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    label_mode: str
    skipped: dict[str, int]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """Classes a head needs, background included: K + 1, or the largest id + 1 for raw ids."""
        return len(self.class_names)

    def label_of(self, category_id: int) -> int:
        """The label that stands for ``category_id``."""
        if self.label_mode == "category_id":
            return int(category_id)
        return self.category_ids.index(category_id) + 1

    def category_of(self, label: int) -> int:
        """The file's category id for ``label`` (>= 1): for COCO results files."""
        return int(label) if self.label_mode == "category_id" else self.category_ids[int(label) - 1]

    def read_image(self, index: int) -> np.ndarray:
        """Image ``index`` decoded as (H, W, 3) uint8 RGB; refuses one whose size differs from the json's."""
        img = self.images[index]
        rgb = np.asarray(_decode_rgb(img.path))
        if rgb.shape[:2] != (img.height, img.width):
            raise DataError(
                f"{img.path} is {rgb.shape[0]}x{rgb.shape[1]} (HxW) but {self.root / ANNOTATIONS_FILE} "
                f"says {img.height}x{img.width} for image id {img.id}"
            )
        return rgb

    def masks(self, index: int) -> np.ndarray:
        """Instance masks (G, H, W) uint8 in 0/1 of image ``index``'s boxes (zeros where an annotation
        has no segmentation), decoded with pycocotools as torchvision does."""
        img = self.images[index]
        return _decode_masks(img.segmentations, img.height, img.width)

    def semantic_mask(self, index: int) -> np.ndarray:
        """(H, W) uint8: each pixel's label, 0 background and 255 where instances overlap, as
        torchvision's segmentation reference merges COCO instances (crowd ones included)."""
        img = self.images[index]
        masks = _decode_masks(img.segmentations + img.crowd_segmentations, img.height, img.width)
        labels = np.concatenate([img.labels, img.crowd_labels]).astype(np.int64)
        if np.any(labels > 254):
            raise DataError(
                f"labels above 254 do not fit a uint8 semantic mask (255 marks overlaps): {labels}"
            )
        out = (masks * labels[:, None, None]).max(axis=0, initial=0).astype(np.uint8)
        out[masks.sum(axis=0) > 1] = 255
        return out


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path} does not exist (a COCO folder holds {ANNOTATIONS_FILE})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} cannot be read: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})"
        ) from None


def _field(entry: Any, key: str, kind: type | tuple[type, ...], what: str, path: Path) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{path}: {what} has no {key!r} field: {_short(entry)}")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{path}: {what} has {key}={_short(value)}, expected {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _list(coco: dict, key: str, path: Path, required: bool = True) -> list:
    if key not in coco:
        if required:
            raise DataError(f"{path} has no {key!r} list (COCO instances need images and categories)")
        return []
    if not isinstance(coco[key], list):
        raise DataError(f"{path}: {key!r} is {type(coco[key]).__name__}, not a list")
    return coco[key]


def _find_image_dir(root: Path, image_dir: str | os.PathLike | None, first_file: str | None) -> Path:
    """``image_dir`` (relative to ``root``) if given; else ``root``, or ``root/images`` when the
    first image is there and not in ``root`` (COCO's file names are relative to an image folder)."""
    if image_dir is not None:
        return root / image_dir
    if (
        first_file is not None
        and not (root / first_file).is_file()
        and (root / "images" / first_file).is_file()
    ):
        return root / "images"
    return root


def _check_polygons(segm: list, ann_id: int, path: Path, skipped: dict[str, int]) -> list:
    kept = []
    for poly in segm:
        if not isinstance(poly, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly
        ):
            raise DataError(
                f"{path}: annotation {ann_id} has a polygon that is not a list of numbers: {_short(poly)}"
            )
        if len(poly) < 6 or len(poly) % 2:
            skipped["invalid_polygons"] += 1  # pycocotools would read 4 numbers as a box
            continue
        kept.append(poly)
    return kept


def _check_segmentation(
    segm: Any, ann_id: int, image: dict, path: Path, skipped: dict[str, int]
) -> list | dict | None:
    """The annotation's segmentation, checked: polygons (invalid ones dropped) or an RLE whose size is
    its image's; None where the annotation has none."""
    if segm is None or (isinstance(segm, list) and not segm):
        return None
    if isinstance(segm, list):
        return _check_polygons(segm, ann_id, path, skipped) or None
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        size = segm["size"]
        h, w = image["height"], image["width"]
        if not isinstance(size, list) or size != [h, w]:
            raise DataError(
                f"{path}: annotation {ann_id} has an RLE mask of size {size} (HxW) but its image "
                f"{image['file_name']} (id {image['id']}) is {h}x{w}"
            )
        return segm
    raise DataError(
        f"{path}: annotation {ann_id} has a segmentation that is neither polygons nor RLE: {_short(segm)}"
    )


def load_coco_folder(
    root: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    annotation_file: str | os.PathLike = ANNOTATIONS_FILE,
    labels: Literal["contiguous", "category_id"] = "contiguous",
    remove_images_without_annotations: bool = False,
    categories: Sequence[int] | None = None,
    min_annotated_area: float | None = None,
) -> CocoSet:
    """Read and check a COCO instances folder: ``root/annotation_file`` and its images.

    File names are relative to ``image_dir`` (relative to ``root``; default ``root``, or
    ``root/images`` when the images are there). E.g. COCO itself:
    ``load_coco_folder("coco", "val2017", annotation_file="annotations/instances_val2017.json")``.
    ``labels``: ``"contiguous"`` (1..K) or ``"category_id"`` (the raw ids, as torchvision's COCO
    models). ``remove_images_without_annotations``: skip (count and log) images with no usable
    annotation, as torchvision's references do for training. See the module docstring for what is
    dropped and what is refused.
    ``categories``: keep only the annotations of these category ids (the others are dropped and
    counted), labelled 1..K in the order given, as torchvision's segmentation reference keeps COCO's
    20 VOC categories (``FilterAndRemapCocoCategories``). ``min_annotated_area``: with
    ``remove_images_without_annotations``, keep instead the images whose kept annotations (crowd
    ones included) cover more than this ``area`` in total (the box's where an annotation has none),
    the segmentation reference's training filter (1000).
    """
    if labels not in ("contiguous", "category_id"):
        raise ValueError(f"labels must be 'contiguous' or 'category_id', not {labels!r}")
    if categories is not None and labels != "contiguous":
        raise ValueError("categories= labels the kept categories 1..K: it needs labels='contiguous'")
    root = Path(root).expanduser()
    path = root / annotation_file
    coco = _read_json(path)
    if not isinstance(coco, dict):
        raise DataError(
            f"{path} holds a JSON {type(coco).__name__}, not a COCO object with images and categories"
        )
    raw_images = _list(coco, "images", path)
    raw_anns = _list(coco, "annotations", path, required=False)
    raw_cats = _list(coco, "categories", path)

    file_categories: dict[int, str] = {}
    for i, cat in enumerate(raw_cats):
        cid = _field(cat, "id", int, f"category {i}", path)
        if cid in file_categories:
            raise DataError(f"{path}: category id {cid} appears twice")
        file_categories[cid] = str(cat.get("name", cid))
    if categories is None:
        category_ids = tuple(sorted(file_categories))
    else:
        category_ids = tuple(int(c) for c in categories)
        unknown = [c for c in category_ids if c not in file_categories]
        if unknown or len(set(category_ids)) != len(category_ids):
            problem = f"not there: {unknown}" if unknown else "some repeat"
            raise DataError(
                f"{path}: categories {list(category_ids)} must be distinct ids of the file's categories; "
                f"{problem} (ids {sorted(file_categories)[:20]})"
            )
    kept = {c: file_categories[c] for c in category_ids}  # the categories labelled, by id
    if labels == "category_id":
        if category_ids and category_ids[0] < 1:
            raise DataError(f"{path}: category id {category_ids[0]} collides with background (label 0)")
        top = category_ids[-1] if category_ids else 0
        class_names = ("background",) + tuple(kept.get(k, f"unused_{k}") for k in range(1, top + 1))
        label_of = {cid: cid for cid in category_ids}
    else:
        class_names = ("background",) + tuple(kept[c] for c in category_ids)
        label_of = {cid: k for k, cid in enumerate(category_ids, start=1)}

    images: dict[int, dict] = {}
    for i, img in enumerate(raw_images):
        what = f"image {i}"
        iid = _field(img, "id", int, what, path)
        what = f"image id {iid}"
        _field(img, "file_name", str, what, path)
        for key in ("height", "width"):
            if _field(img, key, int, what, path) <= 0:
                raise DataError(f"{path}: {what} ({img['file_name']}) has {key}={img[key]}")
        if iid in images:
            raise DataError(
                f"{path}: image id {iid} appears twice ({images[iid]['file_name']}, {img['file_name']})"
            )
        images[iid] = img

    per_image: dict[int, list[dict]] = {iid: [] for iid in images}
    seen_ann: set[int] = set()
    other_categories = 0
    for i, ann in enumerate(raw_anns):
        aid = _field(ann, "id", int, f"annotation {i}", path)
        what = f"annotation {aid}"
        if aid in seen_ann:
            raise DataError(f"{path}: annotation id {aid} appears twice")
        seen_ann.add(aid)
        iid = _field(ann, "image_id", int, what, path)
        cid = _field(ann, "category_id", int, what, path)
        if iid not in images:
            raise DataError(f"{path}: {what} is of image id {iid}, which the file's images do not list")
        if cid not in file_categories:
            ids = sorted(file_categories)
            raise DataError(
                f"{path}: {what} (image {images[iid]['file_name']}) has category_id {cid}, which is "
                f"not in categories (ids {ids[:20]}{' ...' if len(ids) > 20 else ''})"
            )
        bbox = _field(ann, "bbox", list, what, path)
        if len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox
        ):
            raise DataError(f"{path}: {what} has bbox {_short(bbox)}, expected 4 finite numbers [x, y, w, h]")
        if cid not in kept:
            other_categories += 1
            continue
        per_image[iid].append(ann)

    skipped = {"crowd": 0, "degenerate_boxes": 0, "invalid_polygons": 0, "images_without_annotations": 0}
    skipped["annotations_of_other_categories"] = other_categories
    ordered = sorted(images)
    if remove_images_without_annotations:
        if min_annotated_area is None:
            kept_ids = [iid for iid in ordered if _has_valid_annotation(per_image[iid])]
        else:
            kept_ids = [iid for iid in ordered if _annotated_area(per_image[iid]) > min_annotated_area]
        skipped["images_without_annotations"] = len(ordered) - len(kept_ids)
        ordered = kept_ids

    image_root = _find_image_dir(root, image_dir, images[ordered[0]]["file_name"] if ordered else None)
    missing = [
        images[iid]["file_name"] for iid in ordered if not (image_root / images[iid]["file_name"]).is_file()
    ]
    if missing:
        raise DataError(
            f"{path} names {len(missing)} image file(s) missing from {image_root}: "
            f"{', '.join(missing[:_MISSING_SHOWN])}{' ...' if len(missing) > _MISSING_SHOWN else ''}"
        )

    out = [
        _image_targets(images[iid], per_image[iid], image_root, label_of, path, skipped) for iid in ordered
    ]
    dropped = {k: v for k, v in skipped.items() if v}
    if dropped:
        counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in dropped.items())
        log.info("%s: left out of the boxes / images: %s (crowd boxes are kept apart)", path, counts)
    return CocoSet(root, image_root, out, category_ids, class_names, labels, skipped)


def _annotated_area(anns: list[dict]) -> float:
    """The annotations' ``area`` summed (a box's w x h where the file gives none), as torchvision's
    segmentation reference measures an image for its training filter."""
    total = 0.0
    for a in anns:
        area = a.get("area")
        ok = isinstance(area, (int, float)) and not isinstance(area, bool) and math.isfinite(area)
        total += float(area) if ok else float(a["bbox"][2] * a["bbox"][3])
    return total


def _has_valid_annotation(anns: list[dict]) -> bool:
    """torchvision's test for a training image: some annotation, and not only boxes <= 1 pixel."""
    return bool(anns) and not all(any(o <= 1 for o in a["bbox"][2:]) for a in anns)


def _image_targets(
    image: dict,
    anns: list[dict],
    image_root: Path,
    label_of: dict[int, int],
    path: Path,
    skipped: dict[str, int],
) -> CocoImage:
    h, w = image["height"], image["width"]
    keep: list[tuple[np.ndarray, int, int, Any]] = []
    crowd: list[tuple[np.ndarray, int, Any]] = []
    for ann in anns:
        # torchvision: (x, y, w, h) -> corners, added in float32, clamped to the image; empty ones dropped.
        box = np.array(ann["bbox"], np.float32)
        box[2:] += box[:2]
        box = np.clip(box, 0, np.array([w, h, w, h], np.float32))
        segm = _check_segmentation(ann.get("segmentation"), ann["id"], image, path, skipped)
        label = label_of[ann["category_id"]]
        if ann.get("iscrowd", 0):
            skipped["crowd"] += 1
            crowd.append((box, label, segm))
            continue
        if box[2] <= box[0] or box[3] <= box[1]:
            skipped["degenerate_boxes"] += 1
            continue
        keep.append((box, label, ann["id"], segm))
    return CocoImage(
        id=image["id"],
        file_name=image["file_name"],
        path=image_root / image["file_name"],
        height=h,
        width=w,
        boxes=np.array([k[0] for k in keep], np.float32).reshape(-1, 4),
        labels=np.array([k[1] for k in keep], np.int32),
        annotation_ids=np.array([k[2] for k in keep], np.int64),
        segmentations=tuple(k[3] for k in keep),
        crowd_boxes=np.array([c[0] for c in crowd], np.float32).reshape(-1, 4),
        crowd_labels=np.array([c[1] for c in crowd], np.int32),
        crowd_segmentations=tuple(c[2] for c in crowd),
    )


def _decode_masks(segmentations: Sequence[Any], height: int, width: int) -> np.ndarray:
    """(G, H, W) uint8 masks: polygons merged per annotation and RLEs (compressed or not) decoded by
    pycocotools, as pycocotools' own ``COCO.annToMask``."""
    out = np.zeros((len(segmentations), height, width), np.uint8)
    if not any(s is not None for s in segmentations):
        return out
    try:
        from pycocotools import mask as coco_mask
    except ImportError as e:  # pragma: no cover - the train extra installs it
        raise ImportError("COCO masks need pycocotools: pip install pycocotools") from e
    for i, segm in enumerate(segmentations):
        if segm is None:
            continue
        if isinstance(segm, list):
            rle = coco_mask.merge(coco_mask.frPyObjects(segm, height, width))
        elif isinstance(segm["counts"], list):
            rle = coco_mask.frPyObjects(segm, height, width)
        else:
            rle = segm
        out[i] = coco_mask.decode(rle)
    return out


# --------------------------------------------------------------------------------------------------
# Static shapes
# --------------------------------------------------------------------------------------------------


def pad_targets(
    boxes: np.ndarray, labels: np.ndarray, max_boxes: int, *, truncate: bool = False, name: str = ""
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's targets padded to ``max_boxes`` rows, so every batch has one shape: boxes
    (max_boxes, 4) float32 (zeros in padding), labels (max_boxes,) int32 (0 in padding) and valid
    (max_boxes,) bool. More than ``max_boxes`` boxes is refused (naming ``name``) unless
    ``truncate``, which keeps the first ``max_boxes`` and logs how many it dropped."""
    if not isinstance(max_boxes, int) or max_boxes < 1:
        raise ValueError(f"max_boxes must be a positive int, got {max_boxes!r}")
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(boxes):
        raise DataError(f"{name or 'targets'}: {len(boxes)} boxes but {len(labels)} labels")
    g = len(boxes)
    if g > max_boxes:
        if not truncate:
            raise DataError(
                f"{name or 'an image'} has {g} boxes, more than max_boxes={max_boxes}: raise max_boxes "
                "or pass truncate=True to keep the first max_boxes"
            )
        log.warning("%s: kept %d of %d boxes (max_boxes=%d)", name or "an image", max_boxes, g, max_boxes)
        boxes, labels, g = boxes[:max_boxes], labels[:max_boxes], max_boxes
    out_boxes = np.zeros((max_boxes, 4), np.float32)
    out_labels = np.zeros((max_boxes,), np.int32)
    valid = np.zeros((max_boxes,), bool)
    out_boxes[:g], out_labels[:g], valid[:g] = boxes, labels, True
    return out_boxes, out_labels, valid


def resized_padded_size(
    h: int, w: int, min_size: int = 800, max_size: int = 1333, size_divisible: int = 32
) -> tuple[int, int]:
    """(H, W) of an h x w image after torchvision's ``GeneralizedRCNNTransform``: resized (shorter
    side ``min_size``, longer at most ``max_size``, sizes floored) then padded up to multiples of
    ``size_divisible``."""
    from mbv3_jax.models.detection import resized_size

    rh, rw = resized_size(h, w, min_size, max_size)
    return -(-rh // size_divisible) * size_divisible, -(-rw // size_divisible) * size_divisible


def _check_buckets(buckets: Iterable[Sequence[int]], size_divisible: int) -> list[tuple[int, int]]:
    out = [tuple(int(v) for v in b) for b in buckets]
    if not out or any(
        len(b) != 2 or min(b) <= 0 or b[0] % size_divisible or b[1] % size_divisible for b in out
    ):
        raise ValueError(f"buckets must be (H, W) pairs of positive multiples of {size_divisible}, got {out}")
    return sorted(set(out), key=lambda b: (b[0] * b[1], b))


def size_bucket(
    h: int,
    w: int,
    buckets: Iterable[Sequence[int]],
    *,
    min_size: int = 800,
    max_size: int = 1333,
    size_divisible: int = 32,
    name: str = "",
) -> tuple[int, int]:
    """The smallest (H, W) bucket (by area, then H, W) that holds an h x w image resized and padded
    as :func:`resized_padded_size`: the batch of that bucket is padded to it, so jit sees only as many
    shapes as there are buckets. An image no bucket holds is refused."""
    ph, pw = resized_padded_size(h, w, min_size, max_size, size_divisible)
    for bh, bw in _check_buckets(buckets, size_divisible):
        if ph <= bh and pw <= bw:
            return bh, bw
    raise DataError(
        f"{name or 'an image'} of {h}x{w} (HxW) resizes and pads to {ph}x{pw}, which none of the buckets "
        f"{_check_buckets(buckets, size_divisible)} holds: add a bucket of at least {ph}x{pw}"
    )


def default_buckets(
    min_size: int = 800,
    max_size: int = 1333,
    size_divisible: int = 32,
    aspect_ratios: Sequence[float] = (1.0, 4 / 3),
) -> list[tuple[int, int]]:
    """A few buckets that hold every image: for each aspect ratio r >= 1 a landscape and a portrait
    one (shorter side ``min_size``, longer ``min_size * r``), plus the two that hold any image
    (``min_size`` x ``max_size`` both ways; the resize keeps the shorter side at most ``min_size``)."""

    def up(v: float) -> int:
        return -(-math.floor(v) // size_divisible) * size_divisible

    out = {(up(max_size), up(min_size)), (up(min_size), up(max_size))}
    for r in aspect_ratios:
        long = min(min_size * max(r, 1 / r), max_size)
        out |= {(up(min_size), up(long)), (up(long), up(min_size))}
    return sorted(out, key=lambda b: (b[0] * b[1], b))


def bucket_indices(
    sizes: Iterable[tuple[int, int]], buckets: Iterable[Sequence[int]], **kwargs: Any
) -> dict[tuple[int, int], list[int]]:
    """Image indices grouped by :func:`size_bucket` (``kwargs`` go to it): draw each batch from one group."""
    buckets = list(buckets)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault(size_bucket(h, w, buckets, name=f"image {i}", **kwargs), []).append(i)
    return groups


# --------------------------------------------------------------------------------------------------
# A COCO folder as a trainer split
# --------------------------------------------------------------------------------------------------


def split_folder(root: str | os.PathLike, split: str) -> tuple[Path, Path | None, str]:
    """Where ``split`` of a COCO-format folder is: ``(folder, image_dir, annotation_file)``.

    Either ``root/<split>/annotations.json`` with its images (what :func:`train.shapes_data.
    write_coco_folder` writes), or COCO's own layout, ``root/annotations/instances_<split>.json`` with
    the images in ``root/<split>/`` (e.g. split ``train2017``)."""
    root = Path(root).expanduser()
    if (root / split / ANNOTATIONS_FILE).is_file():
        return root / split, None, ANNOTATIONS_FILE
    coco_style = root / "annotations" / f"instances_{split}.json"
    if coco_style.is_file():
        return root, Path(split), str(coco_style.relative_to(root))
    present = (
        sorted(p.name for p in root.iterdir() if (p / ANNOTATIONS_FILE).is_file()) if root.is_dir() else []
    )
    raise DataError(
        f"COCO folder {root} has no split {split!r}: expected {root / split / ANNOTATIONS_FILE} or "
        f"{coco_style} (splits found: {present or 'none'})"
    )


class CocoSource:
    """A checked COCO folder as a random-access source of trainer examples: ``image`` (H, W, 3) uint8,
    ``image/id`` (the file's id), ``objects`` (``boxes_xyxy`` pixels, ``label`` 1..K, ``is_crowd``;
    crowd regions last) and ``mask`` (H, W, 1), the semantic mask (:meth:`CocoSet.semantic_mask`)
    when ``masks``."""

    def __init__(self, coco: CocoSet, masks: bool = False, start: int = 0, stop: int | None = None):
        self.coco, self.with_masks = coco, masks
        self.start, self.stop = start, len(coco) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        i = self.start + index
        img = self.coco.images[i]
        example: dict[str, Any] = {
            "image": self.coco.read_image(i),
            "image/id": img.id,
            "objects": {
                "boxes_xyxy": np.concatenate([img.boxes, img.crowd_boxes]),
                "label": np.concatenate([img.labels, img.crowd_labels]),
                "is_crowd": np.arange(len(img.boxes) + len(img.crowd_boxes)) >= len(img.boxes),
            },
        }
        if self.with_masks:
            example["mask"] = self.coco.semantic_mask(i)[..., None]
        return example
