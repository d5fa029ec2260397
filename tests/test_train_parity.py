"""One training step of ``train.trainer`` equals torchvision's (PyTorch RMSprop, no augmentation, no dropout);
and one segmentation step (LR-ASPP, torch SGD) and one detection step (SSDlite, torch SGD) in float64.

The model is torchvision's ``MobileNetV3`` class with MobileNetV3-Small's table cut after 4 blocks (every
block kind: SE, ReLU/hardswish, 3x3/5x5, strided, residual; then the last conv and the classifier), random
weights with BatchNorm statistics calibrated on the digits, the same 16 real digits on both sides. torch:
``CrossEntropyLoss(label_smoothing=0.1)``, ``RMSprop(lr, alpha=0.9, eps=0.0316, momentum=0.9,
weight_decay=1e-5)``, one ``step()``. JAX: the trainer's jitted step on a 1-device mesh.
"""

from __future__ import annotations

import numpy as np
from extras import require_torch
from PIL import Image
from sklearn.datasets import load_digits

# ruff: noqa: E402
require_torch()  # the optional "torch" extra: without it this file skips whole, before the imports below

import jax.numpy as jnp
import torch

from mbv3_jax.transforms import normalize_uint8
from porting.calibration import calibrated_random_weights_
from porting.mapping import convert_to_jax, format_path, load_into
from porting.rules import rules_for
from porting.torchvision_io import build_torchvision_model
from train import sharding, trainer
from train.config import ModelConfig, OptimConfig

TOL = 1e-5  # max |a - b| <= TOL * max |torch| per tensor
FLOAT64_TOL = 1e-9  # the same, both sides in float64
BATCH = 16


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    images = []
    for img in digits.images[:n]:
        gray = Image.fromarray(np.round(img * (255 / 16)).astype(np.uint8))
        rgb = np.asarray(gray.resize((32, 32), Image.BILINEAR).convert("RGB"))
        images.append(normalize_uint8(rgb, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    return np.stack(images).astype(np.float32), digits.target[:n].astype(np.int32)


def _get(tree: dict, path: tuple) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


def _compare_step(after_t: dict, before: dict, new: dict, tol: float) -> tuple[float, float]:
    """Assert every tensor after the step (torch's, by JAX path) within ``tol`` x max|torch| of the
    trainer's (integer buffers equal); returns the worst relative error of the parameters / BatchNorm
    statistics and of the parameters' update (the step's change, ``after - before``)."""
    worst_param, worst_update = 0.0, 0.0
    for path, ref in after_t.items():
        group = "params" if path[-1] in ("kernel", "bias", "scale") else "batch_stats"
        got = _get(new[group], path)
        err = float(np.max(np.abs(got - ref)))
        if ref.dtype.kind != "f":
            assert err == 0, format_path(path)  # num_batches_tracked
            continue
        rel = err / (float(np.max(np.abs(ref))) or 1.0)
        assert rel <= tol, f"{format_path(path)}: {rel:.2e}"
        worst_param = max(worst_param, rel)
        if group == "params":
            update = ref - before.get(path, ref)
            worst_update = max(worst_update, err / (float(np.max(np.abs(update))) or 1.0))
    return worst_param, worst_update


def test_one_step_matches_torchvision():
    images, labels = _digits(BATCH)
    model = trainer.build_model(ModelConfig(name="mobilenet_v3_small", blocks=4, dropout=0.0), 10)
    torch.manual_seed(0)
    tv = build_torchvision_model(model.architecture)
    calibrated_random_weights_(tv, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), seed=1)
    rules = rules_for(model.architecture["builder"])
    load_into(model, convert_to_jax(tv.state_dict(), model, rules))

    optim = OptimConfig(label_smoothing=0.1)  # torchvision's recipe: lr 0.064 per 1024 images
    schedule = trainer.learning_rate(optim, BATCH, steps_per_epoch=10, total_steps=10)
    lr = float(schedule(0))
    assert abs(lr - 0.064 * BATCH / 1024) < 1e-9

    # torch
    tv.train()
    opt = torch.optim.RMSprop(tv.parameters(), lr=lr, alpha=0.9, eps=0.0316, momentum=0.9, weight_decay=1e-5)
    x_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    loss_t = torch.nn.functional.cross_entropy(tv(x_t), torch.from_numpy(labels).long(), label_smoothing=0.1)
    opt.zero_grad()
    loss_t.backward()
    opt.step()
    after_t = convert_to_jax(tv.state_dict(), model, rules)

    # JAX: the trainer's step
    mesh = sharding.make_mesh()
    before = {p: np.asarray(v) for p, v in convert_to_jax(tv.state_dict(), model, rules).items()}
    steps = trainer.make_steps(
        model, trainer.make_optimizer(optim, schedule), schedule, mesh, label_smoothing=0.1
    )
    state = steps.init_state()
    state, out = steps.train_step(state, *sharding.global_batch(mesh, images, labels))
    new = sharding.to_host({"params": state["params"], "batch_stats": state["batch_stats"]})

    assert abs(float(out["loss"]) - loss_t.item()) <= TOL * abs(loss_t.item())
    worst_param, worst_update = _compare_step(after_t, before, new, TOL)
    print(f"one step vs torch: params/BN stats {worst_param:.2e} (max rel), updates {worst_update:.2e}")
    # Stronger than the parameters themselves: the step's change (lr * RMSProp direction) agrees too.
    assert worst_update <= TOL


def _sgd_step_pair(model, tv, optim: OptimConfig, task, torch_loss, images, targets, batch: int) -> tuple:
    """One torch SGD step of float64 ``tv`` (``torch_loss(tv)`` -> (total, parts)) and one trainer
    step of ``model`` (loaded from ``tv`` first) on ``images`` / ``targets``; asserts the losses and
    every tensor within FLOAT64_TOL and returns (trainer outputs, torch's parts, worst parameter /
    BatchNorm error, worst update error)."""
    rules = rules_for(model.architecture["builder"])
    load_into(model, convert_to_jax(tv.state_dict(), model, rules))
    before = {p: np.asarray(v) for p, v in convert_to_jax(tv.state_dict(), model, rules).items()}
    schedule = trainer.learning_rate(optim, batch, steps_per_epoch=10, total_steps=10)
    tv.train()
    opt = torch.optim.SGD(
        tv.parameters(), lr=float(schedule(0)), momentum=optim.momentum, weight_decay=optim.weight_decay
    )
    loss_t, parts = torch_loss(tv)
    opt.zero_grad()
    loss_t.backward()
    opt.step()
    after_t = convert_to_jax(tv.state_dict(), model, rules)

    mesh = sharding.make_mesh()
    steps = trainer.make_steps(model, trainer.make_optimizer(optim, schedule), schedule, mesh, task=task)
    state, out = steps.train_step(steps.init_state(), *sharding.global_batch(mesh, images, targets))
    new = sharding.to_host({"params": state["params"], "batch_stats": state["batch_stats"]})
    assert abs(float(out["loss"]) - loss_t.item()) <= FLOAT64_TOL * abs(loss_t.item())
    worst_param, worst_update = _compare_step(after_t, before, new, FLOAT64_TOL)
    assert worst_update <= FLOAT64_TOL
    return out, parts, loss_t.item(), worst_param, worst_update


def test_lraspp_one_step_matches_torchvision():
    """One SGD step of the trainer's segmentation task equals torchvision's LR-ASPP + torch's SGD
    (momentum 0.9, weight decay 1e-4 on every parameter, the shapes demo's recipe; cross-entropy
    ignoring 255) on two shapes images with a void band, both sides in float64 (fp32 gradients are
    ill-posed at hardswish's kinks: tests/test_classifier_parity.py): loss, parameters, BatchNorm
    statistics and the step's update per tensor within FLOAT64_TOL."""
    import jax

    from train.shapes_data import make_shapes
    from train.tasks import Segmentation

    samples = make_shapes("train", 2)
    images = np.stack(
        [normalize_uint8(s["image"], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) for s in samples]
    )
    masks = np.stack([s["mask"] for s in samples]).astype(np.int32)
    masks[:, :8] = 255  # a void band, ignored by the loss
    x_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with jax.enable_x64(True):
        cfg = ModelConfig(name="lraspp_mobilenet_v3_large", dtype="float64", param_dtype="float64")
        model = trainer.build_model(cfg, 4)
        torch.manual_seed(0)
        tv = build_torchvision_model(model.architecture)
        calibrated_random_weights_(tv, x_t, seed=1)
        optim = OptimConfig(optimizer="sgd", lr=0.02, reference_batch=16, momentum=0.9, weight_decay=1e-4)
        optim.schedule = "poly"
        masks_t = torch.from_numpy(masks).long()

        def torch_loss(tv):
            out = tv(x_t.double())["out"]
            return torch.nn.functional.cross_entropy(out, masks_t, ignore_index=255), None

        _, _, _, worst_param, worst_update = _sgd_step_pair(
            model, tv.double(), optim, Segmentation(4), torch_loss, images.astype(np.float64), masks, 2
        )
    print(
        f"LR-ASPP one SGD step vs torch (float64): params/BN stats {worst_param:.2e}, "
        f"updates {worst_update:.2e}"
    )


def test_ssdlite_one_step_matches_torchvision():
    """One SGD step of the trainer's detection task equals torchvision's SSDlite320 (its own losses:
    SSDMatcher, smooth-L1, 3:1 hard negative mining) + torch's SGD (momentum 0.9, weight decay 4e-5,
    the SSDlite recipe's) on two shapes images at 320 px with their boxes, both sides in float64: loss,
    parameters, BatchNorm statistics and the step's update per tensor within FLOAT64_TOL. torch gets
    the images in [0, 1] and runs its own transform (normalize; the 320 -> 320 resize is exact); the
    trainer gets them normalized, as its data pipeline hands them over."""
    import jax

    from porting.calibration import calibrated_ssd_
    from train.augment import resize_bilinear
    from train.coco_data import pad_targets
    from train.shapes_data import make_shapes
    from train.tasks import Detection

    samples = make_shapes("train", 2)
    scale = np.float32(320 / 128)
    x01 = np.stack([resize_bilinear(s["image"].astype(np.float32) / 255, 320, 320) for s in samples])
    x01 = x01.astype(np.float64)
    boxes = [s["boxes"] * scale for s in samples]
    targets_t = [
        {"boxes": torch.from_numpy(b).double(), "labels": torch.from_numpy(s["labels"]).long()}
        for b, s in zip(boxes, samples, strict=True)
    ]
    padded = [pad_targets(b, s["labels"], 8) for b, s in zip(boxes, samples, strict=True)]
    targets = {k: np.stack([p[i] for p in padded]) for i, k in enumerate(("boxes", "labels", "valid"))}
    x_t = torch.from_numpy(x01).permute(0, 3, 1, 2).contiguous()
    with jax.enable_x64(True):
        cfg = ModelConfig(name="ssdlite320_mobilenet_v3_large", dtype="float64", param_dtype="float64")
        model = trainer.build_model(cfg, 4)
        torch.manual_seed(0)
        tv = build_torchvision_model(model.architecture)
        calibrated_ssd_(tv, list(x_t.float()), seed=1)
        optim = OptimConfig(optimizer="sgd", lr=0.15, reference_batch=192, momentum=0.9, weight_decay=4e-5)
        optim.schedule = "constant"

        def torch_loss(tv):
            losses = tv(list(x_t), targets_t)
            return sum(losses.values()), losses

        normalized = (x01 - 0.5) / 0.5  # torchvision's normalize, the same float64 operations
        out, losses_t, loss_t, worst_param, worst_update = _sgd_step_pair(
            model, tv.double(), optim, Detection(4), torch_loss, normalized, targets, 2
        )
    assert abs(float(out["metric"]) - losses_t["bbox_regression"].item()) <= FLOAT64_TOL * loss_t
    print(
        f"SSDlite one SGD step vs torch (float64): params/BN stats {worst_param:.2e}, "
        f"updates {worst_update:.2e}"
    )


def test_fasterrcnn_320_one_step_matches_torchvision():
    """One SGD step of the trainer's detection task equals torchvision's Faster R-CNN 320 (its four
    losses) + torch's SGD (momentum 0.9, weight decay 1e-4, the detection recipe's) on two shapes
    images with their boxes, both sides in float64, the samplers large enough to take every candidate
    (so no random draw decides; torchvision's own arguments on both sides): loss, parameters,
    BatchNorm statistics and the step's update per tensor within FLOAT64_TOL. Both sides get
    torchvision's transformed batch (resized 128 -> 320 keeping the aspect ratio).

    torchvision's RPN makes its objectness labels float32 (``labels_per_image.to(torch.float32)``), so
    in a float64 model its objectness loss, and that loss's gradient, are float32 (measured: the total
    loss 2.6e-9 relative from the float64 one); the torch side here casts those labels to float64."""
    import jax

    from mbv3_jax.models import get_model
    from porting.calibration import calibrated_detector_
    from train.coco_data import pad_targets
    from train.shapes_data import make_shapes
    from train.tasks import Detection

    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    samplers = dict(
        rpn_batch_size_per_image=1_000_000,
        box_batch_size_per_image=1_000_000,
        box_positive_fraction=0.5,
        rpn_post_nms_top_n_train=300,
    )
    samples = make_shapes("train", 2)
    images_t = [torch.from_numpy(s["image"]).permute(2, 0, 1).double() / 255 for s in samples]
    targets_t = [
        {"boxes": torch.from_numpy(s["boxes"]).double(), "labels": torch.from_numpy(s["labels"]).long()}
        for s in samples
    ]
    with jax.enable_x64(True):
        model = get_model(name, num_classes=4, dtype=jnp.float64, param_dtype=jnp.float64, **samplers)
        torch.manual_seed(0)
        tv = build_torchvision_model(model.architecture)
        calibrated_detector_(tv, [x.float() for x in images_t], seed=1)
        tv = tv.double()
        assign = tv.rpn.assign_targets_to_anchors

        def float64_labels(anchors, targets):
            labels, matched_boxes = assign(anchors, targets)
            return [label.double() for label in labels], matched_boxes

        tv.rpn.assign_targets_to_anchors = float64_labels
        with torch.no_grad():
            image_list, resized = tv.transform(images_t, [dict(t) for t in targets_t])
        batch = image_list.tensors.permute(0, 2, 3, 1).numpy()
        padded = [pad_targets(t["boxes"].numpy(), t["labels"].numpy(), 8) for t in resized]
        targets = {k: np.stack([p[i] for p in padded]) for i, k in enumerate(("boxes", "labels", "valid"))}
        targets["boxes"] = targets["boxes"].astype(np.float64)
        targets["image_size"] = np.asarray(image_list.image_sizes, np.int32)
        assert batch.shape[1:3] == (320, 320)

        optim = OptimConfig(optimizer="sgd", lr=0.02, reference_batch=16, momentum=0.9, weight_decay=1e-4)
        optim.schedule = "constant"

        def torch_loss(tv):
            losses = tv(images_t, targets_t)
            return sum(losses.values()), losses

        task = Detection(4, keep_ratio=True)
        out, losses_t, loss_t, worst_param, worst_update = _sgd_step_pair(
            model, tv, optim, task, torch_loss, batch, targets, 2
        )
    assert abs(float(out["metric"]) - losses_t["loss_box_reg"].item()) <= FLOAT64_TOL * loss_t
    print(
        f"Faster R-CNN 320 one SGD step vs torch (float64): params/BN stats {worst_param:.2e}, "
        f"updates {worst_update:.2e}"
    )
