"""Save and load models with orbax-checkpoint; the directory records the architecture.

Layout of a saved directory::

    DIR/architecture.json   {"format": ..., "builder": ..., "kwargs": {...}}
    DIR/state/              orbax checkpoint of every variable (params, BatchNorm statistics)
    DIR/checksums.json      size and sha256 of every other file, checked by :func:`load`

Integrity: :func:`load` recomputes each file's sha256 against ``checksums.json`` before orbax reads
anything, and refuses a changed, truncated or missing file (``checkpoint_io.CheckpointIntegrityError``,
naming it); orbax's format checksums only its shard indices, not the weights. A directory saved before
checksums were recorded (no ``checksums.json``) still loads, unverified, with a warning. A save that
fails to write (disk full, read-only directory, quota) raises one ``CheckpointIOError`` naming
the path and the cause, instead of orbax's tracebacks of its aborted writes.

Nothing is lost or half-written:

* A save writes to a sibling ``.DIR.mbv3-tmp-<pid>-<rand>@<host>`` (``architecture.json`` last) and
  renames it to ``DIR`` when complete.
* ``overwrite=True`` replaces only a saved model: a directory that holds ``architecture.json`` (with
  this module's format) and ``state/`` and nothing else, or an empty one. Anything else (a training run,
  the current directory or one containing it, a file, a symlink) is refused, as is a target that is,
  contains or lies inside a ``protect`` path (the source of the model).
* Overwriting renames the old ``DIR`` to ``.DIR.mbv3-old-<pid>-<rand>@<host>``, the new copy to ``DIR``,
  then deletes the old one: at every instant the old or the new model is on disk under one of those
  names. The next :func:`save` or :func:`load` of ``DIR`` finishes after a save killed on this host (its
  process gone): a killed overwrite gets the old model back as ``DIR``, and leftover temporary
  directories are deleted.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mbv3_jax.checkpoint_io import (
    CHECKSUM_FILE,
    CheckpointIOError,
    guard_write,
    verify_checksums,
    write_checksums,
)

FORMAT = "mbv3_jax.checkpoint/1"
_ARCH_FILE = "architecture.json"
_STATE_DIR = "state"
_TMP, _OLD = "mbv3-tmp", "mbv3-old"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>mbv3-tmp|mbv3-old)-(?P<pid>\d+)-[0-9a-f]{8}@(?P<host>.+)$")


def _state_dict(model: nnx.Module) -> dict[str, Any]:
    return nnx.to_pure_dict(nnx.state(model))


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _sibling(target: Path, kind: str) -> Path:
    """A hidden name next to ``target`` that says whose (pid, host) and what (tmp, old) it is."""
    return target.with_name(
        f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}@{socket.gethostname()}"
    )


def _process_gone(pid: int, host: str) -> bool:
    """True only when the process surely ended: on this host, and no process has that id."""
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


# --------------------------------------------------------------------------------------------------
# Architecture records: what a checkpoint holds, compared before orbax is asked to restore it
# --------------------------------------------------------------------------------------------------


def describe_architecture(record: dict[str, Any]) -> str:
    """A one-line name for an architecture record, e.g. ``mobilenet_v3_small(width_mult=0.5, ...)``."""
    kwargs = dict(record.get("kwargs", {}))
    table = kwargs.pop("inverted_residual_setting", None)
    shown = [f"{k}={kwargs[k]!r}" for k in ("width_mult", "num_classes", "last_channel") if k in kwargs]
    if table is not None:
        shown.insert(0, f"{len(table)} blocks")
    return f"{record.get('builder', '?')}({', '.join(shown)})"


# Keyword arguments that do not change which variables a model has, nor their shapes.
_NOT_STRUCTURAL = ("dropout", "dtype", "param_dtype")


def architecture_difference(
    saved: dict[str, Any], wanted: dict[str, Any], *, ignore: Iterable[str] = ()
) -> list[str]:
    """The fields in which two architecture records differ in structure (``builder`` and keyword
    arguments other than dropout and dtypes, and other than ``ignore``): empty if the same variables."""
    skip = set(_NOT_STRUCTURAL) | set(ignore)
    diff = [] if saved.get("builder") == wanted.get("builder") else ["builder"]
    a, b = saved.get("kwargs", {}), wanted.get("kwargs", {})
    diff += [k for k in sorted(a.keys() | b.keys()) if k not in skip and a.get(k) != b.get(k)]
    return diff


def _leaf_key(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tree_mismatch(saved: Any, target: Any, *, limit: int = 4) -> str | None:
    """How an orbax checkpoint's metadata tree (arrays with ``shape``) differs from ``target``'s
    leaves: a few paths missing, unexpected or of another shape, with counts; None if they agree."""
    have = {
        _leaf_key(p): tuple(getattr(v, "shape", ())) for p, v in jax.tree_util.tree_leaves_with_path(saved)
    }
    want = {_leaf_key(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_leaves_with_path(target)}
    missing = sorted(want.keys() - have.keys())
    extra = sorted(have.keys() - want.keys())
    keys = {_leaf_key(p) for p, v in jax.tree_util.tree_leaves_with_path(target) if _is_key(v)}
    # RNG keys are stored as their key data (one more axis): only their presence is compared.
    shapes = sorted(k for k in want.keys() & have.keys() if want[k] != have[k] and k not in keys)
    if not (missing or extra or shapes):
        return None
    parts = []
    for label, keys, show in (
        ("not in the checkpoint", missing, lambda k: k),
        ("only in the checkpoint", extra, lambda k: k),
        ("of another shape", shapes, lambda k: f"{k} {have[k]} vs {want[k]}"),
    ):
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
            parts.append(f"{label}: {', '.join(show(k) for k in keys[:limit])}{more}")
    return "; ".join(parts)


def read_tree_metadata(item_directory: str | os.PathLike) -> Any:
    """The tree of array metadata (shapes, dtypes) of an orbax ``StandardSave`` item, read by this
    process alone (no barrier); None if it cannot be read."""
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=_this_process_only())
    try:
        metadata = checkpointer.metadata(Path(item_directory))
        return getattr(metadata, "item_metadata", metadata)
    except Exception:  # an unreadable tree: orbax's restore reports it
        return None
    finally:
        checkpointer.close()


def is_saved_model(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is a model written by :func:`save` (its ``architecture.json`` marker and
    ``state/``), whatever else it holds."""
    path = Path(directory)
    if path.is_symlink() or not (path / _STATE_DIR).is_dir() or not (path / _ARCH_FILE).is_file():
        return False
    try:
        return json.loads((path / _ARCH_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def recover(directory: str | os.PathLike) -> None:
    """Finish after saves of ``directory`` killed mid-way on this host (their processes gone): a model
    moved aside by a killed overwrite comes back under its name; leftover temporary directories are
    deleted. Saves in progress, and leftovers of other hosts, are left alone."""
    target = Path(directory).absolute()
    try:
        entries = list(target.parent.iterdir()) if target.parent.is_dir() else []
    except OSError:
        return
    olds, tmps = [], []
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if m and m["name"] == target.name and _process_gone(int(m["pid"]), m["host"]):
            (olds if m["kind"] == _OLD else tmps).append(entry)
    try:
        if olds and not os.path.lexists(target):
            # Killed between the two renames of an overwrite: put the previous model back.
            for old in sorted(olds, key=lambda p: p.stat().st_mtime, reverse=True):
                if is_saved_model(old):
                    os.replace(old, target)
                    olds.remove(old)
                    break
        for leftover in olds + tmps:
            shutil.rmtree(leftover, ignore_errors=True)
    except OSError:  # another process recovered it first, or a read-only parent: nothing lost either way
        pass


def check_target(
    directory: str | os.PathLike, *, overwrite: bool = False, protect: Iterable[str | os.PathLike] = ()
) -> Path:
    """``directory`` as an absolute path if :func:`save` may write a model there, else a clear error:
    ``FileExistsError`` for an existing path that is not to be replaced, ``ValueError`` for an existing
    target that is or contains the current directory, or one that is, contains or lies inside a
    ``protect`` path."""
    target = Path(directory).absolute()
    resolved = target.resolve()

    def overlaps(other: Path) -> bool:
        return resolved == other or other in resolved.parents or resolved in other.parents

    for source in protect:
        source = Path(source).resolve()
        if overlaps(source):
            raise ValueError(
                f"refusing to write the model to {target}: it is, contains or is inside {source}, its source"
            )
    if not os.path.lexists(target):
        return target
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(
            f"refusing to write the model to {target}: it is the current directory or contains it"
        )
    if not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(f"refusing to overwrite {target}: not a directory that save() wrote")
    names = {p.name for p in target.iterdir()}
    if not names:
        return target
    if not is_saved_model(target):
        raise FileExistsError(
            f"refusing to overwrite {target}: not a mbv3_jax checkpoint (no {_ARCH_FILE} with format "
            f"{FORMAT!r} and {_STATE_DIR}/); overwrite=True only replaces a model save() wrote"
        )
    extra = sorted(names - {_ARCH_FILE, _STATE_DIR, CHECKSUM_FILE})
    if extra:
        raise FileExistsError(
            f"refusing to overwrite {target}: besides the saved model it holds {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}, which overwriting would delete"
        )
    return target


def save(
    model: nnx.Module,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Save ``model`` (weights, BatchNorm statistics, architecture) to ``directory``, atomically.

    ``overwrite=True`` replaces a model saved there before, and nothing else (see the module docstring);
    ``protect``: paths the target must not be, contain or lie inside (e.g. the run a model came from).
    Written by the calling process alone: in a multi-process ``jax.distributed`` run, call it on
    process 0 (the training script's own checkpoints are ``train.checkpointing``'s, written by all).
    """
    if not hasattr(model, "architecture"):
        raise TypeError(f"{type(model).__name__} has no .architecture record; build it with mbv3_jax.models")
    if jax.process_index() != 0:
        raise ValueError(
            f"mbv3_jax.save called on process {jax.process_index()} of a {jax.process_count()}-process run: "
            "call it on process 0 (orbax writes a single process's arrays from process 0 only)"
        )
    recover(directory)
    target = check_target(directory, overwrite=overwrite, protect=protect)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, old, moved = _sibling(target, _TMP), _sibling(target, _OLD), False
    try:
        tmp.mkdir()
    except OSError as e:
        raise CheckpointIOError(f"could not write the model to {target}: {e.strerror} ({tmp})") from None
    try:
        state = _state_dict(model)
        if jax.process_count() > 1:  # orbax refuses process-local jax.Arrays there: numpy, as load reads
            state = jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if _is_key(x) else x), state)
        checkpointer = ocp.StandardCheckpointer(multiprocessing_options=_this_process_only())
        # close() may re-raise a failed background write: inside the guard, it is reported as one error.
        with guard_write(f"the model to {target}", tmp):
            try:
                checkpointer.save(tmp / _STATE_DIR, state)
                checkpointer.wait_until_finished()
            finally:
                checkpointer.close()
        record = {"format": FORMAT, **model.architecture}
        (tmp / _ARCH_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        write_checksums(tmp)  # last, once every other file is complete
        if os.path.lexists(target):
            # The old model to a findable name, the new one in, then the old one deleted: a kill at any
            # point leaves one of them on disk, and recover() (next save or load) restores DIR.
            os.replace(target, old)
            moved = True
            os.replace(tmp, target)
            moved = False
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        if moved and not os.path.lexists(target):
            os.replace(old, target)
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

    Every process that calls it reads the whole model for itself, onto its first local device: inside a
    multi-process ``jax.distributed`` run too, on any or all processes (no collective, no barrier).
    Each file is first checked against ``checksums.json`` (:class:`CheckpointIntegrityError` names a
    damaged one); a directory saved before checksums were recorded loads unverified, with a warning.
    """
    from mbv3_jax.models import build_from_architecture

    directory = Path(directory).absolute()
    recover(directory)  # a save of it killed mid-way: its previous model back under its name
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist or is not a directory")
    architecture = read_architecture(directory)
    verify_checksums(directory)
    model = build_from_architecture(architecture)
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=local), _state_dict(model)
    )
    saved = read_tree_metadata(directory / _STATE_DIR)
    mismatch = None if saved is None else tree_mismatch(saved, target)
    if mismatch:
        raise ValueError(
            f"{directory / _STATE_DIR} does not hold the variables of {describe_architecture(architecture)}, "
            f"the architecture {directory / _ARCH_FILE} records ({mismatch}): the directory mixes two saves"
        )
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=_this_process_only())
    try:
        restored = checkpointer.restore(directory / _STATE_DIR, target)
    except Exception as e:
        raise ValueError(f"could not restore {directory / _STATE_DIR} into {model.architecture}: {e}") from e
    finally:
        checkpointer.close()
    # A save in a multi-process run stores RNG keys as their key data (numpy): wrap them back.
    restored = jax.tree.map(
        lambda r, m: (
            jax.random.wrap_key_data(r, impl=jax.random.key_impl(m)) if _is_key(m) and not _is_key(r) else r
        ),
        restored,
        _state_dict(model),
    )
    nnx.update(model, restored)
    if eval_mode:
        model.eval()
    return model
