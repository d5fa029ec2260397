"""What a run writes for people to watch: metrics.csv, TensorBoard events, and loss/accuracy plots."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

COLUMNS = [
    "step",
    "epoch",
    "kind",
    "loss",
    "lr",
    "top1",
    "top5",
    "ema_top1",
    "ema_top5",
    "miou",
    "pixel_acc",
    "ema_miou",
    "map",
    "map50",
    "map75",
    "box_loss",
    "ema_map",
    "images_per_s",
    "time_s",
]
# Columns whose values depend on the machine's speed, not on the computation.
TIMING_COLUMNS = ("images_per_s", "time_s")


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.csv with numbers parsed (empty cells are absent)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = {}
            for k, v in row.items():
                if v in ("", None):
                    continue
                if k == "kind":
                    parsed[k] = v
                elif k == "step":
                    parsed[k] = int(v)
                else:
                    parsed[k] = float(v)
            rows.append(parsed)
    return rows


class MetricsWriter:
    """Appends rows to ``workdir/metrics.csv`` and scalars to TensorBoard (``workdir/tensorboard``).

    ``resume_step``: rows after it (written by a run that was killed before its next checkpoint) are
    dropped, and TensorBoard purges events after it, so a resumed run's logs equal an uninterrupted one's.
    """

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(workdir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_csv(self.path) if r["step"] <= resume_step] if self.path.exists() else []
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            for row in kept:
                writer.writerow({k: _fmt(v) for k, v in row.items()})
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 - kept open for the run
        self._csv = csv.DictWriter(self._file, COLUMNS)
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # pragma: no cover - part of the train extra
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(
                    str(Path(workdir) / "tensorboard"), purge_step=resume_step if resume_step else None
                )

    def write(self, row: dict[str, Any]) -> None:
        self._csv.writerow({k: _fmt(v) for k, v in row.items() if k in COLUMNS})
        self._file.flush()
        if self._tb is not None:
            kind = row["kind"]
            for k, v in row.items():
                if k not in ("step", "epoch", "kind", "time_s") and v is not None and not _nan(v):
                    self._tb.add_scalar(f"{kind}/{k}", float(v), row["step"])
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # round-trips exactly
    return str(v)


def plot_metrics(csv_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw train loss, learning rate and eval top-1/top-5 (segmentation: mIoU, pixel accuracy)
    against the epoch to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} does not exist (is it a run's workdir?)")
    rows = read_csv(csv_path)
    train = [r for r in rows if r.get("kind") == "train" and "loss" in r]
    evals = [r for r in rows if r.get("kind") == "eval" and ("top1" in r or "miou" in r or "map" in r)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if train:
        ax.plot([r["epoch"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["epoch"] for r in evals], [r.get("loss", math.nan) for r in evals], "o-", label="eval")
    ax.set(title="loss", xlabel="epoch")
    ax.legend()
    ax = axes[1]
    curves = (("top1", "top-1"), ("top5", "top-5"), ("ema_top1", "EMA top-1"))
    curves += (("miou", "mIoU"), ("pixel_acc", "pixel accuracy"), ("ema_miou", "EMA mIoU"))
    curves += (("map", "mAP"), ("map50", "mAP@0.5"), ("ema_map", "EMA mAP"))
    for key, label in curves:
        pts = [(r["epoch"], r[key]) for r in evals if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=label)
    ax.set(title="eval metrics", xlabel="epoch", ylim=(0, 1))
    ax.grid(alpha=0.3)
    if evals:
        ax.legend()
    ax = axes[2]
    if train:
        ax.plot([r["epoch"] for r in train], [r["lr"] for r in train])
    ax.set(title="learning rate", xlabel="epoch")
    fig.tight_layout()
    out = Path(out) if out else csv_path.with_name("metrics.png")
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out)
    return out
