"""Image-classification data through tensorflow-datasets (``tfds.data_source``) and grain.

* Any TFDS image-classification dataset by name (``imagenet2012``, ``cifar10``, ...), read as random-access
  ArrayRecord through ``tfds.data_source`` (no TensorFlow needed to read).
* ``sklearn_digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes), upscaled
  to 32x32 RGB and written as a TFDS ArrayRecord dataset on first use (no download): the demo's data.
* :func:`image_folder_builder`: a TFDS dataset from your own ``root/<class>/*.jpg`` folders (or
  ``root/train/<class>/...`` and ``root/val/<class>/...``). Every image is decoded once, when the data
  set is prepared: a truncated or unreadable file stops that with a :class:`DataError` naming it, and
  so does an empty class folder (as torchvision's ``ImageFolder``). An image folder's eval split is
  whichever of ``val`` / ``validation`` / ``test`` it has when the configured one is absent.

Order and sharding: the sample order is a function of (seed, epoch) over the *global* batch: global
batch ``b`` of an epoch is ``perm[b*G:(b+1)*G]`` and process ``p`` reads ``[p*L:(p+1)*L]`` of it
(``L = G / num_processes``), so a run's batches do not depend on how many processes read them, and the
data position is the step number (exact resume). Each example's augmentation draws from a generator
seeded by (seed, its global position). ``process_sharding="process"`` instead gives each process its own
even split of the data set (``tfds.even_splits``), shuffled on its own.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DIGITS_NAME = "sklearn_digits"
SHAPES_NAME = "mbv3_shapes"  # train/shapes_data.py
# Class names of the segmentation datasets whose masks this module knows (index = mask value).
SEGMENTATION_CLASSES = {SHAPES_NAME: ("background", "circle", "rectangle", "triangle")}
DIGITS_SIZE = 32
DIGITS_TEST = 360  # examples held out for validation (a fixed, seeded 20% split)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """A data set that cannot be found, built or read as an image-classification data set."""


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - the train extra installs it
        raise ImportError("training data needs tensorflow-datasets: pip install 'mbv3-jax[train]'") from e
    return tfds


# --------------------------------------------------------------------------------------------------
# Builders: scikit-learn digits and image folders
# --------------------------------------------------------------------------------------------------

_BUILDERS: dict[str, type] = {}


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pin_code_path(cls: type) -> None:
    # tfds derives a builder's code path from its top-level package through importlib.resources,
    # which fails for an editable install's package ("MultiplexedPath only supports directories").
    from etils import epath

    cls.code_path = epath.Path(__file__)


def _digits_builder_class() -> type:
    """The ``sklearn_digits`` TFDS builder (registered with tfds on first call)."""
    if "digits" in _BUILDERS:
        return _BUILDERS["digits"]
    tfds = _tfds()

    class SklearnDigits(tfds.core.GeneratorBasedBuilder):
        """scikit-learn's handwritten digits, bilinearly upscaled 8x8 -> 32x32, gray as RGB, white ink."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "32x32 RGB PNG; 1,437 train / 360 test (seeded split)."}

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="scikit-learn's bundled UCI handwritten digits, upscaled to RGB.",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(
                            shape=(DIGITS_SIZE, DIGITS_SIZE, 3), encoding_format="png"
                        ),
                        "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(False), "test": self._generate_examples(True)}

        def _generate_examples(self, test: bool):
            from PIL import Image
            from sklearn.datasets import load_digits

            digits = load_digits()
            perm = np.random.default_rng(0).permutation(len(digits.target))
            for i in perm[:DIGITS_TEST] if test else perm[DIGITS_TEST:]:
                gray = Image.fromarray(np.round(digits.images[i] * (255 / 16)).astype(np.uint8))
                img = gray.resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR).convert("RGB")
                yield int(i), {"image": _png(img), "label": int(digits.target[i])}

    _pin_code_path(SklearnDigits)
    _BUILDERS["digits"] = SklearnDigits
    return SklearnDigits


EVAL_SPLITS = ("val", "validation", "test")  # an image folder's eval split: the one of these it has


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _list_images(folder: Path) -> list[tuple[Path, str]]:
    """``(image, class)`` for every image file under ``folder/<class>/``; an empty class folder is
    refused as torchvision's ``ImageFolder`` refuses it (a class without examples)."""
    items, empty = [], []
    for c in _class_dirs(folder):
        found = [
            (path, c)
            for path in sorted((folder / c).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        ]
        if not found:
            empty.append(c)
        items += found
    if empty:
        raise DataError(
            f"Found no valid file for the classes {', '.join(empty)} in {folder} "
            f"({', '.join(str(folder / c) for c in empty[:3])}{' ...' if len(empty) > 3 else ''}). "
            f"Supported extensions are: {', '.join(IMAGE_EXTENSIONS)}; add images or remove the folders"
        )
    return items


def _decode_rgb(path: Path) -> Any:
    """The image at ``path`` fully decoded as RGB (PIL), or a DataError naming the file."""
    from PIL import Image, ImageFile

    pad, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False  # never pad silently
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # decodes every pixel: a truncated file fails here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(
            f"{path} is not a readable image ({type(e).__name__}: {e}); delete or replace it "
            "(the data set is prepared again on the next run)"
        ) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = pad


def image_folder_builder(root: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Any:
    """A TFDS builder (ArrayRecord) over ``root/<class>/<image>`` folders; prepared on first use.

    Splits: ``root/train`` and ``root/val`` (or ``validation``/``test``) when present, else ``train``
    holds every image. The class list is the sorted sub-folder names of the train split.
    ``data_dir`` defaults to ``root/.tfds``.
    """
    tfds = _tfds()
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    split_dirs = {s: root / s for s in ("train", "val", "validation", "test") if (root / s).is_dir()}
    if "train" not in split_dirs:
        split_dirs = {"train": root}
    classes = _class_dirs(split_dirs["train"])
    if not classes:
        raise DataError(f"{split_dirs['train']} has no class sub-folders (expected <class>/<image files>)")
    files = {s: _list_images(d) for s, d in split_dirs.items()}
    if not files["train"]:
        raise DataError(f"{split_dirs['train']} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    for d in split_dirs.values():
        unknown = sorted(set(_class_dirs(d)) - set(classes))
        if unknown:
            raise DataError(
                f"{d} has classes {unknown} that {split_dirs['train']} lacks (its classes: {classes})"
            )
    digest = hashlib.sha1(
        "\n".join(
            f"{s}:{p.relative_to(root)}:{p.stat().st_size}" for s in files for p, _ in files[s]
        ).encode()
    ).hexdigest()[:10]

    class ImageFolderDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f"{root.name}-{digest}")]

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Images under {root}",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(names=classes),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(items) for s, items in files.items() if items}

        def _generate_examples(self, items):
            for path, label in items:
                yield str(path.relative_to(root)), {"image": _png(_decode_rgb(path)), "label": label}

    ImageFolderDataset.name = "image_folder_dataset"
    _pin_code_path(ImageFolderDataset)
    builder = ImageFolderDataset(data_dir=str(data_dir or root / ".tfds"), file_format="array_record")
    builder.download_and_prepare()
    return builder


# --------------------------------------------------------------------------------------------------
# Opening a split
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Split:
    """A random-access split: ``source[i]`` is a dict with an image (uint8 HWC) and its target under
    ``label_key``: a class label, or (``kind`` "segmentation") a (H, W, 1) uint8 mask of class indices
    (255: ignored), or (``kind`` "detection") TFDS's objects: ``bbox`` (normalized ymin, xmin, ymax,
    xmax), ``label`` (plus ``label_offset``: 1 where the data's labels do not reserve 0 for the
    background, as torchvision's detection models do) and optionally ``is_crowd``."""

    source: Any
    num_classes: int
    class_names: list[str]
    image_key: str
    label_key: str
    split: str = ""  # the split opened (an image folder's eval split may stand in for the one asked)
    kind: str = "classification"
    label_offset: int = 0
    category_ids: tuple[int, ...] | None = None  # a COCO folder's category id of each label >= 1
    image_hw: tuple[int, int] | None = None  # every image's (height, width), where the data fixes it
    sizes: np.ndarray | None = None  # (N, 2) each image's (height, width), where known without decoding
    encoded: Callable[[], Any] | None = None  # opens the records with the images undecoded (bytes)

    def __len__(self) -> int:
        return len(self.source)


def _check_features(info: Any, name: str, image_key: str, label_key: str) -> tuple[int, list[str]]:
    tfds = _tfds()
    features = info.features
    keys = list(features.keys()) if hasattr(features, "keys") else []
    if image_key not in keys or label_key not in keys:
        raise DataError(
            f"{name} is not an image-classification dataset with features {image_key!r}/{label_key!r} "
            f"(it has {keys}); set --data.image_key/--data.label_key"
        )
    if not isinstance(features[image_key], tfds.features.Image):
        raise DataError(
            f"{name}: feature {image_key!r} is {type(features[image_key]).__name__}, not an Image"
        )
    label = features[label_key]
    if not isinstance(label, tfds.features.ClassLabel):
        raise DataError(f"{name}: feature {label_key!r} is {type(label).__name__}, not a ClassLabel")
    return label.num_classes, list(label.names)


def _check_segmentation_features(info: Any, name: str, image_key: str, mask_key: str) -> None:
    tfds = _tfds()
    features = info.features
    keys = list(features.keys()) if hasattr(features, "keys") else []
    for key, channels in ((image_key, 3), (mask_key, 1)):
        feature = features[key] if key in keys else None
        if not isinstance(feature, tfds.features.Image) or feature.shape[-1] != channels:
            raise DataError(
                f"{name} is not a segmentation dataset with an RGB image {image_key!r} and a one-channel "
                f"mask image {mask_key!r} (it has {keys}); set --data.image_key/--data.label_key"
            )


def _check_detection_features(info: Any, name: str, image_key: str, objects_key: str) -> list[str]:
    """The class names of a detection dataset (``objects_key``: a sequence of ``bbox`` + ``label``)."""
    tfds = _tfds()
    features = info.features
    keys = list(features.keys()) if hasattr(features, "keys") else []
    objects = features[objects_key] if objects_key in keys else None
    inner = getattr(objects, "feature", None)
    inner_keys = list(inner.keys()) if hasattr(inner, "keys") else []
    if (
        image_key not in keys
        or not isinstance(features[image_key], tfds.features.Image)
        or not isinstance(objects, tfds.features.Sequence)
        or "bbox" not in inner_keys
        or not isinstance(inner["label"] if "label" in inner_keys else None, tfds.features.ClassLabel)
    ):
        raise DataError(
            f"{name} is not a detection dataset with an image {image_key!r} and objects {objects_key!r} "
            f"holding 'bbox' and a ClassLabel 'label' (it has {keys}); set --data.image_key/--data.label_key"
        )
    return list(inner["label"].names)


def open_split(
    dataset: str,
    split: str,
    *,
    data_dir: str | None = None,
    image_folder: str | None = None,
    image_key: str = "image",
    label_key: str = "label",
    process_shard: tuple[int, int] | None = None,
    eval_fallback: bool = False,
    kind: str = "classification",
    coco_folder: str | None = None,
    coco_categories: Sequence[int] = (),
    coco_labels: str = "contiguous",
) -> Split:
    """Open ``split`` of a TFDS dataset (prepared on first use if it needs no manual download).

    ``process_shard=(index, count)``: only the index-th of ``count`` equal contiguous parts of the split
    (the remainder dropped), as ``tfds.even_splits(split, count, drop_remainder=True)[index]``.
    ``eval_fallback``: ``split`` is the eval split; an image folder that lacks it may stand in its one
    ``val`` / ``validation`` / ``test`` split (``Split.split`` says which was opened).
    ``kind`` "segmentation": ``label_key`` names a one-channel mask image; the class count is the
    dataset's where it is known (:data:`SEGMENTATION_CLASSES`), else 0 (the model config's).
    ``kind`` "detection": ``label_key`` names the objects (``bbox``, ``label``); class 0 is the
    background, so labels shift by one unless the data's first class is named "background".
    ``coco_folder``: detection or segmentation data from a COCO-format folder instead of TFDS
    (:func:`train.coco_data.split_folder` says where each split is; categories become labels 1..K;
    the ``train`` split drops images without annotations, as torchvision's references do; for
    segmentation, images with at most 1000 pixels of annotation, as its segmentation reference);
    ``coco_categories``: only these category ids, labelled 1..K in this order; ``coco_labels``
    "category_id": the ids themselves as labels (torchvision's COCO models: 91 classes).
    """
    tfds = _tfds()

    def shard(builder: Any, name: str) -> str:
        if process_shard is None:
            return name
        if "[" in name:
            raise DataError(f"per-process splits need a whole split, not {name!r}")
        index, count = process_shard
        per = builder.info.splits[name].num_examples // count
        return f"{name}[{index * per}:{(index + 1) * per}]"

    if coco_folder:
        return _coco_folder_split(coco_folder, split, kind, process_shard, coco_categories, coco_labels)
    if coco_categories or coco_labels != "contiguous":
        raise DataError(
            "--data.coco_categories and --data.coco_labels describe a --data.coco_folder: give the folder"
        )
    if image_folder and kind != "classification":
        raise DataError(f"--data.image_folder holds classification data; {kind} reads a TFDS dataset")
    if image_folder:
        builder = image_folder_builder(image_folder, data_dir)
        split = _image_folder_split(image_folder, split, list(builder.info.splits), eval_fallback)
        source = builder.as_data_source(split=shard(builder, split))
        num_classes, names = _check_features(builder.info, str(image_folder), image_key, label_key)
        return Split(source, num_classes, names, image_key, label_key, split)
    if kind not in ("classification", "segmentation", "detection"):
        raise ValueError(f"kind must be 'classification', 'segmentation' or 'detection', got {kind!r}")
    if dataset == DIGITS_NAME:
        _digits_builder_class()
    if dataset == SHAPES_NAME:
        from train.shapes_data import shapes_builder_class

        shapes_builder_class()
    try:
        builder = tfds.builder(dataset, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(dataset, known + [DIGITS_NAME], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DataError(f"unknown TFDS dataset {dataset!r}.{hint} (or pass --data.image_folder)") from None
    label_offset = 0
    if kind == "segmentation":
        _check_segmentation_features(builder.info, dataset, image_key, label_key)
        names = list(SEGMENTATION_CLASSES.get(dataset, ()))
        num_classes = len(names)
    elif kind == "detection":
        names = _check_detection_features(builder.info, dataset, image_key, label_key)
        if not names or names[0] != "background":
            names, label_offset = ["background", *names], 1
        num_classes = len(names)
    else:
        num_classes, names = _check_features(builder.info, dataset, image_key, label_key)
    try:
        builder.download_and_prepare()
    except Exception as e:
        raise DataError(f"could not prepare {dataset} in {builder.data_dir}: {e}") from e
    base = split.split("[")[0]
    if base not in builder.info.splits:
        raise DataError(f"{dataset} has splits {list(builder.info.splits)}, not {base!r}")
    source = tfds.data_source(
        dataset,
        split=shard(builder, split),
        data_dir=data_dir,
        download=False,
        builder_kwargs={"file_format": "array_record"},
    )
    image_shape = getattr(builder.info.features[image_key], "shape", (None, None))
    image_hw = tuple(image_shape[:2]) if None not in image_shape[:2] else None

    def encoded() -> Any:  # the records with undecoded images: their sizes read from headers
        return tfds.data_source(
            dataset,
            split=shard(builder, split),
            data_dir=data_dir,
            download=False,
            decoders={image_key: tfds.decode.SkipDecoding()},
            builder_kwargs={"file_format": "array_record"},
        )

    return Split(
        source,
        num_classes,
        names,
        image_key,
        label_key,
        split,
        kind,
        label_offset,
        image_hw=image_hw,
        encoded=encoded,
    )


# torchvision's segmentation reference trains on the COCO images with more than this annotated area.
SEGMENTATION_MIN_ANNOTATED_AREA = 1000


def _coco_folder_split(
    root: str,
    split: str,
    kind: str,
    process_shard: tuple[int, int] | None,
    categories: Sequence[int] = (),
    labels: str = "contiguous",
) -> Split:
    from train.coco_data import CocoSource, load_coco_folder, split_folder

    if kind == "classification":
        raise DataError("--data.coco_folder holds detection or segmentation data: pick such a model")
    folder, image_dir, annotation_file = split_folder(root, split)
    coco = load_coco_folder(
        folder,
        image_dir,
        annotation_file=annotation_file,
        remove_images_without_annotations=split.startswith("train"),
        categories=list(categories) or None,
        labels=labels,
        min_annotated_area=SEGMENTATION_MIN_ANNOTATED_AREA if kind == "segmentation" else None,
    )
    start, stop = 0, len(coco)
    if process_shard is not None:
        index, count = process_shard
        per = len(coco) // count
        start, stop = index * per, (index + 1) * per
    source = CocoSource(coco, masks=kind == "segmentation", start=start, stop=stop)
    label_key = "mask" if kind == "segmentation" else "objects"
    names = list(coco.class_names)
    sizes = np.asarray([(img.height, img.width) for img in coco.images], np.int64).reshape(-1, 2)
    distinct = {tuple(hw) for hw in sizes.tolist()}
    image_hw = distinct.pop() if len(distinct) == 1 else None  # of the whole split, in every process
    sizes = sizes[start:stop]
    return Split(
        source,
        coco.num_classes,
        names,
        "image",
        label_key,
        split,
        kind,
        0,
        coco.category_ids if labels == "contiguous" else None,  # raw ids: the labels are the ids
        image_hw=image_hw,
        sizes=sizes,
    )


def _image_folder_split(image_folder: str, split: str, splits: list[str], eval_fallback: bool) -> str:
    """``split`` if the image folder has it; for an eval split it lacks (the shipped configurations
    name ``test`` or ``validation``), with ``eval_fallback``, the one of ``val`` / ``validation`` /
    ``test`` it has."""
    if split in splits:
        return split
    present = [s for s in EVAL_SPLITS if s in splits]
    if eval_fallback and len(present) == 1:
        return present[0]
    if eval_fallback and not present:
        raise DataError(
            f"image folder {image_folder} has no eval split (its splits: {splits}): put the images in "
            f"{image_folder}/train/<class>/ and {image_folder}/val/<class>/, or pass "
            "--data.eval_split=train to evaluate on the training images"
        )
    raise DataError(f"image folder {image_folder} has splits {splits}, not {split!r}")


# --------------------------------------------------------------------------------------------------
# Global order and per-process pipelines
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GlobalOrder:
    """Which record is at each global position: epoch ``e`` is a (seed, e) permutation, cut into batches."""

    num_records: int
    global_batch: int
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self):
        if self.num_records < self.global_batch:
            raise DataError(
                f"the data set has {self.num_records} examples, "
                f"fewer than one global batch of {self.global_batch}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_records // self.global_batch  # the last partial batch is dropped

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_records)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_records)

    def record(self, global_pos: int) -> int:
        epoch, offset = divmod(global_pos, self.steps_per_epoch * self.global_batch)
        return int(_cached_permutation(self, epoch)[offset])

    def batch(self, step: int) -> tuple[None, np.ndarray]:
        """(no shape: each example's own, the global batch's records) of ``step``."""
        start = int(step) * self.global_batch
        return None, np.asarray([self.record(p) for p in range(start, start + self.global_batch)], np.int64)


_PERM_CACHE: dict[tuple, np.ndarray] = {}


def _cached_permutation(order: GlobalOrder, epoch: int) -> np.ndarray:
    key = (order.num_records, order.global_batch, order.seed, order.shuffle, epoch)
    perm = _PERM_CACHE.get(key)
    if perm is None:
        if len(_PERM_CACHE) > 4:
            _PERM_CACHE.clear()
        perm = _PERM_CACHE[key] = order.permutation(epoch)
    return perm


def _read(split: Split, indices: list[int]) -> list[dict[str, Any]]:
    getitems = getattr(split.source, "__getitems__", None)
    return list(getitems(indices)) if getitems is not None else [split.source[i] for i in indices]


class _TrainBatch:
    """grain map: step -> this process's (images, labels) of that global batch, augmented per example
    and padded to the batch's shape (a :class:`train.batching.GroupedOrder`'s)."""

    def __init__(self, split: Split, order: Any, transform: Callable, local_batch: int, offset: int):
        self.split, self.order, self.transform = split, order, transform
        self.local_batch, self.offset = local_batch, offset

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        shape, records = self.order.batch(step)
        rows = range(self.offset, self.offset + self.local_batch)
        examples = _read(self.split, [int(records[j]) for j in rows])
        positions = [int(step) * self.order.global_batch + j for j in rows]
        pairs = [
            _transformed(self.split, self.transform, ex, np.random.default_rng([self.order.seed, 1, p]))
            for ex, p in zip(examples, positions, strict=True)
        ]
        return _stacked(pairs, shape)


def _transformed(split: Split, transform: Callable, ex: dict[str, Any], *rng: Any) -> tuple[Any, Any]:
    """(image, target) of one example: a classification transform maps the image alone, a
    segmentation one the image and its (H, W) mask together (train transforms also take ``rng``)."""
    image = np.asarray(ex[split.image_key])
    if split.kind == "segmentation":
        return transform(image, np.asarray(ex[split.label_key])[..., 0], *rng)
    if split.kind == "detection":
        return _detection_example(split, transform, ex, *rng)
    return transform(image, *rng), ex[split.label_key]


def xyxy_to_tfds(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(x1, y1, x2, y2) pixel boxes as TFDS's normalized (ymin, xmin, ymax, xmax), float32."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return (b[:, [1, 0, 3, 2]] / np.array([height, width, height, width])).astype(np.float32)


def tfds_to_xyxy(bbox: np.ndarray, height: int, width: int) -> np.ndarray:
    """TFDS's normalized (ymin, xmin, ymax, xmax) boxes as (x1, y1, x2, y2) pixels, float32."""
    b = np.asarray(bbox, np.float64).reshape(-1, 4)
    return (b[:, [1, 0, 3, 2]] * np.array([width, height, width, height])).astype(np.float32)


def _detection_example(split: Split, transform: Callable, ex: dict[str, Any], *rng: Any) -> tuple[Any, Any]:
    """A detection transform's (image, targets) from TFDS objects: boxes as xyxy pixels. Training
    (``rng`` given) leaves out crowd regions and boxes without area, as torchvision's
    ``ConvertCocoPolysToMask``; evaluation keeps the crowd regions, which COCOeval ignores matches to."""
    image, objects = np.asarray(ex[split.image_key]), ex[split.label_key]
    h, w = image.shape[:2]
    if "boxes_xyxy" in objects:  # a COCO folder's, in pixels
        boxes = np.asarray(objects["boxes_xyxy"], np.float32).reshape(-1, 4)
    else:
        boxes = tfds_to_xyxy(np.asarray(objects["bbox"]), h, w)
    labels = np.asarray(objects["label"], np.int64) + split.label_offset
    crowd = np.asarray(objects.get("is_crowd", np.zeros(len(boxes), bool)), bool).reshape(-1)
    ids = [f"{k} {ex[k]}" for k in ("image/id", "index", "image/filename") if k in ex]
    name = f"{split.split} image ({ids[0]})" if ids else f"a {split.split} image"
    if rng:
        keep = ~crowd & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return transform(image, boxes[keep], labels[keep], *rng, name=name)
    x, targets = transform(image, boxes, labels, crowd, name=name)
    if "image/id" in ex:  # the data's own id, so the results JSON matches its annotations
        targets["image_id"] = np.asarray(ex["image/id"], np.int32)
    return x, targets


def _stacked(pairs: list[tuple[Any, Any]], shape: tuple[int, int] | None = None) -> tuple[np.ndarray, Any]:
    """Images and targets as batch arrays; with ``shape``, each image padded at the bottom and right to
    it with 0 (a segmentation mask with 255, not scored), as torchvision pads a batch."""
    if shape is not None:
        pairs = [_padded(image, target, shape) for image, target in pairs]
    images = np.stack([image for image, _ in pairs]).astype(np.float32, copy=False)
    targets = [target for _, target in pairs]
    if isinstance(targets[0], dict):  # detection: padded per-image arrays
        return images, {k: np.stack([t[k] for t in targets]) for k in targets[0]}
    return images, np.asarray(np.stack(targets), np.int32)


def _padded(image: np.ndarray, target: Any, shape: tuple[int, int]) -> tuple[np.ndarray, Any]:
    from mbv3_jax.models.segmentation import IGNORE_INDEX

    h, w = image.shape[:2]
    if h > shape[0] or w > shape[1]:
        raise DataError(f"an image of {h}x{w} after its transform does not fit its batch's shape {shape}")
    pad = ((0, shape[0] - h), (0, shape[1] - w))
    image = np.pad(image, (*pad, (0, 0)))
    if isinstance(target, np.ndarray) and target.shape[:2] == (h, w):  # a segmentation mask
        target = np.pad(target, pad, constant_values=IGNORE_INDEX)
    return image, target


def _default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def train_batches(
    split: Split,
    order: Any,
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray],
    *,
    start_step: int,
    num_steps: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    num_threads: int | None = None,
    prefetch: int = 4,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's slices of global batches ``start_step .. num_steps-1``: (images NHWC, labels).
    ``order``: a :class:`GlobalOrder`, or a :class:`train.batching.GroupedOrder` (batches of one shape).

    A grain pipeline over step numbers (so the iterator's position is the step); ``worker_count > 0``
    decodes and augments in that many worker processes, else in ``num_threads`` threads.
    """
    import grain

    if order.global_batch % process_count:
        raise DataError(f"global batch {order.global_batch} is not divisible by {process_count} processes")
    local = order.global_batch // process_count
    fn = _TrainBatch(split, order, transform, local, process_index * local)
    ds = grain.MapDataset.range(start_step, num_steps).map(fn)
    threads = num_threads if num_threads is not None else _default_threads()
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS(sys.argv[:1])
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it)


class _EvalBatch:
    """grain map: step -> (images, labels, weights) of this process's rows of that global eval batch,
    padded to the batch's shape; padding rows repeat a real image with weight 0."""

    def __init__(self, split: Split, transform: Callable, schedule: list, local_batch: int, offset: int):
        self.split, self.transform, self.schedule = split, transform, schedule
        self.local_batch, self.offset = local_batch, offset

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shape, records = self.schedule[int(step)]
        rows = records[self.offset : self.offset + self.local_batch]
        examples = _read(self.split, [int(r) if r >= 0 else int(records[0]) for r in rows])
        images, targets = _stacked([_transformed(self.split, self.transform, ex) for ex in examples], shape)
        weights = (rows >= 0).astype(np.float32)
        if isinstance(targets, dict) and "image_id" not in targets:  # detection: name the image for COCO
            targets["image_id"] = np.where(rows >= 0, rows, int(records[0])).astype(np.int32)
        return images, targets, weights


def eval_batches(
    split: Split,
    transform: Callable[[np.ndarray], np.ndarray],
    global_batch: int,
    *,
    shapes: np.ndarray | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This process's slices of the eval set, padded: (images, labels, weights 1/0). ``shapes``: (N, 2)
    the shape each image is padded to; the set is then walked shape by shape
    (:func:`train.batching.eval_schedule`), one compilation per shape."""
    import grain

    from train.batching import eval_schedule

    if global_batch % process_count:
        raise DataError(f"eval batch {global_batch} is not divisible by {process_count} processes")
    local = global_batch // process_count
    schedule = eval_schedule(len(split), global_batch, shapes)
    fn = _EvalBatch(split, transform, schedule, local, process_index * local)
    ds = grain.MapDataset.range(len(schedule)).map(fn)
    threads = num_threads if num_threads is not None else _default_threads()
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4)))


def num_eval_steps(split: Split, global_batch: int, shapes: np.ndarray | None = None) -> int:
    from train.batching import eval_schedule

    return len(eval_schedule(len(split), global_batch, shapes))
