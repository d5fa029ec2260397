"""Weight-mapping tables: torchvision state_dict keys -> mbv3_jax variable paths, per model."""

from __future__ import annotations

from porting.mapping import CONV_OIHW_TO_HWIO, FC_CHW_TO_HWC, LINEAR_TRANSPOSE, Rule, batchnorm_rules


def mobilenet_v3_features_rules(torch_prefix: str = "features", jax_prefix: str = "features") -> list[Rule]:
    """``features`` of torchvision's MobileNetV3: stem / last conv (``N.0``, ``N.1``) and blocks.

    Prefixes let detection and segmentation reuse this table for their backbones.
    """
    tp = torch_prefix.replace(".", r"\.")
    layer = rf"{tp}\.(\d+(?:\.block\.\d+)?)"  # features.N or features.N.block.M
    jp = jax_prefix
    return [
        Rule(rf"{layer}\.0\.weight", rf"{jp}.\1.conv.kernel", CONV_OIHW_TO_HWIO),
        *batchnorm_rules(rf"{layer}\.1", rf"{jp}.\1.bn"),
        Rule(rf"{tp}\.(\d+\.block\.\d+)\.(fc[12])\.weight", rf"{jp}.\1.\2.kernel", CONV_OIHW_TO_HWIO),
        Rule(rf"{tp}\.(\d+\.block\.\d+)\.(fc[12])\.bias", rf"{jp}.\1.\2.bias"),
    ]


MOBILENET_V3_CLASSIFIER_RULES: list[Rule] = [
    Rule(r"classifier\.0\.weight", "classifier_hidden.kernel", LINEAR_TRANSPOSE),
    Rule(r"classifier\.0\.bias", "classifier_hidden.bias"),
    Rule(r"classifier\.3\.weight", "classifier_out.kernel", LINEAR_TRANSPOSE),
    Rule(r"classifier\.3\.bias", "classifier_out.bias"),
    *mobilenet_v3_features_rules(),
]


def conv_bn_rules(torch_prefix: str, jax_prefix: str) -> list[Rule]:
    """A torch ``Sequential(Conv2d(bias=False), BatchNorm2d, ...)`` -> ``ConvNormActivation``."""
    tp = torch_prefix.replace(".", r"\.")
    return [
        Rule(rf"{tp}\.0\.weight", f"{jax_prefix}.conv.kernel", CONV_OIHW_TO_HWIO),
        *batchnorm_rules(rf"{tp}\.1", f"{jax_prefix}.bn"),
    ]


def conv_rules(torch_prefix: str, jax_prefix: str) -> list[Rule]:
    """A torch ``Conv2d`` with bias -> ``Conv2d``."""
    tp = torch_prefix.replace(".", r"\.")
    return [
        Rule(rf"{tp}\.weight", f"{jax_prefix}.kernel", CONV_OIHW_TO_HWIO),
        Rule(rf"{tp}\.bias", f"{jax_prefix}.bias"),
    ]


def fcn_head_rules(torch_prefix: str, jax_prefix: str) -> list[Rule]:
    """torchvision's ``FCNHead`` (Sequential: conv, bn, relu, dropout, conv) -> ``FCNHead``."""
    return [
        *conv_bn_rules(torch_prefix, f"{jax_prefix}.conv"),
        *conv_rules(f"{torch_prefix}.4", f"{jax_prefix}.classifier"),
    ]


SEGMENTATION_BACKBONE_RULES = mobilenet_v3_features_rules("backbone", "backbone")

LRASPP_RULES: list[Rule] = [
    *SEGMENTATION_BACKBONE_RULES,
    *conv_bn_rules("classifier.cbr", "classifier.cbr"),
    Rule(r"classifier\.scale\.1\.weight", "classifier.scale.kernel", CONV_OIHW_TO_HWIO),
    *conv_rules("classifier.low_classifier", "classifier.low_classifier"),
    *conv_rules("classifier.high_classifier", "classifier.high_classifier"),
]

DEEPLABV3_RULES: list[Rule] = [
    *SEGMENTATION_BACKBONE_RULES,
    # classifier.0 = ASPP: convs.0..3 (conv, bn, relu), convs.4 = pooling (pool, conv, bn, relu).
    Rule(
        r"classifier\.0\.convs\.([0-3])\.0\.weight",
        r"classifier.aspp.convs.\1.conv.kernel",
        CONV_OIHW_TO_HWIO,
    ),
    *batchnorm_rules(r"classifier\.0\.convs\.([0-3])\.1", r"classifier.aspp.convs.\1.bn"),
    Rule(r"classifier\.0\.convs\.4\.1\.weight", "classifier.aspp.pooling.conv.kernel", CONV_OIHW_TO_HWIO),
    *batchnorm_rules(r"classifier\.0\.convs\.4\.2", "classifier.aspp.pooling.bn"),
    *conv_bn_rules("classifier.0.project", "classifier.aspp.project"),
    Rule(r"classifier\.1\.weight", "classifier.conv.conv.kernel", CONV_OIHW_TO_HWIO),
    *batchnorm_rules(r"classifier\.2", "classifier.conv.bn"),
    *conv_rules("classifier.4", "classifier.classifier"),
    *fcn_head_rules("aux_classifier", "aux_classifier"),
]

FCN_RULES: list[Rule] = [
    *SEGMENTATION_BACKBONE_RULES,
    *fcn_head_rules("classifier", "classifier"),
    *fcn_head_rules("aux_classifier", "aux_classifier"),
]

FASTER_RCNN_RULES: list[Rule] = [
    *mobilenet_v3_features_rules("backbone.body", "backbone.body"),
    Rule(
        r"backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.weight",
        r"backbone.fpn.\1_blocks.\2.kernel",
        CONV_OIHW_TO_HWIO,
    ),
    Rule(r"backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.bias", r"backbone.fpn.\1_blocks.\2.bias"),
    *conv_rules("rpn.head.conv.0.0", "rpn.head.conv"),
    *conv_rules("rpn.head.cls_logits", "rpn.head.cls_logits"),
    *conv_rules("rpn.head.bbox_pred", "rpn.head.bbox_pred"),
    Rule(r"roi_heads\.box_head\.fc6\.weight", "roi_heads.box_head.fc6.kernel", FC_CHW_TO_HWC),
    Rule(r"roi_heads\.box_head\.fc7\.weight", "roi_heads.box_head.fc7.kernel", LINEAR_TRANSPOSE),
    Rule(r"roi_heads\.box_head\.(fc[67])\.bias", r"roi_heads.box_head.\1.bias"),
    Rule(
        r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.weight",
        r"roi_heads.box_predictor.\1.kernel",
        LINEAR_TRANSPOSE,
    ),
    Rule(r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.bias", r"roi_heads.box_predictor.\1.bias"),
]

# builder name (as recorded in model.architecture) -> mapping table.
RULES: dict[str, list[Rule]] = {
    "mobilenet_v3_large": MOBILENET_V3_CLASSIFIER_RULES,
    "mobilenet_v3_small": MOBILENET_V3_CLASSIFIER_RULES,
    "MobileNetV3": MOBILENET_V3_CLASSIFIER_RULES,
    "lraspp_mobilenet_v3_large": LRASPP_RULES,
    "deeplabv3_mobilenet_v3_large": DEEPLABV3_RULES,
    "fcn_mobilenet_v3_large": FCN_RULES,
    "fasterrcnn_mobilenet_v3_large_fpn": FASTER_RCNN_RULES,
    "fasterrcnn_mobilenet_v3_large_320_fpn": FASTER_RCNN_RULES,
}


def rules_for(builder: str) -> list[Rule]:
    try:
        return RULES[builder]
    except KeyError:
        raise ValueError(f"no torchvision weight mapping for {builder!r}; known: {sorted(RULES)}") from None
