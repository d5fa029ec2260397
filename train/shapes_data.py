"""Synthetic shapes for the detection and segmentation demos: circles, rectangles and triangles on
textured backgrounds, generated offline from a seed and byte-identical on every machine.

Each sample is a 128x128 RGB image with 1 to 4 non-overlapping shapes (3 classes, 0 is background):
its instance boxes (x1, y1, x2, y2 in pixels, the pixel-edge convention: a box holds the pixels
``x1 <= col < x2``), labels 1..3, a semantic mask (0 background, 1..3 the class; no 255 "ignore" band,
since every pixel's label is exact) and an instance map (0 background, ``k`` for the k-th box).

Determinism: every number comes from a numpy ``Generator`` seeded by (seed, split, index), so sample
``i`` does not depend on how many are asked for. Pixels are decided by exact arithmetic only: shape
parameters lie on a 1/8-pixel grid (exactly representable), a pixel belongs to a shape when its
centre does (products and sums, no trigonometry, whose last bit may differ between numpy builds),
and backgrounds are integer block means of crops of scikit-image's bundled PNG photos (no JPEG
decoder, no resampling library). The same bytes come out wherever numpy and the PNGs are the same.

Three ways to use it: :func:`make_shapes` (a list of dicts), the ``mbv3_shapes`` TFDS builder
(:func:`shapes_builder`, ArrayRecord, prepared on first use like ``sklearn_digits``) and
:func:`write_coco_folder` (``annotations.json`` + ``images/*.png``, read back by
:func:`train.coco_data.load_coco_folder`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from train.data import DataError, _png, _tfds, xyxy_to_tfds

SHAPES_NAME = "mbv3_shapes"
SHAPES_SIZE = 128
SHAPES_SPLITS = {"train": 600, "test": 100}  # the TFDS builder's examples per split
CLASS_NAMES = ("background", "circle", "rectangle", "triangle")  # index = label
_SPLIT_CODE = {"train": 0, "test": 1}
# scikit-image's bundled photos stored as PNG (lossless: the same pixels from any decoder). Gray ones
# are tinted per sample. JPEG-backed ones (rocket, hubble_deep_field, retina) are left out: JPEG
# decoders may differ in the last bit between libjpeg versions.
_PHOTOS = ("astronaut", "coffee", "chelsea", "immunohistochemistry", "brick", "grass", "gravel", "camera")
_MAX_SHAPES = 4
_GAP = 2  # pixels kept free between two shapes' boxes, so instances never touch
_GRID = 8  # shape parameters are multiples of 1/_GRID pixel


@functools.cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3], dtype=np.uint8)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``size`` x ``size`` crop of a bundled photo, shrunk by an integer factor (rounded block
    means), flipped / rotated and, for gray photos, tinted."""
    name = _PHOTOS[int(rng.integers(len(_PHOTOS)))]
    photo = _photo(name)
    h, w = photo.shape[:2]
    factor = int(rng.integers(1, min(3, min(h, w) // size) + 1))
    crop = size * factor
    y0, x0 = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    patch = photo[y0 : y0 + crop, x0 : x0 + crop].astype(np.uint32)
    n = factor * factor
    patch = (patch.reshape(size, factor, size, factor, 3).sum(axis=(1, 3)) + n // 2) // n
    if rng.integers(2):
        patch = patch[:, ::-1]
    patch = np.rot90(patch, int(rng.integers(4)))
    if (photo[..., 0] == photo[..., 1]).all():  # a gray photo: give it a colour
        tint = rng.integers(96, 256, size=3).astype(np.uint32)
        patch = (patch * tint + 127) // 255
    return np.ascontiguousarray(patch, dtype=np.uint8)


def _grid(rng: np.random.Generator, lo: float, hi: float, shape: Any = None) -> Any:
    """Uniform on the 1/_GRID-pixel grid in [lo, hi]: exact in float64."""
    return rng.integers(round(lo * _GRID), round(hi * _GRID) + 1, size=shape) / _GRID


def _row_runs(mask: np.ndarray) -> list[tuple[int, int, int]] | None:
    """``(row, first col, end col)`` of each row of ``mask``, or None unless the mask is one piece
    whose every row is one run overlapping the next row's run (what a polygon outline can trace)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0 or rows[-1] - rows[0] + 1 != rows.size:
        return None
    runs = []
    for y in rows:
        cols = np.flatnonzero(mask[y])
        if cols[-1] - cols[0] + 1 != cols.size:
            return None
        if runs and min(runs[-1][2], cols[-1] + 1) - max(runs[-1][1], cols[0]) < 1:
            return None
        runs.append((int(y), int(cols[0]), int(cols[-1]) + 1))
    return runs


def _shape_mask(rng: np.random.Generator, kind: int, size: int) -> np.ndarray | None:
    """One shape's pixels (pixel centres inside it) at a random place, or None if this draw is too
    thin to be one clean piece (the caller draws again)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    margin = 2
    if kind == 1:  # circle
        r = _grid(rng, 8, 22)
        cx, cy = _grid(rng, margin + r, size - margin - r, 2)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif kind == 2:  # axis-aligned square or rectangle, sides at most 2.5 : 1
        w, h = _grid(rng, 14, 44, 2)
        if max(w, h) > 2.5 * min(w, h):
            return None
        x0, y0 = _grid(rng, margin, size - margin - w), _grid(rng, margin, size - margin - h)
        mask = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
    else:  # triangle: an apex near one side of a square and two corners near the opposite side
        s = _grid(rng, 22, 44)
        bx, by = _grid(rng, margin, size - margin - s, 2)
        u = _grid(rng, 0, 1, 6).reshape(3, 2)
        p = np.array([[0.2 + 0.6 * u[0, 0], 0.2 * u[0, 1]], [0.3 * u[1, 0], 0.8 + 0.2 * u[1, 1]]])
        p = np.concatenate([p, [[0.7 + 0.3 * u[2, 0], 0.8 + 0.2 * u[2, 1]]]])
        if rng.integers(2):  # any of the square's 8 symmetries: exact swaps and reflections
            p = p[:, ::-1]
        p = np.where(rng.integers(2, size=2).astype(bool), 1 - p, p)
        p = np.round(p * s * _GRID) / _GRID + np.array([bx, by])  # back on the 1/8 grid
        (x0, y0), (x1, y1), (x2, y2) = p
        twice_area = abs((x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0))
        longest = max(((p - np.roll(p, 1, axis=0)) ** 2).sum(axis=1))
        if twice_area < 0.3 * longest:  # too flat: a sliver
            return None
        e0 = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
        e1 = (x2 - x1) * (yy - y1) - (y2 - y1) * (xx - x1)
        e2 = (x0 - x2) * (yy - y2) - (y0 - y2) * (xx - x2)
        mask = ((e0 >= 0) & (e1 >= 0) & (e2 >= 0)) | ((e0 <= 0) & (e1 <= 0) & (e2 <= 0))
    return mask if _row_runs(mask) is not None else None


def _box(mask: np.ndarray) -> np.ndarray:
    """The tight (x1, y1, x2, y2) box of a mask's pixels, pixel-edge convention."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def _sample(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    image = _background(rng, size)
    instances = np.zeros((size, size), np.uint8)
    semantic = np.zeros((size, size), np.uint8)
    boxes, labels = [], []
    for n in range(int(rng.integers(1, _MAX_SHAPES + 1))):
        kind = int(rng.integers(1, len(CLASS_NAMES)))
        for _ in range(100 if n == 0 else 20):  # the first shape always finds room on an empty image
            mask = _shape_mask(rng, kind, size)
            if mask is None:
                continue
            box = _box(mask)
            lo, hi = np.maximum(box[:2] - _GAP, 0).astype(int), (box[2:] + _GAP).astype(int)
            if instances[lo[1] : hi[1], lo[0] : hi[0]].any():
                continue
            break
        else:
            continue
        # A random colour, or the complement of the background it covers when within 96 levels of it
        # (summed over RGB), with per-pixel noise.
        under = image[mask].astype(np.int64).sum(axis=0) // int(mask.sum())
        color = rng.integers(0, 256, size=3)
        if np.abs(color - under).sum() < 96:
            color = 255 - under
        noise = rng.integers(-16, 17, size=(int(mask.sum()), 3))
        image[mask] = np.clip(color + noise, 0, 255).astype(np.uint8)
        instances[mask] = len(boxes) + 1
        semantic[mask] = kind
        boxes.append(box)
        labels.append(kind)
    return {
        "image": image,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, np.int32),
        "mask": semantic,
        "instances": instances,
    }


def iter_shapes(
    split: str, n: int, seed: int = 0, size: int = SHAPES_SIZE
) -> Iterator[dict[str, np.ndarray]]:
    """The samples of :func:`make_shapes`, one at a time."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODE)}, not {split!r}")
    if not 64 <= size <= 300:  # shapes are up to 44 pixels wide; the smallest photo is 300 high
        raise ValueError(f"size must be 64 to 300 pixels, got {size}")
    for i in range(n):
        yield _sample(np.random.default_rng([seed, _SPLIT_CODE[split], i]), size)


def make_shapes(split: str, n: int, seed: int = 0, size: int = SHAPES_SIZE) -> list[dict[str, np.ndarray]]:
    """``n`` samples of ``split`` (``train`` or ``test``): dicts with ``image`` (H, W, 3) uint8,
    ``boxes`` (G, 4) float32 xyxy pixels, ``labels`` (G,) int32 in 1..3, ``mask`` (H, W) uint8
    semantic labels and ``instances`` (H, W) uint8 (k for the k-th box, 0 elsewhere)."""
    return list(iter_shapes(split, n, seed, size))


# --------------------------------------------------------------------------------------------------
# TFDS builder
# --------------------------------------------------------------------------------------------------

_BUILDERS: dict[str, type] = {}


def shapes_builder_class() -> type:
    """The ``mbv3_shapes`` TFDS builder class (registered with tfds on first call).

    Features: ``index`` (the sample's position in :func:`make_shapes`; TFDS stores examples in a
    shuffled order), ``image`` (128, 128, 3) PNG, ``mask`` (128, 128, 1) PNG semantic labels, ``objects``
    a sequence of ``bbox`` (TFDS's ``BBoxFeature``: normalized [ymin, xmin, ymax, xmax], the
    convention of TFDS's own detection sets such as ``coco/2017``, so one reader serves both; exact
    here, since pixel edges / 128 are powers of two) and ``label`` (ClassLabel over
    :data:`CLASS_NAMES`, so the stored value is the model's class index, 0 being background).
    """
    if "shapes" in _BUILDERS:
        return _BUILDERS["shapes"]
    tfds = _tfds()
    from etils import epath
    from PIL import Image

    class Mbv3Shapes(tfds.core.GeneratorBasedBuilder):
        """Circles, rectangles and triangles on crops of scikit-image's photos, seed 0."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "128x128 RGB PNG, semantic mask PNG, boxes; 600 train / 100 test."}

        def _info(self):
            s = SHAPES_SIZE
            return tfds.core.DatasetInfo(
                builder=self,
                description="Synthetic shapes (3 classes) with boxes and semantic masks, offline.",
                features=tfds.features.FeaturesDict(
                    {
                        "index": tfds.features.Scalar(np.int64),  # i of make_shapes(split, n)[i]
                        "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                        "mask": tfds.features.Image(shape=(s, s, 1), encoding_format="png"),
                        "objects": tfds.features.Sequence(
                            {
                                "bbox": tfds.features.BBoxFeature(),
                                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                            }
                        ),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split, n) for split, n in SHAPES_SPLITS.items()}

        def _generate_examples(self, split: str, n: int):
            for i, sample in enumerate(iter_shapes(split, n)):
                yield (
                    i,
                    {
                        "index": i,
                        "image": _png(Image.fromarray(sample["image"])),
                        "mask": _png(Image.fromarray(sample["mask"])),
                        "objects": {
                            "bbox": xyxy_to_tfds(sample["boxes"], SHAPES_SIZE, SHAPES_SIZE),
                            "label": sample["labels"].astype(np.int64),
                        },
                    },
                )

    # tfds derives a builder's code path through importlib.resources, which fails for an editable install.
    Mbv3Shapes.code_path = epath.Path(__file__)
    _BUILDERS["shapes"] = Mbv3Shapes
    return Mbv3Shapes


def shapes_builder(data_dir: str | os.PathLike | None = None) -> Any:
    """The ``mbv3_shapes`` builder (ArrayRecord), prepared on first use; read it with
    ``builder.as_data_source(split)`` or ``tfds.data_source("mbv3_shapes", ...)``."""
    cls = shapes_builder_class()
    builder = cls(data_dir=None if data_dir is None else str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


# --------------------------------------------------------------------------------------------------
# COCO folder
# --------------------------------------------------------------------------------------------------


def mask_polygon(mask: np.ndarray) -> list[float]:
    """The outline of a one-piece mask along pixel edges, as a COCO polygon ``[x0, y0, x1, y1, ...]``.

    pycocotools rasterizes such an outline back to exactly the same pixels (checked by the tests),
    so a COCO folder of these shapes loses nothing. Refuses a mask that is not one run per row.
    """
    runs = _row_runs(np.asarray(mask, bool))
    if runs is None:
        raise ValueError("mask_polygon needs one piece made of one run per row, overlapping row to row")
    right = [p for y, _, x1 in runs for p in ((x1, y), (x1, y + 1))]
    left = [p for y, x0, _ in runs for p in ((x0, y), (x0, y + 1))]
    ring = right + left[::-1]
    # Keep only corners: drop repeated points and the middle of three points on one line.
    ring = [p for i, p in enumerate(ring) if p != ring[i - 1]]
    corners = [
        p
        for i, p in enumerate(ring)
        if not (ring[i - 1][0] == p[0] == ring[(i + 1) % len(ring)][0])
        and not (ring[i - 1][1] == p[1] == ring[(i + 1) % len(ring)][1])
    ]
    return [float(c) for p in corners for c in p]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_coco_folder(
    samples: Sequence[dict[str, np.ndarray]],
    root: str | os.PathLike,
    *,
    class_names: Sequence[str] = CLASS_NAMES,
    overwrite: bool = False,
) -> Path:
    """Write ``samples`` (as :func:`make_shapes` gives) as a COCO instances folder: ``root/images/
    00001.png ...`` and ``root/annotations.json`` (file names relative to ``images/``, as COCO's are
    to its image folder; ids from 1; category ``k`` is label ``k``; polygon segmentations).

    Every file is written to a temporary name and renamed, and ``annotations.json`` last, so a folder
    whose json exists names only complete images. An existing ``annotations.json`` is refused unless
    ``overwrite``.
    """
    from PIL import Image

    root = Path(root)
    ann_path = root / "annotations.json"
    if ann_path.exists() and not overwrite:
        raise DataError(f"{ann_path} exists; pass overwrite=True to replace it")
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, sample in enumerate(samples, start=1):
        h, w = sample["image"].shape[:2]
        file_name = f"{i:05d}.png"
        _write_atomic(root / "images" / file_name, _png(Image.fromarray(sample["image"])))
        images.append({"id": i, "file_name": file_name, "height": int(h), "width": int(w)})
        for k, (box, label) in enumerate(zip(sample["boxes"], sample["labels"], strict=True), start=1):
            inst = sample["instances"] == k
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(inst.sum()),
                    "iscrowd": 0,
                    "segmentation": [mask_polygon(inst)],
                }
            )
    categories = [{"id": k, "name": name} for k, name in enumerate(class_names) if k > 0]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    _write_atomic(ann_path, json.dumps(coco).encode())
    return root


def write_shapes_coco(
    root: str | os.PathLike, split: str = "train", n: int = SHAPES_SPLITS["train"], seed: int = 0
) -> Path:
    """:func:`make_shapes` ``(split, n, seed)`` written as a COCO folder at ``root``."""
    return write_coco_folder(make_shapes(split, n, seed), root)
