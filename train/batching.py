"""Batches of one shape each, so that images of many sizes cost a few compilations.

Faster R-CNN resizes every image keeping its aspect ratio and segmentation evaluates every image at its
own size; ``jax.jit`` compiles one program per input shape. Each image is assigned the (H, W) its batch
is padded to (its *shape*), and every batch holds images of one shape:

* training draws batches as torchvision's ``GroupedBatchSampler`` does, over a (seed, epoch)
  permutation with the shapes as its groups (:class:`GroupedOrder`), so runs resume exactly;
* evaluation walks the images shape by shape (:func:`eval_schedule`), padding each shape's last batch
  with rows of weight 0.

Every process computes the same global schedule from the images' sizes and reads its rows of each
global batch, so all processes run the same sequence of programs.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm import tqdm

from train.data import GlobalOrder

Shape = tuple[int, int]


def image_sizes(split: Any, *, progress: bool = True) -> np.ndarray:
    """The (height, width) of every image of ``split`` (a :class:`train.data.Split`), (N, 2) int64:
    from its metadata where it has them (a COCO file's, or one size fixed by the data), else read from
    each image's header (``split.encoded``, the records with undecoded images), else by decoding every
    image (torchvision's slow path), with a progress bar."""
    n = len(split)
    if split.sizes is not None:
        return np.asarray(split.sizes, np.int64).reshape(n, 2)
    if split.image_hw is not None:
        return np.tile(np.asarray(split.image_hw, np.int64), (n, 1))

    if split.encoded is not None:
        encoded = split.encoded()

        def size(i: int) -> Shape:
            from PIL import Image

            with Image.open(io.BytesIO(encoded[i][split.image_key])) as img:
                return img.height, img.width
    else:

        def size(i: int) -> Shape:
            return tuple(np.asarray(split.source[i][split.image_key]).shape[:2])

    with ThreadPoolExecutor(min(16, 2 * (os.cpu_count() or 1))) as pool:
        sizes = list(
            tqdm(
                pool.map(size, range(n)),
                total=n,
                desc=f"reading the sizes of {split.split or 'the'} images",
                unit="image",
                disable=not progress,
            )
        )
    split.sizes = np.asarray(sizes, np.int64).reshape(n, 2)
    return split.sizes


def round_up(sizes: np.ndarray, multiple: int) -> np.ndarray:
    """Each size rounded up to a multiple of ``multiple``."""
    return -(-np.asarray(sizes, np.int64) // multiple) * multiple


def shorter_side_size(h: int, w: int, short: int) -> Shape:
    """(H, W) of an h x w image whose shorter side is resized to ``short``, the longer side floored
    (torchvision's ``F.resize`` with one int)."""
    if min(h, w) == short:
        return h, w
    return (int(short * h / w), short) if w <= h else (short, int(short * w / h))


def segmentation_eval_shapes(sizes: np.ndarray, resize: int, multiple: int = 1) -> np.ndarray:
    """The eval shape of each image: the shorter side resized to ``resize`` (torchvision's
    ``SegmentationPresetEval``), rounded up to ``multiple`` (1: each image at its own size)."""
    resized = np.asarray([shorter_side_size(int(h), int(w), resize) for h, w in sizes], np.int64)
    return round_up(resized.reshape(-1, 2), multiple)


def detection_eval_shapes(sizes: np.ndarray, min_size: int, max_size: int, multiple: int = 32) -> np.ndarray:
    """The eval shape of each image: Faster R-CNN's resize, padded up to ``multiple`` (32: what
    torchvision's transform pads a batch of one image to)."""
    from mbv3_jax.models.detection import resized_size

    resized = np.asarray([resized_size(int(h), int(w), min_size, max_size) for h, w in sizes], np.int64)
    return round_up(resized.reshape(-1, 2), multiple)


def detection_train_shapes(
    sizes: np.ndarray, min_size: int, max_size: int, buckets: Sequence[Shape] | None = None
) -> np.ndarray:
    """The training shape of each image: the smallest of ``buckets`` (default:
    :func:`train.coco_data.default_buckets`) that holds it after Faster R-CNN's resize."""
    from train.coco_data import default_buckets, size_bucket

    buckets = list(buckets) if buckets else default_buckets(min_size, max_size)
    shapes = [
        size_bucket(int(h), int(w), buckets, min_size=min_size, max_size=max_size, name=f"image {i}")
        for i, (h, w) in enumerate(sizes)
    ]
    return np.asarray(shapes, np.int64).reshape(-1, 2)


def group(shapes: np.ndarray) -> tuple[tuple[Shape, ...], np.ndarray]:
    """(the distinct shapes, ascending by area; each image's index into them)."""
    shapes = np.asarray(shapes, np.int64).reshape(-1, 2)
    distinct, group_of = np.unique(shapes, axis=0, return_inverse=True)
    order = sorted(range(len(distinct)), key=lambda g: (int(np.prod(distinct[g])), tuple(distinct[g])))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return tuple((int(distinct[g][0]), int(distinct[g][1])) for g in order), rank[group_of.reshape(-1)]


@dataclasses.dataclass(frozen=True)
class GroupedOrder(GlobalOrder):
    """:class:`train.data.GlobalOrder` with batches of one shape: each epoch walks the (seed, epoch)
    permutation, filling one buffer per shape and emitting a global batch when one is full; the epoch
    ends with the fullest leftover buffers completed from their shape's first images of the epoch, so
    it has ``num_records // global_batch`` batches (torchvision's ``GroupedBatchSampler``). Build it
    with :meth:`of`."""

    shapes: tuple[Shape, ...] = ()
    group_of: tuple[int, ...] = ()  # each image's index into shapes
    _epochs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, shapes: np.ndarray, global_batch: int, seed: int = 0, shuffle: bool = True) -> GroupedOrder:
        """The order of images whose batch shapes are ``shapes`` (N, 2)."""
        distinct, group_of = group(shapes)
        return cls(len(group_of), global_batch, seed, shuffle, distinct, tuple(group_of.tolist()))

    def batch(self, step: int) -> tuple[Shape, np.ndarray]:
        """(the shape, the global batch's records) of ``step``."""
        epoch, i = divmod(int(step), self.steps_per_epoch)
        batches = self._epochs.get(epoch)  # read once: another thread may clear the cache meanwhile
        if batches is None:
            if len(self._epochs) > 2:
                self._epochs.clear()
            batches = self._epochs[epoch] = self._epoch_batches(epoch)
        g, records = batches[i]
        return self.shapes[g], records

    def record(self, global_pos: int) -> int:
        step, row = divmod(global_pos, self.global_batch)
        return int(self.batch(step)[1][row])

    def _epoch_batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        G = self.global_batch
        buffers: dict[int, list[int]] = {}
        seen: dict[int, list[int]] = {}
        batches: list[tuple[int, np.ndarray]] = []
        for r in self.permutation(epoch):
            g = self.group_of[r]
            buffers.setdefault(g, []).append(int(r))
            seen.setdefault(g, []).append(int(r))
            if len(buffers[g]) == G:
                batches.append((g, np.asarray(buffers.pop(g), np.int64)))
                buffers[g] = []  # re-entered at once, as torchvision's, which orders ties below
        # Fullest first; sorted() is stable, so equally full buffers keep the order they entered in.
        for g, buffer in sorted(buffers.items(), key=lambda item: len(item[1]), reverse=True):
            if len(batches) == self.steps_per_epoch or not buffer:
                break
            missing = G - len(buffer)
            fill = seen[g] * math.ceil(missing / len(seen[g]))
            batches.append((g, np.asarray(buffer + fill[:missing], np.int64)))
        return batches


def eval_schedule(
    num_records: int, global_batch: int, shapes: np.ndarray | None = None
) -> list[tuple[Shape | None, np.ndarray]]:
    """The eval set as global batches: ``(shape, records)`` with -1 where a batch is padded. Without
    ``shapes``, the records in order (shape None); with (N, 2) ``shapes``, shape by shape (ascending by
    area), each shape's records in order."""
    if shapes is None:
        distinct: tuple[Shape | None, ...] = (None,)
        members = [np.arange(num_records)]
    else:
        distinct, group_of = group(shapes)
        members = [np.flatnonzero(group_of == g) for g in range(len(distinct))]
    schedule: list[tuple[Shape | None, np.ndarray]] = []
    for shape, records in zip(distinct, members, strict=True):
        padded = np.full(-(-len(records) // global_batch) * global_batch, -1, np.int64)
        padded[: len(records)] = records
        schedule += [(shape, b) for b in padded.reshape(-1, global_batch)]
    return schedule
