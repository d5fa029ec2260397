"""Training throughput of every task: the trainer's jitted step vs torchvision's model, loss and torch's
RMSprop on the same random batch, each model through ``python -m train.benchmark`` (one JSON line per
model: images/s medians, JAX's ratio to torch eager and to the fastest torch side).

    .venv/bin/python benchmarks/bench_training.py                      # the README's rows
    .venv/bin/python benchmarks/bench_training.py --steps 1 --rounds 1  # a quick look
"""

from __future__ import annotations

import argparse
import sys

from train import benchmark

# (model, batch): the README's table.
ROWS = (
    ("mobilenet_v3_large", 32),
    ("lraspp_mobilenet_v3_large", 4),
    ("deeplabv3_mobilenet_v3_large", 4),
    ("ssdlite320_mobilenet_v3_large", 8),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", 4),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--torch", nargs="+", default=["eager", "channels_last"], choices=benchmark.TORCH_SIDES
    )
    parser.add_argument(
        "--models", nargs="+", default=[name for name, _ in ROWS], help="a subset of the rows"
    )
    args = parser.parse_args()
    for name, batch in ROWS:
        if name in args.models:
            argv = ["--model", name, "--batch", str(batch), "--steps", str(args.steps)]
            benchmark.main([*argv, "--rounds", str(args.rounds), "--torch", *args.torch])
    return 0


if __name__ == "__main__":
    sys.exit(main())
