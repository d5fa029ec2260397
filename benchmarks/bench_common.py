"""Side-by-side timing shared by the benchmark scripts: JAX and torch alternate, medians compared."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import jax
import torch


def time_per_call(fn: Callable[[], object], iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def alternate(
    run_jax: Callable[[], object], run_torch: Callable[[], object], rounds: int
) -> dict[str, float]:
    """Median seconds per call of each (A, B, A, B, ... blocks of ~0.5 s), and JAX's first-call time."""
    t0 = time.perf_counter()
    run_jax()
    compile_s = time.perf_counter() - t0
    run_torch()
    iters = max(1, int(0.5 / max(time_per_call(run_jax, 2), 1e-4)))
    iters_t = max(1, int(0.5 / max(time_per_call(run_torch, 2), 1e-4)))
    jax_times, torch_times = [], []
    for _ in range(rounds):
        jax_times.append(time_per_call(run_jax, iters))
        torch_times.append(time_per_call(run_torch, iters_t))
    j, t = statistics.median(jax_times), statistics.median(torch_times)
    return dict(jax_s=j, torch_s=t, ratio=t / j, compile_s=compile_s)


def print_environment(torch_layout: str = "NCHW") -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}, torch layout {torch_layout}"
    )
