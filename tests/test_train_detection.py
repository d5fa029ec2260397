"""Detection in the one trainer: ``mbv3-train`` on the synthetic shapes (``mbv3_shapes``) with SSDlite320:
a few steps run with static shapes (one compilation of the train step and one of the eval step),
evaluate COCO mAP over the eval images (written as a COCO results JSON), log it, and resume exactly;
the detection transforms keep boxes and images consistent.

Short runs (a few steps, batch 4, 20 eval images, on one CPU device): the demo's figures come from
``mbv3-train --config shapes_det`` (README)."""

from __future__ import annotations

import json
import logging
import shutil

import jax
import numpy as np
import pytest
from layouts import train_in_layouts, worst_relative_difference

from train import augment, data
from train.checkpointing import restore_host
from train.cli import plot_main, train_main
from train.metrics import TIMING_COLUMNS, read_csv

ARGS = [
    *("--config", "shapes_det", "--train.global_batch", "4", "--train.eval_batch", "10"),
    *("--data.eval_split", "test[:20]", "--train.log_every_steps", "1", "--train.progress", "false"),
    *("--checkpoint.async_save", "false", "--tensorboard", "false", "--plot", "false"),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tfds"))
    data.open_split("mbv3_shapes", "train", data_dir=path, label_key="objects", kind="detection")  # prepared
    return path


def _run(workdir, data_dir: str, *extra: str) -> int:
    return train_main([*ARGS, "--workdir", str(workdir), "--data.data_dir", data_dir, *extra])


class _Compilations(logging.Handler):
    """Counts jax's "Compiling jit(<name>)" log records (``jax_log_compiles``)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Compiling jit("):
            self.names.append(message[len("Compiling jit(") :].split(")")[0])


def test_trains_evaluates_and_resumes_exactly(tmp_path, data_dir):
    # Four steps with checkpoints at 2 and 4; then the run as a kill after step 2 leaves it (its step-4
    # checkpoint gone), resumed to 4.
    args = ["--train.max_steps", "4", "--train.eval_every_steps", "4", "--checkpoint.every_steps", "2"]
    args += ["--train.eval_at_start", "true", "--model.trainable_backbone_layers", "3"]
    compilations = _Compilations()
    logger = logging.getLogger("jax")
    logger.addHandler(compilations)
    try:
        with jax.log_compiles(True):
            assert _run(tmp_path / "straight", data_dir, *args) == 0
    finally:
        logger.removeHandler(compilations)
    # Each example's boxes differ in number and RandomIoUCrop's crops in size: padding and the fixed
    # resize give every batch one shape, so 4 train steps and 2 evaluations compile once each.
    assert compilations.names.count("train_step") == 1, compilations.names
    assert compilations.names.count("eval_step") == 1, compilations.names

    rows = read_csv(tmp_path / "straight" / "metrics.csv")
    train = [r for r in rows if r["kind"] == "train"]
    untrained, evaluation = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and 0 < r["box_loss"] < r["loss"] for r in train)
    for row in (untrained, evaluation):
        assert 0 <= row["map"] <= row["map50"] <= 1
    results = json.loads((tmp_path / "straight" / "detections.json").read_text())
    assert {r["image_id"] for r in results} <= set(range(20)) and len(results) > 20
    assert all(len(r["bbox"]) == 4 and r["category_id"] in (1, 2, 3) for r in results)
    # Boxes in the original 128x128 frame (the model sees 320x320).
    assert max(r["bbox"][0] + r["bbox"][2] for r in results) <= 128 + 1e-3
    straight, meta, step = restore_host(tmp_path / "straight")
    assert step == 4 and meta["metrics"]["map"] == evaluation["map"] and meta["metrics"]["count"] == 20
    # trainable_backbone_layers 3: the backbone's features 0..6 (before its last 3 stages) stay as they
    # were (no update, no weight decay); the rest trains.
    at_2, _, _ = restore_host(tmp_path / "straight", 2)
    for i, layer in straight["params"]["backbone"]["features"].items():
        before = at_2["params"]["backbone"]["features"][i]
        pairs = zip(jax.tree.leaves(layer), jax.tree.leaves(before), strict=True)
        unchanged = [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs]
        assert all(unchanged) if int(i) < 7 else not all(unchanged), i

    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    assert _run(tmp_path / "resumed", data_dir, *args) == 0
    resumed, _, _ = restore_host(tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    resumed_rows = read_csv(tmp_path / "resumed" / "metrics.csv")
    assert _without_timing(resumed_rows) == _without_timing(rows)
    # The curves and the detections next to the ground truth.
    assert plot_main([str(tmp_path / "straight"), "--save-figures", "--data-dir", data_dir]) == 0
    assert (tmp_path / "straight" / "predictions.png").stat().st_size > 10_000


def test_faster_rcnn_batches_of_one_shape_compile_once_per_shape(tmp_path):
    """Faster R-CNN keeps each image's aspect ratio: 128x128 and 96x128 images train in batches of one
    bucket each (320x320 and 320x448) and evaluate at their own resized size padded to 32 (320x320,
    320x448): two compilations of each step, however many steps; the detections come back in each
    image's own frame."""
    from test_batching import write_mixed_sizes

    write_mixed_sizes(tmp_path / "coco", "train", 8, 0)
    write_mixed_sizes(tmp_path / "coco", "val", 4, 1)
    args = [
        *(
            "--model.name",
            "fasterrcnn_mobilenet_v3_large_320_fpn",
            "--data.coco_folder",
            str(tmp_path / "coco"),
        ),
        *("--data.eval_split", "val", "--train.global_batch", "2", "--train.eval_batch", "2"),
        *("--train.max_steps", "4", "--train.eval_every_steps", "4", "--data.shuffle", "false"),
    ]
    compilations = _Compilations()
    logger = logging.getLogger("jax")
    logger.addHandler(compilations)
    try:
        with jax.log_compiles(True):
            assert train_main([*ARGS, *args, "--workdir", str(tmp_path / "run")]) == 0
    finally:
        logger.removeHandler(compilations)
    assert compilations.names.count("train_step") == 2, compilations.names
    assert compilations.names.count("eval_step") == 2, compilations.names
    results = json.loads((tmp_path / "run" / "detections.json").read_text())
    heights = {r["image_id"]: (96 if r["image_id"] % 2 == 0 else 128) for r in results}  # ids from 1
    assert results and all(r["bbox"][1] + r["bbox"][3] <= heights[r["image_id"]] + 1e-3 for r in results)


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


def test_random_iou_crop_keeps_the_boxes_whose_centre_it_holds():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (100, 160, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 40, 30], [60, 50, 150, 95], [120, 5, 130, 20]], np.float32)
    labels = np.array([1, 2, 3])
    cropped = 0
    for seed in range(40):
        out, kept, kept_labels = augment.random_iou_crop(np.random.default_rng(seed), image, boxes, labels)
        h, w = out.shape[:2]
        if (h, w) == image.shape[:2]:
            continue
        cropped += 1
        assert 0 < len(kept) <= 3 and len(kept) == len(kept_labels)
        assert 0.3 * 160 - 1 <= w and 0.3 * 100 - 1 <= h and 0.5 <= w / h <= 2
        assert (kept[:, [0, 1]] >= 0).all() and (kept[:, 2] <= w).all() and (kept[:, 3] <= h).all()
        assert (kept[:, 2] > kept[:, 0]).all() and (kept[:, 3] > kept[:, 1]).all()
    assert cropped > 10
    empty = np.zeros((0, 4), np.float32)
    out, kept, _ = augment.random_iou_crop(rng, image, empty, np.zeros(0, int))
    assert out is image and kept.shape == (0, 4)


def test_detection_transforms_give_static_shapes_and_matching_boxes():
    image = np.zeros((64, 128, 3), np.uint8)
    image[16:32, 96:128] = 255  # a white box at x 96..128, y 16..32
    boxes, labels = np.array([[96, 16, 128, 32]], np.float32), np.array([2])
    train_tf = augment.DetectionTrainTransform(size=32, max_boxes=4, iou_crop=False, hflip=True)
    flips = 0
    for seed in range(8):
        x, t = train_tf(image, boxes, labels, np.random.default_rng(seed))
        assert x.shape == (32, 32, 3) and x.dtype == np.float32
        assert t["boxes"].shape == (4, 4) and t["valid"].tolist() == [True, False, False, False]
        assert t["labels"][0] == 2
        x1, y1, x2, y2 = t["boxes"][0]
        flipped = x1 == 0
        flips += flipped
        np.testing.assert_allclose(t["boxes"][0], [0, 8, 8, 16] if flipped else [24, 8, 32, 16])
        # The white pixels are inside the box (resized 128x64 -> 32x32: x / 4, y / 2).
        white = np.argwhere(x[..., 0] > 0.99)
        assert white[:, 1].min() >= x1 and white[:, 1].max() < x2
        assert white[:, 0].min() >= y1 and white[:, 0].max() < y2
    assert 0 < flips < 8
    eval_tf = augment.DetectionEvalTransform(size=32, max_boxes=2)
    x, t = eval_tf(image, boxes, labels, np.array([True]))
    assert x.shape == (32, 32, 3) and t["size"].tolist() == [64, 128]
    np.testing.assert_array_equal(t["boxes"][0], boxes[0])  # the ground truth stays in the original frame
    assert t["crowd"].tolist() == [True, False]
    with pytest.raises(data.DataError, match="test image 7 has 3 boxes, more than max_boxes=2"):
        eval_tf(image, np.tile(boxes, (3, 1)), np.array([1, 1, 1]), np.zeros(3, bool), name="test image 7")


def test_faster_rcnn_transform_keeps_the_aspect_ratio_and_pads():
    # Faster R-CNN 320's resize: the shorter side to 320 unless the longer passes 640; padded to 640.
    image = np.full((100, 250, 3), 255, np.uint8)
    boxes, labels = np.array([[50, 10, 100, 60]], np.float32), np.array([1])
    kw = dict(size=640, max_boxes=2, keep_ratio=(320, 640))
    x, t = augment.DetectionTrainTransform(iou_crop=False, hflip=False, **kw)(
        image, boxes, labels, np.random.default_rng(0)
    )
    assert x.shape == (640, 640, 3) and t["image_size"].tolist() == [256, 640]  # 640 / 250 = 2.56
    assert (x[:256] == 1.0).all() and (x[256:] == 0).all()  # normalized white, then zero padding
    np.testing.assert_allclose(t["boxes"][0], boxes[0] * 2.56, rtol=1e-6)
    x, t = augment.DetectionEvalTransform(**kw)(image, boxes, labels, np.zeros(1, bool))
    assert t["image_size"].tolist() == [256, 640] and t["size"].tolist() == [100, 250]
    np.testing.assert_array_equal(t["boxes"][0], boxes[0])


def test_detection_needs_an_objects_dataset(data_dir):
    with pytest.raises(
        data.DataError, match="not a detection dataset with an image 'image' and objects 'mask"
    ):
        data.open_split("mbv3_shapes", "train", data_dir=data_dir, kind="detection", label_key="mask")


def test_one_device_and_two_processes_agree(tmp_path, data_dir):
    """Two float64 steps and an eval of SSDlite on 1 device and on 2 processes x 2 devices (data 4:
    batch-sharded detection targets, detections gathered from both processes; see layouts.py for
    fsdp): parameters, BatchNorm statistics and optimizer state agree to 1e-10 of each tensor's
    largest value, floored at 1 (measured 4.5e-12; with fsdp 2, 5.0e-12, and 1.5e-11 on 2 x 4
    devices). The floor: BatchNorm biases before another
    BatchNorm have an exactly zero true gradient, so their RMSProp trace holds only rounding noise
    divided by eps (~1e-13 here, which the segmentation test's floor of 1e-3 would count as 1e-10).
    2 x 2 devices, not 2 x 4, and 4 eval images keep the two float64 SSDlite processes within the CI
    machine's memory beside the other test worker; the 8 devices of one process are the segmentation
    and classification tests' (the same trainer core).

    The detections agree as far as a random detector's can: its boxes overlap densely, so rounding
    at 1e-11 flips a few NMS decisions near the IoU threshold (measured with 2 x 4 devices: 1 of
    2,362 detections of 8 images, 2 of 7,137 on 24), and the mAP moves with each (measured 3.3e-4
    relative; 1.3e-3 on these 4 images, the same 1,200 detections in number, with fsdp 1 or 2).
    Asserted: detection counts within 0.5%, mAP within 1% (half the detections lost would move it by
    tens of %)."""
    common = [
        *("--data.data_dir", data_dir, "--train.max_steps", "2", "--train.global_batch", "4"),
        *("--train.eval_batch", "4", "--data.eval_split", "test[:4]", "--mesh.fsdp_min_size", "1024"),
        *("--train.eval_at_start", "false", "--model.dtype", "float64", "--model.param_dtype", "float64"),
    ]
    runs = train_in_layouts([*ARGS, *common], tmp_path, 2, ("one", "two_processes"), process_devices=2)
    (one, m1), (other, m2) = runs["one"], runs["two_processes"]
    worst = worst_relative_difference(one, other, floor=1.0)
    counts = [len(json.loads((tmp_path / name / "detections.json").read_text())) for name in runs]
    print(f"\n1 device vs 2 processes: max relative difference {worst:.2e}; mAP {m1['map']} vs {m2['map']}")
    print(f"detections {counts}")
    assert worst <= 1e-10
    assert abs(counts[0] - counts[1]) <= 5e-3 * counts[0]
    for key in ("map", "map50", "map75"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-2), key


def test_coco_folder_split_keeps_the_files_ids(tmp_path):
    """A COCO-format folder (``--data.coco_folder``) as a detection split: its sparse category ids
    become labels 1..K, eval batches carry the file's image ids, and the results JSON the run writes
    names the file's image and category ids again; for segmentation it yields semantic masks."""
    from train.shapes_data import make_shapes, write_coco_folder
    from train.tasks import Detection

    root = tmp_path / "coco"
    write_coco_folder(make_shapes("test", 3), root / "val")
    ann_path = root / "val" / "annotations.json"
    coco = json.loads(ann_path.read_text())
    for image in coco["images"]:
        image["id"] += 100
    for ann in coco["annotations"]:
        ann["image_id"] += 100
        ann["category_id"] *= 10
    for cat in coco["categories"]:
        cat["id"] *= 10
    ann_path.write_text(json.dumps(coco))

    split = data.open_split("unused", "val", kind="detection", coco_folder=str(root))
    assert (len(split), split.num_classes, split.category_ids) == (3, 4, (10, 20, 30))
    with pytest.raises(data.DataError, match="has no split 'validation'.*splits found: \\['val'\\]"):
        data.open_split("unused", "validation", kind="detection", coco_folder=str(root))
    transform = augment.DetectionEvalTransform(size=64, max_boxes=8)
    images, targets, weights = next(data.eval_batches(split, transform, 4))
    assert targets["image_id"].tolist()[:3] == [101, 102, 103] and weights.tolist() == [1, 1, 1, 0]
    first = coco["annotations"][0]
    x, y, w, h = first["bbox"]
    np.testing.assert_allclose(targets["boxes"][0, 0], [x, y, x + w, y + h])
    assert targets["labels"][0, 0] == first["category_id"] // 10

    # Detections = the ground truth itself, in the 64 px input frame: mAP 1, written with the file's ids.
    n, scale = len(weights), np.float32(64 / 128)
    sums = dict(targets, weights=weights)
    sums["det_boxes"] = targets["boxes"] * scale
    sums["det_scores"] = np.where(targets["valid"], 0.9, 0.0)
    sums["det_labels"] = targets["labels"]
    sums["det_num_detections"] = targets["valid"].sum(1)
    assert n == 4
    metrics = Detection(4, split.category_ids).finalize(sums, tmp_path / "detections.json")
    assert metrics["map"] == pytest.approx(1.0) and metrics["count"] == 3
    results = json.loads((tmp_path / "detections.json").read_text())
    assert {r["image_id"] for r in results} == {101, 102, 103}
    assert {r["category_id"] for r in results} <= {10, 20, 30}

    # --data.coco_labels category_id: the file's ids are the labels (torchvision's 91-class COCO head).
    raw = data.open_split("unused", "val", kind="detection", coco_folder=str(root), coco_labels="category_id")
    assert (raw.num_classes, raw.category_ids) == (31, None)
    _, raw_targets, _ = next(data.eval_batches(raw, transform, 4))
    np.testing.assert_array_equal(raw_targets["labels"], targets["labels"] * 10)

    seg = data.open_split("unused", "val", kind="segmentation", coco_folder=str(root))
    mask = seg.source[0]["mask"]
    assert mask.shape == (128, 128, 1) and set(np.unique(mask)) <= {0, 1, 2, 3}
    # Some categories only, in the order given (--data.coco_categories).
    kw = dict(kind="segmentation", coco_folder=str(root), coco_categories=(30, 10))
    two = data.open_split("unused", "val", **kw)
    assert two.num_classes == 3 and two.category_ids == (30, 10)
    assert set(np.unique(two.source[0]["mask"])) <= {0, 1, 2}
    with pytest.raises(data.DataError, match="coco_labels describe a --data.coco_folder"):
        data.open_split("mbv3_shapes", "test", kind="segmentation", coco_categories=(30, 10))
