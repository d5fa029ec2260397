"""Checkpoints as users have them: a torch.compile'd model's state_dict ("_orig_mod."), DDP's
"module.", the EMA weights of torchvision's reference training script (an AveragedModel's state_dict
under "model_ema", beside "model" and the script's argparse "args"), and ``.safetensors`` files.

Each loads into the JAX model, whose weights, exported back with ``to_torchvision``, equal the torch
tensors that were meant; and the errors name what is wrong.
"""

import argparse
import collections

import numpy as np
import pytest
from extras import require_torch

# ruff: noqa: E402
require_torch()  # the optional "torch" extra: without it this file skips whole, before the imports below

import torch
import torchvision

from porting import CheckpointError, load_torchvision, to_torchvision
from porting.torchvision_io import read_checkpoint, state_dict_from

NAME = "mobilenet_v3_small"
KWARGS = {"num_classes": 10, "width_mult": 0.25}


def _torch_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(NAME, weights=None, **KWARGS)


@pytest.fixture(scope="module")
def state_dict():
    return _torch_model().state_dict()


def assert_loads_as(weights, expected, **kwargs):
    """``weights`` load into the JAX model, and its weights are exactly ``expected``."""
    model = load_torchvision(NAME, weights, **KWARGS, **kwargs)
    exported = to_torchvision(model)
    assert list(exported) == list(expected)
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key
    return model


# ------------------------------------------------------------------------------------------------
# Wrapped models' state_dicts


def test_torch_compiled_model(state_dict):
    model = _torch_model()
    compiled = torch.compile(model)  # not run: only its state_dict, which prefixes every key
    sd = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in sd)
    assert_loads_as(sd, state_dict)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_from_a_file(tmp_path, state_dict, prefix):
    # DDP ("module."), torch.compile ("_orig_mod."), and the two nested either way round.
    path = tmp_path / "wrapped.pth"
    torch.save({prefix + k: v for k, v in state_dict.items()}, path)
    assert_loads_as(str(path), state_dict)


def test_ddp_training_checkpoint(tmp_path, state_dict):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": 3}, path)
    assert_loads_as(path, state_dict)


def test_prefix_on_only_some_keys_is_refused(state_dict):
    keys = list(state_dict)
    mixed = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(state_dict.items())}
    with pytest.raises(CheckpointError) as e:
        load_torchvision(NAME, mixed, **KWARGS)
    msg = str(e.value)
    assert "'module.'" in msg and f"'module.{keys[1]}'" in msg and f"'{keys[0]}'" in msg


# ------------------------------------------------------------------------------------------------
# torchvision's reference training script: {"model", "optimizer", "lr_scheduler", "epoch", "args",
# "model_ema"}, model_ema an ExponentialMovingAverage (an AveragedModel: "module.*" + "n_averaged").


class ExponentialMovingAverage(torch.optim.swa_utils.AveragedModel):
    """As references/classification/utils.py defines it."""

    def __init__(self, model, decay, device="cpu"):
        def ema_avg(averaged_model_parameter, model_parameter, num_averaged):
            return decay * averaged_model_parameter + (1 - decay) * model_parameter

        super().__init__(model, device, ema_avg, use_buffers=True)


def _train_step(model, optimizer):
    model.train()
    optimizer.zero_grad()
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    optimizer.step()


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    """(path, model state_dict, EMA model's state_dict, checkpoint["model_ema"]) of a checkpoint saved
    as the reference script saves it."""
    model = _torch_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-5)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)
    model_ema = ExponentialMovingAverage(model, decay=0.5)
    for _ in range(2):  # the first update copies the model, the second averages
        _train_step(model, optimizer)
        lr_scheduler.step()
        model_ema.update_parameters(model)
    args = argparse.Namespace(
        model=NAME, lr=0.1, epochs=600, model_ema=True, model_ema_decay=0.5, weights=None, amp=False
    )
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "epoch": 1,
        "args": args,
        "model_ema": model_ema.state_dict(),
    }
    assert "n_averaged" in checkpoint["model_ema"]
    path = tmp_path_factory.mktemp("reference") / "checkpoint.pth"
    torch.save(checkpoint, path)
    ema = model_ema.module.state_dict()
    trained = model.state_dict()
    assert not torch.equal(ema["features.0.0.weight"], trained["features.0.0.weight"])
    assert not torch.equal(ema["features.0.1.running_mean"], trained["features.0.1.running_mean"])
    return path, trained, ema, checkpoint["model_ema"]


def test_reference_script_checkpoint_ema(reference_checkpoint):
    path, _, ema, _ = reference_checkpoint
    assert_loads_as(str(path), ema, checkpoint_key="model_ema")
    # torch's per-module versions follow the unwrapping (a QAT state_dict's loading reads them).
    assert dict(read_checkpoint(path, "model_ema")._metadata) == dict(ema._metadata)


def test_reference_script_checkpoint_model(reference_checkpoint):
    path, trained, _, _ = reference_checkpoint
    assert_loads_as(str(path), trained)  # default: "model"
    np.testing.assert_array_equal(
        read_checkpoint(path, "model")["classifier.3.bias"].numpy(), trained["classifier.3.bias"].numpy()
    )


def test_args_namespace_is_allowed_for_the_load_only(reference_checkpoint):
    path, _, _, _ = reference_checkpoint
    before = torch.serialization.get_safe_globals()
    assert argparse.Namespace not in before
    read_checkpoint(path)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    # A caller's own allowlist stays as it was.
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        read_checkpoint(path, "model_ema")
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_averaged_model_state_dict_in_memory(reference_checkpoint):
    _, _, ema, averaged = reference_checkpoint
    assert_loads_as(averaged, ema)  # no checkpoint_key: the AveragedModel's own state_dict


# ------------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_file(tmp_path, state_dict):
    from safetensors.torch import save_file  # part of the "torch" extra

    path = tmp_path / "model.safetensors"
    save_file(dict(state_dict), str(path))
    assert_loads_as(str(path), state_dict)
    # Known by its layout too, whatever its name; wrapped keys unwrap as from a .pth.
    other = tmp_path / "ema.bin"
    save_file({"n_averaged": torch.tensor(2), **{f"module.{k}": v for k, v in state_dict.items()}}, other)
    assert_loads_as(other, state_dict)


def test_safetensors_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_torchvision(NAME, str(tmp_path / "missing.safetensors"), **KWARGS)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*safetensors"):
        load_torchvision(NAME, str(bad), **KWARGS)


# ------------------------------------------------------------------------------------------------
# checkpoint_key errors


def test_unknown_checkpoint_key_lists_the_keys(reference_checkpoint):
    path, _, _, _ = reference_checkpoint
    with pytest.raises(CheckpointError) as e:
        load_torchvision(NAME, str(path), checkpoint_key="state_dict_ema", **KWARGS)
    msg = str(e.value)
    assert "checkpoint.pth" in msg and "checkpoint_key='state_dict_ema' is not in the checkpoint" in msg
    for key in ("model", "optimizer", "lr_scheduler", "epoch", "args", "model_ema"):
        assert repr(key) in msg


def test_checkpoint_key_of_something_else(reference_checkpoint):
    path, _, _, _ = reference_checkpoint
    with pytest.raises(CheckpointError, match=r"checkpoint_key='epoch' holds an int, not a state_dict"):
        load_torchvision(NAME, str(path), checkpoint_key="epoch", **KWARGS)


def test_checkpoint_key_on_a_plain_state_dict(state_dict):
    with pytest.raises(CheckpointError, match=r"'model_ema'.*plain state_dict.*leave checkpoint_key out"):
        load_torchvision(NAME, state_dict, checkpoint_key="model_ema", **KWARGS)


def test_training_checkpoint_without_model_names_the_candidates(state_dict):
    checkpoint = {"state_dict": state_dict, "state_dict_ema": state_dict, "epoch": 7}
    with pytest.raises(CheckpointError, match=r"checkpoint_key.*\['state_dict', 'state_dict_ema'\]"):
        load_torchvision(NAME, checkpoint, **KWARGS)
    # ... and with one of them it loads.
    sd = state_dict_from(checkpoint, "state_dict_ema")
    assert list(sd) == list(state_dict)


def test_plain_state_dict_keeps_its_metadata(state_dict):
    out = state_dict_from(state_dict)
    assert isinstance(out, collections.OrderedDict) and out._metadata == state_dict._metadata
