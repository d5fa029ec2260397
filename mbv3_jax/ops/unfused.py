"""Keep a computation out of its consumers' XLA:CPU fusions.

XLA fuses a cheap producer into each consumer loop and recomputes it per consumer element. When the
producer is an index/weight computation and the consumer a large gather (RoIAlign feeding a matmul),
that is 12544 recomputations per RoI. ``jax.lax.optimization_barrier`` does not stop it on XLA:CPU
(the CPU pipeline expands barriers before fusion). A conditional does: its branches are separate
computations, so their results are written to buffers that the consumer reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def unfused(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, computed into its own buffers on the CPU backend (elsewhere: plain ``fn(*args)``).

    Both branches of the conditional are ``fn``, so the result never depends on the predicate; the
    predicate only has to be a value XLA cannot fold at compile time. Differentiable (``lax.cond``).
    """
    # Measured on XLA:CPU only; on a GPU a cond reads its predicate on the host.
    if jax.default_backend() != "cpu":
        return fn(*args)
    leaves = [x for x in jax.tree.leaves(args) if getattr(x, "size", 0)]
    if not leaves:
        return fn(*args)
    # x == x is not foldable for a float (NaN); XLA folds it to true for an integer, hence the convert.
    probe = jnp.ravel(leaves[0])[0].astype(jnp.float32)
    return jax.lax.cond(probe == probe, fn, fn, *args)
