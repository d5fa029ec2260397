"""torchvision's Faster R-CNN MobileNetV3-Large 320 FPN recipe (references/detection, the COCO_V1
weights) on TFDS ``coco/2017``; for the 800 px model set ``model.name`` to
``fasterrcnn_mobilenet_v3_large_fpn`` (the same recipe).

``torchrun --nproc_per_node=8 train.py --dataset coco --model fasterrcnn_mobilenet_v3_large_320_fpn
--epochs 26 --lr-steps 16 22 --aspect-ratio-group-factor 3 --lr 0.02 --batch-size 2 --weights-backbone
MobileNet_V3_Large_Weights.IMAGENET1K_V1`` with its defaults: SGD momentum 0.9, lr 0.02 for a global
batch of 16 (scaled linearly with the batch), weight decay 1e-4 on every parameter, MultiStepLR x0.1
at epochs 16 and 22, 26 epochs, a linear warm-up from 0.001 x lr over the first min(1000, an
epoch - 1) iterations, horizontal flip (the ``hflip`` preset), COCO mAP on val2017.

Where it differs, and why:
- the backbone starts from scratch unless ``--model.backbone_init`` names torchvision's ImageNet
  MobileNetV3-Large file (``mobilenet_v3_large-8738ca79.pth``), which the reference downloads; given
  it, the backbone's BatchNorm is frozen and its last 3 stages train, as torchvision builds it;
- aspect-ratio grouping by padded shape: each image goes to the smallest of 5 shapes that holds it
  resized (``train.coco_data.default_buckets``: 320x320, 320x448, 448x320, 320x640, 640x320 for the
  320 model), every batch holds images of one shape, padded to it (one compilation per shape).
  torchvision groups into 8 aspect-ratio bins and pads each batch to its largest image, rounded up
  to 32, so a batch here may carry more padding; the order follows its ``GroupedBatchSampler``;
- evaluation runs 16 images of one size per batch, each resized and padded up to 32 as torchvision's
  one-image batches are (one compilation per size);
- TFDS numbers COCO's 80 categories 0..79, so the model has 81 classes, not torchvision's 91;
- on TFDS, images without annotations stay in training (adding only background; a COCO folder,
  ``--data.coco_folder``, drops them as torchvision does), ground-truth areas for COCO's size split
  are box areas (see ``ssdlite_coco``), and the image sizes are read from every image's header once
  at the start (a COCO folder's annotation file has them).
From COCO's own files instead, as the reference reads them (91 classes by category id, images
without annotations dropped, sizes from the annotation file): ``--data.coco_folder /path/to/coco
--data.train_split train2017 --data.eval_split val2017 --data.coco_labels category_id``.
Copy this file, edit it, and pass its path to ``mbv3-train --config``.
"""

from train.config import TrainConfig


def get_config() -> TrainConfig:
    config = TrainConfig(name="fasterrcnn_mobilenet_v3_large_320_fpn-torchvision", workdir="runs/frcnn_coco")
    config.model.name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    d = config.data
    d.dataset, d.train_split, d.eval_split = "coco/2017", "train", "validation"
    d.label_key = "objects"
    d.max_boxes = 100
    d.hflip = True
    d.worker_count = 8
    o = config.optim
    o.optimizer = "sgd"
    o.lr, o.reference_batch = 0.02, 16
    o.momentum, o.weight_decay = 0.9, 1e-4
    o.schedule, o.lr_milestones, o.lr_gamma = "multistep", (16, 22), 0.1
    # torchvision's warm-up: LinearLR from 0.001 over min(1000, an epoch - 1) iterations (1000 on COCO)
    o.warmup_steps, o.warmup_start_factor = 1000, 0.001
    t = config.train
    t.epochs, t.global_batch, t.eval_batch = 26, 16, 16
    t.eval_every_epochs = 1
    return config
