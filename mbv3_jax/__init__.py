"""torchvision's MobileNetV3 family in JAX/Flax NNX (NHWC), with torchvision-parity tests."""

from mbv3_jax import models
from mbv3_jax.checkpoint import load, save
from mbv3_jax.models import get_model

__all__ = ["get_model", "load", "models", "save"]
__version__ = "0.1.0"
