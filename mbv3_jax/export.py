"""Export a model off JAX: StableHLO (``jax.export``), LiteRT (.tflite), ONNX and TF SavedModel.

Every export traces the generic path (``backend.cpu_kernels(False)``): the CPU rewrites are
conditionals on the platform that the TFLite converter and jax2onnx cannot lower, and an artifact
should compute what a TPU or GPU computes. The exported program takes a normalized float32 NHWC batch
(what ``mbv3_jax.transforms`` produces) at a fixed size, by default the model's eval size (224 for
classifiers, 520 for segmentation, 320 for SSDlite, ``min_size`` squared for Faster R-CNN);
StableHLO and SavedModel leave the batch dimension symbolic unless ``batch`` fixes it.

Faster R-CNN exports to StableHLO only, whole: backbone, FPN, RPN with its top-k and NMS, RoIAlign,
box head and the per-class NMS, with fixed-size padded detections out. Its program takes a second
input, ``image_sizes`` (N, 2) int32: each image's (h, w) after torchvision's resize, the top-left
part of the zero-padded input that holds the image (:func:`detection_inputs` makes both from photos,
:func:`detections_per_image` maps the boxes back to the photos).

Each artifact gets a JSON sidecar (``<artifact>.json``): input shape, dtype, layout, preprocessing,
output names and shapes. SSDlite's post-processing (top-k, sort, batched NMS) exports only to
StableHLO; for the other formats the artifact holds the network (the head outputs) and the
post-processing is written beside it as a StableHLO program (``<artifact>.postprocess.stablehlo``)
that :func:`run` and :func:`load_artifact` apply (or :func:`load_stablehlo` loads).

The int8 model (``quantized_mobilenet_v3_large``) exports to "tflite" only, as a LiteRT integer model
written op for op from its own integers and scales (``mbv3_jax.litert_int8``), not traced.

TensorFlow, ai-edge-litert, jax2onnx and onnxruntime are imported only by the formats that need them
(``pip install -e '.[export]'``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mbv3_jax import backend
from mbv3_jax.checkpoint import is_saved_model, load
from mbv3_jax.models import qat, quantization
from mbv3_jax.models.detection import SIZE_DIVISIBLE, FasterRCNN, resized_size
from mbv3_jax.models.detection_utils import normalize_and_resize_images, unpad_detections
from mbv3_jax.models.mobilenetv3 import MobileNetV3
from mbv3_jax.models.segmentation import SegmentationModel
from mbv3_jax.models.ssdlite import INPUT_HW as SSDLITE_HW
from mbv3_jax.models.ssdlite import SSD
from mbv3_jax.transforms import IMAGENET_MEAN, IMAGENET_STD

FORMATS = ("stablehlo", "tflite", "onnx", "saved_model")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
INPUT_NAME = "images"
SIZES_NAME = "image_sizes"  # Faster R-CNN's second input
DETECTIONS = ("boxes", "scores", "labels", "num_detections")
INSTALL_HINT = "pip install -e '.[export]'"
# Packages each format imports (module name, what pip installs), checked before any work.
_NEEDS = {
    "stablehlo": (),
    "tflite": (("tensorflow", "tensorflow-cpu"), ("ai_edge_litert", "ai-edge-litert")),
    "onnx": (("jax2onnx", "jax2onnx"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime")),
    "saved_model": (("tensorflow", "tensorflow-cpu"),),
    "int8_tflite": (("ai_edge_litert", "ai-edge-litert"),),  # written without TensorFlow
}
# The model's eval input size per family (torchvision's eval presets).
DEFAULT_SIZES = {
    "classifier": (224, 224),
    "int8_classifier": (224, 224),
    "segmentation": (520, 520),
    "ssdlite": SSDLITE_HW,
}
SUPPORTED = (
    "classifiers (mobilenet_v3_large / mobilenet_v3_small, any builder option), segmentation "
    "(lraspp / deeplabv3 / fcn _mobilenet_v3_large) and ssdlite320_mobilenet_v3_large, "
    f"to {', '.join(FORMATS)}; fasterrcnn_mobilenet_v3_large_320_fpn and "
    "fasterrcnn_mobilenet_v3_large_fpn to stablehlo; quantized_mobilenet_v3_large (int8) to tflite"
)
# Formats each family exports to (the others are refused with the reason below).
FAMILY_FORMATS = {"faster_rcnn": ("stablehlo",), "int8_classifier": ("tflite",)}
FASTER_RCNN_REFUSAL = (
    "Faster R-CNN exports to format 'stablehlo' only (whole detections, padded), not {format!r}: its "
    "RoI heads (RoIAlign and the box head, most of its weights) run on the proposals left by the RPN's "
    "top-k and NMS, which the TFLite converter and jax2onnx cannot convert (nor TensorFlow 2.21 read: "
    "its StableHLO is older than JAX's top_k), so no network-only part splits off as SSDlite's head does"
)


INT8_REFUSAL = (
    "the int8 model (quantized_mobilenet_v3_large) exports to format 'tflite' only (a LiteRT integer "
    "model with its own scales and integers), not {format!r}"
)


class ExportError(ValueError):
    """A model, format or option that export does not support (the message says what is)."""


class MissingDependencyError(ImportError):
    """A format's optional package is not installed (the message says what to install)."""


# ------------------------------------------------------------------------------------------------
# Sources and programs


def load_source(source: nnx.Module | str | os.PathLike) -> nnx.Module:
    """A model from an nnx model (returned as is) or an ``mbv3_jax.save`` directory. (``mbv3-export``
    also reads a ``mbv3-train`` workdir's checkpoint and a torchvision checkpoint.)"""
    if isinstance(source, nnx.Module):
        return source
    path = Path(source)
    if is_saved_model(path):
        return load(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise ExportError(
        f"{path} is not a model saved with mbv3_jax.save (architecture.json + state/); mbv3-export also "
        "reads a mbv3-train workdir and, with --builder NAME, a torchvision checkpoint"
    )


def family_of(model: nnx.Module) -> str:
    """ "classifier", "int8_classifier", "segmentation", "ssdlite" or "faster_rcnn";
    :class:`ExportError` for the others."""
    if isinstance(model, qat.QATMobileNetV3):
        raise ExportError(
            "a quantization-aware (QAT) model is a training model: convert it to the int8 model first "
            "(mbv3_jax.models.qat.convert, or mbv3-quantize) and export that to 'tflite'"
        )
    if isinstance(model, quantization.QuantizedMobileNetV3):
        return "int8_classifier"
    if isinstance(model, MobileNetV3):
        return "classifier"
    if isinstance(model, SegmentationModel):
        return "segmentation"
    if isinstance(model, SSD):
        return "ssdlite"
    if isinstance(model, FasterRCNN):
        return "faster_rcnn"
    raise ExportError(f"cannot export a {type(model).__name__}; supported: {SUPPORTED}")


@dataclass(frozen=True)
class Program:
    """What gets exported: ``fn`` maps a (N, H, W, 3) float32 batch (Faster R-CNN: and the (N, 2)
    int32 image sizes) to a dict of ``output_names``."""

    builder: str
    family: str
    fn: Callable[[jax.Array], dict[str, jax.Array]]
    output_names: tuple[str, ...]
    input_hw: tuple[int, int]
    postprocess: Callable[[jax.Array, jax.Array], dict[str, jax.Array]] | None = None

    @property
    def takes_sizes(self) -> bool:
        return self.family == "faster_rcnn"


def program(model: nnx.Module, input_hw: tuple[int, int], *, head_only: bool = False) -> Program:
    """The pure eval-mode function of ``model`` to export (weights as constants); the model itself is
    left as it is (a copy is put in eval mode). ``head_only`` (SSDlite): the network's outputs, with
    the post-processing as a separate function of them."""
    family = family_of(model)
    builder = model.architecture["builder"]
    graphdef, state = nnx.split(model)
    frozen = nnx.merge(graphdef, state)
    frozen.eval()
    graphdef, state = nnx.split(frozen)

    def merged() -> Any:
        return nnx.merge(graphdef, state)

    if family in ("classifier", "int8_classifier"):
        return Program(builder, family, lambda x: {"logits": merged().forward(x)}, ("logits",), input_hw)
    if family == "segmentation":
        names = ("out", "aux") if getattr(frozen, "aux_classifier", None) is not None else ("out",)
        return Program(builder, family, lambda x: dict(merged().forward(x)), names, input_hw)
    if family == "faster_rcnn":
        # RoIAlign's scale is inferred from the largest image (a static number): from the input size
        # here, the same 1/32 as torchvision's whenever the images fill the input to within a stride.
        def detect(x: jax.Array, image_sizes: jax.Array) -> dict[str, jax.Array]:
            image_sizes = image_sizes.astype(jnp.int32)
            if isinstance(x.shape[0], int):
                return merged().forward_detect(x, image_sizes, input_hw)

            # A symbolic batch: one image at a time (RoIAlign's box count is static). In eval mode
            # each image's detections depend on it alone, so this is the batched program's result.
            def one(args: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
                out = merged().forward_detect(args[0][None], args[1][None], input_hw)
                return {k: v[0] for k, v in out.items()}

            return jax.lax.map(one, (x, image_sizes))

        return Program(builder, family, detect, DETECTIONS, input_hw)
    if not head_only:
        return Program(builder, family, lambda x: merged().forward_detect(x), DETECTIONS, input_hw)
    anchors = ssdlite_anchors(frozen, input_hw)

    def post(bbox_regression: jax.Array, cls_logits: jax.Array) -> dict[str, jax.Array]:
        head = {"bbox_regression": bbox_regression, "cls_logits": cls_logits}
        return merged().postprocess_detections(head, jnp.asarray(anchors), input_hw)

    return Program(
        builder,
        family,
        lambda x: merged().head_outputs(x)[0],
        ("bbox_regression", "cls_logits"),
        input_hw,
        postprocess=post,
    )


def ssdlite_anchors(model: SSD, input_hw: tuple[int, int] = SSDLITE_HW) -> np.ndarray:
    """SSDlite's default boxes (x1, y1, x2, y2 in the input frame) for ``input_hw`` images."""
    features = jax.eval_shape(model.backbone, jax.ShapeDtypeStruct((1, *input_hw, 3), jnp.float32))
    return np.asarray(model.anchor_generator(input_hw, [f.shape[1:3] for f in features]))


def _check_input_hw(
    family: str, input_size: Sequence[int] | int | None, model: nnx.Module | None = None
) -> tuple[int, int]:
    if input_size is None:
        if family == "faster_rcnn":
            return model.config.min_size, model.config.min_size
        return DEFAULT_SIZES[family]
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ExportError(f"input_size must be (height, width) in positive pixels, got {input_size!r}")
    size = (int(size[0]), int(size[1]))
    if family == "ssdlite" and size != SSDLITE_HW:
        raise ExportError(
            f"SSDlite takes {SSDLITE_HW[0]}x{SSDLITE_HW[1]} inputs only (torchvision's transform resizes "
            f"every image to it; its default boxes are laid out for it), got {size[0]}x{size[1]}"
        )
    if family == "faster_rcnn" and (size[0] % SIZE_DIVISIBLE or size[1] % SIZE_DIVISIBLE):
        up = [-(-s // SIZE_DIVISIBLE) * SIZE_DIVISIBLE for s in size]
        raise ExportError(
            f"Faster R-CNN takes inputs padded to multiples of {SIZE_DIVISIBLE} (torchvision's transform "
            f"pads its batch so), got {size[0]}x{size[1]}: use {up[0]}x{up[1]}"
        )
    return size


# ------------------------------------------------------------------------------------------------
# The export


def export(
    source: nnx.Module | str | os.PathLike,
    out_path: str | os.PathLike,
    format: str,
    *,
    input_size: Sequence[int] | int | None = None,
    batch: int | None = None,
    platforms: Sequence[str] = ("cpu", "cuda", "tpu"),
    float16_weights: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export ``source`` (an nnx model or an ``mbv3_jax.save`` directory) to
    ``out_path`` in ``format`` ("stablehlo", "tflite", "onnx" or "saved_model", a directory) and write
    the sidecar ``<out_path>.json``. Returns ``out_path``.

    ``input_size``: (H, W) or one int (default: the model's eval size). ``batch``: a fixed batch size;
    None leaves it symbolic for "stablehlo" and "saved_model" and is 1 for "tflite" and "onnx".
    ``platforms``: the StableHLO program's targets (SavedModel: its XLA program's). ``float16_weights``:
    "tflite" only, weights stored in float16 (half the size, ~1e-3 relative error). Nothing is left
    at ``out_path`` if the export fails; an existing one is replaced only with ``overwrite``.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; supported: {', '.join(FORMATS)}")
    if float16_weights and format != "tflite":
        raise ExportError(f"float16_weights applies to format 'tflite' only, not {format!r}")
    platforms = tuple(platforms)
    bad = [p for p in platforms if p not in PLATFORMS]
    if not platforms or bad:
        raise ExportError(f"platforms must be among {', '.join(PLATFORMS)}, got {list(platforms)}")
    if batch is not None and (
        not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch < 1
    ):
        raise ExportError(f"batch must be a positive integer (or None: symbolic), got {batch!r}")
    out_path = Path(out_path)
    if (out_path.exists() or out_path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out_path} exists: pass overwrite=True (--overwrite) to replace it")
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"{out_path.parent} (the directory of {out_path.name}) does not exist")
    model = load_source(source)
    family = family_of(model)
    if format not in FAMILY_FORMATS.get(family, FORMATS):
        refusal = INT8_REFUSAL if family == "int8_classifier" else FASTER_RCNN_REFUSAL
        raise ExportError(refusal.format(format=format))
    input_hw = _check_input_hw(family, input_size, model)
    if family == "int8_classifier" and float16_weights:
        raise ExportError("float16_weights does not apply to the int8 model (its weights are int8)")
    _require("int8_tflite" if family == "int8_classifier" else format)
    head_only = family == "ssdlite" and format != "stablehlo"
    prog = program(model, input_hw, head_only=head_only)
    if batch is None and format in ("tflite", "onnx"):
        batch = 1
    writer = {"stablehlo": _write_stablehlo, "tflite": _write_tflite, "onnx": _write_onnx}.get(
        format, _write_saved_model
    )
    if family == "int8_classifier":
        writer = functools.partial(_write_int8_tflite, model)
    post_path = out_path.with_name(out_path.name + ".postprocess.stablehlo")
    sidecar_path = sidecar(out_path)
    with backend.cpu_kernels(False):
        with _staged(out_path) as tmp:
            outputs = writer(prog, tmp, batch, platforms, float16_weights)
            info = _describe(model, prog, format, batch, platforms, float16_weights, outputs)
            post_tmp = None
            if prog.postprocess is not None:
                post_tmp = _temp_name(post_path)
                post_tmp.write_bytes(_export_postprocess(prog, platforms).serialize())
                info["postprocess"] = {
                    "file": post_path.name,
                    "format": "stablehlo",
                    "inputs": list(prog.output_names),
                    "outputs": list(DETECTIONS),
                    "note": "batched NMS and top-k do not convert to this format; run them with "
                    "mbv3_jax.export.run (or load_stablehlo) on the artifact's outputs",
                }
            sidecar_tmp = _temp_name(sidecar_path)
            sidecar_tmp.write_text(json.dumps(info, indent=2) + "\n")
            try:
                if post_tmp is not None:
                    os.replace(post_tmp, post_path)
                os.replace(sidecar_tmp, sidecar_path)
            except BaseException:
                for p in (post_tmp, sidecar_tmp):
                    if p is not None:
                        p.unlink(missing_ok=True)
                raise
    return out_path


def sidecar(out_path: str | os.PathLike) -> Path:
    """The JSON description written beside an artifact."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".json")


def _require(format: str) -> None:
    missing = []
    for module, package in _NEEDS[format]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingDependencyError(
            f"format {format!r} needs {', '.join(missing)}, not installed: {INSTALL_HINT} "
            "(the 'export' extra pins the versions tested with this project)"
        )


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same file system), renamed onto ``path`` when the block
    succeeds and removed when it fails, so ``path`` only ever holds a whole artifact."""
    tmp = _temp_name(path)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            # os.replace cannot put a directory over a non-empty one: move the old one aside first.
            old = _temp_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _input_spec(prog: Program, batch: int | None) -> jax.ShapeDtypeStruct:
    return _input_specs(prog, batch)[0]


def _input_specs(prog: Program, batch: int | None) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The program's arguments: the images, and Faster R-CNN's image sizes (same batch dimension)."""
    h, w = prog.input_hw
    shape = jax.export.symbolic_shape(f"b, {h}, {w}, 3") if batch is None else (batch, h, w, 3)
    images = jax.ShapeDtypeStruct(shape, jnp.float32)
    if not prog.takes_sizes:
        return (images,)
    return images, jax.ShapeDtypeStruct((shape[0], 2), jnp.int32)


def _as_tuple(prog: Program) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    """``prog.fn`` with its outputs as a tuple in ``output_names`` order (TF and ONNX name them)."""

    def fn(x: jax.Array) -> tuple[jax.Array, ...]:
        out = prog.fn(x)
        return tuple(out[name] for name in prog.output_names)

    return fn


def _export_postprocess(prog: Program, platforms: Sequence[str]) -> jax.export.Exported:
    spec = jax.eval_shape(prog.fn, _input_spec(prog, 1))
    b = jax.export.symbolic_shape("b")[0]
    args = [jax.ShapeDtypeStruct((b, *spec[n].shape[1:]), spec[n].dtype) for n in prog.output_names]
    return jax.export.export(jax.jit(prog.postprocess), platforms=platforms)(*args)


def _write_stablehlo(prog, tmp: Path, batch, platforms, float16_weights) -> dict[str, Any]:
    exported = jax.export.export(jax.jit(prog.fn), platforms=platforms)(*_input_specs(prog, batch))
    tmp.write_bytes(exported.serialize())
    out_tree = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
    return {name: out_tree[name] for name in prog.output_names}


def _jax2tf(prog: Program, batch: int | None, platforms: Sequence[str]):
    """(a tf.Module holding a tf.function of one "images" argument that returns the named outputs,
    its concrete function)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up banner on stderr
    import tensorflow as tf
    from jax.experimental import jax2tf

    h, w = prog.input_hw
    converted = jax2tf.convert(
        _as_tuple(prog),
        polymorphic_shapes=["(b, _, _, _)"] if batch is None else None,
        native_serialization_platforms=tuple(platforms),
        with_gradient=False,
    )
    names = prog.output_names

    @tf.function(
        autograph=False, input_signature=[tf.TensorSpec((batch, h, w, 3), tf.float32, name=INPUT_NAME)]
    )
    def serve(images):
        return dict(zip(names, converted(images), strict=True))

    # The module tracks the function: the TFLite converter then writes a named signature from it.
    module = tf.Module()
    module.serve = serve
    return module, serve.get_concrete_function()


def _write_tflite(prog, tmp: Path, batch, platforms, float16_weights) -> dict[str, Any]:
    import tensorflow as tf

    module, concrete = _jax2tf(prog, batch, ("cpu",))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    if float16_weights:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    tmp.write_bytes(converter.convert())
    return _abstract_outputs(prog, batch)


def _write_int8_tflite(model, prog, tmp: Path, batch, platforms, float16_weights) -> dict[str, Any]:
    from mbv3_jax.litert_int8 import int8_tflite

    tmp.write_bytes(int8_tflite(model, prog.input_hw, batch))
    return _abstract_outputs(prog, batch)


def _write_saved_model(prog, tmp: Path, batch, platforms, float16_weights) -> dict[str, Any]:
    import tensorflow as tf

    module, concrete = _jax2tf(prog, batch, [p for p in platforms if p in ("cpu", "cuda", "tpu")])
    tf.saved_model.save(module, str(tmp), signatures={"serving_default": concrete})
    return _abstract_outputs(prog, batch)


def _write_onnx(prog, tmp: Path, batch, platforms, float16_weights) -> dict[str, Any]:
    import onnx
    from jax2onnx import to_onnx

    h, w = prog.input_hw
    # jax2onnx prints debugging lines and logs its unused plugins' import failures: keep them quiet.
    quiet = logging.getLogger("jax2onnx")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proto = to_onnx(
                _as_tuple(prog),
                [(batch, h, w, 3)],
                model_name=prog.builder,
                input_names=[INPUT_NAME],
                output_names=list(prog.output_names),
            )
    finally:
        quiet.setLevel(level)
    # jax2onnx records some intermediate types wrongly (a float32 Concat typed float64 in DeepLabV3's
    # ASPP), which onnxruntime rejects; intermediate types are optional, the runtime infers them.
    del proto.graph.value_info[:]
    onnx.save_model(proto, str(tmp))
    return _abstract_outputs(prog, batch)


def _abstract_outputs(prog: Program, batch: int | None) -> dict[str, Any]:
    out = jax.eval_shape(prog.fn, *_input_specs(prog, batch))
    return {name: out[name] for name in prog.output_names}


def _dims(shape: Sequence[Any]) -> list[int | str]:
    return [d if isinstance(d, int) else str(d) for d in shape]


def _preprocessing(model: nnx.Module, family: str, input_hw: tuple[int, int]) -> dict[str, Any]:
    if family == "faster_rcnn":
        cfg = model.config
        return {
            "mean": list(cfg.image_mean),
            "std": list(cfg.image_std),
            "steps": f"RGB in [0, 1] (pixels / 255), then (x - mean) / std, then resized (bilinear, no "
            f"antialias) as torchvision's transform does: shorter side {cfg.min_size}, longer side at "
            f"most {cfg.max_size} (scale = min({cfg.min_size} / short, {cfg.max_size} / long), sizes "
            f"floored), put at the top-left of a zero {input_hw[0]}x{input_hw[1]} input; "
            f"'{SIZES_NAME}' gets the resized (h, w). torchvision pads a batch to the next multiple of "
            f"{SIZE_DIVISIBLE} of its largest image: export at that size (--size H W) to get "
            "torchvision's detections exactly (the padding reaches the network)",
            "python": "mbv3_jax.export.detection_inputs(model, photos, input_hw) -> (images, "
            "image_sizes, original sizes)",
        }
    if family == "ssdlite":
        return {
            "mean": list(model.config.image_mean),
            "std": list(model.config.image_std),
            "steps": "RGB in [0, 1] (pixels / 255), resized to 320x320 (bilinear, no antialias), "
            "then (x - mean) / std; boxes come out in the 320x320 frame: scale them by the photo's "
            "width / 320 and height / 320",
            "python": "model.preprocess(photos) of the JAX model",
        }
    if family == "segmentation":
        steps = "RGB pixels / 255, then (x - mean) / std; torchvision resizes the shorter side to 520"
        python = "mbv3_jax.transforms.segmentation_preset(520), then crop or resize to the input size"
    else:
        steps = "RGB pixels / 255, then (x - mean) / std; torchvision resizes and center-crops to the input"
        python = f"mbv3_jax.transforms.classification_preset(crop_size={input_hw[0]}, resize_size=...)"
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "steps": steps, "python": python}


def _describe(model, prog: Program, format: str, batch, platforms, float16_weights, outputs) -> dict:
    h, w = prog.input_hw
    info = {
        "format": format,
        "builder": prog.builder,
        "architecture": model.architecture,
        "family": prog.family,
        "input": {
            "name": INPUT_NAME,
            "shape": ["b" if batch is None else batch, h, w, 3],
            "dtype": "float32",
            "layout": "NHWC",
            "preprocessing": _preprocessing(model, prog.family, prog.input_hw),
        },
        "outputs": [
            {"name": n, "shape": _dims(outputs[n].shape), "dtype": np.dtype(outputs[n].dtype).name}
            for n in prog.output_names
        ],
        "platforms": list(platforms) if format in ("stablehlo", "saved_model") else ["cpu"],
        "float16_weights": bool(float16_weights),
        "exporter": "mbv3_jax.export (generic path: no CPU-specific rewrites)",
    }
    if prog.family == "int8_classifier":
        info["exporter"] = "mbv3_jax.litert_int8 (the int8 model's own integers and scales, op for op)"
        info["quantization"] = {
            "activations": "int8, per tensor (torch's uint8 minus 128, zero points likewise)",
            "weights": "int8, per tensor, zero point 0 (depthwise: the scale repeated per channel)",
            "bias": "int32 at scale s_in * s_w",
            "input": "float32, quantized by the model's first op (QUANTIZE, torch's QuantStub)",
            "output": "float32 logits (DEQUANTIZE); tensor 'classifier.3' holds them as int8",
            "arithmetic": "LiteRT's integer kernels, which round differently from the "
            f"'{model.backend}' engine the model follows; see the README for the measured agreement",
        }
    if prog.takes_sizes:
        info["input"]["image_sizes"] = {
            "name": SIZES_NAME,
            "shape": [info["input"]["shape"][0], 2],
            "dtype": "int32",
            "meaning": "per image, the (h, w) of the resized image in the top-left corner of the input "
            "(the rest is zero padding); proposals and boxes are clipped to it. mbv3_jax.export.run "
            f"defaults it to the whole input ({h}, {w}). RoIAlign's scale is fixed from the input "
            "height (1/32); torchvision infers it from the batch's tallest resized image, the same "
            f"scale while that image is taller than {h} / sqrt(2)",
        }
        info["detections"] = {
            "boxes": "(x1, y1, x2, y2) in the input's pixels (the resized image's frame); to map back to a "
            "photo multiply x by photo_w / resized_w and y by photo_h / resized_h (float32 ratios, as "
            "torchvision's resize_boxes): mbv3_jax.export.detections_per_image",
            "padding": f"the first num_detections rows of each image are detections (at most "
            f"{model.config.box_detections_per_img}, by descending score); the rest are zeros",
            "labels": "class indices, 1..num_classes-1 (0 is the background)",
        }
    return info


# ------------------------------------------------------------------------------------------------
# Running an artifact in its own runtime


def load_stablehlo(path: str | os.PathLike) -> Callable[..., Any]:
    """A serialized ``jax.export`` program as a jitted callable (compiled once per input shape)."""
    return jax.jit(jax.export.deserialize(bytearray(Path(path).read_bytes())).call)


def load_artifact(
    path: str | os.PathLike, *, num_threads: int | None = None
) -> Callable[..., dict[str, np.ndarray]]:
    """An exported artifact loaded once in its own runtime (StableHLO: ``jax.export``, jitted;
    tflite: LiteRT's Interpreter, XNNPACK by default; onnx: onnxruntime on the CPU; saved_model:
    TensorFlow), as a function ``(images, image_sizes=None) -> {name: array}`` of a normalized
    float32 NHWC batch. SSDlite head outputs come with the detections of the post-processing program
    written beside them. ``image_sizes`` (Faster R-CNN): (N, 2) resized (h, w) per image, default
    the whole input. Call it repeatedly: the session and compiled programs are kept."""
    path = Path(path)
    info = json.loads(sidecar(path).read_text())
    fmt = info["format"]
    _require("int8_tflite" if info["family"] == "int8_classifier" else fmt)
    if fmt == "stablehlo":
        program = load_stablehlo(path)

        def network(*args: np.ndarray) -> dict[str, np.ndarray]:
            return {k: np.asarray(v) for k, v in program(*args).items()}

    elif fmt == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        signature = Interpreter(model_path=str(path), num_threads=num_threads).get_signature_runner()

        def network(images: np.ndarray) -> dict[str, np.ndarray]:
            return {k: np.asarray(v) for k, v in signature(**{INPUT_NAME: images}).items()}

    elif fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]

        def network(images: np.ndarray) -> dict[str, np.ndarray]:
            return dict(zip(names, session.run(names, {INPUT_NAME: images}), strict=True))

    else:
        import tensorflow as tf

        serve = tf.saved_model.load(str(path)).signatures["serving_default"]

        def network(images: np.ndarray) -> dict[str, np.ndarray]:
            return {k: v.numpy() for k, v in serve(**{INPUT_NAME: tf.constant(images)}).items()}

    post = info.get("postprocess")
    postprocess = load_stablehlo(path.with_name(post["file"])) if post else None
    takes_sizes = SIZES_NAME in info["input"]

    def call(images: np.ndarray, image_sizes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images, np.float32)
        args = [images]
        if takes_sizes:
            args.append(_image_sizes(images, image_sizes))
        elif image_sizes is not None:
            raise ValueError(f"{path} takes no image_sizes (only Faster R-CNN artifacts do)")
        out = network(*args)
        if postprocess is not None:
            detections = postprocess(*(out[n] for n in post["inputs"]))
            out.update({k: np.asarray(v) for k, v in detections.items()})
        return out

    return call


def run(
    path: str | os.PathLike,
    images: np.ndarray,
    *,
    image_sizes: np.ndarray | None = None,
    num_threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Run an exported artifact once in its own runtime: :func:`load_artifact` then a call (load
    the artifact once with :func:`load_artifact` to run it many times)."""
    return load_artifact(path, num_threads=num_threads)(images, image_sizes)


def reference(
    model: nnx.Module,
    images: np.ndarray,
    *,
    head_only: bool = False,
    image_sizes: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """What the exported program computes, run by JAX (generic path) on ``images``: the model's eval
    outputs under the artifact's names (``head_only``: SSDlite's head outputs and its detections;
    ``image_sizes``: Faster R-CNN's second input, default the whole input)."""
    model = load_source(model)
    prog = program(model, tuple(images.shape[1:3]), head_only=head_only)
    args = [images]
    if prog.takes_sizes:
        args.append(_image_sizes(images, image_sizes))
    with backend.cpu_kernels(False):
        out = {k: np.asarray(v) for k, v in jax.jit(prog.fn)(*args).items()}
        if prog.postprocess is not None:
            post = jax.jit(prog.postprocess)(*(out[n] for n in prog.output_names))
            out.update({k: np.asarray(v) for k, v in post.items()})
    return out


def max_relative_error(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per output: max |got - want| / max |want| (0 where both are all zeros)."""
    errors = {}
    for name, ref in want.items():
        ref = np.asarray(ref, np.float64)
        diff = np.max(np.abs(np.asarray(got[name], np.float64) - ref)) if ref.size else 0.0
        scale = np.max(np.abs(ref)) if ref.size else 0.0
        errors[name] = float(diff / scale) if scale else float(diff)
    return errors


def _image_sizes(images: np.ndarray, image_sizes: np.ndarray | None) -> np.ndarray:
    n, h, w = images.shape[:3]
    if image_sizes is None:
        return np.tile(np.array([h, w], np.int32), (n, 1))
    sizes = np.asarray(image_sizes)
    if sizes.shape != (n, 2) or not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError(f"image_sizes must be ({n}, 2) integers (h, w), got {sizes.shape} {sizes.dtype}")
    if (sizes < 1).any() or (sizes[:, 0] > h).any() or (sizes[:, 1] > w).any():
        raise ValueError(f"image_sizes must lie within the {h}x{w} input, got {sizes.tolist()}")
    return sizes.astype(np.int32)


# ------------------------------------------------------------------------------------------------
# Faster R-CNN's transform, outside the exported program


def detection_inputs(
    model: nnx.Module, photos: Sequence[Any], input_hw: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """torchvision's ``GeneralizedRCNNTransform`` for a Faster R-CNN artifact of ``input_hw``
    (default: ``min_size`` squared): each HWC photo in [0, 1] normalized, resized (shorter side
    ``min_size``, longer at most ``max_size``) and put at the top-left of a zero input.

    Returns (images (N, H, W, 3) float32, image_sizes (N, 2) int32, the photos' (h, w)). The
    artifact's detections equal the model's (``model(photos)``) when ``input_hw`` is the padded
    size torchvision's transform gives the batch (the largest resized size rounded up to a multiple
    of 32); a photo whose resized size does not fit is refused, naming the size it needs."""
    if not isinstance(model, FasterRCNN):
        raise ExportError(f"detection_inputs is Faster R-CNN's transform, not {type(model).__name__}'s")
    cfg = model.config
    h, w = _check_input_hw("faster_rcnn", input_hw, model)
    resized, sizes, originals = normalize_and_resize_images(
        photos, cfg.image_mean, cfg.image_std, lambda ph, pw: resized_size(ph, pw, cfg.min_size, cfg.max_size)
    )
    batch = np.zeros((len(resized), h, w, 3), np.float32)
    for i, (img, (rh, rw)) in enumerate(zip(resized, sizes, strict=True)):
        if rh > h or rw > w:
            need = [-(-s // SIZE_DIVISIBLE) * SIZE_DIVISIBLE for s in (rh, rw)]
            raise ExportError(
                f"photo {i} ({originals[i][0]}x{originals[i][1]}) resizes to {rh}x{rw}, larger than the "
                f"{h}x{w} input: export with input_size={tuple(need)} (--size {need[0]} {need[1]})"
            )
        batch[i, :rh, :rw] = np.asarray(img)
    return batch, np.asarray(sizes, np.int32), originals


def detections_per_image(
    out: Mapping[str, np.ndarray], image_sizes: np.ndarray, original_sizes: Sequence[Sequence[int]]
) -> list[dict[str, np.ndarray]]:
    """A Faster R-CNN artifact's padded outputs as the model's eval results: per image the first
    ``num_detections`` {"boxes", "scores", "labels"}, boxes mapped from the resized image back to
    the photo (what ``model(photos)`` returns)."""
    return unpad_detections(out, [tuple(s) for s in np.asarray(image_sizes)], original_sizes)
