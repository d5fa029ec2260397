"""Pictures of what a run learned: a segmentation or detection run's predictions next to the ground
truth on its eval images (``mbv3-plot WORKDIR --save-figures``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from train import checkpointing

# Class colours of the masks drawn (background black; 255, ignored, white).
PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240]],
    np.uint8,
)


def workdir_model(workdir: str | os.PathLike, step: int | None = None) -> Any:
    """The model of a training run's checkpoint (the latest, or ``step``), in eval mode."""
    from mbv3_jax.checkpoint import read_architecture
    from mbv3_jax.models import build_from_architecture
    from train.average import set_model_state

    model = build_from_architecture(read_architecture(workdir))
    state, _, _ = checkpointing.restore_host(workdir, step)
    set_model_state(model, state["params"], state["batch_stats"])
    model.eval()
    return model


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours (classes past the palette wrap; 255 white)."""
    out = PALETTE[np.asarray(mask) % len(PALETTE)]
    out[np.asarray(mask) == 255] = 255
    return out


def _run_config(workdir: Path, kind: str | None) -> Any:
    """A run's TrainConfig; ``kind``: refuse a run of another task."""
    from train.config import config_from_dict
    from train.trainer import task_kind

    config = config_from_dict(json.loads((workdir / checkpointing.CONFIG_FILE).read_text()))
    if kind is not None and task_kind(config.model.name) != kind:
        raise ValueError(f"{workdir} trained {config.model.name}, not a {kind} model")
    return config


def _save(fig: Any, out: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def save_predictions(workdir: str | os.PathLike, data_dir: str | None = None) -> Path:
    """``WORKDIR/predictions.png`` for a segmentation or detection run."""
    from train.trainer import task_kind

    config = _run_config(Path(workdir), None)
    kind = task_kind(config.model.name)
    if kind == "segmentation":
        return segmentation_predictions(workdir, data_dir=data_dir)
    if kind == "detection":
        return detection_predictions(workdir, data_dir=data_dir)
    raise ValueError(
        f"{workdir} trained a classifier ({config.model.name}): --save-figures draws segmentation "
        "and detection predictions"
    )


def detection_predictions(
    workdir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    num_images: int = 6,
    step: int | None = None,
    data_dir: str | None = None,
    score_thresh: float = 0.3,
) -> Path:
    """A PNG of the first ``num_images`` eval images of a detection run: the ground-truth boxes and
    the checkpoint's detections scoring above ``score_thresh`` side by side, coloured by class (default
    ``WORKDIR/predictions.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train import data

    workdir = Path(workdir)
    d = _run_config(workdir, "detection").data
    label_key = "objects" if d.label_key == "label" else d.label_key
    split = data.open_split(
        d.dataset,
        d.eval_split,
        data_dir=data_dir or d.data_dir,
        image_key=d.image_key,
        label_key=label_key,
        kind="detection",
        coco_folder=d.coco_folder,
        coco_categories=d.coco_categories,
        coco_labels=d.coco_labels,
    )
    examples = [split.source[i] for i in range(min(num_images, len(split)))]
    images = [np.asarray(ex[split.image_key]) for ex in examples]
    model = workdir_model(workdir, step)
    detections = model([x.astype(np.float32) / 255.0 for x in images])
    fig, axes = plt.subplots(len(images), 2, figsize=(5, 2.5 * len(images)), squeeze=False)
    for row, (ex, image, det) in enumerate(zip(examples, images, detections, strict=True)):
        objects = ex[split.label_key]
        boxes = objects.get("boxes_xyxy")
        if boxes is None:
            boxes = data.tfds_to_xyxy(np.asarray(objects["bbox"]), *image.shape[:2])
        truth = (np.asarray(boxes), np.asarray(objects["label"]) + split.label_offset, None)
        keep = np.asarray(det["scores"]) > score_thresh
        predicted = (
            np.asarray(det["boxes"])[keep],
            np.asarray(det["labels"])[keep],
            np.asarray(det["scores"])[keep],
        )
        for ax, (boxes, labels, scores), title in zip(
            axes[row],
            (truth, predicted),
            ("ground truth", f"detections (score > {score_thresh})"),
            strict=True,
        ):
            ax.imshow(image)
            for j, ((x1, y1, x2, y2), label) in enumerate(zip(boxes, labels, strict=True)):
                color = PALETTE[int(label) % len(PALETTE)] / 255.0
                ax.add_patch(
                    plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color, linewidth=1.5)
                )
                if scores is not None:
                    ax.text(x1, y1, f"{scores[j]:.2f}", color=color, fontsize=6, va="bottom")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(out) if out else workdir / "predictions.png")


def segmentation_predictions(
    workdir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    num_images: int = 6,
    step: int | None = None,
    data_dir: str | None = None,
) -> Path:
    """A PNG of the first ``num_images`` eval images of a segmentation run: the image, the ground
    truth and the checkpoint's prediction side by side (default ``WORKDIR/predictions.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train import augment, data

    workdir = Path(workdir)
    d = _run_config(workdir, "segmentation").data
    split = data.open_split(
        d.dataset,
        d.eval_split,
        data_dir=data_dir or d.data_dir,
        image_key=d.image_key,
        label_key=d.label_key,
        kind="segmentation",
        coco_folder=d.coco_folder,
        coco_categories=d.coco_categories,
        coco_labels=d.coco_labels,
    )
    size = d.eval_crop if d.batch_shapes == "square" else None  # as the run evaluated
    transform = augment.SegmentationEvalTransform(d.eval_resize, size, tuple(d.mean), tuple(d.std))
    examples = [split.source[i] for i in range(min(num_images, len(split)))]
    pairs = [
        transform(np.asarray(ex[split.image_key]), np.asarray(ex[split.label_key])[..., 0]) for ex in examples
    ]
    model = workdir_model(workdir, step)
    predictions = [np.asarray(model(x[None])["out"][0]).argmax(-1) for x, _ in pairs]
    mean, std = np.asarray(d.mean), np.asarray(d.std)
    fig, axes = plt.subplots(len(pairs), 3, figsize=(7.5, 2.5 * len(pairs)), squeeze=False)
    for row, ((x, truth), pred) in enumerate(zip(pairs, predictions, strict=True)):
        shown = np.clip((x * std + mean) * 255.0, 0, 255).astype(np.uint8)
        pred = np.where(truth == 255, 255, pred)  # padding is not scored: shown as such
        for ax, picture, title in zip(
            axes[row],
            (shown, colorize(truth), colorize(pred)),
            ("image", "ground truth", "prediction"),
            strict=True,
        ):
            ax.imshow(picture)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    fig.tight_layout()
    return _save(fig, Path(out) if out else workdir / "predictions.png")
