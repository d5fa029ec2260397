"""Detection latency per image: mbv3_jax (``model([image])``) vs torchvision eager, side by side,
for Faster R-CNN (320 and 800) and SSDlite320.

Same protocol as bench_classifiers.py. Each call detects on one real photo (scikit-image's); the
timed loop cycles over photos of different sizes, so it measures the steady state of a stream of
photos of a few sizes (one compiled program per padded size, built before timing; the first-call
compile time is printed separately). Calibrated random weights: realistic numbers of proposals.

    .venv/bin/python benchmarks/bench_detection.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_common import alternate, print_environment

import mbv3_jax
from porting import load_torchvision
from porting.calibration import calibrated_any_detector_, sample_photos
from porting.torchvision_io import build_torchvision_model

MODELS = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "ssdlite320_mobilenet_v3_large",
)
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")


def bench(name: str, rounds: int) -> dict[str, float]:
    photos = sample_photos(PHOTOS)
    images_t = [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in photos]
    images_j = [p.astype(np.float32) / 255 for p in photos]
    tv = calibrated_any_detector_(build_torchvision_model(mbv3_jax.get_model(name).architecture), images_t)
    model = load_torchvision(name, tv.state_dict())
    t0 = time.perf_counter()
    model(images_j[:1])
    first_call = time.perf_counter() - t0
    for img in images_j[1:]:  # compile the other sizes before timing
        model([img])
    counter = {"j": 0, "t": 0}

    def run_jax():
        i = counter["j"] = (counter["j"] + 1) % len(images_j)
        model([images_j[i]])

    def run_torch():
        i = counter["t"] = (counter["t"] + 1) % len(images_t)
        with torch.inference_mode():
            tv([images_t[i]])

    result = alternate(run_jax, run_torch, rounds)
    result["first_call_s"] = first_call
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=7, help="alternating timed blocks per system (median)")
    args = parser.parse_args()
    print_environment()
    print(f"photos {', '.join(PHOTOS)} (one per call, cycled)")
    print(f"{'model':<40} {'JAX ms/img':>11} {'torch ms/img':>13} {'torch/JAX':>10} {'first call s':>13}")
    for name in args.models:
        r = bench(name, args.rounds)
        print(
            f"{name:<40} {1e3 * r['jax_s']:>11.1f} {1e3 * r['torch_s']:>13.1f} "
            f"{r['ratio']:>9.2f}x {r['first_call_s']:>13.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
