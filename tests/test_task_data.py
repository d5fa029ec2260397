"""Detection / segmentation data: the synthetic shapes (deterministic, tight boxes, COCO and TFDS
round trips), the COCO folder reader's drops and refusals, and the static-shape helpers."""

import hashlib
import importlib.util
import json
import logging

import numpy as np
import pytest
from extras import needs_torch
from PIL import Image

from train.coco_data import (
    bucket_indices,
    default_buckets,
    load_coco_folder,
    pad_targets,
    resized_padded_size,
    size_bucket,
)
from train.data import DataError

needs_coco = pytest.mark.skipif(
    importlib.util.find_spec("pycocotools") is None,
    reason="COCO masks need pycocotools (pip install pycocotools)",
)
# pycocotools 2.0.11's decode warns under numpy 2 (its own __array__), not something this code does.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
needs_skimage = pytest.mark.skipif(
    importlib.util.find_spec("skimage") is None, reason="the shapes' backgrounds need scikit-image"
)

# sha256 of the first three training samples (image, boxes, mask bytes) for seed 0: the same on every
# machine. A change here changes the demo data set: bump the TFDS builder's VERSION with it.
SHAPES_SHA256 = "9a5ece71496353737478896ba880e45608507bafaf11058c99b45536e0836311"


def _digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        for key in ("image", "boxes", "mask"):
            h.update(np.ascontiguousarray(s[key]).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def shapes():
    from train.shapes_data import make_shapes

    return make_shapes("train", 24)


# --------------------------------------------------------------------------------------------------
# Synthetic shapes


@needs_skimage
def test_shapes_are_deterministic(shapes):
    from train.shapes_data import make_shapes

    again = make_shapes("train", 3)
    assert _digest(again) == _digest(shapes[:3]) == SHAPES_SHA256
    assert _digest(make_shapes("test", 3)) != SHAPES_SHA256  # the splits differ
    assert _digest(make_shapes("train", 3, seed=1)) != SHAPES_SHA256


@needs_skimage
def test_shapes_boxes_enclose_their_masks_tightly(shapes):
    for s in shapes:
        h, w = s["mask"].shape
        assert s["image"].shape == (h, w, 3) and s["image"].dtype == np.uint8
        assert s["boxes"].dtype == np.float32 and s["labels"].dtype == np.int32
        assert 1 <= len(s["labels"]) <= 4 and set(s["labels"].tolist()) <= {1, 2, 3}
        assert s["instances"].max() == len(s["labels"])
        for k, (box, label) in enumerate(zip(s["boxes"], s["labels"], strict=True), start=1):
            inst = s["instances"] == k
            rows, cols = np.flatnonzero(inst.any(1)), np.flatnonzero(inst.any(0))
            assert box.tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
            assert (s["mask"][inst] == label).all()
        assert ((s["mask"] > 0) == (s["instances"] > 0)).all()


@needs_skimage
@needs_coco
def test_shapes_coco_folder_round_trips(shapes, tmp_path):
    from train.shapes_data import CLASS_NAMES, write_coco_folder

    samples = shapes[:12]
    write_coco_folder(samples, tmp_path)
    data = load_coco_folder(tmp_path)  # file names are relative to images/: found there
    assert data.image_dir == tmp_path / "images" and len(data) == len(samples)
    assert data.class_names == CLASS_NAMES and data.num_classes == 4 and data.category_ids == (1, 2, 3)
    assert data.skipped == {
        "crowd": 0,
        "degenerate_boxes": 0,
        "invalid_polygons": 0,
        "images_without_annotations": 0,
        "annotations_of_other_categories": 0,
    }
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(data.images[i].boxes, s["boxes"])
        np.testing.assert_array_equal(data.images[i].labels, s["labels"])
        np.testing.assert_array_equal(data.read_image(i), s["image"])
        expected = np.stack([s["instances"] == k for k in range(1, len(s["labels"]) + 1)]).astype(np.uint8)
        np.testing.assert_array_equal(data.masks(i), expected)
        np.testing.assert_array_equal(data.semantic_mask(i), s["mask"])
    assert load_coco_folder(tmp_path, "images").image_dir == tmp_path / "images"
    with pytest.raises(DataError, match="overwrite=True"):
        write_coco_folder(samples, tmp_path)


@needs_skimage
def test_shapes_tfds_builder(tmp_path):
    from train.data import tfds_to_xyxy
    from train.shapes_data import SHAPES_SPLITS, make_shapes, shapes_builder

    builder = shapes_builder(tmp_path)
    assert {s: builder.info.splits[s].num_examples for s in SHAPES_SPLITS} == SHAPES_SPLITS
    source = builder.as_data_source(split="test")
    for j in (0, 1):
        ex = source[j]
        s = make_shapes("test", int(ex["index"]) + 1)[-1]
        np.testing.assert_array_equal(ex["image"], s["image"])
        np.testing.assert_array_equal(ex["mask"][..., 0], s["mask"])
        np.testing.assert_array_equal(tfds_to_xyxy(np.stack(ex["objects"]["bbox"]), 128, 128), s["boxes"])
        np.testing.assert_array_equal(np.asarray(ex["objects"]["label"]), s["labels"])


# --------------------------------------------------------------------------------------------------
# COCO folders: what is dropped, what is refused


def _folder(tmp_path, annotations, images=None, categories=None, write_images=True, size=(6, 8)):
    """A COCO folder: ``images`` default to two 6x8 (HxW) PNGs, ``categories`` to ids 3 and 7."""
    h, w = size
    images = images or [
        {"id": 1, "file_name": "a.png", "height": h, "width": w},
        {"id": 2, "file_name": "b.png", "height": h, "width": w},
    ]
    categories = categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    if write_images:
        for img in images:
            Image.fromarray(np.zeros((img["height"], img["width"], 3), np.uint8)).save(
                tmp_path / img["file_name"]
            )
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    return tmp_path


def _ann(aid, image_id, category_id, bbox, **extra):
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0, **extra}


def test_boxes_converted_clamped_and_degenerate_dropped(tmp_path, caplog):
    anns = [
        _ann(1, 1, 7, [1, 2, 3, 2]),  # kept: xyxy (1, 2, 4, 4)
        _ann(2, 1, 3, [-2, 4, 20, 5]),  # partly outside: clamped to (0, 4, 8, 6)
        _ann(3, 1, 3, [2, 2, 0, 3]),  # zero width: dropped
        _ann(4, 1, 3, [3, 3, -1, 2]),  # negative width: dropped
        _ann(5, 1, 3, [9, 1, 2, 2]),  # wholly right of the image: empty after clamping, dropped
        _ann(6, 2, 7, [0, 0, 8, 6], iscrowd=1),  # crowd: apart
    ]
    with caplog.at_level(logging.INFO, logger="train.coco_data"):
        data = load_coco_folder(_folder(tmp_path, anns))
    a, b = data.images
    np.testing.assert_array_equal(a.boxes, [[1, 2, 4, 4], [0, 4, 8, 6]])
    np.testing.assert_array_equal(a.labels, [2, 1])  # contiguous: category 3 -> 1, 7 -> 2
    np.testing.assert_array_equal(a.annotation_ids, [1, 2])
    assert b.boxes.shape == (0, 4) and b.labels.shape == (0,)
    np.testing.assert_array_equal(b.crowd_boxes, [[0, 0, 8, 6]])
    assert data.skipped["degenerate_boxes"] == 3 and data.skipped["crowd"] == 1
    assert "3 degenerate boxes" in caplog.text and "1 crowd" in caplog.text
    assert (
        data.class_names == ("background", "cat", "dog")
        and data.category_of(2) == 7
        and data.label_of(3) == 1
    )

    raw = load_coco_folder(tmp_path, labels="category_id")  # torchvision's COCO way: ids kept
    np.testing.assert_array_equal(raw.images[0].labels, [7, 3])
    assert raw.num_classes == 8 and raw.category_of(7) == 7


def test_images_without_annotations_skipped_with_the_flag(tmp_path, caplog):
    # Image 2 has only a 1-pixel-wide box (torchvision's training filter drops it too), image 5 none.
    images = [{"id": i, "file_name": f"{i}.png", "height": 6, "width": 8} for i in (1, 2, 5)]
    folder = _folder(tmp_path, [_ann(1, 1, 3, [1, 1, 3, 3]), _ann(2, 2, 3, [1, 1, 1, 4])], images=images)
    assert len(load_coco_folder(folder)) == 3  # kept by default (evaluation sees every image)
    with caplog.at_level(logging.INFO, logger="train.coco_data"):
        data = load_coco_folder(folder, remove_images_without_annotations=True)
    assert [img.id for img in data.images] == [1]
    assert data.skipped["images_without_annotations"] == 2 and "2 images without annotations" in caplog.text


def test_categories_kept_relabelled_and_the_segmentation_area_filter(tmp_path, caplog):
    # torchvision's segmentation reference on COCO: only some categories, labelled in the order given,
    # and training images with more than 1000 pixels of those annotations.
    cats = [{"id": c, "name": n} for c, n in ((1, "person"), (3, "car"), (5, "airplane"), (9, "boat"))]
    images = [{"id": i, "file_name": f"{i}.png", "height": 60, "width": 80} for i in (1, 2, 3)]
    anns = [
        _ann(1, 1, 5, [0, 0, 40, 30], area=1001.0),  # image 1: 1001 px of airplane
        _ann(2, 1, 9, [0, 0, 8, 6], area=20.0),  # a category left out
        _ann(3, 2, 1, [0, 0, 20, 20], area=400.0),  # image 2: 400 + 600 = 1000, not more
        _ann(4, 2, 3, [0, 0, 30, 20], area=600, iscrowd=1),  # crowd regions count, as torchvision's
        _ann(5, 3, 9, [0, 0, 80, 60], area=4800.0),  # image 3: only a category left out
    ]
    folder = _folder(tmp_path, anns, images=images, categories=cats)
    data = load_coco_folder(folder, categories=[5, 1, 3])
    assert data.class_names == ("background", "airplane", "person", "car")
    assert data.category_ids == (5, 1, 3) and data.category_of(1) == 5 and data.label_of(3) == 3
    np.testing.assert_array_equal(data.images[0].labels, [1])
    np.testing.assert_array_equal(data.images[1].crowd_labels, [3])
    assert data.images[2].labels.shape == (0,) and data.skipped["annotations_of_other_categories"] == 2
    with caplog.at_level(logging.INFO, logger="train.coco_data"):
        train = load_coco_folder(
            folder, categories=[5, 1, 3], remove_images_without_annotations=True, min_annotated_area=1000
        )
    assert [img.id for img in train.images] == [1] and train.skipped["images_without_annotations"] == 2
    assert "2 annotations of other categories" in caplog.text
    with pytest.raises(DataError, match=r"categories \[5, 7\] must be distinct ids .* not there: \[7\]"):
        load_coco_folder(folder, categories=[5, 7])


def test_malformed_json_is_refused_with_its_position(tmp_path):
    (tmp_path / "annotations.json").write_text('{"images": [\n  {"id": 1,, "file_name": "a.png"}]}')
    with pytest.raises(DataError, match=r"annotations\.json is not valid JSON: .* line 2 column 12"):
        load_coco_folder(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_coco_folder(tmp_path / "nowhere")


def test_unknown_category_is_refused(tmp_path):
    folder = _folder(tmp_path, [_ann(1, 1, 3, [1, 1, 2, 2]), _ann(42, 2, 99, [1, 1, 2, 2])])
    with pytest.raises(
        DataError, match=r"annotation 42 \(image b\.png\) has category_id 99, which is not in categories"
    ):
        load_coco_folder(folder)


def test_bad_annotations_are_refused(tmp_path):
    cases = [
        (_ann(8, 9, 3, [1, 1, 2, 2]), "annotation 8 is of image id 9"),
        (_ann(8, 1, 3, [1, 1, 2]), r"annotation 8 has bbox \[1, 1, 2\], expected 4 finite numbers"),
        ({"id": 8, "image_id": 1, "category_id": 3}, "annotation 8 has no 'bbox' field"),
    ]
    for ann, message in cases:
        with pytest.raises(DataError, match=message):
            load_coco_folder(_folder(tmp_path, [ann]))
    with pytest.raises(DataError, match="annotation id 4 appears twice"):
        load_coco_folder(_folder(tmp_path, [_ann(4, 1, 3, [1, 1, 2, 2]), _ann(4, 2, 3, [1, 1, 2, 2])]))


def test_missing_image_files_are_refused_by_name_and_count(tmp_path):
    images = [{"id": i, "file_name": f"img{i}.png", "height": 6, "width": 8} for i in range(1, 9)]
    _folder(tmp_path, [], images=images, write_images=False)
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "img3.png")
    missing = (
        r"names 7 image file\(s\) missing from .*: img1\.png, img2\.png, img4\.png, img5\.png, img6\.png "
    )
    missing += r"\.\.\.$"  # the first five named, the rest counted
    with pytest.raises(DataError, match=missing):
        load_coco_folder(tmp_path)


@needs_coco
def test_masks_rle_polygons_and_size_checks(tmp_path):
    from pycocotools import mask as coco_mask

    m = np.zeros((6, 8), np.uint8)
    m[1:4, 2:6] = 1
    compressed = coco_mask.encode(np.asfortranarray(m))
    compressed["counts"] = compressed["counts"].decode()
    counts, run, value = [], 0, 0  # uncompressed RLE, as COCO's crowd annotations: runs from 0s
    for v in m.flatten(order="F"):
        if v != value:
            counts, run, value = counts + [run], 0, v
        run += 1
    counts.append(run)
    assert (coco_mask.decode(coco_mask.frPyObjects({"size": [6, 8], "counts": counts}, 6, 8)) == m).all()
    anns = [
        _ann(1, 1, 3, [2, 1, 4, 3], segmentation=compressed),
        _ann(2, 1, 7, [2, 1, 4, 3], segmentation=[[2, 1, 6, 1, 6, 4, 2, 4], [0, 0, 1, 1]]),  # 2nd: no polygon
        _ann(3, 2, 7, [0, 0, 8, 6], segmentation={"size": [6, 8], "counts": counts}, iscrowd=1),
        _ann(4, 2, 3, [0, 0, 2, 2]),  # no segmentation: an empty mask
    ]
    data = load_coco_folder(_folder(tmp_path, anns))
    assert data.skipped["invalid_polygons"] == 1
    np.testing.assert_array_equal(data.masks(0), np.stack([m, m]))
    sem = data.semantic_mask(0)
    assert (sem[m == 1] == 255).all() and (sem[m == 0] == 0).all()  # overlapping instances: 255
    np.testing.assert_array_equal(data.masks(1), np.zeros((1, 6, 8), np.uint8))
    np.testing.assert_array_equal(data.semantic_mask(1), m * 2)  # the crowd region, label 2

    wrong = dict(compressed, size=[5, 8])
    message = r"annotation 1 has an RLE mask of size \[5, 8\] \(HxW\) but its image a\.png \(id 1\) is 6x8"
    with pytest.raises(DataError, match=message):
        load_coco_folder(_folder(tmp_path, [_ann(1, 1, 3, [2, 1, 4, 3], segmentation=wrong)]))


def test_image_whose_size_differs_from_the_json_is_refused(tmp_path):
    folder = _folder(tmp_path, [_ann(1, 1, 3, [1, 1, 2, 2])])
    Image.fromarray(np.zeros((5, 8, 3), np.uint8)).save(folder / "b.png")
    data = load_coco_folder(folder)
    assert data.read_image(0).shape == (6, 8, 3)
    with pytest.raises(
        DataError, match=r"b\.png is 5x8 \(HxW\) but .*annotations\.json says 6x8 for image id 2"
    ):
        data.read_image(1)


# --------------------------------------------------------------------------------------------------
# Static shapes


def test_pad_targets_static_shape_and_refusal(caplog):
    boxes = np.array([[0, 0, 2, 2], [1, 1, 3, 4], [2, 2, 5, 5]], np.float32)
    labels = np.array([1, 2, 3])
    b, lab, valid = pad_targets(boxes, labels, 5)
    assert b.shape == (5, 4) and lab.shape == (5,) and valid.shape == (5,)
    assert b.dtype == np.float32 and lab.dtype == np.int32 and valid.dtype == bool
    np.testing.assert_array_equal(b[:3], boxes)
    assert valid.tolist() == [True] * 3 + [False] * 2 and lab.tolist() == [1, 2, 3, 0, 0] and not b[3:].any()
    empty = pad_targets(np.zeros((0, 4)), np.zeros((0,)), 2)
    assert empty[0].shape == (2, 4) and not empty[2].any()
    with pytest.raises(DataError, match=r"img7 has 3 boxes, more than max_boxes=2"):
        pad_targets(boxes, labels, 2, name="img7")
    with caplog.at_level(logging.WARNING, logger="train.coco_data"):
        b, lab, valid = pad_targets(boxes, labels, 2, truncate=True, name="img7")
    assert valid.all() and lab.tolist() == [1, 2] and "img7: kept 2 of 3 boxes" in caplog.text


def test_size_buckets():
    assert resized_padded_size(480, 640) == (800, 1088)  # COCO's usual 4:3: 800x1066, padded
    assert resized_padded_size(100, 1000) == (160, 1344)  # the longer side capped at 1333
    buckets = default_buckets()
    assert buckets == [(800, 800), (800, 1088), (1088, 800), (800, 1344), (1344, 800)]
    assert size_bucket(480, 640, buckets) == (800, 1088)
    assert size_bucket(640, 480, buckets) == (1088, 800)
    assert size_bucket(500, 500, buckets) == (800, 800)
    assert size_bucket(300, 800, buckets) == (800, 1344)
    small = [(320, 320), (320, 448)]
    assert size_bucket(128, 128, small, min_size=320, max_size=640) == (320, 320)
    with pytest.raises(DataError, match=r"img of 100x300 \(HxW\) resizes and pads to 320x960, which none"):
        size_bucket(100, 300, small, min_size=320, max_size=1000, name="img")
    with pytest.raises(ValueError, match="positive multiples of 32"):
        size_bucket(10, 10, [(800, 810)])
    groups = bucket_indices([(480, 640), (500, 500), (427, 640), (640, 480)], buckets)
    assert groups == {(800, 1088): [0], (800, 800): [1], (800, 1344): [2], (1088, 800): [3]}  # 427x640: 3:2


@needs_torch
def test_resized_padded_size_matches_torchvision():
    import torch
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    t = GeneralizedRCNNTransform(800, 1333, [0.0] * 3, [1.0] * 3)
    t.eval()
    for h, w in [(480, 640), (427, 640), (333, 500), (100, 1000), (640, 359)]:
        out = t([torch.zeros(3, h, w)])[0]
        assert tuple(out.tensors.shape[-2:]) == resized_padded_size(h, w), (h, w)
