"""Segmentation latency at 520 px: mbv3_jax (the plain ``model(x)`` call) vs torchvision eager.

Same protocol as bench_classifiers.py: one process, same inputs, the two systems alternate and the
script prints medians. The input is a 520x693 image (a 4:3 photo at the 520 preset); the models
are built as torchvision's COCO weights are (DeepLabV3 with its aux head, which eval also runs).

    .venv/bin/python benchmarks/bench_segmentation.py            # both models, batch 1 and 8
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
from bench_common import alternate, print_environment

import mbv3_jax
from porting import load_torchvision
from porting.torchvision_io import build_torchvision_model

MODELS = {"lraspp_mobilenet_v3_large": {}, "deeplabv3_mobilenet_v3_large": {"aux_loss": True}}


def bench(name: str, batch: int, size: tuple[int, int], rounds: int) -> dict[str, float]:
    kwargs = MODELS[name]
    torch.manual_seed(0)
    tv = build_torchvision_model(mbv3_jax.get_model(name, **kwargs).architecture).eval()
    model = load_torchvision(name, tv.state_dict(), **kwargs)
    x_np = np.random.default_rng(0).standard_normal((batch, *size, 3)).astype(np.float32)
    x_jax = jnp.asarray(x_np)
    x_torch = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()

    def run_jax():
        jax.block_until_ready(model(x_jax))

    def run_torch():
        with torch.inference_mode():
            tv(x_torch)

    return alternate(run_jax, run_torch, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--size", nargs=2, type=int, default=[520, 693], metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=15, help="alternating timed blocks per system (median)")
    args = parser.parse_args()
    print_environment()
    print(
        f"{'model':<30} {'batch':>5} {'JAX ms/img':>11} {'torch ms/img':>13} "
        f"{'JAX/torch':>10} {'compile s':>10}"
    )
    for name in args.models:
        for batch in args.batches:
            r = bench(name, batch, tuple(args.size), args.rounds)
            jax_ms, torch_ms = 1e3 * r["jax_s"] / batch, 1e3 * r["torch_s"] / batch
            print(
                f"{name:<30} {batch:>5} {jax_ms:>11.1f} {torch_ms:>13.1f} "
                f"{r['ratio']:>9.2f}x {r['compile_s']:>10.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
