"""Eval throughput: mbv3_jax (the plain ``model(x)`` call, compiled) vs torchvision, side by side.

One process, same weights and inputs, same allocator settings (whatever GLIBC_TUNABLES this process
got applies to all); the systems take turns (JAX, torch eager NCHW, torch eager channels_last,
``torch.compile``, JAX, ...: one block of ~0.5 s each per round) and the script prints medians, JAX's
ratio to torch eager NCHW and to the fastest torch row. ``torch.compile`` uses inductor with
``freezing`` (weights folded as constants, as for inference) and runs under ``torch.no_grad()``; its
compile time (the first call) is printed apart, like JAX's first call. The last columns give the
model's FLOPs per image (``train.flops.generic_flops``) and the FLOP rate of JAX and of the fastest
torch row as a percentage of the peak: the best 4096x4096 float32 matmul rate measured at the start
(XLA and torch), or ``--peak-gflops``.

    .venv/bin/python benchmarks/bench_classifiers.py                 # Large and Small, batch 1 and 32
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/bench_classifiers.py
    .venv/bin/python benchmarks/bench_classifiers.py --torch eager   # the JAX vs eager NCHW table only
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch._dynamo
import torch._inductor.config
import torchvision
from bench_common import print_environment, time_per_call
from flax import nnx

from porting import load_torchvision
from train.flops import generic_flops, peak_gflops

TORCH_PATHS = {"eager": "torch eager", "channels_last": "torch ch_last", "compile": "torch.compile"}
SHORT = {"eager": "eager", "channels_last": "ch_last", "compile": "compile"}


def interleave(
    fns: dict[str, Callable[[], object]], rounds: int, block_s: float = 0.5
) -> tuple[dict[str, float], dict[str, float]]:
    """(median seconds per call, first-call seconds) of each function.

    Each is called once (its first call: compile), then ``rounds`` rounds run one timed block of
    ~``block_s`` seconds of each, in turn (A, B, C, A, B, C, ...); the median block is reported.
    """
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    iters = {name: max(1, int(block_s / max(time_per_call(fn, 2), 1e-4))) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_per_call(fn, iters[name]))
    return {name: statistics.median(t) for name, t in times.items()}, first


def torch_runner(
    module: torch.nn.Module, x: torch.Tensor, path: str, device: str = "cpu"
) -> Callable[[], object]:
    """One eval call of ``module`` on ``x`` along ``path`` ("eager", "channels_last" or "compile":
    inductor with freezing, under no_grad), blocking until done. ``module`` is copied, not changed."""
    module = copy.deepcopy(module).eval()
    if path == "channels_last":
        module = module.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if path == "compile":
        torch._dynamo.reset()  # a fresh compile per model and shape (no dynamic-shape recompile)
        torch._inductor.config.freezing = True
        module = torch.compile(module, dynamic=False)
        grad_off = torch.no_grad  # freezing needs no_grad (inference_mode tensors are not frozen)
    else:
        grad_off = torch.inference_mode

    def run():
        with grad_off():
            out = module(x)
        if device != "cpu":
            torch.cuda.synchronize()  # CUDA calls return before the work is done
        return out

    return run


def bench(
    name: str, batch: int, rounds: int, paths: list[str], device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Seconds per call ("s") and first-call seconds ("first_s") of "jax" and each torch path."""
    torch.manual_seed(0)
    tv = torchvision.models.get_model(name).eval()
    model = load_torchvision(name, tv.state_dict())
    tv = tv.to(device)
    x_np = np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype(np.float32)
    x_jax = jnp.asarray(x_np)
    x_torch = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous().to(device)

    def run_jax():
        jax.block_until_ready(model(x_jax))

    fns = {"jax": run_jax} | {p: torch_runner(tv, x_torch, p, device) for p in paths}
    s, first = interleave(fns, rounds)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    flops = generic_flops(forward, state, jax.ShapeDtypeStruct(x_np.shape, jnp.float32))
    return {"s": s, "first_s": first, "flops": flops}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mobilenet_v3_large", "mobilenet_v3_small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=7, help="alternating timed blocks per system (median)")
    parser.add_argument(
        "--torch", nargs="+", choices=list(TORCH_PATHS), default=list(TORCH_PATHS), dest="paths",
        help="torch rows: eager (NCHW), channels_last (eager), compile (inductor, freezing)",
    )  # fmt: skip
    parser.add_argument(
        "--channels-last", action="store_true", help="torch channels_last only (= --torch channels_last)"
    )
    parser.add_argument("--torch-device", default="cpu", help="torchvision device (cuda: JAX on a GPU)")
    parser.add_argument(
        "--peak-gflops", type=float, default=None,
        help="the peak FLOP rate for the %%peak columns (default: a float32 matmul's rate measured here)",
    )  # fmt: skip
    args = parser.parse_args()
    paths = ["channels_last"] if args.channels_last else args.paths
    print_environment(", ".join(TORCH_PATHS[p] for p in paths))
    if args.peak_gflops:
        peak, source = args.peak_gflops, "--peak-gflops"
    else:
        peak, source = peak_gflops(args.torch_device)
    print(f"peak {peak:.0f} GFLOP/s: {source}")
    head = f"{'model':<20} {'batch':>5} {'JAX img/s':>10}"
    head += "".join(f" {TORCH_PATHS[p] + ' img/s':>20}" for p in paths)
    head += f" {'JAX/' + SHORT[paths[0]]:>18} {'JAX/fastest torch':>20} {'JAX ms':>8} {'compile s':>10}"
    if "compile" in paths:
        head += f" {'torch.compile s':>16}"
    head += f" {'GFLOP/img':>10} {'JAX %peak':>10} {'fastest %peak':>14}"
    print(head)
    for name in args.models:
        for batch in args.batches:
            r = bench(name, batch, args.rounds, paths, args.torch_device)
            s = r["s"]
            fastest = min(paths, key=lambda p: s[p])
            line = f"{name:<20} {batch:>5} {batch / s['jax']:>10.1f}"
            line += "".join(f" {batch / s[p]:>20.1f}" for p in paths)
            tag = f"({SHORT[fastest]})"
            line += f" {s[paths[0]] / s['jax']:>17.2f}x {s[fastest] / s['jax']:>9.2f}x {tag:<9}"
            line += f" {1e3 * s['jax']:>8.2f} {r['first_s']['jax']:>10.1f}"
            if "compile" in paths:
                line += f" {r['first_s']['compile']:>16.1f}"
            percent = {side: 100 * r["flops"] / s[side] / 1e9 / peak for side in ("jax", fastest)}
            line += f" {r['flops'] / batch / 1e9:>10.3f} {percent['jax']:>9.1f}% {percent[fastest]:>13.1f}%"
            print(line, flush=True)


if __name__ == "__main__":
    main()
