"""Array ops against torch or XLA: bilinear interpolation, the atrous and depthwise conv rewrites."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from extras import HAVE_TORCH, needs_torch

from mbv3_jax import backend
from mbv3_jax.cpu_kernels import depthwise_conv_shift, dilated_conv_taps, few_channel_conv_taps, own_buffers
from mbv3_jax.layers import batch_norm_train
from mbv3_jax.ops import interpolate_bilinear

if HAVE_TORCH:  # the optional "torch" extra: without it the needs_torch tests skip, the others run
    import torch


@needs_torch
@pytest.mark.parametrize(
    "in_hw,out_hw",
    [
        ((33, 49), (520, 780)),
        ((5, 7), (321, 479)),
        ((1, 1), (10, 12)),
        ((40, 30), (20, 13)),
        ((1, 5), (7, 9)),
    ],
)
def test_interpolate_bilinear_matches_torch(in_hw, out_hw):
    x = np.random.default_rng(0).standard_normal((2, *in_hw, 5)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="bilinear", align_corners=False
    )
    got = jax.jit(interpolate_bilinear, static_argnums=1)(jnp.asarray(x), out_hw)
    # torch's source positions are reproduced bit for bit; only the final multiply-adds round.
    np.testing.assert_allclose(np.asarray(got), ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dilation", [2, 12, 24, 36, 80])
def test_dilated_conv_taps_matches_xla(dilation):
    rng = np.random.default_rng(dilation)
    x = jnp.asarray(rng.standard_normal((2, 21, 30, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 16, 8)) * 0.2, jnp.float32)
    ref = jax.lax.conv_general_dilated(
        x,
        k,
        (1, 1),
        ((dilation, dilation),) * 2,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="highest",
    )
    got = dilated_conv_taps(x, k, dilation, dilation, precision="highest")
    assert got.shape == ref.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape,kernel,stride,padding", [((2, 19, 24, 3), 3, 2, 1), ((1, 9, 11, 2), 5, 1, 2)])
def test_few_channel_conv_taps_matches_xla(shape, kernel, stride, padding):
    """The stem rewrite: same values as XLA's convolution (float64: to rounding), same gradients."""
    rng = np.random.default_rng(sum(shape))
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal(shape))
        k = jnp.asarray(rng.standard_normal((kernel, kernel, shape[-1], 8)))

        def xla(x, k):
            pad = ((padding, padding),) * 2
            return jax.lax.conv_general_dilated(
                x, k, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

        ref, ref_vjp = jax.vjp(xla, x, k)
        got, got_vjp = jax.vjp(lambda x, k: few_channel_conv_taps(x, k, stride, padding), x, k)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-12)
        g = jnp.asarray(rng.standard_normal(ref.shape))
        for a, b in zip(got_vjp(g), ref_vjp(g), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # bfloat16 inputs are summed in float32 and rounded once.
    xb, kb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
    got_bf16 = few_channel_conv_taps(xb, kb, stride, padding)
    ref32 = xla(xb.astype(jnp.float32), kb.astype(jnp.float32))
    assert got_bf16.dtype == jnp.bfloat16
    # One bfloat16 rounding of the float32 sum: within half a bfloat16 ulp (2^-9 relative), plus slack.
    np.testing.assert_allclose(np.asarray(got_bf16, np.float32), np.asarray(ref32), rtol=2**-8, atol=0)


@needs_torch
def test_interpolate_bilinear_float64_matches_torch():
    """In float64 torch computes the source positions in float64 too (not the fp32 FMA rule)."""
    x = np.random.default_rng(1).standard_normal((1, 33, 49, 3))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(520, 781), mode="bilinear", align_corners=False
    )
    with jax.enable_x64(True):
        got = np.asarray(interpolate_bilinear(jnp.asarray(x), (520, 781)))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "shape,kernel,stride,dilation",
    [
        ((2, 13, 17, 5), 3, 1, 1),  # 3x3: the kernel gradient summed per image row first
        ((3, 14, 11, 4), 5, 2, 1),  # 5x5: summed per image first
        ((2, 16, 16, 3), 3, 2, 1),
        ((2, 15, 15, 3), 3, 1, 2),
        ((1, 7, 9, 6), 5, 1, 1),
    ],
)
def test_depthwise_conv_shift_gradients_match_xla_conv(shape, kernel, stride, dilation):
    """The shift depthwise's hand-written gradients equal autodiff of XLA's grouped conv (float64)."""
    rng = np.random.default_rng(sum(shape) + kernel)
    channels, padding = shape[-1], (kernel - 1) // 2 * dilation
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal(shape))
        k = jnp.asarray(rng.standard_normal((kernel, kernel, 1, channels)))

        def xla_conv(x, k):
            return jax.lax.conv_general_dilated(
                x,
                k,
                (stride, stride),
                ((padding, padding),) * 2,
                rhs_dilation=(dilation, dilation),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=channels,
            )

        def loss(conv):
            return lambda x, k: jnp.sum(jnp.sin(conv(x, k)))

        ref = jax.grad(loss(xla_conv), (0, 1))(x, k)
        got = jax.jit(
            jax.grad(loss(lambda x, k: depthwise_conv_shift(x, k, stride, padding, dilation)), (0, 1))
        )(x, k)
    for r, g in zip(ref, got, strict=True):
        assert g.dtype == np.float64 and g.shape == r.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-12, atol=1e-12)


def test_batch_norm_train_vjp_matches_autodiff():
    """The hand-written BatchNorm VJP equals autodiff of its formula, statistics included (float64)."""
    rng = np.random.default_rng(3)

    def formula(x, scale, bias, eps):
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var

    with jax.enable_x64(True):
        args = [
            jnp.asarray(rng.standard_normal(s) + o)
            for s, o in (((3, 5, 7, 4), 2.0), ((4,), 1.0), ((4,), 0.0))
        ]
        weights = [jnp.asarray(rng.standard_normal(s)) for s in ((3, 5, 7, 4), (4,), (4,))]

        def loss(fn):
            return lambda *a: sum(jnp.sum(jnp.sin(o) * w) for o, w in zip(fn(*a, 1e-3), weights, strict=True))

        ref = jax.grad(loss(formula), (0, 1, 2))(*args)
        got = jax.jit(jax.grad(loss(batch_norm_train), (0, 1, 2)))(*args)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("unfused", [own_buffers, backend.unfused], ids=["own_buffers", "backend.unfused"])
def test_unfused_is_the_function_with_its_gradient(unfused):
    def fn(x, y):
        return jnp.sin(x) * y, x.sum()

    x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    y = jnp.arange(4.0)
    got = jax.jit(lambda a, b: unfused(fn, a, b))(x, y)
    want = fn(x, y)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    grad = jax.grad(lambda a: unfused(fn, a, y)[0].sum())(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jnp.cos(x) * y), rtol=1e-6)
    # A NaN probe (the predicate's false branch) gives the same result.
    xn = x.at[0, 0].set(jnp.nan)
    np.testing.assert_array_equal(np.asarray(unfused(fn, xn, y)[0]), np.asarray(fn(xn, y)[0]))


def test_unfused_keeps_its_conditional_for_integer_operands():
    # x == x on an integer probe folds to true and XLA drops the conditional (and the separation).
    def fn(v):
        return (v.astype(jnp.int32) * 3 + 1).astype(jnp.uint8)

    v = jnp.arange(24, dtype=jnp.uint8).reshape(4, 6)
    compiled = jax.jit(lambda a: own_buffers(fn, a)).lower(v).compile()
    np.testing.assert_array_equal(np.asarray(compiled(v)), np.asarray(fn(v)))
    if jax.default_backend() == "cpu":
        assert "conditional(" in compiled.as_text()
