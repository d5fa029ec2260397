"""Fast checks of the training pieces: configuration files and flags, errors, sharding rules, data order,
augmentation, fine-tuning initialisation. No training step is compiled here."""

from __future__ import annotations

import json

import numpy as np
import optax
import pytest
from extras import HAVE_TORCH, needs_torch
from jax.sharding import PartitionSpec as P

from train import augment, data, sharding
from train.cli import train_main
from train.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    apply_overrides,
    available_configs,
    load_config,
)
from train.config import TrainConfig as _TrainConfig
from train.trainer import _freezes_backbone_layers, build_model, learning_rate, make_optimizer

if HAVE_TORCH:  # the optional "torch" extra: without it the needs_torch tests skip, the others run
    import torch


def test_shipped_configs():
    assert {"digits", "tf_mode", "torchvision"} <= set(available_configs())
    tv = load_config("torchvision")
    o = tv.optim
    assert (o.optimizer, o.lr, o.reference_batch, o.momentum, o.alpha, o.eps, o.weight_decay) == (
        "rmsprop_torch", 0.064, 1024, 0.9, 0.9, 0.0316, 1e-5,
    )  # fmt: skip
    assert (o.schedule, o.lr_step_epochs, o.lr_gamma) == ("step", 2, 0.973)
    d = tv.data
    assert (d.train_crop, d.auto_augment, d.random_erasing, d.eval_resize, d.eval_crop) == (
        224,
        "imagenet",
        0.2,
        256,
        224,
    )
    assert load_config("tf_mode").optim.optimizer == "rmsprop_tf"
    assert isinstance(load_config("digits"), _TrainConfig)
    ssd = load_config("ssdlite_coco")  # torchvision's SSDlite recipe
    o = ssd.optim
    assert (o.optimizer, o.lr, o.reference_batch, o.momentum, o.weight_decay, o.schedule) == (
        "sgd", 0.15, 192, 0.9, 4e-5, "cosine",
    )  # fmt: skip
    assert (ssd.train.epochs, ssd.data.dataset, ssd.data.iou_crop, ssd.data.hflip) == (
        660,
        "coco/2017",
        True,
        True,
    )


def test_segmentation_recipes():
    """torchvision's segmentation recipe for LR-ASPP and DeepLabV3 (aux head: loss 0.5, lr x 10)."""
    for name in ("lraspp_coco", "deeplabv3_coco"):
        c = load_config(name)
        o, d = c.optim, c.data
        assert (o.optimizer, o.lr, o.reference_batch, o.momentum, o.weight_decay, o.schedule) == (
            "sgd", 0.01, 32, 0.9, 1e-6, "poly",
        )  # fmt: skip
        assert (c.train.epochs, c.train.global_batch, c.model.num_classes, d.batch_shapes) == (
            30,
            32,
            21,
            "grouped",
        )
        assert (d.base_size, d.resize_range, d.train_crop, d.eval_resize) == (520, (0.5, 2.0), 480, 520)
        assert d.coco_categories[:3] == (5, 2, 16) and len(set(d.coco_categories)) == 20
    deeplab = load_config("deeplabv3_coco")
    assert deeplab.model.name == "deeplabv3_mobilenet_v3_large" and deeplab.model.aux_loss
    assert (deeplab.model.aux_weight, deeplab.optim.aux_lr_mult) == (0.5, 10.0)
    assert load_config("lraspp_coco").optim.aux_lr_mult == 1.0


def test_overrides_and_errors(tmp_path):
    c = apply_overrides(
        load_config("digits"),
        [
            "--optim.lr=0.01",
            "--train.epochs",
            "3",
            "--data.crop_scale",
            "0.5,1",
            "--model.init",
            "none",
            "--plot=false",
        ],
    )
    assert (c.optim.lr, c.train.epochs, c.data.crop_scale, c.model.init, c.plot) == (
        0.01,
        3.0,
        (0.5, 1.0),
        None,
        False,
    )
    with pytest.raises(ConfigError, match=r"did you mean --optim\.lr"):
        apply_overrides(load_config("digits"), ["--optim.lrr=1"])
    with pytest.raises(ConfigError, match="expects int"):
        apply_overrides(load_config("digits"), ["--train.global_batch=big"])
    with pytest.raises(ConfigError, match="is a section"):
        apply_overrides(load_config("digits"), ["--optim=1"])
    with pytest.raises(ConfigError, match="needs a value"):
        apply_overrides(load_config("digits"), ["--optim.lr"])
    with pytest.raises(ConfigError, match="unknown configuration"):
        load_config("nonexistent")
    # A user's copy of a configuration file, by path.
    mine = tmp_path / "mine.py"
    mine.write_text(
        "from train.config import TrainConfig\n\ndef get_config():\n    return TrainConfig(name='mine')\n"
    )
    assert load_config(str(mine)).name == "mine"


def test_cli_errors_and_print_config(capsys, tmp_path):
    assert train_main(["--config", "digits", "--print-config", "--train.epochs=2"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["epochs"] == 2.0
    assert train_main(["--config", "digits", "--optim.lrr=1"]) == 2
    assert "unknown option --optim.lrr" in capsys.readouterr().err
    argv = ["--config", "digits", "--workdir", str(tmp_path / "w"), "--data.dataset", "imagenet2013"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown TFDS dataset 'imagenet2013'" in err and "imagenet2012" in err
    argv = [
        "--config",
        "digits",
        "--workdir",
        str(tmp_path / "w"),
        "--data.image_folder",
        str(tmp_path / "none"),
    ]
    assert train_main(argv) == 2
    assert "does not exist" in capsys.readouterr().err


def test_fsdp_rules():
    assert sharding.fsdp_spec((3, 3, 16, 72), 4, min_size=1024) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((1024, 10), 4, min_size=1024) == P("fsdp", None)
    assert sharding.fsdp_spec((1024, 10), 4, min_size=2**14) == P()  # small: replicated
    assert sharding.fsdp_spec((7, 9), 4, min_size=1) == P()  # nothing divisible
    assert sharding.fsdp_spec((), 4, min_size=0) == P()
    assert sharding.fsdp_spec((4096, 1280), 1) == P()
    with pytest.raises(ValueError, match="does not divide"):
        sharding.make_mesh(fsdp=3)


def test_global_order_and_process_slices():
    order = data.GlobalOrder(100, 16, seed=3)
    assert order.steps_per_epoch == 6
    epoch0 = [order.record(i) for i in range(96)]
    epoch1 = [order.record(96 + i) for i in range(96)]
    assert len(set(epoch0)) == 96 and epoch0 != epoch1
    assert epoch0 == [order.record(i) for i in range(96)]  # a function of (seed, position)
    with pytest.raises(data.DataError, match="fewer than one global batch"):
        data.GlobalOrder(10, 16)


def test_train_transform_is_seeded():
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    tf = augment.TrainTransform(crop=32)
    a = tf(img, np.random.default_rng([1, 2]))
    b = tf(img, np.random.default_rng([1, 2]))
    assert a.shape == (32, 32, 3) and a.dtype == np.float32 and np.array_equal(a, b)
    # every AutoAugment sub-policy runs
    for seed in range(200):
        out = augment.auto_augment(np.random.default_rng(seed), augment.Image.fromarray(img))
        assert out.size == (50, 40)
    plain = augment.TrainTransform(
        crop=32, random_resized_crop=False, hflip=False, auto_augment=None, random_erasing=0
    )
    assert plain(img, np.random.default_rng(0)).shape == (32, 32, 3)


def test_learning_rate_scaling():
    sched = learning_rate(OptimConfig(), global_batch=256, steps_per_epoch=10, total_steps=100)
    assert float(sched(0)) == pytest.approx(0.064 / 4)
    assert float(sched(19)) == pytest.approx(0.016) and float(sched(20)) == pytest.approx(0.016 * 0.973)


def test_detection_recipe_schedule_is_torchvisions():
    """fasterrcnn_coco's lr: MultiStepLR at epochs 16 and 22 times LinearLR(0.001) over min(1000, an
    epoch - 1) iterations (``mbv3_jax.optim.detection_lr``, tested against torch in test_optim)."""
    from mbv3_jax.optim import detection_lr, schedule_values

    cfg = load_config("fasterrcnn_coco").optim
    for spe in (40, 1500):
        got = schedule_values(learning_rate(cfg, 16, spe, 26 * spe), 26 * spe)
        np.testing.assert_allclose(got, schedule_values(detection_lr(0.02, spe), 26 * spe), rtol=1e-6)


def test_tf_mode_recipe_builds_tf1_rmsprop():
    """The tf_mode file wires what it says: TF1 RMSProp (mean square from 1, eps inside the sqrt, lr
    inside the momentum), lr 0.1 per 4096 decayed x0.99 every 3 epochs, L2 on kernels only."""
    cfg = load_config("tf_mode").optim
    steps_per_epoch, batch = 10, 1024
    sched = learning_rate(cfg, global_batch=batch, steps_per_epoch=steps_per_epoch, total_steps=1000)
    base = 0.1 * batch / 4096
    assert float(sched(29)) == pytest.approx(base) and float(sched(30)) == pytest.approx(base * 0.99)
    assert cfg.ema_decay == 0.9999 and load_config("tf_mode").model.dropout == 0.2
    rng = np.random.default_rng(0)
    params = {"conv": {"kernel": rng.standard_normal((3, 3, 4, 8))}, "bn": {"scale": rng.standard_normal(8)}}
    tx = make_optimizer(cfg, sched)
    state = tx.init(params)
    theta = {k: dict(v) for k, v in params.items()}
    ms = {k: {n: np.ones_like(a) for n, a in v.items()} for k, v in params.items()}
    mom = {k: {n: np.zeros_like(a) for n, a in v.items()} for k, v in params.items()}
    got = params
    for step in range(3):
        grads = {k: {n: rng.standard_normal(a.shape) for n, a in v.items()} for k, v in params.items()}
        updates, state = tx.update(grads, state, got)
        got = optax.apply_updates(got, updates)
        for k, n in (("conv", "kernel"), ("bn", "scale")):
            g = grads[k][n] + (1e-5 * theta[k][n] if n == "kernel" else 0.0)
            ms[k][n] = 0.9 * ms[k][n] + 0.1 * g**2
            mom[k][n] = 0.9 * mom[k][n] + float(sched(step)) * g / np.sqrt(ms[k][n] + 1e-3)
            theta[k][n] = theta[k][n] - mom[k][n]
    for k, n in (("conv", "kernel"), ("bn", "scale")):
        np.testing.assert_allclose(np.asarray(got[k][n]), theta[k][n], rtol=1e-6, atol=1e-7)


@needs_torch
def test_aux_head_lr_multiplier_is_torchs_param_group():
    """``optim.aux_lr_mult 10`` (torchvision's segmentation reference: the aux head in its own param
    group at 10 x lr) equals torch SGD with those two groups over three steps of a decaying lr."""
    import torch

    cfg = OptimConfig(optimizer="sgd", lr=0.02, reference_batch=8, weight_decay=1e-4, schedule="poly")
    cfg.aux_lr_mult = 10.0
    sched = learning_rate(cfg, global_batch=8, steps_per_epoch=5, total_steps=5)
    rng = np.random.default_rng(0)
    params = {
        "aux_classifier": {"w": rng.standard_normal((3, 4))},
        "classifier": {"w": rng.standard_normal(5)},
    }
    grads = [_random_like(params, rng) for _ in range(3)]
    tx = make_optimizer(cfg, sched)
    state, got = tx.init(params), params
    for g in grads:
        updates, state = tx.update(g, state, got)
        got = optax.apply_updates(got, updates)
    aux, head = (torch.tensor(params[k]["w"], requires_grad=True) for k in ("aux_classifier", "classifier"))
    groups = [{"params": [head]}, {"params": [aux], "lr": 0.2}]
    opt = torch.optim.SGD(groups, lr=0.02, momentum=0.9, weight_decay=1e-4)
    poly = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=5, power=0.9)
    for g in grads:
        aux.grad, head.grad = (torch.tensor(g[k]["w"]) for k in ("aux_classifier", "classifier"))
        opt.step()
        poly.step()
    np.testing.assert_allclose(np.asarray(got["aux_classifier"]["w"]), aux.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got["classifier"]["w"]), head.detach().numpy(), rtol=1e-6)


def _random_like(params: dict, rng: np.random.Generator) -> dict:
    return {k: {n: rng.standard_normal(a.shape) for n, a in v.items()} for k, v in params.items()}


@needs_torch
def test_init_from_torchvision_checkpoint_with_a_new_head(tmp_path):
    """``--model.init`` a torchvision .pth of 1000 classes into a 10-class model: all but the head load."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v3_small()
    path = tmp_path / "small.pth"
    torch.save(tv.state_dict(), path)
    model = build_model(ModelConfig(name="mobilenet_v3_small", init=str(path)), 10)
    assert model.num_classes == 10 and model.classifier_out.kernel.shape == (1024, 10)
    np.testing.assert_array_equal(
        np.asarray(model.classifier_hidden.kernel[...]), tv.classifier[0].weight.detach().numpy().T
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model(ModelConfig(name="mobilenet_v3_small", init=str(tmp_path / "missing.pth")), 10)
    with pytest.raises(ValueError, match="which this model does not have"):
        build_model(ModelConfig(name="mobilenet_v3_large", init=str(path)), 10)


@needs_torch
def test_backbone_init_from_a_classifier_checkpoint(tmp_path):
    """``--model.backbone_init`` (torchvision's ``weights_backbone``): a MobileNetV3-Large classifier
    .pth fills the backbone of LR-ASPP (dilated), of SSDlite (its tail then full width) and of Faster
    R-CNN, whose backbone BatchNorm is then frozen and whose last 3 stages train, as torchvision builds
    them from backbone weights."""
    import torchvision

    from mbv3_jax.layers import FrozenBatchNorm

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v3_large()
    for m in tv.modules():  # statistics that differ from a fresh BatchNorm's
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "large.pth"
    torch.save(tv.state_dict(), path)
    features = tv.features
    seg = build_model(ModelConfig(name="lraspp_mobilenet_v3_large", backbone_init=str(path)), 21)
    np.testing.assert_array_equal(
        np.asarray(seg.backbone[0].conv.kernel[...]),
        features[0][0].weight.detach().numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        np.asarray(seg.backbone[16].bn.mean[...]), features[16][1].running_mean.numpy()
    )
    det_cfg = ModelConfig(name="fasterrcnn_mobilenet_v3_large_320_fpn", backbone_init=str(path))
    det = build_model(det_cfg, 5)
    assert isinstance(det.backbone.body[16].bn, FrozenBatchNorm) and det.trainable_backbone_layers == 3
    assert _freezes_backbone_layers(det_cfg)  # the trainer's optimizer gets det.trainable_filter()
    np.testing.assert_array_equal(
        np.asarray(det.backbone.body[16].bn.var[...]), features[16][1].running_var.numpy()
    )
    ssd = build_model(ModelConfig(name="ssdlite320_mobilenet_v3_large", backbone_init=str(path)), 5)
    np.testing.assert_array_equal(  # the full-width tail (torchvision's SSDlite from backbone weights)
        np.asarray(ssd.backbone.features[16].bn.mean[...]), features[16][1].running_mean.numpy()
    )
    with pytest.raises(ValueError, match="not both"):
        build_model(
            ModelConfig(name="lraspp_mobilenet_v3_large", init=str(path), backbone_init=str(path)), 21
        )
    with pytest.raises(ValueError, match="detection or segmentation"):
        build_model(ModelConfig(name="mobilenet_v3_large", backbone_init=str(path)), 10)
    small = tmp_path / "small.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), small)
    with pytest.raises(ValueError, match="small.pth is not a MobileNetV3-Large classifier's"):
        build_model(ModelConfig(name="lraspp_mobilenet_v3_large", backbone_init=str(small)), 21)


@needs_torch
def test_init_a_segmentation_model_from_its_torchvision_checkpoint(tmp_path):
    """``--model.init`` a torchvision LR-ASPP or Faster R-CNN .pth: every variable of the model comes
    from it (the detector built as torchvision builds one from trained weights)."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights_backbone=None, num_classes=5)
    path = tmp_path / "lraspp.pth"
    torch.save(tv.state_dict(), path)
    model = build_model(ModelConfig(name="lraspp_mobilenet_v3_large", init=str(path)), 5)
    np.testing.assert_array_equal(
        np.asarray(model.classifier.high_classifier.kernel[...])[0, 0],
        tv.classifier.high_classifier.weight.detach()[:, :, 0, 0].numpy().T,
    )
    with pytest.raises(ValueError, match="lraspp.pth"):
        build_model(ModelConfig(name="lraspp_mobilenet_v3_large", init=str(path)), 21)
    # A trained Faster R-CNN's file (FrozenBatchNorm2d: no batch counters) builds the frozen model.
    from mbv3_jax.layers import FrozenBatchNorm

    tv_det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights_backbone=None, num_classes=5
    )
    state = {k: v for k, v in tv_det.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "frcnn.pth")
    det_cfg = ModelConfig(name="fasterrcnn_mobilenet_v3_large_320_fpn", init=str(tmp_path / "frcnn.pth"))
    det = build_model(det_cfg, 5)
    assert isinstance(det.backbone.body[0].bn, FrozenBatchNorm) and det.trainable_backbone_layers == 3
    np.testing.assert_array_equal(
        np.asarray(det.backbone.body[0].bn.mean[...]), state["backbone.body.0.1.running_mean"].numpy()
    )


def test_image_folder_dataset(tmp_path):
    """A user's ``root/{train,val}/<class>/*.png`` folders become a TFDS ArrayRecord data set."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for c in ("cat", "dog"):
            (tmp_path / "pets" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "pets" / split / c / f"{i}.png")
    (tmp_path / "pets" / "train" / "dog" / "gray.png").unlink(missing_ok=True)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(
        tmp_path / "pets" / "train" / "dog" / "g.png"
    )
    train = data.open_split("", "train", image_folder=str(tmp_path / "pets"), data_dir=str(tmp_path / "tfds"))
    val = data.open_split("", "val", image_folder=str(tmp_path / "pets"), data_dir=str(tmp_path / "tfds"))
    assert (len(train), len(val), train.num_classes, train.class_names) == (7, 4, 2, ["cat", "dog"])
    example = train.source[0]
    assert example["image"].ndim == 3 and example["image"].shape[-1] == 3 and example["label"] in (0, 1)
    # --data.process_sharding=process: each process opens its even part of the split
    folder, tfds_dir = str(tmp_path / "pets"), str(tmp_path / "tfds")
    parts = [
        data.open_split("", "train", image_folder=folder, data_dir=tfds_dir, process_shard=(i, 2))
        for i in (0, 1)
    ]
    assert [len(p) for p in parts] == [3, 3]
    assert np.array_equal(parts[1].source[0]["image"], train.source[3]["image"])
    with pytest.raises(data.DataError, match="not 'test'"):
        data.open_split("", "test", image_folder=str(tmp_path / "pets"), data_dir=str(tmp_path / "tfds"))


@needs_torch
def test_qat_recipe_and_float_start(tmp_path):
    """``--config qat``: torchvision's QAT recipe; the QAT model built from a float torchvision .pth is the
    model torchvision's script prepares from it (quantizable model, fuse_model(is_qat=True), prepare_qat)."""
    from mbv3_jax.models import qat
    from porting import to_torchvision
    from porting.qat import build_qat_torchvision
    from train.config import QATConfig
    from train.trainer import QATSchedule

    cfg = load_config("qat")
    o, q, t = cfg.optim, cfg.qat, cfg.train
    assert (o.optimizer, o.lr, o.reference_batch, o.momentum, o.weight_decay) == (
        "sgd",
        0.001,
        256,
        0.9,
        1e-5,
    )
    assert (o.schedule, o.lr_step_epochs, o.lr_gamma, t.epochs, t.global_batch) == ("step", 30, 0.1, 90, 256)
    assert (q.enabled, q.backend, q.num_observer_update_epochs, q.num_batch_norm_update_epochs) == (
        True, "qnnpack", 4, 3,
    )  # fmt: skip
    # The script switches after epoch e >= 4 (observers) and e >= 3 (BatchNorm), counting from 0.
    assert QATSchedule.from_config(q, 10) == QATSchedule(observer_steps=50, batch_norm_steps=40)
    assert isinstance(load_config("digits_qat"), _TrainConfig)

    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v3_large()
    for m in tv.modules():  # statistics that differ from the defaults, so that their place is checked
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "large.pth"
    torch.save(tv.state_dict(), path)
    model = build_model(ModelConfig(name="mobilenet_v3_large", init=str(path)), 1000, qat_cfg=QATConfig(True))
    assert isinstance(model, qat.QATMobileNetV3) and model.architecture["builder"] == "qat_mobilenet_v3_large"
    reference = build_qat_torchvision({"backend": "qnnpack"})  # the key set of a prepared QAT model
    # What train_quantization.py does with the float weights (its --weights): load, fuse, prepare.
    torch_float = torchvision.models.quantization.mobilenet_v3_large(quantize=False)
    torch_float.load_state_dict(tv.state_dict())
    torch_float.train()
    torch_float.fuse_model(is_qat=True)
    torch_float.qconfig = torch.ao.quantization.get_default_qat_qconfig("qnnpack")
    torch.ao.quantization.prepare_qat(torch_float, inplace=True)
    expected = torch_float.state_dict()
    got = to_torchvision(model)
    assert got.keys() == expected.keys() == reference.state_dict().keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key].numpy(), value.numpy(), err_msg=key)
    with pytest.raises(ValueError, match="float32"):
        build_model(ModelConfig(name="mobilenet_v3_small", dtype="bfloat16"), 10, qat_cfg=QATConfig(True))
    with pytest.raises(TypeError, match="float MobileNetV3"):
        qat.from_float(model)


def test_benchmark_runs_a_classifier_step():
    """``python -m train.benchmark``'s JAX side builds each task's step (here a classifier's)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mbv3_jax.models import get_model
    from train.benchmark import jax_step_runner
    from train.flops import generic_flops

    step = jax_step_runner("mobilenet_v3_small", 2, 32, num_classes=10)
    step.run()
    assert step.compile_s > 0
    # Its FLOPs: forward and backward (3 forwards' worth) and the optimizer's per-parameter update.
    model = get_model("mobilenet_v3_small", num_classes=10)
    model.eval()
    graphdef, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    forward = generic_flops(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)), state, images)
    params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert 3 * forward < step.flops < 3.5 * forward + 20 * params, (step.flops, forward, params)
