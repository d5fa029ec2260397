"""Bad input gets one clear error naming the problem: checkpoints, files, image batches."""

import pickle

import jax.numpy as jnp
import numpy as np
import pytest
from extras import HAVE_TORCH, needs_torch

from mbv3_jax.models import mobilenet_v3_small

if HAVE_TORCH:  # the optional "torch" extra: without it the needs_torch tests skip, the others run
    import torch
    import torchvision

    from porting import CheckpointError, WeightMappingError, load_torchvision, torchvision_io


@pytest.fixture(scope="module")
def small_state_dict():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small().state_dict()


@needs_torch
def test_checkpoint_of_another_model_names_key_and_shapes(small_state_dict):
    with pytest.raises(WeightMappingError) as e:
        load_torchvision("mobilenet_v3_large", small_state_dict)
    msg = str(e.value)
    assert "does not fit mobilenet_v3_large" in msg
    # Small's first block has an SE module Large's lacks; its second block expands to 72, Large's to 64.
    assert "key 'features.1.block.1.fc1.weight' maps to features.1.block.1.fc1.kernel, which this" in msg
    assert (
        "shape mismatch for key 'features.2.block.0.0.weight': checkpoint (72, 16, 1, 1)" in msg
        and "model features.2.block.0.conv.kernel expects (1, 1, 16, 64)" in msg
    )


@needs_torch
def test_checkpoint_of_another_configuration(small_state_dict):
    with pytest.raises(WeightMappingError, match=r"classifier\.3\.weight.*\(1000, 1024\).*\(1024, 10\)"):
        load_torchvision("mobilenet_v3_small", small_state_dict, num_classes=10)


@needs_torch
def test_unknown_and_missing_keys(small_state_dict):
    sd = dict(small_state_dict)
    sd["features.99.weird"] = torch.zeros(3)
    del sd["classifier.3.bias"]
    with pytest.raises(WeightMappingError) as e:
        load_torchvision("mobilenet_v3_small", sd)
    msg = str(e.value)
    assert "unexpected key 'features.99.weird'" in msg
    assert "missing: model variable classifier_out.bias (1000,)" in msg


@needs_torch
def test_truncated_file(tmp_path, small_state_dict):
    path = tmp_path / "small.pth"
    torch.save(small_state_dict, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="small.pth.*truncated"):
        load_torchvision("mobilenet_v3_small", str(path))


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


@needs_torch
def test_checkpoint_that_executes_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_torchvision("mobilenet_v3_small", str(path))


@needs_torch
def test_training_checkpoint_and_ddp_prefix(tmp_path, small_state_dict):
    path = tmp_path / "checkpoint.pth"
    ddp = {f"module.{k}": v for k, v in small_state_dict.items()}
    torch.save({"model": ddp, "epoch": 3, "optimizer": {"state": {}}}, path)
    model = load_torchvision("mobilenet_v3_small", str(path))
    np.testing.assert_array_equal(
        np.asarray(model.classifier_out.bias[...]), small_state_dict["classifier.3.bias"].numpy()
    )


@needs_torch
def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_torchvision("mobilenet_v3_small", "nope.pth")


@needs_torch
@pytest.mark.parametrize("weights", ["IMAGENET1K_QNNPACK_V1", "DEFAULT"])
def test_qat_model_refuses_a_weights_name(weights):
    # torchvision's published quantized weights are the converted integer model, not a QAT state.
    with pytest.raises(ValueError, match=r"QAT-prepared model.*quantized_mobilenet_v3_large"):
        load_torchvision("qat_mobilenet_v3_large", weights)


@needs_torch
def test_weights_name_offline_names_the_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as e:
        load_torchvision("mobilenet_v3_small", "IMAGENET1K_V1")
    expected = tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    assert str(expected) in str(e.value)
    assert "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth" in str(e.value)


@needs_torch
def test_weights_name_from_hub_cache(tmp_path, monkeypatch, small_state_dict):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    cached = torchvision_io.hub_cache_file(enum)
    cached.parent.mkdir(parents=True)
    torch.save(small_state_dict, cached)
    for weights in ("IMAGENET1K_V1", "DEFAULT", "MobileNet_V3_Small_Weights.IMAGENET1K_V1", enum):
        model = load_torchvision("mobilenet_v3_small", weights)
        assert model.num_classes == 1000
    with pytest.raises(ValueError, match="IMAGENET1K_V9.*known: DEFAULT, IMAGENET1K_V1"):
        load_torchvision("mobilenet_v3_small", "IMAGENET1K_V9")
    with pytest.raises(ValueError, match="has 1000 classes"):
        load_torchvision("mobilenet_v3_small", "IMAGENET1K_V1", num_classes=10)


@pytest.mark.parametrize(
    "x,error,pattern",
    [
        (np.zeros((2, 3, 64, 64), np.float32), ValueError, "looks like NCHW"),
        (np.zeros((2, 64, 64, 3), np.uint8), TypeError, "dtype uint8"),
        (np.zeros((64, 64, 3), np.float32), ValueError, r"got shape \(64, 64, 3\)"),
        ([1.0, 2.0], TypeError, "got list"),
    ],
)
def test_bad_image_batches(x, error, pattern):
    model = mobilenet_v3_small(num_classes=10)
    with pytest.raises(error, match=pattern):
        model(x)
    with pytest.raises(error, match=pattern):
        model.extract_features(x, [1])


def test_bad_stages():
    model = mobilenet_v3_small(num_classes=10)
    with pytest.raises(ValueError, match=r"stages must be in \[0, 12\]"):
        model.extract_features(jnp.zeros((1, 32, 32, 3)), [13])
