"""Eval throughput: mbv3_jax (the plain ``model(x)`` call, compiled) vs torchvision eager, side by side.

One process, same inputs, same allocator settings (whatever GLIBC_TUNABLES this process got applies
to both); the two systems alternate A, B, A, B ... and the script prints medians and the ratio.

    .venv/bin/python benchmarks/bench_classifiers.py                 # Large and Small, batch 1 and 32
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/bench_classifiers.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from bench_common import alternate, print_environment

from porting import load_torchvision


def bench(name: str, batch: int, rounds: int, channels_last: bool, device: str = "cpu") -> dict[str, float]:
    torch.manual_seed(0)
    tv = torchvision.models.get_model(name).eval()
    model = load_torchvision(name, tv.state_dict())
    tv = tv.to(device)
    x_np = np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype(np.float32)
    x_jax = jnp.asarray(x_np)
    x_torch = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous().to(device)
    if channels_last:
        tv = tv.to(memory_format=torch.channels_last)
        x_torch = x_torch.contiguous(memory_format=torch.channels_last)

    def run_jax():
        jax.block_until_ready(model(x_jax))

    def run_torch():
        with torch.inference_mode():
            tv(x_torch)
        if device != "cpu":
            torch.cuda.synchronize()  # CUDA calls return before the work is done

    r = alternate(run_jax, run_torch, rounds)
    j, t = r["jax_s"], r["torch_s"]
    return dict(
        jax_ips=batch / j,
        torch_ips=batch / t,
        ratio=t / j,
        jax_ms=1e3 * j,
        torch_ms=1e3 * t,
        compile_s=r["compile_s"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mobilenet_v3_large", "mobilenet_v3_small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=7, help="alternating timed blocks per system (median)")
    parser.add_argument("--channels-last", action="store_true", help="torchvision in channels_last instead")
    parser.add_argument("--torch-device", default="cpu", help="torchvision device (cuda: JAX on a GPU)")
    args = parser.parse_args()
    print_environment("channels_last" if args.channels_last else "NCHW")
    print(
        f"{'model':<20} {'batch':>5} {'JAX img/s':>10} {'torch img/s':>12} {'JAX/torch':>10} "
        f"{'JAX ms':>8} {'torch ms':>9} {'compile s':>10}"
    )
    for name in args.models:
        for batch in args.batches:
            r = bench(name, batch, args.rounds, args.channels_last, args.torch_device)
            print(
                f"{name:<20} {batch:>5} {r['jax_ips']:>10.1f} {r['torch_ips']:>12.1f} {r['ratio']:>9.2f}x "
                f"{r['jax_ms']:>8.2f} {r['torch_ms']:>9.2f} {r['compile_s']:>10.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
