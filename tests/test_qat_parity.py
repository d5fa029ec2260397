"""Quantization-aware training: ``mbv3_jax.models.qat`` vs torchvision's QAT-prepared model.

The torch side is what torchvision's ``references/classification/train_quantization.py`` trains: the
quantizable MobileNetV3 (calibrated random float weights, porting.calibration), ``train()``,
``fuse_model(is_qat=True)``, ``qconfig = get_default_qat_qconfig(engine)``, ``prepare_qat``; dropout 0
on both sides (its mask is random). Real photos at 96 px, batches of 4. The JAX model runs with
``numerics="torch_avx2"`` (torch's CPU operation order, mbv3_jax.torch_numerics), eagerly
(``model.forward``: one compiled program per layer kind, shared by all layers of that kind).

The model: torchvision's quantizable MobileNetV3 class with MobileNetV3-Small's first five blocks
(every block kind of the Large one). The JAX side compiles one program per layer kind and shape
(~30 s forward, ~40 s gradient per qconfig here, with other jobs on the 2 cores: ~2 min for the
file); ``MBV3_QAT_FULL=1`` adds torchvision's ``quantization.mobilenet_v3_large`` itself to every
qnnpack check and the x86 gradient check (~6 min). Both models measured bit-identical to torch.

Checked, each with the tolerance max |jax - torch| <= TOL * max |torch| per tensor (integers equal):

* qnnpack qconfig: three consecutive training-mode steps (observers averaging, BatchNorm on batch
  statistics), a gradient step, an eval-mode step (observers still on, as in torch), then a
  training step after ``disable_observer`` + ``freeze_bn_stats``: the logits and, after every step,
  every tensor of the state_dict (weights, BatchNorm statistics, each fake quant's scale / zero
  point and its observer's running min / max); ``convert`` against torch's ``convert`` (every
  variable of the integer model equal); the state_dict round trip; strict mapping errors.
* x86 qconfig (per-channel weights, 7-bit activations): two training steps (and, with
  MBV3_QAT_FULL=1, a gradient step).
* gradients of a cross-entropy loss wrt every parameter: within GRAD_TOL of each tensor's largest
  gradient (floored at GRAD_FLOOR of the model's largest: a few are zero but for rounding).

A fake-quantized activation that differs from torch's in its last float bit can round to the
neighbouring step, a relative difference of ~1/255, so TOL is effectively a bit-for-bit check
(measured: every logit and state tensor identical to torch's). That holds for torch's CPU kernels as
dispatched on this kind of machine: AVX2 (checked below), oneDNN's blocking, MKL's sgemm order for >= 4
rows and MKL's sqrt (its generic kernel on non-Intel CPUs, emulated; correctly rounded on Intel).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest
from extras import require_torch
from flax import nnx

# ruff: noqa: E402
require_torch()  # the optional "torch" extra: without it this file skips whole, before the imports below

import torch

from mbv3_jax.models import BlockConfig, qat, quantization
from porting import WeightMappingError, load_torchvision, to_torchvision
from porting.calibration import calibrated_random_weights_, resized_inputs
from porting.mapping import convert_to_jax, format_path, load_into, model_variables
from porting.qat import (
    QAT_MOBILENET_V3_RULES,
    load_qat_state_dict,
    qat_tensors,
    quantizable_torchvision,
    quiet_quantization,
)
from porting.rules import QUANTIZED_MOBILENET_V3_RULES
from porting.torchvision_io import expand_quantized_state_dict, quantized_engine

TOL = 1e-5
GRAD_TOL = 1e-4
GRAD_FLOOR = 1e-2  # gradients smaller than this fraction of the model's largest are compared at it
SIZE = 96
BATCH = 4  # MKL's sgemm order is modelled for >= 4 rows
# MobileNetV3-Small's first five blocks: every block kind of the Large one (no expansion, SE,
# ReLU / hardswish, 3x3 / 5x5, strided, residual; 1x1 convs over more than one oneDNN block of 128
# channels) in (input, kernel, expanded, out, SE, activation, stride).
SMALL_TABLE = [
    BlockConfig(16, 3, 16, 16, True, "RE", 2),
    BlockConfig(16, 3, 72, 24, False, "RE", 2),
    BlockConfig(24, 3, 88, 24, False, "RE", 1),
    BlockConfig(24, 5, 96, 40, True, "HS", 2),
    BlockConfig(40, 5, 240, 40, True, "HS", 1),
]
# MBV3_QAT_FULL=1 also runs every qnnpack check on MobileNetV3-Large itself and the x86 gradient check
# (~4 min more here: Large's layer programs take ~65 s to compile eagerly, its gradient ~80 s).
FULL = os.environ.get("MBV3_QAT_FULL") == "1"
MODELS = ["small", "large"] if FULL else ["small"]

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
    pytest.mark.skipif(
        torch.backends.cpu.get_cpu_capability() != "AVX2",
        reason="numerics='torch_avx2' models torch's kernels as dispatched on AVX2 CPUs",
    ),
]


@pytest.fixture(scope="module")
def batches(photos) -> list[torch.Tensor]:
    """Three batches of 4: the 8 photos at 96 px, then the first four mirrored."""
    x = resized_inputs(photos, (SIZE, SIZE))
    return [x[:BATCH], x[BATCH : 2 * BATCH], torch.flip(x[:BATCH], dims=[3])]


def _nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()))


def _pair(kwargs: dict, engine: str, calibration: torch.Tensor) -> tuple[torch.nn.Module, qat.QATMobileNetV3]:
    """torchvision's QAT-prepared model (train mode) and its port (train mode, torch's numerics)."""
    torch.manual_seed(0)
    with quiet_quantization():
        tv = quantizable_torchvision(kwargs)
        calibrated_random_weights_(tv, calibration, seed=1)
        tv.train()
        tv.fuse_model(is_qat=True)
        tv.qconfig = torch.ao.quantization.get_default_qat_qconfig(engine)
        torch.ao.quantization.prepare_qat(tv, inplace=True)
    if "inverted_residual_setting" in kwargs:
        table = [BlockConfig(**row) for row in kwargs["inverted_residual_setting"]]
        model = qat.QATMobileNetV3(
            table, kwargs["last_channel"], dropout=0.0, backend=engine, numerics="torch_avx2"
        )
    else:
        model = qat.qat_mobilenet_v3_large(dropout=0.0, backend=engine, numerics="torch_avx2")
    load_qat_state_dict(model, tv.state_dict())
    model.train()
    return tv, model


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)), initial=0.0))
    return err / (float(np.max(np.abs(want), initial=0.0)) or 1.0)


def _compare_state(tv: torch.nn.Module, model: qat.QATMobileNetV3) -> tuple[float, int, int]:
    """(worst relative error, bit-identical tensors, tensors) over torch's whole state_dict."""
    want = convert_to_jax(qat_tensors(tv.state_dict()), model, QAT_MOBILENET_V3_RULES)
    got = model_variables(model)
    worst, identical = 0.0, 0
    for path, ref in want.items():
        value = np.asarray(got[path].get_value())
        assert value.shape == ref.shape, format_path(path)
        same = np.array_equal(value, ref.astype(value.dtype))
        identical += same
        if value.dtype.kind == "f":
            # Never-observed fake quants (a block's unused skip_add) hold +-inf min / max.
            rel = 0.0 if same else _relative(value, ref)
            assert rel <= TOL, f"{format_path(path)}: {rel:.2e}"
            worst = max(worst, rel)
        else:
            assert same, format_path(path)
    return worst, identical, len(want)


def _step(tv: torch.nn.Module, model: qat.QATMobileNetV3, x: torch.Tensor, label: str) -> None:
    with quiet_quantization(), torch.no_grad():
        want = tv(x).numpy()
    got = np.asarray(model.forward(_nhwc(x)))
    rel = _relative(got, want)
    worst, identical, total = _compare_state(tv, model)
    print(
        f"\n{label}: logits max rel error {rel:.2e} ({np.mean(got == want):.4f} identical); "
        f"state {identical}/{total} tensors identical, worst {worst:.2e}"
    )
    assert rel <= TOL
    # Real logits: spread over many of the output fake quant's steps, not a constant.
    assert np.ptp(want) > 20 * float(np.asarray(model.classifier_out.activation_post_process.scale[...])[0])


def _kwargs(model_name: str) -> dict:
    if model_name == "large":
        return {"num_classes": 1000, "dropout": 0.0}
    return {
        "inverted_residual_setting": [dataclasses.asdict(c) for c in SMALL_TABLE],
        "last_channel": 1280,
        "num_classes": 1000,
        "dropout": 0.0,
    }


@pytest.fixture(scope="module", params=MODELS)
def qnnpack(request, batches):
    """(name, torch model, JAX model) with the qnnpack qconfig; the tests below run in order on it."""
    return (request.param, *_pair(_kwargs(request.param), "qnnpack", batches[0]))


def test_training_steps(qnnpack, batches):
    name, tv, model = qnnpack
    for i, x in enumerate(batches):
        _step(tv, model, x, f"{name} qnnpack, training step {i + 1}")


def test_gradients(qnnpack, batches):
    _check_gradients(*qnnpack, "qnnpack", batches[1])


def test_eval_mode(qnnpack, batches):
    name, tv, model = qnnpack
    tv.eval()
    model.eval()
    try:
        _step(tv, model, batches[1], f"{name} qnnpack, eval mode (observers on)")
    finally:
        tv.train()
        model.train()


def test_observers_disabled_and_batchnorm_frozen(qnnpack, batches):
    """The recipe's schedule: observers off after epoch 4, BatchNorm statistics frozen after epoch 3."""
    name, tv, model = qnnpack
    tv.apply(torch.ao.quantization.disable_observer)
    tv.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    model.disable_observer()
    model.freeze_bn_stats()
    before = {k: v.clone() for k, v in tv.state_dict().items()}
    _step(tv, model, batches[0], f"{name} qnnpack, observers off, BatchNorm frozen")
    # torch's side really froze: no observer or BatchNorm statistic moved.
    assert all(torch.equal(before[k], v) for k, v in tv.state_dict().items())


def test_convert_matches_torch(qnnpack):
    """``model.convert()`` gives the integer model torch's ``convert`` gives (every variable)."""
    name, tv, model = qnnpack
    with quiet_quantization(), quantized_engine("qnnpack"):
        converted = torch.ao.quantization.convert(copy.deepcopy(tv).eval())
    got = model.convert()
    reference = quantization.QuantizedMobileNetV3(SMALL_TABLE, 1280) if name == "small" else None
    if reference is None:
        reference = load_torchvision("quantized_mobilenet_v3_large", converted.state_dict())
    else:
        tensors = expand_quantized_state_dict(converted.state_dict())
        load_into(reference, convert_to_jax(tensors, reference, QUANTIZED_MOBILENET_V3_RULES))
    want, got = model_variables(reference), model_variables(got)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(
            np.asarray(got[path].get_value()), np.asarray(want[path].get_value()), err_msg=format_path(path)
        )


def test_state_dict_round_trip(qnnpack):
    name, tv, model = qnnpack
    exported = to_torchvision(model)
    reference = tv.state_dict()
    assert list(exported) == list(reference)
    for key, value in reference.items():
        assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
    if name == "large":
        loaded = load_torchvision("qat_mobilenet_v3_large", reference)
        assert isinstance(loaded, qat.QATMobileNetV3) and not loaded.features[0].conv.bn.use_running_average


@pytest.fixture(scope="module")
def x86(batches):
    return ("small", *_pair(_kwargs("small"), "x86", batches[0]))


def test_x86_training_steps(x86, batches):
    """The x86 qconfig: per-output-channel weight fake quants, 7-bit activations (reduce_range)."""
    name, tv, model = x86
    for i, x in enumerate(batches[:2]):
        _step(tv, model, x, f"{name} x86, training step {i + 1}")


if FULL:  # ~30 s more; the backward code is the same as qnnpack's, checked by default

    def test_x86_gradients(x86, batches):
        _check_gradients(*x86, "x86", batches[2])


def _check_gradients(name: str, tv: torch.nn.Module, model: qat.QATMobileNetV3, engine: str, x) -> None:
    """Cross-entropy gradients wrt every parameter (one more training-mode forward on both sides)."""
    labels = np.arange(BATCH) * 7
    with quiet_quantization():
        loss_t = torch.nn.functional.cross_entropy(tv(x), torch.from_numpy(labels).long())
    tv.zero_grad()
    loss_t.backward()

    def loss_fn(m: qat.QATMobileNetV3) -> jnp.ndarray:
        logits = m.forward(_nhwc(x))
        log_p = logits - jnp.max(logits, axis=1, keepdims=True)
        log_p = log_p - jnp.log(jnp.sum(jnp.exp(log_p), axis=1, keepdims=True))
        return -jnp.mean(log_p[jnp.arange(BATCH), labels])

    loss_j, grads = nnx.value_and_grad(loss_fn)(model)
    assert abs(float(loss_j) - loss_t.item()) <= TOL * abs(loss_t.item())
    want = convert_to_jax(
        {k: p.grad for k, p in tv.named_parameters()}, model, QAT_MOBILENET_V3_RULES, strict=False
    )
    got = nnx.to_pure_dict(grads)
    largest = max(float(np.max(np.abs(ref))) for ref in want.values())
    worst, worst_path, noise, unfloored = 0.0, "", [], 0.0
    for path, ref in want.items():
        value = got
        for key in path:
            value = value[key]
        scale = float(np.max(np.abs(ref)))
        diff = float(np.max(np.abs(np.asarray(value, np.float64) - ref)))
        if scale >= 1e-4 * largest:  # reported only: each tensor against its own largest gradient
            unfloored = max(unfloored, diff / scale)
        if scale < GRAD_FLOOR * largest:
            # Small, some zero in exact arithmetic (BatchNorm biases of projection convs, whose
            # constant shift the next BatchNorm's batch statistics remove, all but what fake-quant
            # clamping keeps): rounding noise, ~1e-8 on both sides, is a large part of them.
            noise.append(format_path(path))
            scale = GRAD_FLOOR * largest
        rel = diff / scale
        assert rel <= GRAD_TOL, f"{format_path(path)}: {rel:.2e}"
        if rel > worst:
            worst, worst_path = rel, f"{format_path(path)}, {scale / largest:.1e} of the largest"
    print(
        f"\n{name} {engine}: {len(want)} parameter gradients, max rel error {worst:.2e} ({worst_path}; "
        f"{len(noise)} below {GRAD_FLOOR:g} of the largest, compared at that floor: {', '.join(noise)}); "
        f"each against its own largest gradient (those above 1e-4 of the largest): {unfloored:.2e}"
    )
    # The step also left the same observer / BatchNorm state on both sides.
    _compare_state(tv, model)


def test_mapping_errors_name_the_key(qnnpack):
    name, tv, model = qnnpack
    sd = dict(tv.state_dict())
    fresh = nnx.clone(model)
    wrong = dict(sd)
    wrong["features.1.block.0.0.weight"] = torch.zeros(16, 1, 5, 5)
    with pytest.raises(WeightMappingError) as e:
        load_qat_state_dict(fresh, wrong)
    assert "shape mismatch for key 'features.1.block.0.0.weight'" in str(e.value)
    assert "(16, 1, 5, 5)" in str(e.value) and "(3, 3, 1, 16)" in str(e.value)
    missing = dict(sd)
    del missing["features.2.skip_add.activation_post_process.activation_post_process.min_val"]
    with pytest.raises(WeightMappingError, match=r"missing: model variable features\.2\.skip_add"):
        load_qat_state_dict(fresh, missing)
    extra = {**sd, "features.0.0.weight_fake_quant.bogus": torch.zeros(1)}
    with pytest.raises(
        WeightMappingError, match=r"unexpected key 'features\.0\.0\.weight_fake_quant\.bogus'"
    ):
        load_qat_state_dict(fresh, extra)
