"""Segmentation in the one trainer: ``mbv3-train`` on the synthetic shapes (``mbv3_shapes``) with
LR-ASPP: a few steps run, evaluate mIoU and pixel accuracy (torchvision's ConfusionMatrix over the
whole eval set), log them, and resume exactly; the segmentation transforms give static shapes.

Short runs (a few steps, batch 4, on one CPU device): the demo's figures come from
``mbv3-train --config shapes_seg`` (README)."""

from __future__ import annotations

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
    "--config",
    "shapes_seg",
    "--train.global_batch",
    "4",
    "--train.eval_batch",
    "50",
    "--train.log_every_steps",
    "1",
    "--train.progress",
    "false",
    "--checkpoint.async_save",
    "false",
    "--tensorboard",
    "false",
    "--plot",
    "false",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tfds"))
    data.open_split("mbv3_shapes", "train", data_dir=path, label_key="mask", kind="segmentation")  # prepared
    return path


def _run(workdir, data_dir: str, *extra: str) -> int:
    return train_main([*ARGS, "--workdir", str(workdir), "--data.data_dir", data_dir, *extra])


def test_trains_evaluates_and_resumes_exactly(tmp_path, data_dir):
    # Four steps with checkpoints at 2 and 4; then the run as a kill after step 2 leaves it (its step-4
    # checkpoint gone), resumed to 4.
    args = ["--train.max_steps", "4", "--train.eval_every_steps", "4", "--checkpoint.every_steps", "2"]
    args += ["--train.eval_at_start", "true"]
    assert _run(tmp_path / "straight", data_dir, *args) == 0
    rows = read_csv(tmp_path / "straight" / "metrics.csv")
    train = [r for r in rows if r["kind"] == "train"]
    untrained, evaluation = [r for r in rows if r["kind"] == "eval"]
    assert untrained["step"] == 0 and 0 <= untrained["miou"] < 1
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and 0 <= r["pixel_acc"] <= 1 for r in train)
    assert 0 < evaluation["miou"] < 1 and 0 < evaluation["pixel_acc"] < 1 and np.isfinite(evaluation["loss"])
    straight, meta, step = restore_host(tmp_path / "straight")
    assert step == 4 and meta["metrics"]["miou"] == evaluation["miou"]

    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    assert _run(tmp_path / "resumed", data_dir, *args) == 0
    resumed, _, _ = restore_host(tmp_path / "resumed")
    for a, b in zip(_leaves(straight["params"]), _leaves(resumed["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    resumed_rows = read_csv(tmp_path / "resumed" / "metrics.csv")
    assert _without_timing(resumed_rows) == _without_timing(rows)
    # The curves and the predictions next to the ground truth.
    assert plot_main([str(tmp_path / "straight"), "--save-figures", "--data-dir", data_dir]) == 0
    assert (tmp_path / "straight" / "predictions.png").stat().st_size > 10_000
    assert (tmp_path / "straight" / "metrics.png").is_file()


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_segmentation_transforms_give_static_shapes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (90, 120), dtype=np.uint8)
    train_tf = augment.SegmentationTrainTransform(base_size=64, crop=80)
    for seed in range(5):  # shorter side drawn in [32, 128]: crops pad when it is below 80
        x, m = train_tf(image, mask, np.random.default_rng(seed))
        assert (
            x.shape == (80, 80, 3) and x.dtype == np.float32 and m.shape == (80, 80) and m.dtype == np.int32
        )
        assert set(np.unique(m)) <= {0, 1, 2, 3, 255}
    eval_tf = augment.SegmentationEvalTransform(resize=60, size=96)
    x, m = eval_tf(image, mask)
    assert x.shape == (96, 96, 3) and m.shape == (96, 96)
    assert (m[60:] == 255).all() and (m[:, 80:] == 255).all()  # 90x120 -> 60x80, padded with 255
    assert set(np.unique(m[:60, :80])) <= {0, 1, 2, 3}  # nearest neighbour: only the mask's values
    with pytest.raises(ValueError, match="larger than the eval size 64"):
        augment.SegmentationEvalTransform(resize=60, size=64)(image, mask)


def test_segmentation_needs_a_mask_dataset(data_dir):
    with pytest.raises(
        data.DataError, match="not a segmentation dataset with an RGB image 'image' and a one"
    ):
        data.open_split("mbv3_shapes", "train", data_dir=data_dir, kind="segmentation", label_key="objects")


def test_one_device_eight_devices_and_two_processes_agree(tmp_path, data_dir):
    """Two steps and an eval of LR-ASPP on 1 device, on 8 simulated devices in one process and in 2
    processes x 4 devices (gloo collectives; data 4 x fsdp 2 in one process, data 8 across two: see
    layouts.py), each in subprocesses, float64 (measured 2.1e-11 and 2.6e-11):
    parameters, BatchNorm statistics and optimizer state agree to 1e-10 of each tensor's largest
    value (floored at 1e-3: the BatchNorm biases before a 1x1 conv and another BatchNorm have an
    exactly zero true gradient, so they hold only rounding noise, ~1e-19 here), and the eval metrics
    to 1e-9. Per-device BatchNorm statistics or a wrong gradient reduction would differ by O(1e-2)."""
    common = [
        *("--data.data_dir", data_dir, "--train.max_steps", "2", "--train.global_batch", "8"),
        *("--train.eval_batch", "104", "--mesh.fsdp_min_size", "1024", "--train.eval_at_start", "false"),
        *("--model.dtype", "float64", "--model.param_dtype", "float64"),
    ]
    runs = train_in_layouts([*ARGS, *common], tmp_path, steps=2)
    one, m1 = runs["one"]
    for name in ("eight", "two_processes"):
        other, m = runs[name]
        worst = worst_relative_difference(one, other)
        print(f"\n1 device vs {name}: max relative difference {worst:.2e}; mIoU {m1['miou']} vs {m['miou']}")
        assert worst <= 1e-10, name
        for key in ("miou", "pixel_acc", "loss"):
            assert m1[key] == pytest.approx(m[key], rel=1e-9, abs=1e-12), (name, key)
