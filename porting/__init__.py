"""torchvision <-> mbv3_jax: weight conversion both ways and numerical parity checks.

The only non-test code of this project that imports torch.
"""

from porting.mapping import Rule, Transform, WeightMappingError
from porting.torchvision_io import CheckpointError, build_torchvision_model, load_torchvision, to_torchvision

__all__ = [
    "CheckpointError",
    "Rule",
    "Transform",
    "WeightMappingError",
    "build_torchvision_model",
    "load_torchvision",
    "to_torchvision",
]
