"""orbax ``CheckpointManager`` for training runs: periodic, last N + best N by top-1, asynchronous.

A checkpoint ``workdir/checkpoints/<step>/`` holds two items: ``state`` (params, BatchNorm statistics,
optimizer state, step, dropout RNG key, EMA) and ``meta`` (JSON: step, epoch, data position and seed,
eval metrics). orbax writes to a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

# Below this many bytes per replica, a replicated array is written whole by one replica instead of in
# slices by all of them, because slicing costs one small eager op per replica and array, worth it only
# for large arrays across many hosts.
MIN_REPLICA_SLICE_BYTES = 1 << 20
_handler_registered = False


def _register_array_handler() -> None:
    global _handler_registered
    if not _handler_registered:
        handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
        _handler_registered = True


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def make_manager(
    workdir: str | os.PathLike,
    *,
    keep_last: int = 3,
    keep_best: int = 3,
    async_save: bool = True,
    create: bool = True,
) -> ocp.CheckpointManager:
    """A manager that keeps the ``keep_last`` latest checkpoints and the ``keep_best`` best by top-1."""
    _register_array_handler()
    directory = checkpoint_dir(workdir)
    if not create and not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir}: {directory} does not exist")
    keep = [policies.LatestN(n=max(1, keep_last))]
    if keep_best > 0:
        keep.append(
            policies.BestN(
                get_metric_fn=lambda m: m["top1"],
                reverse=False,
                n=keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=async_save,
        create=create,
    )
    return ocp.CheckpointManager(directory, item_names=("state", "meta"), options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    meta: dict[str, Any],
    metrics: dict[str, float] | None = None,
) -> None:
    """Start saving (asynchronously when enabled); ``metrics`` (with ``top1``) ranks it for keep-best."""
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
        force=True,
    )


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """The state (placed as ``abstract_state``'s shardings say) and metadata of checkpoint ``step``."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
    )
    return restored["state"], dict(restored["meta"])


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings: the restore target of ``tree``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_host(workdir: str | os.PathLike, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """A checkpoint's state as numpy arrays (no target needed) and its metadata; latest step by default."""
    manager = make_manager(workdir, create=False, async_save=False)
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {checkpoint_dir(workdir)}")
        step = max(steps) if step is None else step
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint at step {step} in {checkpoint_dir(workdir)}; have {steps}"
            )
        # Restore onto this process's first device whatever mesh wrote it (8 devices, 2 processes, ...),
        # with x64 on so that float64 checkpoints stay float64 in a float32 process.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        with jax.enable_x64(True):
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(fallback_sharding=device), meta=ocp.args.JsonRestore()
                ),
            )
            state = jax.tree.map(np.asarray, restored["state"])
    finally:
        manager.close()
    return state, dict(restored["meta"]), step
