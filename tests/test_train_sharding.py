"""Sharded training runs (``mbv3-train`` in subprocesses): 1 vs 8 devices, SIGKILL + resume, 2 processes.

Every run trains the same 20 steps of a 1-block MobileNetV3-Small (torchvision's table cut after its first
inverted-residual row: stem, depthwise + SE block, last conv, classifier; so each run compiles quickly) on
the digits data set at 32 px, with dropout and random crops on (RNG paths exercised), eval at the end.
Runs with 8 devices use ``--xla_force_host_platform_device_count=8`` in their own process, so this
module leaves the pytest process's devices alone; the subprocesses share a persistent compilation cache.

Two choices make "parameters within 1e-5 relative" (per tensor, max|a-b| / max|a|) a test of the sharding
rather than of float32 rounding:

* float64 (``--model.dtype/param_dtype float64``). Sharding changes the order of every batch reduction
  (BatchNorm statistics, gradients), so the runs differ at rounding level; in float32 that is ~1e-7, but
  an activation within rounding distance of a kink (hardswish's derivative jumps by 0.5 at +-3, ReLU's by
  1 at 0) then gets a different gradient. Measured in float32: losses equal to 1e-8 for 15 steps, then a
  3e-5 jump and parameters 4.5e-4 apart after 20 steps. tests/test_classifier_parity.py compares
  gradients in float64 for the same reason. (A semantic error, e.g. per-device BatchNorm statistics,
  gives O(1e-2..1) differences at any precision.)
* ``--model.init`` from a saved model with random, BatchNorm-calibrated weights rather than
  torchvision's init, which sets every BatchNorm bias to 0: some of those have an exactly-zero true
  gradient (a bias followed by a 1x1 conv and another BatchNorm), so they hold pure rounding noise
  (~1e-11 in float32) whose relative difference between two summation orders is O(1) at any precision.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from extras import require_torch

from train.checkpointing import restore_host
from train.metrics import TIMING_COLUMNS

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
# max |a - b| <= REL_TOL * max |a|, per tensor: float64 runs differ only in the order of their reductions
# (measured up to 1.3e-12 after 20 steps), so a wrong reduction (e.g. per-device BatchNorm statistics)
# is far above this.
REL_TOL = 1e-10

RUN_ARGS = [
    "--config", "digits",
    "--model.blocks", "1",
    "--train.max_steps", str(STEPS),
    "--train.global_batch", "16",
    "--train.eval_batch", "72",
    "--train.eval_every_steps", str(STEPS),
    "--train.log_every_steps", "5",
    "--train.progress", "false",
    "--checkpoint.every_steps", "5",
    "--checkpoint.keep_last", "10",
    "--data.random_resized_crop", "true",
    "--data.crop_scale", "0.6,1.0",
    "--mesh.fsdp_min_size", "1024",
    "--plot", "false",
    "--model.dtype", "float64",
    "--model.param_dtype", "float64",
    "--optim.ema_decay", "0.9",
]  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("jax-cache")
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)
    e.update(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=str(REPO),
    )
    return e


@pytest.fixture(scope="module")
def args(tmp_path_factory, init_weights) -> list[str]:
    """The flags every run shares: RUN_ARGS, a TFDS data_dir, the init checkpoint."""
    return [*RUN_ARGS, "--data.data_dir", str(tmp_path_factory.mktemp("tfds")), "--model.init", init_weights]


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory) -> str:
    """torchvision's 1-block model with random weights, BatchNorm calibrated on digits, converted and
    saved with ``mbv3_jax.save`` (an orbax directory: the runs load it without importing torch)."""
    # The weights come from torchvision, the optional "torch" extra: without it every run here skips.
    require_torch()
    import torch
    from sklearn.datasets import load_digits

    import mbv3_jax
    from porting.calibration import calibrated_random_weights_
    from porting.mapping import convert_to_jax, load_into
    from porting.rules import rules_for
    from porting.torchvision_io import build_torchvision_model
    from train.config import ModelConfig
    from train.trainer import build_model

    model = build_model(ModelConfig(name="mobilenet_v3_small", blocks=1), 10)
    torch.manual_seed(0)
    tv = build_torchvision_model(model.architecture)
    images = np.repeat(load_digits().images[:32, None].astype(np.float32) / 8 - 1, 3, axis=1)
    x = torch.nn.functional.interpolate(torch.from_numpy(images), size=32, mode="bilinear")
    calibrated_random_weights_(tv, x, seed=1)
    load_into(model, convert_to_jax(tv.state_dict(), model, rules_for(model.architecture["builder"])))
    return str(mbv3_jax.save(model, tmp_path_factory.mktemp("init") / "mobilenet_v3_small_1block"))


def _command(args: list[str], workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train.cli", *args, "--workdir", str(workdir), *extra]


def _env(env: dict[str, str], devices: int) -> dict[str, str]:
    e = dict(env)
    if devices > 1:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e


def _train(env, args: list[str], workdir: Path, devices: int, *extra: str) -> Path:
    proc = subprocess.run(
        _command(args, workdir, *extra),
        env=_env(env, devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


def _final(workdir: Path) -> tuple[dict, dict]:
    state, meta, step = restore_host(workdir)
    assert step == STEPS
    return state, meta


def _flat(tree, prefix=()) -> dict[tuple, np.ndarray]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, (*prefix, str(k))))
        return out
    if isinstance(tree, list | tuple):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flat(v, (*prefix, str(i))))
        return out
    return {prefix: np.asarray(tree)}


def max_relative_difference(a: dict, b: dict) -> float:
    """Largest per-tensor ``max|a-b| / max|a|`` over float leaves (params, BN statistics)."""
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    worst = 0.0
    for k, x in fa.items():
        if not np.issubdtype(x.dtype, np.floating):
            assert np.array_equal(x, fb[k]), k
            continue
        scale = float(np.max(np.abs(x))) or 1.0
        worst = max(worst, float(np.max(np.abs(x - fb[k]))) / scale)
    return worst


def _rows(workdir: Path) -> list[dict]:
    with open(workdir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def runs(env, args, tmp_path_factory) -> dict[int, Path]:
    """The reference runs on 1 device and on 8 (data 2 x fsdp 4), run side by side."""
    from train.data import open_split

    data_dir = args[args.index("--data.data_dir") + 1]
    open_split("sklearn_digits", "train", data_dir=data_dir)  # prepare the data set once, here
    workdirs = {1: tmp_path_factory.mktemp("run1"), 8: tmp_path_factory.mktemp("run8")}
    procs = {
        n: subprocess.Popen(
            _command(args, w, *(["--mesh.fsdp", "4"] if n == 8 else [])),
            env=_env(env, n),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, w in workdirs.items()
    }
    for p in procs.values():
        err = p.communicate(timeout=600)[1]
        assert p.returncode == 0, err[-4000:]
    return workdirs


@pytest.fixture(scope="module")
def run1(runs) -> Path:
    return runs[1]


@pytest.fixture(scope="module")
def run8(runs) -> Path:
    return runs[8]


def test_one_vs_eight_devices(run1, run8):
    """data 1 x fsdp 1 vs data 2 x fsdp 4 (parameters and optimizer state sharded): same 20 steps."""
    s1, m1 = _final(run1)
    s8, m8 = _final(run8)
    params = max_relative_difference(s1["params"], s8["params"])
    stats = max_relative_difference(s1["batch_stats"], s8["batch_stats"])
    print(f"1 vs 8 devices after {STEPS} steps: params {params:.2e}, BN statistics {stats:.2e}")
    assert params <= REL_TOL and stats <= REL_TOL
    assert max_relative_difference(s1["opt_state"], s8["opt_state"]) <= REL_TOL
    assert max_relative_difference(s1["ema"], s8["ema"]) <= REL_TOL
    assert m1["metrics"]["ema_top1"] == pytest.approx(m8["metrics"]["ema_top1"], abs=1 / 360 + 1e-9)
    assert m1["metrics"]["top1"] == pytest.approx(m8["metrics"]["top1"], abs=1 / 360 + 1e-9)
    losses1 = [float(r["loss"]) for r in _rows(run1) if r["kind"] == "train"]
    losses8 = [float(r["loss"]) for r in _rows(run8) if r["kind"] == "train"]
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)


def _wait_for_checkpoint(proc: subprocess.Popen, ckpts: Path, timeout: float = 300) -> int | None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir():
            done = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()]
            if done:
                return max(done)
        time.sleep(0.01)
    return None


def test_sigkill_and_resume_is_exact(env, args, run8, tmp_path):
    """Killed with SIGKILL after its first checkpoint, then resumed: bit-identical to run8."""
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(args, workdir, "--mesh.fsdp", "4"),
        env=_env(env, 8),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    step = _wait_for_checkpoint(proc, workdir / "checkpoints")
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert step is not None and proc.returncode == -signal.SIGKILL, f"not killed mid-way: {err[-3000:]}"
    assert step < STEPS
    print(f"killed after the checkpoint at step {step}")
    _train(env, args, workdir, 8, "--mesh.fsdp", "4")
    resumed, meta_r = _final(workdir)
    reference, meta_ref = _final(run8)
    fr, fref = _flat(resumed), _flat(reference)
    assert fr.keys() == fref.keys()
    for k in fref:
        assert np.array_equal(fr[k], fref[k]), f"{k} differs after resume"
    assert meta_r["metrics"] == meta_ref["metrics"]
    assert _rows(workdir) == _rows(run8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes(env, args, run1, run8, tmp_path):
    """Two processes (4 CPU devices each, gloo collectives) train one 8-device mesh together."""
    workdir = tmp_path / "two"
    port = _free_port()
    procs = []
    for i in range(2):
        extra = [
            "--mesh.fsdp", "4",
            "--distributed.coordinator_address", f"127.0.0.1:{port}",
            "--distributed.num_processes", "2",
            "--distributed.process_id", str(i),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                _command(args, workdir, *extra),
                env=_env(env, 4),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-4000:]
    assert "on 8 devices (data 2 x fsdp 4, 2 process(es))" in errs[0]
    s2, m2 = _final(workdir)
    s1, _ = _final(run1)
    s8, m8 = _final(run8)
    vs1 = max_relative_difference(s1["params"], s2["params"])
    vs8 = max_relative_difference(s8["params"], s2["params"])
    print(f"2 processes vs 1 device: {vs1:.2e}, vs 8 devices in one process: {vs8:.2e}")
    assert vs1 <= REL_TOL and vs8 <= REL_TOL
    assert max_relative_difference(s1["batch_stats"], s2["batch_stats"]) <= REL_TOL
    assert m2["metrics"]["top1"] == pytest.approx(m8["metrics"]["top1"], abs=1 / 360 + 1e-9)
