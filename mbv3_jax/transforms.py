"""Host-side eval preprocessing that reproduces torchvision's presets bit-for-bit, in numpy.

torchvision's ``ImageClassification`` / ``SemanticSegmentation`` presets (the ``weights.transforms()`` of
the MobileNetV3 checkpoints) resize a uint8 image by casting it to float32, running torch's CPU
antialiased bilinear kernel, rounding back to uint8, then center-cropping, rescaling to [0, 1] and
normalizing. Because of the rounding step, an approximate resize flips values that sit near x.5 and the
result differs by 1/255/std (~0.017) there; so :func:`resize_bilinear_antialias` replays torch's kernel
(``aten/src/ATen/native/cpu/UpSampleKernel.cpp``, separable "generic Nd" path) in float32 with the same
weight arithmetic, pass order and accumulation order. Verified bitwise against torch 2.14.1 on x86:
the float32 rounding of torch's loop depends on which ATen CPU build runs it (see :data:`KERNELS`;
``"avx2"`` is the default and what ``torch.backends.cpu.get_cpu_capability() == "AVX2"`` uses). With the
other build a handful of values per photo land on the other side of x.5 (counts in docs/performance.md).

Everything here is numpy-only (no torch, no jax) and works on HWC images; batches are NHWC.

Input policy: images must be ``uint8`` (anything else raises ``TypeError`` naming the dtype, since
torchvision's rounding/rescaling semantics are only defined for uint8 here). A 2-D ``(H, W)`` or
``(H, W, 1)`` grayscale image is replicated to 3 channels (lossless and unambiguous: equal to running the
preset on ``img.expand(3, H, W)``). 4-channel (RGBA) images raise ``ValueError``: dropping or compositing
alpha is a choice the caller must make (e.g. pass ``img[..., :3]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KERNELS",
    "EVAL_PRESETS",
    "ClassificationPreset",
    "SegmentationPreset",
    "classification_preset",
    "segmentation_preset",
    "preprocess_batch",
    "resize_bilinear_antialias",
    "resize_uint8",
    "resized_output_size",
    "center_crop",
    "normalize_uint8",
    "as_rgb_uint8",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------------------


def as_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Validate a photo and return it as a ``(H, W, 3)`` uint8 array (grayscale is replicated).

    Fails loudly rather than guessing: non-uint8 dtypes and alpha channels are rejected.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(
            f"expected a uint8 image, got dtype {img.dtype}; convert explicitly (e.g. "
            "np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for [0, 1] floats)"
        )
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise ValueError(f"expected an HWC (or HW grayscale) image, got shape {img.shape}")
    c = img.shape[2]
    if c == 1:
        img = np.repeat(img, 3, axis=2)
    elif c == 4:
        raise ValueError(
            "got a 4-channel (RGBA?) image; drop or composite the alpha channel first, e.g. img[..., :3]"
        )
    elif c != 3:
        raise ValueError(f"expected 1 or 3 channels in the last axis (HWC), got shape {img.shape}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"empty image of shape {img.shape}")
    return img


# --------------------------------------------------------------------------------------------------------
# resize (torch CPU _upsample_bilinear2d_aa, float32)
# --------------------------------------------------------------------------------------------------------


#: torch CPU kernel flavours whose float32 accumulation :func:`resize_bilinear_antialias` can replay.
#: "avx2": ATen's AVX2 build (what ``torch.backends.cpu.get_cpu_capability()`` reports on most x86 hosts);
#: GCC vectorises the tap products 4 at a time and contracts the leftover taps into FMAs.
#: "default": the portable build (``ATEN_CPU_CAPABILITY=default``), plain multiply-then-add.
KERNELS: tuple[str, ...] = ("avx2", "default")


def _aa_linear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and float32 weights ``(out_size, taps)`` plus window sizes, exactly as torch does.

    Mirrors ``HelperInterpBase::_compute_indices_min_size_weights_aa`` with ``scalar_t = float``: every
    C++ implicit promotion (float * double -> double, stored back to float) is replayed so that window
    bounds and weights are bitwise identical. Taps past a pixel's window get weight 0 and a clamped
    in-range index, which leaves the float32 accumulator unchanged (x + t * 0 == x).
    """
    f32, f64 = np.float32, np.float64
    scale = f32(in_size) / f32(out_size)  # area_pixel_compute_scale<float>, no scale_factor given
    if scale >= 1.0:
        support = f32(1.0 * f64(scale))  # (interp_size * 0.5) * scale, interp_size = 2
        invscale = f32(1.0 / f64(scale))
    else:
        support = f32(1.0)
        invscale = f32(1.0)
    taps = int(math.ceil(support)) * 2 + 1

    i = np.arange(out_size, dtype=f64)
    center = (f64(scale) * (i + 0.5)).astype(f32)
    xmin = np.trunc((center - support).astype(f64) + 0.5).astype(np.int64)
    xmin = np.maximum(xmin, 0)
    xmax = np.trunc((center + support).astype(f64) + 0.5).astype(np.int64)
    xsize = np.clip(np.minimum(xmax, in_size) - xmin, 0, taps)

    j = np.arange(taps, dtype=np.int64)
    pos = xmin[:, None] + j[None, :]  # (out, taps), int64 j + xmin
    x = ((pos.astype(f32) - center[:, None]).astype(f64) + 0.5) * f64(invscale)
    x = np.abs(x.astype(f32))
    w = np.where(x < 1.0, (1.0 - x.astype(f64)).astype(f32), f32(0.0)).astype(f32)
    w[j[None, :] >= xsize[:, None]] = 0.0

    total = np.zeros(out_size, dtype=f32)
    for k in range(taps):  # sequential float32 sum, as in the C++ loop
        total += w[:, k]
    nz = total != 0.0
    w[nz] = w[nz] / total[nz, None]

    idx = np.minimum(pos, in_size - 1)
    return idx, w, xsize


_F32_HALF_ULP_BITS = np.int64(1 << 28)  # low float64 mantissa bits of an exact float32 rounding midpoint
_F32_LOW_MASK = np.int64((1 << 29) - 1)
_BLOCK_ELEMS = 1 << 16  # output elements per block in _resample (float64 temporaries: 512 KiB each)


def _fma_taps(
    acc: np.ndarray, taps: list[tuple[np.ndarray, np.ndarray]], check_midpoint: bool, check_tiny: bool
) -> np.ndarray:
    """``acc = fma(t, w, acc)`` for each ``(t, w)`` in order, each rounded to float32 (numpy has no fma).

    ``t * w`` is exact in float64, so ``float32(float64(t * w) + acc)`` is the fma unless the float64
    sum was itself rounded and landed exactly on a float32 midpoint (or in float32's subnormal range):
    such candidates get a TwoSum error term and round-to-odd, so the final rounding is a single one.
    Callers that can prove the float64 sum exact pass ``check_midpoint=False``.
    """
    acc64 = acc.astype(np.float64)
    s = np.empty_like(acc64)
    if check_midpoint:
        low = np.empty(acc64.shape, dtype=np.int64)
        risky = np.empty(acc64.shape, dtype=bool)
    out = acc
    for n, (t, w) in enumerate(taps):
        w64 = w.astype(np.float64)
        np.multiply(t, w64, out=s)
        np.add(s, acc64, out=s)
        if check_midpoint:
            np.bitwise_and(s.view(np.int64), _F32_LOW_MASK, out=low)
            np.equal(low, _F32_HALF_ULP_BITS, out=risky)
            if check_tiny:
                risky |= np.abs(s) < 2.0**-125
            if risky.any():
                r = np.nonzero(risky)
                pr = t[r].astype(np.float64) * np.broadcast_to(w64, s.shape)[r]
                cr, sr = acc64[r], s[r]
                bb = sr - pr
                err = (pr - (sr - bb)) + (cr - bb)
                fix = (err != 0.0) & ((sr.view(np.int64) & 1) == 0)
                s[r] = np.where(fix, np.nextafter(sr, sr + err), sr)
        out = s.astype(np.float32)
        if n + 1 < len(taps):
            acc64[...] = out
    return out


def _resample(
    src: np.ndarray, axis: int, out_size: int, kernel: str, *, uint8_values: bool, check_tiny: bool
) -> np.ndarray:
    """One separable pass of torch's kernel along ``axis`` of a float32 array.

    torch: ``out = t[0] * w[0]; for j in 1..xsize-1: out += t[j] * w[j]`` in float32. In the AVX2 build
    GCC vectorises the products 4 taps at a time (multiply, then in-order adds) and contracts the
    ``(xsize - 1) % 4`` leftover taps into FMAs (found empirically and verified against torch). Output
    pixels are grouped by window size so all taps of a group share one rounding mode.

    ``uint8_values``: ``src`` holds integers in [0, 255]; then every fma's float64 sum is exact when the
    smallest weight is >= 2**-22 (all bits lie within 2**7 .. 2**-45), and the midpoint check is skipped.
    """
    idx, w, xsize = _aa_linear_weights(src.shape[axis], out_size)
    check_midpoint = not (uint8_values and w.min(where=w > 0, initial=1.0) >= 2.0**-22)
    wshape = [1] * src.ndim
    wshape[axis] = -1
    out_shape = list(src.shape)
    out_shape[axis] = out_size
    out = np.empty(out_shape, dtype=np.float32)
    # Work on blocks of output positions small enough to stay in cache: the fma emulation is ~10 numpy
    # passes per tap, which would otherwise all stream through main memory.
    other = max(1, src.size // src.shape[axis])
    block = max(1, _BLOCK_ELEMS // other)
    for size in (int(g) for g in np.unique(xsize)):
        n_plain = 4 * ((size - 1) // 4) if kernel == "avx2" else size - 1
        group = np.nonzero(xsize == size)[0]
        for start in range(0, len(group), block):
            sel = group[start : start + block]

            def tap(k: int, sel: np.ndarray = sel) -> np.ndarray:
                return np.take(src, idx[sel, k], axis=axis)

            def weight(k: int, sel: np.ndarray = sel) -> np.ndarray:
                return w[sel, k].reshape(wshape)

            acc = tap(0)
            acc *= weight(0)
            for k in range(1, n_plain + 1):
                t = tap(k)
                t *= weight(k)
                acc += t
            if size - 1 > n_plain:
                fused = [(tap(k), weight(k)) for k in range(n_plain + 1, size)]
                acc = _fma_taps(acc, fused, check_midpoint, check_tiny)
            where: list[slice | np.ndarray] = [slice(None)] * src.ndim
            where[axis] = sel
            out[tuple(where)] = acc
    return out


def _resize_planar(
    x: np.ndarray, out_h: int, out_w: int, kernel: str, *, uint8_values: bool, check_tiny: bool
) -> np.ndarray:
    """Resize a contiguous float32 ``(C, H, W)`` array: width pass first, then height, like torch."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    h, w = x.shape[1:]
    if w != out_w:
        x = _resample(x, 2, out_w, kernel, uint8_values=uint8_values, check_tiny=check_tiny)
        uint8_values = False
    if h != out_h:
        x = _resample(x, 1, out_h, kernel, uint8_values=uint8_values, check_tiny=check_tiny)
    return x


def resize_bilinear_antialias(img: np.ndarray, out_h: int, out_w: int, kernel: str = "avx2") -> np.ndarray:
    """Resize a float32 ``(H, W)`` or ``(H, W, C)`` image like torch's CPU antialiased bilinear.

    Equals ``F.interpolate(x, (out_h, out_w), mode="bilinear", align_corners=False, antialias=True)``
    on float32 CPU tensors bitwise: horizontal pass first, then vertical, each skipped when that size is
    unchanged, float32 arithmetic in torch's tap order. ``kernel`` picks which ATen CPU build to replay
    (see :data:`KERNELS`); bitwise equality is what keeps a later rounding to uint8 identical.

    One deliberate difference: for ``out_w == 1`` with a height change, torch (<= 2.14 at least) gives
    every output row the weights of row 0 (its vertical loop assumes they are constant along the inner
    dimension); this function returns the correct resize there instead.
    """
    img = np.asarray(img)
    if img.dtype != np.float32:
        raise TypeError(f"resize_bilinear_antialias expects float32, got dtype {img.dtype}")
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {img.shape}")
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be positive, got {(out_h, out_w)}")
    hwc = img[:, :, None] if img.ndim == 2 else img
    planar = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    out = _resize_planar(planar, out_h, out_w, kernel, uint8_values=False, check_tiny=True)
    out = np.ascontiguousarray(out.transpose(1, 2, 0))
    return out[:, :, 0] if img.ndim == 2 else out


def resized_output_size(h: int, w: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """``(new_h, new_w)`` for resizing the shorter side to ``size`` (torchvision's rule, incl. max_size)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None:
        if max_size <= size:
            raise ValueError(f"max_size = {max_size} must be strictly greater than size = {size}")
        if new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w


def resize_uint8(img: np.ndarray, size: int, max_size: int | None = None, kernel: str = "avx2") -> np.ndarray:
    """Shorter-side resize of a uint8 HWC image as ``torchvision F.resize(..., antialias=True)`` does.

    float32 resize then round-half-to-even and cast back to uint8 (torchvision's ``_cast_squeeze_out``).
    """
    h, w = img.shape[:2]
    new_h, new_w = resized_output_size(h, w, size, max_size)
    if (new_h, new_w) == (h, w):
        return img
    planar = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)
    # uint8 inputs keep every partial sum at 0 or >= 2**-72: no subnormal fma corner case
    out = _resize_planar(planar, new_h, new_w, kernel, uint8_values=True, check_tiny=False)
    np.round(out, out=out)  # torch.round: half to even, like numpy
    np.clip(out, 0, 255, out=out)  # no-op for a convex filter; guards the cast
    return out.astype(np.uint8).transpose(1, 2, 0)


# --------------------------------------------------------------------------------------------------------
# crop / normalize
# --------------------------------------------------------------------------------------------------------


def center_crop(img: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """torchvision ``F.center_crop`` on HWC: zero-pad when smaller, offsets ``int(round((H - c) / 2))``."""
    h, w = img.shape[:2]
    if crop_w > w or crop_h > h:
        pad_l = (crop_w - w) // 2 if crop_w > w else 0
        pad_t = (crop_h - h) // 2 if crop_h > h else 0
        pad_r = (crop_w - w + 1) // 2 if crop_w > w else 0
        pad_b = (crop_h - h + 1) // 2 if crop_h > h else 0
        pads = [(pad_t, pad_b), (pad_l, pad_r)] + [(0, 0)] * (img.ndim - 2)
        img = np.pad(img, pads, mode="constant", constant_values=0)
        h, w = img.shape[:2]
        if (h, w) == (crop_h, crop_w):
            return img
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img[top : top + crop_h, left : left + crop_w]


def _normalize_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(256, C) float32 table of ``(v / 255 - mean) / std`` computed in float32 like torch."""
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    if m.shape != s.shape or m.ndim != 1:
        raise ValueError(f"mean and std must be 1-D and the same length, got {m.shape} and {s.shape}")
    if np.any(s == 0):
        raise ValueError("std must be non-zero")
    v = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
    return ((v - m[None, :]) / s[None, :]).astype(np.float32)


def normalize_uint8(
    img: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """uint8 HWC -> float32 HWC ``(x / 255 - mean) / std`` (convert_image_dtype + normalize)."""
    lut = _normalize_lut(mean, std)
    if img.shape[-1] != lut.shape[1]:
        raise ValueError(f"image has {img.shape[-1]} channels but mean/std have {lut.shape[1]}")
    return lut[img, np.arange(lut.shape[1])]


# --------------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------------


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


@dataclass(frozen=True)
class ClassificationPreset:
    """torchvision ``ImageClassification`` (bilinear, antialias=True): uint8 HWC -> float32 HWC."""

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    kernel: str = "avx2"

    def __post_init__(self) -> None:
        _check_kernel(self.kernel)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        x = as_rgb_uint8(img)
        x = resize_uint8(x, self.resize_size, kernel=self.kernel)
        x = center_crop(x, self.crop_size, self.crop_size)
        return normalize_uint8(x, self.mean, self.std)


@dataclass(frozen=True)
class SegmentationPreset:
    """torchvision ``SemanticSegmentation`` (bilinear, antialias=True, no crop); None skips the resize."""

    resize_size: int | None = 520
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    kernel: str = "avx2"

    def __post_init__(self) -> None:
        _check_kernel(self.kernel)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        x = as_rgb_uint8(img)
        if self.resize_size is not None:
            x = resize_uint8(x, self.resize_size, kernel=self.kernel)
        return normalize_uint8(x, self.mean, self.std)


def classification_preset(
    resize_size: int = 256,
    crop_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    kernel: str = "avx2",
) -> Callable[[np.ndarray], np.ndarray]:
    """Callable matching ``ImageClassification(crop_size, resize_size)``; uint8 HWC -> float32 HWC."""
    return ClassificationPreset(crop_size, resize_size, tuple(mean), tuple(std), kernel)


def segmentation_preset(
    resize_size: int | None = 520,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    kernel: str = "avx2",
) -> Callable[[np.ndarray], np.ndarray]:
    """Callable matching ``SemanticSegmentation(resize_size)``; uint8 HWC -> float32 HWC."""
    return SegmentationPreset(resize_size, tuple(mean), tuple(std), kernel)


#: ``weights.transforms()`` of the torchvision checkpoints this project ports, keyed "<builder>.<WEIGHTS>".
EVAL_PRESETS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mobilenet_v3_large.IMAGENET1K_V1": classification_preset(resize_size=256, crop_size=224),
    "mobilenet_v3_large.IMAGENET1K_V2": classification_preset(resize_size=232, crop_size=224),
    "mobilenet_v3_small.IMAGENET1K_V1": classification_preset(resize_size=256, crop_size=224),
    "lraspp_mobilenet_v3_large.COCO_WITH_VOC_LABELS_V1": segmentation_preset(resize_size=520),
    "deeplabv3_mobilenet_v3_large.COCO_WITH_VOC_LABELS_V1": segmentation_preset(resize_size=520),
}


def preprocess_batch(
    images: Sequence[np.ndarray], preset: str | Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Apply a preset (callable or :data:`EVAL_PRESETS` key) to each image and stack to NHWC float32.

    All outputs must share a shape (always true for classification; segmentation needs same-size inputs).
    """
    if isinstance(preset, str):
        if preset not in EVAL_PRESETS:
            raise KeyError(f"unknown preset {preset!r}; known: {sorted(EVAL_PRESETS)}")
        fn = EVAL_PRESETS[preset]
    else:
        fn = preset
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        # Iterating one image would treat each of its pixel rows as an image.
        raise ValueError(
            f"preprocess_batch takes a list of images (or an (N, H, W, C) array), got one array of shape "
            f"{images.shape}: pass [image]"
        )
    outs = [fn(img) for img in images]
    if not outs:
        raise ValueError("preprocess_batch got no images")
    shapes = {o.shape for o in outs}
    if len(shapes) != 1:
        raise ValueError(f"preprocessed images have different shapes {sorted(shapes)}; cannot stack to NHWC")
    return np.stack(outs, axis=0)
