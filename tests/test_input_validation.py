"""Clear errors for bad builder arguments, bad segmentation labels and empty images (issue 20, items 6
and 7), as torch / torchvision raise them. Torch-free and fast: the checks run before a model is built;
the few models built (host-side initialisation) are small or reused, and nothing large is compiled."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbv3_jax.models import (
    MobileNetV3,
    deeplabv3_mobilenet_v3_large,
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
    fcn_mobilenet_v3_large,
    lraspp_mobilenet_v3_large,
    mobilenet_v3_config,
    mobilenet_v3_large,
    mobilenet_v3_small,
    qat,
    quantization,
    ssdlite320_mobilenet_v3_large,
)
from mbv3_jax.models.segmentation import (
    IGNORE_INDEX,
    LabelOutOfBoundsError,
    check_segmentation_labels,
    labels_out_of_bounds,
)

CLASSIFIERS = [mobilenet_v3_large, mobilenet_v3_small]
SEGMENTATION = [lraspp_mobilenet_v3_large, deeplabv3_mobilenet_v3_large, fcn_mobilenet_v3_large]
DETECTION = [fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_mobilenet_v3_large_320_fpn]
SSDLITE = [ssdlite320_mobilenet_v3_large]
QUANTIZED = [quantization.mobilenet_v3_large]
QAT = [qat.qat_mobilenet_v3_large]

# Which arguments each family takes.
HAS_DROPOUT_AND_WIDTH = CLASSIFIERS + QUANTIZED + QAT
HAS_DTYPE = CLASSIFIERS + SEGMENTATION + DETECTION + SSDLITE
ALL = CLASSIFIERS + SEGMENTATION + DETECTION + SSDLITE + QUANTIZED + QAT


def _name(builder) -> str:
    return f"{builder.__module__.rpartition('.')[2]}.{builder.__name__}"


def _cases(builders, arg, values, error):
    return [pytest.param(b, arg, v, error, id=f"{_name(b)}-{arg}={v!r}") for b in builders for v in values]


BAD_ARGS = [
    *_cases(ALL, "num_classes", [-1, -100], ValueError),
    *_cases(ALL, "num_classes", [2.5, 10.0, "10", True], TypeError),
    *_cases(SEGMENTATION + DETECTION + SSDLITE, "num_classes", [0], ValueError),
    *_cases(HAS_DROPOUT_AND_WIDTH, "dropout", [-0.1, 1.5, math.nan, math.inf], ValueError),
    *_cases(HAS_DROPOUT_AND_WIDTH, "dropout", ["0.2", None], TypeError),
    *_cases(HAS_DROPOUT_AND_WIDTH, "width_mult", [math.inf, -math.inf, math.nan, 0, -1.0], ValueError),
    *_cases(HAS_DROPOUT_AND_WIDTH, "width_mult", ["1.0", None], TypeError),
    *_cases(HAS_DTYPE, "dtype", [jnp.int32, jnp.uint8, np.int64, "int8", jnp.bool_, "nonsense"], TypeError),
    *_cases(HAS_DTYPE, "param_dtype", [jnp.int32, None], TypeError),
]


@pytest.mark.parametrize("builder, arg, value, error", BAD_ARGS)
def test_builders_refuse_bad_arguments(builder, arg, value, error):
    with pytest.raises(error) as info:
        builder(**{arg: value})
    message = str(info.value)
    assert arg in message, message
    shown = getattr(jnp.dtype(value), "name", None) if arg.endswith("dtype") and _is_dtype(value) else None
    assert (shown or str(value)) in message or repr(value) in message, message


def _is_dtype(value) -> bool:
    try:
        jnp.dtype(value)
    except TypeError:
        return False
    return value is not None


def test_messages_in_torchs_words():
    with pytest.raises(
        ValueError,
        match=r"mobilenet_v3_small: dropout probability has to be between 0 "
        r"and 1, but got 1\.5",
    ):
        mobilenet_v3_small(dropout=1.5)
    with pytest.raises(TypeError, match=r"dtype should be a floating-point dtype .* got int32"):
        mobilenet_v3_small(dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"mobilenet_v3_large: num_classes should be >= 0, got -1"):
        mobilenet_v3_large(num_classes=-1)
    with pytest.raises(TypeError, match=r"num_classes should be an integer, got 2\.5 \(float\)"):
        lraspp_mobilenet_v3_large(num_classes=2.5)
    with pytest.raises(ValueError, match=r"width_mult should be a finite number > 0, got inf"):
        qat.qat_mobilenet_v3_large(width_mult=math.inf)


def test_model_classes_check_their_arguments_too():
    """The classes ``build_from_architecture`` rebuilds from a record take the same checks."""
    table, last = mobilenet_v3_config("mobilenet_v3_small", 0.25)
    with pytest.raises(ValueError, match="MobileNetV3: num_classes should be >= 0, got -3"):
        MobileNetV3(table, last, num_classes=-3)
    with pytest.raises(ValueError, match="MobileNetV3: dropout probability .* got 2"):
        MobileNetV3(table, last, dropout=2)
    with pytest.raises(TypeError, match="MobileNetV3: param_dtype should be .* got int8"):
        MobileNetV3(table, last, param_dtype=jnp.int8)
    with pytest.raises(ValueError, match="QATMobileNetV3: dropout probability"):
        qat.QATMobileNetV3(table, last, dropout=-1)
    with pytest.raises(TypeError, match="QuantizedMobileNetV3: num_classes should be an integer"):
        quantization.QuantizedMobileNetV3(table, last, num_classes=1.5)


# -- accepted edge values (one build per combination: building is host-side, a fraction of a second)

GOOD_ARGS = [
    (mobilenet_v3_small, dict(dropout=0, num_classes=1, width_mult=0.25, dtype=jnp.bfloat16)),
    (mobilenet_v3_small, dict(dropout=1.0, num_classes=0, width_mult=2, dtype=None)),
    (
        mobilenet_v3_large,
        dict(
            dropout=np.float32(0.5), num_classes=np.int64(10), width_mult=np.float64(0.75), dtype="bfloat16"
        ),
    ),
    (lraspp_mobilenet_v3_large, dict(num_classes=1, dtype=jnp.bfloat16)),
    (deeplabv3_mobilenet_v3_large, dict(num_classes=1, param_dtype=jnp.float32)),
    (fcn_mobilenet_v3_large, dict(num_classes=np.int32(1))),
    (fasterrcnn_mobilenet_v3_large_fpn, dict(num_classes=1, dtype=jnp.bfloat16)),
    (fasterrcnn_mobilenet_v3_large_320_fpn, dict(num_classes=2)),
    (ssdlite320_mobilenet_v3_large, dict(num_classes=1, dtype=jnp.float16)),
    (quantization.mobilenet_v3_large, dict(dropout=1, num_classes=1, width_mult=0.25)),
    (qat.qat_mobilenet_v3_large, dict(dropout=0, num_classes=1, width_mult=0.25)),
    (qat.qat_mobilenet_v3_large, dict(dropout=1, width_mult=0.25)),
]


@pytest.mark.parametrize(
    "builder, kwargs", [pytest.param(b, kw, id=f"{_name(b)}-{i}") for i, (b, kw) in enumerate(GOOD_ARGS)]
)
def test_builders_accept_edge_values(builder, kwargs):
    model = builder(**kwargs)
    recorded = model.architecture["kwargs"]
    if "num_classes" in kwargs:
        assert model.num_classes == kwargs["num_classes"] and type(model.num_classes) is int
        assert recorded["num_classes"] == kwargs["num_classes"]  # numpy scalars recorded as JSON numbers
    for arg in ("dropout", "width_mult"):
        if arg in kwargs and arg in recorded:  # the int8 model accepts dropout but does not record it
            assert recorded[arg] == float(kwargs[arg]) and type(recorded[arg]) is float
    if kwargs.get("dtype") is not None:
        assert (
            model.dtype == jnp.dtype(kwargs["dtype"]) and recorded["dtype"] == jnp.dtype(kwargs["dtype"]).name
        )


def test_num_classes_zero_is_not_replaced_by_the_default():
    """torchvision's defaults (21 / 91 classes) apply to None only: 0 used to become the default."""
    assert lraspp_mobilenet_v3_large().num_classes == 21
    for builder in (
        lraspp_mobilenet_v3_large,
        fasterrcnn_mobilenet_v3_large_fpn,
        ssdlite320_mobilenet_v3_large,
    ):
        with pytest.raises(ValueError, match=f"{builder.__name__}: num_classes should be >= 1, got 0"):
            builder(num_classes=0)


# -- segmentation labels ------------------------------------------------------------------------


def _logits_and_labels(num_classes=3):
    logits = jnp.zeros((2, 4, 5, num_classes))
    labels = np.tile(np.arange(5, dtype=np.int32) % num_classes, (2, 4, 1))
    return logits, labels


@pytest.mark.parametrize("bad", [3, 21, -1, 254, 256])
def test_out_of_range_label_raises_like_torch(bad):
    logits, labels = _logits_and_labels()
    labels[1, 2, 3] = bad
    with pytest.raises(IndexError, match=rf"Target {bad} is out of bounds") as info:
        check_segmentation_labels(logits, jnp.asarray(labels))
    assert isinstance(info.value, LabelOutOfBoundsError) and isinstance(info.value, ValueError)
    assert "[0, 3)" in str(info.value) and "1 pixels" in str(info.value)


def test_ignore_index_is_not_out_of_range():
    logits, labels = _logits_and_labels()
    labels[0, :2] = IGNORE_INDEX
    check_segmentation_labels(logits, labels)
    check_segmentation_labels(logits, jnp.asarray(labels))
    with pytest.raises(IndexError, match="Target 255 is out of bounds"):
        check_segmentation_labels(logits, labels, ignore_index=7)  # 255 is ignored only by default
    labels[0, :2] = 7
    check_segmentation_labels(logits, labels, ignore_index=7)


def test_label_shape_and_dtype_are_checked():
    logits, labels = _logits_and_labels()
    with pytest.raises(ValueError, match=r"\(N, H, W\) = \(2, 4, 5\).*got \(2, 5, 4\)"):
        check_segmentation_labels(logits, labels.transpose(0, 2, 1))
    with pytest.raises(TypeError, match="labels should be integer class indices, got dtype float32"):
        check_segmentation_labels(logits, labels.astype(np.float32))


def test_labels_under_jit():
    """Traced labels: the check is the static part only; ``labels_out_of_bounds`` flags the values."""
    logits, labels = _logits_and_labels()

    @partial(jax.jit, static_argnames="ignore_index")
    def flagged(logits, labels, ignore_index=IGNORE_INDEX):
        check_segmentation_labels(logits, labels, ignore_index)  # no raise: values unknown here
        return labels_out_of_bounds(labels, logits.shape[-1], ignore_index)

    assert not flagged(logits, labels)
    labels[0, 0, :2] = IGNORE_INDEX
    assert not flagged(logits, labels)
    for bad in (-1, 3, 254):
        wrong = labels.copy()
        wrong[1, 3, 4] = bad
        assert flagged(logits, wrong)


def test_segmentation_loss_checks_labels():
    """The training loss refuses out-of-range labels eagerly (torch raises there too)."""
    from train.losses import segmentation_loss

    logits, labels = _logits_and_labels()
    labels[0, 0, 0] = IGNORE_INDEX
    outputs = {"out": logits, "aux": logits}
    loss = segmentation_loss(outputs, jnp.asarray(labels))
    assert np.isclose(float(loss), 1.5 * math.log(3))
    labels[1, 1, 1] = 3
    with pytest.raises(IndexError, match="Target 3 is out of bounds"):
        segmentation_loss(outputs, jnp.asarray(labels))
    # Under jit the values cannot raise: the loss is NaN instead of a silently wrong number.
    assert math.isnan(float(jax.jit(segmentation_loss)(outputs, jnp.asarray(labels))))
    labels[1, 1, 1] = -1  # a negative label would otherwise index the last class
    assert math.isnan(float(jax.jit(segmentation_loss)(outputs, jnp.asarray(labels))))


# -- empty images --------------------------------------------------------------------------------

BUILT: dict = {}


def _built(builder):
    if builder not in BUILT:
        BUILT[builder] = builder(width_mult=0.25) if builder in HAS_DROPOUT_AND_WIDTH else builder()
        BUILT[builder].eval()
    return BUILT[builder]


@pytest.mark.parametrize("shape", [(1, 0, 32, 3), (2, 32, 0, 3), (1, 0, 0, 3)])
@pytest.mark.parametrize("builder", [mobilenet_v3_small, lraspp_mobilenet_v3_large, *QUANTIZED, *QAT])
def test_zero_pixel_image_is_refused(builder, shape):
    model = _built(builder)
    expected = r"expected images of at least 1x1 pixels, got shape \(" + ", ".join(map(str, shape))
    with pytest.raises(ValueError, match=expected):
        model(jnp.zeros(shape))
    if hasattr(model, "extract_features"):
        with pytest.raises(ValueError, match=expected):
            model.extract_features(jnp.zeros(shape), [1])


@pytest.mark.parametrize("builder", DETECTION[:1] + SSDLITE)
@pytest.mark.parametrize("shape", [(0, 32, 3), (32, 0, 3)])
def test_zero_pixel_image_is_refused_by_detectors(builder, shape):
    model = _built(builder)
    with pytest.raises(ValueError, match=r"image 1: expected an image of at least 1x1 pixels"):
        model([np.zeros((8, 8, 3), np.float32), np.zeros(shape, np.float32)])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("builder", DETECTION[:1] + SSDLITE)
def test_non_finite_boxes_are_refused(builder, bad):
    """torchvision lets a NaN box through (NaN compares false) into a NaN loss: refused, named."""
    model = _built(builder)
    model.train()
    try:
        target = {"boxes": [[1.0, 1.0, 5.0, 5.0], [2.0, 2.0, bad, 6.0]], "labels": [1, 1]}
        with pytest.raises(
            ValueError, match=r"target 0: box 1 is \[2.0, 2.0, (nan|-?inf), 6.0\]; boxes must be finite"
        ):
            model([np.zeros((32, 32, 3), np.float32)], [target])
    finally:
        model.eval()
