"""mbv3_jax.variables: a strict copy by path checks everything before it writes anything."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mbv3_jax.variables import copy_by_path, describe_mismatch, match_by_path, variables_by_path


class _Net(nnx.Module):
    def __init__(self, features: int = 3, seed: int = 0):
        self.dense = nnx.Linear(2, features, rngs=nnx.Rngs(seed))
        self.stat = nnx.BatchStat(jnp.zeros((features,)))
        self.count = nnx.Variable(jnp.zeros(()))  # neither Param nor BatchStat: never copied


def _values(net: nnx.Module) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in variables_by_path(net).items()}


def test_variables_by_path_filters_by_type():
    net = _Net()
    assert list(variables_by_path(net)) == [("dense", "bias"), ("dense", "kernel"), ("stat",)]
    assert list(variables_by_path(net, nnx.BatchStat)) == [("stat",)]
    assert list(variables_by_path(net, exclude=nnx.BatchStat)) == [("dense", "bias"), ("dense", "kernel")]


def test_copy_renames_casts_and_copies():
    src, dst = _Net(seed=1), _Net()
    src.stat.set_value(jnp.arange(3.0))
    dst.dense.kernel.set_value(dst.dense.kernel.get_value().astype(jnp.bfloat16))
    sources = {("net", *p): v for p, v in variables_by_path(src).items()}
    copy_by_path(sources, variables_by_path(dst), lambda p: p[1:])
    got = _values(dst)
    for path, want in _values(src).items():
        np.testing.assert_array_equal(got[path], want.astype(got[path].dtype))
    assert dst.dense.kernel.get_value().dtype == jnp.bfloat16  # the target's dtype
    src.stat.set_value(jnp.ones(3))
    np.testing.assert_array_equal(np.asarray(dst.stat.get_value()), [0.0, 1.0, 2.0])  # a copy


def test_every_problem_in_one_error_and_nothing_written():
    dst = _Net()
    before = _values(dst)
    sources = {
        ("dense", "kernel"): np.ones((2, 3)),  # fits, yet must not be written
        ("dense", "bias"): np.ones((4,)),  # another shape
        ("extra",): np.zeros((5,)),  # no target; and ("stat",) is left unfilled
    }
    with pytest.raises(ValueError) as e:
        copy_by_path(sources, variables_by_path(dst), context="src does not fit dst")
    assert str(e.value) == (
        "src does not fit dst:\n"
        "  dense.bias: source (4,) vs the target's (3,)\n"
        "  extra (5,) is not in the target\n"
        "  stat (3,) is missing from the source"
    )
    for path, got in _values(dst).items():
        np.testing.assert_array_equal(got, before[path])


def test_renamed_paths_duplicates_and_limit():
    dst = _Net()
    targets = variables_by_path(dst)
    sources = {"a": np.zeros(3), "b": np.zeros(3), "c": np.zeros(7)}
    rename = {"a": ("stat",), "b": ("stat",), "c": ("dense", "bias")}.__getitem__
    _, problems = match_by_path(sources, targets, rename, fill_all=False)
    words = [describe_mismatch(m, source="float model", target="QAT model") for m in problems]
    assert words == ["b and a both map to stat", "c: float model (7,) vs the QAT model's dense.bias (3,)"]
    with pytest.raises(ValueError, match=r"(?s)both map to stat\n  \.\.\. and 2 more$"):
        copy_by_path(sources, targets, rename, limit=1)


def test_convert_runs_before_the_shape_check():
    dst = _Net()
    sources = {("dense", "kernel"): np.ones((3, 2))}  # stored transposed, as torch does
    copy_by_path(sources, variables_by_path(dst), convert=lambda key, a: a.T, fill_all=False)
    np.testing.assert_array_equal(np.asarray(dst.dense.kernel.get_value()), np.ones((2, 3)))
