"""Eval throughput of the quantized MobileNetV3-Large: the JAX integer model (``model(x)``, compiled)
vs torch's converted quantized model on the qnnpack and x86 engines, the JAX float model and, with
the "export" extra installed, the JAX integer model exported to a LiteRT int8 model (XNNPACK).

One process, same inputs; the systems alternate (A, B, C, D, A, B, ...) in ~0.5 s blocks and the
script prints medians and how many times faster the JAX integer model is than each system
("JAX int8 x" below 1: that system is faster). The quantized models come from torchvision's
quantizable model, fused, calibrated on random inputs with the qnnpack qconfig and converted once
per engine (weights are packed for the engine current at convert time, so each torch model runs
with its own engine set).

    .venv/bin/python benchmarks/bench_quantized.py                  # batch 1 and 32
    .venv/bin/python benchmarks/bench_quantized.py --batches 8 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from bench_common import print_environment, time_per_call

from porting import load_torchvision
from porting.torchvision_io import quantized_engine

ENGINES = ("qnnpack", "x86")


def alternate_many(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, float]]:
    """Median seconds per call of each system over ``rounds`` interleaved ~0.5 s blocks, and the
    first call's time (compilation for JAX)."""
    first: dict[str, float] = {}
    for name, run in runs.items():
        first[name] = time_per_call(run, 1)
    iters = {name: max(1, int(0.5 / max(time_per_call(run, 2), 1e-4))) for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(time_per_call(run, iters[name]))
    return {name: dict(s=statistics.median(t), first_s=first[name]) for name, t in times.items()}


def build(batch: int) -> tuple[dict[str, Callable[[], object]], str]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        float_tv = torchvision.models.quantization.mobilenet_v3_large(weights=None, quantize=False).eval()
        prepared = copy.deepcopy(float_tv)
        prepared.fuse_model(is_qat=False)
        prepared.qconfig = torch.ao.quantization.get_default_qconfig("qnnpack")
        torch.ao.quantization.prepare(prepared, inplace=True)
        with torch.no_grad():
            prepared(torch.randn(4, 3, 224, 224))
        converted = {}
        for engine in ENGINES:
            with quantized_engine(engine):
                converted[engine] = torch.ao.quantization.convert(copy.deepcopy(prepared)).eval()
    int_model = load_torchvision("quantized_mobilenet_v3_large", converted["qnnpack"].state_dict())
    float_model = load_torchvision("mobilenet_v3_large", float_tv.state_dict())

    x_np = np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype(np.float32)
    x_jax = jnp.asarray(x_np)
    x_torch = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()

    def torch_run(engine: str) -> Callable[[], object]:
        def run() -> None:
            with quantized_engine(engine), torch.inference_mode():
                converted[engine](x_torch)

        return run

    runs = {
        "JAX int8": lambda: jax.block_until_ready(int_model(x_jax)),
        "torch qnnpack": torch_run("qnnpack"),
        "torch x86": torch_run("x86"),
        "JAX float32": lambda: jax.block_until_ready(float_model(x_jax)),
    }
    if importlib.util.find_spec("ai_edge_litert") is not None:  # the "export" extra
        runs["LiteRT int8"] = litert_int8_runner(int_model, x_np)
    return runs, "JAX int8"


def litert_int8_runner(int_model, x: np.ndarray) -> Callable[[], object]:
    """The JAX integer model exported to a LiteRT int8 model (mbv3_jax.litert_int8) for this batch,
    run by LiteRT's Interpreter with its default XNNPACK delegate on all cores."""
    from ai_edge_litert.interpreter import Interpreter

    from mbv3_jax.litert_int8 import int8_tflite

    content = int8_tflite(int_model, x.shape[1:3], batch=x.shape[0])
    runner = Interpreter(model_content=content, num_threads=os.cpu_count()).get_signature_runner()
    return lambda: runner(images=x)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timed blocks per system (median)")
    args = parser.parse_args()
    print_environment()
    print(f"{'system':<14} {'batch':>5} {'img/s':>9} {'ms/call':>9} {'JAX int8 x':>11} {'first call s':>13}")
    for batch in args.batches:
        runs, base = build(batch)
        results = alternate_many(runs, args.rounds)
        base_s = results[base]["s"]
        for name, r in results.items():
            print(
                f"{name:<14} {batch:>5} {batch / r['s']:>9.1f} {1e3 * r['s']:>9.2f} "
                f"{r['s'] / base_s:>10.2f}x {r['first_s']:>13.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
