"""``mbv3-export``: a saved model, a training run or a torchvision checkpoint to StableHLO, LiteRT
(.tflite), ONNX or a TF SavedModel, optionally checked against the JAX model in the artifact's runtime."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".safetensors")


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def _source(args: argparse.Namespace) -> Any:
    """The model to export: a torchvision checkpoint converted with porting (needs torch), a training
    run's checkpoint, else the path itself (an mbv3_jax.save directory, read by mbv3_jax.export)."""
    path = Path(args.source)
    if path.suffix not in TORCH_SUFFIXES:
        if args.builder:
            raise ValueError(
                f"--builder applies to torchvision checkpoints ({', '.join(TORCH_SUFFIXES)}) only"
            )
        if (path / "checkpoints").is_dir() and (path / "architecture.json").is_file():
            return _workdir_model(path, args.step)
        if args.step is not None:
            raise ValueError("--step applies to a mbv3-train workdir only")
        return path
    if not args.builder:
        raise ValueError(f"{path} is a torchvision checkpoint: name its builder with --builder NAME")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        from porting import load_torchvision
    except ModuleNotFoundError as e:
        raise ImportError(
            f"converting a torchvision checkpoint needs the 'torch' extra ({e.name} is missing): "
            "pip install -e '.[torch]', or export a model saved with mbv3_jax.save"
        ) from None
    return load_torchvision(args.builder, str(path), progress=False)


def _workdir_model(workdir: Path, step: int | None) -> Any:
    """The model of a training run's checkpoint (the latest, or ``step``), in eval mode."""
    from train.figures import workdir_model

    return workdir_model(workdir, step)


def _check(path: Path, model: Any, info: dict[str, Any], seed: int = 0) -> dict[str, float]:
    """Run the artifact in its runtime and the JAX model on one random normalized batch; print and
    return the max error relative to max |JAX output| per output."""
    from mbv3_jax import export as ex

    shape = [1 if d == "b" else d for d in info["input"]["shape"]]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    got = ex.run(path, x)
    want = ex.reference(model, x, head_only="postprocess" in info)
    errors = ex.max_relative_error(got, want)
    if info["family"] == "int8_classifier":
        # LiteRT's integer kernels round some ops differently: differences in output steps.
        step = float(model.classifier_out.scale[...])
        steps = np.max(np.abs(got["logits"] - want["logits"])) / step
        same = np.array_equal(got["logits"].argmax(-1), want["logits"].argmax(-1))
        print(f"  check logits: max |artifact - JAX| = {steps:.0f} steps of {step:.4g}; top-1 equal: {same}")
        return errors
    for name, err in errors.items():
        print(f"  check {name}: max |artifact - JAX| / max |JAX| = {err:.2e}")
    return errors


def export_main(argv: list[str] | None = None) -> int:
    """``mbv3-export SOURCE --format FMT --out PATH``."""
    from mbv3_jax import export as ex

    parser = argparse.ArgumentParser(
        prog="mbv3-export",
        description="Export a model off JAX. SOURCE: a directory written by mbv3_jax.save, a mbv3-train "
        "workdir (latest checkpoint, or --step), or a torchvision checkpoint (.pth / .safetensors, with "
        "--builder). The artifact takes a normalized float32 NHWC batch at a fixed size (default: the "
        "model's eval size: 224 classifiers, 520 segmentation, 320 SSDlite, min_size squared Faster R-CNN, "
        "which also takes each image's resized size as image_sizes); a JSON description is written "
        "beside it (PATH.json). "
        f"Supported: {ex.SUPPORTED}.",
    )
    parser.add_argument("source", help="saved model directory, mbv3-train workdir or torchvision checkpoint")
    parser.add_argument("--format", required=True, choices=ex.FORMATS)
    parser.add_argument("--out", required=True, help="the artifact to write (saved_model: a directory)")
    parser.add_argument("--builder", help="the torchvision builder of a .pth / .safetensors SOURCE")
    parser.add_argument("--step", type=int, help="a workdir's checkpoint step (default: the latest)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input height and width")
    parser.add_argument(
        "--batch", type=int, help="fixed batch size (default: symbolic for stablehlo / saved_model, else 1)"
    )
    parser.add_argument("--float16-weights", action="store_true", help="tflite: store weights in float16")
    parser.add_argument(
        "--platforms", nargs="+", default=["cpu", "cuda", "tpu"], choices=ex.PLATFORMS,
        help="stablehlo / saved_model: platforms the program is lowered for (default: cpu cuda tpu)",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--check", action="store_true", help="run the artifact in its runtime against the JAX model"
    )
    args = parser.parse_args(argv)
    try:
        model = ex.load_source(_source(args))
        start = time.perf_counter()
        out = ex.export(
            model,
            args.out,
            args.format,
            input_size=tuple(args.size) if args.size else None,
            batch=args.batch,
            platforms=args.platforms,
            float16_weights=args.float16_weights,
            overwrite=args.overwrite,
        )
        seconds = time.perf_counter() - start
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        return _err(str(e))
    import json

    info = json.loads(ex.sidecar(out).read_text())
    shape = "x".join(str(d) for d in info["input"]["shape"])
    outputs = ", ".join(f"{o['name']} {o['shape']}" for o in info["outputs"])
    print(f"wrote {out} ({args.format}, {seconds:.1f} s): input images {shape} float32 NHWC (normalized), "
          f"outputs {outputs}; described in {ex.sidecar(out)}")  # fmt: skip
    if "image_sizes" in info["input"]:
        print("  second input image_sizes (b, 2) int32: each image's resized height, width (see PATH.json)")
    if "postprocess" in info:
        print(
            f"  post-processing (top-k, NMS) not in this format: {out.parent / info['postprocess']['file']}"
        )
    if args.check:
        _check(out, model, info)
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
