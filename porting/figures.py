"""Side-by-side figures of torchvision's and mbv3_jax's predictions (PNG via Pillow)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def voc_palette(num_classes: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (class -> RGB), the one segmentation masks are usually shown in."""
    palette = np.zeros((num_classes, 3), np.uint8)
    for c in range(num_classes):
        r = g = b = 0
        label = c
        for bit in range(8):
            r |= ((label >> 0) & 1) << (7 - bit)
            g |= ((label >> 1) & 1) << (7 - bit)
            b |= ((label >> 2) & 1) << (7 - bit)
            label >>= 3
        palette[c] = (r, g, b)
    return palette


def _titled(panel: Image.Image, title: str) -> Image.Image:
    out = Image.new("RGB", (panel.width, panel.height + 22), "white")
    out.paste(panel, (0, 22))
    ImageDraw.Draw(out).text((6, 5), title, fill="black")
    return out


def _side_by_side(panels: list[Image.Image], title: str, gap: int = 8) -> Image.Image:
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    figure = Image.new("RGB", (width, max(p.height for p in panels) + (24 if title else 0)), "white")
    x, y = 0, 24 if title else 0
    for p in panels:
        figure.paste(p, (x, y))
        x += p.width + gap
    if title:
        ImageDraw.Draw(figure).text((6, 6), title, fill="black")
    return figure


def segmentation_figure(
    photo: np.ndarray, ref_mask: np.ndarray, got_mask: np.ndarray, title: str = ""
) -> Image.Image:
    """photo | torchvision mask | JAX mask | difference (red where the argmax classes differ)."""
    if ref_mask.shape != got_mask.shape:
        raise ValueError(f"mask shapes differ: {ref_mask.shape} vs {got_mask.shape}")
    h, w = ref_mask.shape
    palette = voc_palette()
    differ = ref_mask != got_mask
    diff = np.full((h, w, 3), 255, np.uint8)
    diff[differ] = (255, 0, 0)
    n_diff = int(differ.sum())
    panels = [
        _titled(Image.fromarray(photo).resize((w, h), Image.BILINEAR), "photo"),
        _titled(Image.fromarray(palette[ref_mask % 256]), "torchvision"),
        _titled(Image.fromarray(palette[got_mask % 256]), "mbv3_jax"),
        _titled(Image.fromarray(diff), f"differ: {n_diff} of {h * w} px ({100 * n_diff / (h * w):.4f}%)"),
    ]
    return _side_by_side(panels, title)


def _draw_detections(photo: np.ndarray, dets: dict[str, np.ndarray], title: str, top: int) -> Image.Image:
    image = Image.fromarray(photo).convert("RGB")
    draw = ImageDraw.Draw(image)
    palette = voc_palette()
    for box, score, label in list(zip(dets["boxes"], dets["scores"], dets["labels"], strict=True))[:top]:
        colour = tuple(int(c) for c in palette[1 + int(label) % 255])
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        draw.text((x1 + 3, y1 + 2), f"{int(label)}:{float(score):.3f}", fill=colour)
    return _titled(image, f"{title}: {len(dets['boxes'])} detections (top {top} drawn)")


def detection_figure(
    photo: np.ndarray, ref: dict[str, np.ndarray], got: dict[str, np.ndarray], title: str = "", top: int = 15
) -> Image.Image:
    """photo with torchvision's boxes | photo with mbv3_jax's boxes (label:score, top ``top``)."""
    panels = [_draw_detections(photo, ref, "torchvision", top), _draw_detections(photo, got, "mbv3_jax", top)]
    return _side_by_side(panels, title)
