"""Quantization-aware training of the digits demo's model: the offline twin of ``qat.py``.

Starts from the float MobileNetV3-Small that ``mbv3-train --config digits`` trained (``--model.init``:
a ``mbv3-average`` output or any ``mbv3_jax.save`` directory), with torchvision's QAT recipe shrunk to
3 epochs: SGD momentum 0.9, weight decay 1e-5, observers updating for epochs 0-1, BatchNorm statistics
for epoch 0. ``mbv3-quantize`` then converts it to the integer model.
"""

from train.config import TrainConfig
from train.configs.digits import get_config as digits_config


def get_config() -> TrainConfig:
    config = digits_config()
    config.name, config.workdir = "digits-qat", "runs/digits-qat"
    q = config.qat
    q.enabled, q.backend = True, "qnnpack"
    q.num_observer_update_epochs, q.num_batch_norm_update_epochs = 1, 0
    o = config.optim
    o.optimizer = "sgd"
    o.lr, o.reference_batch = 0.001, 64
    o.momentum, o.weight_decay = 0.9, 1e-5
    o.schedule = "constant"
    t = config.train
    t.epochs, t.eval_every_epochs = 3, 1
    config.checkpoint.keep_last = 3
    return config
