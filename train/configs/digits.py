"""The offline demo: MobileNetV3-Small from scratch on scikit-learn's digits (32x32 RGB), a few minutes.

The data set is written as a TFDS ArrayRecord data set on first use (no download). A short run needs a
faster BatchNorm momentum than torchvision's 0.01 (tuned for 600 epochs), else the running statistics lag
the weights and eval accuracy collapses. No augmentation: digits are not mirror-symmetric, and 6 epochs
are too few for crops to pay off. (A measured run's accuracy is in docs/performance.md.)
"""

from train.config import TrainConfig


def get_config() -> TrainConfig:
    config = TrainConfig(name="digits", workdir="runs/digits")
    config.model.name = "mobilenet_v3_small"
    config.model.bn_momentum = 0.1
    config.model.dropout = 0.2
    d = config.data
    d.dataset, d.train_split, d.eval_split = "sklearn_digits", "train", "test"
    d.train_crop, d.eval_resize, d.eval_crop = 32, 32, 32
    d.random_resized_crop = False
    d.hflip, d.auto_augment, d.random_erasing = False, None, 0.0
    o = config.optim
    o.optimizer = "rmsprop_torch"
    o.lr, o.reference_batch = 0.004, 64
    o.momentum, o.alpha, o.eps, o.weight_decay = 0.9, 0.9, 0.0316, 1e-5
    o.schedule, o.lr_step_epochs, o.lr_gamma = "step", 2, 0.9
    t = config.train
    t.epochs, t.global_batch, t.eval_batch = 6, 64, 72
    t.eval_every_epochs, t.log_every_steps = 2, 11
    config.checkpoint.keep_last, config.checkpoint.keep_best = 2, 2
    return config
