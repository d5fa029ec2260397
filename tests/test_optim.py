"""mbv3_jax.optim against the real references: torch.optim.RMSprop + lr_scheduler, TF1 and Keras RMSProp.

Every comparison feeds the same gradients to both sides for 20+ steps while a schedule changes the
learning rate. Errors are relative to the largest magnitude of the reference (per tensor, max over tensors);
``displacement`` errors compare ``theta_t - theta_0``, the part the optimizer wrote, which is stricter.
Run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from extras import HAVE_TORCH, needs_torch
from flax import nnx

from mbv3_jax import optim

if HAVE_TORCH:  # the optional "torch" extra: without it the needs_torch tests skip, the others run
    import torch
    import torchvision

F32_ULP = 2.0**-24  # half an ulp of float32: a correctly rounded float32 value is within this


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch's OpenMP threads next to XLA's on a small, busy CPU slow a tiny model down ~50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def precision(dtype: str) -> Iterator[None]:
    """float64: JAX x64 for this block only (does not leak into other tests in the process)."""
    if dtype == "float64":
        with jax.enable_x64(True):
            yield
    else:
        yield


def max_rel(values: Any, reference: Any) -> float:
    """max over tensors of max|a - b| / max|b|."""
    errs = [
        float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))
        for a, b in zip(jax.tree.leaves(values), jax.tree.leaves(reference), strict=True)
    ]
    return max(errs)


def displacement_rel(values: Any, reference: Any, initial: Any) -> float:
    """max_rel of theta - theta_0 (the update the optimizer accumulated)."""
    sub = functools.partial(jax.tree.map, lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return max_rel(sub(values, initial), sub(reference, initial))


def rel_series(values: np.ndarray, reference: np.ndarray) -> float:
    """max_t |a_t - b_t| / |b_t| (exact zeros must match exactly)."""
    values, reference = np.asarray(values, np.float64), np.asarray(reference, np.float64)
    nz = reference != 0
    assert np.all(values[~nz] == 0)
    return float(np.max(np.abs(values[nz] - reference[nz]) / np.abs(reference[nz])))


# --------------------------------------------------------------------------------------------------
# Schedules against torch.optim.lr_scheduler, step by step
# --------------------------------------------------------------------------------------------------


def torch_lrs(make: Callable[[torch.optim.Optimizer], Any], epochs: int, steps_per_epoch: int) -> np.ndarray:
    """Per-iteration learning rates of a torch scheduler stepped once per epoch."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = make(opt)
    lrs = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
        sched.step()
    return np.asarray(lrs)


def torch_detection_lrs(
    base_lr: float, epochs: int, steps_per_epoch: int, milestones: list[int]
) -> np.ndarray:
    """torchvision references/detection: MultiStepLR per epoch + LinearLR warm-up per iteration in epoch 0."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    main = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    lrs = []
    for epoch in range(epochs):
        warmup = None
        if epoch == 0:
            iters = min(1000, steps_per_epoch - 1)
            warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / 1000, total_iters=iters)
        for _ in range(steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if warmup is not None:
                warmup.step()
        main.step()
    return np.asarray(lrs)


def _sched_cases() -> dict[str, tuple[Callable[[], np.ndarray], Callable[[], optax.Schedule], float]]:
    """name -> (torch per-iteration lrs, our schedule, allowed float64 relative error)."""
    # Without torch only the case names are used: they name the tests that then skip.
    lr_sched = torch.optim.lr_scheduler if HAVE_TORCH else None
    return {
        # torchvision's MobileNetV3 classification recipe: 600 epochs, StepLR(2, 0.973), per epoch
        "step_lr": (
            lambda: torch_lrs(lambda o: lr_sched.StepLR(o, 2, 0.973), 600, 1),
            lambda: optim.step_lr(0.1, 1, 2, 0.973),
            0.0,
        ),
        "step_lr_per_epoch": (
            lambda: torch_lrs(lambda o: lr_sched.StepLR(o, 3, 0.5), 40, 7),
            lambda: optim.step_lr(0.1, 7, 3, 0.5),
            0.0,
        ),
        "multistep_lr": (
            lambda: torch_lrs(lambda o: lr_sched.MultiStepLR(o, [16, 22], 0.1), 26, 5),
            lambda: optim.multistep_lr(0.1, 5, (16, 22), 0.1),
            0.0,
        ),
        "multistep_lr_repeated": (
            lambda: torch_lrs(lambda o: lr_sched.MultiStepLR(o, [0, 3, 3, 8], 0.3), 12, 2),
            lambda: optim.multistep_lr(0.1, 2, (0, 3, 3, 8), 0.3),
            0.0,
        ),
        # per-iteration cosine, through T_max and past it (torch's rises again)
        "cosine_lr": (
            lambda: torch_lrs(lambda o: lr_sched.CosineAnnealingLR(o, T_max=500), 1100, 1),
            lambda: optim.cosine_lr(0.1, 500),
            1e-12,
        ),
        "cosine_lr_eta_min": (
            lambda: torch_lrs(lambda o: lr_sched.CosineAnnealingLR(o, T_max=30, eta_min=1e-3), 30, 4),
            lambda: optim.cosine_lr(0.1, 30, eta_min=1e-3, steps_per_epoch=4),
            1e-13,
        ),
        "linear_lr": (
            lambda: torch_lrs(lambda o: lr_sched.LinearLR(o, start_factor=1e-3, total_iters=1000), 1200, 1),
            lambda: optim.linear_lr(0.1, 1e-3, 1.0, 1000),
            1e-13,
        ),
        # detection: 26 epochs, warm-up over the first epoch (len(loader) - 1 < 1000 iterations)
        "detection_lr": (
            lambda: torch_detection_lrs(0.02, 26, 40, [16, 22]),
            lambda: optim.detection_lr(0.02, 40),
            1e-13,
        ),
        # detection: an epoch longer than the 1000 warm-up iterations
        "detection_lr_long_epoch": (
            lambda: torch_detection_lrs(0.02, 3, 1500, [1, 2]),
            lambda: optim.detection_lr(0.02, 1500, milestones=(1, 2)),
            1e-13,
        ),
    }


SCHED_CASES = _sched_cases()


@needs_torch
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(SCHED_CASES))
def test_schedule_matches_torch(name: str, dtype: str) -> None:
    make_ref, make_ours, tol64 = SCHED_CASES[name]
    ref = make_ref()
    with precision(dtype):
        schedule = make_ours()

        @jax.jit
        def evaluate(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
            # vectorised, and one scalar count at a time as the optimizer calls it
            return schedule(counts), jax.lax.map(schedule, counts)

        ours, scalar = (np.asarray(v) for v in evaluate(jnp.arange(len(ref), dtype=jnp.int32)))
    assert ours.dtype == np.dtype(dtype) and scalar.dtype == np.dtype(dtype)
    err = max(rel_series(ours, ref), rel_series(scalar, ref))
    print(f"\n[schedule] {name} {dtype}: {len(ref)} steps, max rel err {err:.3g}")
    if dtype == "float64":
        assert err <= tol64
    else:
        # correctly rounded (tables), or a few float32 ulps (closed forms)
        assert err <= (F32_ULP if tol64 == 0.0 else 8 * F32_ULP)


@needs_torch
def test_step_lr_vs_optax_exponential_decay() -> None:
    """optax's own staircase decay computes gamma**k with a float power: 3e-6 off StepLR in float32."""
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.973), 600, 1)
    for dtype, ours_tol in (("float32", F32_ULP), ("float64", 0.0)):
        with precision(dtype):
            ours = optim.schedule_values(optim.step_lr(0.1, 1, 2, 0.973), 600)
            theirs = optim.schedule_values(optax.exponential_decay(0.1, 2, 0.973, staircase=True), 600)
        err_ours, err_theirs = rel_series(ours, ref), rel_series(theirs, ref)
        print(
            f"\n[schedule] StepLR(2, 0.973) 600 epochs {dtype}: step_lr {err_ours:.3g}, "
            f"optax.exponential_decay(staircase=True) {err_theirs:.3g}"
        )
        assert err_ours <= ours_tol and err_ours <= err_theirs


def test_closed_forms_exact_in_float64() -> None:
    """cosine/linear closed forms are within ~1 ulp of the exact value; torch's recursive chained form
    drifts (that drift is the float64 gap measured against torch above)."""
    mpmath = pytest.importorskip("mpmath")  # ships with torch (sympy)
    mpmath.mp.dps = 40
    t_max, n = 500, 1100
    exact_cos = [mpmath.mpf("0.1") * (1 + mpmath.cos(mpmath.pi * t / t_max)) / 2 for t in range(n)]
    exact_lin = [
        mpmath.mpf("0.1") * (mpmath.mpf(1e-3) + (1 - mpmath.mpf(1e-3)) * min(t, 1000) / 1000)
        for t in range(n)
    ]
    with precision("float64"):
        cos = optim.schedule_values(optim.cosine_lr(0.1, t_max), n)
        lin = optim.schedule_values(optim.linear_lr(0.1, 1e-3, 1.0, 1000), n)
    err_cos = rel_series(cos, np.array([float(v) for v in exact_cos]))
    err_lin = rel_series(lin, np.array([float(v) for v in exact_lin]))
    print(f"\n[schedule] float64 vs exact: cosine {err_cos:.3g}, linear {err_lin:.3g}")
    assert err_cos < 2e-15 and err_lin < 2e-15


def test_schedule_validation() -> None:
    with pytest.raises(ValueError):
        optim.step_lr(0.1, 0)
    with pytest.raises(ValueError):
        optim.multistep_lr(0.1, 10, (-1, 3))
    with pytest.raises(ValueError):
        optim.cosine_lr(0.1, 0)
    # one-iteration epochs: no warm-up at all (torchvision would build LinearLR with total_iters=0)
    np.testing.assert_array_equal(
        optim.schedule_values(optim.detection_lr(0.02, 1, (2,)), 4), np.float32([0.02, 0.02, 0.002, 0.002])
    )
    # a constant with a warm-up
    vals = optim.schedule_values(optim.linear_warmup(0.5, 4, 0.2), 6)
    np.testing.assert_allclose(vals, [0.1, 0.2, 0.3, 0.4, 0.5, 0.5], rtol=1e-6)


@needs_torch
def test_schedule_beyond_table() -> None:
    """step_lr tabulates 1024 decays exactly; past that it continues with a power."""
    with precision("float64"):
        vals = optim.schedule_values(optim.step_lr(1.0, 1, 1, 0.99), 1100)
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.99), 1100, 1) / 0.1
    assert rel_series(vals, ref) < 1e-12


# --------------------------------------------------------------------------------------------------
# rmsprop_torch against torch.optim.RMSprop + StepLR on a torchvision model
# --------------------------------------------------------------------------------------------------

TORCH_CONFIGS = {
    # torchvision's MobileNetV3 recipe (alpha 0.9, eps 0.0316, momentum 0.9, wd 1e-5), BN/bias undecayed
    "recipe_masked": dict(
        lr=0.064, alpha=0.9, eps=0.0316, momentum=0.9, weight_decay=1e-5, centered=False, mask=True
    ),
    # centered, no momentum buffer, all parameters decayed (torch's default param group)
    "centered_no_momentum": dict(
        lr=0.01, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=1e-4, centered=True, mask=False
    ),
    "centered_momentum": dict(
        lr=0.01, alpha=0.9, eps=1e-3, momentum=0.5, weight_decay=0.0, centered=True, mask=False
    ),
}
TORCH_STEPS, STEPS_PER_EPOCH, STEP_SIZE, GAMMA = 30, 3, 2, 0.5  # lr changes at steps 6, 12, 18, 24


def small_mobilenet_v3() -> torch.nn.Module:
    """torchvision's MobileNetV3 with 3 of mobilenet_v3_small's blocks (SE+ReLU, ReLU, SE+hardswish k5)
    at width 0.25: 38 tensors. (mobilenet_v3_small has 142: XLA takes ~9 s to compile an update of them.)
    """
    from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3

    conf = functools.partial(InvertedResidualConfig, width_mult=0.25)
    setting = [
        conf(16, 3, 16, 16, True, "RE", 2, 1),
        conf(16, 3, 72, 24, False, "RE", 2, 1),
        conf(24, 5, 96, 40, True, "HS", 2, 1),
    ]
    return MobileNetV3(setting, last_channel=64, num_classes=10, dropout=0.0)


def porter(tv_model: torch.nn.Module) -> Callable[[dict[str, Any]], dict[str, np.ndarray]]:
    """Map torch-named tensors (parameters or gradients) to the mbv3_jax port's layout and paths."""
    from mbv3_jax.models import BlockConfig, MobileNetV3
    from porting.mapping import convert_to_jax, format_path
    from porting.rules import MOBILENET_V3_CLASSIFIER_RULES

    table = []
    for block in tv_model.features[1:-1]:
        convs = [m for m in block.block.modules() if isinstance(m, torch.nn.Conv2d)]
        dw = next(c for c in convs if c.groups > 1)
        table.append(
            BlockConfig(
                convs[0].in_channels,
                dw.kernel_size[0],
                dw.in_channels,
                convs[-1].out_channels,
                any(isinstance(m, torchvision.ops.SqueezeExcitation) for m in block.block.modules()),
                "HS" if any(isinstance(m, torch.nn.Hardswish) for m in block.block.modules()) else "RE",
                dw.stride[0],
                dw.dilation[0],
            )
        )
    jax_model = MobileNetV3(table, tv_model.classifier[0].out_features, tv_model.classifier[3].out_features)

    def port(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
        converted = convert_to_jax(tensors, jax_model, MOBILENET_V3_CLASSIFIER_RULES, strict=False)
        return {format_path(path): array for path, array in converted.items()}

    return port


def run_torch_vs_optax(config: dict[str, Any], dtype: str, with_plain: bool) -> dict[str, float]:
    torch_dtype = {"float64": torch.float64, "float32": torch.float32}[dtype]
    torch.manual_seed(0)
    model = small_mobilenet_v3().to(torch_dtype)
    model.train()
    named = dict(model.named_parameters())
    port = porter(model)
    # Ported weights: torch parameters through porting's mapping, in JAX layout and JAX names.
    initial = port({n: p.detach().numpy().copy() for n, p in named.items()})

    cfg = dict(config)
    use_mask = cfg.pop("mask")
    lr = cfg.pop("lr")
    if use_mask:
        decay = [p for p in named.values() if p.ndim > 1]
        no_decay = [p for p in named.values() if p.ndim <= 1]
        groups: Any = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = list(named.values())
    topt = torch.optim.RMSprop(groups, lr=lr, **cfg)
    tsched = torch.optim.lr_scheduler.StepLR(topt, STEP_SIZE, GAMMA)

    schedule = optim.step_lr(lr, STEPS_PER_EPOCH, STEP_SIZE, GAMMA)
    mask = optim.weight_decay_mask if use_mask else None
    tx = optim.rmsprop_torch(schedule, weight_decay_mask=mask, **cfg)
    txs = [tx]
    if with_plain:
        # plain optax.rmsprop set up "like torch" (eps outside the root): lr sits inside its momentum trace
        txs.append(
            optax.chain(
                optax.add_decayed_weights(cfg["weight_decay"], mask)
                if cfg["weight_decay"]
                else optax.identity(),
                optax.rmsprop(
                    schedule,
                    decay=cfg["alpha"],
                    eps=cfg["eps"],
                    eps_in_sqrt=False,
                    centered=cfg["centered"],
                    momentum=cfg["momentum"] or None,
                ),
            )
        )

    # LLVM -O0: a 3x faster compile for these tiny tensors (XLA:CPU has no fast-math either way)
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def step(grads: Any, params: list[Any], states: list[Any]) -> tuple[list[Any], list[Any]]:
        """One update of each optimizer in txs."""
        new_params, new_states = [], []
        for t, p, s in zip(txs, params, states, strict=True):
            updates, s = t.update(grads, s, p)
            new_params.append(optax.apply_updates(p, updates))
            new_states.append(s)
        return new_params, new_states

    gen = torch.Generator().manual_seed(1)
    params = [jax.tree.map(jnp.asarray, initial)] * len(txs)
    state = jax.jit(lambda ps: [t.init(p) for t, p in zip(txs, ps, strict=True)])(params)
    for t in range(TORCH_STEPS):
        x = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch_dtype)
        y = torch.randint(0, 10, (4,), generator=gen)
        topt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads = jax.tree.map(jnp.asarray, port({n: p.grad.numpy() for n, p in named.items()}))
        topt.step()
        params, state = step(grads, params, state)
        if (t + 1) % STEPS_PER_EPOCH == 0:
            tsched.step()
    assert tsched.get_last_lr()[0] == lr * GAMMA ** (TORCH_STEPS // STEPS_PER_EPOCH // STEP_SIZE)
    assert all(p.dtype == np.dtype(dtype) for p in jax.tree.leaves(params))
    final = port({n: p.detach().numpy() for n, p in named.items()})
    errs = {"params": max_rel(params[0], final), "displacement": displacement_rel(params[0], final, initial)}
    if with_plain:
        errs["optax_rmsprop_displacement"] = displacement_rel(params[1], final, initial)
    return errs


@needs_torch
@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("recipe_masked", "float64"),
        ("recipe_masked", "float32"),
        ("centered_momentum", "float64"),
        ("centered_momentum", "float32"),
        ("centered_no_momentum", "float64"),
    ],
)
def test_rmsprop_torch_matches_torch_on_mobilenet(name: str, dtype: str) -> None:
    with precision(dtype), one_torch_thread():
        errs = run_torch_vs_optax(TORCH_CONFIGS[name], dtype, with_plain=name == "recipe_masked")
    plain = errs.pop("optax_rmsprop_displacement", None)
    print(
        f"\n[torch RMSprop+StepLR] {name} {dtype} {TORCH_STEPS} steps: params {errs['params']:.3g}, "
        f"displacement {errs['displacement']:.3g}"
        + ("" if plain is None else f"; plain optax.rmsprop displacement {plain:.3g}")
    )
    tol = 1e-6 if dtype == "float64" else 1e-5
    assert errs["params"] < tol
    assert errs["displacement"] < tol
    if plain is not None:
        # the point: optax.rmsprop diverges from torch once the learning rate changes
        assert plain > 1e-2


def torch_rmsprop_on_tensors(
    init: list[np.ndarray], grads: list[list[np.ndarray]], lr_at: Callable[[int], float], **kw: Any
) -> list[np.ndarray]:
    params = [torch.tensor(v, requires_grad=True) for v in init]
    opt = torch.optim.RMSprop(params, lr=lr_at(0), **kw)
    for t, g in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = lr_at(t)
        for p, gi in zip(params, g, strict=True):
            p.grad = torch.tensor(gi)
        opt.step()
    return [p.detach().numpy() for p in params]


def optax_on_tensors(
    tx: optax.GradientTransformation, init: list[np.ndarray], grads: list[list[np.ndarray]]
) -> list[np.ndarray]:
    params = [jnp.asarray(v) for v in init]
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update([jnp.asarray(x) for x in g], state, params)
        params = optax.apply_updates(params, updates)
    return [np.asarray(p) for p in params]


@needs_torch
def test_optax_rmsprop_matches_torch_only_with_constant_lr(problem: dict[str, Any]) -> None:
    init, grads = problem["init"], problem["grads"]
    kw = dict(alpha=0.9, eps=0.0316, momentum=0.9)
    with precision("float64"):

        def plain(lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
            return optax.rmsprop(lr, decay=0.9, eps=0.0316, eps_in_sqrt=False, momentum=0.9)

        const_ref = torch_rmsprop_on_tensors(init, grads, lambda t: 0.05, **kw)
        const_err = displacement_rel(optax_on_tensors(plain(0.05), init, grads), const_ref, init)
        sched = optim.step_lr(0.05, 2, 2, 0.5)
        sched_ref = torch_rmsprop_on_tensors(init, grads, lambda t: 0.05 * 0.5 ** (t // 4), **kw)
        sched_err = displacement_rel(optax_on_tensors(plain(sched), init, grads), sched_ref, init)
        ours_err = displacement_rel(
            optax_on_tensors(optim.rmsprop_torch(sched, **kw), init, grads), sched_ref, init
        )
    print(
        f"\n[optax.rmsprop vs torch] constant lr {const_err:.3g}; StepLR {sched_err:.3g}; "
        f"rmsprop_torch under StepLR {ours_err:.3g}"
    )
    assert const_err < 1e-12
    assert sched_err > 0.1
    assert ours_err < 1e-12


# --------------------------------------------------------------------------------------------------
# rmsprop_tf against TF1 RMSPropOptimizer and Keras RMSprop
# --------------------------------------------------------------------------------------------------

TF_STEPS = 25


@pytest.fixture(scope="module")
def problem() -> dict[str, Any]:
    """A few float64 tensors and 25 steps of gradients of very different magnitudes (eps matters)."""
    rng = np.random.default_rng(0)
    shapes, scales = [(3, 4), (5,), (2, 3, 2)], [1e-2, 1.0, 10.0]
    return {
        "init": [rng.standard_normal(s) for s in shapes],
        "grads": [
            [sc * rng.standard_normal(s) for s, sc in zip(shapes, scales, strict=True)]
            for _ in range(TF_STEPS)
        ],
    }


@pytest.fixture(scope="module")
def tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow

    return tensorflow


def tf_rmsprop_on_tensors(
    tf: Any,
    kind: str,
    init: list[np.ndarray],
    grads: list[list[np.ndarray]],
    lr_at: Callable[[int], float],
    dtype: str,
    **kw: Any,
) -> list[np.ndarray]:
    tf_dtype = getattr(tf, dtype)
    step = [0]

    def const(v: float) -> Any:
        # float64 tensors: TF1 would turn Python floats into float32 tensors, Keras a float lr too
        return tf.constant(v, tf_dtype)

    if kind == "tf1":
        opt = tf.compat.v1.train.RMSPropOptimizer(
            learning_rate=lambda: const(lr_at(step[0])),
            decay=const(kw["decay"]),
            momentum=const(kw["momentum"]),
            epsilon=const(kw["eps"]),
            centered=kw["centered"],
        )
        variables = [tf.Variable(v.astype(dtype)) for v in init]
    else:
        import keras

        opt = keras.optimizers.RMSprop(
            learning_rate=lambda: const(lr_at(step[0])),
            rho=kw["decay"],
            momentum=kw["momentum"],
            epsilon=kw["eps"],
            centered=kw["centered"],
        )
        variables = [keras.Variable(v.astype(dtype), dtype=dtype) for v in init]
    for t, g in enumerate(grads):
        step[0] = t
        opt.apply_gradients(zip([tf.constant(x.astype(dtype)) for x in g], variables, strict=True))
    return [v.numpy() for v in variables]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("kind", ["tf1", "keras"])
def test_rmsprop_tf_matches_tensorflow(
    tf: Any, problem: dict[str, Any], kind: str, centered: bool, dtype: str
) -> None:
    init, grads = problem["init"], problem["grads"]
    kw = dict(decay=0.9, momentum=0.9, eps=1e-3, centered=centered)
    ref = tf_rmsprop_on_tensors(tf, kind, init, grads, lambda t: 0.1 * 0.5 ** (t // 4), dtype, **kw)
    with precision(dtype):
        tx = optim.rmsprop_tf(optim.step_lr(0.1, 2, 2, 0.5), keras=kind == "keras", **kw)
        init_d = [v.astype(dtype) for v in init]
        ours = optax_on_tensors(tx, init_d, [[x.astype(dtype) for x in g] for g in grads])
        # the other initial mean square does not match: the flag matters
        wrong = optax_on_tensors(
            optim.rmsprop_tf(optim.step_lr(0.1, 2, 2, 0.5), keras=kind != "keras", **kw),
            init_d,
            [[x.astype(dtype) for x in g] for g in grads],
        )
    assert all(o.dtype == np.dtype(dtype) for o in ours)
    err, disp = max_rel(ours, ref), displacement_rel(ours, ref, init_d)
    print(
        f"\n[TF RMSProp] {kind} {'centered' if centered else 'plain'} {dtype} {TF_STEPS} steps: "
        f"params {err:.3g}, displacement {disp:.3g}"
    )
    tol = 1e-6 if dtype == "float64" else 1e-5
    assert err < tol and disp < tol
    assert displacement_rel(wrong, ref, init_d) > 1e-2


def test_rmsprop_tf_keras_momentum_zero_and_weight_decay(tf: Any, problem: dict[str, Any]) -> None:
    """Keras without a momentum buffer; coupled weight decay == an L2 term wd/2*|theta|^2 in TF."""
    init, grads = problem["init"], problem["grads"]
    wd = 0.05
    kw = dict(decay=0.8, momentum=0.0, eps=1e-7, centered=False)
    # TF side: fold the L2 gradient in by hand, step by step, with TF1's optimizer on the same variables
    variables = [tf.Variable(v) for v in init]
    step = [0]
    opt = tf.compat.v1.train.RMSPropOptimizer(
        learning_rate=lambda: tf.constant(0.1 * 0.5 ** (step[0] // 4), tf.float64),
        decay=tf.constant(0.8, tf.float64),
        momentum=tf.constant(0.0, tf.float64),
        epsilon=tf.constant(1e-7, tf.float64),
    )
    for t, g in enumerate(grads):
        step[0] = t
        opt.apply_gradients(
            zip([tf.constant(x) + wd * v for x, v in zip(g, variables, strict=True)], variables, strict=True)
        )
    ref_tf1 = [v.numpy() for v in variables]
    ref_keras = tf_rmsprop_on_tensors(
        tf, "keras", init, grads, lambda t: 0.1 * 0.5 ** (t // 4), "float64", **kw
    )
    with precision("float64"):
        sched = optim.step_lr(0.1, 2, 2, 0.5)
        ours_tf1 = optax_on_tensors(optim.rmsprop_tf(sched, weight_decay=wd, **kw), init, grads)
        ours_keras = optax_on_tensors(optim.rmsprop_tf(sched, keras=True, **kw), init, grads)
    assert displacement_rel(ours_tf1, ref_tf1, init) < 1e-12
    assert displacement_rel(ours_keras, ref_keras, init) < 1e-12


# --------------------------------------------------------------------------------------------------
# eps conversion, weight-decay masks, Flax NNX
# --------------------------------------------------------------------------------------------------


def test_eps_conversion() -> None:
    assert abs(optim.torch_eps_from_tf(1e-3) - 0.0316) < 1e-4  # torchvision's recipe value
    assert optim.tf_eps_from_torch(optim.torch_eps_from_tf(1e-3)) == pytest.approx(1e-3, rel=1e-15)
    with pytest.raises(ValueError):
        optim.torch_eps_from_tf(-1.0)
    # the documented bound: 1 <= (sqrt(s) + e) / sqrt(s + e^2) <= sqrt(2), worst at s = e^2
    e = optim.torch_eps_from_tf(1e-3)
    s = np.logspace(-12, 4, 2001)
    ratio = (np.sqrt(s) + e) / np.sqrt(s + optim.tf_eps_from_torch(e))
    assert ratio.min() >= 1 - 1e-12 and ratio.max() <= np.sqrt(2) + 1e-12
    assert ratio.max() == pytest.approx(np.sqrt(2), rel=1e-4)


@needs_torch
def test_weight_decay_mask_torch_names() -> None:
    model = torchvision.models.mobilenet_v3_small(width_mult=0.25, num_classes=10)
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    mask = optim.weight_decay_mask(params)
    for name, p in params.items():
        assert mask[name] == (p.ndim > 1), name  # conv/linear weights only
    assert not mask["features.0.1.weight"] and not mask["classifier.3.bias"]  # BN scale, linear bias
    assert mask["features.0.0.weight"] and mask["classifier.0.weight"]
    decay_norm = optim.weight_decay_mask(params, decay_norm=True)
    assert decay_norm["features.0.1.weight"] and not decay_norm["features.0.1.bias"]
    decay_bias = optim.weight_decay_mask(params, decay_bias=True)
    assert decay_bias["classifier.3.bias"] and decay_bias["features.0.1.bias"]
    assert not decay_bias["features.0.1.weight"]


def test_weight_decay_mask_nnx_optimizer() -> None:
    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.head(self.bn(self.conv(x)).mean((1, 2)))

    model = Net(nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda x: x + 0.5, nnx.state(model, nnx.Param)))  # no zero biases
    state = nnx.state(model, nnx.Param)
    mask = optim.weight_decay_mask(state)
    flat = {
        tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path): m
        for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    assert {k[:2]: v for k, v in flat.items()} == {
        ("bn", "bias"): False,
        ("bn", "scale"): False,
        ("conv", "bias"): False,
        ("conv", "kernel"): True,
        ("head", "bias"): False,
        ("head", "kernel"): True,
    }
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    tx = optim.rmsprop_torch(
        0.1, alpha=0.9, eps=0.0316, momentum=0.9, weight_decay=0.5, weight_decay_mask=optim.weight_decay_mask
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    opt.update(model, zeros)  # only weight decay moves anything
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), after, before)
    assert jax.tree.leaves(moved) == jax.tree.leaves(mask)
