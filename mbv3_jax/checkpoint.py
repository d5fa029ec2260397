"""Save and load models with orbax-checkpoint; the directory records the architecture.

Layout of a saved directory::

    DIR/architecture.json   {"format": ..., "builder": ..., "kwargs": {...}}
    DIR/state/              orbax checkpoint of every variable (params, BatchNorm statistics)

Writes are atomic: everything goes to a sibling temporary directory that is renamed into place
only when complete, so an interrupted save never leaves a half-written DIR behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

FORMAT = "mbv3_jax.checkpoint/1"
_ARCH_FILE = "architecture.json"
_STATE_DIR = "state"


def _state_dict(model: nnx.Module) -> dict[str, Any]:
    return nnx.to_pure_dict(nnx.state(model))


def save(model: nnx.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save ``model`` (weights, BatchNorm statistics, architecture) to ``directory``, atomically.

    Written by the calling process alone: in a multi-process run, call it from one process (the
    training script's own checkpoints are ``train.checkpointing``'s, written by all processes).
    """
    if not hasattr(model, "architecture"):
        raise TypeError(f"{type(model).__name__} has no .architecture record; build it with mbv3_jax.models")
    target = Path(directory).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        record = {"format": FORMAT, **model.architecture}
        (tmp / _ARCH_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        checkpointer = ocp.StandardCheckpointer(multiprocessing_options=_this_process_only())
        checkpointer.save(tmp / _STATE_DIR, _state_dict(model))
        checkpointer.wait_until_finished()
        checkpointer.close()
        if target.exists():
            # Swap in the new copy first, then remove the old one: never a moment without a valid DIR.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_architecture(directory: str | os.PathLike) -> dict[str, Any]:
    """The architecture record of a saved model directory."""
    path = Path(directory) / _ARCH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a mbv3_jax checkpoint: {path} is missing")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if record.get("format") != FORMAT:
        raise ValueError(
            f"{path}: unsupported checkpoint format {record.get('format')!r}, expected {FORMAT!r}"
        )
    return {"builder": record["builder"], "kwargs": record["kwargs"]}


def _this_process_only() -> ocp.options.MultiprocessingOptions:
    """orbax options for I/O by this process alone: by default orbax coordinates every process of a
    ``jax.distributed`` run (barriers), so a save or load called on one process would wait forever."""
    return ocp.options.MultiprocessingOptions(primary_host=None, active_processes={jax.process_index()})


def load(directory: str | os.PathLike, *, eval_mode: bool = True) -> nnx.Module:
    """Rebuild the saved model and restore its variables; returned in eval mode by default.

    Every process that calls it reads the whole model for itself (also inside a multi-process
    ``jax.distributed`` run), onto its first local device.
    """
    from mbv3_jax.models import build_from_architecture

    directory = Path(directory).absolute()
    model = build_from_architecture(read_architecture(directory))
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=local), _state_dict(model)
    )
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=_this_process_only())
    try:
        restored = checkpointer.restore(directory / _STATE_DIR, target)
    except Exception as e:
        raise ValueError(f"could not restore {directory / _STATE_DIR} into {model.architecture}: {e}") from e
    finally:
        checkpointer.close()
    nnx.update(model, restored)
    if eval_mode:
        model.eval()
    return model
