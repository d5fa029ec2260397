"""XLA's own convolution in NHWC: the generic path every platform can run."""

from __future__ import annotations

from typing import Any

import jax

Array = jax.Array


def explicitly_sharded(x: Any) -> bool:
    """Whether ``x``'s type splits one of its axes over a mesh (explicit sharding mode)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", ())
    return any(axis is not None for axis in spec)


def xla_conv(
    x: Array, kernel: Array, stride: int, padding: int, dilation: int = 1, groups: int = 1, precision=None
) -> Array:
    """XLA's own convolution, NHWC / HWIO, symmetric padding: what GPUs and TPUs run (and the CPU
    with its kernels off).

    An input split over devices by its type (explicit sharding) is convolved with the mesh axes
    automatic, the output split as the input: jax types the forward convolution but not its kernel
    gradient, which sums over the split batch (a ``ShardingTypeError`` in training otherwise).
    """

    def conv(x: Array, kernel: Array) -> Array:
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

    if explicitly_sharded(x):
        return jax.sharding.auto_axes(conv, out_sharding=jax.typeof(x).sharding)(x, kernel)
    return conv(x, kernel)
