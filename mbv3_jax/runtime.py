"""Run NNX model methods compiled, so that the obvious call ``model(x)`` is the fast one.

An eager NNX call runs op by op (~10x slower than compiled here), ``nnx.jit`` re-walks the module
graph on every call, and even ``nnx.split`` costs ~5-15 ms for MobileNetV3 on this CPU — more
than the batch-1 forward itself. So per model we cache, keyed by a cheap structural signature:

* the graphdef (static structure: module tree, eval/train flags, hyper-parameters) and
* the ordered list of ``nnx.Variable`` objects behind the state leaves,

and each call reads the variables' current arrays and runs one module-level ``jax.jit`` function
(one compiled program per graphdef, method and input shape). The signature is recomputed every
call (~0.3 ms): replacing a submodule or a Variable, or changing a static attribute, selects a new
entry, while in-place value updates (optimizer steps, ``nnx.update``) are read as they are.
Inside a user's own ``jax.jit`` / ``nnx.jit`` / ``jax.grad`` (inputs are tracers) the method runs
inline instead.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

import jax
from flax import nnx
from flax.nnx import pytreelib

_MAX_ENTRIES_PER_MODEL = 8


def is_traced(*trees: Any) -> bool:
    """True when any leaf is a jax tracer, i.e. we are inside a transformation."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


_KIND_BY_TYPE: dict[type, int] = {}
_LEAF, _VARIABLE, _NODE = 0, 1, 2


def _kind(value: Any) -> int:
    # isinstance against nnx's metaclasses is slow; classify each type once.
    t = type(value)
    kind = _KIND_BY_TYPE.get(t)
    if kind is None:
        if isinstance(value, nnx.Variable):
            kind = _VARIABLE
        elif isinstance(value, pytreelib.Pytree):
            kind = _NODE
        else:
            kind = _LEAF
        _KIND_BY_TYPE[t] = kind
    return kind


def _signature(node: Any) -> tuple:
    """Identity of every graph node and Variable plus every static attribute value, in order."""
    out: list = []

    def walk(obj: Any) -> None:
        out.append(id(obj))
        for name, value in vars(obj).items():
            kind = _kind(value)
            if kind == _NODE:
                if not name.startswith("_pytree__"):
                    out.append(name)
                    walk(value)
            elif kind == _VARIABLE:
                out.append((name, id(value)))
            elif not name.startswith("_pytree__"):
                try:
                    hash(value)
                    out.append((name, value))
                except TypeError:
                    out.append((name, id(value)))

    walk(node)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Entry:
    graphdef: Any
    param_vars: tuple[nnx.Variable, ...]
    param_treedef: Any
    other_vars: tuple[nnx.Variable, ...]
    other_treedef: Any


def _variables_in_leaf_order(model: nnx.Module, state: nnx.State) -> tuple[nnx.Variable, ...]:
    by_path = {path: var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Variable)}
    flat, _ = jax.tree.flatten_with_path(state)
    variables = []
    for keypath, leaf in flat:
        path = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in keypath)
        var = by_path.get(path)
        if var is None:  # state leaves sit one level below their Variable node
            var = by_path.get(path[:-1])
        if var is None or var.get_raw_value() is not leaf:
            raise RuntimeError(f"internal error: could not match state leaf {path} to its Variable")
        variables.append(var)
    return tuple(variables)


def _build_entry(model: nnx.Module) -> _Entry:
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    return _Entry(
        graphdef,
        _variables_in_leaf_order(model, params),
        jax.tree.structure(params),
        _variables_in_leaf_order(model, other),
        jax.tree.structure(other),
    )


_ENTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _entry_for(model: nnx.Module) -> _Entry:
    sig = _signature(model)
    per_model = _ENTRIES.setdefault(model, {})
    entry = per_model.get(sig)
    if entry is None:
        if len(per_model) >= _MAX_ENTRIES_PER_MODEL:
            per_model.clear()
        entry = per_model[sig] = _build_entry(model)
    return entry


@functools.partial(jax.jit, static_argnames=("entry_key", "method", "static_args"))
def _run_method(param_leaves, other_leaves, args, *, entry_key, method: str, static_args: tuple):
    graphdef, param_treedef, other_treedef = entry_key
    params = jax.tree.unflatten(param_treedef, param_leaves)
    other = jax.tree.unflatten(other_treedef, other_leaves)
    model = nnx.merge(graphdef, params, other)
    out = getattr(model, method)(*args, *static_args)
    # BatchNorm statistics and RNG counters may have changed (train mode): return them.
    new_other = nnx.state(model, nnx.Not(nnx.Param))
    return out, jax.tree.leaves(new_other)


def call_compiled(model: nnx.Module, method: str, *args: Any, static_args: tuple = ()) -> Any:
    """Run ``model.<method>(*args, *static_args)`` through the compiled-program cache.

    ``static_args`` must be hashable (they select a program, e.g. which feature stages to return).
    Updated non-parameter state (BatchNorm running statistics in train mode) is written back.
    """
    if is_traced(args):
        return getattr(model, method)(*args, *static_args)
    entry = _entry_for(model)
    params = [v.get_raw_value() for v in entry.param_vars]
    if is_traced(params):  # e.g. nnx.grad over the model with concrete inputs
        return getattr(model, method)(*args, *static_args)
    out, new_other = _run_method(
        params,
        [v.get_raw_value() for v in entry.other_vars],
        args,
        entry_key=(entry.graphdef, entry.param_treedef, entry.other_treedef),
        method=method,
        static_args=tuple(static_args),
    )
    for var, value in zip(entry.other_vars, new_other, strict=True):
        var.set_raw_value(value)
    return out
