"""torchvision's DeepLabV3 MobileNetV3-Large recipe (references/segmentation, the
COCO_WITH_VOC_LABELS_V1 weights): ``lraspp_coco``'s, with the auxiliary FCN head
(``--aux-loss``: its cross-entropy weighted 0.5, its parameters at 10 x the lr, as the reference's
param group) and torchvision's command ``torchrun --nproc_per_node=8 train.py --dataset coco -b 4
--model deeplabv3_mobilenet_v3_large --aux-loss --wd 0.000001 --weights-backbone
MobileNet_V3_Large_Weights.IMAGENET1K_V1``. Differences as ``lraspp_coco`` says.
"""

from train.config import TrainConfig
from train.configs.lraspp_coco import get_config as lraspp_config


def get_config() -> TrainConfig:
    config = lraspp_config()
    config.name, config.workdir = "deeplabv3_mobilenet_v3_large-torchvision", "runs/deeplabv3_coco"
    config.model.name = "deeplabv3_mobilenet_v3_large"
    config.model.aux_loss, config.model.aux_weight = True, 0.5
    config.optim.aux_lr_mult = 10.0
    return config
