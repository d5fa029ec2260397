"""Command-line entry points: ``mbv3-train``, ``mbv3-average``, ``mbv3-quantize`` and ``mbv3-plot``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.config import ConfigError, apply_overrides, available_configs, load_config


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


TRAIN_EPILOG = """\
Any configuration field can be overridden: --section.field=value (or --section.field value), e.g.
  mbv3-train --config digits --workdir runs/digits2 --optim.lr=0.004 --train.epochs=20
  mbv3-train --config torchvision --data.data_dir ~/tensorflow_datasets --mesh.fsdp=8
  mbv3-train --config digits --model.init weights.pth      (fine-tune from torchvision weights)
  mbv3-train --config qat --model.init mobilenet_v3_large.pth   (quantization-aware training)
Sections: model, qat, data, optim, train, mesh, checkpoint, distributed; top level: name, workdir,
tensorboard, plot. Re-running with the same --workdir resumes from its latest checkpoint; with other
hyperparameters than the run's config.json only given --allow-config-change (the old configuration is
appended to WORKDIR/config_history.jsonl). One mbv3-train at a time per workdir. A non-finite training
loss stops the run (exit status 1); its checkpoints all predate that step. So does a checkpoint that
cannot be written (disk full, read-only): the earlier ones are intact. Checkpoints are checked against
their recorded sha256 before a resume. With --data.image_folder ROOT (ROOT/train/<class>/*.jpg and
ROOT/val/<class>/*.jpg), the eval split is the folder's val (or validation, or test) whatever
data.eval_split says, when the folder lacks that one."""


def train_main(argv: list[str] | None = None) -> int:
    """``mbv3-train --config NAME_OR_FILE [--section.field=value ...]``."""
    from mbv3_jax import backend

    backend.set_cpu_xla_flags()
    parser = argparse.ArgumentParser(
        prog="mbv3-train",
        description="Train a MobileNetV3 classifier (sharded over all devices; resumes from --workdir).",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", default="torchvision", help=f"a configuration file, or one of {available_configs()}"
    )
    parser.add_argument("--print-config", action="store_true", help="print the configuration and exit")
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a workdir whose config.json has other hyperparameters (kept in config_history.jsonl)",
    )
    args, rest = parser.parse_known_args(argv)
    try:
        config = apply_overrides(load_config(args.config), rest)
    except ConfigError as e:
        return _err(str(e))
    if args.print_config:
        print(config.to_json())
        return 0
    from mbv3_jax.checkpoint_io import CheckpointIOError
    from train.data import DataError
    from train.trainer import TrainingDiverged, run

    try:
        result = run(config, allow_config_change=args.allow_config_change)
    except (TrainingDiverged, CheckpointIOError) as e:  # stopped mid-run: its earlier checkpoints kept
        _err(str(e))
        return 1
    except (DataError, FileNotFoundError, ValueError) as e:
        return _err(str(e))
    if "top1" in result:
        print(f"done: step {result['step']}, eval top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}")
    elif "miou" in result:
        print(
            f"done: step {result['step']}, eval mIoU {result['miou']:.4f}, "
            f"pixel accuracy {result['pixel_acc']:.4f}"
        )
    elif "map" in result:
        print(f"done: step {result['step']}, eval mAP {result['map']:.4f}, mAP@0.5 {result['map50']:.4f}")
    return 0


def average_main(argv: list[str] | None = None) -> int:
    """``mbv3-average WORKDIR --out DIR``: average the last N checkpoints that improved top-1."""
    parser = argparse.ArgumentParser(
        prog="mbv3-average",
        description="Average the weights (and BatchNorm statistics) of a run's last N checkpoints that "
        "improved eval top-1 (torchvision's recipe: N=3) and save a model mbv3_jax.load and "
        "porting.to_torchvision accept.",
    )
    parser.add_argument("workdir", help="the run's --workdir")
    parser.add_argument("--out", required=True, help="directory to write the averaged model to")
    parser.add_argument("-n", "--num", type=int, default=3, help="how many checkpoints (default 3)")
    parser.add_argument("--steps", type=int, nargs="+", help="average exactly these checkpoint steps instead")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it holds a model saved before (only that)"
    )
    args = parser.parse_args(argv)
    from mbv3_jax.checkpoint_io import CheckpointIOError
    from train.average import average_checkpoints

    try:
        out, steps = average_checkpoints(
            args.workdir, args.out, num=args.num, steps=args.steps, overwrite=args.overwrite
        )
    except (FileNotFoundError, FileExistsError, ValueError, CheckpointIOError) as e:
        return _err(str(e))
    print(f"averaged steps {steps} of {args.workdir} into {out}")
    return 0


def quantize_main(argv: list[str] | None = None) -> int:
    """``mbv3-quantize WORKDIR --out DIR [--pth FILE] [--eval]``: a QAT run -> the integer model."""
    parser = argparse.ArgumentParser(
        prog="mbv3-quantize",
        description="Convert a quantization-aware training run (mbv3-train --qat.enabled=true) to the "
        "integer model, as torch.ao.quantization.convert does: a JAX model (mbv3_jax.load) and, with --pth, "
        "torchvision's quantized state_dict.",
    )
    parser.add_argument("workdir", help="the QAT run's --workdir")
    parser.add_argument("--out", required=True, help="directory to write the JAX integer model to")
    parser.add_argument(
        "--pth", help="also write torchvision's converted quantized state_dict here (torch.save)"
    )
    parser.add_argument("--step", type=int, help="the checkpoint step to convert (default: the latest)")
    parser.add_argument(
        "--backend",
        default="qnnpack",
        choices=("qnnpack", "x86"),
        help="whose requantization rounding the "
        "integer model follows, and the engine torch runs --pth under (default qnnpack, as torchvision)",
    )
    parser.add_argument(
        "--eval",
        action="store_true",
        help="top-1 on the run's eval split: QAT model, JAX integer model and "
        "(with --pth) torchvision's quantized model loaded from that file",
    )
    parser.add_argument("--data-dir", help="TFDS data_dir for --eval (default: the run's)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it holds a model saved before (only that)"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from mbv3_jax.checkpoint_io import CheckpointIOError
    from train.data import DataError
    from train.quantize import quantize_run

    try:
        result = quantize_run(
            args.workdir,
            args.out,
            step=args.step,
            pth=args.pth,
            backend=args.backend,
            evaluate=args.eval,
            data_dir=args.data_dir,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (DataError, FileNotFoundError, FileExistsError, ValueError, CheckpointIOError) as e:
        return _err(str(e))
    print(f"converted step {result['step']} of {args.workdir}: integer model in {result['out']}")
    if result["pth"]:
        print(f"torchvision quantized state_dict: {result['pth']}")
    if "count" in result:
        line = (
            f"top-1 on {result['count']} eval images: QAT {result['top1_qat']:.4f}, "
            f"int8 (JAX) {result['top1_int8']:.4f}"
        )
        if "top1_torch" in result:
            line += (
                f", int8 (torchvision) {result['top1_torch']:.4f}; JAX and torch predictions differ on "
                f"{result['int8_torch_disagreements']}"
            )
        print(line)
    return 0


def plot_main(argv: list[str] | None = None) -> int:
    """``mbv3-plot WORKDIR [--out PNG] [--save-figures]``: loss, accuracy and learning-rate curves;
    with ``--save-figures`` also a segmentation or detection run's predictions next to the ground truth."""
    parser = argparse.ArgumentParser(prog="mbv3-plot", description="Draw a run's metrics.csv to a PNG.")
    parser.add_argument("workdir", help="the run's --workdir (or its metrics.csv)")
    parser.add_argument("--out", help="PNG path (default WORKDIR/metrics.png)")
    parser.add_argument(
        "--save-figures",
        action="store_true",
        help="also draw the latest checkpoint's predictions on the first eval images to "
        "WORKDIR/predictions.png (segmentation and detection runs)",
    )
    parser.add_argument("--data-dir", help="TFDS data_dir of the eval images (default: the run's)")
    args = parser.parse_args(argv)
    from train.metrics import plot_metrics

    path = Path(args.workdir)
    csv = path if path.suffix == ".csv" else path / "metrics.csv"
    try:
        out = plot_metrics(csv, args.out)
        print(f"wrote {out}")
        if args.save_figures:
            from train.figures import save_predictions

            print(f"wrote {save_predictions(csv.parent, data_dir=args.data_dir)}")
    except (FileNotFoundError, ValueError) as e:  # DataError is a ValueError
        return _err(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
