"""The offline segmentation demo: LR-ASPP (MobileNetV3-Large backbone) from scratch on the synthetic
shapes (train/shapes_data.py: 600 train / 100 test images, 128x128, 3 classes + background), minutes
on 2 cores.

torchvision's segmentation recipe (references/segmentation: SGD momentum 0.9, weight decay 1e-4,
polynomial lr decay per iteration with power 0.9, RandomResize 0.5-2x base / flip / RandomCrop, aux
loss 0.5 for DeepLabV3) scaled to the demo: base size 128 and crop 128 (torchvision: 520 and 480),
eval at the images' own 128 px; lr 0.02 for batch 16 (the reference's per-GPU batch 4 x 8 GPUs
at 0.02), a faster BatchNorm momentum (0.1: the run is short), and the "poly" schedule.
"""

from train.config import TrainConfig


def get_config() -> TrainConfig:
    config = TrainConfig(name="shapes_seg", workdir="runs/shapes_seg")
    config.model.name = "lraspp_mobilenet_v3_large"
    config.model.bn_momentum = 0.1
    d = config.data
    d.dataset, d.train_split, d.eval_split = "mbv3_shapes", "train", "test"
    d.label_key = "mask"
    d.base_size, d.train_crop = 128, 128
    d.eval_resize, d.eval_crop = 128, 128
    d.hflip = True
    o = config.optim
    o.optimizer = "sgd"
    o.lr, o.reference_batch = 0.02, 16
    o.momentum, o.weight_decay = 0.9, 1e-4
    o.schedule = "poly"
    t = config.train
    t.epochs, t.global_batch, t.eval_batch = 8, 16, 20
    t.eval_every_epochs, t.log_every_steps = 2, 10
    config.checkpoint.keep_last, config.checkpoint.keep_best = 2, 1
    return config
