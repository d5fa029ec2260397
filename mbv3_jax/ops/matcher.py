"""Training-time target assignment with static shapes: torchvision's ``Matcher``, ``SSDMatcher``
and ``BalancedPositiveNegativeSampler`` (``torchvision/models/detection/_utils.py``).

Ground-truth boxes come padded to a fixed count with a validity mask, and so may predictions
(proposals); padded entries never match and are never matched. Results equal torchvision's on
the valid entries, including its quirks (see :func:`match`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def _masked_quality(quality: jax.Array, gt_valid: jax.Array, pred_valid: jax.Array | None) -> jax.Array:
    ok = gt_valid[:, None] if pred_valid is None else gt_valid[:, None] & pred_valid[None, :]
    # IoU is >= 0, so -1 never wins a max and never equals a real maximum.
    return jnp.where(ok, quality, -1.0)


def match(
    quality: jax.Array,
    gt_valid: jax.Array,
    high_threshold: float,
    low_threshold: float,
    allow_low_quality_matches: bool,
    pred_valid: jax.Array | None = None,
) -> jax.Array:
    """torchvision ``Matcher``: for each prediction (column of ``quality``, shape (G, N)) the index
    of its best ground truth, or -1 (below ``low_threshold``) / -2 (between the thresholds).

    With ``allow_low_quality_matches``, every prediction that attains some ground truth's highest
    quality keeps its best match even below the thresholds — as in torchvision also when that
    highest quality is 0 (then every prediction with IoU 0 to it gets matched to its own argmax).
    Without any valid ground truth every prediction is -1 (torchvision's empty-target path).
    """
    q = _masked_quality(quality, gt_valid, pred_valid)
    matched_vals = jnp.max(q, axis=0)
    all_matches = jnp.argmax(q, axis=0).astype(jnp.int32)  # first maximum, as torch's max(dim)
    matches = jnp.where(
        matched_vals < low_threshold,
        BELOW_LOW_THRESHOLD,
        jnp.where(matched_vals < high_threshold, BETWEEN_THRESHOLDS, all_matches),
    )
    if allow_low_quality_matches:
        highest = jnp.max(q, axis=1)
        attains = (q == highest[:, None]) & (q >= 0.0)
        matches = jnp.where(jnp.any(attains, axis=0), all_matches, matches)
    return matches.astype(jnp.int32)


def ssd_match(
    quality: jax.Array, gt_valid: jax.Array, threshold: float, pred_valid: jax.Array | None = None
) -> jax.Array:
    """torchvision ``SSDMatcher``: ``match`` at one threshold, then each ground truth claims its
    best prediction (first maximum). When several claim the same prediction the last one wins,
    as torch's sequential index assignment does on the CPU."""
    matches = match(quality, gt_valid, threshold, threshold, False, pred_valid)
    q = _masked_quality(quality, gt_valid, pred_valid)
    best_pred = jnp.argmax(q, axis=1)
    gt_index = jnp.where(gt_valid, jnp.arange(q.shape[0], dtype=jnp.int32), -1)
    claimed = jnp.full(q.shape[1], -1, jnp.int32).at[best_pred].max(gt_index)
    return jnp.where(claimed >= 0, claimed, matches)


def balanced_sample(
    positive: jax.Array,
    negative: jax.Array,
    batch_size_per_image: int,
    positive_fraction: float,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """torchvision ``BalancedPositiveNegativeSampler`` for one image, as masks over the candidates.

    Takes ``min(#positive, int(batch_size * fraction))`` positives and ``min(#negative,
    batch_size - #taken positives)`` negatives uniformly at random. When the sizes allow every
    candidate, every candidate is taken and no random draw decides (what parity tests use).
    """
    num_pos = jnp.minimum(jnp.sum(positive), int(batch_size_per_image * positive_fraction))
    num_neg = jnp.minimum(jnp.sum(negative), batch_size_per_image - num_pos)
    key_pos, key_neg = jax.random.split(key)
    return _take_random(positive, num_pos, key_pos), _take_random(negative, num_neg, key_neg)


def _take_random(mask: jax.Array, count: jax.Array, key: jax.Array) -> jax.Array:
    """A uniformly random subset of ``count`` elements of ``mask`` (as a mask)."""
    draws = jnp.where(mask, jax.random.uniform(key, mask.shape), jnp.inf)
    order = jnp.argsort(draws)
    rank = jnp.zeros(mask.shape, jnp.int32).at[order].set(jnp.arange(mask.shape[0], dtype=jnp.int32))
    return mask & (rank < count)
