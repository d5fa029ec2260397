"""Batches of one shape (train/batching.py): the training order is torchvision's GroupedBatchSampler
over the shapes, the eval schedule visits every image once, shape by shape, every process reads its
rows of the same global batches, and image sizes come from metadata, headers or the images."""

from __future__ import annotations

import io
import math
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from train import augment, batching, data
from train.shapes_data import make_shapes, write_coco_folder


def _torchvision_grouped_batches(order, group_ids, batch_size):
    """torchvision's references/detection GroupedBatchSampler.__iter__, over a fixed sampler order."""
    buffer_per_group, samples_per_group, batches = defaultdict(list), defaultdict(list), []
    for idx in order:
        group_id = group_ids[idx]
        buffer_per_group[group_id].append(idx)
        samples_per_group[group_id].append(idx)
        if len(buffer_per_group[group_id]) == batch_size:
            batches.append(buffer_per_group[group_id])
            del buffer_per_group[group_id]
        assert len(buffer_per_group[group_id]) < batch_size  # as there: re-enters the key
    num_remaining = len(order) // batch_size - len(batches)
    if num_remaining > 0:
        for group_id, _ in sorted(buffer_per_group.items(), key=lambda x: len(x[1]), reverse=True):
            remaining = batch_size - len(buffer_per_group[group_id])
            samples = samples_per_group[group_id]
            samples = samples * math.ceil(remaining / len(samples))  # _repeat_to_at_least
            buffer_per_group[group_id].extend(samples[:remaining])
            batches.append(buffer_per_group[group_id])
            num_remaining -= 1
            if num_remaining == 0:
                break
    return batches


@pytest.mark.parametrize("num_groups,batch", [(1, 4), (3, 2), (5, 8), (8, 3)])
def test_grouped_order_is_torchvisions_grouped_batch_sampler(num_groups, batch):
    rng = np.random.default_rng(num_groups)
    group_of = rng.integers(0, num_groups, 103)
    shapes = tuple((32, 32 * (g + 1)) for g in range(num_groups))
    order = batching.GroupedOrder(len(group_of), batch, 5, True, shapes, tuple(group_of.tolist()))
    assert order.steps_per_epoch == 103 // batch
    for epoch in (0, 1):
        expected = _torchvision_grouped_batches(order.permutation(epoch).tolist(), group_of.tolist(), batch)
        got = [order.batch(epoch * order.steps_per_epoch + i) for i in range(order.steps_per_epoch)]
        assert [r.tolist() for _, r in got] == expected
        assert all(shape == shapes[group_of[r[0]]] and len(set(group_of[r])) == 1 for shape, r in got)
    # A function of (seed, step): a fresh order (as after a resume) gives the same batches.
    again = batching.GroupedOrder.of(np.asarray(shapes)[group_of], batch, seed=5)
    assert again.shapes == shapes and again.group_of == order.group_of
    assert np.array_equal(
        again.batch(order.steps_per_epoch + 2)[1], order.batch(order.steps_per_epoch + 2)[1]
    )
    with pytest.raises(data.DataError, match="fewer than one global batch"):
        batching.GroupedOrder.of(np.asarray(shapes)[group_of[:2]], 4)


def test_eval_schedule_visits_every_image_once_shape_by_shape():
    shapes = np.asarray([(64, 96), (64, 64), (64, 96), (96, 64), (64, 64), (64, 96), (64, 96)])
    schedule = batching.eval_schedule(len(shapes), 2, shapes)
    assert [s for s, _ in schedule] == [(64, 64), (64, 96), (64, 96), (96, 64)]  # ascending by area
    assert [r.tolist() for _, r in schedule] == [[1, 4], [0, 2], [5, 6], [3, -1]]
    plain = batching.eval_schedule(5, 2)
    assert [(s, r.tolist()) for s, r in plain] == [(None, [0, 1]), (None, [2, 3]), (None, [4, -1])]


def test_eval_shapes_follow_torchvisions_resizes():
    sizes = np.asarray([(480, 640), (640, 427), (500, 500)])
    # Segmentation: the shorter side to 520, the longer floored (torchvision's F.resize(img, 520)).
    own = batching.segmentation_eval_shapes(sizes, 520)
    assert own.tolist() == [[520, 693], [779, 520], [520, 520]]
    assert batching.segmentation_eval_shapes(sizes, 520, 32).tolist() == [[544, 704], [800, 544], [544, 544]]
    # Faster R-CNN: resized as GeneralizedRCNNTransform, padded to 32 (its one-image batch).
    assert batching.detection_eval_shapes(sizes, 800, 1333).tolist() == [[800, 1088], [1216, 800], [800, 800]]
    assert batching.detection_train_shapes(sizes, 800, 1333).tolist() == [
        [800, 1088],
        [1344, 800],
        [800, 800],
    ]


def _png(h: int, w: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_image_sizes_from_metadata_headers_or_images():
    hw = [(5, 7), (9, 4), (6, 6)]
    source = [{"image": np.zeros((h, w, 3), np.uint8)} for h, w in hw]

    def split(**kw):
        return data.Split(source, 0, [], "image", "label", "x", **kw)

    assert batching.image_sizes(split(sizes=np.asarray(hw)), progress=False).tolist() == [list(s) for s in hw]
    assert batching.image_sizes(split(image_hw=(5, 7)), progress=False).tolist() == [[5, 7]] * 3
    encoded = [{"image": _png(h, w)} for h, w in hw]
    assert batching.image_sizes(split(encoded=lambda: encoded), progress=False).tolist() == [
        list(s) for s in hw
    ]
    assert batching.image_sizes(split(), progress=False).tolist() == [list(s) for s in hw]  # decoded


def _cropped(sample: dict, h: int, w: int) -> dict:
    """A shapes sample cut to h x w, its boxes those of the objects left (at least 16 pixels)."""
    instances = sample["instances"][:h, :w]
    boxes, labels, kept = [], [], np.zeros_like(instances)
    for k, label in enumerate(sample["labels"], start=1):
        ys, xs = np.nonzero(instances == k)
        if len(ys) >= 16:
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(label)
            kept[instances == k] = len(boxes)
    return {
        "image": sample["image"][:h, :w],
        "mask": sample["mask"][:h, :w],
        "instances": kept,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, np.int32),
    }


def write_mixed_sizes(root, split: str, n: int, seed: int, sizes=((128, 128), (96, 128))) -> None:
    """A COCO folder (split ``split``) of ``n`` shapes images cut to ``sizes`` in turn."""
    samples = [_cropped(s, *sizes[i % len(sizes)]) for i, s in enumerate(make_shapes("test", n, seed))]
    write_coco_folder(samples, root / split)


def test_grouped_train_batches_one_shape_each_and_the_same_rows_in_every_process(tmp_path):
    write_mixed_sizes(tmp_path, "train", 12, 0, ((128, 128), (96, 128), (128, 96)))
    split = data.open_split("unused", "train", kind="detection", coco_folder=str(tmp_path))
    shapes = batching.detection_train_shapes(batching.image_sizes(split), 320, 640)
    order = batching.GroupedOrder.of(shapes, 4, seed=1)
    assert order.shapes == ((320, 320), (320, 448), (448, 320))
    tf = augment.DetectionTrainTransform(size=None, max_boxes=8, iou_crop=False, keep_ratio=(320, 640))
    kw = dict(start_step=0, num_steps=order.steps_per_epoch + 1, num_threads=1)
    whole = list(data.train_batches(split, order, tf, **kw))
    halves = [
        list(data.train_batches(split, order, tf, process_index=p, process_count=2, **kw)) for p in (0, 1)
    ]
    for step, (images, targets) in enumerate(whole):
        shape, records = order.batch(step)
        assert images.shape == (4, *shape, 3)
        resized = targets["image_size"]
        assert (resized <= np.asarray(shape)).all() and (resized == np.asarray(shape)).any()
        for i, (h, w) in enumerate(resized):  # padded with zeros below and right of each image
            assert not images[i, h:].any() and not images[i, :, w:].any()
        (a, ta), (b, tb) = halves[0][step], halves[1][step]
        np.testing.assert_array_equal(np.concatenate([a, b]), images)
        np.testing.assert_array_equal(np.concatenate([ta["boxes"], tb["boxes"]]), targets["boxes"])


def test_segmentation_eval_batches_at_each_images_own_size(tmp_path):
    write_mixed_sizes(tmp_path, "val", 5, 2)
    split = data.open_split("unused", "val", kind="segmentation", coco_folder=str(tmp_path))
    sizes = batching.image_sizes(split)
    tf = augment.SegmentationEvalTransform(resize=64, size=None)
    own = batching.segmentation_eval_shapes(sizes, 64)
    assert sorted({tuple(s) for s in own.tolist()}) == [(64, 64), (64, 85)]
    seen = []
    for images, masks, weights in data.eval_batches(split, tf, 2, shapes=own, num_threads=1):
        assert images.shape[1:3] == masks.shape[1:3]
        real = masks[weights > 0]
        assert (real != 255).all()  # every image at its own size: nothing padded, every pixel scored
        seen += [tuple(images.shape[1:3])] * int(weights.sum())
    assert sorted(seen) == sorted(map(tuple, own.tolist()))
    # Rounded up to 32: the padding is ignored (255).
    padded = batching.segmentation_eval_shapes(sizes, 64, 32)
    batches = list(data.eval_batches(split, tf, 2, shapes=padded, num_threads=1))
    images, masks, _ = next(b for b in batches if b[0].shape[1:3] == (64, 96))
    assert (masks[:, :, 85:] == 255).all() and (images[:, :, 85:] == 0).all()
    assert (masks[:, :, :85] != 255).all()
