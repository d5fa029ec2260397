"""RoIAlign and multi-scale RoIAlign, numerically equal to ``torchvision.ops`` (NHWC, float32).

The sampling follows torchvision's CPU kernel (``roi_align_kernel.cpp`` / ``roi_align_common.h``):

- ``start = x1 * spatial_scale - offset`` (offset 0.5 when ``aligned``); when not ``aligned`` the RoI
  width/height are forced to at least 1; ``bin = roi_size / pooled_size``.
- sample ``iy`` of bin ``ph``: ``y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h`` (same for x),
  ``grid = sampling_ratio`` or, when ``sampling_ratio <= 0``, ``ceil(roi_size / pooled_size)`` per RoI.
- a sample with ``y < -1`` or ``y > height`` (or x likewise) contributes 0 but still counts;
  coordinates ``<= 0`` clamp to 0; when ``floor(y) >= height - 1`` both taps sit on the last row.
- the bin value is the sum of the bilinear samples (iy-major) divided by ``max(grid_h * grid_w, 1)``.

The bilinear weights are separable, so each sample is four row/column gathers from the flattened
feature map ``(N * H * W, C)``: O(K * out * grid^2 * C) work and no dense interpolation matrix.
The sample coordinates and bilinear weights are bit-identical to the kernel's: the float32
expressions are evaluated in its order, with XLA kept from fusing multiply-adds and from turning
divisions into reciprocal multiplies (``boxes._rounded`` / ``boxes._divide``), so every sample reads
the same taps. The per-channel weighted sums are left to XLA (it may contract them into FMAs: last-bit
differences, within 1e-5 of torchvision in the tests), because forcing torch's rounding there is slow.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mbv3_jax.ops.boxes import _divide, _rounded

__all__ = ["infer_scale", "level_mapper", "multiscale_roi_align", "roi_align"]


def _axis_taps(start, bin_size, grid, grid_max: int, pooled: int, size):
    """Per RoI, bin and sample along one axis: (low, high, w_low, w_high, in_range).

    ``start``, ``bin_size``: (K,) float32; ``grid``: (K,) int32 samples per bin (<= grid_max);
    ``size``: (K,) int32 feature size along the axis. Outputs are (K, pooled, grid_max).
    """
    p = jnp.arange(pooled, dtype=jnp.float32)[None, :, None]
    i = jnp.arange(grid_max, dtype=jnp.float32)[None, None, :]
    grid_f = grid.astype(jnp.float32)[:, None, None]
    b = bin_size[:, None, None]
    # roi_start + p * bin + (i + .5f) * bin / grid, evaluated left to right like the C++.
    coord = (start[:, None, None] + _rounded(p * b)) + _divide((i + 0.5) * b, grid_f)
    size = size[:, None, None]
    size_f = size.astype(jnp.float32)
    # Written as "in range" so that NaN coordinates count as out of range, as in the kernel.
    in_range = (coord >= -1.0) & (coord <= size_f)
    coord = jnp.where(coord <= 0, 0.0, coord)
    low = jnp.where(in_range, coord, 0.0).astype(jnp.int32)  # (int) y, y >= 0 here
    at_edge = low >= size - 1
    low = jnp.where(at_edge, size - 1, low)
    high = jnp.where(at_edge, size - 1, low + 1)
    coord = jnp.where(at_edge, low.astype(jnp.float32), coord)
    lw = coord - low.astype(jnp.float32)
    hw = 1.0 - lw
    # Out-of-range samples read position 0 with zero weights, exactly as the kernel's PreCalc.
    low = jnp.where(in_range, low, 0)
    high = jnp.where(in_range, high, 0)
    return low, high, hw, lw, in_range


@partial(jax.jit, static_argnames=("output_size", "sampling_ratio", "aligned", "max_grid"))
def _roi_align_flat(
    flat: jax.Array,
    base: jax.Array,
    height: jax.Array,
    width: jax.Array,
    scale: jax.Array,
    boxes: jax.Array,
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    max_grid: int,
) -> jax.Array:
    """RoIAlign from a flattened ``(M, C)`` feature buffer; every RoI carries its own map.

    ``base`` is the row of the RoI's map (its top-left pixel) in ``flat``; ``height``/``width``
    (int32) and ``scale`` (float32) are that map's size and spatial scale. One code path serves
    single maps (``base = batch_index * H * W``) and pyramids (maps concatenated).
    """
    out_h, out_w = output_size
    k = boxes.shape[0]
    c = flat.shape[1]
    offset = 0.5 if aligned else 0.0
    start_w = _rounded(boxes[:, 0] * scale) - offset
    start_h = _rounded(boxes[:, 1] * scale) - offset
    end_w = _rounded(boxes[:, 2] * scale) - offset
    end_h = _rounded(boxes[:, 3] * scale) - offset
    roi_w = end_w - start_w
    roi_h = end_h - start_h
    if not aligned:  # std::max(roi_width, 1.f): force malformed RoIs to 1x1
        roi_w = jnp.where(roi_w < 1.0, 1.0, roi_w)
        roi_h = jnp.where(roi_h < 1.0, 1.0, roi_h)
    bin_w = _divide(roi_w, out_w)
    bin_h = _divide(roi_h, out_h)
    if sampling_ratio > 0:
        grid_h = jnp.full((k,), sampling_ratio, jnp.int32)
        grid_w = grid_h
    else:
        # (int) ceil(roi / pooled); may be <= 0 for inverted aligned RoIs (then no samples).
        grid_h = jnp.ceil(_divide(roi_h, out_h)).astype(jnp.int32)
        grid_w = jnp.ceil(_divide(roi_w, out_w)).astype(jnp.int32)
    count = jnp.maximum(grid_h * grid_w, 1).astype(flat.dtype)

    y_lo, y_hi, y_hw, y_lw, y_ok = _axis_taps(start_h, bin_h, grid_h, max_grid, out_h, height)
    x_lo, x_hi, x_hw, x_lw, x_ok = _axis_taps(start_w, bin_w, grid_w, max_grid, out_w, width)
    row_lo = base[:, None, None] + y_lo * width[:, None, None]
    row_hi = base[:, None, None] + y_hi * width[:, None, None]

    def sample_taps(iy, ix) -> tuple[list[jax.Array], list[jax.Array]]:
        """Rows of ``flat`` and weights of the 4 bilinear taps of sample (iy, ix) of every bin."""
        ok = y_ok[:, :, None, iy] & x_ok[:, None, :, ix]
        hy, ly = y_hw[:, :, None, iy], y_lw[:, :, None, iy]
        hx, lx = x_hw[:, None, :, ix], x_lw[:, None, :, ix]
        pairs = ((hy, hx), (hy, lx), (ly, hx), (ly, lx))
        weights = [jnp.where(ok, wy * wx, 0.0) for wy, wx in pairs]
        rl, rh = row_lo[:, :, None, iy], row_hi[:, :, None, iy]
        cl, ch = x_lo[:, None, :, ix], x_hi[:, None, :, ix]
        rows = [r + col for r, col in ((rl, cl), (rl, ch), (rh, cl), (rh, ch))]
        return rows, weights

    def sample(rows, weights) -> jax.Array:
        """w1*v1 + w2*v2 + w3*v3 + w4*v4 for one sample of every bin: (K, out_h, out_w, C)."""
        # Rows are always in range (out-of-range samples read row 0 with weight 0): "clip" spares
        # the per-element bounds check and NaN fill of the default gather mode.
        taps = [jnp.take(flat, r, axis=0, mode="clip") for r in rows]
        prods = [w[..., None] * tp for w, tp in zip(weights, taps, strict=True)]
        return prods[0] + prods[1] + prods[2] + prods[3]

    acc = jnp.zeros((k, out_h, out_w, c), flat.dtype)
    if sampling_ratio > 0:
        # The rows and weights are per bin, not per channel, but XLA:CPU expands this barrier and
        # recomputes them per channel: cheap alone, costly fused into a matmul's operand, so callers
        # wrap roi_align in mbv3_jax.backend.unfused there (FasterRCNN._box_head).
        params = jax.lax.optimization_barrier(
            [sample_taps(iy, ix) for iy in range(sampling_ratio) for ix in range(sampling_ratio)]
        )
        # output_val += sample, iy-major, as the kernel accumulates.
        for rows, weights in params:
            acc = acc + sample(rows, weights)
    else:

        def body(s, acc):
            iy, ix = s // max_grid, s % max_grid
            use = ((iy < grid_h) & (ix < grid_w))[:, None, None, None]
            rows, weights = jax.lax.optimization_barrier(sample_taps(iy, ix))
            return acc + jnp.where(use, sample(rows, weights), 0.0)

        acc = jax.lax.fori_loop(0, max_grid * max_grid, body, acc)
        # An RoI needing more samples than max_grid cannot be computed with these static shapes:
        # make it NaN rather than silently wrong.
        too_big = (grid_h > max_grid) | (grid_w > max_grid)
        acc = jnp.where(too_big[:, None, None, None], jnp.nan, acc)
    if sampling_ratio > 0 and sampling_ratio & (sampling_ratio - 1) == 0:
        return acc / count[:, None, None, None]  # a power-of-two count: XLA's reciprocal is exact
    return _divide(acc, count[:, None, None, None])


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    out_h, out_w = (int(s) for s in size)
    return out_h, out_w


def _adaptive_grid_bound(
    boxes: np.ndarray, scales: np.ndarray, output_size: tuple[int, int], aligned: bool
) -> int:
    """Host-side max over RoIs of torch's adaptive grid ``ceil(roi_size / pooled)`` (float32)."""
    boxes = np.asarray(boxes, np.float32)
    scales = np.asarray(scales, np.float32)
    offset = np.float32(0.5 if aligned else 0.0)
    start = boxes[:, :2] * scales[:, None] - offset
    end = boxes[:, 2:] * scales[:, None] - offset
    size = end - start
    if not aligned:
        size = np.where(size < 1, np.float32(1), size)
    pooled = np.array([output_size[1], output_size[0]], np.float32)
    with np.errstate(invalid="ignore"):
        grid = np.ceil(size / pooled)
    grid = grid[np.isfinite(grid)]
    return max(1, int(grid.max())) if grid.size else 1


def roi_align(
    features: jax.Array,
    rois: jax.Array,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    *,
    max_sampling_grid: int | None = None,
) -> jax.Array:
    """``torchvision.ops.roi_align`` on NHWC features.

    Args:
        features: (N, H, W, C).
        rois: (K, 5) float32 rows ``[batch_index, x1, y1, x2, y2]`` in image coordinates (the
            batch index is truncated to int, as the kernel does; it must be in range).
        output_size: ``(out_h, out_w)`` or an int.
        spatial_scale: feature size / image size (rounded to float32, as the kernel does).
        sampling_ratio: samples per bin and axis; ``<= 0`` selects torch's adaptive
            ``ceil(roi_size / out_size)`` per RoI. The adaptive grid is data dependent: it is
            evaluated with a static bound ``max_sampling_grid`` (samples beyond an RoI's own
            grid are masked out); RoIs that need more than the bound come out NaN. Outside jit
            the bound defaults to the exact maximum over ``rois``; under jit it must be given.
        aligned: torchvision's ``aligned`` (half-pixel shift, no minimum RoI size).

    Returns:
        (K, out_h, out_w, C), equal to torchvision's (K, C, out_h, out_w) transposed.
    """
    out_h, out_w = _pair(output_size)
    n, h, w, c = features.shape
    rois = jnp.asarray(rois, features.dtype)
    k = rois.shape[0]
    if k == 0:
        return jnp.zeros((0, out_h, out_w, c), features.dtype)
    scale = np.float32(spatial_scale)
    max_grid = _grid_bound(
        rois[:, 1:], np.full(k, scale), (out_h, out_w), sampling_ratio, aligned, max_sampling_grid
    )
    batch = rois[:, 0].astype(jnp.int32)  # (int) offset_rois[0]: truncation toward zero
    return _roi_align_flat(
        features.reshape(n * h * w, c),
        batch * (h * w),
        jnp.full((k,), h, jnp.int32),
        jnp.full((k,), w, jnp.int32),
        jnp.full((k,), scale, features.dtype),
        rois[:, 1:],
        (out_h, out_w),
        sampling_ratio,
        aligned,
        max_grid,
    )


def _grid_bound(boxes, scales, output_size, sampling_ratio, aligned, max_sampling_grid) -> int:
    if sampling_ratio > 0:
        return sampling_ratio
    if max_sampling_grid is not None:
        return int(max_sampling_grid)
    if isinstance(boxes, jax.core.Tracer) or isinstance(scales, jax.core.Tracer):
        raise ValueError(
            "roi_align with sampling_ratio <= 0 (adaptive grid) needs a static bound under jit: pass "
            "max_sampling_grid (>= max ceil(roi_size / output_size) over the RoIs), or use sampling_ratio > 0"
        )
    return _adaptive_grid_bound(np.asarray(boxes), np.asarray(scales), output_size, aligned)


def infer_scale(feature_hw: Sequence[int], image_hw: Sequence[int]) -> float:
    """``torchvision.ops.poolers._infer_scale``: ``2 ** round(log2(feature_h / image_h))``.

    torch takes the log2 of the ratio as a float32 tensor and rounds half to even; only the
    height ratio is used.
    """
    approx = np.float32(float(feature_hw[0]) / float(image_hw[0]))
    return float(2.0 ** float(np.round(np.log2(approx))))


def level_mapper(
    boxes: jax.Array,
    k_min: int,
    k_max: int,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> jax.Array:
    """``torchvision.ops.poolers.LevelMapper``: FPN level index (0-based from ``k_min``) per box.

    ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)`` clamped to
    ``[k_min, k_max]``, minus ``k_min``. A box with negative area gives NaN in torch, whose int64
    cast matches no level, so torch leaves that RoI's output at zero; it maps to -1 here (which
    ``multiscale_roi_align`` turns into zeros too).
    """
    s = jnp.sqrt(_area(boxes))
    target = jnp.floor(canonical_level + jnp.log2(_divide(s, canonical_scale)) + jnp.float32(eps))
    target = jnp.clip(target, k_min, k_max)
    return jnp.where(jnp.isnan(target), -1, target.astype(jnp.int32) - k_min)


def _area(boxes: jax.Array) -> jax.Array:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def multiscale_roi_align(
    features: Sequence[jax.Array],
    boxes: jax.Array,
    image_sizes: Sequence[Sequence[int]],
    output_size: int | Sequence[int] = 7,
    sampling_ratio: int = 2,
    *,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    scales: Sequence[float] | None = None,
    max_sampling_grid: int | None = None,
) -> jax.Array:
    """``torchvision.ops.MultiScaleRoIAlign`` with a fixed number of boxes per image.

    Args:
        features: the pooled maps, NHWC, in the order of the feature dict *after* filtering by
            ``featmap_names`` (torchvision keeps the dict order, not the names' order). For the
            MobileNetV3 FPN detectors (``featmap_names=['0', '1', '2', '3']`` from FasterRCNN's
            default, backbone outputs '0', '1', 'pool') these are FPN outputs '0' and '1'.
        boxes: (B, K, 4) boxes in (padded-batch) image coordinates, K per image (pad with any
            box; the padded rows' outputs are to be ignored by the caller).
        image_sizes: the per-image ``(h, w)`` torchvision passes (``ImageList.image_sizes``, the
            resized sizes before batch padding); scales come from their maximum. Static.
        scales: overrides the inferred per-map scales. torchvision infers them once, on the
            first batch it sees, and caches them in the module; pass them to pin that behaviour.

    Returns:
        (B * K, out_h, out_w, C), RoIs in image-major order as torchvision's concatenation.

    Levels: scales are ``2 ** round(log2(feature_h / max_h))``; ``k_min = int(-log2(scales[0]))``,
    ``k_max = int(-log2(scales[-1]))``; every box goes to ``level_mapper(...)``. With one map it is a
    plain RoIAlign. For the MobileNetV3-Large FPN both maps have stride 32, so k_min == k_max == 5 and
    every box pools from map '0'.
    """
    out_h, out_w = _pair(output_size)
    bsz, k = boxes.shape[0], boxes.shape[1]
    c = features[0].shape[-1]
    dtype = features[0].dtype
    if scales is None:
        if not image_sizes:
            raise ValueError("images list should not be empty")
        max_hw = (max(int(s[0]) for s in image_sizes), max(int(s[1]) for s in image_sizes))
        scales = [infer_scale(f.shape[1:3], max_hw) for f in features]
    scales = [float(s) for s in scales]
    flat_boxes = jnp.asarray(boxes, dtype).reshape(bsz * k, 4)
    batch = jnp.repeat(jnp.arange(bsz, dtype=jnp.int32), k)
    if bsz * k == 0:
        return jnp.zeros((0, out_h, out_w, c), dtype)

    if len(features) == 1:
        f = features[0]
        rois = jnp.concatenate([batch[:, None].astype(dtype), flat_boxes], axis=1)
        return roi_align(
            f, rois, (out_h, out_w), scales[0], sampling_ratio, max_sampling_grid=max_sampling_grid
        )

    k_min = int(-np.log2(np.float32(scales[0])))
    k_max = int(-np.log2(np.float32(scales[-1])))
    levels = level_mapper(flat_boxes, k_min, k_max, canonical_scale, canonical_level)
    # Levels outside [0, k_max - k_min] cannot occur after the clamp, so only those maps are needed
    # (for the MobileNetV3 FPN: map '0' alone).
    used = min(len(features), k_max - k_min + 1) if k_max >= k_min else 0
    if used <= 0:
        return jnp.zeros((bsz * k, out_h, out_w, c), dtype)
    flats, offsets, hs, ws = [], [], [], []
    offset = 0
    for f in features[:used]:
        n, h, w, _ = f.shape
        flats.append(f.reshape(n * h * w, c))
        offsets.append(offset)
        hs.append(h)
        ws.append(w)
        offset += n * h * w
    flat = flats[0] if used == 1 else jnp.concatenate(flats, axis=0)
    in_level = (levels >= 0) & (levels < used)
    lvl = jnp.where(in_level, levels, 0)
    h_arr = jnp.asarray(hs, jnp.int32)[lvl]
    w_arr = jnp.asarray(ws, jnp.int32)[lvl]
    scale_arr = jnp.asarray(np.asarray(scales[:used], np.float32))[lvl]
    base = jnp.asarray(offsets, jnp.int32)[lvl] + batch * h_arr * w_arr
    if sampling_ratio > 0:
        max_grid = sampling_ratio
    else:
        max_grid = _grid_bound(
            flat_boxes, scale_arr, (out_h, out_w), sampling_ratio, False, max_sampling_grid
        )
    out = _roi_align_flat(
        flat, base, h_arr, w_arr, scale_arr, flat_boxes, (out_h, out_w), sampling_ratio, False, max_grid
    )
    # torch starts from zeros and fills each level's RoIs; an RoI matching no level stays zero.
    return jnp.where(in_level[:, None, None, None], out, 0.0)
