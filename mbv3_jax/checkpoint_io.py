"""Checkpoint files that are verified and writes that fail cleanly, for :mod:`mbv3_jax.checkpoint`
and the trainer's checkpoints.

Integrity: a save records each file's size and sha256 in ``checksums.json`` once it is complete, and a
load checks them before orbax reads anything (orbax checksums only its shard indices, not the
weights). Write failures: orbax reports an aborted write as hundreds of tracebacks and ERROR records
from its background threads; :func:`guard_write` turns the failure into one :class:`CheckpointIOError`
and drops that noise.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import secrets
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHECKSUM_FILE = "checksums.json"
CHECKSUM_FORMAT = "mbv3_jax.checksums/1"


# --------------------------------------------------------------------------------------------------
# Integrity: a sha256 per file, recorded after a save is complete and checked before a load
# --------------------------------------------------------------------------------------------------


class CheckpointIntegrityError(ValueError):
    """A checkpoint file whose content is not what was saved (changed, truncated or missing)."""


class CheckpointIOError(OSError):
    """A checkpoint that could not be written (disk full, read-only directory, quota, I/O error)."""


_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.relative_to(directory).as_posix() != CHECKSUM_FILE
    )


def write_checksums(directory: str | os.PathLike) -> Path:
    """Record the size and sha256 of every file under ``directory`` in ``directory/checksums.json``
    (written to a temporary name, synced, then renamed: never half-written). Call it once the
    checkpoint is complete; in a multi-process run, on one process after all of them have written."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(directory)
    }
    record = {"format": CHECKSUM_FORMAT, "algorithm": "sha256", "files": files}
    path = directory / CHECKSUM_FILE
    tmp = directory / f".{CHECKSUM_FILE}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(record, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def verify_checksums(directory: str | os.PathLike) -> bool:
    """Check every file ``directory/checksums.json`` lists against its recorded size and sha256;
    :class:`CheckpointIntegrityError` names the first that differs or is missing. Returns False, with a
    warning, for a checkpoint written before checksums were recorded (it loads unverified)."""
    directory = Path(directory)
    path = directory / CHECKSUM_FILE
    if not path.is_file():
        warnings.warn(
            f"{directory} has no {CHECKSUM_FILE} (saved before checksums were recorded, or its save was "
            "interrupted just after completing): its integrity is not verified",
            stacklevel=3,
        )
        return False
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        if record.get("format") != CHECKSUM_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {record.get('format')!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointIntegrityError(f"{path} is damaged ({e}): cannot verify {directory}") from None
    for name, expected in sorted(files.items()):
        file = directory / name
        if not file.is_file():
            raise CheckpointIntegrityError(f"checkpoint file {file} is missing (listed in {path})")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointIntegrityError(
                f"checkpoint file {file} is damaged: {size} bytes, {expected['size']} were saved"
            )
        if _sha256(file) != expected["sha256"]:
            raise CheckpointIntegrityError(
                f"checkpoint file {file} is damaged: its content differs from what was saved (sha256 "
                f"mismatch with {path}); restore it from a copy, or use another checkpoint"
            )
    return True


# --------------------------------------------------------------------------------------------------
# Write failures: one error instead of orbax's tracebacks of its aborted writes
# --------------------------------------------------------------------------------------------------


class _OrbaxNoise(logging.Filter):
    """Holds orbax's ERROR records (absl, asyncio) while a guarded write is in flight: re-emitted when
    it succeeds, dropped when it fails (the raised error carries their cause), as are the later ones
    that name a failed write's directory (its other aborted writes, reported as they finish)."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.held: list[logging.LogRecord] = []
        self.failed: list[str] = []
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not (self.active or self.failed):
            return True
        message = record.getMessage()
        if any(path in message for path in self.failed):
            return False
        if self.failed and message.startswith("Task exception was never retrieved") and "orbax" in message:
            return False  # an aborted write's task, collected after its failure was reported
        if not self.active or ("orbax" not in record.pathname and "orbax" not in message):
            return True
        with self.lock:
            self.held.append(record)
        return False

    def begin(self) -> None:
        with self.lock:
            self.active += 1

    def end(self, *, drop: bool) -> None:
        with self.lock:
            self.active = max(0, self.active - 1)
            if not drop and self.active:  # still held for a write in flight
                return
            held, self.held = self.held, []
        if not drop:
            for record in held:
                logging.getLogger(record.name).handle(record)


_NOISE = _OrbaxNoise()
for _name in ("absl", "asyncio"):
    logging.getLogger(_name).addFilter(_NOISE)


def hold_orbax_logs() -> None:
    """Hold orbax's ERROR log records from now on (a write in flight in the background)."""
    _NOISE.begin()


def release_orbax_logs(*, drop: bool) -> None:
    """End one :func:`hold_orbax_logs`: emit the records held (when no other hold remains), or drop
    them (``drop``: the write failed, and its error says why)."""
    _NOISE.end(drop=drop)


_quiet_installed = False


def _is_aborted_write(unraisable: Any) -> bool:
    """An exception of orbax's writes aborted by the first failure: tensorstore completing a write
    whose event loop is closed (``call_soon_threadsafe`` called from C++), or an orbax coroutine
    closed unfinished."""
    exc, obj, tb = unraisable.exc_value, unraisable.object, unraisable.exc_traceback
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and obj is None:
        return tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"
    code = getattr(obj, "cr_code", None)
    return code is not None and "orbax" in code.co_filename


def _drop_aborted_writes() -> None:
    """Install, once, an unraisable-exception hook that drops :func:`_is_aborted_write` exceptions
    (hundreds of identical tracebacks after one failed write) and passes on every other."""
    global _quiet_installed
    if _quiet_installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_aborted_write(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    _quiet_installed = True


def _after_failed_write(timeout: float = 30.0) -> None:
    """Let the rest of a failed write end now, quietly: orbax's background threads finish their
    aborted writes (else they report errors at exit), never-awaited coroutines are closed (under the
    hook) and their warnings dropped."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax"):
            # orbax's threads re-raise their own exception on join: one of the same failure.
            with contextlib.suppress(Exception):
                thread.join(max(0.0, deadline - time.monotonic()))
    warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
    gc.collect()


def _cause(error: BaseException) -> str:
    """The first line of an orbax / tensorstore error, without the tensorstore spec it appends."""
    text = str(error) or type(error).__name__
    text = text.split(" [tensorstore_spec=", 1)[0].strip().splitlines()[0]
    return text if len(text) <= 600 else f"{text[:250]} ... {text[-350:]}"  # the OS error is at the end


@contextlib.contextmanager
def guard_write(what: str, directory: str | os.PathLike) -> Iterator[None]:
    """Run orbax writes of ``what`` (e.g. ``"the model to DIR"``) under ``directory``: an exception
    becomes one :class:`CheckpointIOError` naming ``what`` and the cause, and orbax's log records and
    tracebacks of the aborted writes are dropped; on success its log records are emitted as usual."""
    _drop_aborted_writes()
    _NOISE.begin()
    try:
        yield
    except CheckpointIOError:
        _NOISE.end(drop=True)
        raise
    except Exception as e:
        with _NOISE.lock:
            _NOISE.failed.append(str(Path(directory).absolute()))
        try:  # still held: the aborted writes log their errors as they end
            _after_failed_write()
        finally:
            _NOISE.end(drop=True)
        error = CheckpointIOError(f"could not write {what}: {_cause(e)}")
        error.orbax_error = e  # the original, for debugging
        raise error from None
    else:
        _NOISE.end(drop=False)
