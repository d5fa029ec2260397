"""One training run in three device layouts, for the task tests' agreement checks: 1 device, 8
simulated devices in one process, and 2 processes x 4 (or 2) devices (gloo collectives), each in
subprocesses of ``python -m train.cli``. The 8 devices of one process are data 4 x fsdp 2; the two
processes are data-parallel only (fsdp 1): XLA compiles an fsdp-sharded task model 2-3x slower than a
data-parallel one (LR-ASPP in 2 processes x 4 devices: 62 s against 25 s of each process's compile),
and parameters sharded across processes are the classification test's (``test_train_sharding``:
2 processes x 4 devices, fsdp 4), on the same trainer core."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from train.checkpointing import restore_host

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAYOUTS = ("one", "eight", "two_processes")


def train_in_layouts(
    args: list[str], tmp_path: Path, steps: int, names: tuple[str, ...] = LAYOUTS, process_devices: int = 4
) -> dict[str, tuple[dict, dict]]:
    """{layout name: (the final train state on the host, its eval metrics)} of ``mbv3-train *args``
    run for ``steps`` steps in each of the layouts ``names`` ("two_processes": ``process_devices``
    devices each)."""
    base_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base_env["PYTHONPATH"] = str(REPO)
    port = _free_port()
    layouts = {  # name -> (devices per process, extra flags per process)
        "one": (1, [["--mesh.fsdp", "1"]]),
        "eight": (8, [["--mesh.fsdp", "2"]]),
        "two_processes": (
            process_devices,
            [
                [
                    *("--mesh.fsdp", "1", "--distributed.coordinator_address", f"127.0.0.1:{port}"),
                    *("--distributed.num_processes", "2", "--distributed.process_id", str(i)),
                ]
                for i in range(2)
            ],
        ),
    }
    runs = {}
    for name in names:
        devices, per_process = layouts[name]
        env = dict(base_env)
        if devices > 1:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        workdir = tmp_path / name
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "train.cli", *args, "--workdir", str(workdir), *extra],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for extra in per_process
        ]
        errs = [p.communicate(timeout=900)[1] for p in procs]
        for p, err in zip(procs, errs, strict=True):
            assert p.returncode == 0, err[-4000:]
        assert f"on {devices * len(procs)} devices" in errs[0]
        state, meta, step = restore_host(workdir)
        assert step == steps
        runs[name] = (state, meta["metrics"])
    return runs


def worst_relative_difference(a: dict, b: dict, floor: float = 1e-3) -> float:
    """The largest ``max |a - b| / max(max |a|, floor)`` over the float leaves of two states; integer
    leaves must be equal."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.floating):
            worst = max(worst, float(np.max(np.abs(x - y))) / max(float(np.max(np.abs(x))), floor))
        else:
            np.testing.assert_array_equal(x, y)
    return worst
