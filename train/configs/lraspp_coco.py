"""torchvision's LR-ASPP MobileNetV3-Large recipe (references/segmentation, the
COCO_WITH_VOC_LABELS_V1 weights) on COCO with its 20 VOC categories, from a COCO folder in COCO's own
layout: ``mbv3-train --config lraspp_coco --data.coco_folder /path/to/coco`` (``annotations/
instances_train2017.json``, ``train2017/``, and the same for ``val2017``).

``torchrun --nproc_per_node=8 train.py --dataset coco -b 4 --model lraspp_mobilenet_v3_large --wd
0.000001 --weights-backbone MobileNet_V3_Large_Weights.IMAGENET1K_V1`` with its defaults: SGD momentum
0.9, lr 0.01 for a global batch of 32 (scaled linearly with the batch), weight decay 1e-6 on every
parameter, lr x (1 - iteration / total) ** 0.9 per iteration, 30 epochs, cross-entropy ignoring 255;
train2017 with only the 20 VOC categories (COCO ids 5, 2, 16, ... as labels 1..20; every other pixel
background) and only images whose kept annotations cover more than 1000 pixels; RandomResize of the
shorter side in [260, 1040], horizontal flip, RandomCrop 480 (padded with 0, the mask with 255);
evaluation on val2017 with the shorter side resized to 520, each image at its own size (batches of
one size, ``data.batch_shapes`` "grouped"), mIoU of the confusion matrix over 21 classes.

Where it differs, and why:
- the backbone starts from scratch unless ``--model.backbone_init`` names torchvision's ImageNet
  MobileNetV3-Large file (``mobilenet_v3_large-8738ca79.pth``), which the reference downloads;
- evaluation runs 8 images of one size per batch, where the reference runs one at a time: the same
  function of each image (no padding), one compilation per distinct size (a few hundred on val2017;
  ``--data.eval_size_divisible 32`` pads sizes up to multiples of 32 for far fewer, scoring no padding
  but letting it reach the predictions near the right and bottom edges).
Copy this file, edit it, and pass its path to ``mbv3-train --config``.
"""

from train.config import TrainConfig

# torchvision's references/segmentation/coco_utils.py CAT_LIST: the COCO ids of VOC's 20 classes, in
# VOC's label order (aeroplane, bicycle, bird, ...).
VOC_CATEGORIES = (5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)


def get_config() -> TrainConfig:
    config = TrainConfig(name="lraspp_mobilenet_v3_large-torchvision", workdir="runs/lraspp_coco")
    config.model.name = "lraspp_mobilenet_v3_large"
    config.model.num_classes = 21
    d = config.data
    d.coco_folder = "~/coco"
    d.coco_categories = VOC_CATEGORIES
    d.train_split, d.eval_split = "train2017", "val2017"
    d.label_key = "mask"
    d.base_size, d.resize_range, d.train_crop, d.hflip = 520, (0.5, 2.0), 480, True
    d.eval_resize, d.batch_shapes = 520, "grouped"
    d.worker_count = 8
    o = config.optim
    o.optimizer = "sgd"
    o.lr, o.reference_batch = 0.01, 32
    o.momentum, o.weight_decay = 0.9, 1e-6
    o.schedule = "poly"
    t = config.train
    t.epochs, t.global_batch, t.eval_batch = 30, 32, 8
    t.eval_every_epochs = 1
    return config
