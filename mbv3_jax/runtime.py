"""Run NNX model methods compiled, so that the obvious call ``model(x)`` is the fast one.

An eager NNX call runs op by op, ``nnx.jit`` re-walks the module graph on every call, and even
``nnx.split`` costs more than a batch-1 forward pass (timings in docs/performance.md). So per model
we cache, keyed by a cheap structural signature:

* the graphdef (static structure: module tree, eval/train flags, hyper-parameters) and
* the ordered list of ``nnx.Variable`` objects behind the state leaves,

and each call reads the variables' current arrays and runs one module-level ``jax.jit`` function
(one compiled program per graphdef, method and input shape). Replacing a submodule or a Variable,
or changing a static attribute, selects a new entry, while in-place value updates (optimizer
steps, ``nnx.update``) are read as they are. The signature walk itself is not free, so when every
node of the model is a :class:`Module` / :class:`List` / :class:`Dropout` from here (whose
``__setattr__`` bumps a global structure version) it is skipped while nothing has been set anywhere
since.
In eval mode the compiled program returns only the outputs (no BatchNorm statistics to write back).
Inside a user's own ``jax.jit`` / ``nnx.jit`` / ``jax.grad`` (inputs are tracers) the method runs
inline instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import weakref
from typing import Any

import jax
from flax import nnx
from flax.nnx import pytreelib

_MAX_ENTRIES_PER_MODEL = 8
_structure_version = 0


def _bump_structure_version() -> None:
    global _structure_version
    _structure_version += 1


class _Tracked:
    """Mixin: any attribute assignment (new submodule, eval()/train() flags) bumps the version."""

    def __setattr__(self, name: str, value: Any) -> None:
        _bump_structure_version()
        super().__setattr__(name, value)


class Module(_Tracked, nnx.Module):
    """Base class of this library's modules."""


class Model(Module):
    """Base class of whole models: each records how to rebuild itself in ``architecture_json``
    (set by its constructor), which checkpoints and porting read back."""

    architecture_json: str

    @property
    def architecture(self) -> dict[str, Any]:
        """How to rebuild this model: ``{"builder": name, "kwargs": {...}}`` (JSON-serialisable)."""
        return json.loads(self.architecture_json)


class List(_Tracked, nnx.List):
    """``nnx.List`` whose item assignment is tracked (it goes through ``setattr``)."""


class Dropout(_Tracked, nnx.Dropout):
    """``nnx.Dropout`` with tracked attributes (``rate``, ``deterministic``)."""


_TRACKED_TYPES = (_Tracked, nnx.RngStream)


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


class _StaticKey:
    """(graphdef, treedefs) with a cached hash: hashing a graphdef is slow, and jax hashes static
    arguments on every call."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: tuple):
        self.value, self._hash = value, hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, _StaticKey) and self.value == other.value)


@dataclasses.dataclass(frozen=True)
class _Entry:
    param_vars: tuple[nnx.Variable, ...]
    other_vars: tuple[nnx.Variable, ...]
    mutable: bool  # some BatchNorm uses batch statistics or some Dropout is active
    tracked: bool  # every graph node tracks its attribute assignments
    static_key: _StaticKey  # (graphdef, param treedef, other treedef)


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


def is_frozen(model: nnx.Module) -> bool:
    """True when no BatchNorm uses batch statistics and no Dropout is active (eval mode)."""
    for _, node in nnx.iter_graph(model):
        if (
            getattr(node, "use_running_average", None) is False
            or getattr(node, "deterministic", None) is False
        ):
            return False
    return True


def _build_entry(model: nnx.Module) -> _Entry:
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    nodes = [node for _, node in nnx.iter_graph(model) if _kind(node) == _NODE]
    return _Entry(
        _variables_in_leaf_order(model, params),
        _variables_in_leaf_order(model, other),
        mutable=not is_frozen(model),
        tracked=all(isinstance(node, _TRACKED_TYPES) for node in nodes),
        static_key=_StaticKey((graphdef, jax.tree.structure(params), jax.tree.structure(other))),
    )


_ENTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> (structure version, entry): valid while no tracked attribute was set anywhere.
_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _entry_for(model: nnx.Module) -> _Entry:
    last = _LAST.get(model)
    if last is not None and last[0] == _structure_version:
        return last[1]
    sig = _signature(model)
    per_model = _ENTRIES.setdefault(model, {})
    entry = per_model.get(sig)
    if entry is None:
        if len(per_model) >= _MAX_ENTRIES_PER_MODEL:
            per_model.clear()
        entry = per_model[sig] = _build_entry(model)
    if entry.tracked:
        _LAST[model] = (_structure_version, entry)
    else:
        _LAST.pop(model, None)
    return entry


def _merge(entry_key: _StaticKey, param_leaves: list, other_leaves: list) -> nnx.Module:
    graphdef, param_treedef, other_treedef = entry_key.value
    params = jax.tree.unflatten(param_treedef, param_leaves)
    other = jax.tree.unflatten(other_treedef, other_leaves)
    return nnx.merge(graphdef, params, other)


@functools.partial(jax.jit, static_argnames=("entry_key", "method", "static_args"))
def _run_method(param_leaves, other_leaves, args, *, entry_key, method: str, static_args: tuple):
    model = _merge(entry_key, param_leaves, other_leaves)
    out = getattr(model, method)(*args, *static_args)
    # BatchNorm statistics and RNG counters may have changed (train mode): return them.
    new_other = nnx.state(model, nnx.Not(nnx.Param))
    return out, jax.tree.leaves(new_other)


@functools.partial(jax.jit, static_argnames=("entry_key", "method", "static_args"))
def _run_method_frozen(param_leaves, other_leaves, args, *, entry_key, method: str, static_args: tuple):
    """As _run_method for a model whose state cannot change (eval mode): outputs only."""
    model = _merge(entry_key, param_leaves, other_leaves)
    return getattr(model, method)(*args, *static_args)


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
    run = _run_method if entry.mutable else _run_method_frozen
    result = run(
        params,
        [v.get_raw_value() for v in entry.other_vars],
        args,
        entry_key=entry.static_key,
        method=method,
        static_args=tuple(static_args),
    )
    if not entry.mutable:
        return result
    out, new_other = result
    for var, value in zip(entry.other_vars, new_other, strict=True):
        var.set_raw_value(value)
    return out
