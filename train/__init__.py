"""Training and evaluation of mbv3_jax models."""
