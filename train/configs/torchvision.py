"""torchvision's MobileNetV3 ImageNet recipe (references/classification, the IMAGENET1K_V1 weights).

``torchrun --nproc_per_node=8 train.py --model mobilenet_v3_large --epochs 600 --opt rmsprop --batch-size 128
--lr 0.064 --wd 0.00001 --lr-step-size 2 --lr-gamma 0.973 --auto-augment imagenet --random-erase 0.2``:
RMSProp in PyTorch's form (alpha 0.9, eps 0.0316, momentum 0.9, coupled weight decay 1e-5 on every
parameter), lr 0.064 for a global batch of 1024 (scaled linearly with the batch), StepLR x0.973 every 2
epochs, RandomResizedCrop 224 + flip + AutoAugment(ImageNet) + RandomErasing 0.2, eval resize 256 /
crop 224. torchvision then averages the last 3 checkpoints that improved top-1: ``mbv3-average``.
Copy this file, edit it, and pass its path to ``mbv3-train --config``.
"""

from train.config import TrainConfig


def get_config() -> TrainConfig:
    config = TrainConfig(name="mobilenet_v3_large-torchvision", workdir="runs/mobilenet_v3_large")
    config.model.name = "mobilenet_v3_large"  # or mobilenet_v3_small (same recipe)
    config.model.dropout = 0.2
    config.data.dataset = "imagenet2012"  # needs the manual ImageNet download in TFDS's manual_dir
    config.data.train_crop = 224
    config.data.auto_augment = "imagenet"
    config.data.random_erasing = 0.2
    config.data.eval_resize, config.data.eval_crop = 256, 224
    config.data.worker_count = 8
    o = config.optim
    o.optimizer = "rmsprop_torch"
    o.lr, o.reference_batch = 0.064, 1024
    o.momentum, o.alpha, o.eps, o.weight_decay = 0.9, 0.9, 0.0316, 1e-5
    o.schedule, o.lr_step_epochs, o.lr_gamma = "step", 2, 0.973
    o.label_smoothing = 0.0  # an option (torchvision's later recipes use 0.1)
    config.train.epochs = 600
    config.train.global_batch = 1024
    config.train.eval_every_epochs = 1
    return config
