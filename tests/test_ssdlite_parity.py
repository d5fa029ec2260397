"""SSDlite320 MobileNetV3-Large vs torchvision on real photos: detections, train-mode losses,
porting both ways, and the NMS that its post-processing uses.

Calibrated random weights: every BatchNorm (backbone, extra blocks, heads) calibrated on the photos
through the model's own 320x320 transform; the box head scaled to trained-like corrections, the
class head at the random scale (scores spread over ~0.02-0.99, checked for ties). 4 photos of
different sizes and aspect ratios in one batch, fp32.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from extras import require_torch
from flax import nnx

# ruff: noqa: E402
require_torch()  # the optional "torch" extra: without it this file skips whole, before the imports below

import torch
import torchvision

import mbv3_jax
from mbv3_jax.ops.boxes import batched_nms_padded
from mbv3_jax.ops.top_first_nms import batched_nms_top_first
from porting import load_torchvision, to_torchvision
from porting.calibration import calibrated_ssd_, sample_photos
from porting.mapping import convert_to_jax, model_variables
from porting.parity import assert_close_tensors, count_params, match_detections, run_detection_parity
from porting.rules import rules_for
from porting.torchvision_io import build_torchvision_model

NAME = "ssdlite320_mobilenet_v3_large"
PHOTOS = ("astronaut", "chelsea", "rocket", "hubble_deep_field")  # 1:1, 3:2, 3:2 (other size), 8:7
MATCH_FRACTION = 0.99
LOSS_TOL = 1e-4
STATS_TOL = 1e-4
FEATURE_SIZES = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]  # the six maps at 320x320

_cache: dict = {}


@pytest.fixture(scope="module", autouse=True)
def torch_single_thread():
    """torch on one thread in this module: its OpenMP threads spin-wait, and with the second core
    busy (other jobs on this 2-core machine) 2 threads ran SSDlite 4-5x slower than 1 (measured).
    The torch side here is small; XLA's compilations dominate this module's time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def det_photos():
    photos = sample_photos(PHOTOS)
    return photos, [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in photos]


def calibrated_pair(det_photos):
    if "pair" not in _cache:
        torch.manual_seed(0)
        tv = build_torchvision_model({"builder": NAME, "kwargs": {}})  # torchvision's builder, COCO layout
        calibrated_ssd_(tv, det_photos[1], seed=3)
        _cache["pair"] = (tv, load_torchvision(NAME, tv.state_dict()))
    return _cache["pair"]


def test_architecture_and_round_trip(det_photos):
    """Against torchvision's own builder (the COCO configuration: reduced tail): parameter count, the
    C4 split's channels, 3,234 default boxes at 320 px; the strict conversion both ways (every tensor
    used once, every variable filled) gives back torchvision's state_dict bit for bit."""
    tv, model = calibrated_pair(det_photos)
    weights = torchvision.models.detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1
    assert count_params(model) == sum(p.numel() for p in tv.parameters()) == weights.meta["num_params"]
    assert model.backbone.out_channels == (672, 480, 512, 256, 256, 128)
    assert model.anchor_generator((320, 320), FEATURE_SIZES).shape == (3234, 4)
    assert len(model_variables(model)) == len(tv.state_dict())
    state_dict = to_torchvision(model)
    reference = tv.state_dict()
    assert list(state_dict) == list(reference)
    for key, value in reference.items():
        assert torch.equal(state_dict[key], value), key
    assert model.architecture == {"builder": NAME, "kwargs": {"num_classes": 91, "reduced_tail": True}}


def test_builder_arguments():
    """torchvision's arguments: SSD's kwargs reach the configuration, norm_layer (FrozenBatchNorm2d
    here) reaches both sides, and the architecture record (what mbv3_jax.save writes) rebuilds it."""
    kwargs = dict(
        num_classes=7,
        score_thresh=0.2,
        detections_per_img=50,
        topk_candidates=100,
        image_mean=[0.4, 0.5, 0.6],
        norm_layer={"norm": "frozen", "bn_eps": 1e-3},
    )
    model = mbv3_jax.get_model(NAME, **kwargs)
    cfg = model.config
    assert (cfg.num_classes, cfg.score_thresh, cfg.detections_per_img, cfg.topk_candidates) == (
        7,
        0.2,
        50,
        100,
    )
    assert cfg.image_mean == (0.4, 0.5, 0.6) and cfg.nms_thresh == 0.55
    bn = model.backbone.features[1].block[0].bn
    assert type(bn).__name__ == "FrozenBatchNorm" and bn.eps == 1e-3
    rebuilt = mbv3_jax.models.build_from_architecture(json.loads(json.dumps(model.architecture)))
    assert rebuilt.config == cfg and count_params(rebuilt) == count_params(model)
    # torchvision's model with these arguments fits strictly (every tensor used, every variable filled).
    tv = build_torchvision_model(model.architecture)
    assert not any(k.endswith("num_batches_tracked") for k in tv.state_dict())
    convert_to_jax(tv.state_dict(), model, rules_for(NAME))
    frozen = tv.backbone.extra[0][0][1]
    assert type(frozen).__name__ == "FrozenBatchNorm2d" and frozen.eps == 1e-3
    assert (tv.score_thresh, tv.detections_per_img, tv.topk_candidates) == (0.2, 50, 100)
    assert list(tv.transform.image_mean) == [0.4, 0.5, 0.6]
    with pytest.raises(TypeError, match="unexpected keyword"):
        mbv3_jax.get_model(NAME, min_size=300)


def test_full_tail_backbone_only_loading_and_trainable_layers():
    """On ImageNet backbone weights torchvision keeps the full tail (960-ch last layer); loading
    only the classifier's features fills exactly the backbone, the rest keeps its init. The
    trainable filter selects what torchvision leaves with requires_grad."""
    torch.manual_seed(1)
    classifier = torchvision.models.mobilenet_v3_large().state_dict()
    model = load_torchvision(NAME, weights_backbone=classifier, trainable_backbone_layers=3)
    assert model.architecture["kwargs"]["reduced_tail"] is False
    assert model.backbone.out_channels == (672, 960, 512, 256, 256, 128)
    np.testing.assert_array_equal(
        np.asarray(model.backbone.features[13].block[0].conv.kernel[...]),
        classifier["features.13.block.0.0.weight"].numpy().transpose(2, 3, 1, 0),
    )
    tv = build_torchvision_model(model.architecture)  # torchvision's composition on backbone weights
    assert sum(p.numel() for p in tv.parameters()) == count_params(model) == 5_198_540
    trainable = jax.tree.leaves(nnx.state(model, model.trainable_filter()))
    assert sum(np.size(v) for v in trainable) == sum(p.numel() for p in tv.parameters() if p.requires_grad)
    # Its checkpoint fits strictly, and says itself which tail it has.
    convert_to_jax(tv.state_dict(), model, rules_for(NAME))
    again = load_torchvision(NAME, tv.state_dict())
    assert again.architecture["kwargs"]["reduced_tail"] is False


def test_detections(det_photos):
    tv, model = calibrated_pair(det_photos)
    photos, _ = det_photos
    report = run_detection_parity(NAME, tv, model, photos, keep_outputs=True)
    ((ref, got),) = report.outputs
    for r, g, p in zip(ref, got, photos, strict=True):
        # The random heads spread the scores: no ties that would make the kept set arbitrary.
        assert len(np.unique(r["scores"])) == len(r["scores"])
        assert g["boxes"].dtype == np.float32 and g["labels"].min() >= 1
        assert np.all(g["boxes"][:, 2] <= p.shape[1] + 1e-3) and np.all(g["boxes"][:, 3] <= p.shape[0] + 1e-3)
    assert report.agreements["torchvision dets matched"][1] == 4 * 300  # detections_per_img, every photo
    for metric in ("torchvision dets matched", "JAX dets matched"):
        assert report.agreement(metric) >= MATCH_FRACTION, (metric, report.agreements[metric])
    # fp32 torchvision itself misses some of its float64 detections; the port at most
    # NOISE_FLOOR_FACTOR times as many.
    assert report.noise_floor_measured and not report.noise_floor_excess(), report.noise_floor_excess()
    print(f"{NAME}: {report.agreements}")


def test_detections_generic_path(det_photos, generic_path):
    """CPU kernels off (XLA's convolutions on the whole batch, as on TPUs and GPUs)."""
    test_detections(det_photos)


def _targets(photos):
    """A fixed target set in each photo's own pixels: a few boxes, and one photo without any."""
    rng = np.random.default_rng(0)
    targets = []
    for p, n in zip(photos, (3, 5, 0, 2), strict=True):
        h, w = p.shape[:2]
        xy = rng.uniform(0, 0.6, (n, 2)) * [w, h]
        wh = rng.uniform(0.1, 0.4, (n, 2)) * [w, h]
        boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1).astype(np.float32)
        targets.append({"boxes": boxes.reshape(-1, 4), "labels": rng.integers(1, 91, n)})
    return targets


def test_train_mode_losses(det_photos):
    """The train-mode forward on a fresh copy of both models: losses (SSDMatcher, smooth-L1, 3:1 hard
    negative mining) and BatchNorm running statistics; then the loss function alone on torchvision's
    own head outputs, and its gradient with respect to them."""
    tv_eval, model_eval = calibrated_pair(det_photos)
    photos, images = det_photos
    tv, model = copy.deepcopy(tv_eval), nnx.clone(model_eval)
    targets = _targets(photos)
    head = {}

    def as_leaves(module, inputs, outputs):  # the losses' gradient stops at the head outputs
        head.update({k: v.detach().requires_grad_() for k, v in outputs.items()})
        return dict(head)

    handle = tv.head.register_forward_hook(as_leaves)
    tv.train()
    try:
        ref = tv(images, [{k: torch.from_numpy(np.asarray(v)) for k, v in t.items()} for t in targets])
    finally:
        handle.remove()
    sum(ref.values()).backward()
    model.train()
    got = model([p.astype(np.float32) / 255 for p in photos], targets)
    assert set(got) == set(ref) == {"bbox_regression", "classification"}
    for key, value in ref.items():
        assert abs(float(got[key]) - value.item()) <= LOSS_TOL * abs(value.item()), (
            key,
            float(got[key]),
            value,
        )
    rules = rules_for(NAME)
    buffers = {k: v for k, v in tv.state_dict().items() if "running_" in k or "num_batches" in k}
    stats_ref = convert_to_jax(buffers, model, rules, strict=False)
    variables = model_variables(model)
    stats_got = {p: np.asarray(variables[p].get_value()) for p in stats_ref}
    assert_close_tensors(stats_ref, stats_got, STATS_TOL, "running stat")

    boxes, labels, valid = model.prepare_targets(targets, [p.shape[:2] for p in photos])
    anchors = jnp.asarray(model.anchor_generator((320, 320), FEATURE_SIZES))
    outputs = {k: jnp.asarray(v.detach().numpy()) for k, v in head.items()}

    def total(h):
        losses = model.compute_loss(h, anchors, boxes, labels, valid)
        return losses["bbox_regression"] + losses["classification"], losses

    (_, losses), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(outputs)
    for key, value in ref.items():
        assert abs(float(losses[key]) - value.item()) <= 1e-6 * abs(value.item()), key
    assert_close_tensors(
        {k: v.grad.numpy() for k, v in head.items()},
        {k: np.asarray(v) for k, v in grads.items()},
        1e-5,
        "d loss",
    )
    with pytest.raises(ValueError, match="positive height and width"):
        model([photos[0].astype(np.float32) / 255], [{"boxes": np.array([[5.0, 5, 5, 9]]), "labels": [1]}])


def _head_outputs(rng):
    """Synthetic head outputs for 4 images, one per path of the post-processing: (1) scores spread
    over every class (the best 1,024 candidates decide NMS), (2) background dominant, few hundred
    candidates (torchvision's coordinate-offset NMS), (3) one class dominant (more than 300 of the
    best 1,024 are its: its per-class top-300 is taken first), (4) every box decoded to the whole
    image (one survivor per class: NMS has to run over all 27,000 candidates)."""
    a, c = 3234, 91
    logits = rng.normal(0, 1.5, (4, a, c))
    regression = rng.normal(0, 0.3, (4, a, 4))
    logits[1] = rng.normal(0, 1, (a, c))
    logits[1, :, 0] = 12.0
    chosen = rng.choice(a * (c - 1), 600, replace=False)
    logits[1].reshape(-1)[chosen // (c - 1) * c + 1 + chosen % (c - 1)] = 12.0 + rng.normal(0, 1, 600)
    logits[2, :, 5] += 4.0
    regression[3, :, :2], regression[3, :, 2:] = 0.0, 50.0
    return {"bbox_regression": regression.astype(np.float32), "cls_logits": logits.astype(np.float32)}


def test_postprocess_paths_match_torchvision(det_photos):
    tv, model = calibrated_pair(det_photos)
    head = _head_outputs(np.random.default_rng(0))
    anchors = model.anchor_generator((320, 320), FEATURE_SIZES)
    with torch.no_grad():
        ref = tv.postprocess_detections(
            {k: torch.from_numpy(v) for k, v in head.items()},
            [torch.from_numpy(anchors)] * 4,
            [(320, 320)] * 4,
        )
    got = jax.jit(lambda h, anc: model.postprocess_detections(h, anc, (320, 320)))(head, jnp.asarray(anchors))
    scores = torch.softmax(torch.from_numpy(head["cls_logits"]), -1)[..., 1:].numpy()
    passing = scores > 0.001
    num_candidates = np.minimum(passing.sum(axis=1), 300).sum(axis=1)  # torchvision's, per image
    best = np.argsort(-np.where(passing, scores, -1).reshape(4, -1), axis=1, kind="stable")[:, :1024]
    most_of_one_class = np.array([np.bincount(b % 90, minlength=90).max() for b in best])
    kept = [len(r["scores"]) for r in ref]
    assert num_candidates[0] > 1024 and most_of_one_class[0] <= 300 and kept[0] == 300
    assert num_candidates[1] <= 1000
    assert most_of_one_class[2] > 300
    assert num_candidates[3] > 1024 and kept[3] < 300
    for i, r in enumerate(ref):
        r = {k: v.numpy() for k, v in r.items()}
        n = int(got["num_detections"][i])
        g = {k: np.asarray(got[k][i, :n]) for k in ("boxes", "scores", "labels")}
        assert n == len(r["scores"]), (i, n, len(r["scores"]))
        assert match_detections(r, g, score_tol=1e-6) == (n, n), i
        assert match_detections(g, r, score_tol=1e-6) == (n, n), i


def _nms_case(seed, groups, per_group, valid_fraction, grid=None, spread=(5, 150)):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 280, (groups * per_group, 2))
    wh = rng.uniform(*spread, (groups * per_group, 2))
    if grid:  # coordinates on a grid: many IoUs exactly at simple fractions, and equal boxes
        xy, wh = np.round(xy / grid) * grid, np.round(wh / grid) * grid + grid
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, groups * per_group).astype(np.float32)
    labels = np.repeat(np.arange(groups), per_group).astype(np.int32)
    return boxes, scores, labels, rng.uniform(size=groups * per_group) < valid_fraction


@pytest.mark.parametrize(
    "case",
    [
        dict(seed=0, groups=40, per_group=100, valid_fraction=1.0),  # per-class path, decided early
        dict(seed=1, groups=40, per_group=100, valid_fraction=0.2, grid=10),  # offset path (< 1000)
        dict(seed=2, groups=2, per_group=2000, valid_fraction=1.0, grid=40, spread=(200, 300)),  # fallback
    ],
    ids=["per-class", "offset", "fallback"],
)
def test_top_first_nms_matches_torchvision(case, request):
    case_id = request.node.callspec.id
    boxes, scores, labels, valid = _nms_case(**case)
    keep, count = batched_nms_top_first(boxes, scores, labels, valid, 0.55, 300)
    keep = np.asarray(keep)[: int(count)]
    idx = np.nonzero(valid)[0]
    ref = torchvision.ops.batched_nms(
        torch.from_numpy(boxes[idx]), torch.from_numpy(scores[idx]), torch.from_numpy(labels[idx]), 0.55
    ).numpy()
    ref = idx[ref][:300]
    assert set(ref) == set(keep)
    num_valid = int(valid.sum())
    path = "offset" if 4 * num_valid <= 4000 else "per-class" if len(ref) == 300 else "fallback"
    assert path == case_id, (path, num_valid, len(ref))  # the case exercises what it says
    assert np.all(np.diff(scores[keep]) <= 0)  # descending, as torchvision returns them
    full_keep, full_count = batched_nms_padded(boxes, scores, labels, valid, 0.55, 300)
    assert np.array_equal(np.asarray(full_keep)[: int(full_count)], keep)
