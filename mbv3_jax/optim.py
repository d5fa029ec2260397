"""RMSProp as TensorFlow and PyTorch define it, and torchvision's learning-rate schedules, in optax.

The three RMSProp conventions differ in three places (``g`` gradient, ``s`` mean square, ``m`` momentum
buffer, ``lr_t`` the learning rate at step ``t``):

==============  ===============  ========================  ==========================================
framework       ``s`` starts at  denominator               momentum / learning rate
==============  ===============  ========================  ==========================================
TF1 (paper)     1.0              ``sqrt(s + eps)``         ``m = mu*m + lr_t*g/den; theta -= m``
Keras 2/3       0.0              ``sqrt(s + eps)``         ``m = mu*m + lr_t*g/den; theta -= m``
PyTorch         0.0              ``sqrt(s) + eps``         ``m = mu*m + g/den; theta -= lr_t*m``
==============  ===============  ========================  ==========================================

With a constant learning rate the last column is the same thing; once a schedule changes ``lr_t`` it is
not: TF keeps the old learning rates inside ``m``, PyTorch rescales the whole buffer.
:func:`rmsprop_tf` and :func:`rmsprop_torch` reproduce each convention exactly, under any schedule.

Schedules are optax schedules, functions of the optimizer's update count. Torch's schedulers are stepped
once per epoch in torchvision's references, so the per-epoch ones take ``steps_per_epoch``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "cosine_lr",
    "detection_lr",
    "linear_lr",
    "linear_warmup",
    "multistep_lr",
    "rmsprop_tf",
    "rmsprop_torch",
    "schedule_values",
    "step_lr",
    "tf_eps_from_torch",
    "torch_eps_from_tf",
    "weight_decay_mask",
]

# Decays tabulated exactly (torch's chained float64 products) by step_lr; later ones use a power.
_TABLE_SIZE = 1024

MaskOrFn = Any  # a pytree of bools like the params, or a callable params -> such a pytree


# --------------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------------


def _coupled_weight_decay(weight_decay: float, mask: MaskOrFn | None) -> optax.GradientTransformation:
    if not weight_decay:
        return optax.identity()
    return optax.add_decayed_weights(weight_decay, mask)


def rmsprop_tf(
    learning_rate: optax.ScalarOrSchedule,
    decay: float = 0.9,
    momentum: float = 0.9,
    eps: float = 1e-3,
    centered: bool = False,
    *,
    keras: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskOrFn | None = None,
) -> optax.GradientTransformation:
    """TensorFlow's RMSProp: TF1 ``tf.compat.v1.train.RMSPropOptimizer`` (the MobileNetV3 paper's).

    ``ms = decay*ms + (1-decay)*g**2`` with ``ms`` starting at 1.0 (``keras=True``: at 0.0, as Keras 2/3
    ``RMSprop``); centered: ``mg = decay*mg + (1-decay)*g`` and ``ms - mg**2`` in place of ``ms``;
    ``mom = momentum*mom + lr_t * g / sqrt(ms + eps)``; ``theta -= mom``. The learning rate is inside the
    momentum accumulator, so this holds under any schedule. ``momentum=0`` keeps no buffer (as Keras).

    This is ``optax.rmsprop(eps_in_sqrt=True, initial_scale=...)``; ``weight_decay`` adds
    ``weight_decay * theta`` to the gradient first (an L2 loss term ``weight_decay/2 * |theta|^2`` as
    ``tf.nn.l2_loss``/slim's ``l2_regularizer``; Keras' ``regularizers.L2(l)`` is ``weight_decay=2*l``),
    restricted to ``weight_decay_mask`` (see :func:`weight_decay_mask`) when given.

    Note: TF1 converts Python-float hyper-parameters to float32 tensors before casting them to the
    variable dtype, so float64 TF1 variables see float32-rounded ``decay``/``eps``/``lr`` unless they are
    passed as float64 tensors; Keras 3 stores a float ``learning_rate`` in a float32 variable.
    """
    return optax.chain(
        _coupled_weight_decay(weight_decay, weight_decay_mask),
        optax.rmsprop(
            learning_rate,
            decay=decay,
            eps=eps,
            initial_scale=0.0 if keras else 1.0,
            eps_in_sqrt=True,
            centered=centered,
            momentum=momentum if momentum else None,
        ),
    )


def rmsprop_torch(
    learning_rate: optax.ScalarOrSchedule,
    alpha: float = 0.99,
    eps: float = 1e-8,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    centered: bool = False,
    *,
    weight_decay_mask: MaskOrFn | None = None,
) -> optax.GradientTransformation:
    """PyTorch's ``torch.optim.RMSprop`` (torchvision's classification recipe), exact under any schedule.

    ``g += weight_decay*theta`` (coupled, only where ``weight_decay_mask`` is True when given, like torch
    param groups with ``weight_decay=0``); ``s = alpha*s + (1-alpha)*g**2`` from 0; centered:
    ``gbar = alpha*gbar + (1-alpha)*g`` and ``s - gbar**2`` in place of ``s``;
    ``d = sqrt(s) + eps`` (eps OUTSIDE the root); ``buf = momentum*buf + g/d``; ``theta -= lr_t*buf``.

    The learning rate multiplies the momentum buffer after it is updated, which ``optax.rmsprop`` (lr
    inside the buffer) reproduces only while the learning rate is constant.
    torchvision recipe: ``rmsprop_torch(step_lr(0.064, steps_per_epoch), alpha=0.9, eps=0.0316,
    momentum=0.9, weight_decay=1e-5)``.
    """
    scale = optax.scale_by_stddev if centered else optax.scale_by_rms
    return optax.chain(
        _coupled_weight_decay(weight_decay, weight_decay_mask),
        scale(decay=alpha, eps=eps, initial_scale=0.0, eps_in_sqrt=False, bias_correction=False),
        optax.trace(decay=momentum) if momentum else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )


def torch_eps_from_tf(tf_eps: float) -> float:
    """PyTorch ``eps`` that approximates TensorFlow's: ``sqrt(tf_eps)`` (1e-3 -> 0.0316, torchvision's).

    TF divides by ``sqrt(s + e_tf)``, torch by ``sqrt(s) + e_t``. Both tend to ``sqrt(s)`` when
    ``s >> eps`` and to the floors ``sqrt(e_tf)`` and ``e_t`` when ``s -> 0``: equal floors give
    ``e_t = sqrt(e_tf)``. In between they are not equal: with that choice
    ``1 <= (sqrt(s) + e_t) / sqrt(s + e_t**2) <= sqrt(2)``, the worst case at ``s = e_t**2``, so a step can
    differ by up to ~29%. The conversion is an approximation of the recipe, not an identity; the other
    differences (TF1's mean square starting at 1.0, the learning rate inside TF's momentum) remain.
    """
    if tf_eps < 0:
        raise ValueError(f"eps must be >= 0, got {tf_eps}")
    return math.sqrt(tf_eps)


def tf_eps_from_torch(torch_eps: float) -> float:
    """TensorFlow ``eps`` that approximates PyTorch's: ``torch_eps**2`` (see :func:`torch_eps_from_tf`)."""
    if torch_eps < 0:
        raise ValueError(f"eps must be >= 0, got {torch_eps}")
    return torch_eps * torch_eps


def _path_names(path: Sequence[Any]) -> list[str]:
    names: list[str] = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.extend(str(key.key).replace("/", ".").split("."))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        else:
            names.append(str(getattr(key, "key", getattr(key, "name", key))))
    # flax NNX variables flatten to `.value` (older versions: `.raw_value`)
    while names and names[-1] in ("value", "raw_value"):
        names.pop()
    return names


def weight_decay_mask(params: Any, *, decay_norm: bool = False, decay_bias: bool = False) -> Any:
    """A pytree of bools like ``params``: True where weight decay applies.

    The rule, for any pytree (dicts of arrays with torch names, Flax NNX ``nnx.State``, ...):

    * a *bias*: a leaf whose name (the last path key; dotted/slashed keys are split) is ``bias``;
    * a *norm* parameter: any other leaf with ``ndim <= 1`` (BatchNorm/LayerNorm/GroupNorm scale, which
      is ``weight`` in torch and ``scale`` in Flax; BN's 1-D ``bias`` is already a bias);
    * everything else (conv kernels, linear weights: ``ndim >= 2``) is decayed.

    Biases and norm parameters are decayed only if ``decay_bias`` / ``decay_norm`` is set, mirroring the
    ``--bias-weight-decay`` / ``--norm-weight-decay`` options of torchvision's classification reference
    (with both False: torchvision's ``norm_weight_decay=0.0`` plus biases undecayed). torchvision's
    *default* recipe decays every parameter: pass no mask for that. Use ``functools.partial`` to get a
    callable mask with options, or pass this function itself as optax's ``mask``.
    """

    def leaf_mask(path: Sequence[Any], leaf: Any) -> bool:
        names = _path_names(path)
        if names and names[-1] == "bias":
            return decay_bias
        if np.ndim(leaf) <= 1:
            return decay_norm
        return True

    return jax.tree_util.tree_map_with_path(leaf_mask, params)


# --------------------------------------------------------------------------------------------------
# Schedules (functions of the optimizer update count, like every optax schedule)
# --------------------------------------------------------------------------------------------------
#
# Precision: values are computed in JAX's default float dtype (float64 under x64, else float32).
# StepLR and MultiStepLR are tables of torch's own chained Python-float products (lr *= gamma at each
# decay), so in float64 they are bit-identical to torch and in float32 correctly rounded.
# Cosine and linear use closed forms (torch uses recursive chained updates), cosine written as
# sin^2 of an exact integer argument so it keeps full relative precision down to eta_min.


def _default_float() -> Any:
    return jnp.asarray(0.0).dtype


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def _scheduler_epoch(count: Any, steps_per_epoch: int) -> jax.Array:
    """The scheduler's ``last_epoch`` at optimizer update ``count`` (scheduler stepped per epoch)."""
    return jnp.asarray(count) // steps_per_epoch


def step_lr(base_lr: float, steps_per_epoch: int, step_size: int = 2, gamma: float = 0.973) -> optax.Schedule:
    """torch ``StepLR(step_size, gamma)`` stepped once per epoch of ``steps_per_epoch`` updates.

    ``lr = base_lr * gamma**(epoch // step_size)``; defaults are torchvision's MobileNetV3 recipe (every
    2 epochs x 0.973). ``steps_per_epoch=1`` for a scheduler stepped every update.
    """
    _check_positive(steps_per_epoch=steps_per_epoch, step_size=step_size)
    table = [float(base_lr)]
    for _ in range(_TABLE_SIZE - 1):
        table.append(table[-1] * gamma)  # torch's chainable form, in Python floats
    table_np = np.asarray(table, np.float64)

    def schedule(count: Any) -> jax.Array:
        dtype = _default_float()
        k = _scheduler_epoch(count, steps_per_epoch) // step_size
        idx = jnp.clip(k, 0, _TABLE_SIZE - 1)
        value = jnp.asarray(table_np, dtype)[idx]
        return value * jnp.asarray(gamma, dtype) ** (k - idx)  # == value while k < _TABLE_SIZE

    return schedule


def multistep_lr(
    base_lr: float, steps_per_epoch: int, milestones: Sequence[int] = (16, 22), gamma: float = 0.1
) -> optax.Schedule:
    """torch ``MultiStepLR(milestones, gamma)`` stepped once per epoch (defaults: detection's 16, 22)."""
    _check_positive(steps_per_epoch=steps_per_epoch)
    counts = Counter(int(m) for m in milestones)
    if any(m < 0 for m in counts):
        raise ValueError(f"milestones must be >= 0, got {list(milestones)}")
    bounds = sorted(counts)
    table = [float(base_lr)]
    for m in bounds:
        table.append(table[-1] * gamma ** counts[m])  # torch: lr * gamma ** milestones[epoch]
    table_np = np.asarray(table, np.float64)
    bounds_np = np.asarray(bounds, np.int64)

    def schedule(count: Any) -> jax.Array:
        epoch = _scheduler_epoch(count, steps_per_epoch)
        idx = jnp.searchsorted(jnp.asarray(bounds_np, epoch.dtype), epoch, side="right")
        return jnp.asarray(table_np, _default_float())[idx]

    return schedule


def cosine_lr(base_lr: float, t_max: int, eta_min: float = 0.0, steps_per_epoch: int = 1) -> optax.Schedule:
    """torch ``CosineAnnealingLR(T_max, eta_min)``, stepped every ``steps_per_epoch`` updates.

    ``eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / t_max)) / 2``, periodic in ``2*t_max`` past
    ``t_max`` as torch's is (it rises again); computed as ``sin(pi * (t_max - epoch) / (2 t_max))**2``.
    """
    _check_positive(t_max=t_max, steps_per_epoch=steps_per_epoch)

    def schedule(count: Any) -> jax.Array:
        dtype = _default_float()
        r = _scheduler_epoch(count, steps_per_epoch) % (2 * t_max)
        s = jnp.sin(jnp.asarray(math.pi / (2 * t_max), dtype) * (t_max - r).astype(dtype))
        return eta_min + (base_lr - eta_min) * s * s

    return schedule


def _linear_factor(epoch: jax.Array, start_factor: float, end_factor: float, total_iters: int) -> jax.Array:
    dtype = _default_float()
    ramp = start_factor + (end_factor - start_factor) * epoch.astype(dtype) / total_iters
    return jnp.where(epoch >= total_iters, jnp.asarray(end_factor, dtype), ramp)


def linear_lr(
    base_lr: float,
    start_factor: float = 1.0 / 3,
    end_factor: float = 1.0,
    total_iters: int = 5,
    steps_per_epoch: int = 1,
) -> optax.Schedule:
    """torch ``LinearLR``: ``base_lr * (start + (end - start) * min(epoch, total_iters) / total_iters)``."""
    _check_positive(total_iters=total_iters, steps_per_epoch=steps_per_epoch)

    def schedule(count: Any) -> jax.Array:
        epoch = _scheduler_epoch(count, steps_per_epoch)
        return base_lr * _linear_factor(epoch, start_factor, end_factor, total_iters)

    return schedule


def linear_warmup(
    schedule: optax.ScalarOrSchedule, warmup_steps: int = 1000, start_factor: float = 1.0 / 1000
) -> optax.Schedule:
    """``schedule`` times a per-update linear warm-up factor ``start_factor -> 1`` over ``warmup_steps``.

    Multiplicative, as torch's schedulers compose when two of them step the same optimizer (each scales
    ``group["lr"]``): this is torchvision's detection reference, where a ``LinearLR(start_factor,
    total_iters=warmup_steps)`` is stepped every iteration of the first epoch on top of the per-epoch
    ``MultiStepLR``. (For torch's ``SequentialLR``, where the main schedule starts counting only after the
    warm-up, use ``optax.join_schedules``.) ``warmup_steps=0`` disables the warm-up.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def warmed(count: Any) -> jax.Array:
        base = schedule(count) if callable(schedule) else jnp.asarray(schedule, _default_float())
        if warmup_steps == 0:
            return base
        return base * _linear_factor(jnp.asarray(count), start_factor, 1.0, warmup_steps)

    return warmed


def detection_lr(
    base_lr: float,
    steps_per_epoch: int,
    milestones: Sequence[int] = (16, 22),
    gamma: float = 0.1,
    warmup_factor: float = 1.0 / 1000,
    warmup_iters: int = 1000,
) -> optax.Schedule:
    """torchvision's detection reference schedule (``references/detection/train.py`` + ``engine.py``).

    Per-epoch ``MultiStepLR(milestones, gamma)`` times, during the first epoch only, a per-iteration
    ``LinearLR(warmup_factor, total_iters=min(warmup_iters, steps_per_epoch - 1))``.
    """
    _check_positive(steps_per_epoch=steps_per_epoch)
    warmup = min(warmup_iters, steps_per_epoch - 1)
    return linear_warmup(multistep_lr(base_lr, steps_per_epoch, milestones, gamma), warmup, warmup_factor)


def schedule_values(schedule: Callable[[Any], Any], num_steps: int) -> np.ndarray:
    """``schedule`` evaluated at update counts ``0 .. num_steps-1`` (one vectorised call), as numpy."""
    return np.asarray(schedule(jnp.arange(num_steps)))
