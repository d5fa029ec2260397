"""``torchvision.ops.batched_nms`` over many candidates, running on the best-scored ones first.

Greedy NMS processes boxes in descending score order and a box is only ever suppressed by a
higher-scored one, so the first ``m`` boxes of that order (the ``m`` highest scores, equal scores
by index) are decided by themselves alone. When ``max_output`` of them survive, they are the
answer; when every valid candidate is among them, so is everything else. Only otherwise does NMS
have to look further, and then it runs on all candidates.

SSD post-processing hands NMS 90 classes x 300 candidates, and
:func:`mbv3_jax.ops.boxes.batched_nms_padded` spends a pass over every candidate per kept box, so
running it on the best 1,024 first is much cheaper (timings in docs/performance.md). The result is
the same, including torchvision's run-time choice between its per-class path and the
coordinate-offset path (made on the count of *all* valid candidates: with ``num_candidates`` above
``vanilla_numel // 4`` the preselection sees the same side of it).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from mbv3_jax.ops.boxes import TORCHVISION_CPU_VANILLA_NUMEL, batched_nms_padded

__all__ = ["batched_nms_top_first"]


@partial(jax.jit, static_argnames=("iou_threshold", "max_output", "num_candidates", "vanilla_numel"))
def batched_nms_top_first(
    boxes: jax.Array,
    scores: jax.Array,
    idxs: jax.Array,
    valid: jax.Array,
    iou_threshold: float,
    max_output: int,
    num_candidates: int = 1024,
    vanilla_numel: int = TORCHVISION_CPU_VANILLA_NUMEL,
) -> tuple[jax.Array, jax.Array]:
    """:func:`mbv3_jax.ops.boxes.batched_nms_padded` (same arguments, same result), computed on the
    ``num_candidates`` highest-scoring valid candidates when that decides it.

    Scores must not be NaN (torch orders NaN first; ``lax.top_k`` does not). Call it outside
    ``vmap`` (e.g. under ``lax.map``) so that the fallback to all candidates runs only when needed.
    """
    n = scores.shape[0]
    m = min(n, num_candidates)
    if m <= vanilla_numel // 4 < n:
        raise ValueError(
            f"num_candidates={num_candidates} must exceed vanilla_numel // 4 = {vanilla_numel // 4}: "
            "the preselection must fall on the same side of torchvision's path switch as all candidates"
        )

    def everything(_):
        return batched_nms_padded(boxes, scores, idxs, valid, iou_threshold, max_output, vanilla_numel)

    if m == n:
        return everything(None)
    # The m best valid candidates, in descending score order (equal scores: lower index first).
    _, top = lax.top_k(jnp.where(valid, scores, -jnp.inf), m)
    top = top.astype(jnp.int32)
    top_valid = valid[top]
    keep, count = batched_nms_padded(
        boxes[top], scores[top], idxs[top], top_valid, iou_threshold, max_output, vanilla_numel
    )
    keep = jnp.where(keep >= 0, top[jnp.maximum(keep, 0)], -1)
    decided = (count >= max_output) | (jnp.sum(valid) <= m)
    return lax.cond(decided, lambda _: (keep, count), everything, None)
