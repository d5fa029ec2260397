"""torchvision's quantization-aware training of MobileNetV3-Large (the QNNPACK int8 weights).

``torchrun --nproc_per_node=8 train_quantization.py --model mobilenet_v3_large --wd 0.00001 --lr 0.001``
with the script's defaults: batch 32 per GPU (256 in all), 90 epochs, SGD momentum 0.9 (coupled weight
decay on every parameter), StepLR x0.1 every 30 epochs, ``get_default_qat_qconfig("qnnpack")``, observers
updating for epochs 0-4 and BatchNorm statistics for epochs 0-3, RandomResizedCrop 224 + flip (no
AutoAugment, no erasing), eval resize 256 / crop 224, eval batch 128. It starts from the float model:
pass its weights, e.g. ``--model.init ~/.cache/torch/hub/checkpoints/mobilenet_v3_large-8738ca79.pth``
(IMAGENET1K_V1). Then ``mbv3-quantize WORKDIR --out DIR --pth quantized.pth --eval`` converts the result.
"""

from train.config import TrainConfig


def get_config() -> TrainConfig:
    config = TrainConfig(name="mobilenet_v3_large-qat", workdir="runs/mobilenet_v3_large-qat")
    config.model.name = "mobilenet_v3_large"
    config.model.dropout = 0.2
    q = config.qat
    q.enabled, q.backend = True, "qnnpack"
    q.num_observer_update_epochs, q.num_batch_norm_update_epochs = 4, 3
    d = config.data
    d.dataset = "imagenet2012"
    d.train_crop, d.random_resized_crop, d.hflip = 224, True, True
    d.auto_augment, d.random_erasing = None, 0.0
    d.eval_resize, d.eval_crop = 256, 224
    d.worker_count = 8
    o = config.optim
    o.optimizer = "sgd"
    o.lr, o.reference_batch = 0.001, 256
    o.momentum, o.weight_decay, o.norm_weight_decay = 0.9, 1e-5, True
    o.schedule, o.lr_step_epochs, o.lr_gamma = "step", 30, 0.1
    t = config.train
    t.epochs, t.global_batch, t.eval_batch = 90, 256, 128
    t.eval_every_epochs = 1
    return config
