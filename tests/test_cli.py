"""The two commands, end to end (offline)."""

import pytest
from extras import require_torch

# ruff: noqa: E402
require_torch()  # the optional "torch" extra: without it this file skips whole, before the imports below

import torch
import torchvision

import mbv3_jax
from porting.cli import parity_main, port_main
from porting.parity import NOISE_FLOOR_FACTOR

EVAL_TOL = 5e-5  # the classifier parity tests' eval tolerance, relative to max|torchvision|


def _row_errors(text: str, name: str) -> tuple[float, float, float, float]:
    """(rel err, worst stage rel err, torchvision fp32 and port error against float64) from the
    parity table row of ``name``."""
    row = next(line for line in text.splitlines() if line.startswith(f"{name} "))
    fields = row.split()
    assert fields[2] == "logits", row
    torch_f64, port_f64 = map(float, fields[6].split("/"))
    return float(fields[4]), float(fields[5]), torch_f64, port_f64


def test_mbv3_port_check(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "small.pth"
    torch.save({"model": torchvision.models.mobilenet_v3_small(num_classes=10).state_dict()}, weights)
    out = tmp_path / "converted"
    argv = [
        "mobilenet_v3_small",
        "--weights",
        str(weights),
        "--num-classes",
        "10",
        "--out",
        str(out),
        "--check",
    ]
    assert port_main(argv) == 0
    text = capsys.readouterr().out
    assert f"saved mobilenet_v3_small from {weights}" in text
    rel, worst, *_ = _row_errors(text, "mobilenet_v3_small")
    assert rel <= EVAL_TOL and worst <= EVAL_TOL
    assert "outputs identical" in text
    assert mbv3_jax.load(out).num_classes == 10
    # A second run refuses to overwrite; a wrong configuration names the problem.
    assert port_main(argv[:-1]) == 2
    assert "already exists" in capsys.readouterr().err
    assert port_main(["mobilenet_v3_small", "--weights", str(weights), "--out", str(tmp_path / "x")]) == 2
    assert "shape mismatch for key 'classifier.3.weight'" in capsys.readouterr().err


def test_mbv3_parity_table(capsys):
    assert parity_main(["mobilenet_v3_small", "--repeats", "1", "--stages"]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("mobilenet_v3_small "))
    assert "2,542,856" in row and row.endswith("top-1 100%, top-5 100%")
    rel, worst, torch_f64, port_f64 = _row_errors(text, "mobilenet_v3_small")
    assert rel <= EVAL_TOL and worst <= EVAL_TOL
    assert 0 < port_f64 <= NOISE_FLOOR_FACTOR * torch_f64
    assert "features.12" in text


def test_mbv3_parity_segmentation_figures(tmp_path, capsys):
    argv = ["lraspp_mobilenet_v3_large", "--photos", "astronaut", "chelsea", "--repeats", "0"]
    assert parity_main([*argv, "--save-figures", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("lraspp"))
    assert "3,221,538" in row and "pixels" in row
    figures = sorted(p.name for p in tmp_path.iterdir())
    assert figures == ["lraspp_mobilenet_v3_large_astronaut.png", "lraspp_mobilenet_v3_large_chelsea.png"]
    from PIL import Image

    with Image.open(tmp_path / figures[1]) as im:  # 4 panels side by side at the 520 preset size
        assert im.width > 4 * 780 and im.height > 520


def test_quantized_model_points_to_its_parity_test(capsys):
    for argv, main in (
        (["quantized_mobilenet_v3_large"], parity_main),
        (["quantized_mobilenet_v3_large", "--weights", "x.pth", "--out", "y", "--check"], port_main),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert "tests/test_quantized_parity.py" in capsys.readouterr().err
