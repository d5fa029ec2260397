"""The offline segmentation demo: LR-ASPP (MobileNetV3-Large backbone) from scratch on the synthetic
shapes (train/shapes_data.py: 600 train / 100 test images, 128x128, 3 classes + background), a few
minutes on 2 cores.

torchvision's segmentation recipe (references/segmentation: SGD momentum 0.9, weight decay 1e-4,
polynomial lr decay per iteration with power 0.9, RandomResize 0.5-2x base / flip / RandomCrop, an
ImageNet-trained backbone) changed for a short run from scratch on small images, each change measured
on this data (docs/performance.md): PyTorch-mode RMSProp as the classification recipe's (SGD at lr
0.02 or 0.1 reached mIoU 0.34-0.39 in 8-16 epochs, RMSProp 0.45 in 8), no RandomResize (random
scales on 128 px shapes cost ~0.07 mIoU here), base and crop 128 (the images' size) instead of 520 /
480, BatchNorm momentum 0.1 (torchvision's 0.01 suits long runs), the "poly" schedule kept. Eval at
the images' own 128 px; the untrained model is evaluated first (a step-0 row).
"""

from train.config import TrainConfig


def get_config() -> TrainConfig:
    config = TrainConfig(name="shapes_seg", workdir="runs/shapes_seg")
    config.model.name = "lraspp_mobilenet_v3_large"
    config.model.bn_momentum = 0.1
    d = config.data
    d.dataset, d.train_split, d.eval_split = "mbv3_shapes", "train", "test"
    d.label_key = "mask"
    d.base_size, d.train_crop, d.resize_range = 128, 128, (1.0, 1.0)
    d.eval_resize, d.eval_crop = 128, 128
    d.hflip = True
    o = config.optim
    o.optimizer = "rmsprop_torch"
    o.lr, o.reference_batch = 0.001, 16
    o.momentum, o.alpha, o.eps, o.weight_decay = 0.9, 0.9, 0.0316, 1e-5
    o.schedule = "poly"
    t = config.train
    t.epochs, t.global_batch, t.eval_batch = 16, 16, 20
    t.eval_every_epochs, t.eval_at_start, t.log_every_steps = 4, True, 10
    config.checkpoint.keep_last, config.checkpoint.keep_best = 2, 1
    return config
