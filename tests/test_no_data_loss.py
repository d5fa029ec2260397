"""Nothing is lost or half-written: overwrite replaces only a saved model (never ``.`` nor the source run),
a save killed anywhere is recovered, one ``mbv3-train`` per workdir (a lock a killed process does not
keep), a resumed run's configuration changes only on request (history kept), a user's files are never
written over, a non-finite loss stops training with the last good checkpoint intact, and
``mbv3_jax.load`` works inside a 2-process ``jax.distributed`` run.

Small and quick: MobileNetV3-Small (one block for the training run) on the digits at 32 px; the
subprocesses (killed saves, the lock holder, the two distributed processes) run side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from extras import needs_torch

import mbv3_jax
from mbv3_jax.models import mobilenet_v3_small
from train import trainer
from train.checkpointing import HISTORY_FILE, WorkdirLock, restore_host
from train.cli import average_main, train_main

REPO = Path(__file__).resolve().parents[1]
STEPS, POISONED_FROM = 8, 4  # the 5th update is NaN: the loss of step 6 is the first non-finite one


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return env | {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"} | extra


def _python(code: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _kernel(model) -> np.ndarray:
    return np.asarray(model.classifier_out.kernel[...])


@pytest.fixture(scope="module")
def model():
    return mobilenet_v3_small(num_classes=3, width_mult=0.5)


# --------------------------------------------------------------------------------------------------
# mbv3_jax.save / load, mbv3-average, mbv3-port
# --------------------------------------------------------------------------------------------------


def test_overwrite_replaces_only_a_saved_model(model, tmp_path, monkeypatch):
    saved = mbv3_jax.save(model, tmp_path / "model")
    mbv3_jax.save(model, saved, overwrite=True)  # a saved model: replaced
    assert _names(tmp_path) == ["model"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a mbv3_jax checkpoint"):
        mbv3_jax.save(model, mine, overwrite=True)
    (saved / "notes.txt").write_text("keep me too")
    with pytest.raises(FileExistsError, match=r"holds \['notes.txt'\]"):
        mbv3_jax.save(model, saved, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        mbv3_jax.save(model, tmp_path / "file", overwrite=True)
    monkeypatch.chdir(mine)
    for where in (".", ".."):  # the current directory, or one containing it: never
        with pytest.raises(ValueError, match="current directory"):
            mbv3_jax.save(model, where, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me" and (saved / "notes.txt").is_file()
    assert _names(tmp_path) == ["file", "mine", "model"]


def test_average_refuses_its_source_run(diverged_run, tmp_path, monkeypatch, capsys):
    run, _, _ = diverged_run
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    for out in (run, run / "avg", run.parent):  # is, is inside, contains the run
        assert average_main([str(run), "--out", str(out), "--overwrite"]) == 2
        assert "its source" in capsys.readouterr().err
    monkeypatch.chdir(run)
    assert average_main([str(run), "--out", ".", "--overwrite"]) == 2
    assert "its source" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert average_main([str(run), "--out", ".", "--overwrite"]) == 2
    assert "current directory" in capsys.readouterr().err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


@needs_torch
def test_port_refuses_the_current_directory(tmp_path, monkeypatch, capsys):
    from porting.cli import port_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    argv = ["mobilenet_v3_small", "--weights", "missing.pth", "--out", ".", "--overwrite"]
    assert port_main(argv) == 2  # refused before the weights are even looked at
    assert "current directory" in capsys.readouterr().err
    assert _names(tmp_path) == ["notes.txt"]


KILLED_SAVE = """
    import os, signal, sys
    import orbax.checkpoint as ocp
    import mbv3_jax
    from mbv3_jax.models import mobilenet_v3_small

    target, where = sys.argv[1], sys.argv[2]
    model = mobilenet_v3_small(num_classes=3, width_mult=0.5, seed=1)  # other weights than the test's
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if where == "between-renames":
        rename = os.replace

        def replace(src, dst):
            rename(src, dst)
            if os.fspath(src) == target:  # the old model moved aside, the new one not yet in
                die()

        os.replace = replace
    else:  # while writing the temporary copy
        ocp.StandardCheckpointer.wait_until_finished = die
    mbv3_jax.save(model, target, overwrite=True)
    """


def test_killed_saves_are_recovered(model, tmp_path):
    """SIGKILL between the two renames of an overwrite, and while writing: the next load / save finds
    the previous model under its name and deletes the leftovers."""
    swapped, written = tmp_path / "a" / "model", tmp_path / "b" / "model"
    for target in (swapped, written):
        mbv3_jax.save(model, target)
    procs = [
        _python(KILLED_SAVE, str(swapped), "between-renames"),
        _python(KILLED_SAVE, str(written), "while-writing"),
    ]
    for p in procs:
        err = p.communicate(timeout=120)[1]
        assert p.returncode == -signal.SIGKILL, err[-3000:]
    names = _names(swapped.parent)
    assert "model" not in names, names  # killed between the renames: no model under its name ...
    assert [n.split("-")[0] for n in names] == [".model.mbv3", ".model.mbv3"], names  # ... but old + new
    assert any(n.startswith(".model.mbv3-tmp-") for n in _names(written.parent))  # the leaked copy
    np.testing.assert_array_equal(_kernel(mbv3_jax.load(swapped)), _kernel(model))  # the old one, back
    assert _names(swapped.parent) == ["model"]
    mbv3_jax.save(model, written, overwrite=True)
    assert _names(written.parent) == ["model"]
    np.testing.assert_array_equal(_kernel(mbv3_jax.load(written)), _kernel(model))


TWO_PROCESS_LOAD = """
    import sys
    import numpy as np
    from train.sharding import maybe_initialize_distributed

    port, index, saved, out = sys.argv[1:5]
    maybe_initialize_distributed(f"127.0.0.1:{port}", 2, int(index), 1)
    import jax
    import mbv3_jax
    from jax.experimental import multihost_utils

    def kernel_sum(path):
        return float(np.sum(np.asarray(mbv3_jax.load(path).classifier_out.kernel[...])))

    sums = [kernel_sum(saved)]  # both processes at once
    if jax.process_index() == 0:  # one process alone: save, load
        mbv3_jax.save(mbv3_jax.load(saved, eval_mode=False), out)
        sums.append(kernel_sum(out))
    else:
        try:
            mbv3_jax.save(mbv3_jax.load(saved), out + "-1")
        except ValueError as e:
            print("refused:", e, flush=True)
    multihost_utils.sync_global_devices("saved")
    if jax.process_index() == 1:  # the other one alone, while process 0 waits at the barrier
        sums.append(kernel_sum(out))
    multihost_utils.sync_global_devices("done")
    print("sums", *sums, flush=True)
    """


def test_load_in_two_processes(model, tmp_path):
    """mbv3_jax.load on both processes of a jax.distributed run, or on one alone; save on process 0
    (another process gets a clear error)."""
    saved = mbv3_jax.save(model, tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_python(TWO_PROCESS_LOAD, str(port), str(i), str(saved), str(tmp_path / "out")) for i in (0, 1)]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    expected = float(np.sum(_kernel(model)))
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
        sums = [float(v) for v in out.split("sums", 1)[1].split()]
        assert sums == pytest.approx([expected] * 2, rel=1e-6)
    assert (
        "refused: mbv3_jax.save called on process 1 of a 2-process run: call it on process 0" in outputs[1][0]
    )
    assert _names(tmp_path) == ["model", "out"]
    np.testing.assert_array_equal(_kernel(mbv3_jax.load(tmp_path / "out")), _kernel(model))


# --------------------------------------------------------------------------------------------------
# mbv3-train: the workdir
# --------------------------------------------------------------------------------------------------


def _train_args(workdir: Path, data_dir: str) -> list[str]:
    return [
        "--config", "digits",
        "--workdir", str(workdir),
        "--data.data_dir", data_dir,
        "--model.blocks", "1",
        "--train.max_steps", str(STEPS),
        "--train.global_batch", "16",
        "--train.log_every_steps", "4",
        "--train.eval_every_steps", str(STEPS),
        "--train.progress", "false",
        "--checkpoint.every_steps", "2",
        "--checkpoint.keep_last", "10",
        "--checkpoint.async_save", "false",
        "--tensorboard", "false",
        "--plot", "false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


_make_optimizer = trainer.make_optimizer


def _poisoned_optimizer(cfg, schedule):
    """The configured optimizer, then every update times NaN from the 5th on."""

    def update(updates, count, params=None):
        nan = jnp.where(count >= POISONED_FROM, jnp.nan, 1.0)
        return jax.tree.map(lambda u: u * nan, updates), count + 1

    nan_later = optax.GradientTransformation(lambda params: jnp.zeros([], jnp.int32), update)
    return optax.chain(_make_optimizer(cfg, schedule), nan_later)


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory, data_dir) -> tuple[Path, int, str]:
    """A run whose updates turn NaN from the 5th on: (workdir, exit status, stderr)."""
    workdir = tmp_path_factory.mktemp("diverged")
    err_file = tmp_path_factory.mktemp("log") / "stderr.txt"
    with pytest.MonkeyPatch.context() as mp, open(err_file, "w") as err:
        mp.setattr(trainer, "make_optimizer", _poisoned_optimizer)
        mp.setattr(sys, "stderr", err)
        rc = train_main(_train_args(workdir, data_dir))
    return workdir, rc, err_file.read_text()


def test_nan_loss_stops_training(diverged_run):
    workdir, rc, err = diverged_run
    assert rc == 1, err[-3000:]
    assert "training diverged: the loss of step 6 is nan" in err
    assert "Likely causes: a learning rate too high" in err
    assert "The last checkpoint, step 4, predates it and is intact" in err
    state, _, step = restore_host(workdir)
    assert step == 4 and all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_non_finite_parameters_stop_training_before_their_checkpoint(tmp_path, data_dir, capsys, monkeypatch):
    # The 5th update spoils the parameters while step 5's loss is still finite: the check before the
    # step-5 checkpoint (one jitted reduction over the parameters) stops the run instead.
    args = _train_args(tmp_path / "w", data_dir)
    args[args.index("--checkpoint.every_steps") + 1] = "5"
    monkeypatch.setattr(trainer, "make_optimizer", _poisoned_optimizer)
    assert train_main(args) == 1
    err = capsys.readouterr().err
    assert "training diverged: the parameters after step 5 are not finite (the loss was finite so far)" in err
    assert "No checkpoint was saved" in err
    assert not [p for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit()]


def test_bad_learning_rate_and_labels_are_refused(tmp_path, data_dir, capsys):
    args = _train_args(tmp_path / "w", data_dir)
    for flag, message in (
        ("--optim.lr=nan", "optim.lr must be a finite number >= 0, got nan"),
        ("--optim.lr=-0.1", "optim.lr must be a finite number >= 0, got -0.1"),
        ("--model.num_classes=5", "model.num_classes=5, but the training data has 10 classes"),
        ("--train.global_batch=0", "train.global_batch must be >= 1, got 0"),
        ("--data.max_boxes=0", "data.max_boxes must be >= 1, got 0"),
    ):
        assert train_main([*args, flag]) == 2
        assert message in capsys.readouterr().err


def test_config_change_needs_the_flag_and_keeps_history(diverged_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer, "make_optimizer", _poisoned_optimizer)  # the run's optimizer state
    workdir = tmp_path / "run"
    shutil.copytree(diverged_run[0], workdir)
    data_dir = json.loads((workdir / "config.json").read_text())["data"]["data_dir"]
    old = (workdir / "config.json").read_text()
    # Resumed at its last step, so that no step runs here: max_steps 4, the last good checkpoint's.
    changed = [*_train_args(workdir, data_dir), "--train.max_steps", "4", "--optim.lr=0.002"]
    assert train_main(changed) == 2
    err = capsys.readouterr().err
    assert "train.max_steps: 8 -> 4" in err and "optim.lr: 0.004 -> 0.002" in err
    assert "--allow-config-change" in err
    assert (workdir / "config.json").read_text() == old and not (workdir / HISTORY_FILE).exists()
    assert train_main([*changed, "--allow-config-change"]) == 0
    assert json.loads((workdir / "config.json").read_text())["optim"]["lr"] == 0.002
    (entry,) = [json.loads(line) for line in (workdir / HISTORY_FILE).read_text().splitlines()]
    assert entry["config"] == json.loads(old)
    assert entry["changes"]["optim.lr"] == [0.004, 0.002]
    # Where and how it runs may change freely (and is recorded too).
    assert train_main([*changed, "--data.worker_count", "0", "--train.log_every_steps", "2"]) == 0
    assert len((workdir / HISTORY_FILE).read_text().splitlines()) == 2


def test_new_run_never_writes_over_a_users_files(tmp_path, data_dir, capsys):
    for name, content in (("metrics.csv", "my,numbers\n"), ("config.json", '{"mine": true}\n')):
        workdir = tmp_path / name
        workdir.mkdir()
        (workdir / name).write_text(content)
        assert train_main(_train_args(workdir, data_dir)) == 2
        assert "pass another --workdir" in capsys.readouterr().err
        assert (workdir / name).read_text() == content and _names(workdir) == [name]


HOLD_LOCK = """
    import sys, time
    from train.checkpointing import WorkdirLock

    WorkdirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(300)
    """


def test_one_trainer_per_workdir(tmp_path, data_dir, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = _python(HOLD_LOCK, str(workdir))
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()[-3000:]
        assert train_main(_train_args(workdir, data_dir)) == 2
        err = capsys.readouterr().err
        assert f"is in use by another mbv3-train (process {holder.pid} on {socket.gethostname()}" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    WorkdirLock(workdir).acquire().release()  # the killed holder left it free
