"""mbv3_jax.export: each (model family x format) artifact run in its own runtime against the JAX model,
and the error cases (unsupported model / format / size, missing package, atomic writes)."""

import json
import sys

import numpy as np
import pytest
from extras import HAVE_JAX2ONNX, needs_export

import mbv3_jax
from mbv3_jax import export as ex

pytestmark = needs_export
needs_jax2onnx = pytest.mark.skipif(
    not HAVE_JAX2ONNX, reason="jax2onnx needs Python 3.11+ (the 'export' extra)"
)
TOL = 1e-5  # max |artifact - JAX| / max |JAX|


def _images(hw: tuple[int, int], batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *hw, 3)).astype(np.float32)


def _export_and_compare(model, tmp_path, fmt: str, size: int, **kwargs) -> dict:
    out = ex.export(model, tmp_path / f"model.{fmt}", fmt, input_size=size, **kwargs)
    info = json.loads(ex.sidecar(out).read_text())
    x = _images((size, size))
    got = ex.run(out, x)
    want = ex.reference(model, x)
    assert sorted(got) == sorted(want) == sorted(o["name"] for o in info["outputs"])
    errors = ex.max_relative_error(got, want)
    assert max(errors.values()) <= TOL, errors
    assert info["input"]["shape"][1:] == [size, size, 3] and info["input"]["layout"] == "NHWC"
    return info


# ------------------------------------------------------------------------------------------------
# Classifiers: Large and Small, builder options


def test_classifier_stablehlo_symbolic_batch(tmp_path):
    # An explicit micro-batch size: a symbolic batch runs whole (backend.map_micro_batches).
    model = mbv3_jax.get_model("mobilenet_v3_large", width_mult=0.75, num_classes=10)
    model.eval_micro_batch = 2
    info = _export_and_compare(model, tmp_path, "stablehlo", 64)
    assert info["input"]["shape"][0] == "b" and info["platforms"] == ["cpu", "cuda", "tpu"]
    loaded = ex.load_artifact(tmp_path / "model.stablehlo")  # loaded once, called per batch size
    for batch in (3, 3, 5):
        x = _images((64, 64), batch=batch, seed=batch)
        assert ex.max_relative_error(loaded(x), ex.reference(model, x))["logits"] <= TOL


def test_classifier_tflite_and_float16_weights(tmp_path):
    model = mbv3_jax.get_model("mobilenet_v3_small", reduced_tail=True, dilated=True)
    info = _export_and_compare(model, tmp_path, "tflite", 64)
    assert info["input"]["shape"] == [1, 64, 64, 3]
    half = ex.export(model, tmp_path / "half.tflite", "tflite", input_size=64, float16_weights=True)
    assert half.stat().st_size < 0.6 * (tmp_path / "model.tflite").stat().st_size
    x = _images((64, 64))
    err = ex.max_relative_error(ex.run(half, x), ex.reference(model, x))["logits"]
    assert err < 1e-2  # float16 weights: ~1e-3


@needs_jax2onnx
def test_classifier_onnx(tmp_path):
    _export_and_compare(mbv3_jax.get_model("mobilenet_v3_large"), tmp_path, "onnx", 64)


def test_classifier_saved_model(tmp_path):
    info = _export_and_compare(mbv3_jax.get_model("mobilenet_v3_small"), tmp_path, "saved_model", 64)
    assert info["input"]["shape"][0] == "b"


# ------------------------------------------------------------------------------------------------
# Segmentation: LR-ASPP, DeepLabV3 with its aux head (two named outputs)


@pytest.mark.parametrize("fmt", ["stablehlo", "tflite"])
def test_lraspp(tmp_path, fmt):
    info = _export_and_compare(mbv3_jax.get_model("lraspp_mobilenet_v3_large"), tmp_path, fmt, 64)
    assert [o["name"] for o in info["outputs"]] == ["out"]


@pytest.mark.parametrize("fmt", [pytest.param("onnx", marks=needs_jax2onnx), "saved_model"])
def test_deeplabv3_aux(tmp_path, fmt):
    model = mbv3_jax.get_model("deeplabv3_mobilenet_v3_large", aux_loss=True, num_classes=5)
    info = _export_and_compare(model, tmp_path, fmt, 64)
    assert [o["name"] for o in info["outputs"]] == ["out", "aux"]
    assert info["outputs"][0]["shape"][1:] == [64, 64, 5]


# ------------------------------------------------------------------------------------------------
# SSDlite: whole detections in StableHLO; the network's outputs elsewhere, post-processed by the
# StableHLO program written beside them


@pytest.fixture(scope="module")
def ssdlite():
    model = mbv3_jax.get_model("ssdlite320_mobilenet_v3_large", num_classes=6)
    x = _images((320, 320))
    return model, x, ex.reference(model, x, head_only=True)


def test_ssdlite_stablehlo_detections(tmp_path, ssdlite):
    model, x, want = ssdlite
    out = ex.export(model, tmp_path / "ssd.stablehlo", "stablehlo")
    info = json.loads(ex.sidecar(out).read_text())
    assert info["input"]["shape"] == ["b", 320, 320, 3] and "postprocess" not in info
    got = ex.run(out, x)
    assert sorted(got) == ["boxes", "labels", "num_detections", "scores"]
    for name, value in got.items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)  # the same program: bit-exact


@pytest.mark.parametrize(
    "fmt", ["tflite", pytest.param("onnx", marks=needs_jax2onnx), "saved_model"]
)  # fmt: skip
def test_ssdlite_head_and_postprocess(tmp_path, ssdlite, fmt):
    model, x, want = ssdlite
    out = ex.export(model, tmp_path / f"ssd.{fmt}", fmt)
    info = json.loads(ex.sidecar(out).read_text())
    assert [o["name"] for o in info["outputs"]] == ["bbox_regression", "cls_logits"]
    assert (tmp_path / info["postprocess"]["file"]).is_file()
    got = ex.run(out, x)
    errors = ex.max_relative_error(got, want)
    assert max(errors["bbox_regression"], errors["cls_logits"]) <= TOL, errors
    # Detections after the shipped post-processing: the JAX model's, exactly (at this head error).
    n = int(want["num_detections"][0])
    assert int(got["num_detections"][0]) == n
    for name in ("boxes", "scores"):
        np.testing.assert_allclose(got[name][0, :n], want[name][0, :n], rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_array_equal(got["labels"][0, :n], want["labels"][0, :n])


# ------------------------------------------------------------------------------------------------
# Faster R-CNN: whole detections in StableHLO, its transform outside (detection_inputs); the other
# formats refused


def _match_detections(got: dict, want: dict, min_iou: float = 0.99, max_score_diff: float = 1e-4) -> int:
    """Pairs each wanted detection with an unused one of the same label at IoU >= min_iou and
    |score difference| <= max_score_diff; asserts all pair up and returns how many were identical."""
    from mbv3_jax.ops.boxes import box_iou

    assert len(got["scores"]) == len(want["scores"])
    if not len(want["scores"]):
        return 0
    iou = np.asarray(box_iou(want["boxes"], got["boxes"]))
    used = np.zeros(len(got["scores"]), bool)
    identical = 0
    for i in range(len(want["scores"])):
        ok = (
            ~used
            & (got["labels"] == want["labels"][i])
            & (np.abs(got["scores"] - want["scores"][i]) <= max_score_diff)
        )
        j = int(np.argmax(np.where(ok, iou[i], -1.0)))
        assert ok[j] and iou[i, j] >= min_iou, (i, want["boxes"][i], want["scores"][i], iou[i, j])
        used[j] = True
        identical += bool(
            np.array_equal(got["boxes"][j], want["boxes"][i]) and got["scores"][j] == want["scores"][i]
        )
    return identical


def test_faster_rcnn_stablehlo_detections(tmp_path):
    from mbv3_jax import backend

    # Few classes: softmax scores of random weights clear the 0.05 threshold, so detections come out.
    model = mbv3_jax.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3)
    model.eval()
    rng = np.random.default_rng(0)
    # A square photo (resized to 320x320) and a landscape one (320x416): torchvision pads the batch
    # to 320x416, the size the artifact is exported at.
    photos = [rng.uniform(0, 1, (h, w, 3)).astype(np.float32) for h, w in ((240, 240), (200, 260))]
    out = ex.export(model, tmp_path / "frcnn.stablehlo", "stablehlo", input_size=(320, 416))
    info = json.loads(ex.sidecar(out).read_text())
    assert info["family"] == "faster_rcnn" and info["input"]["shape"] == ["b", 320, 416, 3]
    assert info["input"]["image_sizes"]["shape"] == ["b", 2]
    assert [o["name"] for o in info["outputs"]] == ["boxes", "scores", "labels", "num_detections"]
    assert info["outputs"][0]["shape"] == ["b", 100, 4]

    x, sizes, originals = ex.detection_inputs(model, photos, (320, 416))
    batch, model_sizes, _ = model.preprocess(photos)
    np.testing.assert_array_equal(x, np.asarray(batch))  # detection_inputs is the model's transform
    np.testing.assert_array_equal(sizes, model_sizes)
    assert sizes.tolist() == [[320, 320], [320, 416]] and originals == [(240, 240), (200, 260)]
    raw = ex.run(out, x, image_sizes=sizes)  # a symbolic batch of 2: one image at a time
    for name, value in ex.reference(model, x, image_sizes=sizes).items():
        np.testing.assert_array_equal(raw[name], value, err_msg=name)  # the same program: bit-exact
    got = ex.detections_per_image(raw, sizes, originals)
    with backend.cpu_kernels(False):  # the batched program of the model's own call (generic path)
        want = model(photos)
    for g, w in zip(got, want, strict=True):
        assert len(w["scores"]) > 10
        _match_detections(g, w)
    # Padding slots are zeros.
    n = int(raw["num_detections"][0])
    assert n < 100 or np.all(raw["scores"][0, n:] == 0)


def test_faster_rcnn_refusals(tmp_path):
    model = mbv3_jax.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3)
    for fmt in ("tflite", "onnx", "saved_model"):
        with pytest.raises(ex.ExportError, match=f"Faster R-CNN exports to format 'stablehlo' only.*{fmt}"):
            ex.export(model, tmp_path / f"f.{fmt}", fmt)
    with pytest.raises(ex.ExportError, match="multiples of 32.*got 320x300: use 320x320"):
        ex.export(model, tmp_path / "f.stablehlo", "stablehlo", input_size=(320, 300))
    photo = np.zeros((100, 200, 3), np.float32)  # resizes to 320x640
    with pytest.raises(ex.ExportError, match=r"resizes to 320x640.*input_size=\(320, 640\)"):
        ex.detection_inputs(model, [photo])
    with pytest.raises(ValueError, match="image_sizes must lie within the 320x320 input"):
        ex.reference(model, np.zeros((1, 320, 320, 3), np.float32), image_sizes=np.array([[321, 320]]))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Bad input: one clear error each


@pytest.fixture(scope="module")
def small():
    return mbv3_jax.get_model("mobilenet_v3_small", num_classes=3)


def test_unsupported_models(tmp_path):
    int8 = mbv3_jax.get_model("quantized_mobilenet_v3_large")
    with pytest.raises(ex.ExportError, match="int8 model .* exports to format 'tflite' only"):
        ex.export(int8, tmp_path / "q.onnx", "onnx")
    with pytest.raises(ex.ExportError, match="float16_weights does not apply to the int8 model"):
        ex.export(int8, tmp_path / "q.tflite", "tflite", float16_weights=True)
    from mbv3_jax.models import qat

    qat_model = qat.from_float(mbv3_jax.get_model("mobilenet_v3_large"))
    with pytest.raises(ex.ExportError, match="convert it to the int8 model first"):
        ex.export(qat_model, tmp_path / "q.tflite", "tflite")
    assert list(tmp_path.iterdir()) == []


def test_int8_tflite_runs(tmp_path):
    """The int8 model's LiteRT export runs in LiteRT (agreement with the JAX int8 model and torch's
    qnnpack on calibrated weights: tests/test_quantized_parity.py)."""
    out = ex.export(
        mbv3_jax.get_model("quantized_mobilenet_v3_large", num_classes=7),
        tmp_path / "q.tflite",
        "tflite",
        input_size=64,
    )
    info = json.loads(ex.sidecar(out).read_text())
    assert info["family"] == "int8_classifier" and info["input"]["shape"] == [1, 64, 64, 3]
    assert "int8" in info["quantization"]["activations"]
    logits = ex.run(out, _images((64, 64)))["logits"]
    assert logits.shape == (1, 7) and logits.dtype == np.float32


def test_bad_arguments(tmp_path, small):
    with pytest.raises(ex.ExportError, match="unknown format 'tfjs'; supported: stablehlo, tflite"):
        ex.export(small, tmp_path / "m", "tfjs")
    with pytest.raises(ex.ExportError, match="float16_weights applies to format 'tflite' only"):
        ex.export(small, tmp_path / "m", "onnx", float16_weights=True)
    with pytest.raises(ex.ExportError, match="input_size must be"):
        ex.export(small, tmp_path / "m", "stablehlo", input_size=(0, 64))
    with pytest.raises(ex.ExportError, match="batch must be a positive integer"):
        ex.export(small, tmp_path / "m", "stablehlo", batch=0)
    with pytest.raises(ex.ExportError, match="platforms must be among"):
        ex.export(small, tmp_path / "m", "stablehlo", platforms=["metal"])
    ssd = mbv3_jax.get_model("ssdlite320_mobilenet_v3_large")
    with pytest.raises(ex.ExportError, match="SSDlite takes 320x320 inputs only"):
        ex.export(ssd, tmp_path / "m", "stablehlo", input_size=(300, 300))
    with pytest.raises(ex.ExportError, match="is not a model saved with mbv3_jax.save"):
        ex.export(tmp_path, tmp_path / "m", "stablehlo")
    assert list(tmp_path.iterdir()) == []


def test_missing_dependency(tmp_path, small, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    # jax2onnx imports onnxruntime, so it is named too unless an earlier test imported it already.
    missing = r"needs (jax2onnx, )?onnxruntime, not installed: pip install -e '\.\[export\]'"
    with pytest.raises(ex.MissingDependencyError, match=missing):
        ex.export(small, tmp_path / "m.onnx", "onnx")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes(tmp_path, small, monkeypatch):
    out = tmp_path / "m.stablehlo"
    ex.export(small, out, "stablehlo", input_size=32)
    before = out.read_bytes(), ex.sidecar(out).read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        ex.export(small, out, "stablehlo", input_size=32)

    def fail_midway(prog, tmp, *args):
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "_write_stablehlo", fail_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        ex.export(small, out, "stablehlo", input_size=48, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        ex.export(small, tmp_path / "new.stablehlo", "stablehlo", input_size=48)
    assert (out.read_bytes(), ex.sidecar(out).read_text()) == before  # the old artifact, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.stablehlo", "m.stablehlo.json"]
    monkeypatch.undo()
    ex.export(small, out, "stablehlo", input_size=48, overwrite=True)
    assert json.loads(ex.sidecar(out).read_text())["input"]["shape"] == ["b", 48, 48, 3]


def test_saved_model_directory_replaced(tmp_path, small):
    out = tmp_path / "sm"
    ex.export(small, out, "saved_model", input_size=32, batch=2)
    ex.export(small, out, "saved_model", input_size=40, batch=2, overwrite=True)
    assert json.loads(ex.sidecar(out).read_text())["input"]["shape"] == [2, 40, 40, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm", "sm.json"]
    assert ex.run(out, _images((40, 40), batch=2))["logits"].shape == (2, 3)


# ------------------------------------------------------------------------------------------------
# mbv3-export


def test_cli_saved_model_source(tmp_path, small, capsys):
    from train.export_cli import export_main

    saved = mbv3_jax.save(small, tmp_path / "saved")
    out = tmp_path / "m.stablehlo"
    assert (
        export_main([str(saved), "--format", "stablehlo", "--out", str(out), "--size", "32", "40", "--check"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "input images bx32x40x3 float32 NHWC" in printed and "check logits" in printed
    error = float(printed.split("max |artifact - JAX| / max |JAX| = ")[1].split()[0])
    assert error <= TOL
    assert export_main([str(tmp_path / "w.pth"), "--format", "tflite", "--out", str(tmp_path / "x")]) == 2
    assert "--builder NAME" in capsys.readouterr().err
