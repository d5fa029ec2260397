"""Training throughput: the trainer's jitted step vs torchvision eager, same model, batch and optimizer.

``python -m train.benchmark --model mobilenet_v3_large --batch 32 --size 224 --steps 10``

Both sides run one full optimizer step per iteration (forward, cross-entropy, backward, PyTorch-mode
RMSProp with weight decay) on random images, in one process, alternating rounds, and the median
images/s is reported. Compile time of the JAX step is reported separately. On CPU, compare both sides
under the same ``GLIBC_TUNABLES`` setting, because the allocator setting moves both frameworks' speed
(see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import numpy as np


def jax_step_runner(name: str, batch: int, size: int, num_classes: int = 1000):
    """(compile seconds, callable running one step and blocking)."""
    from train import sharding, trainer
    from train.config import ModelConfig, OptimConfig

    model = trainer.build_model(ModelConfig(name=name, dropout=0.2), num_classes)
    optim = OptimConfig()
    schedule = trainer.learning_rate(optim, batch, steps_per_epoch=1000, total_steps=10_000)
    mesh = sharding.make_mesh()
    steps = trainer.make_steps(model, trainer.make_optimizer(optim, schedule), schedule, mesh)
    state = {"s": steps.init_state()}
    rng = np.random.default_rng(0)
    x, y = sharding.global_batch(
        mesh, rng.standard_normal((batch, size, size, 3), np.float32), rng.integers(0, num_classes, batch)
    )
    t = time.perf_counter()
    compiled = steps.train_step.lower(state["s"], x, y).compile()
    compile_s = time.perf_counter() - t

    def run() -> None:
        state["s"], out = compiled(state["s"], x, y)
        jax.block_until_ready(out["loss"])

    return compile_s, run


def torch_step_runner(
    name: str,
    batch: int,
    size: int,
    num_classes: int = 1000,
    channels_last: bool = False,
    device: str = "cpu",
):
    import torch
    import torchvision

    model = torchvision.models.get_model(name, num_classes=num_classes).train().to(device)
    opt = torch.optim.RMSprop(
        model.parameters(), lr=0.002, alpha=0.9, eps=0.0316, momentum=0.9, weight_decay=1e-5
    )
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()  # CUDA calls return before the work is done

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v3_large")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--torch-device", default="cpu", help="torchvision device (cuda: JAX on a GPU)")
    parser.add_argument("--channels-last", action="store_true", help="torchvision in channels_last")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    compile_s, jax_run = jax_step_runner(args.model, args.batch, args.size)
    torch_run = torch_step_runner(
        args.model, args.batch, args.size, channels_last=args.channels_last, device=args.torch_device
    )
    jax_run()
    torch_run()  # warm-up
    rates: dict[str, list[float]] = {"jax": [], "torch": []}
    for _ in range(args.rounds):
        for side, fn in (("jax", jax_run), ("torch", torch_run)):
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            rates[side].append(args.steps * args.batch / (time.perf_counter() - t))
    result = {
        "model": args.model,
        "batch": args.batch,
        "size": args.size,
        "jax_backend": jax.default_backend(),
        "torch_device": args.torch_device,
        "jax_compile_s": round(compile_s, 1),
        "jax_images_per_s": round(statistics.median(rates["jax"]), 1),
        "torch_eager_images_per_s": round(statistics.median(rates["torch"]), 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
