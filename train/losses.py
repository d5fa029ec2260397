"""Training losses with torch's exact reductions."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from mbv3_jax.models.segmentation import IGNORE_INDEX, check_segmentation_labels, labels_out_of_bounds


def cross_entropy_ignore(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """``F.cross_entropy(logits, labels, ignore_index=...)`` for NHWC logits: mean over kept pixels."""
    keep = labels != ignore_index
    safe = jnp.where(keep, labels, 0)
    # In at least float32 (bf16 logits are widened; float64 stays float64).
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    return jnp.sum(jnp.where(keep, per_pixel, 0.0)) / jnp.sum(keep)


def segmentation_loss(
    outputs: Mapping[str, jax.Array], labels: jax.Array, aux_weight: float = 0.5
) -> jax.Array:
    """torchvision's references/segmentation criterion: CE(out) + aux_weight * CE(aux) if present.

    A label outside [0, C) other than IGNORE_INDEX raises, as torch does, where the labels are
    concrete; under jit, where no value can raise, it makes the loss NaN (never a silent wrap)."""
    check_segmentation_labels(outputs["out"], labels, IGNORE_INDEX)
    loss = cross_entropy_ignore(outputs["out"], labels)
    if "aux" in outputs:
        loss = loss + aux_weight * cross_entropy_ignore(outputs["aux"], labels)
    out_of_bounds = labels_out_of_bounds(labels, outputs["out"].shape[-1], IGNORE_INDEX)
    return jnp.where(out_of_bounds, jnp.nan, loss)
