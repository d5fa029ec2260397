"""torchvision's SSDlite320 recipe (references/detection, the COCO_V1 weights) on TFDS ``coco/2017``.

``torchrun --nproc_per_node=8 train.py --dataset coco --model ssdlite320_mobilenet_v3_large --epochs 660
--aspect-ratio-group-factor -1 --lr-scheduler cosineannealinglr --lr 0.15 --batch-size 24
--weight-decay 0.00004 --data-augmentation ssdlite``: SGD momentum 0.9, lr 0.15 for a global batch of
192 (scaled linearly with the batch), weight decay 4e-5 on every parameter, cosine annealing per epoch
over 660 epochs after a linear warm-up from 0.001 x lr over the first min(1000, an epoch - 1)
iterations, RandomIoUCrop + horizontal flip, fixed 320x320 input, COCO mAP on val2017.

Where it differs, and why:
- the backbone starts from scratch unless ``--model.backbone_init`` names torchvision's ImageNet
  MobileNetV3-Large file (``mobilenet_v3_large-8738ca79.pth``), which the reference downloads (its
  last blocks then keep their full width, as torchvision builds SSDlite from backbone weights);
- TFDS numbers COCO's 80 categories 0..79, so the model has 81 classes (background + 80) where
  torchvision's has 91 (COCO's category ids, 11 of them unused);
- images without (non-crowd) annotations stay in the training set, adding no loss; torchvision's
  reference drops them (``_coco_remove_images_without_annotations``);
- ground-truth areas for COCO's small / medium / large split are box areas (TFDS keeps no mask
  areas), so APs / APm / APl differ from pycocotools on the annotation file; AP, AP50 and AP75 do not.
From COCO's own files instead, as the reference reads them (91 classes by category id, images
without annotations dropped, sizes from the annotation file): ``--data.coco_folder /path/to/coco
--data.train_split train2017 --data.eval_split val2017 --data.coco_labels category_id``.
Copy this file, edit it, and pass its path to ``mbv3-train --config``.
"""

from train.config import TrainConfig


def get_config() -> TrainConfig:
    config = TrainConfig(name="ssdlite320_mobilenet_v3_large-torchvision", workdir="runs/ssdlite_coco")
    config.model.name = "ssdlite320_mobilenet_v3_large"
    d = config.data
    d.dataset, d.train_split, d.eval_split = "coco/2017", "train", "validation"
    d.label_key = "objects"
    d.max_boxes = 100  # COCO train2017 images hold up to 93 non-crowd boxes
    d.iou_crop, d.hflip = True, True
    d.worker_count = 8
    o = config.optim
    o.optimizer = "sgd"
    o.lr, o.reference_batch = 0.15, 192
    o.momentum, o.weight_decay = 0.9, 4e-5
    o.schedule = "cosine"
    # torchvision's warm-up: LinearLR from 0.001 over min(1000, an epoch - 1) iterations (1000 on COCO)
    o.warmup_steps, o.warmup_start_factor = 1000, 0.001
    t = config.train
    t.epochs, t.global_batch, t.eval_batch = 660, 192, 192
    t.eval_every_epochs = 1
    return config
