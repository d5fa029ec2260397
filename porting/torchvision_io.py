"""torchvision checkpoints <-> mbv3_jax models.

``load_torchvision(name, weights, **kwargs)`` accepts a ``.pth`` path (a state_dict, or a training
checkpoint holding one under "model" as torchvision's reference scripts save it, or under another
``checkpoint_key`` such as their EMA weights' "model_ema"), a ``.safetensors`` file, an in-memory
state_dict, or a torchvision weights name ("IMAGENET1K_V1", "DEFAULT",
"MobileNet_V3_Large_Weights.IMAGENET1K_V2", or the enum itself) resolved through torchvision's
weights API and torch's hub cache. The state_dict of a wrapped model is unwrapped: DDP's and
AveragedModel's ``module.`` and torch.compile's ``_orig_mod.`` prefixes, and AveragedModel's
``n_averaged`` counter. Files are read with ``torch.load(weights_only=True)`` (plus
``argparse.Namespace``, which the reference scripts save as "args"): a checkpoint never executes code.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from flax import nnx

import mbv3_jax.models as jax_models
from porting.mapping import (
    WeightMappingError,
    convert_to_jax,
    convert_to_torch,
    format_path,
    load_into,
    model_variables,
)
from porting.qat import (
    QAT_MOBILENET_V3_RULES,
    QAT_MODELS,
    build_qat_torchvision,
    qat_tensors,
    qat_to_torchvision,
    quantizable_torchvision,
)
from porting.rules import mobilenet_v3_features_rules, rules_for


class CheckpointError(ValueError):
    """A checkpoint file or object that cannot be read as a torchvision state_dict."""


# ------------------------------------------------------------------------------------------------
# torchvision side


def build_torchvision_model(architecture: Mapping[str, Any]) -> torch.nn.Module:
    """The torchvision model (random init, train mode) for an mbv3_jax ``model.architecture``."""
    builder, kwargs = architecture["builder"], dict(architecture["kwargs"])
    kwargs.pop("dtype", None)
    kwargs.pop("param_dtype", None)
    if builder == "MobileNetV3":
        from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3

        table = []
        for row in kwargs.pop("inverted_residual_setting"):
            cfg = InvertedResidualConfig(
                row["input_channels"],
                row["kernel"],
                row["expanded_channels"],
                row["out_channels"],
                row["use_se"],
                row["activation"],
                row["stride"],
                row["dilation"],
                width_mult=1.0,
            )
            # mbv3_jax stores final channel counts; don't let torchvision round them again.
            cfg.input_channels = row["input_channels"]
            cfg.expanded_channels = row["expanded_channels"]
            cfg.out_channels = row["out_channels"]
            table.append(cfg)
        return MobileNetV3(table, **kwargs)
    if builder == "fcn_mobilenet_v3_large":
        return _fcn_mobilenet_v3_large(**kwargs)
    if builder.startswith("fasterrcnn_mobilenet_v3_large"):
        return _faster_rcnn(builder, **kwargs)
    if builder == "ssdlite320_mobilenet_v3_large":
        return _ssdlite(**kwargs)
    if builder in QUANTIZED_MODELS:
        return build_quantized_torchvision(kwargs)
    if builder in QAT_MODELS:
        return build_qat_torchvision(kwargs)
    if builder in _HAS_BACKBONE_WEIGHTS:  # never download backbone weights for an empty model
        kwargs.setdefault("weights_backbone", None)
    return torchvision.models.get_model(builder, weights=None, **kwargs)


_HAS_BACKBONE_WEIGHTS = {"lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"}
_HAS_AUX_HEAD = {"deeplabv3_mobilenet_v3_large", "fcn_mobilenet_v3_large"}


def _faster_rcnn(
    builder: str,
    num_classes: int = 91,
    frozen_batchnorm: bool = False,
    trainable_backbone_layers: int | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """torchvision's ``_fasterrcnn_mobilenet_v3_large_fpn`` with the norm layer made explicit:
    FrozenBatchNorm2d (what torchvision picks for trained weights) or BatchNorm2d (from scratch)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import _mobilenet_extractor
    from torchvision.models.detection.faster_rcnn import FasterRCNN
    from torchvision.ops.misc import FrozenBatchNorm2d

    norm_layer = FrozenBatchNorm2d if frozen_batchnorm else torch.nn.BatchNorm2d
    backbone = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm_layer)
    trainable = (
        trainable_backbone_layers if trainable_backbone_layers is not None else (3 if frozen_batchnorm else 6)
    )
    backbone = _mobilenet_extractor(backbone, True, trainable)
    defaults: dict[str, Any] = {"rpn_score_thresh": 0.05}
    if builder.endswith("_320_fpn"):
        defaults.update(min_size=320, max_size=640, rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=150)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **{**defaults, **kwargs})


def _ssdlite(
    num_classes: int = 91,
    reduced_tail: bool = True,
    norm_layer: Mapping[str, Any] | None = None,
    trainable_backbone_layers: int | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """torchvision's ``ssdlite320_mobilenet_v3_large`` without downloads: its own builder for the
    reduced tail (what it builds without backbone weights), the same composition with the full
    tail (what it builds on ImageNet backbone weights). ``norm_layer`` is mbv3_jax's record."""
    import functools

    from torchvision.models.detection import ssdlite
    from torchvision.models.detection._utils import retrieve_out_channels
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.ops.misc import FrozenBatchNorm2d

    norm = None
    if norm_layer is not None:
        options = {"norm": "batch", "bn_eps": 1e-5, "bn_momentum": 0.1, **norm_layer}
        if options["norm"] == "frozen":
            norm = functools.partial(FrozenBatchNorm2d, eps=options["bn_eps"])
        else:
            norm = functools.partial(
                torch.nn.BatchNorm2d, eps=options["bn_eps"], momentum=options["bn_momentum"]
            )
    if reduced_tail:
        return ssdlite.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=num_classes, norm_layer=norm, **kwargs
        )
    # torchvision's builder with weights_backbone set, minus the download.
    norm = norm or functools.partial(torch.nn.BatchNorm2d, eps=0.001, momentum=0.03)
    backbone = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm, reduced_tail=False)
    trainable = 6 if trainable_backbone_layers is None else trainable_backbone_layers
    backbone = ssdlite._mobilenet_extractor(backbone, trainable, norm)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    out_channels = retrieve_out_channels(backbone, (320, 320))
    head = ssdlite.SSDLiteHead(out_channels, anchors.num_anchors_per_location(), num_classes, norm)
    defaults = {
        "score_thresh": 0.001,
        "nms_thresh": 0.55,
        "detections_per_img": 300,
        "topk_candidates": 300,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    return ssdlite.SSD(backbone, anchors, (320, 320), num_classes, head=head, **{**defaults, **kwargs})


def _fcn_mobilenet_v3_large(num_classes: int = 21, aux_loss: bool = False) -> torch.nn.Module:
    """torchvision's FCN with its FCNHead on the dilated MobileNetV3-Large, composed as
    torchvision composes DeepLabV3 on that backbone (torchvision has no builder for it)."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    features = torchvision.models.mobilenet_v3_large(weights=None, dilated=True).features
    cn = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    out_pos, aux_pos = cn[-1], cn[-4]
    return_layers = {str(out_pos): "out"}
    if aux_loss:
        return_layers[str(aux_pos)] = "aux"
    backbone = IntermediateLayerGetter(features, return_layers=return_layers)
    aux = FCNHead(features[aux_pos].out_channels, num_classes) if aux_loss else None
    return FCN(backbone, FCNHead(features[out_pos].out_channels, num_classes), aux)


# Names that are files even where they do not exist (then: FileNotFoundError, not "unknown weights").
_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")


def _weights_enum(name: str, weights: Any) -> torchvision.models.WeightsEnum | None:
    """Resolve a weights name or enum for model ``name``; None if ``weights`` is not a name."""
    if isinstance(weights, torchvision.models.WeightsEnum):
        return weights
    if not isinstance(weights, str) or os.path.exists(weights) or weights.endswith(_FILE_SUFFIXES):
        return None
    enum_cls = torchvision.models.get_model_weights(name)
    member = weights.split(".")[-1]
    if "." in weights and weights.split(".")[0] != enum_cls.__name__:
        raise ValueError(f"weights {weights!r} are not weights of {name} ({enum_cls.__name__})")
    try:
        return enum_cls[member]
    except KeyError:
        raise ValueError(
            f"{weights!r} is neither a file nor a weights name of {name}; "
            f"known: {', '.join(['DEFAULT', *enum_cls.__members__])}"
        ) from None


def _is_weights_name(weights: Any) -> bool:
    if isinstance(weights, torchvision.models.WeightsEnum):
        return True
    return isinstance(weights, str) and not os.path.exists(weights) and not weights.endswith(_FILE_SUFFIXES)


def hub_cache_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torch's hub keeps the file for ``weights`` (TORCH_HOME/hub/checkpoints/<name>)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


# Globals a training checkpoint may hold besides tensors and plain containers, allowed for one load:
# torchvision's reference scripts save their command line as "args", an argparse.Namespace (plain data;
# the weights-only unpickler creates it without running its __init__).
CHECKPOINT_SAFE_GLOBALS: list[Any] = [argparse.Namespace]
# What wrappers put before every key of the wrapped model's state_dict: DistributedDataParallel and
# AveragedModel (torch.optim.swa_utils; torchvision's ExponentialMovingAverage) "module.",
# torch.compile's OptimizedModule "_orig_mod.". Nested wrappers stack them in any order.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_checkpoint(path: str | os.PathLike, checkpoint_key: str | None = None) -> dict[str, torch.Tensor]:
    """A state_dict from a ``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` file; see
    :func:`state_dict_from` for ``checkpoint_key`` and the wrappers it unwraps."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    obj = _load_safetensors(path) if _is_safetensors(path) else _torch_load(path)
    return state_dict_from(obj, checkpoint_key, source=str(path))


def _torch_load(path: Path) -> Any:
    # Allow the extra globals for this load only, and leave a caller's own allowlist as it was.
    extra = [g for g in CHECKPOINT_SAFE_GLOBALS if g not in torch.serialization.get_safe_globals()]
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(extra):
            # torch's own TypedStorage notice when it rebuilds quantized tensors
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, not a torch file, ...
        raise CheckpointError(
            f"could not read {path} as a torch checkpoint (truncated, corrupt, or it needs code to be "
            f"executed, which weights_only=True refuses): {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e


def _is_safetensors(path: Path) -> bool:
    """Named ``.safetensors``, or laid out as one: an 8-byte little-endian header size, then the JSON
    header (a torch zip starts "PK", a legacy torch pickle with its protocol byte 0x80)."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") <= size - 8


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"{path} is a safetensors file: reading it needs the 'safetensors' package, part of the torch "
            "extra (pip install 'mbv3-jax[torch]')",
            name="safetensors",
        ) from e
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # truncated, bad header, ...
        raise CheckpointError(
            f"could not read {path} as a safetensors file (truncated or corrupt?): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e


def _describe_keys(obj: Mapping[str, Any], limit: int = 12) -> str:
    keys = list(obj)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}]"


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _is_tensor_entry(key: str, value: Any) -> bool:
    return (hasattr(value, "shape") and hasattr(value, "dtype")) or _is_packed_params_entry(key, value)


def state_dict_from(
    obj: Any, checkpoint_key: str | None = None, source: str = "checkpoint"
) -> dict[str, Any]:
    """The state_dict in ``obj``: ``obj[checkpoint_key]``, or with ``checkpoint_key=None`` ``obj["model"]``
    where that is a mapping (a training checkpoint of torchvision's reference scripts), else ``obj``.

    The state_dict of a wrapped model is unwrapped: a prefix of :data:`WRAPPER_PREFIXES` carried by
    every key is stripped (repeatedly, any order), and an AveragedModel's ``n_averaged`` counter (beside
    keys that all start with "module.") is dropped. Raises :class:`CheckpointError` naming the keys
    when ``checkpoint_key`` is not there or the selection is not a state_dict."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: expected a state_dict (a mapping of tensors), got {type(obj).__name__}"
        )
    if checkpoint_key is not None:
        if checkpoint_key not in obj:
            if obj and all(_is_tensor_entry(k, v) for k, v in obj.items()):
                raise CheckpointError(
                    f"{source}: checkpoint_key={checkpoint_key!r} was given, but this is a plain state_dict "
                    f"({len(obj)} tensors: {_describe_keys(obj, 3)}): leave checkpoint_key out"
                )
            raise CheckpointError(
                f"{source}: checkpoint_key={checkpoint_key!r} is not in the checkpoint; its keys: "
                f"{_describe_keys(obj)}"
            )
        selected = obj[checkpoint_key]
        if not isinstance(selected, Mapping):
            raise CheckpointError(
                f"{source}: checkpoint_key={checkpoint_key!r} holds {_a(type(selected).__name__)}, not a "
                f"state_dict; the checkpoint's keys: {_describe_keys(obj)}"
            )
        obj, where = selected, f"{source}[{checkpoint_key!r}]"
    elif isinstance(obj.get("model"), Mapping):
        obj, where = obj["model"], f"{source}['model']"
    else:
        where = source
    bad = [k for k, v in obj.items() if not _is_tensor_entry(k, v)]
    if bad:
        if where != source:
            raise CheckpointError(f"{where}: entries {bad[:5]} are not tensors; not a state_dict")
        candidates = [k for k, v in obj.items() if isinstance(v, Mapping)]
        raise CheckpointError(
            f"{source}: entries {bad[:5]} are not tensors; a training checkpoint holds the state_dict "
            f"under a key: pass it as checkpoint_key (keys holding a mapping: {candidates}; all keys: "
            f"{_describe_keys(obj)})"
        )
    return _unwrap(obj, where)


def _unwrap(state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Strip wrapper prefixes and AveragedModel's counter (see :func:`state_dict_from`), keeping torch's
    per-module versions (``_metadata``, which loading a QAT checkpoint into torch reads) in step."""
    metadata = getattr(state_dict, "_metadata", None)
    out: dict[str, Any] = dict(state_dict)
    others = [k for k in out if k != "n_averaged"]
    if "n_averaged" in out and others and all(k.startswith("module.") for k in others):
        del out["n_averaged"]  # AveragedModel's counter; the averaged model is under "module."
    while out:
        for prefix in WRAPPER_PREFIXES:
            carrying = [k for k in out if k.startswith(prefix)]
            if len(carrying) == len(out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                if metadata is not None:
                    metadata = _strip_metadata(metadata, prefix)
                break
            if carrying:
                without = next(k for k in out if not k.startswith(prefix))
                raise CheckpointError(
                    f"{source}: some keys carry the wrapper prefix {prefix!r} (e.g. {carrying[0]!r}) and "
                    f"some do not (e.g. {without!r}); a wrapped model's state_dict has it on every key"
                )
        else:
            break
    if metadata is None:
        return out
    result = collections.OrderedDict(out)
    result._metadata = metadata  # type: ignore[attr-defined]
    return result


def _strip_metadata(metadata: Mapping[str, Any], prefix: str) -> collections.OrderedDict[str, Any]:
    """State_dict ``_metadata`` (module path -> version) of the wrapped module: the wrapper's own entry
    ("") is dropped, the wrapped module's (``prefix`` less its dot) becomes the root."""
    name = prefix[:-1]
    out: collections.OrderedDict[str, Any] = collections.OrderedDict()
    for key, value in metadata.items():
        if key == name:
            out[""] = value
        elif key.startswith(prefix):
            out[key[len(prefix) :]] = value
    return out


def _is_packed_params_entry(key: str, value: Any) -> bool:
    """A converted quantized Linear's ``_packed_params``: a (weight, bias) tuple and a dtype."""
    if key.endswith("._packed_params._packed_params"):
        return isinstance(value, tuple) and all(v is None or isinstance(v, torch.Tensor) for v in value)
    return key.endswith("._packed_params.dtype") and isinstance(value, torch.dtype)


def resolve_weights(
    name: str, weights: Any, checkpoint_key: str | None = None, progress: bool = True
) -> tuple[dict[str, Any], torchvision.models.WeightsEnum | None, str]:
    """(state_dict, weights enum or None, description of the source) for any accepted ``weights``."""
    if isinstance(weights, Mapping):
        return state_dict_from(weights, checkpoint_key, "state_dict"), None, "in-memory state_dict"
    enum = _weights_enum(name, weights)
    if enum is None:
        if not isinstance(weights, (str, os.PathLike)):
            raise TypeError(
                f"weights must be a path, a state_dict or a weights name, got {type(weights).__name__}"
            )
        return read_checkpoint(weights, checkpoint_key), None, str(weights)
    cached = hub_cache_file(enum)
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(enum.url, str(cached), progress=progress)
        except Exception as e:
            raise FileNotFoundError(
                f"{enum} is not in the torch hub cache and could not be downloaded ({type(e).__name__}). "
                f"Offline, put the file from {enum.url} at {cached}"
            ) from e
    return read_checkpoint(cached, checkpoint_key), enum, f"{enum} ({cached})"


# ------------------------------------------------------------------------------------------------
# Public API


def _describe(name: str, kwargs: Mapping[str, Any]) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


# model -> (classifier whose ``features`` its backbone is, key prefix there, key prefix and JAX path
# root in the model)
BACKBONES: dict[str, tuple[str, str, str]] = {
    "lraspp_mobilenet_v3_large": ("mobilenet_v3_large", "features", "backbone"),
    "deeplabv3_mobilenet_v3_large": ("mobilenet_v3_large", "features", "backbone"),
    "fcn_mobilenet_v3_large": ("mobilenet_v3_large", "features", "backbone"),
    "ssdlite320_mobilenet_v3_large": ("mobilenet_v3_large", "features", "backbone.features"),
}
# Models whose backbone keeps the classifier's numbering under another torch naming: the classifier
# keys are mapped with the classifier's own table onto the JAX path root, not renamed.
_BACKBONE_RULES: dict[str, list] = {
    "ssdlite320_mobilenet_v3_large": mobilenet_v3_features_rules("features", "backbone.features"),
}
# Builder arguments that torchvision implies by building on backbone weights.
_BACKBONE_KWARGS: dict[str, dict[str, Any]] = {"ssdlite320_mobilenet_v3_large": {"reduced_tail": False}}


def detector_options(name: str, state_dict: Mapping[str, Any]) -> dict[str, bool]:
    """The builder options a detector's torchvision checkpoint implies: ``frozen_batchnorm`` for a
    Faster R-CNN (torchvision builds detectors from trained weights with FrozenBatchNorm2d, which keeps
    no batch counters), ``reduced_tail`` for SSDlite (halved unless built on ImageNet backbone
    weights: the last block's width says)."""
    if name.startswith("fasterrcnn_"):
        return {"frozen_batchnorm": not any(k.endswith("num_batches_tracked") for k in state_dict)}
    if name == "ssdlite320_mobilenet_v3_large":
        last = state_dict.get("backbone.features.1.3.0.weight")
        return {"reduced_tail": last is None or tuple(last.shape)[0] != 960}
    return {}


def load_torchvision(
    name: str,
    weights: Any = None,
    *,
    weights_backbone: Any = None,
    checkpoint_key: str | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> nnx.Module:
    """Build ``name`` with torchvision's keyword arguments and load torchvision ``weights`` into it.

    With ``weights=None`` and ``weights_backbone`` (e.g. "IMAGENET1K_V1" for a segmentation
    model), only the backbone is loaded, from the classifier's checkpoint, as torchvision's
    builders do; the heads keep their fresh initialisation (for fine-tuning).

    ``checkpoint_key`` picks the state_dict in a training checkpoint (a file or a dict), e.g.
    "model_ema" for the EMA weights torchvision's reference scripts save beside "model"; by default
    "model" where the checkpoint has it, else the whole object. A missing key raises
    :class:`CheckpointError` listing the checkpoint's keys. Wrapped models' state_dicts load as they
    are saved: DDP's and AveragedModel's "module." and torch.compile's "_orig_mod." prefixes are
    stripped, AveragedModel's "n_averaged" counter dropped. ``.safetensors`` files are read with
    the safetensors package.

    For DeepLabV3 / FCN, ``aux_loss`` defaults to whether the checkpoint has the auxiliary head.

    For ``quantized_mobilenet_v3_large``: a converted quantized state_dict (quantized weights, packed
    Linear params, scale / zero_point buffers), or torchvision's published format, the state_dict of
    the prepared QAT model (``IMAGENET1K_QNNPACK_V1``), which is converted here with torch as
    torchvision's builder does, with ``torch.backends.quantized.engine`` = ``backend`` (the
    requantization rounding the JAX model follows, default "qnnpack").

    For ``qat_mobilenet_v3_large``: the state_dict of torchvision's QAT-prepared model (weights,
    BatchNorm statistics, every fake quant's flags, qparams and observer min / max), loaded into
    ``mbv3_jax.models.qat`` with ``backend`` (default "qnnpack") naming the QAT qconfig it was
    prepared with; returned in train mode, as ``prepare_qat`` leaves torch's.

    Returns the NNX model in eval mode. The mapping is strict: any unexpected, missing or
    mis-shaped tensor raises :class:`porting.mapping.WeightMappingError` naming it.
    """
    if weights is None:
        if weights_backbone is None:
            raise ValueError(f"{name}: give weights (a file, state_dict or name) or weights_backbone")
        return _load_backbone_only(name, weights_backbone, checkpoint_key, progress, kwargs)
    if name in QAT_MODELS and _is_weights_name(weights):
        raise ValueError(
            f"{name} loads the state_dict of a QAT-prepared model (a file or a dict), not {weights!r}: "
            "torchvision publishes no QAT checkpoint; its quantized weights are the converted integer "
            "model (load them with 'quantized_mobilenet_v3_large')"
        )
    state_dict, enum, source = resolve_weights(name, weights, checkpoint_key, progress)
    if enum is not None and "categories" in enum.meta:
        n = len(enum.meta["categories"])
        if kwargs.setdefault("num_classes", n) != n:
            raise ValueError(f"{enum} has {n} classes, but num_classes={kwargs['num_classes']} was asked")
    for key, value in detector_options(name, state_dict).items():
        kwargs.setdefault(key, value)
    if name in _HAS_AUX_HEAD and "aux_loss" not in kwargs:
        # The checkpoint says whether it has the auxiliary head (torchvision's COCO weights do).
        kwargs["aux_loss"] = any(k.startswith("aux_classifier.") for k in state_dict)
    if (name in QUANTIZED_MODELS or name in QAT_MODELS) and enum is not None and "backend" in enum.meta:
        kwargs.setdefault("backend", enum.meta["backend"])
    if name in QUANTIZED_MODELS:
        state_dict = quantized_tensors(state_dict, kwargs, source)
    if name in QAT_MODELS:
        state_dict = qat_tensors(state_dict, source)
    if name in jax_models.QAT_BUILDERS:
        model = jax_models.QAT_BUILDERS[name](**kwargs)
    else:
        model = jax_models.get_model(name, **kwargs)
    arrays = convert_to_jax(
        state_dict,
        model,
        QAT_MOBILENET_V3_RULES if name in QAT_MODELS else rules_for(model.architecture["builder"]),
        context=f"{source} does not fit {_describe(name, kwargs)} "
        "(a checkpoint of another model or configuration?)",
    )
    load_into(model, arrays)
    if name in QAT_MODELS:
        model.train()
        return model
    model.eval()
    return model


def _load_backbone_only(
    name: str, weights_backbone: Any, checkpoint_key: str | None, progress: bool, kwargs: dict[str, Any]
) -> nnx.Module:
    if name not in BACKBONES:
        raise ValueError(f"{name} has no separate backbone weights; models with one: {sorted(BACKBONES)}")
    classifier, source_prefix, prefix = BACKBONES[name]
    state_dict, _, source = resolve_weights(classifier, weights_backbone, checkpoint_key, progress)
    # torchvision keeps the classifier's `features` and drops its classification layers.
    tensors = {k: v for k, v in state_dict.items() if k.startswith(source_prefix + ".")}
    kwargs = {**_BACKBONE_KWARGS.get(name, {}), **kwargs}
    model = jax_models.get_model(name, **kwargs)
    rules = _BACKBONE_RULES.get(name)
    if rules is None:  # the model's torch keys are the classifier's under a prefix
        start = len(source_prefix)
        tensors = {prefix + k[start:]: v for k, v in tensors.items()}
        rules = rules_for(model.architecture["builder"])
    arrays = convert_to_jax(
        tensors,
        model,
        rules,
        strict=False,
        context=f"{source} is not a {classifier} checkpoint that fits the backbone of {name}",
    )
    root = tuple(prefix.split("."))
    missing = [p for p in model_variables(model) if p[: len(root)] == root and p not in arrays]
    if missing:
        raise WeightMappingError(
            f"{source} does not fill the backbone of {name}: missing "
            + ", ".join(format_path(p) for p in missing[:5])
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    load_into(model, arrays)
    model.eval()
    return model


def to_torchvision(model: nnx.Module) -> collections.OrderedDict[str, torch.Tensor]:
    """The model's weights as a torchvision state_dict (loads with ``strict=True``; checked here)."""
    architecture = model.architecture
    if architecture["builder"] in QUANTIZED_MODELS:
        return _quantized_to_torchvision(model)
    if architecture["builder"] in QAT_MODELS:
        return qat_to_torchvision(model)
    tv_model = build_torchvision_model(architecture)
    reference = tv_model.state_dict()
    arrays = convert_to_torch(
        model, {k: tuple(v.shape) for k, v in reference.items()}, rules_for(architecture["builder"])
    )
    # Cast on the numpy side: torch cannot take bfloat16 numpy arrays (a bf16-parameter model).
    state_dict = collections.OrderedDict(
        (k, torch.from_numpy(np.array(arrays[k], dtype=v.numpy().dtype))) for k, v in reference.items()
    )
    try:
        tv_model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # would be a bug in the mapping tables
        raise WeightMappingError(f"torchvision rejected the exported state_dict: {e}") from e
    return state_dict


def save_torchvision(model: nnx.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``torch.save(to_torchvision(model), path)``, atomically (a temporary file renamed into place):
    an interrupted save never leaves a partial file at ``path``."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    state_dict = to_torchvision(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state_dict, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def torchvision_from_state_dict(
    architecture: Mapping[str, Any], state_dict: Mapping[str, Any]
) -> torch.nn.Module:
    """torchvision's model for an mbv3_jax ``architecture`` with ``state_dict`` loaded strictly, in eval
    mode (a quantized one packed for the engine of ``architecture["kwargs"]["backend"]``)."""
    builder = architecture["builder"]
    tv_model = build_torchvision_model(architecture)
    engine = architecture["kwargs"].get("backend", "qnnpack") if builder in QUANTIZED_MODELS else None
    try:
        with quantized_engine(engine) if engine else contextlib.nullcontext(), _quiet_quantization():
            tv_model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise WeightMappingError(f"the state_dict does not fit torchvision's {builder}: {e}") from e
    return tv_model.eval()


def run_torchvision_classifier(
    tv_model: torch.nn.Module, images: np.ndarray, engine: str | None = None
) -> np.ndarray:
    """Logits of a torchvision classifier for normalized NHWC float images (``engine``: the quantized
    engine a converted model's weights are packed for)."""
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2)))
    with quantized_engine(engine) if engine else contextlib.nullcontext(), torch.inference_mode():
        return tv_model(x).float().numpy()


# ------------------------------------------------------------------------------------------------
# Quantized models (torch's eager-mode quantization, converted)

QUANTIZED_MODELS = {"quantized_mobilenet_v3_large", "QuantizedMobileNetV3"}
# The qconfig torchvision's quantized MobileNetV3 uses (and its published QAT weights were trained
# with): per-tensor symmetric int8 weights, which is what the JAX integer model implements.
QAT_QCONFIG_BACKEND = "qnnpack"


def x86_backend_here() -> str:
    """The ``QuantizedMobileNetV3`` backend that computes what torch's "x86" engine computes on this
    CPU: "x86_vnni" where torch packs convs for oneDNN (Linux, oneDNN built in, AVX512-VNNI: the
    condition of torch's ``should_use_onednn_quant``), "x86_amx" where oneDNN then runs them on
    AMX-INT8, else "x86" (FBGEMM). oneDNN's ISA cap ``ONEDNN_MAX_CPU_ISA`` (``DNNL_MAX_CPU_ISA``) is
    honoured: below an ``*AMX*`` level oneDNN runs its VNNI kernels (torch still packs for oneDNN: it
    looks at the hardware)."""
    capabilities = torch.cpu.get_capabilities()
    vnni = bool(capabilities.get("avx512_vnni", False))
    if not (sys.platform.startswith("linux") and torch.backends.mkldnn.is_available() and vnni):
        return "x86"
    return "x86_amx" if capabilities.get("amx_int8", False) and onednn_isa_allows_amx() else "x86_vnni"


def onednn_isa_allows_amx() -> bool:
    """Whether oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``, else ``DNNL_MAX_CPU_ISA``; read once, at
    oneDNN's first use) leaves it its AMX kernels: unset, ``ALL`` or a level that names AMX."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL"
    return cap.strip().upper() == "ALL" or "AMX" in cap.upper()


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Run with ``torch.backends.quantized.engine = engine`` (weights are packed for the engine
    current at ``convert`` / ``load_state_dict`` time, and kernels are chosen by it)."""
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"quantized engine {engine!r} is not available in this torch build; "
            f"supported: {torch.backends.quantized.supported_engines}"
        )
    saved = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = saved


@contextlib.contextmanager
def _quiet_quantization() -> Iterator[None]:
    # torch.ao.quantization's deprecation notice and "observer not run" warnings for an
    # uncalibrated reference model say nothing about the conversion here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\.ao\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize.*", category=UserWarning)
        yield


def _torchvision_quantizable_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in ("backend", "dropout", "weights", "quantize")}


def build_quantized_torchvision(kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """torchvision's converted quantized MobileNetV3-Large (``quantize=True, weights=None``: default
    qparams) for mbv3_jax builder kwargs, packed for the engine of ``kwargs["backend"]``."""
    from torchvision.models.quantization import mobilenet_v3_large

    engine = kwargs.get("backend", "qnnpack")
    with quantized_engine(engine), _quiet_quantization():
        if "inverted_residual_setting" in kwargs:  # QuantizedMobileNetV3: another block table
            table_kwargs = {k: v for k, v in kwargs.items() if k != "backend"}
            return quantizable_torchvision(table_kwargs | {"dropout": 0.0}, quantize=True)
        tv_kwargs = _torchvision_quantizable_kwargs(kwargs)
        return mobilenet_v3_large(weights=None, quantize=True, backend=QAT_QCONFIG_BACKEND, **tv_kwargs)


def is_qat_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """A state_dict of a *prepared QAT* model (fake-quant observers, unfolded BatchNorm): the format
    of torchvision's published quantized MobileNetV3 weights."""
    return any(".weight_fake_quant." in k or "activation_post_process." in k for k in state_dict)


def convert_qat_state_dict(
    state_dict: Mapping[str, Any], kwargs: Mapping[str, Any], engine: str = "qnnpack"
) -> collections.OrderedDict[str, Any]:
    """What torchvision's ``quantization.mobilenet_v3_large(weights=..., quantize=True)`` does with its
    QAT checkpoint: fuse, QAT qconfig, ``prepare_qat``, load, ``convert`` (under ``engine``).
    Returns the converted model's state_dict."""
    from torchvision.models.quantization import mobilenet_v3_large

    with quantized_engine(engine), _quiet_quantization():
        model = mobilenet_v3_large(weights=None, quantize=False, **_torchvision_quantizable_kwargs(kwargs))
        model.fuse_model(is_qat=True)
        model.qconfig = torch.ao.quantization.get_default_qat_qconfig(QAT_QCONFIG_BACKEND)
        model.train()
        torch.ao.quantization.prepare_qat(model, inplace=True)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise WeightMappingError(
                f"the QAT checkpoint does not fit torchvision's prepared QAT quantized MobileNetV3 "
                f"({kwargs}): {e}"
            ) from e
        torch.ao.quantization.convert(model, inplace=True)
        model.eval()
        return model.state_dict()


def expand_quantized_state_dict(state_dict: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """A converted quantized state_dict as plain arrays for the declarative mapping: each quantized
    weight ``K`` becomes ``K`` (int8 values) and ``K.q_scale``; a Linear's packed params
    ``P._packed_params._packed_params`` become ``P.weight`` / ``P.bias``."""
    out: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.is_quantized:
            if value.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                raise WeightMappingError(
                    f"{source}: key {key!r} is quantized {value.qscheme()}; the JAX integer model takes "
                    "per-tensor weights (torchvision's qnnpack qconfig), not the x86 qconfig's per-channel"
                )
            if value.dtype != torch.qint8 or value.q_zero_point() != 0:
                raise WeightMappingError(
                    f"{source}: key {key!r} is {value.dtype} with zero point {value.q_zero_point()}; "
                    "expected symmetric qint8 weights (zero point 0)"
                )
            out[key] = value.int_repr().numpy()
            out[key + ".q_scale"] = np.asarray(value.q_scale(), dtype=np.float32)
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu().numpy()
        else:
            out[key] = value

    for key, value in state_dict.items():
        if key.endswith("._packed_params.dtype"):
            if value != torch.qint8:
                raise WeightMappingError(
                    f"{source}: key {key!r} is {value}; only qint8 Linear weights are supported"
                )
            continue
        if key.endswith("._packed_params._packed_params"):
            prefix = key[: -len("_packed_params._packed_params")]
            weight, bias = value
            put(prefix + "weight", weight)
            if bias is not None:
                put(prefix + "bias", bias)
            continue
        put(key, value)
    return out


def quantized_tensors(
    state_dict: Mapping[str, Any], kwargs: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """The arrays the quantized mapping table reads, from a converted state_dict or (converted here
    with torch first) a QAT one."""
    if is_qat_state_dict(state_dict):
        state_dict = convert_qat_state_dict(state_dict, kwargs, kwargs.get("backend", "qnnpack"))
    return expand_quantized_state_dict(state_dict, source)


def _quantized_to_torchvision(model: nnx.Module) -> collections.OrderedDict[str, Any]:
    """The integer model as a converted torchvision state_dict (quantized weights, packed Linear
    params, scale / zero_point buffers), checked by loading it into torchvision's converted model."""
    architecture = model.architecture
    engine = architecture["kwargs"].get("backend", "qnnpack")
    tv_model = build_quantized_torchvision(architecture["kwargs"])
    reference = tv_model.state_dict()
    expected = expand_quantized_state_dict(reference, "torchvision's converted model")
    arrays = convert_to_torch(
        model, {k: np.shape(v) for k, v in expected.items()}, rules_for(architecture["builder"])
    )

    def tensor(key: str, like: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.array(arrays[key], dtype=like.numpy().dtype))

    def qweight(key: str) -> torch.Tensor:
        values = torch.from_numpy(np.array(arrays[key], dtype=np.int8))
        return torch._make_per_tensor_quantized_tensor(values, float(arrays[key + ".q_scale"]), 0)

    state_dict: collections.OrderedDict[str, Any] = collections.OrderedDict()
    for key, value in reference.items():
        if key.endswith("._packed_params.dtype"):
            state_dict[key] = torch.qint8
        elif key.endswith("._packed_params._packed_params"):
            prefix = key[: -len("_packed_params._packed_params")]
            bias = None if value[1] is None else tensor(prefix + "bias", value[1].detach())
            state_dict[key] = (qweight(prefix + "weight"), bias)
        elif value.is_quantized:
            state_dict[key] = qweight(key)
        else:
            state_dict[key] = tensor(key, value.detach())
    # Module versions: a quantized Linear reads its packed params by the version recorded here.
    state_dict._metadata = reference._metadata  # type: ignore[attr-defined]
    try:
        with quantized_engine(engine), _quiet_quantization():
            tv_model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # would be a bug in the mapping tables
        raise WeightMappingError(f"torchvision rejected the exported state_dict: {e}") from e
    return state_dict
