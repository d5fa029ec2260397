"""Eval throughput: mbv3_jax (the plain ``model(x)`` call, compiled) vs torchvision eager, side by side.

One process, same inputs, same allocator settings (whatever GLIBC_TUNABLES this process got applies
to both); the two systems alternate A, B, A, B ... and the script prints medians and the ratio.

    .venv/bin/python benchmarks/bench_classifiers.py                 # Large and Small, batch 1 and 32
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/bench_classifiers.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision

from porting import load_torchvision


def _time_per_call(fn, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def bench(name: str, batch: int, rounds: int, channels_last: bool) -> dict[str, float]:
    torch.manual_seed(0)
    tv = torchvision.models.get_model(name).eval()
    model = load_torchvision(name, tv.state_dict())
    x_np = np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype(np.float32)
    x_jax = jnp.asarray(x_np)
    x_torch = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    if channels_last:
        tv = tv.to(memory_format=torch.channels_last)
        x_torch = x_torch.contiguous(memory_format=torch.channels_last)

    def run_jax():
        jax.block_until_ready(model(x_jax))

    def run_torch():
        with torch.inference_mode():
            tv(x_torch)

    t0 = time.perf_counter()
    run_jax()
    compile_s = time.perf_counter() - t0
    run_torch()
    # ~0.5 s of work per timed block, alternating the two systems.
    iters = max(1, int(0.5 / max(_time_per_call(run_jax, 2), 1e-4)))
    iters_t = max(1, int(0.5 / max(_time_per_call(run_torch, 2), 1e-4)))
    jax_times, torch_times = [], []
    for _ in range(rounds):
        jax_times.append(_time_per_call(run_jax, iters))
        torch_times.append(_time_per_call(run_torch, iters_t))
    j, t = statistics.median(jax_times), statistics.median(torch_times)
    return dict(
        jax_ips=batch / j,
        torch_ips=batch / t,
        ratio=t / j,
        jax_ms=1e3 * j,
        torch_ms=1e3 * t,
        compile_s=compile_s,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mobilenet_v3_large", "mobilenet_v3_small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=7, help="alternating timed blocks per system (median)")
    parser.add_argument("--channels-last", action="store_true", help="torchvision in channels_last instead")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}, "
        f"torch layout {'channels_last' if args.channels_last else 'NCHW'}"
    )
    print(
        f"{'model':<20} {'batch':>5} {'JAX img/s':>10} {'torch img/s':>12} {'JAX/torch':>10} "
        f"{'JAX ms':>8} {'torch ms':>9} {'compile s':>10}"
    )
    for name in args.models:
        for batch in args.batches:
            r = bench(name, batch, args.rounds, args.channels_last)
            print(
                f"{name:<20} {batch:>5} {r['jax_ips']:>10.1f} {r['torch_ips']:>12.1f} {r['ratio']:>9.2f}x "
                f"{r['jax_ms']:>8.2f} {r['torch_ms']:>9.2f} {r['compile_s']:>10.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
