"""How closely LiteRT's integer kernels compute the int8 MobileNetV3-Large that mbv3_jax exports.

torchvision's quantizable MobileNetV3-Large gets calibrated random weights, is calibrated on four of
scikit-image's photos with the qnnpack qconfig and converted (engine qnnpack); the JAX integer model
loads it (bit-identical to torch's qnnpack model, tests/test_quantized_parity.py) and is exported
with ``mbv3_jax.export`` to an int8 .tflite. Printed, for LiteRT's builtin kernels and for its
default XNNPACK delegate:

* per op type, each op run alone on the JAX model's own input for it: the fraction of outputs
  identical to the JAX model's and the largest difference in quantization steps (each kernel's
  rounding, without anything compounding);
* the whole network on all eight photos: logits in steps of the output scale, top-1 agreement with
  the JAX model and with torch's qnnpack model.

    .venv/bin/python benchmarks/int8_litert_agreement.py
"""

from __future__ import annotations

import collections
import copy
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from bench_common import print_environment

from mbv3_jax import export
from mbv3_jax.litert_int8 import as_litert, op_alone, run_tflite
from porting import load_torchvision
from porting.calibration import calibrated_random_weights_, classification_inputs, sample_photos
from porting.torchvision_io import quantized_engine

KERNELS = {"builtin": False, "XNNPACK": True}  # name -> xnnpack


def quantized_models(x: torch.Tensor):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.quantization.mobilenet_v3_large(weights=None, quantize=False)
        calibrated_random_weights_(model, x[:4], seed=1)
        model.eval()
        model.fuse_model(is_qat=False)
        model.qconfig = torch.ao.quantization.get_default_qconfig("qnnpack")
        torch.ao.quantization.prepare(model, inplace=True)
        with torch.no_grad():
            model(torch.cat([x[:4], torch.flip(x[:4], dims=[3])]))
        with quantized_engine("qnnpack"):
            tv = torch.ao.quantization.convert(copy.deepcopy(model)).eval()
            with torch.no_grad():
                tv_logits = tv(x).numpy()
    return load_torchvision("quantized_mobilenet_v3_large", tv.state_dict()), tv_logits


def main() -> None:
    print_environment()
    x = classification_inputs(sample_photos())
    images = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
    model, tv_logits = quantized_models(x)
    ops = model.quantized_intermediates(images[:1])
    jax_values = dict(ops)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int8.tflite"
        export.export(model, path, "tflite")
        content = path.read_bytes()

    print("\nEach op alone on the JAX model's input (photo 0): identical fraction (worst op), max steps")
    table: dict[str, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for name, want in ops:
        single, inputs, kind = op_alone(content, name)
        if kind == "ADD":
            kind = "ADD (hardsigmoid)" if name.endswith("scale_activation") else "ADD (residual)"
        feeds = [images[:1] if i == export.INPUT_NAME else as_litert(jax_values[i]) for i in inputs]
        for kernels, xnnpack in KERNELS.items():
            got = run_tflite(single, feeds, xnnpack=xnnpack).astype(np.int32) + 128
            diff = np.abs(got.reshape(np.shape(want)) - np.asarray(want).astype(np.int32))
            table[kind][kernels].append((float(np.mean(diff == 0)), int(diff.max())))
    header = " ".join(f"{k + ' identical':>20s} {'max':>4s}" for k in KERNELS)
    print(f"{'op':20s} {'count':>5s} {header}")
    for kind, by_kernels in table.items():
        cells = []
        for kernels in KERNELS:
            rows = by_kernels[kernels]
            cells.append(f"{min(f for f, _ in rows):20.5f} {max(m for _, m in rows):4d}")
        print(f"{kind:20s} {len(by_kernels['builtin']):5d} " + " ".join(cells))

    step = float(model.classifier_out.scale[...])
    jax_logits = np.asarray(model(images))
    print(
        f"\nWhole network, {len(images)} photos (logits in steps of {step:.4g}; JAX == torch qnnpack: "
        f"{np.abs(jax_logits - tv_logits).max() / step:.0f} steps)"
    )
    for kernels, xnnpack in KERNELS.items():
        got = np.concatenate([run_tflite(content, [im[None]], xnnpack=xnnpack) for im in images])
        steps = np.abs(got - jax_logits) / step
        print(
            f"  {kernels:8s} max {steps.max():.0f} steps, mean {steps.mean():.2f}; top-1 = JAX's on "
            f"{np.sum(got.argmax(1) == jax_logits.argmax(1))}/{len(images)}, = torch qnnpack's on "
            f"{np.sum(got.argmax(1) == tv_logits.argmax(1))}/{len(images)}"
        )
    top2 = np.sort(jax_logits, 1)
    print("  JAX top-1 margin over top-2, steps:", ((top2[:, -1] - top2[:, -2]) / step).round(1).tolist())


if __name__ == "__main__":
    main()
