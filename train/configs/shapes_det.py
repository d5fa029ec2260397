"""The offline detection demo: SSDlite320 (MobileNetV3-Large backbone) from scratch on the synthetic
shapes (train/shapes_data.py: 600 train / 100 test images, 128x128 resized to 320x320, 3 classes),
a few minutes on 2 cores; eval is COCO box mAP by pycocotools on the 100 test images.

torchvision's SSDlite recipe (references/detection: SGD momentum 0.9, lr 0.15 for batch 192, weight
decay 4e-5, cosine schedule, 660 epochs, the ``ssdlite`` augmentation: RandomIoUCrop + horizontal
flip, an ImageNet-trained backbone) changed for a short run from scratch: PyTorch-mode RMSProp as the
segmentation demo's, BatchNorm momentum 0.1 (torchvision's 0.03 suits long runs); the augmentation
and the cosine schedule are kept. The untrained model is evaluated first (a step-0 row).
"""

from train.config import TrainConfig


def get_config() -> TrainConfig:
    config = TrainConfig(name="shapes_det", workdir="runs/shapes_det")
    config.model.name = "ssdlite320_mobilenet_v3_large"
    config.model.bn_momentum = 0.1
    d = config.data
    d.dataset, d.train_split, d.eval_split = "mbv3_shapes", "train", "test"
    d.label_key = "objects"
    d.max_boxes = 8  # the shapes have at most 4
    d.iou_crop, d.hflip = True, True
    o = config.optim
    o.optimizer = "rmsprop_torch"
    o.lr, o.reference_batch = 0.001, 16
    o.momentum, o.alpha, o.eps, o.weight_decay = 0.9, 0.9, 0.0316, 4e-5
    o.schedule = "cosine"
    t = config.train
    t.epochs, t.global_batch, t.eval_batch = 8, 16, 20
    t.eval_every_epochs, t.eval_at_start, t.log_every_steps = 2, True, 10
    config.checkpoint.keep_last, config.checkpoint.keep_best = 2, 1
    return config
