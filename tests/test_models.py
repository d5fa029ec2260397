"""Model API: builders, feature stages, compiled-call cache, bf16, save/load, custom tables."""

import jax.numpy as jnp
import numpy as np
import pytest
from extras import HAVE_TORCH, needs_torch

import mbv3_jax
from mbv3_jax import checkpoint, runtime
from mbv3_jax.models import BlockConfig, MobileNetV3, get_model, list_models, mobilenet_v3_small

if HAVE_TORCH:  # the optional "torch" extra: without it the needs_torch tests skip, the others run
    import torch

    from porting import to_torchvision


def test_get_model_by_torchvision_name():
    assert {"mobilenet_v3_large", "mobilenet_v3_small"} <= set(list_models())
    model = get_model("mobilenet_v3_small", num_classes=7, width_mult=0.5)
    assert model.classifier_out.out_features == 7
    assert model.architecture == {
        "builder": "mobilenet_v3_small",
        "kwargs": dict(num_classes=7, width_mult=0.5, reduced_tail=False, dilated=False, dropout=0.2),
    }
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        get_model("resnet50")
    with pytest.raises(ValueError, match="porting.load_torchvision"):
        get_model("mobilenet_v3_small", weights="IMAGENET1K_V1")


def test_feature_stages_and_strides():
    model = get_model("mobilenet_v3_large", dilated=True)
    model.eval()
    x = jnp.ones((1, 64, 96, 3))
    feats = model.extract_features(x, (4, 16, 1))
    assert sorted(feats) == [1, 4, 16]
    assert feats[1].shape == (1, 32, 48, 16)
    assert feats[4].shape == (1, 8, 12, 40)  # stride 8
    assert feats[16].shape == (1, 4, 6, 960)  # dilated: stride 16 instead of 32


def test_train_eval_and_compiled_cache():
    model = mobilenet_v3_small(num_classes=10)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    model(x)  # train mode (torchvision's default after construction): BN statistics update
    assert int(model.features[0].bn.num_batches_tracked[...]) == 1
    model.eval()
    y1 = model(x)
    size = runtime._run_method._cache_size()
    y2 = model(x)
    assert runtime._run_method._cache_size() == size  # same shape: no new compile
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    assert int(model.features[0].bn.num_batches_tracked[...]) == 1
    # In-place value updates are seen without re-splitting the graph...
    model.classifier_out.bias[...] = model.classifier_out.bias[...] + 1.0
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(y1) + 1.0, rtol=1e-6, atol=1e-6)
    # ...and so are structural edits (a new head).
    from flax import nnx

    from mbv3_jax.layers import Linear

    model.classifier_out = Linear(model.classifier_out.in_features, 3, rngs=nnx.Rngs(1))
    assert model(x).shape == (2, 3)


def test_call_inside_user_jit_and_grad():
    # A two-block table (SE, hardswish, residual): the mechanism, not the size, is under test.
    table = [BlockConfig(16, 3, 16, 16, True, "RE", 2), BlockConfig(16, 3, 48, 16, True, "HS", 1)]
    model = MobileNetV3(table, last_channel=64, num_classes=10)
    model.eval()
    x = jnp.ones((1, 32, 32, 3))
    from flax import nnx

    @nnx.jit
    def f(m, x):
        return m(x)

    np.testing.assert_allclose(np.asarray(f(model, x)), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x))))(model)
    assert np.isfinite(np.asarray(grads["classifier_out"]["kernel"][...])).all()


def test_bfloat16_compute():
    f32 = mobilenet_v3_small(num_classes=10, seed=3)
    bf16 = mobilenet_v3_small(num_classes=10, seed=3, dtype=jnp.bfloat16)
    f32.eval()
    bf16.eval()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
    a, b = f32.extract_features(x, [12])[12], bf16.extract_features(x, [12])[12]
    assert b.dtype == jnp.bfloat16 and bf16.features[0].conv.kernel[...].dtype == jnp.float32
    rel = float(jnp.max(jnp.abs(a - b.astype(jnp.float32))) / jnp.max(jnp.abs(a)))
    assert rel < 0.1, rel


@needs_torch
def test_bfloat16_parameters_save_and_export(tmp_path):
    model = mobilenet_v3_small(num_classes=3, width_mult=0.5, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    loaded = mbv3_jax.load(mbv3_jax.save(model, tmp_path / "bf16"))
    assert loaded.architecture["kwargs"]["param_dtype"] == "bfloat16"
    assert loaded.features[0].conv.kernel[...].dtype == jnp.bfloat16
    state_dict = to_torchvision(loaded)
    assert state_dict["features.0.0.weight"].dtype == torch.float32


def test_save_load_round_trip(tmp_path):
    model = mobilenet_v3_small(num_classes=5, width_mult=0.75)
    model.eval()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 64, 64, 3)), jnp.float32)
    path = mbv3_jax.save(model, tmp_path / "ck")
    loaded = mbv3_jax.load(path)
    assert loaded.architecture == model.architecture
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        mbv3_jax.save(model, path)
    mbv3_jax.save(model, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_save_is_atomic(tmp_path, monkeypatch):
    model = mobilenet_v3_small(num_classes=5)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.ocp.StandardCheckpointer, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        mbv3_jax.save(model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="architecture.json is missing"):
        mbv3_jax.load(tmp_path)
    (tmp_path / "architecture.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        mbv3_jax.load(tmp_path)


@needs_torch
def test_custom_block_table_round_trips_to_torchvision(tmp_path):
    table = [
        BlockConfig(16, 3, 16, 16, True, "RE", 2),
        BlockConfig.make(16, 3, 64, 24, False, "HS", 2, width_mult=1.0),
        BlockConfig(24, 5, 96, 24, True, "HS", 1, dilation=2),
    ]
    model = MobileNetV3(table, last_channel=128, num_classes=4)
    model.eval()
    loaded = mbv3_jax.load(mbv3_jax.save(model, tmp_path / "custom"))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 48, 48, 3)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    state_dict = to_torchvision(model)  # strict load inside
    from porting import build_torchvision_model

    tv = build_torchvision_model(model.architecture).eval()
    tv.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        ref = tv(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).numpy()
    assert np.max(np.abs(np.asarray(model(x)) - ref)) <= 5e-5 * np.max(np.abs(ref))
    with pytest.raises(ValueError, match="activation must be 'RE' or 'HS'"):
        BlockConfig(16, 3, 16, 16, True, "GELU", 1)


def test_segmentation_builders_follow_torchvision():
    lraspp = mbv3_jax.get_model("lraspp_mobilenet_v3_large")
    assert lraspp.num_classes == 21 and lraspp.architecture["kwargs"] == {"num_classes": 21}
    with pytest.raises(NotImplementedError, match="auxiliary loss"):
        mbv3_jax.get_model("lraspp_mobilenet_v3_large", aux_loss=True)
    with pytest.raises(ValueError, match="porting.load_torchvision"):
        mbv3_jax.get_model("deeplabv3_mobilenet_v3_large", weights_backbone="IMAGENET1K_V1")
    deeplab = mbv3_jax.get_model("deeplabv3_mobilenet_v3_large", num_classes=5)
    assert deeplab.aux_classifier is None
    deeplab.eval()
    out = deeplab(np.zeros((2, 67, 91, 3), np.float32))
    assert set(out) == {"out"} and out["out"].shape == (2, 67, 91, 5)
    # A pooled branch in train mode needs more than one value per channel, as in torch.
    deeplab.train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        deeplab(np.zeros((1, 64, 64, 3), np.float32))


@needs_torch
def test_segmentation_backbone_from_classifier_weights():
    import torchvision

    from porting import load_torchvision

    torch.manual_seed(0)
    classifier = torchvision.models.mobilenet_v3_large().state_dict()
    model = load_torchvision("deeplabv3_mobilenet_v3_large", weights_backbone=classifier, aux_loss=True)
    got = np.asarray(model.backbone[3].block[0].conv.kernel[...])
    np.testing.assert_array_equal(got, classifier["features.3.block.0.0.weight"].permute(2, 3, 1, 0).numpy())
    small = torchvision.models.mobilenet_v3_small().state_dict()
    with pytest.raises(ValueError, match="mobilenet_v3_large checkpoint"):
        load_torchvision("lraspp_mobilenet_v3_large", weights_backbone=small)


def test_expand_with_border_is_bit_identical(monkeypatch):
    """Eval on CPU: an expand conv computed on the zero-padded input, its border zeroed, gives the
    depthwise conv the same numbers as padding the expanded map (224 px: the 112x112 block)."""
    import jax

    from mbv3_jax import backend

    model = mbv3_jax.get_model("mobilenet_v3_large")
    model.eval()
    expand, depthwise, project = model.features[2].block
    assert backend._border_fits(expand, depthwise, project, jnp.zeros((1, 112, 112, 16)))
    assert not backend._border_fits(expand, depthwise, project, jnp.zeros((1, 20, 20, 16)))  # > 5%
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 224, 224, 3)), jnp.float32)
    with_border = np.asarray(jax.jit(model.forward)(x))
    monkeypatch.setattr(backend, "MAX_BORDER_GROWTH", 0.0)
    assert not backend._border_fits(expand, depthwise, project, jnp.zeros((1, 112, 112, 16)))
    plain = np.asarray(jax.jit(model.forward)(x))
    np.testing.assert_array_equal(with_border, plain)
