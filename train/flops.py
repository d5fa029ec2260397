"""FLOP counts and the machine's dense matmul rate: the benchmarks' fraction-of-peak figures.

A model's FLOPs are XLA's count (``cost_analysis``) of its program on the generic path, where every
convolution is a standard one (2 FLOPs per multiply-add, elementwise ops included); the CPU
kernels compute the same function, so every side of a benchmark is credited the same work. The peak
is measured, not read from a datasheet: the best float32 rate of one large square matmul through XLA
and, where installed, torch, on the device the benchmark runs on.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mbv3_jax import backend

MATMUL_SIZE = 4096


def generic_flops(jitted: Any, *args: Any) -> float:
    """FLOPs of one call of ``jitted`` (a ``jax.jit`` function) on ``args`` (arrays or
    ``jax.ShapeDtypeStruct``), counted by XLA on the generic path."""
    with backend.cpu_kernels(False):
        cost = jitted.lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per program
    return float(cost["flops"])


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_gflops(
    size: int = MATMUL_SIZE, repeats: int = 3, torch_device: str | None = "cpu"
) -> dict[str, float]:
    """GFLOP/s of a ``size`` x ``size`` float32 matmul (median of ``repeats``): ``"xla"`` on JAX's
    default device, at full float32 precision, and ``"torch"`` on ``torch_device`` (TF32 off), when
    torch is installed and ``torch_device`` is given."""
    flops = 2.0 * size**3
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    x = jnp.asarray(a)
    dot = jax.jit(lambda u, v: jnp.dot(u, v, precision=jax.lax.Precision.HIGHEST))
    rates = {"xla": flops / _median_seconds(lambda: dot(x, x).block_until_ready(), repeats) / 1e9}
    if torch_device is None:
        return rates
    try:
        import torch
    except ImportError:
        return rates
    t = torch.from_numpy(a).to(torch_device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:

        def run() -> None:
            torch.mm(t, t)
            if torch_device != "cpu":
                torch.cuda.synchronize()

        rates["torch"] = flops / _median_seconds(run, repeats) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return rates


def peak_gflops(torch_device: str | None = "cpu") -> tuple[float, str]:
    """The benchmarks' peak: the best of ``matmul_gflops``'s rates, and where it came from."""
    rates = matmul_gflops(torch_device=torch_device)
    best = max(rates, key=rates.__getitem__)
    measured = ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items())
    return rates[best], f"best {MATMUL_SIZE}x{MATMUL_SIZE} float32 matmul rate, {best} ({measured})"
