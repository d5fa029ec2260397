"""MobileNetV3 classifiers vs the installed torchvision: eval, train mode, gradients, round trip.

Weights are random but realistic (porting.calibration): BatchNorm statistics calibrated on real
photos. All at fp32 with the highest matmul precision (conftest).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from extras import require_torch
from flax import nnx

# ruff: noqa: E402
require_torch()  # the optional "torch" extra: without it this file skips whole, before the imports below

import torch
import torchvision

from porting import load_torchvision, to_torchvision
from porting.calibration import calibrated_random_weights_, move_off_activation_kinks_
from porting.mapping import convert_to_jax, format_path, model_variables
from porting.parity import (
    FLOAT64_GRAD_TOL,
    FLOAT64_TOL,
    assert_close_gradients,
    assert_close_tensors,
    run_parity,
)
from porting.rules import rules_for

CONFIGS = [
    pytest.param("mobilenet_v3_large", {}, id="large"),
    pytest.param("mobilenet_v3_small", {}, id="small"),
    pytest.param(
        "mobilenet_v3_large",
        dict(width_mult=0.75, reduced_tail=True, dilated=True, num_classes=37),
        id="large-w075-rt-dil-37",
    ),
    pytest.param(
        "mobilenet_v3_small", dict(width_mult=1.25, dilated=True, num_classes=10), id="small-w125-dil-10"
    ),
]

EVAL_TOL = 5e-5  # max abs error <= EVAL_TOL * max|reference|
TRAIN_TOL = 1e-5
GRAD_TOL = 1e-4

_cache: dict = {}


def calibrated_pair(name, kwargs, inputs_nchw):
    """(torchvision model, its JAX port), calibrated once per configuration."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _cache:
        torch.manual_seed(0)
        tv = torchvision.models.get_model(name, **kwargs)
        calibrated_random_weights_(tv, inputs_nchw, seed=1)
        _cache[key] = (tv, load_torchvision(name, tv.state_dict(), **kwargs))
    return _cache[key]


@pytest.mark.parametrize("name,kwargs", CONFIGS)
def test_eval_parity(name, kwargs, inputs_nchw, inputs_nhwc):
    tv, model = calibrated_pair(name, kwargs, inputs_nchw)
    if kwargs:
        # Exercise the CPU eval micro-batching (8 photos -> 3 micro-batches of 3, one padded).
        model.eval_micro_batch = 3
    report = run_parity(name, tv, model, inputs_nhwc)
    model.eval_micro_batch = None
    logits = report.get("logits")
    # Calibrated weights give real logits, not the ~1e-10 of torchvision's default init.
    assert logits.ref_scale > 1.0
    assert logits.relative <= EVAL_TOL, logits
    assert report.top1_agreement == 1.0 and report.topk_agreement == 1.0
    for c in report.comparisons:
        assert c.relative <= EVAL_TOL, c
    # As close to torchvision's float64 result as torchvision's own fp32 is (NOISE_FLOOR_FACTOR).
    assert report.noise_floor_measured and not report.noise_floor_excess(), report.noise_floor_excess()
    assert report.params == sum(p.numel() for p in tv.parameters())


# The generic path (CPU kernels off: XLA's convolutions on the whole batch, as on TPUs and GPUs) at
# the same tolerances: eval, train mode, float64 gradients.
def test_eval_parity_generic_path(inputs_nchw, inputs_nhwc, generic_path):
    test_eval_parity("mobilenet_v3_large", {}, inputs_nchw, inputs_nhwc)


def _flat(state) -> dict:
    return {tuple(p): np.asarray(v) for p, v in nnx.to_flat_state(state)}


def _train_step_both(tv, model, x_nchw, labels, with_grads: bool = True):
    """One train-mode forward (and backward) on each side; everything mapped to JAX paths and layout."""
    tv.train()
    tv.zero_grad()
    logits_t = tv(x_nchw)
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(labels))
    rules = rules_for(model.architecture["builder"])
    buffers = {k: v for k, v in tv.state_dict().items() if "running_" in k or "num_batches" in k}
    torch_side = dict(
        logits=logits_t.detach().numpy(),
        loss=loss_t.item(),
        stats=convert_to_jax(buffers, model, rules, strict=False),
    )

    def loss_fn(m, x, y):
        logits = m.forward(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    model.train()
    x = jnp.asarray(x_nchw.permute(0, 2, 3, 1).numpy())
    if with_grads:
        loss_t.backward()
        torch_side["grads"] = convert_to_jax(
            {k: p.grad for k, p in tv.named_parameters()}, model, rules, strict=False
        )
        (loss_j, logits_j), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(
            model, x, jnp.asarray(labels)
        )
    else:  # forward only: compiling the backward costs more than the whole comparison
        loss_j, logits_j = nnx.jit(loss_fn)(model, x, jnp.asarray(labels))
    variables = model_variables(model)
    jax_side = dict(
        logits=np.asarray(logits_j),
        loss=float(loss_j),
        stats={p: np.asarray(variables[p].get_value()) for p in torch_side["stats"]},
    )
    if with_grads:
        jax_side["grads"] = _flat(grads)
        assert set(jax_side["grads"]) == set(torch_side["grads"])
    return torch_side, jax_side


def _train_setup(name, kwargs, inputs_nchw, dtype):
    kwargs = dict(kwargs, dropout=0.0)
    tv_eval, _ = calibrated_pair(name, {k: v for k, v in kwargs.items() if k != "dropout"}, inputs_nchw)
    tv = torchvision.models.get_model(name, **kwargs)
    tv.load_state_dict(tv_eval.state_dict())
    labels = np.random.default_rng(0).integers(0, kwargs.get("num_classes", 1000), len(inputs_nchw))
    return kwargs, tv.to(dtype), inputs_nchw.to(dtype), labels


@pytest.mark.parametrize("name,kwargs", CONFIGS[:3])
def test_train_mode_float32(name, kwargs, inputs_nchw):
    """Batch-statistics forward and the running stats after one step (unbiased var), fp32."""
    kwargs, tv, x, labels = _train_setup(name, kwargs, inputs_nchw, torch.float32)
    model = load_torchvision(name, tv.state_dict(), **kwargs)
    ref, got = _train_step_both(tv, model, x, labels, with_grads=False)
    assert np.max(np.abs(ref["logits"] - got["logits"])) <= TRAIN_TOL * np.max(np.abs(ref["logits"]))
    assert abs(got["loss"] - ref["loss"]) <= TRAIN_TOL * abs(ref["loss"])
    assert_close_tensors(ref["stats"], got["stats"], TRAIN_TOL, "running stat")


# Large and Small; the dilated backbone's gradients are checked by the segmentation tests.
@pytest.mark.parametrize("name,kwargs", CONFIGS[:2])
def test_gradients_float64(name, kwargs, inputs_nchw):
    """Cross-entropy gradients w.r.t. every parameter, both sides in float64.

    In fp32 the comparison is ill-posed on any realistic batch: hardswish's derivative jumps by
    0.5 at -3, and with ~10M activations some pre-activation lies within fp32 noise of it, so
    torch fp32 itself differs from torch fp64 by up to ~7e-2 relative (test_gradients_float32
    checks that JAX fp32 is as accurate as torch fp32). In float64 no kink is that close.
    """
    kwargs, tv, x, labels = _train_setup(name, kwargs, inputs_nchw, torch.float64)
    with jax.enable_x64(True):
        model = load_torchvision(name, tv.state_dict(), param_dtype=jnp.float64, **kwargs)
        ref, got = _train_step_both(tv, model, x, labels)
    logits = np.max(np.abs(ref["logits"] - got["logits"])) / np.max(np.abs(ref["logits"]))
    assert logits <= FLOAT64_TOL
    stats = assert_close_tensors(ref["stats"], got["stats"], FLOAT64_TOL, "running stat")
    grads = assert_close_gradients(ref["grads"], got["grads"], FLOAT64_GRAD_TOL)
    print(f"\n{name} float64: logits {logits:.1e}, running stats {stats:.1e}, gradients {grads:.1e}")


def test_train_mode_and_float64_gradients_generic_path(inputs_nchw, generic_path):
    test_train_mode_float32("mobilenet_v3_large", {}, inputs_nchw)
    test_gradients_float64("mobilenet_v3_small", {}, inputs_nchw)


def test_gradients_float32_match_float64(inputs_nchw):
    """fp32 gradients within GRAD_TOL of the float64 ones, on weights with no activation input near a kink.

    Where an activation input lies within float32 rounding of a kink (hardswish's +-3, ReLU's 0),
    a float32 run may take either side, and which one depends on the CPU's kernels (on AVX-512 XLA's
    and torch's land on different sides of hardswish's 3 for these photos). The biases are first
    shifted so that every activation input is at least 16x its layer's float32 error away from any
    kink (porting.calibration.move_off_activation_kinks_): then fp32 differs from float64 by rounding
    only, for torch and for the port alike.
    """
    name = "mobilenet_v3_small"
    kwargs, tv32, x32, labels = _train_setup(name, {}, inputs_nchw, torch.float32)
    _, tv64, x64, _ = _train_setup(name, {}, inputs_nchw, torch.float64)
    margin = move_off_activation_kinks_(tv32, tv64, x32)
    assert margin >= 16
    model = load_torchvision(name, tv32.state_dict(), **kwargs)
    ref32, got32 = _train_step_both(tv32, model, x32, labels)
    tv64.train()
    tv64.zero_grad()
    torch.nn.functional.cross_entropy(tv64(x64), torch.from_numpy(labels)).backward()
    truth = convert_to_jax(
        {k: p.grad for k, p in tv64.named_parameters()}, model, rules_for(name), strict=False
    )
    global_scale = max(float(np.max(np.abs(t))) for t in truth.values())
    worst_torch = worst_jax = 0.0
    for path, t in truth.items():
        scale = np.max(np.abs(t))
        if scale <= 1e-12 * global_scale:  # exactly zero in exact arithmetic (see above)
            continue
        err_torch = np.max(np.abs(ref32["grads"][path] - t)) / scale
        err_jax = np.max(np.abs(got32["grads"][path] - t)) / scale
        worst_torch, worst_jax = max(worst_torch, err_torch), max(worst_jax, err_jax)
        assert err_jax <= GRAD_TOL, (format_path(path), err_jax, err_torch)
    print(f"\nfp32 gradients vs float64: port {worst_jax:.2e}, torch {worst_torch:.2e}, margin {margin:.0f}x")
    assert worst_torch <= GRAD_TOL  # the premise: away from kinks fp32 is only rounding


@pytest.mark.parametrize("name,kwargs", [CONFIGS[1], CONFIGS[3]])
def test_round_trip_to_torchvision(name, kwargs, inputs_nchw):
    tv, model = calibrated_pair(name, kwargs, inputs_nchw)
    state_dict = to_torchvision(model)
    fresh = torchvision.models.get_model(name, **kwargs)
    fresh.load_state_dict(state_dict, strict=True)
    reference = tv.state_dict()
    assert list(state_dict) == list(reference)
    for key, value in reference.items():
        assert state_dict[key].dtype == value.dtype, key
        assert torch.equal(state_dict[key], value), key
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(inputs_nchw[:2]), tv(inputs_nchw[:2]))
