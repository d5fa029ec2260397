"""The digits demo end to end: ``mbv3-train --config digits`` from scratch to >= 90% validation top-1,
then ``mbv3-average`` (a model ``mbv3_jax.load`` and ``porting.to_torchvision`` accept) and ``mbv3-plot``;
and quantization-aware training of that model (``--config digits_qat``) with ``mbv3-quantize``.

Runs in the pytest process on its single CPU device (as the README's example does on a laptop).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from extras import require_torch

import mbv3_jax
from train.average import average_checkpoints, improving_steps
from train.checkpointing import restore_host
from train.cli import average_main, plot_main, quantize_main, train_main
from train.metrics import read_csv
from train.quantize import quantize_run


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, float]:
    workdir = tmp_path_factory.mktemp("digits")
    data_dir = tmp_path_factory.mktemp("tfds")
    start = time.perf_counter()
    # The shipped configuration, evaluated every 2 epochs (its default) and with a progress bar.
    rc = train_main(["--config", "digits", "--workdir", str(workdir), "--data.data_dir", str(data_dir)])
    assert rc == 0
    return workdir, time.perf_counter() - start


def test_digits_demo_reaches_90_percent(demo, capsys):
    workdir, seconds = demo
    rows = read_csv(workdir / "metrics.csv")
    evals = [r for r in rows if r["kind"] == "eval"]
    print(
        f"digits demo: top-1 {evals[-1]['top1']:.4f} after {evals[-1]['epoch']:.0f} epochs, {seconds:.1f} s"
    )
    assert evals[-1]["top1"] >= 0.90
    assert [r["epoch"] for r in evals] == [2.0, 4.0, 6.0]
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(r["images_per_s"] > 0 and r["lr"] > 0 for r in train)
    # torchvision's StepLR(2, gamma) per epoch, lr scaled from the reference batch (64 -> 64: 0.004)
    assert train[0]["lr"] == pytest.approx(0.004) and train[-1]["lr"] == pytest.approx(0.004 * 0.9**2)
    # what a user watches and keeps
    assert (workdir / "metrics.png").stat().st_size > 10_000
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["data"]["dataset"] == "sklearn_digits"
    state, meta, step = restore_host(workdir)
    assert step == 132 and meta["metrics"]["top1"] == evals[-1]["top1"]
    assert int(state["step"]) == 132 and meta["data"]["position"] == 132


def test_average_and_export(demo, tmp_path):
    workdir, _ = demo
    improving = improving_steps(workdir)
    out, steps = average_checkpoints(workdir, tmp_path / "avg", num=2)
    assert steps == improving[-2:]
    model = mbv3_jax.load(out)
    expected = np.mean(
        [restore_host(workdir, s)[0]["params"]["classifier_out"]["kernel"] for s in steps], axis=0
    )
    np.testing.assert_allclose(np.asarray(model.classifier_out.kernel[...]), expected, rtol=1e-6, atol=1e-7)
    # the command line: errors are reported, not raised
    assert average_main([str(workdir), "--out", str(out)]) == 2  # exists
    assert average_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert plot_main([str(workdir), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").is_file()
    assert plot_main([str(tmp_path / "nothing")]) == 2
    # The export to torchvision comes last: it needs torch, the optional "torch" extra.
    require_torch()
    from porting import to_torchvision

    state_dict = to_torchvision(model)  # checked against torchvision with strict=True inside
    assert tuple(state_dict["classifier.3.weight"].shape) == (10, 1024)


def test_quantization_aware_training(demo, tmp_path):
    """torchvision's QAT recipe (shrunk to 3 epochs by ``digits_qat``) on the demo's float model, then
    ``mbv3-quantize``: the integer model in JAX and, from the saved state_dict, in torch."""
    workdir, _ = demo
    float_top1 = [r for r in read_csv(workdir / "metrics.csv") if r["kind"] == "eval"][-1]["top1"]
    float_dir, _ = average_checkpoints(workdir, tmp_path / "float", num=1)
    data_dir = json.loads((workdir / "config.json").read_text())["data"]["data_dir"]
    qat_dir = tmp_path / "qat"
    start = time.perf_counter()
    argv = ["--config", "digits_qat", "--workdir", str(qat_dir), "--data.data_dir", data_dir]
    assert train_main([*argv, "--model.init", str(float_dir), "--train.progress=false"]) == 0
    seconds = time.perf_counter() - start
    evals = [r for r in read_csv(qat_dir / "metrics.csv") if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1.0, 2.0, 3.0]
    assert evals[-1]["top1"] >= float_top1 - 0.02

    # The recipe's switches (digits_qat: BatchNorm statistics during epoch 0, observers during 0-1).
    stats = {s: restore_host(qat_dir, s)[0]["batch_stats"] for s in (22, 44, 66)}
    bn = [s["features"]["4"]["block"]["0"]["conv"]["bn"]["mean"] for s in stats.values()]
    np.testing.assert_array_equal(bn[0], bn[1])
    np.testing.assert_array_equal(bn[1], bn[2])
    observer = [s["features"]["4"]["block"]["0"]["conv"]["activation_post_process"] for s in stats.values()]
    assert observer[0]["max_val"] != observer[1]["max_val"]
    assert observer[1]["max_val"] == observer[2]["max_val"]
    assert [int(o["observer_enabled"][0]) for o in observer] == [1, 1, 0]

    # Converting checks the integer model against torch's, the optional "torch" extra.
    require_torch()
    start = time.perf_counter()
    out, pth = tmp_path / "int8", tmp_path / "int8.pth"
    result = quantize_run(qat_dir, out, pth=pth, evaluate=True, progress=False)
    print(
        f"QAT: float top-1 {float_top1:.4f} -> QAT {result['top1_qat']:.4f} ({seconds:.1f} s), "
        f"int8 JAX {result['top1_int8']:.4f}, int8 torch {result['top1_torch']:.4f} "
        f"(convert + eval {time.perf_counter() - start:.1f} s)"
    )
    assert result["top1_qat"] == evals[-1]["top1"]
    assert result["top1_torch"] == result["top1_int8"] and result["int8_torch_disagreements"] == 0
    assert result["top1_int8"] >= result["top1_qat"] - 0.02
    integer = mbv3_jax.load(out)
    assert integer.architecture["builder"] == "QuantizedMobileNetV3"
    assert integer.features[0].conv.kernel[...].dtype == np.int8
    # the command line: errors are reported, not raised
    assert quantize_main([str(qat_dir), "--out", str(out)]) == 2  # exists
    assert quantize_main([str(workdir), "--out", str(tmp_path / "x")]) == 2  # a float run
    assert average_main([str(qat_dir), "--out", str(tmp_path / "avg")]) == 2  # observers don't average
    assert not (tmp_path / "avg").exists()
