"""Realistic random weights for parity checks, made offline.

torchvision's default init gives MobileNetV3 logits near 1e-10, which proves nothing. Here every
conv / linear / BatchNorm affine parameter is drawn at a scale that keeps activations O(1), and
then every BatchNorm's running statistics are *calibrated* on real photos (those scikit-image
ships), so that eval-mode activations look like a trained network's: normalised, with real
spatial structure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

# Colour photos that scikit-image ships inside its wheel (no download).
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
    "retina",
)


# Gains of the SSD heads' last convs at the random scale (see calibrated_ssd_).
SSD_CLS_GAIN = 1.0
SSD_BOX_GAIN = 0.2


def sample_photos(names: Sequence[str] = PHOTO_NAMES) -> list[np.ndarray]:
    """uint8 HWC RGB photos from ``skimage.data``."""
    import skimage.data

    photos = []
    for name in names:
        image = getattr(skimage.data, name)()
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        photos.append(np.ascontiguousarray(image[..., :3]))
    return photos


def randomize_weights_(model: torch.nn.Module, seed: int = 0, conv_gain: float = 1.0) -> torch.nn.Module:
    """Draw every parameter of ``model`` in place at an activation-preserving scale."""
    g = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * std + mean)

    def uniform_(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * (hi - lo) + lo)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                normal_(module.weight, conv_gain * math.sqrt(2.0 / fan_in))
                if module.bias is not None:
                    normal_(module.bias, 0.5)
            elif (
                isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
                or type(module).__name__ == "FrozenBatchNorm2d"
            ):
                uniform_(module.weight, 0.5, 1.5)
                normal_(module.bias, 0.3)
    return model


def calibrate_batchnorm_(model: torch.nn.Module, batches: Sequence[torch.Tensor]) -> torch.nn.Module:
    """Set every BatchNorm's running statistics to the average over ``batches`` (train-mode passes).

    Uses torch's cumulative averaging (``momentum=None``); leaves the model in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
        m.num_batches_tracked.zero_()
    return model.eval()


def classification_inputs(
    photos: Sequence[np.ndarray], resize_size: int = 256, crop_size: int = 224
) -> torch.Tensor:
    """torchvision's own eval preset applied to the photos: float NCHW."""
    from torchvision.transforms._presets import ImageClassification

    preset = ImageClassification(crop_size=crop_size, resize_size=resize_size)
    return torch.stack([preset(torch.from_numpy(p).permute(2, 0, 1)) for p in photos])


def segmentation_inputs(photos: Sequence[np.ndarray], resize_size: int | None = 520) -> list[torch.Tensor]:
    """torchvision's ``SemanticSegmentation`` preset on each photo: one float NCHW tensor (N=1) each.

    The shorter side goes to ``resize_size``, so the photos keep their different sizes.
    """
    from torchvision.transforms._presets import SemanticSegmentation

    preset = SemanticSegmentation(resize_size=resize_size)
    return [preset(torch.from_numpy(p).permute(2, 0, 1))[None] for p in photos]


def resized_inputs(photos: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Every photo resized (bilinear, antialias) to exactly ``size`` = (H, W) and normalized: NCHW."""
    from torchvision.transforms import functional as F

    from mbv3_jax.transforms import IMAGENET_MEAN, IMAGENET_STD

    out = []
    for p in photos:
        x = F.resize(torch.from_numpy(p).permute(2, 0, 1), list(size), antialias=True)
        out.append(F.normalize(x.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD))
    return torch.stack(out)


def group_by_shape(images: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """Batch NCHW tensors of equal spatial size together: [(indices into images, batch), ...]."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(images):
        groups.setdefault(tuple(x.shape[1:]), []).append(i)
    return [(idx, torch.cat([images[i] for i in idx])) for idx in groups.values()]


def calibrated_random_weights_(
    model: torch.nn.Module, images_nchw: torch.Tensor | Sequence[torch.Tensor], seed: int = 0
) -> torch.nn.Module:
    """Randomize ``model`` and calibrate its BatchNorm statistics on the images and their mirrors.

    ``images_nchw`` is one batch or a list of batches (photos of different sizes); each batch is
    calibrated together with its mirror image, so every batch has at least two samples.
    """
    randomize_weights_(model, seed)
    batches = [images_nchw] if isinstance(images_nchw, torch.Tensor) else list(images_nchw)
    return calibrate_batchnorm_(model, [torch.cat([b, torch.flip(b, dims=[3])]) for b in batches])


def calibrate_norms_(module: torch.nn.Module, batches: Sequence[torch.Tensor]) -> torch.nn.Module:
    """``calibrate_batchnorm_``, also for FrozenBatchNorm2d layers: those are calibrated through a
    BatchNorm2d twin of ``module`` and get its statistics. Leaves ``module`` in eval mode."""
    frozen = [m for m in module.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    if not frozen:
        return calibrate_batchnorm_(module, batches)
    import copy

    twin = copy.deepcopy(module)
    for m in list(twin.modules()):
        for child_name, child in list(m.named_children()):
            if type(child).__name__ == "FrozenBatchNorm2d":
                bn = torch.nn.BatchNorm2d(child.weight.numel(), eps=child.eps)
                bn.weight.data.copy_(child.weight)
                bn.bias.data.copy_(child.bias)
                setattr(m, child_name, bn)
    calibrate_batchnorm_(twin, batches)
    twin_norms = [m for m in twin.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for f, b in zip(frozen, twin_norms, strict=True):
        f.running_mean.copy_(b.running_mean)
        f.running_var.copy_(b.running_var)
    return module.eval()


def calibrated_detector_(
    model: torch.nn.Module, images: Sequence[torch.Tensor], seed: int = 0
) -> torch.nn.Module:
    """Randomize a torchvision detector and calibrate its backbone BatchNorms on ``images``.

    ``images``: CHW float tensors in [0, 1] (the detector's own transform resizes and batches them;
    mirrors are added). Heads stay random at the activation-preserving scale, which spreads the
    class scores (parity tests check there are no ties). A FrozenBatchNorm2d model is calibrated
    through a BatchNorm2d twin and gets its statistics.
    """
    randomize_weights_(model, seed)
    with torch.no_grad():
        # Box regressions of a trained detector are small corrections (|dw| ~ 0.1-0.3); at the
        # random scale they would stretch boxes ~e^2x, far outside the image, where fp32 coordinates
        # lose the precision a parity test needs. Scores keep their random spread.
        # The class scores at the random scale saturate the softmax (p ~ 1 - 1e-5, where float32
        # ties appear); a third of it spreads them over (0.05, 0.95).
        for name, module in model.named_modules():
            if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                continue
            gain = 0.2 if name.endswith("bbox_pred") else 0.35 if name.endswith("cls_score") else None
            if gain is not None:
                module.weight.mul_(gain)
                module.bias.mul_(gain)
    model.eval()
    with torch.no_grad():
        batch, _ = model.transform([*images, *[torch.flip(x, dims=[2]) for x in images]])
    calibrate_norms_(model.backbone, [batch.tensors])
    return model.eval()


class _FeaturesAndHead(torch.nn.Module):
    """An SSD's backbone and head as one module (the part with BatchNorm), on a batch tensor."""

    def __init__(self, ssd: torch.nn.Module):
        super().__init__()
        self.backbone, self.head = ssd.backbone, ssd.head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(list(self.backbone(x).values()))


def calibrated_ssd_(
    model: torch.nn.Module,
    images: Sequence[torch.Tensor],
    seed: int = 0,
    cls_gain: float = SSD_CLS_GAIN,
    box_gain: float = SSD_BOX_GAIN,
) -> torch.nn.Module:
    """Randomize a torchvision SSD / SSDlite and calibrate every BatchNorm (backbone, extra blocks
    and the heads' depthwise convs) on ``images`` (CHW float in [0, 1], and their mirrors) through
    the model's own 320x320 transform.

    The heads' last convs are rescaled (as :func:`calibrated_detector_` does for Faster R-CNN's
    predictor): ``box_gain`` keeps the box codes small corrections of the default boxes, as a
    trained SSD's are (|code| median ~0.13); at ``cls_gain`` 1 the random scale already spreads the
    softmax scores over ~0.02-0.99 without saturating them (parity tests check that no two kept
    scores tie).
    """
    randomize_weights_(model, seed)
    with torch.no_grad():
        for name, module in model.head.named_modules():
            if isinstance(module, torch.nn.Conv2d) and name.endswith(".1") and "module_list" in name:
                gain = cls_gain if name.startswith("classification_head") else box_gain
                module.weight.mul_(gain)
                module.bias.mul_(gain)
    model.eval()
    with torch.no_grad():
        batch, _ = model.transform([*images, *[torch.flip(x, dims=[2]) for x in images]])
    calibrate_norms_(_FeaturesAndHead(model), [batch.tensors])
    return model.eval()


def calibrated_any_detector_(
    model: torch.nn.Module, images: Sequence[torch.Tensor], seed: int = 0
) -> torch.nn.Module:
    """The calibration that fits a torchvision detector: :func:`calibrated_ssd_` for SSD /
    SSDlite, :func:`calibrated_detector_` for Faster R-CNN."""
    from torchvision.models.detection.ssd import SSD

    if isinstance(model, SSD):
        return calibrated_ssd_(model, images, seed)
    return calibrated_detector_(model, images, seed)


# Inputs of these activations where the derivative jumps (torch's formulas; the port's custom JVPs
# take the same side at each kink).
_ACTIVATION_KINKS: dict[type, tuple[float, ...]] = {
    torch.nn.ReLU: (0.0,),
    torch.nn.ReLU6: (0.0, 6.0),
    torch.nn.Hardswish: (-3.0, 3.0),
    torch.nn.Hardsigmoid: (-3.0, 3.0),
}


def _activation_biases(model: torch.nn.Module) -> dict[torch.nn.Module, torch.nn.Parameter]:
    """Each activation module -> the bias added just before it (BatchNorm's, or the conv / linear's).

    Modules are visited in registration order, which for torchvision's blocks is the forward order;
    squeeze-excitation registers fc1 and fc2 before both of its activations, so it is special-cased.
    """
    found: dict[torch.nn.Module, torch.nn.Parameter] = {}
    last_bias = None
    for module in model.modules():
        if hasattr(module, "fc1") and hasattr(module, "scale_activation"):  # SqueezeExcitation
            found[module.activation] = module.fc1.bias
            found[module.scale_activation] = module.fc2.bias
        elif type(module) in _ACTIVATION_KINKS and module not in found and last_bias is not None:
            found[module] = last_bias
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.nn.Parameter):
            last_bias = bias
    return found


def _activation_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """(activation module, its input in float64) in execution order, for one train-mode forward
    that leaves the BatchNorm running statistics as they were."""
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    seen: list = []
    # Pre-hooks: an in-place ReLU overwrites its input.
    hooks = [
        m.register_forward_pre_hook(lambda m, i: seen.append((m, i[0].detach().double().clone())))
        for m in model.modules()
        if type(m) in _ACTIVATION_KINKS
    ]
    try:
        model.train()
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.load_state_dict(buffers, strict=False)
    return seen


def _kink_clearing_shifts(values: np.ndarray, kinks: tuple[float, ...], margin: float) -> np.ndarray:
    """Per channel (rows of ``values``), the smallest shift (0, +-2m, +-4m, ...) that leaves no
    value within ``margin`` of a kink."""
    shifts = np.zeros(len(values))
    for c, row in enumerate(values):
        for step in range(2001):
            shift = (step + 1) // 2 * (1 if step % 2 else -1) * 2 * margin
            if all(not np.any(np.abs(row + shift - k) < margin) for k in kinks):
                shifts[c] = shift
                break
        else:
            raise RuntimeError(f"no bias shift moves channel {c} off the activation kinks {kinks}")
    return shifts


def move_off_activation_kinks_(
    model32: torch.nn.Module, model64: torch.nn.Module, x: torch.Tensor, factor: float = 16.0
) -> float:
    """Shift biases so that, in a train-mode forward of ``x``, no activation input lies near a kink.

    An activation input within float32 rounding of a kink (ReLU's 0, hardswish's +-3) can fall on
    either side in a float32 run, and the derivative jumps there: the float32 gradients then differ
    from the float64 ones by O(1) in that element, for reasons no implementation controls (the side
    depends on the CPU's kernels). Here, layer by layer in execution order, each channel holding an
    input within ``factor`` x the layer's largest float32 error (``model32`` against its float64 copy
    ``model64``, measured) of a kink gets the smallest bias shift that moves all its inputs outside
    that margin (the bias just before an activation shifts its input exactly). ``model64`` must hold
    ``model32``'s parameters in float64; both get the same float32-representable biases.
    Returns the smallest distance of any activation input to a kink, in units of its layer's largest
    float32 error (>= ``factor``).
    """
    biases32, biases64 = _activation_biases(model32), _activation_biases(model64)
    worst, start = float("inf"), 0
    while True:
        inputs32 = _activation_inputs(model32, x.float())
        inputs64 = _activation_inputs(model64, x.double())
        if start == len(inputs64):
            return worst
        for position in range(start, len(inputs64)):
            (module32, w), (module64, v) = inputs32[position], inputs64[position]
            noise = float((v - w).abs().max()) or float(np.finfo(np.float32).eps)
            kinks = _ACTIVATION_KINKS[type(module64)]
            channels = v.transpose(0, 1).reshape(v.shape[1], -1).numpy()
            shifts = _kink_clearing_shifts(channels, kinks, factor * noise)
            moved = channels + shifts[:, None]
            worst = min(worst, min(float(np.min(np.abs(moved - k))) for k in kinks) / noise)
            start = position + 1
            if np.any(shifts):
                with torch.no_grad():
                    shifted = biases64[module64].double() + torch.from_numpy(shifts)
                    biases32[module32].copy_(shifted.float())
                    biases64[module64].copy_(biases32[module32].double())
                break  # everything downstream moved: measure again
