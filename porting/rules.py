"""Weight-mapping tables: torchvision state_dict keys -> mbv3_jax variable paths, per model."""

from __future__ import annotations

from porting.mapping import (
    CONV_OIHW_TO_HWIO,
    FC_CHW_TO_HWC,
    LINEAR_TRANSPOSE,
    SCALAR_1,
    ZERO_POINT,
    ZERO_POINT_1,
    Rule,
    Transform,
    batchnorm_rules,
)


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


def sequential_layers_rules(torch_prefix: str, jax_prefix: str) -> list[Rule]:
    """The numbered layers ``M`` of a torch Sequential of Conv2dNormActivation / SqueezeExcitation
    (an InvertedResidual's ``block``, or part of it) -> ``jax_prefix.M.{conv,bn,fc1,fc2}``."""
    tp = torch_prefix.replace(".", r"\.")
    return [
        Rule(rf"{tp}\.(\d+)\.0\.weight", rf"{jax_prefix}.\1.conv.kernel", CONV_OIHW_TO_HWIO),
        *batchnorm_rules(rf"{tp}\.(\d+)\.1", rf"{jax_prefix}.\1.bn"),
        Rule(rf"{tp}\.(\d+)\.(fc[12])\.weight", rf"{jax_prefix}.\1.\2.kernel", CONV_OIHW_TO_HWIO),
        Rule(rf"{tp}\.(\d+)\.(fc[12])\.bias", rf"{jax_prefix}.\1.\2.bias"),
    ]


# torchvision's SSDLiteFeatureExtractorMobileNet regroups MobileNetV3's features around the C4 split
# inside features[13]: backbone.features.0 = features[0..12] + features[13].block[0] (as ".13"),
# backbone.features.1 = (features[13].block[1:], keeping its indices 1..3), features[14..16].
# mbv3_jax keeps the classifier's numbering (backbone.features.0..16). First matching rule wins:
# the specific ones come before the generic backbone.features.0.N table.
SSDLITE_RULES: list[Rule] = [
    *conv_bn_rules("backbone.features.0.13", "backbone.features.13.block.0"),
    *mobilenet_v3_features_rules("backbone.features.0", "backbone.features"),
    *sequential_layers_rules("backbone.features.1.0", "backbone.features.13.block"),
    *sequential_layers_rules("backbone.features.1.1.block", "backbone.features.14.block"),
    *sequential_layers_rules("backbone.features.1.2.block", "backbone.features.15.block"),
    *conv_bn_rules("backbone.features.1.3", "backbone.features.16"),
    *sequential_layers_rules("backbone.extra.0", "backbone.extra.0"),
    *sequential_layers_rules("backbone.extra.1", "backbone.extra.1"),
    *sequential_layers_rules("backbone.extra.2", "backbone.extra.2"),
    *sequential_layers_rules("backbone.extra.3", "backbone.extra.3"),
    # head.{classification,regression}_head.module_list.K = Sequential(Conv2dNormActivation, Conv2d)
    Rule(
        r"head\.(classification|regression)_head\.module_list\.(\d+)\.0\.0\.weight",
        r"head.\1_head.module_list.\2.0.conv.kernel",
        CONV_OIHW_TO_HWIO,
    ),
    *batchnorm_rules(
        r"head\.(classification|regression)_head\.module_list\.(\d+)\.0\.1",
        r"head.\1_head.module_list.\2.0.bn",
    ),
    Rule(
        r"head\.(classification|regression)_head\.module_list\.(\d+)\.1\.weight",
        r"head.\1_head.module_list.\2.1.kernel",
        CONV_OIHW_TO_HWIO,
    ),
    Rule(
        r"head\.(classification|regression)_head\.module_list\.(\d+)\.1\.bias",
        r"head.\1_head.module_list.\2.1.bias",
    ),
]


def output_qparams_rules(torch_prefix: str, jax_prefix: str) -> list[Rule]:
    """A quantized op's output ``scale`` / ``zero_point`` buffers (regex prefixes)."""
    return [
        Rule(rf"{torch_prefix}\.scale", rf"{jax_prefix}.scale"),
        Rule(rf"{torch_prefix}\.zero_point", rf"{jax_prefix}.zero_point", ZERO_POINT),
    ]


def quantized_weight_rules(torch_prefix: str, jax_prefix: str, layout: Transform) -> list[Rule]:
    """A converted quantized Conv2d / Linear: int8 weight values (``.weight``, its ``q_scale``
    split out as ``.weight.q_scale`` by porting.torchvision_io), float bias, output qparams."""
    return [
        Rule(rf"{torch_prefix}\.weight", rf"{jax_prefix}.kernel", layout),
        Rule(rf"{torch_prefix}\.weight\.q_scale", rf"{jax_prefix}.weight_scale"),
        Rule(rf"{torch_prefix}\.bias", rf"{jax_prefix}.bias"),
        *output_qparams_rules(torch_prefix, jax_prefix),
    ]


# torchvision's quantized MobileNetV3 after convert, keys as porting.torchvision_io expands them
# (quantized tensors -> int values + ``.q_scale``; a Linear's packed params -> weight / bias).
_Q_LAYER = r"features\.(\d+(?:\.block\.\d+)?)"  # a Conv2dNormActivation: features.N[.block.M]
QUANTIZED_MOBILENET_V3_RULES: list[Rule] = [
    Rule(r"quant\.scale", "quant.scale", SCALAR_1),
    Rule(r"quant\.zero_point", "quant.zero_point", ZERO_POINT_1),
    *quantized_weight_rules(rf"{_Q_LAYER}\.0", r"features.\1.conv", CONV_OIHW_TO_HWIO),
    *output_qparams_rules(rf"{_Q_LAYER}\.2", r"features.\1.act"),
    *quantized_weight_rules(r"features\.(\d+\.block\.\d+)\.(fc[12])", r"features.\1.\2", CONV_OIHW_TO_HWIO),
    *output_qparams_rules(r"features\.(\d+\.block\.\d+)\.skip_mul", r"features.\1.skip_mul"),
    *output_qparams_rules(r"features\.(\d+)\.skip_add", r"features.\1.skip_add"),
    *quantized_weight_rules(r"classifier\.0", "classifier_hidden", LINEAR_TRANSPOSE),
    *output_qparams_rules(r"classifier\.1", "classifier_act"),
    *quantized_weight_rules(r"classifier\.3", "classifier_out", LINEAR_TRANSPOSE),
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
    "ssdlite320_mobilenet_v3_large": SSDLITE_RULES,
    "quantized_mobilenet_v3_large": QUANTIZED_MOBILENET_V3_RULES,
    "QuantizedMobileNetV3": QUANTIZED_MOBILENET_V3_RULES,  # any block table (a QAT run's result)
}


def rules_for(builder: str) -> list[Rule]:
    try:
        return RULES[builder]
    except KeyError:
        raise ValueError(f"no torchvision weight mapping for {builder!r}; known: {sorted(RULES)}") from None
