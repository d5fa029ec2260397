"""Array ops shared by the model families (resizing; detection ops live alongside)."""

from mbv3_jax.ops.interpolate import interpolate_bilinear, linear_taps

__all__ = ["interpolate_bilinear", "linear_taps"]
