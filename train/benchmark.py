"""Training throughput: the trainer's jitted step vs torchvision, same model, batch and optimizer.

``python -m train.benchmark --model mobilenet_v3_large --batch 32 --size 224 --steps 10``; any
``mbv3-train`` model: ``--model lraspp_mobilenet_v3_large`` (segmentation: torchvision's reference
criterion, cross-entropy ignoring 255 plus 0.5 x the aux head's), ``--model
ssdlite320_mobilenet_v3_large`` or a Faster R-CNN (detection: the model's train-mode losses, summed,
on 4 boxes per image, at the size the model's own resize leaves as it is: 320 px, 800 px for the FPN
one; torch's side also runs that normalize and identity resize, which the trainer does on the host).

Every side runs one full optimizer step per iteration (forward, the task's loss, backward, PyTorch-mode
RMSProp with weight decay) on random images, in one process, taking turns round by round (JAX, torch
eager NCHW, torch eager channels_last, ``torch.compile``-d model, JAX, ...), and the median images/s
of each is reported with JAX's ratio to the fastest torch side. The ``steady`` figures are the rate
over all steps but each round's first (the step right after another side ran), as in training:
on CPU the first step after a switch was measured much slower for JAX (docs/performance.md); they
need ``--steps`` >= 2. ``torch.compile`` compiles the model (inductor, forward and backward; the
loss and the optimizer step stay eager). Compile times (the
JAX step's, and the compiled torch model's first step) are reported separately. On CPU, compare the
sides under the same ``GLIBC_TUNABLES`` setting, because the allocator setting moves both frameworks'
speed (see docs/performance.md). ``fraction_of_peak`` is each side's FLOP rate (the step's FLOPs,
``train.flops.generic_flops``, at its median rate) over the peak: the best 4096x4096 float32 matmul
rate measured after the timing (XLA and torch), or ``--peak-gflops``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

NUM_CLASSES = {"classification": 1000, "segmentation": 21, "detection": 91}  # torchvision's defaults
BOXES_PER_IMAGE = 4


def random_batch(kind: str, batch: int, size: int, num_classes: int) -> tuple[np.ndarray, object]:
    """NHWC float32 images and the task's targets: class labels, (N, H, W) masks with a band of 255,
    or detection targets padded to 8 rows (``BOXES_PER_IMAGE`` valid boxes in the size x size frame)."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    if kind == "segmentation":
        masks = rng.integers(0, num_classes, (batch, size, size)).astype(np.int32)
        masks[:, : size // 16] = 255
        return images, masks
    if kind == "detection":
        xy = rng.uniform(0, size * 0.6, (batch, 8, 2))
        wh = rng.uniform(size * 0.1, size * 0.4, (batch, 8, 2))
        valid = np.arange(8)[None].repeat(batch, 0) < BOXES_PER_IMAGE
        boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
        labels = np.where(valid, rng.integers(1, num_classes, (batch, 8)), 0).astype(np.int32)
        image_size = np.full((batch, 2), size, np.int32)
        return images, {"boxes": boxes, "labels": labels, "valid": valid, "image_size": image_size}
    return images, rng.integers(0, num_classes, batch).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class JaxStep:
    compile_s: float
    run: Callable[[], None]  # one training step, blocking until done
    flops: float  # of one step, counted on the generic path (train.flops.generic_flops)


def jax_step_runner(name: str, batch: int, size: int, num_classes: int | None = None) -> JaxStep:
    """The trainer's jitted step for ``name`` on a random batch, compiled."""
    from train import flops, sharding, tasks, trainer
    from train.config import ModelConfig, OptimConfig

    kind = trainer.task_kind(name)
    num_classes = num_classes or NUM_CLASSES[kind]
    model = trainer.build_model(
        ModelConfig(name=name, dropout=0.2, aux_loss="deeplabv3" in name), num_classes
    )
    if kind == "detection":
        task = tasks.Detection(num_classes, None, trainer.keep_ratio(model))
    else:
        task = tasks.Segmentation(num_classes) if kind == "segmentation" else tasks.Classification()
    optim = OptimConfig()
    schedule = trainer.learning_rate(optim, batch, steps_per_epoch=1000, total_steps=10_000)
    mesh = sharding.make_mesh()
    steps = trainer.make_steps(model, trainer.make_optimizer(optim, schedule), schedule, mesh, task=task)
    state = {"s": steps.init_state()}
    x, y = sharding.global_batch(mesh, *random_batch(kind, batch, size, num_classes))
    t = time.perf_counter()
    compiled = steps.train_step.lower(state["s"], x, y).compile()
    compile_s = time.perf_counter() - t

    def run() -> None:
        state["s"], out = compiled(state["s"], x, y)
        jax.block_until_ready(out["loss"])

    return JaxStep(compile_s, run, flops.generic_flops(steps.train_step, state["s"], x, y))


def torch_step_runner(
    name: str,
    batch: int,
    size: int,
    num_classes: int | None = None,
    channels_last: bool = False,
    device: str = "cpu",
    compile: bool = False,
):
    """A callable running one torch training step and blocking. ``compile``: the model through
    ``torch.compile`` (inductor; a fresh compile, static shapes)."""
    import torch
    import torchvision

    from train.trainer import task_kind

    kind = task_kind(name)
    num_classes = num_classes or NUM_CLASSES[kind]
    kwargs = {"aux_loss": True} if "deeplabv3" in name else {}
    if kind != "classification":
        kwargs |= {"weights_backbone": None}
    model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs).train().to(device)
    opt = torch.optim.RMSprop(
        model.parameters(), lr=0.002, alpha=0.9, eps=0.0316, momentum=0.9, weight_decay=1e-5
    )
    images, targets = random_batch(kind, batch, size, num_classes)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    if kind == "detection":
        x = (x - x.min()) / (x.max() - x.min())  # images in [0, 1]: the model normalizes them
        y = [
            {"boxes": torch.from_numpy(b[v]).to(device), "labels": torch.from_numpy(lab[v]).long().to(device)}
            for b, lab, v in zip(targets["boxes"], targets["labels"], targets["valid"], strict=True)
        ]
    else:
        y = torch.from_numpy(np.asarray(targets)).long().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    forward = model
    if compile:
        import torch._dynamo

        torch._dynamo.reset()
        forward = torch.compile(model, dynamic=False)

    def loss() -> torch.Tensor:
        if kind == "detection":
            return sum(forward(list(x), y).values())
        out = forward(x)
        if kind == "classification":
            return torch.nn.functional.cross_entropy(out, y)
        total = torch.nn.functional.cross_entropy(out["out"], y, ignore_index=255)
        if "aux" in out:
            total = total + 0.5 * torch.nn.functional.cross_entropy(out["aux"], y, ignore_index=255)
        return total

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()  # CUDA calls return before the work is done

    return run


TORCH_SIDES = ("eager", "channels_last", "compile")


def peak_fractions(args: argparse.Namespace, flops_per_image: float, images_per_s: dict[str, float]) -> dict:
    """Each side's FLOP rate as a fraction of the peak: ``--peak-gflops`` or the measured matmul rate."""
    from train import flops

    if args.peak_gflops:
        peak, source = args.peak_gflops, "--peak-gflops"
    else:
        peak, source = flops.peak_gflops(args.torch_device)
    return {
        "gflop_per_step": round(flops_per_image * args.batch / 1e9, 2),
        "peak_gflop_s": round(peak, 1),
        "peak_from": source,
        "fraction_of_peak": {
            side if side == "jax" else f"torch_{side}": round(rate * flops_per_image / 1e9 / peak, 3)
            for side, rate in images_per_s.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v3_large")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--size", type=int, default=None, help="default: 224 (320 for SSDlite, 480 segmentation)"
    )
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--torch-device", default="cpu", help="torchvision device (cuda: JAX on a GPU)")
    parser.add_argument(
        "--torch", nargs="+", choices=TORCH_SIDES, default=list(TORCH_SIDES), dest="sides",
        help="torch sides: eager (NCHW), channels_last (eager), compile (torch.compile, inductor)",
    )  # fmt: skip
    parser.add_argument(
        "--channels-last", action="store_true", help="torch channels_last only (= --torch channels_last)"
    )
    parser.add_argument(
        "--peak-gflops", type=float, default=None,
        help="the peak FLOP rate to compare with (default: a float32 matmul's rate measured in this run)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    from mbv3_jax import backend

    backend.set_cpu_xla_flags()  # as mbv3-train runs
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sides = ["channels_last"] if args.channels_last else list(dict.fromkeys(args.sides))
    from train.trainer import task_kind

    kind = task_kind(args.model)
    fixed = {"ssdlite320_mobilenet_v3_large": 320, "fasterrcnn_mobilenet_v3_large_320_fpn": 320}
    fixed["fasterrcnn_mobilenet_v3_large_fpn"] = 800
    if args.size is None:
        args.size = fixed.get(args.model) or {"classification": 224, "segmentation": 480}[kind]
    elif args.model in fixed and args.size != fixed[args.model]:
        parser.error(
            f"{args.model} is benchmarked at {fixed[args.model]} px (its own resize leaves it as is)"
        )
    jax_step = jax_step_runner(args.model, args.batch, args.size)
    runs = {"jax": jax_step.run}
    for side in sides:
        runs[side] = torch_step_runner(
            args.model,
            args.batch,
            args.size,
            channels_last=side == "channels_last",
            device=args.torch_device,
            compile=side == "compile",
        )
    first_s = {}
    for side, fn in runs.items():  # warm-up; the compiled torch model compiles in its first step
        t = time.perf_counter()
        fn()
        first_s[side] = time.perf_counter() - t
        fn()
    rates: dict[str, list[float]] = {side: [] for side in runs}
    # Seconds per step, each round's first step left out.
    later_steps: dict[str, list[float]] = {side: [] for side in runs}
    for _ in range(args.rounds):
        for side, fn in runs.items():
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            rates[side].append(args.steps * args.batch / sum(times))
            later_steps[side].extend(times[1:])
    median = {side: statistics.median(r) for side, r in rates.items()}
    fastest = max(sides, key=median.__getitem__)
    result = {
        "model": args.model,
        "batch": args.batch,
        "size": args.size,
        "jax_backend": jax.default_backend(),
        "torch_device": args.torch_device,
        "torch_threads": torch.get_num_threads(),
        "jax_compile_s": round(jax_step.compile_s, 1),
        "jax_images_per_s": round(median["jax"], 1),
    }
    for side in sides:
        result[f"torch_{side}_images_per_s"] = round(median[side], 1)
    if "compile" in sides:
        result["torch_compile_first_step_s"] = round(first_s["compile"], 1)
    result["fastest_torch"] = fastest
    result["jax_over_fastest_torch"] = round(median["jax"] / median[fastest], 2)
    if "eager" in sides:
        result["jax_over_torch_eager"] = round(median["jax"] / median["eager"], 2)
    if args.steps >= 2:
        # A rate over all those steps, not a median: occasional slow steps count, as in training.
        steady = {side: args.batch * len(t) / sum(t) for side, t in later_steps.items()}
        for side in runs:
            name = side if side == "jax" else f"torch_{side}"
            result[f"{name}_steady_images_per_s"] = round(steady[side], 1)
        fastest_steady = max(sides, key=steady.__getitem__)
        result["jax_over_fastest_torch_steady"] = round(steady["jax"] / steady[fastest_steady], 2)
    result |= peak_fractions(args, jax_step.flops / args.batch, median)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
