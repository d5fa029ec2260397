"""Command-line entry points: ``mbv3-port`` (convert + save) and ``mbv3-parity`` (parity table)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import torchvision

import mbv3_jax
from mbv3_jax import transforms
from mbv3_jax.models import list_models
from porting.calibration import calibrated_random_weights_, classification_inputs, sample_photos
from porting.parity import ParityReport, format_table, run_parity
from porting.torchvision_io import build_torchvision_model, load_torchvision, resolve_weights


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


def parity_for(
    name: str,
    weights: Any,
    kwargs: dict[str, Any],
    photos: list[np.ndarray],
    *,
    seed: int = 0,
    timing_repeats: int = 5,
    eval_sizes: tuple[int, int] | None = None,
) -> tuple[ParityReport, float]:
    """(parity report, max |mbv3_jax preprocessing - torchvision preset|) for one model."""
    enum = None
    if weights is not None:
        state_dict, enum, _ = resolve_weights(name, weights)
    resize, crop = eval_sizes or _eval_sizes(enum)
    inputs_nchw = classification_inputs(photos, resize, crop)
    if weights is None:
        tv = torchvision.models.get_model(name, **kwargs)
        state_dict = calibrated_random_weights_(tv, inputs_nchw, seed=seed).state_dict()
    model = load_torchvision(name, state_dict, **kwargs)
    tv = build_torchvision_model(model.architecture)
    tv.load_state_dict(state_dict)
    reference = inputs_nchw.permute(0, 2, 3, 1).numpy()
    ours = transforms.preprocess_batch(photos, transforms.classification_preset(resize, crop))
    preprocessing_error = float(np.max(np.abs(ours - reference)))
    report = run_parity(name, tv, model, reference, timing_repeats=timing_repeats)
    return report, preprocessing_error


def parity_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mbv3-parity",
        description="Compare mbv3_jax models with torchvision on real photos (scikit-image's) and print a "
        "table. Without --weights, both use the same calibrated random weights, so it runs offline.",
    )
    parser.add_argument("names", nargs="*", help=f"models (default: all of {', '.join(list_models())})")
    parser.add_argument("--weights", help="a .pth file or a torchvision weights name (applies to every NAME)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibrated random weights")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timing repeats per model (median; 0: no timing)"
    )
    parser.add_argument("--stages", action="store_true", help="also print the error of every feature stage")
    _add_builder_options(parser)
    args = parser.parse_args(argv)
    names = args.names or list_models()
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; available: {', '.join(list_models())}")

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    photos = sample_photos()
    reports = []
    for i, name in enumerate(names, 1):
        _log(f"[{i}/{len(names)}] {name}: building, calibrating, compiling, comparing ...")
        report, pre_err = parity_for(
            name, args.weights, _builder_kwargs(args), photos, seed=args.seed, timing_repeats=args.repeats
        )
        reports.append(report)
        _log(f"    preprocessing (mbv3_jax.transforms vs torchvision preset): max abs diff {pre_err:.1e}")
    print(
        f"{len(photos)} photos from scikit-image, fp32, matmul precision 'highest'; "
        f"{'weights ' + args.weights if args.weights else 'calibrated random weights'}; "
        "errors relative to max|torchvision|, times are medians per batch"
    )
    print(format_table(reports))
    if args.stages:
        for r in reports:
            print(f"\n{r.model}: per-output errors")
            for c in r.comparisons:
                print(f"  {c.name:<14} {str(c.shape):<22} max abs {c.max_abs:.2e}  rel {c.relative:.1e}")
    return 0


def port_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mbv3-port", description="Convert torchvision weights to an mbv3_jax checkpoint directory."
    )
    parser.add_argument("name", choices=list_models())
    parser.add_argument(
        "--weights",
        required=True,
        help="a .pth file (state_dict or training checkpoint) "
        "or a torchvision weights name such as IMAGENET1K_V1 / DEFAULT",
    )
    parser.add_argument("--out", required=True, help="directory to write (orbax checkpoint + architecture)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--check", action="store_true", help="print the parity report against torchvision")
    _add_builder_options(parser)
    args = parser.parse_args(argv)
    kwargs = _builder_kwargs(args)
    try:
        state_dict, enum, source = resolve_weights(args.name, args.weights)
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
        report, pre_err = parity_for(
            args.name, state_dict, kwargs, sample_photos(), eval_sizes=_eval_sizes(enum)
        )
        print(format_table([report]))
        print(f"preprocessing (mbv3_jax.transforms vs torchvision preset): max abs diff {pre_err:.1e}")
        # The saved directory must reproduce the converted model exactly.
        reloaded = mbv3_jax.load(path)
        x = np.zeros((1, 224, 224, 3), np.float32)
        same = np.array_equal(np.asarray(reloaded(x)), np.asarray(model(x)))
        print(f"reloaded from {path}: outputs {'identical' if same else 'DIFFER'}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(parity_main())
