"""The MobileNetV3 paper's TensorFlow recipe (Howard et al. 2019, section 6.1), with TF1's RMSProp.

RMSPropOptimizer (TF1: mean square starts at 1.0, eps 1e-3 inside the square root, learning rate inside the
momentum buffer) with momentum 0.9 and decay 0.9, lr 0.1 for a global batch of 4096 scaled linearly,
decayed x0.99 every 3 epochs, dropout 0.2 (keep 0.8), L2 weight decay 1e-5 on the conv and linear
weights only (slim's ``weights_regularizer``: no BatchNorm parameters, no biases), an exponential moving
average of the weights with decay 0.9999 (evaluated alongside the raw weights).
"""

from train.config import TrainConfig


def get_config() -> TrainConfig:
    config = TrainConfig(name="mobilenet_v3_large-tf", workdir="runs/mobilenet_v3_large-tf")
    config.model.name = "mobilenet_v3_large"
    config.model.dropout = 0.2
    config.data.dataset = "imagenet2012"
    config.data.auto_augment = None  # the paper uses Inception preprocessing (crop + flip)
    config.data.random_erasing = 0.0
    config.data.worker_count = 8
    o = config.optim
    o.optimizer = "rmsprop_tf"
    o.lr, o.reference_batch = 0.1, 4096
    o.momentum, o.alpha, o.eps, o.weight_decay = 0.9, 0.9, 1e-3, 1e-5
    o.norm_weight_decay = False  # kernels only (norm_weight_decay False also leaves biases undecayed)
    o.schedule, o.lr_step_epochs, o.lr_gamma = "exponential", 3, 0.99
    o.ema_decay = 0.9999
    config.train.epochs = 350
    config.train.global_batch = 4096
    return config
