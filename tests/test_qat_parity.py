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
Those tests run where torch reports AVX2 and this process's oneDNN 1x1 convolution and MKL sgemm sum
the model's shapes in the modelled order (``torch_avx2_kernels``; else they skip, naming the kernel).
Above AVX2 they rerun in a subprocess with ATen, MKL and oneDNN capped to AVX2
(``test_torch_avx2_mode_with_capped_isa``). MKL's sgemm blocking depends on the CPU model as well as
on its instruction set: capped to AVX2 on an AVX-512/AMX Xeon it sums a 240-long reduction in one
block and the tail columns of a 1280-long one in another order, so there the subprocess skips them.

On every CPU, the port with its default numerics ("xla", test_xla_*), both qconfigs, the same
sequence (three training steps, eval, observers off + BatchNorm frozen) with every layer run on the
input torch's layer received: each layer's fake-quantized output on torch's quantization step for
>= 99.9% of values and never more than one step off; every observer min / max, scale and BatchNorm
statistic within 1e-5 relative (zero points within 1); each layer's parameter gradients for torch's
output gradient within GRAD_TOL. (Run whole, XLA's rounding flips compound layer after layer, so
only the bit-exact mode can be compared end to end.)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import platform
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from extras import capped_dispatch, require_torch, run_capped_pytest
from flax import nnx

# ruff: noqa: E402
require_torch()  # the optional "torch" extra: without it this file skips whole, before the imports below

import torch

from mbv3_jax import torch_numerics
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

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
CAPABILITY = torch.backends.cpu.get_cpu_capability()


def needs_avx2(test):
    """numerics='torch_avx2' models torch's kernels as dispatched on AVX2 CPUs: the test runs where
    torch reports AVX2 and the kernel orders it relies on hold here (``torch_avx2_kernels``)."""
    test = pytest.mark.usefixtures("torch_avx2_kernels")(test)
    return pytest.mark.skipif(
        CAPABILITY != "AVX2", reason=f"torch's CPU capability is {CAPABILITY}, not AVX2"
    )(test)


@functools.cache
def _torch_avx2_unmet() -> tuple[str, ...]:
    """What the torch_avx2 emulation relies on beyond torch's AVX2 capability, checked on this
    process's kernels for the model's shapes: oneDNN's 1x1 convolution over more than one block of
    128 channels, MKL's sgemm for the classifier's F.linear layers (its blocking depends on the CPU
    model, not only on the instruction set: capped to AVX2 on an AVX-512/AMX Xeon it reduces 240
    inputs in one block, not two halves). Empty where all hold."""
    rng = np.random.default_rng(0)
    unmet = []
    linears = [(240, 1280), (1280, 1000)] + ([(960, 1280)] if FULL else [])
    for k, n in linears:
        x, w, b = (rng.standard_normal(shape, np.float32) for shape in ((BATCH, k), (k, n), (n,)))
        want = torch.nn.functional.linear(*(torch.from_numpy(a) for a in (x, w.T.copy(), b))).numpy()
        got = np.asarray(jax.jit(torch_numerics.mkl_linear)(x, w, b))  # compiled, as the model's layers
        if not np.array_equal(got, want):
            unmet.append(
                f"MKL's sgemm for a ({BATCH}, {k}) x ({k}, {n}) F.linear sums in another order than "
                f"the modelled one ({np.mean(got == want):.1%} of outputs identical)"
            )
    x, w, b = (
        rng.standard_normal(shape, np.float32) for shape in ((BATCH, 240, 6, 6), (40, 240, 1, 1), (40,))
    )
    want = torch.nn.functional.conv2d(*(torch.from_numpy(a) for a in (x, w, b))).numpy().transpose(0, 2, 3, 1)
    conv = jax.jit(functools.partial(torch_numerics.onednn_conv, stride=1, padding=0, groups=1))
    got = conv(_nhwc(torch.from_numpy(x)), w.transpose(2, 3, 1, 0), b)
    if not np.array_equal(np.asarray(got), want):
        unmet.append("oneDNN's 1x1 convolution over 240 channels sums in another order than the modelled one")
    return tuple(unmet)


@pytest.fixture(scope="module")
def torch_avx2_kernels() -> None:
    unmet = _torch_avx2_unmet()
    if unmet:
        pytest.skip("numerics='torch_avx2' does not model this CPU's kernels: " + "; ".join(unmet))


@pytest.fixture(scope="module")
def batches(photos) -> list[torch.Tensor]:
    """Three batches of 4: the 8 photos at 96 px, then the first four mirrored."""
    x = resized_inputs(photos, (SIZE, SIZE))
    return [x[:BATCH], x[BATCH : 2 * BATCH], torch.flip(x[:BATCH], dims=[3])]


def _nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()))


def _pair(
    kwargs: dict, engine: str, calibration: torch.Tensor, numerics: str = "torch_avx2"
) -> tuple[torch.nn.Module, qat.QATMobileNetV3]:
    """torchvision's QAT-prepared model (train mode) and its port (train mode, ``numerics``)."""
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
            table, kwargs["last_channel"], dropout=0.0, backend=engine, numerics=numerics
        )
    else:
        model = qat.qat_mobilenet_v3_large(dropout=0.0, backend=engine, numerics=numerics)
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


@needs_avx2
def test_training_steps(qnnpack, batches):
    name, tv, model = qnnpack
    for i, x in enumerate(batches):
        _step(tv, model, x, f"{name} qnnpack, training step {i + 1}")


@needs_avx2
def test_gradients(qnnpack, batches):
    _check_gradients(*qnnpack, "qnnpack", batches[1])


@needs_avx2
def test_eval_mode(qnnpack, batches):
    name, tv, model = qnnpack
    tv.eval()
    model.eval()
    try:
        _step(tv, model, batches[1], f"{name} qnnpack, eval mode (observers on)")
    finally:
        tv.train()
        model.train()


@needs_avx2
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


@needs_avx2
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


@needs_avx2
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


@needs_avx2
def test_x86_training_steps(x86, batches):
    """The x86 qconfig: per-output-channel weight fake quants, 7-bit activations (reduce_range)."""
    name, tv, model = x86
    for i, x in enumerate(batches[:2]):
        _step(tv, model, x, f"{name} x86, training step {i + 1}")


if FULL:  # ~30 s more; the backward code is the same as qnnpack's, checked by default

    @needs_avx2
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


@needs_avx2
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


# ------------------------------------------------------------------------------------------------
# Default ("xla") numerics, on any CPU: every layer fed torch's input
#
# With XLA's summation order a value on a rounding boundary lands on the neighbouring quantization
# step, and through a whole network such flips multiply (an SE gate one step off moves a whole
# channel). So each layer with an output fake quant (conv-BN, SE conv, linear, hardswish,
# hardsigmoid, QuantStub, the add / multiply) is run on the input torch's layer received: its output
# may then differ from torch's by at most one step, and only on a few values; the observers and
# BatchNorm statistics, which see the same inputs, stay within rounding of torch's.

XLA_STEPS_IDENTICAL = 0.999  # fraction of every layer's output on the same quantization step
XLA_STATE_TOL = 1e-5  # observers' running min / max, scales, BatchNorm statistics (relative)


def _fake_quant_layers(tv: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every layer whose output torch fake-quantizes, in module order; for a
    FloatFunctional, its output fake quant (the add / multiply happens before it)."""
    layers = []
    for name, module in tv.named_modules():
        child = getattr(module, "activation_post_process", None)
        if child is None or name.endswith("weight_fake_quant") or not hasattr(child, "scale"):
            continue
        functional = isinstance(module, torch.ao.nn.quantized.FloatFunctional)
        layers.append((f"{name}.activation_post_process", child) if functional else (name, module))
    return layers


def _jax_layer(model: qat.QATMobileNetV3, name: str) -> nnx.Module:
    """The port's module for a torch module name (ConvNormActivation's ``0`` / ``2`` are ``conv`` /
    ``act``; the classifier's ``0`` / ``1`` / ``3`` have names)."""
    parts = name.split(".")
    if parts[0] == "classifier":
        return {"0": model.classifier_hidden, "1": model.classifier_act, "3": model.classifier_out}[parts[1]]
    node = model
    for part in parts:
        if isinstance(node, qat.layers.ConvNormActivation):
            node = node.conv if part == "0" else node.act
        elif part.isdigit():
            node = node[int(part)]
        else:
            node = getattr(node, part)
    return node


def _to_jax(t: torch.Tensor) -> jnp.ndarray:
    value = t.detach().numpy()
    return jnp.asarray(np.ascontiguousarray(value.transpose(0, 2, 3, 1) if value.ndim == 4 else value))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    value = t.detach().numpy().astype(np.float64)
    return value.transpose(0, 2, 3, 1) if value.ndim == 4 else value


def _torch_layer_run(tv: torch.nn.Module, x: torch.Tensor, *, grad_labels=None) -> dict:
    """torch's forward (and, with labels, cross-entropy backward): per layer its input, output,
    output step and (with labels) output gradient."""
    records: dict = {}

    # Copies, the input taken before the layer runs: torchvision's hardswish works in place.
    def pre_hook(name):
        def record(module, inputs):
            records[name] = {"input": inputs[0].detach().clone()}

        return record

    def hook(name):
        def record(module, inputs, output):
            records[name]["output"] = output.detach().clone()
            if grad_labels is not None and output.requires_grad:
                output.register_hook(lambda g: records[name].__setitem__("grad", g))

        return record

    layers = _fake_quant_layers(tv)
    handles = [module.register_forward_pre_hook(pre_hook(name)) for name, module in layers]
    handles += [module.register_forward_hook(hook(name)) for name, module in layers]
    try:
        with quiet_quantization(), torch.set_grad_enabled(grad_labels is not None):
            logits = tv(x)
            if grad_labels is not None:
                tv.zero_grad()
                torch.nn.functional.cross_entropy(logits, torch.from_numpy(grad_labels).long()).backward()
    finally:
        for handle in handles:
            handle.remove()
    # Only a strided block's skip_add is never called.
    assert all("skip_add" in name for name, _ in layers if name not in records)
    for name, module in layers:
        if name in records:
            functional = name.endswith("activation_post_process")
            fake_quant = module if functional else module.activation_post_process
            records[name]["step"] = float(fake_quant.scale.reshape(-1)[0])
    return records


def _xla_step(tv: torch.nn.Module, model: qat.QATMobileNetV3, x: torch.Tensor, label: str) -> None:
    """One forward on both sides, every port layer on torch's input; outputs and state checked."""
    records = _torch_layer_run(tv, x)
    worst_identical, worst_steps, worst_name = 1.0, 0.0, ""
    for name, rec in records.items():
        got = np.asarray(_jax_layer(model, name)(_to_jax(rec["input"])), np.float64)
        want = _to_numpy(rec["output"])
        steps = np.abs(np.round(got / rec["step"]) - np.round(want / rec["step"]))
        identical = float(np.mean(steps == 0))
        if identical < worst_identical:
            worst_identical, worst_name = identical, name
        worst_steps = max(worst_steps, float(steps.max()))
        assert steps.max() <= 1 and identical >= XLA_STEPS_IDENTICAL, (name, identical, steps.max())
    state = _state_errors(tv, model)
    print(
        f"\n{label}: {len(records)} layers, worst {worst_identical:.6f} of values on torch's step "
        f"({worst_name}), max {worst_steps:.0f} step; state: "
        + ", ".join(f"{kind} {err:.1e}" for kind, err in sorted(state.items()))
    )


def _state_errors(tv: torch.nn.Module, model: qat.QATMobileNetV3) -> dict[str, float]:
    """Worst relative error per kind of state tensor (integers: largest difference), checked."""
    want = convert_to_jax(qat_tensors(tv.state_dict()), model, QAT_MOBILENET_V3_RULES)
    got = model_variables(model)
    worst: dict[str, float] = {}
    for path, ref in want.items():
        value = np.asarray(got[path].get_value())
        kind = str(path[-1])
        if value.dtype.kind != "f":
            err = float(np.max(np.abs(value.astype(np.int64) - ref.astype(np.int64)), initial=0))
            # A zero point moves by one where the observed range sits on a rounding boundary.
            assert err <= (1 if kind == "zero_point" else 0), format_path(path)
        else:
            same = np.array_equal(value, ref.astype(value.dtype))  # also the never-observed +-inf
            err = 0.0 if same else _relative(value, ref)
            assert err <= XLA_STATE_TOL, f"{format_path(path)}: {err:.2e}"
        worst[kind] = max(worst.get(kind, 0.0), err)
    return worst


@pytest.fixture(scope="module", params=["qnnpack", "x86"])
def xla_pair(request, batches):
    """(engine, torch model, port with the default numerics); the tests below run in order on it."""
    return (request.param, *_pair(_kwargs("small"), request.param, batches[0], numerics="xla"))


def test_xla_training_eval_and_frozen_steps(xla_pair, batches):
    """Three training steps, an eval step (observers on), then a training step with observers off
    and BatchNorm frozen: the recipe's sequence."""
    engine, tv, model = xla_pair
    for i, x in enumerate(batches):
        _xla_step(tv, model, x, f"{engine} xla, training step {i + 1}")
    tv.eval()
    model.eval()
    try:
        _xla_step(tv, model, batches[1], f"{engine} xla, eval mode")
    finally:
        tv.train()
        model.train()
    tv.apply(torch.ao.quantization.disable_observer)
    tv.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    model.disable_observer()
    model.freeze_bn_stats()
    _xla_step(tv, model, batches[0], f"{engine} xla, observers off, BatchNorm frozen")


def test_xla_gradients(xla_pair, batches):
    """Each layer's parameter gradients for torch's output gradient (a cross-entropy loss), on
    torch's input: within GRAD_TOL of the tensor's largest gradient (floored as above)."""
    engine, tv, model = xla_pair
    records = _torch_layer_run(tv, batches[1], grad_labels=np.arange(BATCH) * 7)
    paths = {id(module): path for path, module in model.iter_modules()}
    got: dict = {}
    for name, rec in records.items():
        layer = _jax_layer(model, name)
        if not nnx.state(layer, nnx.Param) or "grad" not in rec:
            continue
        x, g = _to_jax(rec["input"]), _to_jax(rec["grad"])
        grads = nnx.grad(lambda m, x=x, g=g: jnp.sum(m(x) * g))(nnx.clone(layer))
        for sub, value in nnx.to_flat_state(grads):
            got[(*paths[id(layer)], *sub)] = np.asarray(value.get_value(), np.float64)
    want = convert_to_jax(
        {k: p.grad for k, p in tv.named_parameters() if p.grad is not None},
        model,
        QAT_MOBILENET_V3_RULES,
        strict=False,
    )
    assert set(want) <= set(got), sorted(set(want) - set(got))[:5]
    largest = max(float(np.max(np.abs(ref))) for ref in want.values())
    worst, worst_path = 0.0, ""
    for path, ref in want.items():
        scale = max(float(np.max(np.abs(ref))), GRAD_FLOOR * largest)
        rel = float(np.max(np.abs(got[path] - ref))) / scale
        assert rel <= GRAD_TOL, f"{format_path(path)}: {rel:.2e}"
        if rel > worst:
            worst, worst_path = rel, format_path(path)
    print(f"\n{engine} xla: {len(want)} parameter gradients by layer, worst {worst:.2e} ({worst_path})")


# ------------------------------------------------------------------------------------------------
# The torch_avx2 tests on CPUs above AVX2: in a subprocess with torch's libraries capped to AVX2

AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.mark.skipif(CAPABILITY == "AVX2", reason="the torch_avx2 tests run in-process here")
@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or CAPABILITY == "DEFAULT",
    reason=f"torch's CPU capability {CAPABILITY} on {platform.machine()}: no AVX2 to cap to",
)
def test_torch_avx2_mode_with_capped_isa():
    """Above AVX2 (AVX512), the torch_avx2 tests above rerun in a subprocess started with ATen, MKL
    and oneDNN capped to AVX2 (each library's own report checked first). They pass there, or skip
    all with the reason the emulation's kernel orders do not hold (``_torch_avx2_unmet``)."""
    dispatch = capped_dispatch(AVX2_CAPS)
    assert dispatch["aten"] == "AVX2", dispatch
    assert "AVX2" in dispatch["mkl"] and "512" not in dispatch["mkl"], dispatch
    assert dispatch["onednn"] == "Intel AVX2", dispatch
    counts, out = run_capped_pytest([__file__, "-k", "not xla and not capped_isa"], AVX2_CAPS, timeout=900)
    print(
        "\n" + "\n".join(line for line in out.splitlines() if re.match(r"(small|large) |SKIPPED|\d+ ", line))
    )
    assert not counts.get("failed") and not counts.get("error") and not counts.get("errors"), out[-3000:]
    if counts.get("skipped") and not counts.get("passed"):
        reason = re.search(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", out, re.MULTILINE)
        pytest.skip(f"capped to AVX2 ({dispatch['mkl']}): {reason.group(1) if reason else out[-500:]}")
    assert counts.get("passed", 0) >= 8 and not counts.get("skipped"), out[-3000:]
