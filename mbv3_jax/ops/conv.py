"""XLA's own convolution in NHWC: the generic path every platform can run."""

from __future__ import annotations

import jax

Array = jax.Array


def xla_conv(
    x: Array, kernel: Array, stride: int, padding: int, dilation: int = 1, groups: int = 1, precision=None
) -> Array:
    """XLA's own convolution, NHWC / HWIO, symmetric padding: what GPUs and TPUs run (and the CPU
    with its kernels off)."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=precision,
    )
