"""Clear errors where there were tracebacks: a truncated image or an empty class folder in an image
folder, the README's ``--data.image_folder`` command on train/val folders, a workdir that is a file,
a checkpoint of another architecture, a checkpoint write that fails (disk full), and a checkpoint
whose bytes changed after it was saved.

Small and quick: MobileNetV3-Small (one block for the training run) on a 2-class folder of 40x48
images; the failing writes run in subprocesses (a file-size limit stands in for a full disk, which
works as root, where a read-only directory does not stop writes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mbv3_jax
from mbv3_jax.checkpoint_io import CHECKSUM_FILE, CheckpointIntegrityError, verify_checksums
from mbv3_jax.models import mobilenet_v3_large, mobilenet_v3_small
from train import data, trainer
from train.checkpointing import restore_host
from train.cli import train_main

REPO = Path(__file__).resolve().parents[1]


def _image_folder(root: Path, splits=("train", "val"), classes=("cat", "dog"), per_class=8) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg")
    return root


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _flip(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of ``path`` (its size unchanged)."""
    raw = bytearray(path.read_bytes())
    start = max(0, len(raw) // 2 - count // 2)
    for i in range(start, min(len(raw), start + count)):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


def test_truncated_jpeg_is_named_when_the_data_set_is_prepared(tmp_path):
    root = _image_folder(tmp_path / "pets")
    bad = root / "train" / "dog" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(data.DataError, match=rf"{bad} is not a readable image .*truncated"):
        data.image_folder_builder(root)
    (root / "train" / "cat" / "0.jpg").write_bytes(b"not an image at all")
    bad.unlink()
    with pytest.raises(data.DataError, match=r"cat/0.jpg is not a readable image"):
        data.image_folder_builder(root)


def test_empty_class_folder_is_refused_like_torchvision(tmp_path):
    root = _image_folder(tmp_path / "pets")
    (root / "train" / "emu").mkdir()
    with pytest.raises(data.DataError, match=r"Found no valid file for the classes emu in .*pets/train"):
        data.image_folder_builder(root)
    (root / "train" / "emu" / "notes.txt").write_text("not an image")  # torchvision ignores it too
    with pytest.raises(data.DataError, match="Found no valid file for the classes emu"):
        data.image_folder_builder(root)
    shutil.rmtree(root / "train" / "emu")
    (root / "val" / "cat" / "extra").mkdir()  # a sub-folder of a class: still that class
    (root / "val" / "gnu").mkdir()
    with pytest.raises(data.DataError, match="Found no valid file for the classes gnu in .*pets/val"):
        data.image_folder_builder(root)


def test_an_image_folder_without_an_eval_split_says_what_to_do(tmp_path):
    root = _image_folder(tmp_path / "flat", splits=("",))  # root/<class>/*.jpg: one split, train
    with pytest.raises(data.DataError, match=r"has no eval split .*--data.eval_split=train"):
        data.open_split("sklearn_digits", "test", image_folder=str(root), eval_fallback=True)
    assert len(data.open_split("sklearn_digits", "train", image_folder=str(root))) == 16
    pets = _image_folder(tmp_path / "pets")
    val = data.open_split("sklearn_digits", "test", image_folder=str(pets), eval_fallback=True)
    assert (val.split, len(val)) == ("val", 16)
    with pytest.raises(data.DataError, match=r"has splits \['train', 'val'\], not 'test'"):
        data.open_split("sklearn_digits", "test", image_folder=str(pets))  # not the eval split: as asked


def _train_args(workdir: Path, root: Path) -> list[str]:
    return [
        "--config", "digits",  # names eval split "test"; the folder has train/ and val/
        "--data.image_folder", str(root),
        "--workdir", str(workdir),
        "--model.blocks", "1",
        "--train.max_steps", "2",
        "--train.global_batch", "8",
        "--train.progress", "false",
        "--checkpoint.async_save", "false",
        "--tensorboard", "false",
        "--plot", "false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, str]:
    """The README's ``mbv3-train --config digits --data.image_folder ~/pets`` on train/ and val/
    folders, shortened: (workdir, image folder, stderr)."""
    root = _image_folder(tmp_path_factory.mktemp("data") / "pets")
    workdir = tmp_path_factory.mktemp("run")
    err_file = tmp_path_factory.mktemp("log") / "stderr.txt"
    with pytest.MonkeyPatch.context() as mp, open(err_file, "w") as err:
        mp.setattr(sys, "stderr", err)
        rc = train_main(_train_args(workdir, root))
    text = err_file.read_text()
    assert rc == 0, text[-3000:]
    return workdir, root, text


def test_readme_image_folder_command_evaluates_on_val(run):
    workdir, _, err = run
    assert "data.eval_split is 'test', which the image folder lacks: evaluating on its 'val' split" in err
    assert "16 train / 16 eval images" in err
    rows = [line for line in (workdir / "metrics.csv").read_text().splitlines() if ",eval," in line]
    assert len(rows) == 1


# --------------------------------------------------------------------------------------------------
# Workdir, architecture
# --------------------------------------------------------------------------------------------------


def test_workdir_that_is_a_file(tmp_path, capsys):
    root = _image_folder(tmp_path / "pets", splits=("train",), per_class=1)
    for workdir in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        (tmp_path / "notes.txt").write_text("mine")
        before = _names(tmp_path)
        assert train_main(_train_args(workdir, root)) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'notes.txt'} exists and is not a directory; nothing was written" in err
        assert (tmp_path / "notes.txt").read_text() == "mine" and _names(tmp_path) == before


def test_model_init_of_another_architecture(tmp_path):
    saved = mbv3_jax.save(mobilenet_v3_small(num_classes=3, width_mult=0.5), tmp_path / "small")
    with pytest.raises(ValueError) as e:
        trainer.load_init(mobilenet_v3_large(num_classes=3, width_mult=0.5), saved)
    message = str(e.value)
    assert "is a mobilenet_v3_small(width_mult=0.5, num_classes=3), the configured model a " in message
    assert "mobilenet_v3_large(width_mult=0.5, num_classes=3)" in message and len(message) < 500
    # Another class count is no other architecture: the head is re-initialised.
    assert trainer.load_init(mobilenet_v3_small(num_classes=5, width_mult=0.5), saved) == [
        "classifier_out.bias",
        "classifier_out.kernel",
    ]


def test_load_of_a_directory_that_mixes_two_saves(tmp_path):
    small = mbv3_jax.save(mobilenet_v3_small(num_classes=3, width_mult=0.5), tmp_path / "small")
    large = mbv3_jax.save(mobilenet_v3_large(num_classes=3, width_mult=0.5), tmp_path / "large")
    shutil.rmtree(small / "state")
    shutil.copytree(large / "state", small / "state")
    (small / CHECKSUM_FILE).unlink()  # as a save from before checksums: only the arrays can tell
    with pytest.warns(UserWarning, match="integrity is not verified"), pytest.raises(ValueError) as e:
        mbv3_jax.load(small)
    message = str(e.value)
    assert "does not hold the variables of mobilenet_v3_small(width_mult=0.5, num_classes=3)" in message
    assert "in all)" in message and len(message.splitlines()) == 1 and len(message) < 1000


def test_resume_with_another_architecture(run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(run[0], workdir)
    args = [*_train_args(workdir, run[1]), "--model.name", "mobilenet_v3_large", "--allow-config-change"]
    config = (workdir / "config.json").read_text()
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert (
        f"{workdir} holds checkpoints of mobilenet_v3_small(width_mult=1.0, blocks=1); this run builds "
        in err
    )
    assert "mobilenet_v3_large(width_mult=1.0, blocks=1)" in err and len(err.splitlines()) == 1
    assert (workdir / "config.json").read_text() == config  # nothing changed


def test_resume_refuses_a_checkpoint_of_another_architecture(run, tmp_path):
    """The checkpoint's own architecture record (its meta) is compared before orbax restores."""
    workdir = tmp_path / "run"
    shutil.copytree(run[0], workdir)
    cfg = trainer.TrainConfig()
    cfg.model.name, cfg.model.blocks = "mobilenet_v3_small", 2
    model = trainer.build_model(cfg.model, 2)
    from train import checkpointing

    manager = checkpointing.make_manager(workdir, create=False, async_save=False)
    try:
        meta = checkpointing.read_meta(manager, 2)
    finally:
        manager.close()
    assert meta["architecture"]["builder"] == "MobileNetV3"
    with pytest.raises(
        ValueError, match=r"holds checkpoints of a MobileNetV3\(1 blocks, .*this run builds a "
    ):
        trainer._check_resumable(workdir, meta, model.architecture)


# --------------------------------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------------------------------


def test_flipped_bytes_in_a_saved_model_are_refused(tmp_path):
    model = mobilenet_v3_small(num_classes=3, width_mult=0.5)
    saved = mbv3_jax.save(model, tmp_path / "model")
    files = json.loads((saved / CHECKSUM_FILE).read_text())["files"]
    assert "architecture.json" in files and any(name.startswith("state/") for name in files)
    t = time.perf_counter()
    assert verify_checksums(saved)
    print(
        f"verified {sum(f['size'] for f in files.values()) / 1e6:.1f} MB in {time.perf_counter() - t:.3f} s"
    )
    victim = _largest_file(saved / "state")
    _flip(victim)
    with pytest.raises(CheckpointIntegrityError, match=rf"checkpoint file {victim} is damaged: its content"):
        mbv3_jax.load(saved)
    victim.unlink()
    with pytest.raises(CheckpointIntegrityError, match=rf"checkpoint file {victim} is missing"):
        mbv3_jax.load(saved)


def test_a_save_without_checksums_still_loads(tmp_path):
    model = mobilenet_v3_small(num_classes=3, width_mult=0.5)
    saved = mbv3_jax.save(model, tmp_path / "model")
    (saved / CHECKSUM_FILE).unlink()
    with pytest.warns(UserWarning, match="no checksums.json .* integrity is not verified"):
        loaded = mbv3_jax.load(saved)
    np.testing.assert_array_equal(loaded.classifier_out.kernel[...], model.classifier_out.kernel[...])
    mbv3_jax.save(loaded, saved, overwrite=True)  # an old save may be overwritten: it gets checksums
    assert (saved / CHECKSUM_FILE).is_file()


def test_flipped_bytes_in_a_training_checkpoint_are_refused(run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(run[0], workdir)
    step = workdir / "checkpoints" / "2"
    assert verify_checksums(step)
    victim = _largest_file(step / "state")
    _flip(victim)
    with pytest.raises(CheckpointIntegrityError, match=rf"{victim} is damaged"):
        restore_host(workdir)
    assert train_main(_train_args(workdir, run[1])) == 2  # a resume (at its last step) restores it
    assert f"checkpoint file {victim} is damaged" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# A write that fails: one error, no flood of orbax tracebacks
# --------------------------------------------------------------------------------------------------

FULL_DISK = """
    import resource, signal, sys
    from pathlib import Path

    import numpy as np
    import mbv3_jax
    from mbv3_jax.models import mobilenet_v3_small
    from train import checkpointing

    target, what = Path(sys.argv[1]), sys.argv[2]
    model = mobilenet_v3_small(num_classes=3, width_mult=0.5)
    state = {"params": {f"w{i}": np.random.default_rng(i).random((64, 64), np.float32) for i in range(40)}}
    if what != "model":
        manager = checkpointing.make_manager(target, async_save=what == "async", keep_best=0)
        checkpointing.save(manager, 1, state, {"step": 1})
        manager.wait_until_finished()  # its checksums: written at the next save
    # Files may grow to 8 kB from now on (checksums.json does; the next save's data does not): as a
    # full disk does, but also for root, whom a read-only directory does not stop.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8000, resource.RLIM_INFINITY))
    try:
        if what == "model":
            mbv3_jax.save(model, target)
        else:
            checkpointing.save(manager, 2, state, {"step": 2})
            checkpointing.finish(manager)
    except mbv3_jax.checkpoint_io.CheckpointIOError as e:
        print("error:", e, flush=True)
    """


def test_a_failing_write_is_one_clear_error(tmp_path):
    cases = {"model": tmp_path / "out" / "model", "sync": tmp_path / "sync", "async": tmp_path / "async"}
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    procs = {
        what: subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(FULL_DISK), str(target), what],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for what, target in cases.items()
    }
    try:
        outputs = {what: proc.communicate(timeout=180)[0] for what, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    for what, proc in procs.items():
        out = outputs[what]
        assert proc.returncode == 0, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, out[-3000:]
        assert "File too large" in errors[0], errors[0]
        # Before: hundreds of "Event loop is closed" tracebacks and orbax's ERROR records.
        for noise in ("Event loop is closed", "Traceback", "ERROR"):
            assert noise not in out, out[-3000:]
        assert len(out.splitlines()) <= 4, out[-3000:]
        if what == "model":
            assert errors[0].startswith(f"error: could not write the model to {cases['model']}: ")
            assert _names(tmp_path / "out") == []  # no leftover temporary copy
        else:
            assert f"to {cases[what] / 'checkpoints'}: " in errors[0]
            assert "The checkpoints saved before (steps [1]) are intact" in errors[0]
            assert verify_checksums(cases[what] / "checkpoints" / "1")
