"""Command-line entry points: ``mbv3-port`` (convert + save) and ``mbv3-parity`` (parity table)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mbv3_jax
from mbv3_jax import transforms
from mbv3_jax.checkpoint import check_target
from mbv3_jax.models import list_models
from porting.calibration import (
    PHOTO_NAMES,
    calibrated_any_detector_,
    calibrated_random_weights_,
    classification_inputs,
    group_by_shape,
    sample_photos,
    segmentation_inputs,
)
from porting.parity import (
    NOISE_FLOOR_FACTOR,
    ParityReport,
    format_table,
    run_detection_parity,
    run_parity,
)
from porting.torchvision_io import (
    QUANTIZED_MODELS,
    build_torchvision_model,
    load_torchvision,
    resolve_weights,
)


def _add_builder_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("builder options (torchvision's keyword arguments)")
    g.add_argument("--num-classes", type=int, help="default: 1000, or the weights' number of categories")
    g.add_argument("--width-mult", type=float)
    g.add_argument("--reduced-tail", action="store_true", default=None)
    g.add_argument("--dilated", action="store_true", default=None)
    g.add_argument("--dropout", type=float)


def _builder_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ("num_classes", "width_mult", "reduced_tail", "dilated", "dropout")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _eval_sizes(weights_enum: Any) -> tuple[int, int]:
    """(resize, crop) of the weights' eval preset; torchvision's defaults otherwise."""
    if weights_enum is not None:
        preset = weights_enum.transforms()
        return int(preset.resize_size[0]), int(preset.crop_size[0])
    return 256, 224


DETECTION_MODELS = (
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "ssdlite320_mobilenet_v3_large",
)
SEGMENTATION_MODELS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_mobilenet_v3_large")
# Integer models (porting.torchvision_io.QUANTIZED_MODELS): their parity (per-op uint8 outputs per
# quantized engine) is tests/test_quantized_parity.py; the float comparison flow here does not apply.
QUANTIZED_PARITY_HINT = (
    "the quantized model's parity is checked op by op per engine by tests/test_quantized_parity.py "
    "(pytest tests/test_quantized_parity.py -s); mbv3-parity does not cover it yet"
)


def parity_models() -> list[str]:
    return [n for n in list_models() if n not in QUANTIZED_MODELS]


@dataclasses.dataclass
class ParityRun:
    """One model's parity report plus what the figures need."""

    report: ParityReport
    preprocessing_error: float  # max |mbv3_jax preprocessing - torchvision preset|
    photo_order: list[int]  # photo index of each image, in the order of report.outputs' batches


def _fresh_torchvision(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    return build_torchvision_model(mbv3_jax.get_model(name, **kwargs).architecture)


def parity_for(
    name: str,
    weights: Any,
    kwargs: dict[str, Any],
    photos: list[np.ndarray],
    *,
    seed: int = 0,
    timing_repeats: int = 5,
    eval_sizes: tuple[int, int] | None = None,
    stages: bool = True,
    keep_outputs: bool = False,
) -> ParityRun:
    """Calibrate (without ``weights``), convert, and compare one model on the photos at its eval preset."""
    enum = None
    if weights is not None:
        state_dict, enum, _ = resolve_weights(name, weights)
    if name in DETECTION_MODELS:
        if weights is None:
            images = [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in photos]
            tv = calibrated_any_detector_(_fresh_torchvision(name, kwargs), images, seed=seed)
            state_dict = tv.state_dict()
        model = load_torchvision(name, state_dict, **kwargs)
        tv = build_torchvision_model(model.architecture)
        tv.load_state_dict(state_dict)
        report = run_detection_parity(
            name, tv, model, photos, timing_repeats=timing_repeats, keep_outputs=keep_outputs
        )
        # The detection transform is part of the model (checked in the parity tests).
        return ParityRun(report, 0.0, list(range(len(photos))))
    if name in SEGMENTATION_MODELS:
        resize = int(enum.transforms().resize_size[0]) if enum is not None else 520
        groups = group_by_shape(segmentation_inputs(photos, resize))
        order = [i for idx, _ in groups for i in idx]
        inputs = [batch for _, batch in groups]
        preset = transforms.segmentation_preset(resize)
        references = [x[0].permute(1, 2, 0).numpy() for x in segmentation_inputs(photos, resize)]
    else:
        resize, crop = eval_sizes or _eval_sizes(enum)
        inputs = classification_inputs(photos, resize, crop)
        order = list(range(len(photos)))
        preset = transforms.classification_preset(resize, crop)
        references = list(inputs.permute(0, 2, 3, 1).numpy())
    if weights is None:
        state_dict = calibrated_random_weights_(
            _fresh_torchvision(name, kwargs), inputs, seed=seed
        ).state_dict()
    model = load_torchvision(name, state_dict, **kwargs)
    tv = build_torchvision_model(model.architecture)
    tv.load_state_dict(state_dict)
    preprocessing_error = max(
        float(np.max(np.abs(preset(p) - r))) for p, r in zip(photos, references, strict=True)
    )
    batches = (
        [np.ascontiguousarray(b.permute(0, 2, 3, 1).numpy()) for b in inputs]
        if isinstance(inputs, list)
        else (np.ascontiguousarray(inputs.permute(0, 2, 3, 1).numpy()))
    )
    report = run_parity(
        name, tv, model, batches, stages=stages, timing_repeats=timing_repeats, keep_outputs=keep_outputs
    )
    return ParityRun(report, preprocessing_error, order)


def parity_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mbv3-parity",
        description="Compare mbv3_jax models with torchvision on real photos (scikit-image's) and print a "
        "table. Without --weights, both use the same calibrated random weights, so it runs offline. Exit "
        "status 1 where the port is further from torchvision's float64 result than twice torchvision's "
        "own fp32 error.",
    )
    parser.add_argument("names", nargs="*", help=f"models (default: all of {', '.join(parity_models())})")
    parser.add_argument("--weights", help="a .pth file or a torchvision weights name (applies to every NAME)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibrated random weights")
    parser.add_argument(
        "--photos",
        nargs="+",
        choices=PHOTO_NAMES,
        metavar="PHOTO",
        help=f"scikit-image photos to use (default: all of {', '.join(PHOTO_NAMES)})",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timing repeats per model (median; 0: no timing)"
    )
    parser.add_argument(
        "--stages",
        action="store_true",
        help="print the error of every feature stage (segmentation models: also compare them)",
    )
    parser.add_argument(
        "--save-figures",
        metavar="DIR",
        help="write a PNG per photo and model: segmentation masks (photo | torchvision | JAX | difference), "
        "detections (torchvision's boxes | JAX's boxes)",
    )
    _add_builder_options(parser)
    args = parser.parse_args(argv)
    names = args.names or parity_models()
    if any(n in QUANTIZED_MODELS for n in names):
        parser.error(QUANTIZED_PARITY_HINT)
    unknown = [n for n in names if n not in parity_models()]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; available: {', '.join(parity_models())}")

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    photo_names = list(args.photos or PHOTO_NAMES)
    photos = sample_photos(photo_names)
    reports = []
    for i, name in enumerate(names, 1):
        _log(f"[{i}/{len(names)}] {name}: building, calibrating, compiling, comparing ...")
        kwargs = _builder_kwargs(args)
        if name in SEGMENTATION_MODELS or name in DETECTION_MODELS:
            kwargs = {k: v for k, v in kwargs.items() if k == "num_classes"}
        run = parity_for(
            name,
            args.weights,
            kwargs,
            photos,
            seed=args.seed,
            timing_repeats=args.repeats,
            stages=args.stages or name not in SEGMENTATION_MODELS,
            keep_outputs=bool(args.save_figures),
        )
        reports.append(run.report)
        _log(f"    preprocessing (mbv3_jax.transforms vs torchvision preset): {_pre(run)}")
        _log("    " + format_table([run.report]).splitlines()[-1])  # each row as it comes: a cut run keeps it
        if args.save_figures and name in SEGMENTATION_MODELS:
            for path in _save_segmentation_figures(Path(args.save_figures), name, run, photos, photo_names):
                _log(f"    wrote {path}")
        if args.save_figures and name in DETECTION_MODELS:
            for path in _save_detection_figures(Path(args.save_figures), name, run, photos, photo_names):
                _log(f"    wrote {path}")
    print(
        f"{len(photos)} photos from scikit-image at each model's eval preset, fp32, "
        "matmul precision 'highest'; "
        f"{'weights ' + args.weights if args.weights else 'calibrated random weights'}; "
        "errors relative to max|torchvision|; 'f64 tv/JAX': torchvision fp32's and the port's error "
        "against torchvision in float64 (L2, relative; detections: 'float64 dets matched by ...'); "
        "times: medians per batch (segmentation: first photo size)"
    )
    print(format_table(reports))
    if args.stages:
        for r in reports:
            print(f"\n{r.model}: per-output errors")
            for c in r.comparisons:
                f64 = "" if c.noise_ratio is None else f"  f64 tv {c.torch_f64:.1e} JAX {c.port_f64:.1e}"
                print(f"  {c.name:<14} {str(c.shape):<22} max abs {c.max_abs:.2e}  rel {c.relative:.1e}{f64}")
    excess = [f"{r.model}: {e}" for r in reports for e in r.noise_floor_excess()]
    for line in excess:
        _log(f"above {NOISE_FLOOR_FACTOR:g}x torchvision's own fp32 error: {line}")
    return 1 if excess else 0


def _save_detection_figures(
    directory: Path, name: str, run: ParityRun, photos: list[np.ndarray], photo_names: list[str]
) -> list[Path]:
    from porting.figures import detection_figure

    directory.mkdir(parents=True, exist_ok=True)
    (ref, got), paths = run.report.outputs[0], []
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        path = directory / f"{name}_{photo_names[i]}.png"
        detection_figure(photos[i], r, g, title=f"{name} on {photo_names[i]}").save(path)
        paths.append(path)
    return paths


def _pre(run: ParityRun) -> str:
    return f"max abs diff {run.preprocessing_error:.1e}"


def _save_segmentation_figures(
    directory: Path, name: str, run: ParityRun, photos: list[np.ndarray], photo_names: list[str]
) -> list[Path]:
    from porting.figures import segmentation_figure

    directory.mkdir(parents=True, exist_ok=True)
    masks = [(ref_b.argmax(-1), got_b.argmax(-1)) for ref_b, got_b in run.report.outputs]
    flat = [(r, g) for ref_b, got_b in masks for r, g in zip(ref_b, got_b, strict=True)]
    paths = []
    for photo_index, (ref_mask, got_mask) in zip(run.photo_order, flat, strict=True):
        path = directory / f"{name}_{photo_names[photo_index]}.png"
        segmentation_figure(
            photos[photo_index], ref_mask, got_mask, title=f"{name} on {photo_names[photo_index]}"
        ).save(path)
        paths.append(path)
    return paths


def port_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mbv3-port", description="Convert torchvision weights to an mbv3_jax checkpoint directory."
    )
    parser.add_argument("name", choices=list_models())
    parser.add_argument(
        "--weights",
        required=True,
        help="a .pth / .safetensors file (state_dict or training checkpoint) "
        "or a torchvision weights name such as IMAGENET1K_V1 / DEFAULT",
    )
    parser.add_argument(
        "--checkpoint-key",
        help='the entry of a training checkpoint that holds the state_dict, e.g. "model_ema" for the EMA '
        'weights of torchvision\'s reference scripts (default: "model" where present, else the whole file)',
    )
    parser.add_argument("--out", required=True, help="directory to write (orbax checkpoint + architecture)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it holds a model saved before (nothing else: any other directory is refused)",
    )
    parser.add_argument("--check", action="store_true", help="print the parity report against torchvision")
    _add_builder_options(parser)
    args = parser.parse_args(argv)
    if args.check and args.name in QUANTIZED_MODELS:
        parser.error(f"--check: {QUANTIZED_PARITY_HINT}")
    kwargs = _builder_kwargs(args)
    try:
        check_target(args.out, overwrite=args.overwrite)  # before converting
        state_dict, enum, source = resolve_weights(args.name, args.weights, args.checkpoint_key)
        if enum is not None:
            kwargs.setdefault("num_classes", len(enum.meta["categories"]))
        model = load_torchvision(args.name, state_dict, **kwargs)
        path = mbv3_jax.save(model, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
        print(f"mbv3-port: error: {e}", file=sys.stderr)
        return 2
    print(f"saved {args.name} from {source} to {path}")
    if args.check:
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
        run = parity_for(args.name, state_dict, kwargs, sample_photos(), eval_sizes=_eval_sizes(enum))
        print(format_table([run.report]))
        print(f"preprocessing (mbv3_jax.transforms vs torchvision preset): {_pre(run)}")
        # The saved directory must reproduce the converted model exactly.
        reloaded = mbv3_jax.load(path)
        x = np.zeros((1, 224, 224, 3), np.float32)
        same = all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(reloaded(x)), jax.tree.leaves(model(x)), strict=True)
        )
        print(f"reloaded from {path}: outputs {'identical' if same else 'DIFFER'}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(parity_main())
