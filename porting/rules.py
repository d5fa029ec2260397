"""Weight-mapping tables: torchvision state_dict keys -> mbv3_jax variable paths, per model."""

from __future__ import annotations

from porting.mapping import CONV_OIHW_TO_HWIO, LINEAR_TRANSPOSE, Rule, batchnorm_rules


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

# builder name (as recorded in model.architecture) -> mapping table.
RULES: dict[str, list[Rule]] = {
    "mobilenet_v3_large": MOBILENET_V3_CLASSIFIER_RULES,
    "mobilenet_v3_small": MOBILENET_V3_CLASSIFIER_RULES,
    "MobileNetV3": MOBILENET_V3_CLASSIFIER_RULES,
}


def rules_for(builder: str) -> list[Rule]:
    try:
        return RULES[builder]
    except KeyError:
        raise ValueError(f"no torchvision weight mapping for {builder!r}; known: {sorted(RULES)}") from None
