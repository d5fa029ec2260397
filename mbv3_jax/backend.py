"""The backend seam: the one place that chooses CPU-specific kernels and schedules.

XLA:CPU runs a few things slowly (grouped convolutions above all), so on the CPU this library
computes them another way (``mbv3_jax.cpu_kernels``: same functions, other rounding) and schedules
eval passes for the cache (micro-batches, results kept in their own buffers). Everything here follows
the platform a program is *lowered* for, not the process's default backend: each choice is a
``jax.lax.platform_dependent`` whose CPU branch holds the rewrite and whose default branch is XLA's
generic op, so a program exported for TPU or CUDA from a CPU host carries no CPU rewrite.

``MBV3_CPU_KERNELS=0`` in the environment, ``set_cpu_kernels(False)`` or ``with cpu_kernels(False):``
runs the generic path on the CPU too (what a TPU or GPU runs). The switch is read when a program is
traced and is part of ``jax.jit``'s cache key, so toggling it selects other compiled programs.

One choice is per process instead: ``set_cpu_xla_flags``, which the command-line tools call before
JAX starts, because XLA reads those flags from the environment only (other backends ignore them).

Inside the CPU branch everything nested is decided for the CPU directly (and inside the default
branch for the generic path), so a model is traced twice, not once per nesting level.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mbv3_jax import cpu_kernels as kernels
from mbv3_jax.ops.conv import explicitly_sharded, xla_conv

Array = jax.Array

ENV_VAR = "MBV3_CPU_KERNELS"
# Name scope of every CPU-only computation: lowered programs show where CPU rewrites are.
CPU_SCOPE = "mbv3_cpu_kernels"
# Dense convs with at most this many input channels (the RGB stem) run as broadcast multiply-adds.
FEW_INPUT_CHANNELS = 4
# The expand conv computes the depthwise conv's zero border when it adds at most this much area.
MAX_BORDER_GROWTH = 1.05


def _from_environment() -> bool:
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV_VAR}={value!r}: expected 1 (CPU kernels on, the default) or 0 (generic path)")


_cpu_kernels_on = jax.make_user_context(default_value=_from_environment())
_branch = threading.local()


def cpu_kernels_enabled() -> bool:
    """Whether programs lowered for the CPU use the CPU kernels (default: yes)."""
    return bool(_cpu_kernels_on.value)


def set_cpu_kernels(enabled: bool) -> None:
    """Turn the CPU kernels on or off for this process (``MBV3_CPU_KERNELS`` sets the default)."""
    _cpu_kernels_on.set_global(bool(enabled))


@contextlib.contextmanager
def cpu_kernels(enabled: bool) -> Iterator[None]:
    """``with cpu_kernels(False): ...`` traces the generic path on the CPU within the block."""
    with _cpu_kernels_on(bool(enabled)):
        yield


@contextlib.contextmanager
def _deciding(branch: str) -> Iterator[None]:
    previous = getattr(_branch, "value", None)
    _branch.value = branch
    try:
        yield
    finally:
        _branch.value = previous


def platform_choice(cpu_fn: Callable[..., Any], generic_fn: Callable[..., Any], *args: Any) -> Any:
    """``cpu_fn(*args)`` in programs lowered for the CPU (CPU kernels on), else ``generic_fn(*args)``.

    Both must compute the same function of ``args`` (arrays or pytrees of arrays) and must not
    update module state (they may run as branches of a conditional).
    """
    if not cpu_kernels_enabled():
        return generic_fn(*args)
    decided = getattr(_branch, "value", None)
    if decided == "cpu":
        return cpu_fn(*args)
    if decided == "generic":
        return generic_fn(*args)

    def on_cpu(*a):
        with _deciding("cpu"), jax.named_scope(CPU_SCOPE):
            return cpu_fn(*a)

    def elsewhere(*a):
        with _deciding("generic"):
            return generic_fn(*a)

    return jax.lax.platform_dependent(*args, cpu=on_cpu, default=elsewhere)


# XLA:CPU flags for the command-line tools (XLA reads these from the process's XLA_FLAGS only, when
# JAX starts its backend): the concurrency-optimized scheduler keeps more temporaries live at once,
# and a CPU training step maps its temporaries afresh every step (docs/performance.md).
CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def set_cpu_xla_flags() -> None:
    """Add ``CPU_XLA_FLAGS`` to ``XLA_FLAGS`` (a flag the user already set wins; CPU kernels off: no
    change). Effective only before JAX's first computation; other backends ignore these flags."""
    if not cpu_kernels_enabled():
        return
    current = os.environ.get("XLA_FLAGS", "").split()
    named = {flag.split("=")[0] for flag in current}
    missing = [flag for flag in CPU_XLA_FLAGS if flag.split("=")[0] not in named]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join(current + missing)


# ------------------------------------------------------------------------------------------------
# Kernels


def _cpu_conv(
    kernel_shape: tuple[int, ...], stride: int, padding: int, dilation: int, groups: int, dense_rewrites: bool
) -> Callable[[Array, Array], Array] | None:
    """The CPU kernel for a convolution of this shape, or None where XLA's own is the best choice."""
    kh, kw, cin_per_group, cout = kernel_shape
    if groups > 1 and groups == cout and cin_per_group == 1:
        return lambda x, k: kernels.depthwise_conv_shift(x, k, stride, padding, dilation)
    if groups != 1:
        return None
    if kh == kw == 1 and stride == 1 and padding == 0:
        return kernels.pointwise_conv_dot
    if not dense_rewrites:
        return None
    if stride == 1 and dilation > 1:
        return lambda x, k: kernels.dilated_conv_taps(x, k, padding, dilation)
    if dilation == 1 and cin_per_group <= FEW_INPUT_CHANNELS:
        return lambda x, k: kernels.few_channel_conv_taps(x, k, stride, padding)
    return None


def conv2d(
    x: Array,
    kernel: Array,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    dense_rewrites: bool = True,
) -> Array:
    """NHWC / HWIO convolution with symmetric padding: a CPU kernel on the CPU, XLA's elsewhere.

    ``dense_rewrites=False`` keeps XLA's convolution for dense kxk convs on the CPU too (the QAT
    model's bit-exact mode relies on the order of Eigen's sums there).
    """
    cpu = _cpu_conv(kernel.shape, stride, padding, dilation, groups, dense_rewrites)

    def generic(x: Array, k: Array) -> Array:
        return xla_conv(x, k, stride, padding, dilation, groups)

    if cpu is None:
        return generic(x, kernel)
    return platform_choice(cpu, generic, x, kernel)


def integer_depthwise_conv(
    centered: Array, kernel: Array, *, stride: int, padding: int, dilation: int
) -> Array:
    """Depthwise conv of integer-valued float32 ``centered`` (x - zero point, zero-padded) with an
    int8 kernel, in int32. Exact on every platform: all products and partial sums are integers below
    2**24 for k*k <= 25 (checked), so float32 sums are exact in any order."""
    kh, kw = kernel.shape[:2]
    if kh * kw * 255 * 128 >= 2**24:
        raise ValueError(f"a {kh}x{kw} depthwise kernel is too large for exact float32 sums")
    w32 = kernel.astype(jnp.float32)

    def generic(x: Array, k: Array) -> Array:
        groups = x.shape[-1]
        return xla_conv(x, k, stride, padding, dilation, groups, jax.lax.Precision.HIGHEST).astype(jnp.int32)

    def cpu(x: Array, k: Array) -> Array:
        return kernels.depthwise_shift_forward(x, k, stride, padding, dilation).astype(jnp.int32)

    return platform_choice(cpu, generic, centered, w32)


# ------------------------------------------------------------------------------------------------
# Schedules


def unfused(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, computed into its own buffers on the CPU (elsewhere: ``fn(*args)``).

    For a producer that several consumers read (SE reads the depthwise output twice; RoIAlign feeds
    a matmul): XLA:CPU would recompute it inside each consumer. ``fn`` must not update module state.
    """
    return platform_choice(lambda *a: kernels.own_buffers(fn, *a), fn, *args)


def map_micro_batches(fn: Callable[[Array], Any], x: Array, size: int) -> Any:
    """``fn(x)`` computed over micro-batches of ``size`` samples (``lax.map``), outputs re-joined.

    For per-sample functions (eval mode) only: the result is then that of ``fn(x)`` up to rounding
    (XLA blocks a matmul by its row count). ``size`` 0, a batch no larger, a symbolic batch
    (``jax.export`` with a batch dimension left open) or one split over devices by its type (explicit
    sharding, where each device computes its own part): ``fn(x)`` itself.
    """
    n = x.shape[0]
    # A symbolic batch cannot be compared with ``size`` or padded to a multiple of it.
    if not size or jax.export.is_symbolic_dim(n) or n <= size or explicitly_sharded(x):
        return fn(x)
    pad = (-n) % size
    xs = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(-1, size, *x.shape[1:])
    out = jax.lax.map(fn, xs)
    return jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:])[:n], out)


def eval_micro_batches(fn: Callable[[Array], Any], x: Array, requested: int | None, cpu_default: int) -> Any:
    """An eval pass of a per-sample ``fn`` scheduled by micro-batch size.

    ``requested``: None (``cpu_default`` samples at a time on the CPU, where a micro-batch keeps
    activations in cache; the whole batch elsewhere), 0 (the whole batch) or a size (everywhere).
    """
    if requested is None:
        return platform_choice(lambda x: map_micro_batches(fn, x, cpu_default), fn, x)
    return map_micro_batches(fn, x, requested)


def run_sequential(layers: Sequence[Callable[[Array], Array]], x: Array) -> Array:
    """``x`` through ``layers`` in order, scheduled for the CPU where the layers allow it.

    In eval mode (layers that only read their statistics) on the CPU: the output of a layer that
    squeeze-excitation reads twice goes to its own buffer, and an expand 1x1 conv followed by a
    padded depthwise conv computes the depthwise conv's zero border itself (see
    ``_expand_with_border``). Elsewhere, and in train mode: the plain loop.
    """

    def plain(x: Array) -> Array:
        for layer in layers:
            x = layer(x)
        return x

    if not all(_reads_only_statistics(layer) for layer in layers):
        return plain(x)
    return platform_choice(lambda x: _cpu_sequential(layers, x), plain, x)


def _reads_only_statistics(layer: Any) -> bool:
    """Whether ``layer`` may run inside a conditional's branch: no BatchNorm of it updates running
    statistics (layers without normalisation qualify)."""
    bn = getattr(layer, "bn", None)
    return bn is None or getattr(bn, "use_running_average", True)


def _cpu_sequential(layers: Sequence[Any], x: Array) -> Array:
    i = 0
    while i < len(layers):
        layer = layers[i]
        following = layers[i + 1] if i + 1 < len(layers) else None
        after_that = layers[i + 2] if i + 2 < len(layers) else None
        if following is not None and _border_fits(layer, following, after_that, x):
            x, i = _expand_with_border(layer, following, x), i + 2
            continue
        if getattr(following, "reads_input_twice", False):
            x = kernels.own_buffers(layer, x)
        else:
            x = layer(x)
        i += 1
    return x


def _border_fits(expand: Any, depthwise: Any, after: Any, x: Array) -> bool:
    """Whether ``expand`` (1x1 conv-BN-act) should write the zero border ``depthwise`` (a padded
    depthwise conv-BN-act) reads: not when squeeze-excitation follows (its output has its own
    buffer then) and only if the border adds at most MAX_BORDER_GROWTH of area (the 1x1 conv
    computes it too)."""
    conv_e, conv_d = getattr(expand, "conv", None), getattr(depthwise, "conv", None)
    if conv_e is None or conv_d is None or getattr(after, "reads_input_twice", False):
        return False
    if not (getattr(conv_e, "is_pointwise", False) and getattr(conv_d, "is_depthwise", False)):
        return False
    p = conv_d.padding
    h, w = x.shape[1:3]
    return p > 0 and (h + 2 * p) * (w + 2 * p) <= MAX_BORDER_GROWTH * h * w


def _expand_with_border(expand: Any, depthwise: Any, x: Array) -> Array:
    """Expand 1x1 + depthwise with the 1x1 conv computed on the zero-padded (narrower) input.

    The depthwise conv reads a zero-bordered copy of the expanded map; padding the narrower input
    instead moves a third to a quarter of the bytes. The border's normalised, activated values are
    replaced by exact zeros, so the depthwise conv sees the same numbers: outputs identical, bit for
    bit.
    """
    p = depthwise.conv.padding
    _, h, w, _ = x.shape
    y = expand(jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))))
    rows = jnp.arange(h + 2 * p)[:, None]
    cols = jnp.arange(w + 2 * p)[None, :]
    inside = (rows >= p) & (rows < h + p) & (cols >= p) & (cols < w + p)
    y = jnp.where(inside[None, :, :, None], y, jnp.zeros((), y.dtype))
    return depthwise(y, padding=0)
