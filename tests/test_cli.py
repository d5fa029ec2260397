"""The two commands, end to end (offline)."""

import torch
import torchvision

import mbv3_jax
from porting.cli import parity_main, port_main


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
    assert "mobilenet_v3_small" in text and "100%" in text
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
    assert "2,542,856" in row and row.count("100%") == 2
    assert "features.12" in text
