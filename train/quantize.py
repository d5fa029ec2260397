"""``mbv3-quantize``: a quantization-aware training run -> torchvision's integer MobileNetV3.

The last step of torchvision's ``train_quantization.py`` recipe: the QAT model of a ``mbv3-train`` run
with ``qat.enabled`` (its latest checkpoint, or ``--step``) is converted as
``torch.ao.quantization.convert`` does (``mbv3_jax.models.qat.convert``: BatchNorm folded, weights
quantized to int8 with the observers' qparams) and written as

* ``OUT`` — the JAX integer model (``mbv3_jax.save``; ``mbv3_jax.load`` reads it), and
* ``--pth FILE`` — torchvision's converted quantized state_dict (``torch.save``), which
  ``torchvision.models.quantization.mobilenet_v3_large(quantize=True)`` (or the quantizable class
  with the run's block table) loads strictly.

``--eval`` then measures top-1 on the run's eval split for the QAT model (fake quantization, JAX),
the JAX integer model and, with ``--pth``, torchvision's quantized model loaded from that file with
``torch.load(weights_only=True)`` and run by torch under the integer model's engine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mbv3_jax.checkpoint import check_target, read_architecture
from mbv3_jax.checkpoint import save as save_model
from mbv3_jax.models import build_from_architecture, qat
from train import augment, checkpointing, data
from train.average import set_model_state
from train.config import TrainConfig, config_from_dict
from train.trainer import QATSchedule


def _run_config(workdir: Path) -> TrainConfig:
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a mbv3-train workdir?")
    return config_from_dict(json.loads(path.read_text()))


def load_qat_run(
    workdir: str | os.PathLike, step: int | None = None
) -> tuple[qat.QATMobileNetV3, int, dict[str, Any]]:
    """The QAT model of a run's checkpoint (latest by default) with the recipe's switches as they stand
    after that step (observers off / BatchNorm frozen once their epochs are over), the step and the
    checkpoint's metadata (its eval metrics among them)."""
    workdir = Path(workdir)
    config = _run_config(workdir)
    architecture = read_architecture(workdir)
    model = build_from_architecture(architecture)
    if not isinstance(model, qat.QATMobileNetV3):
        raise ValueError(
            f"{workdir} trained a {architecture['builder']}, not a QAT model: train with --qat.enabled=true"
        )
    state, meta, step = checkpointing.restore_host(workdir, step)
    set_model_state(model, state["params"], state["batch_stats"])
    spe = int(meta.get("steps_per_epoch") or round(step / meta["epoch"]))
    QATSchedule.from_config(config.qat, spe).for_train_step(model, step)
    model.eval()
    return model, step, meta


def _eval_batches(config: TrainConfig, data_dir: str | None) -> tuple[Any, int]:
    d = config.data
    split = data.open_split(
        d.dataset,
        d.eval_split,
        data_dir=data_dir or d.data_dir,
        image_folder=d.image_folder,
        image_key=d.image_key,
        label_key=d.label_key,
        eval_fallback=True,  # the run evaluated on this split too
    )
    batch = config.train.eval_batch or config.train.global_batch
    transform = augment.eval_transform(d.eval_resize, d.eval_crop, d.mean, d.std)
    return data.eval_batches(split, transform, batch), data.num_eval_steps(split, batch)


def quantize_run(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    pth: str | os.PathLike | None = None,
    backend: str = "qnnpack",
    evaluate: bool = False,
    data_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert a QAT run's checkpoint to the integer model (``backend``: whose requantization it
    follows), save it to ``out`` (and torchvision's state_dict to ``pth``); optionally evaluate.
    Returns ``{"step", "out", "pth", and with evaluate: "count", "top1_qat", "top1_int8",
    "top1_torch", "int8_torch_disagreements"}``."""
    workdir = Path(workdir)
    check_target(out, overwrite=overwrite, protect=[workdir])  # before any work
    if pth is not None:
        pth_path = Path(pth)
        if pth_path.resolve() == workdir.resolve() or workdir.resolve() in pth_path.resolve().parents:
            raise ValueError(f"refusing to write --pth {pth} inside the run it converts, {workdir}")
        if os.path.lexists(pth_path) and (not overwrite or not pth_path.is_file() or pth_path.is_symlink()):
            raise FileExistsError(
                f"{pth} already exists; pass --overwrite to replace it"
                if not overwrite
                else f"refusing to overwrite {pth}: not a regular file"
            )
    model, step, meta = load_qat_run(workdir, step)
    try:
        qmodel = model.convert(backend)
    except NotImplementedError as e:
        raise ValueError(f"{workdir}: {e}") from None
    result: dict[str, Any] = {
        "step": step,
        "out": str(save_model(qmodel, out, overwrite=overwrite, protect=[workdir])),
        "pth": None,
    }
    tv_model = None
    if pth is not None:
        from porting.torchvision_io import read_checkpoint, save_torchvision, torchvision_from_state_dict

        result["pth"] = str(save_torchvision(qmodel, pth, overwrite=overwrite))
        if evaluate:  # what a torch user gets: the file read back safely, loaded strictly
            tv_model = torchvision_from_state_dict(qmodel.architecture, read_checkpoint(pth))
    if evaluate:
        # The run evaluated the QAT model at this step already (same split and preprocessing, observers
        # off): reuse that figure rather than compile the fake-quant forward again.
        run_top1 = meta.get("metrics", {}).get("top1")
        batches = _eval_batches(_run_config(workdir), data_dir)
        result |= _evaluate(
            model if run_top1 is None else None, qmodel, tv_model, backend, *batches, progress
        )
        if run_top1 is not None:
            result["top1_qat"] = float(run_top1)
    return result


def _evaluate(model, qmodel, tv_model, engine: str, batches, total: int, progress: bool) -> dict[str, Any]:
    """Top-1 of the QAT model (unless None), the JAX integer model and torch's (unless None)."""
    models = {"top1_int8": qmodel}
    if model is not None:
        QATSchedule.for_eval(model)
        models["top1_qat"] = model
    correct = dict.fromkeys([*models, *(["top1_torch"] if tv_model is not None else [])], 0)
    disagree, count = 0, 0
    for images, labels, weights in tqdm(
        batches, total=total, desc="eval", unit="batch", disable=not progress
    ):
        keep = np.asarray(weights) > 0
        labels = np.asarray(labels)[keep]
        predictions = {key: np.argmax(np.asarray(m(images)), -1)[keep] for key, m in models.items()}
        if tv_model is not None:
            from porting.torchvision_io import run_torchvision_classifier

            logits = run_torchvision_classifier(tv_model, images, engine)
            predictions["top1_torch"] = np.argmax(logits, -1)[keep]
            disagree += int(np.sum(predictions["top1_torch"] != predictions["top1_int8"]))
        for key, predicted in predictions.items():
            correct[key] += int(np.sum(predicted == labels))
        count += int(keep.sum())
    if count == 0:
        raise ValueError("the eval split is empty")
    out: dict[str, Any] = {"count": count, **{k: v / count for k, v in correct.items()}}
    if tv_model is not None:
        out["int8_torch_disagreements"] = disagree
    return out
