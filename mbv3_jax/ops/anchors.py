"""Anchor (prior) boxes of torchvision's detectors, computed on the host with numpy float32.

Anchors depend only on static shapes (the padded batch size and the feature-map sizes), so they are
built once per input shape outside the compiled step and passed in as constants. numpy's float32
``sqrt``, ``/``, ``*``, ``+`` and ``round`` are IEEE-exact and evaluate the same expressions as
torchvision's, so the boxes are bit-identical.

- ``AnchorGenerator`` mirrors ``torchvision.models.detection.anchor_utils.AnchorGenerator``
  (Faster R-CNN's RPN).
- ``DefaultBoxGenerator`` mirrors ``torchvision.models.detection.anchor_utils.DefaultBoxGenerator``
  (SSD / SSDlite).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["AnchorGenerator", "DefaultBoxGenerator"]

_F32 = np.float32


class AnchorGenerator:
    """Anchors for a set of feature maps, as torchvision's ``AnchorGenerator``.

    ``sizes[i]`` and ``aspect_ratios[i]`` belong to feature map ``i`` (aspect ratio = h / w). Cell
    anchors: ``h_ratio = sqrt(ar)``, ``w_ratio = 1 / h_ratio``, ``ws = w_ratio * size`` (ratio-major,
    then size), ``round([-ws, -hs, ws, hs] / 2)`` with round-half-to-even, all float32.
    Strides: ``padded_image_size // feature_size`` per axis (integer division, so e.g. 800 // 13 = 61;
    not ``ceil`` and not the nominal stride). Order: feature map, then location (row-major), then
    cell anchor.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[int]] | Sequence[int] = ((128, 256, 512),),
        aspect_ratios: Sequence[Sequence[float]] | Sequence[float] = ((0.5, 1.0, 2.0),),
    ) -> None:
        # torchvision's normalisation of flat arguments.
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (aspect_ratios,) * len(sizes)
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(a) for a in aspect_ratios)
        self.cell_anchors = [
            self.generate_anchors(s, a) for s, a in zip(self.sizes, self.aspect_ratios, strict=True)
        ]

    @staticmethod
    def generate_anchors(scales: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
        """Zero-centred anchors ``(len(ratios) * len(scales), 4)`` float32."""
        scales_ = np.asarray(scales, _F32)
        ratios = np.asarray(aspect_ratios, _F32)
        h_ratios = np.sqrt(ratios)
        w_ratios = _F32(1) / h_ratios
        ws = (w_ratios[:, None] * scales_[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales_[None, :]).reshape(-1)
        base = np.stack([-ws, -hs, ws, hs], axis=1) / _F32(2)
        return np.round(base).astype(_F32)

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios, strict=False)]

    def strides(
        self, image_hw: Sequence[int], feature_map_hws: Sequence[Sequence[int]]
    ) -> list[tuple[int, int]]:
        """``(image_h // grid_h, image_w // grid_w)`` per feature map (torchvision's int64 division)."""
        return [(int(image_hw[0]) // int(g[0]), int(image_hw[1]) // int(g[1])) for g in feature_map_hws]

    def __call__(self, image_hw: Sequence[int], feature_map_hws: Sequence[Sequence[int]]) -> np.ndarray:
        """Anchors ``(sum_i H_i * W_i * A_i, 4)`` float32 for one image of the padded batch.

        Args:
            image_hw: the padded batch's spatial size (``ImageList.tensors.shape[-2:]``).
            feature_map_hws: ``(H_i, W_i)`` of each feature map, in the RPN's order.

        torchvision returns one copy per image; all are equal.
        """
        if len(feature_map_hws) != len(self.cell_anchors):
            raise ValueError(
                f"{len(feature_map_hws)} feature maps but anchors are configured for "
                f"{len(self.cell_anchors)}: sizes / aspect_ratios need one entry per feature map"
            )
        out = []
        for (gh, gw), (sh, sw), base in zip(
            feature_map_hws, self.strides(image_hw, feature_map_hws), self.cell_anchors, strict=True
        ):
            # int32 shifts (arange(int32) * int64 scalar stays int32 in torch), added to float32 anchors.
            shifts_x = np.arange(gw, dtype=np.int32) * np.int32(sw)
            shifts_y = np.arange(gh, dtype=np.int32) * np.int32(sh)
            shift_y, shift_x = np.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x = shift_x.reshape(-1)
            shift_y = shift_y.reshape(-1)
            shifts = np.stack((shift_x, shift_y, shift_x, shift_y), axis=1).astype(_F32)
            out.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
        return np.concatenate(out, axis=0) if out else np.zeros((0, 4), _F32)


class DefaultBoxGenerator:
    """SSD default boxes, as torchvision's ``DefaultBoxGenerator``; output in pixel xyxy.

    Scales: ``min_ratio + (max_ratio - min_ratio) * k / (m - 1)`` (Python double) plus 1.0; per map
    the (w, h) pairs ``(s_k, s_k)``, ``(s'_k, s'_k)`` with ``s'_k = sqrt(s_k * s_{k+1})``, then for each
    aspect ratio ``(s_k * sqrt(ar), s_k / sqrt(ar))`` and its transpose, rounded to float32 and
    clipped to [0, 1] when ``clip``. Centres ``(arange(f) + 0.5) / f`` in float32 (``/ (size / step)``
    when ``steps`` is given). Then ``(c -/+ 0.5 * wh) * (image_w, image_h)``. SSDlite320: aspect ratios
    ``[[2, 3]] * 6``, min 0.2, max 0.95, maps 20, 10, 5, 3, 2, 1 -> 3234 boxes.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[Sequence[int]],
        min_ratio: float = 0.15,
        max_ratio: float = 0.9,
        scales: Sequence[float] | None = None,
        steps: Sequence[int] | None = None,
        clip: bool = True,
    ) -> None:
        if steps is not None and len(aspect_ratios) != len(steps):
            raise ValueError("aspect_ratios and steps should have the same length")
        self.aspect_ratios = [list(a) for a in aspect_ratios]
        self.steps = None if steps is None else list(steps)
        self.clip = clip
        num_outputs = len(aspect_ratios)
        if scales is None:
            if num_outputs > 1:
                range_ratio = max_ratio - min_ratio
                self.scales = [min_ratio + range_ratio * k / (num_outputs - 1.0) for k in range(num_outputs)]
                self.scales.append(1.0)
            else:
                self.scales = [min_ratio, max_ratio]
        else:
            self.scales = list(scales)
        self._wh_pairs = self._generate_wh_pairs(num_outputs)

    def _generate_wh_pairs(self, num_outputs: int) -> list[np.ndarray]:
        # Python doubles (math.sqrt), rounded to float32 only at the end, as torch.as_tensor does.
        pairs = []
        for k in range(num_outputs):
            s_k = self.scales[k]
            s_prime_k = math.sqrt(self.scales[k] * self.scales[k + 1])
            wh = [[s_k, s_k], [s_prime_k, s_prime_k]]
            for ar in self.aspect_ratios[k]:
                sq_ar = math.sqrt(ar)
                w = self.scales[k] * sq_ar
                h = self.scales[k] / sq_ar
                wh.extend([[w, h], [h, w]])
            pairs.append(np.asarray(wh, _F32))
        return pairs

    def num_anchors_per_location(self) -> list[int]:
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def default_boxes_cxcywh(
        self, image_hw: Sequence[int], feature_map_hws: Sequence[Sequence[int]]
    ) -> np.ndarray:
        """torchvision's ``_grid_default_boxes``: normalised ``(cx, cy, w, h)`` float32."""
        boxes = []
        for k, (fh, fw) in enumerate(feature_map_hws):
            if self.steps is not None:
                # torch: float32 tensor / Python double -> the divisor is rounded to float32.
                x_f = _F32(image_hw[1] / self.steps[k])
                y_f = _F32(image_hw[0] / self.steps[k])
            else:
                y_f, x_f = _F32(fh), _F32(fw)
            shifts_x = (np.arange(fw, dtype=_F32) + _F32(0.5)) / x_f
            shifts_y = (np.arange(fh, dtype=_F32) + _F32(0.5)) / y_f
            shift_y, shift_x = np.meshgrid(shifts_y, shifts_x, indexing="ij")
            wh = np.clip(self._wh_pairs[k], 0, 1) if self.clip else self._wh_pairs[k]
            n_pairs = wh.shape[0]
            centres = np.stack((shift_x.reshape(-1), shift_y.reshape(-1)), axis=1)
            centres = np.repeat(centres, n_pairs, axis=0)  # per location, one row per (w, h) pair
            boxes.append(np.concatenate([centres, np.tile(wh, (fh * fw, 1))], axis=1))
        return np.concatenate(boxes, axis=0).astype(_F32) if boxes else np.zeros((0, 4), _F32)

    def __call__(
        self, image_hw: Sequence[int], feature_map_hws: Sequence[Sequence[int]], dtype: Any = _F32
    ) -> np.ndarray:
        """Default boxes ``(sum_k H_k * W_k * A_k, 4)`` xyxy in pixels of the padded image, in ``dtype``
        (the features'; torchvision converts its float32 centres and sizes to it before going to xyxy)."""
        d = self.default_boxes_cxcywh(image_hw, feature_map_hws).astype(dtype)
        size = np.asarray([image_hw[1], image_hw[0]], dtype)
        half = np.dtype(dtype).type(0.5) * d[:, 2:]
        return np.concatenate([(d[:, :2] - half) * size, (d[:, :2] + half) * size], axis=1)
