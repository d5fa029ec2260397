"""Sharded classification training: one ``jax.jit`` step over a (data, fsdp) mesh, orbax checkpoints.

The NNX model is split once into a graph definition and pure-dict pytrees (parameters, BatchNorm
statistics); the step merges them back inside ``jax.jit`` (``in_shardings``/``out_shardings`` from
:mod:`train.sharding`), takes the gradient of the cross-entropy, applies the optax optimizer and returns
the new state. The whole training state is one dict::

    {"step": int32, "rng": uint32[2] (dropout key data), "params": {...}, "batch_stats": {...},
     "opt_state": optax state, "ema": {"params", "batch_stats"} (optional)}

Dropout in step ``t`` uses ``fold_in(rng, t)``, the data order is a function of (seed, step): restoring a
checkpoint's state and step resumes the run exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from mbv3_jax import optim
from mbv3_jax.checkpoint import FORMAT, architecture_difference, describe_architecture, read_architecture
from mbv3_jax.checkpoint import load as load_saved_model
from mbv3_jax.layers import BatchNorm
from mbv3_jax.models import MobileNetV3, get_model, mobilenet_v3_config, qat
from mbv3_jax.variables import copy_by_path, describe_mismatch, format_path, variables_by_path
from train import augment, batching, checkpointing, data, sharding
from train.config import TrainConfig
from train.metrics import MetricsWriter, plot_metrics
from train.tasks import Classification, Detection, Segmentation, Task

State = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


_HEAD = ("classifier_out",)  # the last Linear: re-initialised when the class count differs


def _saved_model_arrays(directory: Path) -> dict[tuple, np.ndarray]:
    """The variables of a ``mbv3_jax.save`` directory (each process reads it for itself)."""
    return {p: np.asarray(v.get_value()) for p, v in variables_by_path(load_saved_model(directory)).items()}


def _init_arrays(path: Path, model: nnx.Module) -> dict[tuple, np.ndarray]:
    """``{variable path: array}`` from a torchvision .pth/.pt or a ``mbv3_jax.save`` directory."""
    if path.is_dir():
        saved = read_architecture(path)
        # Checked before loading: another architecture's variables would only give a long list of misfits.
        if architecture_difference(saved, model.architecture, ignore=("num_classes",)):
            raise ValueError(
                f"--model.init {path} is a {describe_architecture(saved)}, the configured model a "
                f"{describe_architecture(model.architecture)}: set --model.name (and width_mult, blocks) "
                "to the saved model's, or initialise from a checkpoint of this architecture"
            )
        return _saved_model_arrays(path)
    try:
        from porting.mapping import convert_to_jax
        from porting.rules import rules_for
        from porting.torchvision_io import read_checkpoint
    except ImportError as e:  # pragma: no cover - needs the torch extra
        raise ImportError("initialising from a .pth needs torch: pip install 'mbv3-jax[torch]'") from e
    state_dict = read_checkpoint(path)
    builder = model.architecture["builder"]
    if task_kind(builder) == "classification":  # a detection or segmentation model loads whole
        head = state_dict.get("classifier.3.weight")
        if head is None:
            raise ValueError(
                f"{path} is not a torchvision MobileNetV3 classifier checkpoint (no classifier.3.weight)"
            )
        if int(head.shape[0]) != model.num_classes:  # fine-tuning to other classes: keep the fresh head
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("classifier.3.")}
    return convert_to_jax(state_dict, model, rules_for(builder), strict=False, context=f"--model.init {path}")


def _detector_options_of(name: str, path: Path) -> dict[str, bool]:
    """How torchvision built the detector whose .pth ``path`` is (frozen BatchNorm, SSDlite's tail)."""
    try:
        from porting.torchvision_io import detector_options, read_checkpoint
    except ImportError as e:  # pragma: no cover - needs the torch extra
        raise ImportError("initialising from a .pth needs torch: pip install 'mbv3-jax[torch]'") from e
    return detector_options(name, read_checkpoint(path))


def load_init(model: nnx.Module, init: str | os.PathLike) -> list[str]:
    """Load pretrained weights into ``model``; a head with another class count stays freshly initialised.

    Every other parameter and BatchNorm statistic must come from ``init`` with its shape. Returns the
    names of the variables left at their initialisation (the head, when re-initialised).
    """
    path = Path(init).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model.init {path} does not exist")
    variables = variables_by_path(model)
    arrays = _init_arrays(path, model)
    # A head the checkpoint lacks, or has for another class count, keeps its initialisation.
    fresh = [
        p
        for p, var in variables.items()
        if p[: len(_HEAD)] == _HEAD and (p not in arrays or np.shape(arrays[p]) != tuple(var.shape))
    ]
    copy_by_path(
        {p: array for p, array in arrays.items() if p not in fresh},
        {p: var for p, var in variables.items() if p not in fresh},
        context=f"--model.init {path} does not fit the configured model",
        describe=functools.partial(describe_mismatch, source="checkpoint", target="model"),
    )
    return [format_path(p) for p in fresh]


def load_backbone_init(model: nnx.Module, init: str | os.PathLike) -> int:
    """torchvision's ``weights_backbone``: the ``features`` of a MobileNetV3-Large classifier checkpoint
    (a torchvision .pth such as the ImageNet weights, or a ``mbv3_jax.save`` directory) into the
    backbone of a detection or segmentation model; every backbone variable must come from it with its
    shape, the heads keep their initialisation. Returns the number of variables loaded."""
    prefix = getattr(type(model), "backbone_features", None)
    if prefix is None:
        raise ValueError("model.backbone_init initialises a detection or segmentation model's backbone")
    path = Path(init).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model.backbone_init {path} does not exist")
    classifier = get_model("mobilenet_v3_large", num_classes=1000)
    try:
        load_init(classifier, path)
    except ValueError as e:
        raise ValueError(f"--model.backbone_init {path} is not a MobileNetV3-Large classifier's: {e}") from e
    sources = {
        p[1:]: np.asarray(v.get_value())
        for p, v in variables_by_path(classifier).items()
        if p[0] == "features"
    }
    n = len(prefix)
    targets = {p[n:]: v for p, v in variables_by_path(model).items() if p[:n] == prefix}
    # A frozen BatchNorm counts no batches: torchvision's FrozenBatchNorm2d drops the counter on load.
    sources = {p: v for p, v in sources.items() if p in targets or p[-1] != "num_batches_tracked"}
    copy_by_path(
        sources,
        targets,
        context=f"--model.backbone_init {path}: its features do not fit the backbone",
        describe=functools.partial(describe_mismatch, source="checkpoint", target="backbone"),
    )
    return len(targets)


SEGMENTATION_MODELS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_mobilenet_v3_large")


DETECTION_MODELS = (
    "ssdlite320_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
)


def keep_ratio(model: Any) -> bool:
    """Whether a detection model resizes keeping the aspect ratio (Faster R-CNN) or to a fixed size."""
    return model.keeps_aspect_ratio


def detection_input_size(model: Any) -> int:
    """The side of a square detection batch: SSDlite's fixed 320, or Faster R-CNN's max_size rounded up
    to 32 (every resized image fits it: ``data.batch_shapes square``)."""
    if not keep_ratio(model):
        return SSD_INPUT_SIZE
    return -(-model.config.max_size // 32) * 32


SSD_INPUT_SIZE = 320
DETECTIONS_FILE = "detections.json"  # the last evaluation's detections (COCO results)


def task_kind(model_name: str) -> str:
    """ "segmentation" or "detection" for those builders, else "classification"."""
    if model_name in SEGMENTATION_MODELS:
        return "segmentation"
    return "detection" if model_name in DETECTION_MODELS else "classification"


def build_model(cfg: Any, num_classes: int, seed: int = 0, qat_cfg: Any = None) -> nnx.Module:
    """The classifier of ``cfg`` (a :class:`train.config.ModelConfig`) in train mode, ready to split.

    ``cfg.init`` (a torchvision .pth or a ``mbv3_jax.save`` directory) initialises every variable but a
    classifier head of another class count. With ``qat_cfg.enabled`` (a :class:`train.config.QATConfig`)
    that float model is then prepared for quantization-aware training (``qat.from_float``).
    """
    dtype = None if cfg.dtype in ("float32", None) else jnp.dtype(cfg.dtype)
    param_dtype = jnp.dtype(cfg.param_dtype)
    if "float64" in (cfg.dtype, cfg.param_dtype) and not jax.config.jax_enable_x64:
        raise ValueError("a float64 model needs jax_enable_x64 (mbv3-train turns it on for such a config)")
    if cfg.blocks is not None:
        if cfg.name not in ("mobilenet_v3_large", "mobilenet_v3_small"):
            raise ValueError(f"--model.blocks needs a MobileNetV3 classifier, not {cfg.name}")
        table, last_channel = mobilenet_v3_config(cfg.name, cfg.width_mult)
        if not 1 <= cfg.blocks <= len(table):
            raise ValueError(f"--model.blocks must be in [1, {len(table)}] for {cfg.name}, got {cfg.blocks}")
        model = MobileNetV3(
            table[: cfg.blocks],
            last_channel,
            num_classes,
            cfg.dropout,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(seed),
        )
    elif task_kind(cfg.name) != "classification":
        if qat_cfg is not None and qat_cfg.enabled:
            raise ValueError(f"quantization-aware training needs a classifier, not {cfg.name}")
        kwargs = {"aux_loss": True} if cfg.aux_loss else {}
        if cfg.backbone_init and task_kind(cfg.name) == "detection":
            # torchvision builds from backbone weights so: Faster R-CNN's BatchNorm frozen (and its
            # last 3 stages trained), SSDlite's last blocks at full width.
            if "fasterrcnn" in cfg.name:
                kwargs["frozen_batchnorm"] = True
            else:
                kwargs["reduced_tail"] = False
        if cfg.init and Path(cfg.init).expanduser().is_file() and task_kind(cfg.name) == "detection":
            kwargs |= _detector_options_of(cfg.name, Path(cfg.init).expanduser())
        if cfg.trainable_backbone_layers is not None:
            if task_kind(cfg.name) != "detection":
                raise ValueError(f"model.trainable_backbone_layers is for detection models, not {cfg.name}")
            kwargs["trainable_backbone_layers"] = cfg.trainable_backbone_layers
        model = get_model(
            cfg.name, num_classes=num_classes, seed=seed, dtype=dtype, param_dtype=param_dtype, **kwargs
        )
    else:
        model = get_model(
            cfg.name,
            num_classes=num_classes,
            seed=seed,
            width_mult=cfg.width_mult,
            dropout=cfg.dropout,
            dtype=dtype,
        )
    if cfg.init and cfg.backbone_init:
        raise ValueError("give model.init (the whole model) or model.backbone_init (its backbone), not both")
    if cfg.init:
        load_init(model, cfg.init)
    if cfg.backbone_init:
        load_backbone_init(model, cfg.backbone_init)
    if cfg.bn_momentum is not None:
        for _, node in nnx.iter_graph(model):
            if isinstance(node, BatchNorm):
                node.momentum = cfg.bn_momentum
    model.eval_micro_batch = 0  # whole (sharded) batches; no lax.map over micro-batches
    if qat_cfg is not None and qat_cfg.enabled:
        if dtype is not None or cfg.param_dtype != "float32":
            raise ValueError("quantization-aware training runs in float32: leave model.dtype / param_dtype")
        model = qat.from_float(model, backend=qat_cfg.backend, seed=seed)
    model.train()
    return model


@dataclasses.dataclass(frozen=True)
class QATSchedule:
    """torchvision's QAT switches as functions of the step: observers update while
    ``step < observer_steps``, BatchNorm uses batch statistics while ``step < batch_norm_steps``."""

    observer_steps: int
    batch_norm_steps: int

    @classmethod
    def from_config(cls, cfg: Any, steps_per_epoch: int) -> QATSchedule:
        # The reference script switches after epoch e >= N (0-based): N + 1 epochs with the flag on.
        return cls(
            (cfg.num_observer_update_epochs + 1) * steps_per_epoch,
            (cfg.num_batch_norm_update_epochs + 1) * steps_per_epoch,
        )

    def for_train_step(self, model: nnx.Module, step: jax.Array | int) -> None:
        """The switches as they stand for ``step`` (traced in the train step, an int after a run)."""
        model.set_schedule(observe=step < self.observer_steps, freeze_bn=step >= self.batch_norm_steps)

    @staticmethod
    def for_eval(model: nnx.Module) -> None:
        # Evaluation never moves the observers (torch's script lets eval batches update them until
        # observers are disabled; here eval results depend on the trained state only).
        model.set_schedule(observe=False, freeze_bn=True)


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------


def learning_rate(cfg: Any, global_batch: int, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """The schedule of ``cfg`` (an OptimConfig), its base lr scaled linearly with the global batch."""
    base = cfg.lr * global_batch / cfg.reference_batch
    if cfg.schedule == "step":
        if cfg.lr_step_epochs != int(cfg.lr_step_epochs) or cfg.lr_step_epochs < 1:
            raise ValueError(f"schedule 'step' needs whole lr_step_epochs, got {cfg.lr_step_epochs}")
        schedule = optim.step_lr(base, steps_per_epoch, int(cfg.lr_step_epochs), cfg.lr_gamma)
    elif cfg.schedule == "exponential":
        schedule = optax.exponential_decay(
            base, max(1, round(cfg.lr_step_epochs * steps_per_epoch)), cfg.lr_gamma, staircase=True
        )
    elif cfg.schedule == "cosine":
        schedule = optim.cosine_lr(
            base, max(1, math.ceil(total_steps / steps_per_epoch)), 0.0, steps_per_epoch
        )
    elif cfg.schedule == "constant":
        schedule = optax.constant_schedule(base)
    elif cfg.schedule == "multistep":
        if not cfg.lr_milestones:
            raise ValueError("schedule 'multistep' needs optim.lr_milestones (epochs), e.g. 16,22")
        boundaries = {int(m) * steps_per_epoch: cfg.lr_gamma for m in cfg.lr_milestones}
        schedule = optax.piecewise_constant_schedule(base, boundaries)
    elif cfg.schedule == "poly":
        # torch's PolynomialLR(total_iters=total_steps, power=0.9) stepped per iteration, as
        # torchvision's segmentation reference: base * (1 - step / total) ** 0.9.
        schedule = optax.polynomial_schedule(base, 0.0, 0.9, total_steps)
    else:
        raise ValueError(
            f"unknown schedule {cfg.schedule!r}; expected step, exponential, cosine, poly, multistep "
            "or constant"
        )
    if cfg.warmup_steps is not None:  # within the first epoch, as torchvision's detection reference
        warmup = min(cfg.warmup_steps, steps_per_epoch - 1)
    else:
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if warmup:
        schedule = optim.linear_warmup(schedule, warmup, cfg.warmup_start_factor)
    return schedule


def make_optimizer(cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """``rmsprop_torch`` (torchvision), ``rmsprop_tf`` (the paper's TF1 RMSProp) or torch-style SGD;
    with ``cfg.aux_lr_mult`` the aux head's updates scaled by it (each optimizer's update is its lr times
    a term that does not depend on the lr, so this is torch's param group of lr x aux_lr_mult)."""
    tx = _optimizer(cfg, schedule)
    if cfg.aux_lr_mult == 1.0:
        return tx

    def aux_head(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "aux_classifier", params)

    return optax.chain(tx, optax.masked(optax.scale(cfg.aux_lr_mult), aux_head))


def _optimizer(cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    mask = None if cfg.norm_weight_decay else optim.weight_decay_mask
    if cfg.optimizer == "rmsprop_torch":
        return optim.rmsprop_torch(
            schedule,
            alpha=cfg.alpha,
            eps=cfg.eps,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            weight_decay_mask=mask,
        )
    if cfg.optimizer == "rmsprop_tf":
        return optim.rmsprop_tf(
            schedule,
            decay=cfg.alpha,
            momentum=cfg.momentum,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            weight_decay_mask=mask,
        )
    if cfg.optimizer == "sgd":  # torch.optim.SGD: buf = m*buf + g (+wd*theta); theta -= lr*buf
        decay = optax.add_decayed_weights(cfg.weight_decay, mask) if cfg.weight_decay else optax.identity()
        return optax.chain(decay, optax.sgd(schedule, momentum=cfg.momentum or None))
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected rmsprop_torch, rmsprop_tf or sgd")


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Steps:
    """The split model and the jitted train/eval steps for one mesh."""

    mesh: jax.sharding.Mesh
    train_step: Callable[[State, jax.Array, jax.Array], tuple[State, dict[str, jax.Array]]]
    eval_step: Callable[..., dict[str, jax.Array]]
    state_shardings: Any
    init_state: Callable[[], State]
    task: Task


def _rng_builder(rng_state: Any) -> Callable[[jax.Array], Any]:
    """Build the model's RNG-stream state (dropout) from one key: keys folded per stream, counts 0."""
    leaves, treedef = jax.tree.flatten(rng_state)
    specs = [(jnp.issubdtype(x.dtype, jax.dtypes.prng_key), x.shape, x.dtype) for x in leaves]

    def build(key: jax.Array) -> Any:
        out = [
            jax.random.fold_in(key, i) if is_key else jnp.zeros(shape, dtype)
            for i, (is_key, shape, dtype) in enumerate(specs)
        ]
        return jax.tree.unflatten(treedef, out)

    return build


def _ema_update(ema: Any, new: Any, decay: float) -> Any:
    def one(e: jax.Array, n: jax.Array) -> jax.Array:
        if jnp.issubdtype(n.dtype, jnp.floating):
            return (decay * e + (1 - decay) * n).astype(e.dtype)
        return n

    return jax.tree.map(one, ema, new)


def _put(tree: Any, shardings: Any) -> Any:
    """Host arrays (identical on every process) -> global arrays with ``shardings``."""

    def one(x: Any, s: jax.sharding.Sharding) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def make_steps(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    *,
    task: Task | None = None,
    label_smoothing: float = 0.0,
    ema_decay: float | None = None,
    seed: int = 0,
    fsdp_min_size: int = 2**14,
    qat_schedule: QATSchedule | None = None,
    trainable: Any = None,
) -> Steps:
    """Split ``model`` and build the jitted, sharded train and eval steps of ``task`` (default:
    classification with ``label_smoothing``); ``train_step(state, images, targets)``,
    ``eval_step(params, batch_stats, images, targets, weights)``. ``qat_schedule``: a QAT model's
    observer / BatchNorm switches, set from the step inside the train step. ``trainable``: an nnx
    filter of the parameters to train (a detector's ``trainable_filter()``); the others get no update,
    no weight decay and no optimizer state, as torchvision leaves ``requires_grad=False`` parameters
    out of its optimizer."""
    if task is None:
        task = Classification(label_smoothing)
    model.train()
    graphdef_train, params, batch_stats, rng_state = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.eval()
    graphdef_eval = nnx.split(model, nnx.Param, nnx.BatchStat, ...)[0]
    model.train()
    params = nnx.to_pure_dict(params)
    batch_stats = nnx.to_pure_dict(batch_stats)
    make_rngs = _rng_builder(nnx.to_pure_dict(rng_state))
    if trainable is not None:
        kept = {
            p
            for p, _ in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, trainable)))[0]
        }
        labels = jax.tree_util.tree_map_with_path(lambda p, _: "train" if p in kept else "frozen", params)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    repl = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh)

    host_state: State = {
        "step": np.zeros((), np.int32),
        "rng": np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32),
        "params": jax.tree.map(np.asarray, params),
        "batch_stats": jax.tree.map(np.asarray, batch_stats),
    }
    if ema_decay is not None:
        host_state["ema"] = {"params": host_state["params"], "batch_stats": host_state["batch_stats"]}
    abstract_opt = jax.eval_shape(tx.init, params)
    shardings: State = {
        "step": repl,
        "rng": repl,
        "params": sharding.state_shardings(params, mesh, fsdp_min_size),
        "batch_stats": sharding.state_shardings(batch_stats, mesh, fsdp_min_size),
        "opt_state": sharding.state_shardings(abstract_opt, mesh, fsdp_min_size),
    }
    if ema_decay is not None:
        shardings["ema"] = {"params": shardings["params"], "batch_stats": shardings["batch_stats"]}

    def init_state() -> State:
        state = _put({k: v for k, v in host_state.items()}, {k: shardings[k] for k in host_state})
        state["opt_state"] = jax.jit(tx.init, out_shardings=shardings["opt_state"])(state["params"])
        return state

    def train_step(state: State, images: jax.Array, targets: jax.Array) -> tuple[State, dict[str, jax.Array]]:
        step = state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        rngs = make_rngs(key)

        def loss_fn(p: Any) -> tuple[jax.Array, tuple[Any, jax.Array]]:
            m = nnx.merge(graphdef_train, p, state["batch_stats"], rngs)
            if qat_schedule is not None:
                qat_schedule.for_train_step(m, step)
            loss, metric = task.loss(m, images, targets, jax.random.fold_in(key, 1))
            return loss, (nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)), metric)

        (loss, (new_stats, metric)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        new = dict(state, step=step + 1, params=new_params, batch_stats=new_stats, opt_state=opt_state)
        if ema_decay is not None:
            new["ema"] = _ema_update(
                state["ema"], {"params": new_params, "batch_stats": new_stats}, ema_decay
            )
        return new, {"loss": loss, "lr": jnp.asarray(schedule(step), jnp.float32), "metric": metric}

    def eval_step(p: Any, stats: Any, images: jax.Array, targets: jax.Array, weights: jax.Array) -> dict:
        m = nnx.merge(graphdef_eval, p, stats, make_rngs(jax.random.key(0)))
        if qat_schedule is not None:
            qat_schedule.for_eval(m)
        return task.eval_sums(m, images, targets, weights)

    train_jit = jax.jit(
        train_step,
        in_shardings=(shardings, batch_sh, batch_sh),
        out_shardings=(shardings, repl),
        donate_argnums=0,
    )
    eval_jit = jax.jit(
        eval_step,
        in_shardings=(shardings["params"], shardings["batch_stats"], batch_sh, batch_sh, batch_sh),
        out_shardings=repl,
    )
    return Steps(mesh, train_jit, eval_jit, shardings, init_state, task)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _scalar(x: jax.Array) -> float:
    """A replicated scalar as a Python float (works across processes)."""
    return float(np.asarray(x.addressable_data(0)))


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def local_batch_offset(mesh: jax.sharding.Mesh, global_batch: int) -> tuple[int, int]:
    """(first row, rows) of the global batch that this process's devices hold (must be contiguous)."""
    sh = sharding.batch_sharding(mesh)
    rows = sorted(
        {
            (idx[0].start or 0, idx[0].stop or global_batch)
            for idx in sh.addressable_devices_indices_map((global_batch,)).values()
        }
    )
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ValueError(f"this process's devices hold rows {rows} of the batch: not one contiguous block")
    return start, stop - start


def evaluate(
    steps: Steps, params: Any, stats: Any, batches: Any, results_path: str | os.PathLike | None = None
) -> dict[str, float]:
    """The task's eval metrics over padded eval batches (weights 0 on padding): each batch's sums
    added on the host in float64 / int64 (exact counts however large the eval set); a detection task
    keeps each batch's detections and writes them to ``results_path`` (COCO results JSON)."""
    parts: list[dict[str, np.ndarray]] = []
    for images, targets, weights in batches:
        out = steps.eval_step(params, stats, *sharding.global_batch(steps.mesh, images, targets, weights))
        parts.append({k: _widened(np.asarray(v.addressable_data(0))) for k, v in out.items()})
    if not parts:
        raise ValueError("evaluation: the eval split is empty")
    return steps.task.finalize(steps.task.combine(parts), results_path)


def _widened(x: np.ndarray) -> np.ndarray:
    if x.dtype == bool:
        return x
    return x.astype(np.int64 if np.issubdtype(x.dtype, np.integer) else np.float64)


class TrainingDiverged(FloatingPointError):
    """The training loss became non-finite (NaN or infinite): the run stopped at the step it did."""


def check_config(config: TrainConfig) -> None:
    """Values no run can use, rejected before anything runs (ValueError naming the field)."""
    o = config.optim
    if not math.isfinite(o.lr) or o.lr < 0:
        raise ValueError(f"optim.lr must be a finite number >= 0, got {o.lr}")
    if not math.isfinite(o.lr_gamma) or o.lr_gamma <= 0:
        raise ValueError(f"optim.lr_gamma must be a finite number > 0, got {o.lr_gamma}")
    if not math.isfinite(o.warmup_epochs) or o.warmup_epochs < 0:
        raise ValueError(f"optim.warmup_epochs must be a finite number >= 0, got {o.warmup_epochs}")
    if o.warmup_steps is not None and o.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if not 0 < o.warmup_start_factor <= 1:
        raise ValueError(f"optim.warmup_start_factor must be in (0, 1], got {o.warmup_start_factor}")
    if o.reference_batch < 1:
        raise ValueError(f"optim.reference_batch must be >= 1, got {o.reference_batch}")
    t = config.train
    if t.global_batch < 1:
        raise ValueError(f"train.global_batch must be >= 1, got {t.global_batch}")
    if t.eval_batch is not None and t.eval_batch < 1:
        raise ValueError(f"train.eval_batch must be >= 1 (or unset: global_batch), got {t.eval_batch}")
    if config.data.max_boxes < 1:
        raise ValueError(f"data.max_boxes must be >= 1, got {config.data.max_boxes}")
    if config.data.batch_shapes not in ("grouped", "square"):
        raise ValueError(f"data.batch_shapes must be 'grouped' or 'square', got {config.data.batch_shapes!r}")
    if config.data.eval_size_divisible is not None and config.data.eval_size_divisible < 1:
        raise ValueError(f"data.eval_size_divisible must be >= 1, got {config.data.eval_size_divisible}")
    if not math.isfinite(o.aux_lr_mult) or o.aux_lr_mult < 0:
        raise ValueError(f"optim.aux_lr_mult must be a finite number >= 0, got {o.aux_lr_mult}")
    if o.aux_lr_mult != 1.0 and not config.model.aux_loss:
        raise ValueError("optim.aux_lr_mult scales the aux head's lr: set model.aux_loss (DeepLabV3)")


def run(config: TrainConfig, *, allow_config_change: bool = False) -> dict[str, Any]:
    """Train (or resume) as ``config`` says; returns the last evaluation's metrics and the final step.

    The workdir is this run's alone while it runs (:func:`train.checkpointing.setup_workdir`);
    resuming it with hyperparameters other than its ``config.json``'s needs ``allow_config_change``.
    A non-finite training loss stops the run with :class:`TrainingDiverged`; every checkpoint it
    leaves was saved before that step.
    """
    t_start = time.perf_counter()
    check_config(config)
    if "float64" in (config.model.dtype, config.model.param_dtype):
        jax.config.update("jax_enable_x64", True)
    dist = config.distributed
    sharding.maybe_initialize_distributed(
        dist.coordinator_address, dist.num_processes, dist.process_id, dist.local_device_count
    )
    if config.data.process_sharding not in ("global", "process"):
        raise ValueError(
            f"data.process_sharding must be 'global' or 'process', got {config.data.process_sharding!r}"
        )
    workdir = Path(config.workdir).absolute()
    with checkpointing.setup_workdir(workdir, config.to_dict(), allow_config_change=allow_config_change):
        return _run(config, workdir, t_start)


def _freezes_backbone_layers(cfg: Any) -> bool:
    """Whether a detector trains only its last backbone stages: as asked, or as torchvision builds it
    from backbone weights or from a checkpoint with frozen BatchNorm (3 of 6 stages by default)."""
    if task_kind(cfg.name) != "detection":
        return False
    return cfg.trainable_backbone_layers is not None or bool(cfg.backbone_init) or bool(cfg.init)


def _train_order(
    num_records: int, batch: int, seed: int, shuffle: bool, shapes: np.ndarray | None
) -> data.GlobalOrder | batching.GroupedOrder:
    """The order of the training records: batches of one shape each where ``shapes`` are given."""
    if shapes is None:
        return data.GlobalOrder(num_records, batch, seed, shuffle)
    return batching.GroupedOrder.of(shapes, batch, seed, shuffle)


def _classification_transforms(cfg_data: Any) -> tuple[Callable, Callable]:
    """(train, eval) transforms of a classification run: torchvision's presets as configured."""
    train_tf = augment.TrainTransform(
        crop=cfg_data.train_crop,
        scale=tuple(cfg_data.crop_scale),
        random_resized_crop=cfg_data.random_resized_crop,
        hflip=cfg_data.hflip,
        auto_augment=cfg_data.auto_augment,
        random_erasing=cfg_data.random_erasing,
        mean=tuple(cfg_data.mean),
        std=tuple(cfg_data.std),
    )
    eval_tf = augment.eval_transform(cfg_data.eval_resize, cfg_data.eval_crop, cfg_data.mean, cfg_data.std)
    return train_tf, eval_tf


def _check_resumable(workdir: Path, meta: dict[str, Any], architecture: dict[str, Any]) -> None:
    """Refuse, before orbax restores anything, a checkpoint of another architecture than the model
    built (its record: in the checkpoint's metadata, else the run's architecture.json)."""
    saved = meta.get("architecture")
    if saved is None:
        try:
            saved = read_architecture(workdir)
        except (OSError, ValueError):
            return  # no record to compare: the restore checks the arrays themselves
    if architecture_difference(saved, architecture):
        raise ValueError(
            f"{workdir} holds checkpoints of a {describe_architecture(saved)}; this run builds a "
            f"{describe_architecture(architecture)}, which cannot resume them. Pass another --workdir "
            "(to start from this run's weights: mbv3-average it, then --model.init the result)"
        )


def _run(config: TrainConfig, workdir: Path, t_start: float) -> dict[str, Any]:
    """:func:`run` once the workdir is claimed."""
    cfg_data, cfg_train, cfg_optim = config.data, config.train, config.optim
    proc, nproc = jax.process_index(), jax.process_count()
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    G = cfg_train.global_batch
    if G % mesh.size:
        raise ValueError(f"global batch {G} is not divisible by the {mesh.size} devices of the mesh")
    eval_G = cfg_train.eval_batch or G
    if eval_G % mesh.size:
        raise ValueError(f"eval batch {eval_G} is not divisible by the {mesh.size} devices of the mesh")

    # Data
    open_kw = dict(
        data_dir=cfg_data.data_dir,
        image_folder=cfg_data.image_folder,
        coco_folder=cfg_data.coco_folder,
        coco_categories=cfg_data.coco_categories,
        coco_labels=cfg_data.coco_labels,
        image_key=cfg_data.image_key,
        label_key=cfg_data.label_key,
    )
    per_process = cfg_data.process_sharding == "process" and nproc > 1
    kind = task_kind(config.model.name)
    if kind == "detection" and cfg_data.label_key == "label":
        open_kw["label_key"] = "objects"  # TFDS's detection sets (coco, voc) name them so
    train_split = data.open_split(
        cfg_data.dataset,
        cfg_data.train_split,
        process_shard=(proc, nproc) if per_process else None,
        kind=kind,
        **open_kw,
    )
    eval_split = data.open_split(
        cfg_data.dataset, cfg_data.eval_split, eval_fallback=True, kind=kind, **open_kw
    )
    if eval_split.split and eval_split.split != cfg_data.eval_split:
        _log(
            f"data.eval_split is {cfg_data.eval_split!r}, which the image folder lacks: evaluating on its "
            f"{eval_split.split!r} split"
        )
    num_classes = config.model.num_classes or train_split.num_classes
    if not num_classes:
        raise ValueError(f"{cfg_data.dataset}'s masks name no class count: set --model.num_classes")
    if num_classes < train_split.num_classes:  # labels >= num_classes: a NaN loss at the first such label
        raise ValueError(
            f"model.num_classes={num_classes}, but the training data has {train_split.num_classes} classes "
            f"(labels 0..{train_split.num_classes - 1}); leave model.num_classes unset to use the data's"
        )
    model = build_model(config.model, num_classes, cfg_train.seed, config.qat)
    grouped = cfg_data.batch_shapes == "grouped"
    resizes = kind == "detection" and keep_ratio(model)  # Faster R-CNN: each image keeps its aspect ratio
    train_shapes = None
    if resizes and grouped:
        sizes = batching.image_sizes(train_split, progress=proc == 0)
        train_shapes = batching.detection_train_shapes(sizes, model.config.min_size, model.config.max_size)
    offset, local = local_batch_offset(mesh, G)
    if cfg_data.process_sharding == "process":
        if nproc > 1 and train_shapes is not None and train_split.image_hw is None:
            raise ValueError(
                "data.process_sharding 'process' gives each process its own images, so the processes' "
                "batches could differ in shape at a step: use 'global', or data.batch_shapes 'square'"
            )
        seed = cfg_train.seed + 7919 * proc
        order = _train_order(len(train_split), local, seed, cfg_data.shuffle, train_shapes)
        data_offset, data_count = 0, 1
    else:
        order = _train_order(len(train_split), G, cfg_train.seed, cfg_data.shuffle, train_shapes)
        data_offset, data_count = offset // local, G // local
    if train_shapes is not None:
        counts = np.bincount(order.group_of, minlength=len(order.shapes))
        _log(
            "training batches grouped by shape (one compilation each): "
            + ", ".join(f"{h}x{w}: {n} images" for (h, w), n in zip(order.shapes, counts, strict=True))
        )
    spe = order.steps_per_epoch
    total = cfg_train.max_steps if cfg_train.max_steps is not None else max(1, round(cfg_train.epochs * spe))
    eval_every = cfg_train.eval_every_steps or max(1, round(cfg_train.eval_every_epochs * spe))
    ckpt_every = config.checkpoint.every_steps

    # Optimizer, steps
    qat_schedule = QATSchedule.from_config(config.qat, spe) if config.qat.enabled else None
    schedule = learning_rate(cfg_optim, G, spe, total)
    tx = make_optimizer(cfg_optim, schedule)
    if kind == "segmentation":
        task: Task = Segmentation(num_classes, config.model.aux_weight)
    elif kind == "detection":
        task = Detection(num_classes, train_split.category_ids, keep_ratio(model))
    else:
        task = Classification(cfg_optim.label_smoothing)
    steps = make_steps(
        model,
        tx,
        schedule,
        mesh,
        task=task,
        ema_decay=cfg_optim.ema_decay,
        seed=cfg_train.seed,
        fsdp_min_size=config.mesh.fsdp_min_size,
        qat_schedule=qat_schedule,
        trainable=model.trainable_filter() if _freezes_backbone_layers(config.model) else None,
    )
    state = steps.init_state()

    manager = checkpointing.make_manager(
        workdir,
        keep_last=config.checkpoint.keep_last,
        keep_best=config.checkpoint.keep_best,
        async_save=config.checkpoint.async_save,
        cleanup_tmp=True,  # this process holds the workdir's lock: leftovers are from killed runs
    )
    start = 0
    latest = manager.latest_step()
    if latest is not None:
        _check_resumable(workdir, checkpointing.read_meta(manager, latest), model.architecture)
        state, meta = checkpointing.restore(
            manager, latest, checkpointing.abstract(state, steps.state_shardings), check=False
        )
        start = int(meta["step"])
        if meta.get("data", {}).get("global_batch", G) != G:
            raise ValueError(
                f"{workdir} was trained with global batch {meta['data']['global_batch']}, not {G}"
            )
        _log(f"resumed from {manager.directory / str(latest)} at step {start} (epoch {start / spe:.2f})")
    if proc == 0:  # config.json: written by checkpointing.setup_workdir
        record = {"format": FORMAT, **model.architecture}
        (workdir / "architecture.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    writer = MetricsWriter(workdir, resume_step=start, tensorboard=config.tensorboard) if proc == 0 else None
    _log(
        f"{config.name}: {config.model.name} ({num_classes} classes) on {mesh.size} devices "
        f"(data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']}, {nproc} process(es)); "
        f"{len(train_split)} train / {len(eval_split)} eval images, global batch {G}, "
        f"{spe} steps/epoch, {total} steps (set up in {time.perf_counter() - t_start:.1f} s)"
    )
    if qat_schedule is not None:
        _log(
            f"quantization-aware training ({config.qat.backend} qconfig): observers update until step "
            f"{qat_schedule.observer_steps}, BatchNorm statistics until step {qat_schedule.batch_norm_steps}"
        )

    eval_shapes = None
    if kind == "segmentation" and grouped:
        eval_shapes = batching.segmentation_eval_shapes(
            batching.image_sizes(eval_split, progress=proc == 0),
            cfg_data.eval_resize,
            cfg_data.eval_size_divisible or 1,
        )
    elif resizes and grouped:
        eval_shapes = batching.detection_eval_shapes(
            batching.image_sizes(eval_split, progress=proc == 0),
            model.config.min_size,
            model.config.max_size,
            cfg_data.eval_size_divisible or 32,
        )
    if eval_shapes is not None:
        num_shapes = len(np.unique(eval_shapes, axis=0))
        hint = " (--data.eval_size_divisible 32 or 64 pads them to fewer)" if num_shapes > 64 else ""
        _log(f"evaluation: {len(eval_split)} images in {num_shapes} shape(s), one compilation each{hint}")
    if kind == "segmentation":
        mean, std = tuple(cfg_data.mean), tuple(cfg_data.std)
        eval_size = None if grouped else cfg_data.eval_crop
        eval_tf = augment.SegmentationEvalTransform(cfg_data.eval_resize, eval_size, mean, std)
        train_tf = augment.SegmentationTrainTransform(
            cfg_data.base_size, cfg_data.train_crop, cfg_data.hflip, mean, std, tuple(cfg_data.resize_range)
        )
    elif kind == "detection":
        mean, std = tuple(model.config.image_mean), tuple(model.config.image_std)  # the model's transform
        size = (None if grouped else detection_input_size(model)) if resizes else SSD_INPUT_SIZE
        box_kw = dict(size=size, max_boxes=cfg_data.max_boxes, mean=mean, std=std)
        if task.keep_ratio:
            box_kw["keep_ratio"] = (model.config.min_size, model.config.max_size)
        # torchvision's presets: "ssdlite" for SSDlite, "hflip" (flip only) for Faster R-CNN.
        iou_crop = cfg_data.iou_crop and not task.keep_ratio
        train_tf = augment.DetectionTrainTransform(iou_crop=iou_crop, hflip=cfg_data.hflip, **box_kw)
        eval_tf = augment.DetectionEvalTransform(**box_kw)
    else:
        train_tf, eval_tf = _classification_transforms(cfg_data)
    batches = data.train_batches(
        train_split,
        order,
        train_tf,
        start_step=start,
        num_steps=total,
        process_index=data_offset,
        process_count=data_count,
        worker_count=cfg_data.worker_count,
    )

    def run_eval(step: int) -> dict[str, Any]:
        eval_offset, eval_local = local_batch_offset(mesh, eval_G)
        ev = functools.partial(
            data.eval_batches,
            eval_split,
            eval_tf,
            eval_G,
            shapes=eval_shapes,
            process_index=eval_offset // eval_local,
            process_count=eval_G // eval_local,
        )
        results = workdir / DETECTIONS_FILE if kind == "detection" and proc == 0 else None
        metrics = evaluate(steps, state["params"], state["batch_stats"], ev(), results)
        row = {"step": step, "epoch": step / spe, "kind": "eval", **metrics}
        if "ema" in state:
            ema = evaluate(steps, state["ema"]["params"], state["ema"]["batch_stats"], ev())
            row |= {f"ema_{k}": ema[k] for k in steps.task.ema_metrics}
        return row

    def save(step: int, metrics: dict[str, Any] | None) -> None:
        meta = {
            "step": step,
            "epoch": step / spe,
            "steps_per_epoch": spe,
            "data": {
                "seed": cfg_train.seed,
                "position": step,
                "global_batch": G,
                "dataset": cfg_data.dataset,
                "coco_folder": cfg_data.coco_folder,  # the images' source when not the TFDS dataset
                "image_folder": cfg_data.image_folder,
            },
            "metrics": metrics or {},
            "architecture": model.architecture,
        }
        best = steps.task.best_metric
        ranked = {best: float(metrics[best])} if metrics else None
        checkpointing.save(manager, step, state, meta, ranked)
        saved.append(step)

    # A non-finite loss stops the run. The check adds no device->host sync to the steps: it reads the
    # losses where the loop reads them anyway (each log row), and before each evaluation and checkpoint
    # (which wait for the state regardless) the losses not yet read plus one jitted all-finite reduction
    # of the parameters, so that no checkpoint holds diverged parameters (a NaN learning rate or
    # gradient spoils them one step before the loss shows it).
    saved: list[int] = [start] if start else []

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def all_finite(tree: Any) -> jax.Array:
        by_dtype: dict[Any, list[jax.Array]] = {}
        for x in jax.tree.leaves(tree):
            if jnp.issubdtype(x.dtype, jnp.inexact):
                by_dtype.setdefault(x.dtype, []).append(x.ravel())
        # One reduction over each dtype's values joined: XLA compiles one reduction per leaf slowly.
        return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(jnp.concatenate(xs))) for xs in by_dtype.values()]))

    def diverged(what: str, lr: float) -> TrainingDiverged:
        if not math.isfinite(lr) or lr < 0:
            cause = f"Likely cause: the learning rate, {lr} at this step"
        else:
            cause = (
                f"Likely causes: a learning rate too high for this model and batch ({lr:.3g} at this step: "
                f"optim.lr {cfg_optim.lr} scaled to the global batch; lower it or add optim.warmup_epochs), "
                f"labels outside [0, {num_classes}) in the data (the model has {num_classes} classes)"
            )
            if config.model.dtype not in ("float32", "float64"):
                cause += f", an overflow in {config.model.dtype}"
        kept = (
            f"The last checkpoint, step {saved[-1]}, predates it and is intact ({manager.directory})"
            if saved
            else "No checkpoint was saved"
        )
        return TrainingDiverged(f"training diverged: {what}; stopped there. {cause}. {kept}.")

    def check_losses(entries: list[tuple[int, dict[str, jax.Array]]], losses: list[float]) -> None:
        for (s, o), loss in zip(entries, losses, strict=True):
            if not math.isfinite(loss):
                raise diverged(f"the loss of step {s} is {loss}", _scalar(o["lr"]))

    def check_before_save(done: int) -> None:
        check_losses(pending, [_scalar(o["loss"]) for _, o in pending])
        # Parameters only: the statistics may hold infinities by design (QAT observers start at +-inf).
        if not _scalar(all_finite(state["params"])):
            raise diverged(
                f"the parameters after step {done} are not finite (the loss was finite so far)",
                _scalar(out["lr"]),
            )

    bar = tqdm(
        total=total,
        initial=start,
        unit="step",
        desc=config.name,
        disable=not cfg_train.progress or proc != 0,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    last_eval: dict[str, Any] = {}
    pending: list[tuple[int, dict[str, jax.Array]]] = []  # (step, outputs) since the last log row
    t_log, n_log = time.perf_counter(), 0
    t0 = time.perf_counter()
    completed = False
    try:
        if cfg_train.eval_at_start and start == 0:
            last_eval = run_eval(0)
            if writer:
                writer.write(last_eval | {"time_s": time.perf_counter() - t0})
            _log(f"step 0 (untrained): eval {steps.task.summary(last_eval)}")
        for step in range(start, total):
            images, labels = next(batches)
            x, y = sharding.global_batch(mesh, images, labels)
            state, out = steps.train_step(state, x, y)
            done = step + 1
            pending.append((done, out))
            n_log += 1
            bar.update(1)
            if done % cfg_train.log_every_steps == 0 or done == total:
                losses = [_scalar(o["loss"]) for _, o in pending]
                check_losses(pending, losses)
                lr = _scalar(pending[-1][1]["lr"])
                now = time.perf_counter()
                ips = n_log * G / max(now - t_log, 1e-9)
                row = {
                    "step": done,
                    "epoch": done / spe,
                    "kind": "train",
                    "loss": float(np.mean(losses)),
                    "lr": lr,
                    steps.task.train_metric: float(np.mean([_scalar(o["metric"]) for _, o in pending])),
                    "images_per_s": ips,
                    "time_s": now - t0,
                }
                if writer:
                    writer.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}", refresh=False)
                pending, t_log, n_log = [], time.perf_counter(), 0
            if done % eval_every == 0 or done == total:
                check_before_save(done)
                last_eval = run_eval(done)
                if writer:
                    writer.write(last_eval | {"time_s": time.perf_counter() - t0})
                    if config.plot:
                        plot_metrics(writer.path)
                _log(f"step {done} (epoch {done / spe:.2f}): eval {steps.task.summary(last_eval)}")
                save(done, last_eval)
                t_log, n_log = time.perf_counter(), 0
            elif ckpt_every and done % ckpt_every == 0:
                check_before_save(done)
                save(done, None)
        completed = True
    finally:
        bar.close()
        try:  # a run already failing closes the manager without raising a second error
            checkpointing.finish(manager, raise_errors=completed)
        finally:
            if writer:
                writer.close()
    _log(f"finished step {total} in {time.perf_counter() - t_start:.1f} s")
    return {"step": total, "steps_per_epoch": spe, "workdir": str(workdir), **last_eval}
