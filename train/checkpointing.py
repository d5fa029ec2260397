"""orbax ``CheckpointManager`` for training runs: periodic, last N + best N by top-1, asynchronous.

A checkpoint ``workdir/checkpoints/<step>/`` holds two items: ``state`` (params, BatchNorm statistics,
optimizer state, step, dropout RNG key, EMA) and ``meta`` (JSON: step, epoch, data position and seed,
eval metrics, the model's architecture record). orbax writes to a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous checkpoints intact; the trainer's
manager deletes such leftovers.

Integrity: once a step's save is complete (on all processes), process 0 records the size and sha256 of
its files in ``<step>/checksums.json`` (at the next save, or when the run ends, so that asynchronous
saves stay asynchronous); :func:`restore`, :func:`read_meta` and :func:`restore_host` check them first
and refuse a damaged file, naming it. A step without ``checksums.json`` (saved before they were
recorded, or a run killed between a save's completion and the next one) is restored unverified, with a
warning. A save that cannot be written raises one :class:`mbv3_jax.checkpoint_io.CheckpointIOError`
naming the directory and the cause.

The workdir itself (:func:`setup_workdir`): one ``mbv3-train`` process (group) at a time, held by an
``fcntl.flock`` on ``workdir/.mbv3-train.lock`` (pid and host inside), which the OS releases when the
process ends, killed or not. A new run never writes over files it did not write: a directory that
holds any of :data:`RUN_FILES` but no run's ``config.json`` is refused. Resuming with other
hyperparameters than ``config.json``'s is refused, naming the fields, unless allowed; the replaced
configuration is then appended to ``config_history.jsonl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import socket
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from mbv3_jax.checkpoint import read_tree_metadata, tree_mismatch
from mbv3_jax.checkpoint_io import (
    CheckpointIOError,
    guard_write,
    hold_orbax_logs,
    release_orbax_logs,
    verify_checksums,
    write_checksums,
)

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


# The eval metric that ranks a task's checkpoints (higher is better): classification's top-1,
# segmentation's mIoU.
RANKING_METRICS = ("top1", "miou", "map")


def ranking_metric(metrics: dict[str, float]) -> float:
    """The value that ranks a checkpoint: its task's metric among :data:`RANKING_METRICS`."""
    for key in RANKING_METRICS:
        if key in metrics:
            return metrics[key]
    raise KeyError(f"checkpoint metrics {sorted(metrics)} hold none of {RANKING_METRICS}")


def make_manager(
    workdir: str | os.PathLike,
    *,
    keep_last: int = 3,
    keep_best: int = 3,
    async_save: bool = True,
    create: bool = True,
    cleanup_tmp: bool = False,
) -> ocp.CheckpointManager:
    """A manager that keeps the ``keep_last`` latest checkpoints and the ``keep_best`` best by the
    task's eval metric (:func:`ranking_metric`);
    ``cleanup_tmp``: delete the temporary directories of saves killed mid-way (only while holding the
    workdir's lock: else they may be a running trainer's saves in progress)."""
    _register_array_handler()
    directory = checkpoint_dir(workdir)
    if not create and not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir}: {directory} does not exist")
    keep = [policies.LatestN(n=max(1, keep_last))]
    if keep_best > 0:
        keep.append(
            policies.BestN(
                get_metric_fn=ranking_metric,
                reverse=False,
                n=keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=async_save,
        create=create,
        cleanup_tmp_directories=cleanup_tmp,
    )
    manager = ocp.CheckpointManager(directory, item_names=("state", "meta"), options=options)
    _SAVES[manager] = _Saves(async_save)
    return manager


@dataclasses.dataclass
class _Saves:
    """A manager's saves not yet sealed with checksums, and whether one is still being written."""

    async_save: bool
    unsealed: list[int] = dataclasses.field(default_factory=list)
    in_flight: bool = False


_SAVES: weakref.WeakKeyDictionary[ocp.CheckpointManager, _Saves] = weakref.WeakKeyDictionary()


def _seal(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Process 0 records the checksums of these completed steps (gone ones: deleted by the policy)."""
    if jax.process_index() != 0:
        return
    for step in steps:
        directory = Path(manager.directory) / str(step)
        if directory.is_dir():
            try:
                write_checksums(directory)
            except OSError as e:
                raise CheckpointIOError(
                    f"could not write the checksums of checkpoint {directory}: {e}. The checkpoint itself "
                    "is complete (it loads unverified); free space or fix the directory's permissions"
                ) from None


def _until_written(manager: ocp.CheckpointManager, call: Callable[[], None], what: str) -> None:
    """Run a manager call that first waits for the save in flight; a failed write (of that save or of
    this one) becomes one CheckpointIOError, and orbax's log records of it are dropped."""
    saves = _SAVES.setdefault(manager, _Saves(async_save=False))
    in_flight, saves.in_flight = saves.in_flight, False
    failed = True
    try:
        with guard_write(what, manager.directory):
            call()
        failed = False
    except CheckpointIOError as e:
        try:
            kept = f"steps {sorted(manager.all_steps())}"
        except Exception:  # the directory itself is unreadable
            kept = "if any"
        raise CheckpointIOError(
            f"{e}. The checkpoints saved before ({kept}) are intact; free space or fix the directory's "
            "permissions, then re-run to resume"
        ) from None
    finally:
        if in_flight:  # the hold taken when that asynchronous save started
            release_orbax_logs(drop=failed)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    meta: dict[str, Any],
    metrics: dict[str, float] | None = None,
) -> None:
    """Start saving (asynchronously when enabled); ``metrics`` (one of :data:`RANKING_METRICS`) ranks
    it for keep-best.

    The previous save, which this one waits for, is complete then: its checksums are written now."""
    saves = _SAVES.setdefault(manager, _Saves(async_save=False))
    done = list(saves.unsealed)

    def call() -> None:
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )

    steps = [*saves.unsealed, step] if saves.in_flight else [step]  # the one in flight may fail here
    what = f"checkpoint step {' or '.join(map(str, steps))} to {manager.directory}"
    if saves.async_save:  # its orbax log records are held until it is complete, from before it starts
        hold_orbax_logs()
    try:
        _until_written(manager, call, what)
    except BaseException:
        if saves.async_save:
            release_orbax_logs(drop=True)
        raise
    saves.unsealed = [step]
    if saves.async_save:
        saves.in_flight = True
    else:
        done.append(step)
        saves.unsealed = []
    _seal(manager, done)


def finish(manager: ocp.CheckpointManager, *, raise_errors: bool = True) -> None:
    """Wait for the save in flight, record its checksums and close ``manager``; ``raise_errors=False``
    (a run already failing) closes it without raising another error."""
    saves = _SAVES.setdefault(manager, _Saves(async_save=False))
    try:
        _until_written(manager, manager.wait_until_finished, f"a checkpoint to {manager.directory}")
        _seal(manager, saves.unsealed)
        saves.unsealed = []
    except Exception:
        if raise_errors:
            raise
    finally:
        with contextlib.suppress(Exception):
            manager.close()


def verify(manager: ocp.CheckpointManager, step: int) -> None:
    """Check the files of checkpoint ``step`` against its checksums (see the module docstring)."""
    verify_checksums(Path(manager.directory) / str(step))


def read_meta(manager: ocp.CheckpointManager, step: int, *, check: bool = True) -> dict[str, Any]:
    """The ``meta`` item of checkpoint ``step`` (after checking the step's files, unless ``check``
    is False)."""
    if check:
        verify(manager, step)
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, *, check: bool = True
) -> tuple[Any, dict[str, Any]]:
    """The state (placed as ``abstract_state``'s shardings say) and metadata of checkpoint ``step``.

    First (unless ``check`` is False: done already) its files are checked against its checksums; and a
    state whose arrays differ from ``abstract_state``'s (names or shapes) is refused in a few lines."""
    directory = Path(manager.directory) / str(step)
    if check:
        verify(manager, step)
    saved = read_tree_metadata(directory / "state")
    mismatch = None if saved is None else tree_mismatch(saved, abstract_state)
    if mismatch:
        raise ValueError(
            f"checkpoint {directory} does not fit this run's training state ({mismatch}); the model, "
            "optimizer or EMA setting differs from the run that saved it: use another --workdir"
        )
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
        verify(manager, step)
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


# --------------------------------------------------------------------------------------------------
# The workdir: one process at a time, a user's files never overwritten, configuration changes on demand
# --------------------------------------------------------------------------------------------------

LOCK_FILE = ".mbv3-train.lock"
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
# What mbv3-train writes in a workdir: a new run refuses a directory holding any of them.
RUN_FILES = (
    CONFIG_FILE, HISTORY_FILE, "architecture.json", "metrics.csv", "metrics.png", "tensorboard",
    "checkpoints",
)  # fmt: skip
# Fields that say where and how a run executes, not what it computes: they may change on resume.
RUNTIME_FIELDS = (
    "workdir", "name", "tensorboard", "plot", "train.progress", "train.log_every_steps",
    "train.eval_batch", "data.data_dir", "data.worker_count", "mesh.", "distributed.", "checkpoint.",
)  # fmt: skip


class WorkdirError(ValueError):
    """A workdir that mbv3-train may not use as asked: in use, not a run's, a configuration change."""


class WorkdirLock:
    """An exclusive, non-blocking ``fcntl.flock`` on ``workdir/.mbv3-train.lock``; the file records the
    holder (pid, host, since). The OS releases the lock when the holder exits or is killed."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir).absolute() / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirError(
                f"{self.path.parent} is in use by another mbv3-train ({self.holder()}): one run per workdir; "
                "wait for it to finish or stop it, or pass another --workdir"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            return f"process {h['pid']} on {h['host']}, since {h['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"lock {self.path}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted field: (old, new)}`` for every field of both configurations whose value differs (a
    field one of them lacks is skipped: it did not exist in that version of the trainer)."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}


def _is_run_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"model", "data", "optim", "train"} <= data.keys()


def has_checkpoints(workdir: str | os.PathLike) -> bool:
    directory = checkpoint_dir(workdir)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _write_json_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# Fields that change which arrays a checkpoint holds: a run cannot resume its checkpoints with others.
STRUCTURE_FIELDS = (
    "model.name",
    "model.width_mult",
    "model.blocks",
    "model.num_classes",
    "qat.enabled",
    "qat.backend",
)


def _describe_model(config: dict[str, Any]) -> str:
    m, q = config.get("model", {}), config.get("qat", {})
    extras = [f"{k}={m[k]!r}" for k in ("width_mult", "blocks", "num_classes") if m.get(k) is not None]
    qat = f", QAT ({q.get('backend')})" if q.get("enabled") else ""
    return f"{m.get('name')}({', '.join(extras)}){qat}"


def _claim_workdir(workdir: Path, config: dict[str, Any], allow_config_change: bool) -> WorkdirLock:
    """Process 0's part of :func:`setup_workdir` (raises WorkdirError)."""
    for path in (workdir, *workdir.parents):
        if os.path.lexists(path) and not path.is_dir():
            what = "--workdir" if path == workdir else f"--workdir {workdir}: its parent"
            raise WorkdirError(
                f"{what} {path} exists and is not a directory; nothing was written: pass another --workdir"
            )
    config_path = workdir / CONFIG_FILE
    if config_path.exists() and not _is_run_config(config_path):
        raise WorkdirError(
            f"{config_path} is not a mbv3-train configuration: {workdir} is not a run's workdir, and "
            "mbv3-train does not write over files it did not write; pass another --workdir"
        )
    if not config_path.exists() and workdir.is_dir():
        clash = [n for n in RUN_FILES if os.path.lexists(workdir / n)]
        if clash:
            raise WorkdirError(
                f"{workdir} holds {clash} but no run's {CONFIG_FILE}: not a mbv3-train workdir, and a new "
                "run would write over them; pass another --workdir"
            )
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir).acquire()
    try:
        if config_path.exists():  # read again under the lock
            old = json.loads(config_path.read_text())
            changes = config_changes(old, config)
            if not changes:
                return lock
            structural = [k for k in changes if k in STRUCTURE_FIELDS]
            if structural and has_checkpoints(workdir):
                raise WorkdirError(
                    f"{workdir} holds checkpoints of {_describe_model(old)}; this run builds "
                    f"{_describe_model(config)} ({', '.join(structural)} differ), whose arrays cannot be "
                    "restored from them, with or without --allow-config-change. Pass another --workdir "
                    "(to start from this run's weights: mbv3-average it, then --model.init the result)"
                )
            gated = {k: v for k, v in changes.items() if not k.startswith(RUNTIME_FIELDS)}
            if gated and has_checkpoints(workdir) and not allow_config_change:
                listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in gated.items())
                raise WorkdirError(
                    f"{workdir} holds a run trained with another configuration; resuming it with this one "
                    f"would change {listed}. Pass --allow-config-change to resume with the new values "
                    f"(the old configuration is kept in {HISTORY_FILE}), or pass another --workdir"
                )
            entry = {"replaced": _now(), "changes": {k: list(v) for k, v in changes.items()}, "config": old}
            with open(workdir / HISTORY_FILE, "a") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
        _write_json_atomic(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    except BaseException:
        lock.release()
        raise
    return lock


def broadcast_error(message: str | None) -> str | None:
    """Process 0's error message (or None) on every process, so that all of them stop together."""
    if jax.process_count() == 1:
        return message
    from jax.experimental import multihost_utils

    buf = np.zeros(4097, np.int32)
    if message is not None:
        encoded = message.encode()[:4096]
        buf[0] = 1 + len(encoded)
        buf[1 : 1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    if buf[0] == 0:
        return None
    return bytes(buf[1 : buf[0]].astype(np.uint8)).decode(errors="replace")


def setup_workdir(
    workdir: str | os.PathLike, config: dict[str, Any], *, allow_config_change: bool = False
) -> contextlib.AbstractContextManager[WorkdirLock | None]:
    """Claim ``workdir`` for a run of ``config`` (``TrainConfig.to_dict()``): process 0 checks it is
    new, empty or a run's workdir, takes its lock, checks the configuration against ``config.json``
    (a change to other than :data:`RUNTIME_FIELDS` needs ``allow_config_change`` once the run has
    checkpoints) and writes it. Every process raises the same WorkdirError when process 0 refuses.
    Use as ``with setup_workdir(...):``; the lock is released on leaving."""
    workdir = Path(workdir).absolute()
    lock, failure, message = None, None, None
    if jax.process_index() == 0:
        try:
            lock = _claim_workdir(workdir, json.loads(json.dumps(config)), allow_config_change)
        except Exception as e:  # any failure: the other processes must hear of it, not wait forever
            failure = e
            message = str(e) if isinstance(e, WorkdirError) else f"cannot use --workdir {workdir}: {e!r}"
    message = broadcast_error(message)
    if message is not None:
        if lock is not None:
            lock.release()
        raise WorkdirError(message) from failure
    return _released_on_exit(lock)


@contextlib.contextmanager
def _released_on_exit(lock: WorkdirLock | None):
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
