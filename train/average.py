"""Weight averaging of a run's checkpoints (torchvision's last step: the last 3 that improved top-1)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from mbv3_jax.checkpoint import check_target, read_architecture, save
from mbv3_jax.models import build_from_architecture, qat
from train import checkpointing
from train.metrics import read_csv


def improving_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps whose eval metric (top-1, or a segmentation run's mIoU) beat every earlier evaluation of
    the run (from metrics.csv)."""
    path = Path(workdir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a mbv3-train workdir?")
    best, steps = -1.0, []
    for row in read_csv(path):
        key = next((k for k in checkpointing.RANKING_METRICS if k in row), None)
        if row.get("kind") == "eval" and key is not None and row[key] > best:
            best = row[key]
            steps.append(row["step"])
    return steps


def average_trees(trees: list[Any]) -> Any:
    """Elementwise mean of float leaves (in float64, cast back); other leaves from the last tree."""

    def mean(*leaves: np.ndarray) -> np.ndarray:
        last = np.asarray(leaves[-1])
        if not np.issubdtype(last.dtype, np.floating):
            return last
        return np.mean([np.asarray(x, np.float64) for x in leaves], axis=0).astype(last.dtype)

    return jax.tree.map(mean, *trees)


def average_checkpoints(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    num: int = 3,
    steps: list[int] | None = None,
    overwrite: bool = False,
) -> tuple[Path, list[int]]:
    """Average params and BatchNorm statistics of ``steps`` (default: the last ``num`` improving
    checkpoints still on disk) and save the model with :func:`mbv3_jax.save`. ``out`` may not be, contain
    or lie inside ``workdir``; ``overwrite`` replaces only a model saved there before."""
    workdir = Path(workdir)
    check_target(out, overwrite=overwrite, protect=[workdir])  # before any work
    architecture = read_architecture(workdir)
    model = build_from_architecture(architecture)
    if isinstance(model, qat.QATMobileNetV3):
        raise ValueError(
            f"{workdir} is a quantization-aware training run: averaging its checkpoints would mix "
            "observer ranges (and so scales and zero points) from different steps; convert one "
            "checkpoint instead: mbv3-quantize WORKDIR --out DIR [--step N]"
        )
    manager = checkpointing.make_manager(workdir, create=False, async_save=False)
    available = set(manager.all_steps())
    manager.close()
    if not available:
        raise FileNotFoundError(f"no checkpoints in {checkpointing.checkpoint_dir(workdir)}")
    if steps is None:
        if num < 1:
            raise ValueError(f"--num must be >= 1, got {num}")
        kept = [s for s in improving_steps(workdir) if s in available]
        if not kept:
            raise ValueError(f"no checkpoint in {workdir} improved top-1 (none kept with eval metrics)")
        steps = kept[-num:]
    missing = [s for s in steps if s not in available]
    if missing:
        raise FileNotFoundError(f"no checkpoint at steps {missing} in {workdir}; have {sorted(available)}")
    params, stats = [], []
    for step in steps:
        state, _, _ = checkpointing.restore_host(workdir, step)
        params.append(state["params"])
        stats.append(state["batch_stats"])
    set_model_state(model, average_trees(params), average_trees(stats))
    model.eval()
    return save(model, out, overwrite=overwrite, protect=[workdir]), list(steps)


def set_model_state(model: nnx.Module, params: Any, batch_stats: Any) -> None:
    """Put a training state's ``params`` / ``batch_stats`` (pure dicts, as restored) into ``model``,
    checked key by key and shape by shape against the model's variables."""
    template = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    merged = _align(nnx.to_pure_dict(template), _merge_dicts(params, batch_stats))
    nnx.replace_by_pure_dict(template, merged)
    nnx.update(model, template)


def _merge_dicts(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge_dicts(out[k], v) if k in out else v
        return out
    return b


def _align(template: Any, got: Any, path: str = "") -> Any:
    """``got`` with ``template``'s keys (orbax restores list indices as strings), checked to match."""
    if not isinstance(template, dict):
        if np.shape(got) != np.shape(template):
            raise ValueError(
                f"checkpoint {path}: shape {np.shape(got)}, the run's model has {np.shape(template)}"
            )
        return got
    if not isinstance(got, dict):
        raise ValueError(f"checkpoint does not fit the run's architecture at {path or 'root'}")
    by_str = {str(k): v for k, v in got.items()}
    diff = sorted({str(k) for k in template} ^ set(by_str))
    if diff:
        raise ValueError(
            f"checkpoint keys differ from the run's architecture at {path or 'root'}: {diff[:5]}"
        )
    return {k: _align(v, by_str[str(k)], f"{path}.{k}") for k, v in template.items()}
