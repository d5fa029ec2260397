"""Training configuration: nested dataclasses, configuration files, and ``--section.field=value`` overrides.

A configuration file is a Python file that defines ``get_config() -> TrainConfig`` (see ``train/configs/``:
``torchvision.py`` is torchvision's MobileNetV3 recipe, ``tf_mode.py`` the paper's TensorFlow recipe,
``digits.py`` the small offline demo, ``qat.py`` torchvision's quantization-aware training of
MobileNetV3-Large, ``digits_qat.py`` QAT of the digits demo's model). Copy one, edit it, and pass its
path to ``mbv3-train --config``; flags override single fields:
``mbv3-train --config digits --optim.lr=0.01 --train.epochs=5``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    """The model: a torchvision builder name and its keyword arguments. A segmentation builder
    (``lraspp_mobilenet_v3_large``, ``deeplabv3_mobilenet_v3_large``, ``fcn_mobilenet_v3_large``)
    trains on masks with torchvision's segmentation criterion; the others classify."""

    name: str = "mobilenet_v3_large"
    num_classes: int | None = None  # None: the dataset's number of classes
    width_mult: float = 1.0
    dropout: float = 0.2
    # BatchNorm momentum (torch convention). torchvision: 0.01 (for 600 epochs); short runs want ~0.1.
    bn_momentum: float | None = None
    # Keep only the first N inverted-residual blocks of the table (a shallower MobileNetV3, still
    # torchvision's MobileNetV3 class): quick tests and tiny data sets. None: the full network.
    blocks: int | None = None
    dtype: str = "float32"  # compute dtype; "bfloat16" computes in bf16 with fp32 parameters
    param_dtype: str = "float32"  # "float64" (with dtype "float64") turns on jax_enable_x64 for the run
    # Fine-tuning: a torchvision .pth/.pt file or a mbv3_jax.save directory. A classifier head whose
    # class count differs from num_classes is re-initialised.
    init: str | None = None
    # Detection / segmentation: a MobileNetV3-Large classifier checkpoint (torchvision's ImageNet .pth,
    # or a mbv3_jax.save directory) whose features initialise the backbone (torchvision's
    # weights_backbone; as there, Faster R-CNN's backbone BatchNorm is then frozen and its last 3
    # stages train, and SSDlite's last blocks keep their full width).
    backbone_init: str | None = None
    # Segmentation: DeepLabV3 / FCN's auxiliary FCN head on the stride-8 features, its loss weighted
    # aux_weight (torchvision's references: 0.5).
    aux_loss: bool = False
    aux_weight: float = 0.5
    # Detection: train only the last N backbone stages (0..6; torchvision's trainable_backbone_layers,
    # for fine-tuning from model.init); None trains every layer.
    trainable_backbone_layers: int | None = None


@dataclass
class QATConfig:
    """Quantization-aware training (torchvision's ``train_quantization.py``): the classifier is built
    as configured (``model.init``: the float weights to start from), then fused and prepared for QAT
    (``mbv3_jax.models.qat.from_float``); ``mbv3-quantize`` converts the result to the integer model.

    The switches follow the reference script, which after training epoch ``e`` (counting from 0)
    disables the observers once ``e >= num_observer_update_epochs`` and freezes BatchNorm once
    ``e >= num_batch_norm_update_epochs``: observers update during the first N + 1 epochs, BatchNorm
    statistics during the first M + 1. Here they are functions of the step (exact on resume)."""

    enabled: bool = False
    backend: str = "qnnpack"  # the QAT qconfig: "qnnpack" (per-tensor weights, torchvision's) or "x86"
    num_observer_update_epochs: int = 4
    num_batch_norm_update_epochs: int = 3


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented."""

    # Any TFDS image-classification dataset, or "sklearn_digits"; for segmentation a TFDS dataset with
    # an RGB image and a one-channel mask image (label_key), e.g. "mbv3_shapes" (the offline demo's).
    dataset: str = "imagenet2012"
    data_dir: str | None = None  # TFDS data_dir (default: TFDS's, ~/tensorflow_datasets)
    image_folder: str | None = None  # a folder of class sub-folders (or train/ and val/ splits of them)
    # Detection / segmentation from COCO-format folders: <coco_folder>/<split>/annotations.json + images,
    # or COCO's layout, <coco_folder>/annotations/instances_<split>.json + <coco_folder>/<split>/.
    coco_folder: str | None = None
    coco_categories: tuple[int, ...] = ()  # only these COCO category ids, labelled 1..K in this order
    # "contiguous": the folder's categories as labels 1..K; "category_id": their ids as labels (COCO's
    # 80 categories as a 91-class head, as torchvision's COCO models)
    coco_labels: str = "contiguous"
    train_split: str = "train"
    eval_split: str = "validation"
    image_key: str = "image"
    label_key: str = "label"
    # "global": every process reads its slice of each global batch (results independent of the
    # number of processes); "process": each process reads its own even split of the data set.
    process_sharding: str = "global"
    train_crop: int = 224  # RandomResizedCrop size
    crop_scale: tuple[float, float] = (0.08, 1.0)
    random_resized_crop: bool = True  # False: resize the shorter side to train_crop, center crop
    hflip: bool = True
    auto_augment: str | None = "imagenet"  # None or "imagenet"
    random_erasing: float = 0.2
    eval_resize: int = 256
    eval_crop: int = 224  # segmentation: the eval size, resized images padded to it (mask 255)
    # Segmentation: torchvision's RandomResize of the shorter side between resize_range x base_size
    # (train_crop: the random crop; eval_resize: the eval images' shorter side).
    # Detection: boxes per image in a batch (padded, so every step has one shape; more is an error) and
    # the ssdlite preset's RandomIoUCrop. The objects are read from label_key ("objects" if it is "label").
    max_boxes: int = 100
    iou_crop: bool = True
    # Images that keep their aspect ratio (Faster R-CNN's; segmentation's eval images): "grouped" puts
    # images of one padded shape in each batch, one compilation per shape (training: the smallest of a
    # few buckets that holds each image, as torchvision groups by aspect ratio; evaluation: each
    # image's own size rounded up to eval_size_divisible, as torchvision evaluates one image at a
    # time); "square" pads every image to one square (Faster R-CNN: its max_size; segmentation eval:
    # eval_crop), one compilation.
    batch_shapes: str = "grouped"
    eval_size_divisible: int | None = None  # None: 32 for Faster R-CNN (torchvision's), 1 for segmentation
    base_size: int = 520
    resize_range: tuple[float, float] = (0.5, 2.0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    worker_count: int = 0  # grain worker processes (0: decode in the training process)
    shuffle: bool = True


@dataclass
class OptimConfig:
    """Optimizer and schedule. The learning rate is ``lr * global_batch / reference_batch``."""

    optimizer: str = "rmsprop_torch"  # "rmsprop_torch" | "rmsprop_tf" | "sgd"
    lr: float = 0.064
    reference_batch: int = 1024
    momentum: float = 0.9
    alpha: float = 0.9  # RMSProp decay (torch's alpha, TF's decay/rho)
    eps: float = 0.0316  # torch: outside the sqrt; TF: inside (tf_mode uses 1e-3)
    weight_decay: float = 1e-5
    norm_weight_decay: bool = True  # torchvision's default decays BN parameters and biases too
    # "step" (StepLR per epoch) | "exponential" | "constant" | "cosine" | "poly" (PolynomialLR, power
    # 0.9, per step: torchvision's segmentation recipe) | "multistep" (MultiStepLR: x lr_gamma at each
    # of lr_milestones, in epochs: torchvision's Faster R-CNN recipe)
    schedule: str = "step"
    lr_step_epochs: float = 2.0
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.973
    warmup_epochs: float = 0.0
    # The warm-up in iterations instead, at most the first epoch's less one (torchvision's detection
    # reference: min(1000, len(data_loader) - 1)).
    warmup_steps: int | None = None
    warmup_start_factor: float = 0.01  # the lr factor the linear warm-up starts at (detection: 0.001)
    label_smoothing: float = 0.0
    aux_lr_mult: float = 1.0  # the aux head's lr x this (torchvision's segmentation reference: 10)
    ema_decay: float | None = None  # e.g. 0.9999: keep an exponential moving average of the weights


@dataclass
class TrainLoopConfig:
    """Length of the run, batch size, evaluation and logging."""

    epochs: float = 600.0
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    global_batch: int = 1024
    eval_batch: int | None = None  # default: global_batch
    eval_every_epochs: float = 1.0
    eval_every_steps: int | None = None
    eval_at_start: bool = False  # also evaluate the untrained model (a step-0 eval row)
    log_every_steps: int = 10
    seed: int = 0
    progress: bool = True


@dataclass
class MeshConfig:
    """Device mesh: ``data`` x ``fsdp``; the batch is split over both, parameters over ``fsdp``."""

    data: int = -1  # -1: all devices not used by fsdp
    fsdp: int = 1
    fsdp_min_size: int = 2**14  # parameters with fewer elements stay replicated


@dataclass
class CheckpointConfig:
    """orbax CheckpointManager: periodic saves, last N and best N by top-1, asynchronous."""

    every_steps: int | None = None  # default: at each evaluation
    keep_last: int = 3
    keep_best: int = 3
    async_save: bool = True


@dataclass
class DistributedConfig:
    """Multi-process: initialise jax.distributed when a coordinator is given (or JAX_* env vars)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_count: int | None = None  # CPU only: simulated devices per process


@dataclass
class TrainConfig:
    """Everything a run needs; ``workdir`` holds checkpoints, metrics.csv, TensorBoard events and plots."""

    name: str = "mobilenet_v3_large-torchvision"
    workdir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tensorboard: bool = True
    plot: bool = True  # draw metrics.png at each evaluation and at the end

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


class ConfigError(ValueError):
    """A configuration file, name or override that cannot be applied."""


def available_configs() -> list[str]:
    """Names of the configuration files shipped in ``train/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_config(name_or_path: str) -> TrainConfig:
    """A shipped configuration by name (``digits``) or a configuration file's path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.py"
        if not path.is_file():
            raise ConfigError(
                f"unknown configuration {name_or_path!r}: not a file, nor one of {available_configs()}"
            )
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_mbv3_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config() function")
    config = module.get_config()
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected TrainConfig")
    return config


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(text: str, typ: Any, key: str) -> Any:
    """Parse a flag value as the field's type (``None``/``none`` for optional fields)."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _convert(text, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is tuple:
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[T, ...]: any count
            return tuple(_convert(p.strip(), args[0], key) for p in parts)
        if len(parts) != len(args):
            raise ConfigError(f"--{key} expects {len(args)} comma-separated values, got {text!r}")
        return tuple(_convert(p.strip(), a, key) for p, a in zip(parts, args, strict=True))
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key} expects true/false, got {text!r}")
    if typ in (int, float, str):
        try:
            return typ(text)
        except ValueError:
            raise ConfigError(f"--{key} expects {typ.__name__}, got {text!r}") from None
    raise ConfigError(f"--{key}: cannot parse a value of type {typ}")


def override(config: TrainConfig, key: str, value: str) -> None:
    """Set ``config.<key>`` (dotted, e.g. ``optim.lr``) from its text form, with the field's type."""
    parts = key.replace("-", "_").split(".")
    obj: Any = config
    for i, part in enumerate(parts):
        types_ = _field_types(type(obj))
        if part not in types_:
            where = ".".join(parts[:i]) or "the configuration"
            prefix = ".".join(parts[:i]) + "." if i else ""
            known = [prefix + n for n in types_]
            close = difflib.get_close_matches(prefix + part, known, n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown option --{key}: {where} has no field {part!r}{hint}")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(types_[part]):
                raise ConfigError(f"--{key} is a section; set one of its fields, e.g. --{key}.<field>=...")
            setattr(obj, part, _convert(value, types_[part], key))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"--{key}: {'.'.join(parts[: i + 1])} is not a section")


def apply_overrides(config: TrainConfig, args: list[str]) -> TrainConfig:
    """Apply ``--a.b=value`` / ``--a.b value`` flags (and top-level ``--workdir=...``) in order."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --optim.lr=0.01")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"option {arg} needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        override(config, key, value)
    return config


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from ``to_dict()`` output (what a run records in its workdir)."""

    def build(cls: type, values: dict[str, Any]) -> Any:
        hints = _field_types(cls)
        kwargs = {}
        for name, value in values.items():
            typ = hints.get(name)
            if typ is None:
                continue
            if dataclasses.is_dataclass(typ):
                kwargs[name] = build(typ, value)
            elif isinstance(value, list):
                kwargs[name] = tuple(value)
            else:
                kwargs[name] = value
        return cls(**kwargs)

    return build(TrainConfig, data)
