"""Strict copy of variables by path: every source used once, every target filled, shapes checked first.

The one matcher behind torchvision checkpoints -> models (``porting.mapping``), ``--model.init``
(``train.trainer``) and float -> QAT models (``mbv3_jax.models.qat``). Nothing is written unless
everything fits; otherwise one error lists every problem. No torch here: sources are anything
with a shape (numpy or JAX arrays, ``nnx.Variable``), converted to JAX layout by the caller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

Path = tuple[Any, ...]
K = TypeVar("K", bound=Hashable)
VariableTypes = type[nnx.Variable] | tuple[type[nnx.Variable], ...]

# What a model's weights are: parameters and BatchNorm statistics (not RNG counters, caches, ...).
CHECKPOINTED: tuple[type[nnx.Variable], ...] = (nnx.Param, nnx.BatchStat)


def format_path(path: Hashable) -> str:
    """``features.0.0.kernel`` for a path tuple; any other key as ``str``."""
    return ".".join(str(p) for p in path) if isinstance(path, tuple) else str(path)


def variables_by_path(
    module: nnx.Module, kinds: VariableTypes = CHECKPOINTED, *, exclude: VariableTypes = ()
) -> dict[Path, nnx.Variable]:
    """``module``'s variables of ``kinds`` but not of ``exclude``, by path, in graph order."""
    return {
        tuple(path): var
        for path, var in nnx.iter_graph(module)
        if isinstance(var, kinds) and not isinstance(var, exclude)
    }


def same_path(key: Any) -> Any:
    return key


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """One problem :func:`match_by_path` found, for the caller to word (see :func:`describe_mismatch`).

    ``kind``: ``no_target`` (``source`` maps to ``target``, which does not exist), ``duplicate``
    (``source`` and ``other`` both map to ``target``), ``shape`` (``source_shape`` after ``convert``
    is not ``target_shape``) or ``unfilled`` (no source maps to ``target``; ``source`` is None).
    """

    kind: Literal["no_target", "duplicate", "shape", "unfilled"]
    target: Path
    source: Hashable = None
    source_shape: tuple[int, ...] | None = None
    target_shape: tuple[int, ...] | None = None
    other: Hashable = None


def describe_mismatch(m: Mismatch, source: str = "source", target: str = "target") -> str:
    """A line naming the path(s) and both shapes; ``source`` / ``target`` name the two sides."""
    s, t = format_path(m.source), format_path(m.target)
    renamed = m.source != m.target
    if m.kind == "no_target":
        where = f"maps to {t}, which is" if renamed else "is"
        return f"{s} {m.source_shape} {where} not in the {target}"
    if m.kind == "duplicate":
        return f"{s} and {format_path(m.other)} both map to {t}"
    if m.kind == "shape":
        at = f"{t} " if renamed else ""
        return f"{s}: {source} {m.source_shape} vs the {target}'s {at}{m.target_shape}"
    return f"{t} {m.target_shape} is missing from the {source}"


def _value(x: Any) -> Any:
    return x.get_value() if isinstance(x, nnx.Variable) else x


def match_by_path(
    sources: Mapping[K, Any],
    targets: Mapping[Path, Any],
    rename: Callable[[K], Path] = same_path,
    *,
    convert: Callable[[K, Any], Any] | None = None,
    fill_all: bool = True,
) -> tuple[dict[Path, Any], list[Mismatch]]:
    """Pair each source with the target ``rename(key)``; check, write nothing.

    ``convert(key, value)`` (e.g. a layout change) runs once a source's target is known, before the
    shape check. ``targets`` need only a ``shape``. With ``fill_all`` every target must get a source
    (without it, e.g. for gradients, only the given sources are checked). Returns the (converted)
    values by target path and the problems, sources' first, in order.
    """
    values: dict[Path, Any] = {}
    claimed: dict[Path, K] = {}
    problems: list[Mismatch] = []
    for key, source in sources.items():
        path = rename(key)
        target = targets.get(path)
        value = _value(source)
        if target is None:
            problems.append(Mismatch("no_target", path, key, tuple(np.shape(value))))
            continue
        if path in claimed:
            problems.append(Mismatch("duplicate", path, key, other=claimed[path]))
            continue
        claimed[path] = key
        if convert is not None:
            value = convert(key, value)
        if tuple(np.shape(value)) != tuple(target.shape):
            problems.append(Mismatch("shape", path, key, tuple(np.shape(value)), tuple(target.shape)))
            continue
        values[path] = value
    if fill_all:
        problems += [
            Mismatch("unfilled", path, target_shape=tuple(t.shape))
            for path, t in targets.items()
            if path not in claimed
        ]
    return values, problems


def raise_problems(
    problems: Sequence[str], context: str, *, error: type[ValueError] = ValueError, limit: int = 20
) -> None:
    """Raise one ``error`` listing the first ``limit`` problems and counting the rest; none: return."""
    if not problems:
        return
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    raise error(f"{context}:\n  " + "\n  ".join(problems[:limit]) + more)


def write_by_path(
    values: Mapping[Path, Any], targets: Mapping[Path, nnx.Variable], *, cast: bool = True
) -> None:
    """Set each target to its value (as the target's dtype with ``cast``), as a fresh copy.

    A copy because on CPU ``jnp.asarray`` may alias a numpy buffer that aliases a torch tensor,
    which torch may later update in place (BatchNorm running statistics in train mode).
    """
    for path, value in values.items():
        target = targets[path]
        dtype = target.get_value().dtype if cast else None
        target.set_value(jnp.array(value, dtype=dtype, copy=True))


def copy_by_path(
    sources: Mapping[K, Any],
    targets: Mapping[Path, nnx.Variable],
    rename: Callable[[K], Path] = same_path,
    *,
    convert: Callable[[K, Any], Any] | None = None,
    fill_all: bool = True,
    cast: bool = True,
    context: str = "the variables do not match",
    describe: Callable[[Mismatch], str] = describe_mismatch,
    error: type[ValueError] = ValueError,
    limit: int = 20,
) -> dict[Path, Any]:
    """:func:`match_by_path`, one ``error`` (``context`` and every problem) if anything does not fit,
    else :func:`write_by_path`. Returns the values written, by target path."""
    values, problems = match_by_path(sources, targets, rename, convert=convert, fill_all=fill_all)
    raise_problems([describe(m) for m in problems], context, error=error, limit=limit)
    write_by_path(values, targets, cast=cast)
    return values
