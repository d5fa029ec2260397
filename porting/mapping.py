"""Declarative, strict weight mapping between torch state_dicts and NNX variables.

A mapping is a list of :class:`Rule` (a regular expression over torch keys, a target path
template and a layout transform). Loading is strict in both directions:

* every torch tensor must match a rule, land on an existing variable with the right shape, and
  be used once;
* every variable of the model (parameters and BatchNorm statistics) must be filled.

Errors name the torch key, the JAX path and both shapes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from mbv3_jax.variables import (
    Mismatch,
    Path,
    format_path,
    match_by_path,
    raise_problems,
    variables_by_path,
    write_by_path,
)


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change torch -> JAX and its inverse, both on numpy arrays."""

    name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
# Conv2d weight (out, in/groups, kh, kw) <-> (kh, kw, in/groups, out); depthwise (C,1,k,k) -> (k,k,1,C).
CONV_OIHW_TO_HWIO = Transform(
    "conv OIHW->HWIO", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)
)
# Linear weight (out, in) <-> (in, out).
LINEAR_TRANSPOSE = Transform("linear (out,in)->(in,out)", lambda a: a.T, lambda a: a.T)


def _fc_chw_to_hwc(a: np.ndarray, side: int = 7) -> np.ndarray:
    out = a.shape[0]
    return a.reshape(out, -1, side, side).transpose(0, 2, 3, 1).reshape(out, -1)


def _fc_hwc_to_chw(a: np.ndarray, side: int = 7) -> np.ndarray:
    out = a.shape[0]
    return a.reshape(out, side, side, -1).transpose(0, 3, 1, 2).reshape(out, -1)


# A Linear after flattening (C, 7, 7) RoI features, kept (out, in) as torch stores it: torch's
# input axis is channel-major, mbv3_jax flattens NHWC features (y, x, channel), so it is permuted.
FC_CHW_TO_HWC = Transform("linear over (C,7,7) -> (7,7,C) inputs", _fc_chw_to_hwc, _fc_hwc_to_chw)
# torch stores num_batches_tracked as int64; JAX keeps int32 unless x64 is enabled.
COUNTER = Transform("int64 counter", lambda a: a.astype(np.int32), lambda a: a.astype(np.int64))


# Quantized models. torch keeps zero points as int64 tensors; mbv3_jax as int32 scalars.
ZERO_POINT = Transform("int64 zero point", lambda a: a.astype(np.int32), lambda a: a.astype(np.int64))


def _one_to_scalar(a: np.ndarray) -> np.ndarray:
    # Anything but one element passes through unchanged, so the shape check reports it.
    return a.reshape(()) if a.size == 1 else a


# QuantStub's scale / zero_point are 1-element tensors in torch, scalars in mbv3_jax.
SCALAR_1 = Transform("(1,) -> scalar", _one_to_scalar, lambda a: np.asarray(a).reshape(1))
ZERO_POINT_1 = Transform(
    "int64 (1,) zero point -> int32 scalar",
    lambda a: _one_to_scalar(a).astype(np.int32),
    lambda a: np.asarray(a).reshape(1).astype(np.int64),
)


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern`` (full match on a torch key) -> ``target`` (``re`` template, dots between parts)."""

    pattern: str
    target: str
    transform: Transform = IDENTITY

    def match(self, key: str) -> str | None:
        m = re.fullmatch(self.pattern, key)
        return m.expand(self.target) if m else None


def batchnorm_rules(prefix: str, jax_prefix: str) -> list[Rule]:
    """torch BatchNorm2d at ``prefix`` (regex) -> mbv3_jax BatchNorm at ``jax_prefix``."""
    return [
        Rule(rf"{prefix}\.weight", rf"{jax_prefix}.scale"),
        Rule(rf"{prefix}\.bias", rf"{jax_prefix}.bias"),
        Rule(rf"{prefix}\.running_mean", rf"{jax_prefix}.mean"),
        Rule(rf"{prefix}\.running_var", rf"{jax_prefix}.var"),
        Rule(rf"{prefix}\.num_batches_tracked", rf"{jax_prefix}.num_batches_tracked", COUNTER),
    ]


class WeightMappingError(ValueError):
    """A checkpoint that does not fit the model; the message lists every problem found."""


def parse_path(dotted: str) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def model_variables(model: nnx.Module) -> dict[Path, nnx.Variable]:
    """Every checkpointed variable of ``model`` (parameters and BatchNorm statistics) by path."""
    return variables_by_path(model)


def _resolve(key: str, rules: Iterable[Rule]) -> tuple[Rule, Path] | None:
    for rule in rules:
        target = rule.match(key)
        if target is not None:
            return rule, parse_path(target)
    return None


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _raise(problems: list[str], context: str) -> None:
    raise_problems(problems, context, error=WeightMappingError)


def convert_to_jax(
    tensors: Mapping[str, Any],
    model: nnx.Module,
    rules: list[Rule],
    *,
    strict: bool = True,
    context: str = "checkpoint does not fit the model",
) -> dict[Path, np.ndarray]:
    """Map torch-named tensors to ``{jax_path: array}`` in JAX layout, checking against ``model``.

    With ``strict`` every model variable must be filled; without it (e.g. for gradients, which
    exist only for parameters) only the given tensors are checked.
    """
    resolved: dict[str, tuple[Rule, Path]] = {}
    problems: list[str] = []
    for key in tensors:
        found = _resolve(key, rules)
        if found is None:
            problems.append(f"unexpected key {key!r}: no mapping rule matches it")
        else:
            resolved[key] = found

    def describe(m: Mismatch) -> str:
        path = format_path(m.target)
        if m.kind == "no_target":
            return f"key {m.source!r} maps to {path}, which this model does not have"
        if m.kind == "duplicate":
            return f"key {m.source!r} and key {m.other!r} both map to {path}"
        if m.kind == "shape":
            return (
                f"shape mismatch for key {m.source!r}: checkpoint {tuple(np.shape(tensors[m.source]))} "
                f"(-> {m.source_shape} after {resolved[m.source][0].transform.name}), "
                f"model {path} expects {m.target_shape}"
            )
        return f"missing: model variable {path} {m.target_shape} is not in the checkpoint"

    arrays, mismatches = match_by_path(
        {key: tensors[key] for key in resolved},
        model_variables(model),
        lambda key: resolved[key][1],
        convert=lambda key, value: resolved[key][0].transform.to_jax(_to_numpy(value)),
        fill_all=strict,
    )
    _raise(problems + [describe(m) for m in mismatches], context)
    return arrays


def load_into(model: nnx.Module, arrays: Mapping[Path, np.ndarray]) -> None:
    """Write converted arrays into the model's variables, keeping each variable's dtype."""
    write_by_path(arrays, model_variables(model))


def convert_to_torch(
    model: nnx.Module,
    torch_shapes: Mapping[str, tuple[int, ...]],
    rules: list[Rule],
    *,
    context: str = "model does not fit the torchvision architecture",
) -> dict[str, np.ndarray]:
    """The model's variables as ``{torch_key: array}`` in torch layout, for exactly these keys."""
    variables = model_variables(model)
    out: dict[str, np.ndarray] = {}
    used: set[Path] = set()
    problems: list[str] = []
    for key, shape in torch_shapes.items():
        resolved = _resolve(key, rules)
        if resolved is None:
            problems.append(f"torch key {key!r}: no mapping rule matches it")
            continue
        rule, path = resolved
        var = variables.get(path)
        if var is None:
            problems.append(f"torch key {key!r} needs {format_path(path)}, which this model does not have")
            continue
        array = rule.transform.to_torch(np.asarray(var.get_value()))
        if tuple(array.shape) != tuple(shape):
            problems.append(
                f"shape mismatch for key {key!r}: torchvision expects {tuple(shape)}, "
                f"model {format_path(path)} {tuple(var.shape)} gives {tuple(array.shape)}"
            )
            continue
        out[key] = array
        used.add(path)
    for path in variables.keys() - used:
        problems.append(f"model variable {format_path(path)} has no torch key")
    if problems:
        _raise(problems, context)
    return out
