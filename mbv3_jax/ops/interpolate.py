"""``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` without antialias, NHWC.

Segmentation heads upsample logits with it and the detection transform resizes images with it.
Sizes are static, so the source taps and weights are computed on the host (in float32, as torch's
CPU kernel does) and the resize is two gathers plus multiply-adds: O(output) work, where a
dense interpolation matrix would cost O(output x input).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np


@lru_cache(maxsize=256)
def linear_taps(
    in_size: int, out_size: int, dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(index0, index1, weight0, weight1) per output position, torch's align_corners=False rule.

    torch: ``src = max(scale * (dst + 0.5) - 0.5, 0)`` with ``scale = in / out`` computed in the
    input's precision, ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``, ``w1 = src - i0``,
    ``w0 = 1 - w1``.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"interpolate: sizes must be positive, got {in_size} -> {out_size}")
    ftype = np.dtype(dtype).type
    dst = np.arange(out_size, dtype=np.float64) + 0.5
    if ftype == np.float64:
        src = np.maximum(np.float64(in_size) / np.float64(out_size) * dst - 0.5, 0.0)
    else:
        # float32 (and lower): torch's kernel computes scale * (dst + 0.5) - 0.5 in float32 as one
        # fused multiply-add: exact in float64 here, then rounded once (its weights, bit for bit).
        scale = np.float32(in_size) / np.float32(out_size)
        src = np.maximum((np.float64(scale) * dst - 0.5).astype(np.float32), np.float32(0.0))
        ftype = np.float32
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.minimum(src - i0.astype(ftype), ftype(1.0))
    w0 = ftype(1.0) - w1
    return i0.astype(np.int32), i1.astype(np.int32), w0, w1


def _resize_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    i0, i1, w0, w1 = linear_taps(in_size, out_size, np.dtype(x.dtype).name)
    shape = [1] * x.ndim
    shape[axis] = out_size
    w0 = jnp.asarray(w0, x.dtype).reshape(shape)
    w1 = jnp.asarray(w1, x.dtype).reshape(shape)
    return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def interpolate_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Resize NHWC ``x`` to ``size = (H, W)`` as torch's bilinear interpolate (align_corners=False)."""
    out_h, out_w = (int(s) for s in size)
    if x.ndim != 4:
        raise ValueError(f"interpolate_bilinear expects NHWC, got shape {x.shape}")
    if x.shape[1] == 1 and x.shape[2] == 1:  # a pooled 1x1 map: a broadcast, as in torch
        return jnp.broadcast_to(x, (x.shape[0], out_h, out_w, x.shape[3]))
    # Width first, then height: torch's order of the two interpolations.
    return _resize_axis(_resize_axis(x, 2, out_w), 1, out_h)
