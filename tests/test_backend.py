"""The backend seam: the switch, and programs lowered for TPU / CUDA carry none of the CPU rewrites.

``jax.export`` lowers on this CPU host for platforms ``"tpu"`` and ``"cuda"``. Every CPU-only
computation is traced under the name scope ``backend.CPU_SCOPE``, which the lowered module's
locations record; a lowering for ``"cpu"`` is the positive control (the scope is there).
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mbv3_jax import backend
from mbv3_jax.models import get_model

REPO = Path(__file__).resolve().parents[1]
GROUPED_CONV = re.compile(r"feature_group_count = (\d+)")


def _grouped_convs(text: str) -> int:
    return sum(1 for g in GROUPED_CONV.findall(text) if int(g) > 1)


def _depthwise_layers(model: nnx.Module) -> int:
    return sum(1 for _, node in nnx.iter_graph(model) if getattr(node, "is_depthwise", False))


def _lowered(fn, args, platform: str) -> str:
    return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


def _eval_call(model: nnx.Module, method: str, *static):
    model.eval()
    graphdef, state = nnx.split(model)

    def call(state, *args):
        return getattr(nnx.merge(graphdef, state), method)(*args, *static)

    return call, state


def test_switch_selects_other_programs(monkeypatch):
    traced = []

    @jax.jit
    def f(x, k):
        traced.append(backend.cpu_kernels_enabled())
        return backend.conv2d(x, k, padding=1, groups=4)

    x, k = jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 1, 4))
    default = f(x, k)
    with backend.cpu_kernels(False):
        generic = f(x, k)
    assert traced == [True, False]  # the switch is part of jit's cache key
    np.testing.assert_allclose(np.asarray(default), np.asarray(generic), rtol=1e-6)
    backend.set_cpu_kernels(False)
    try:
        assert not backend.cpu_kernels_enabled()
    finally:
        backend.set_cpu_kernels(True)
    for value, expected in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv(backend.ENV_VAR, value)
        assert backend._from_environment() is expected
    monkeypatch.setenv(backend.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="MBV3_CPU_KERNELS"):
        backend._from_environment()


def test_environment_variable_turns_the_kernels_off():
    code = "from mbv3_jax import backend; print(backend.cpu_kernels_enabled())"
    env = dict(os.environ, MBV3_CPU_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


CASES = {
    "classifier": ("mobilenet_v3_small", {}, "forward", (), [(4, 224, 224, 3)]),
    "lraspp": ("lraspp_mobilenet_v3_large", dict(num_classes=3), "forward", (), [(2, 96, 128, 3)]),
    "fasterrcnn-320": (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        dict(num_classes=5),
        "forward_detect",
        ((320, 320),),
        [(1, 320, 320, 3), np.asarray([[320, 320]], np.int32)],
    ),
    "ssdlite": (
        "ssdlite320_mobilenet_v3_large",
        dict(num_classes=5),
        "forward_detect",
        (),
        [(1, 320, 320, 3)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_eval_lowered_for_tpu_and_cuda_has_no_cpu_rewrites(case):
    name, kwargs, method, static, args = CASES[case]
    model = get_model(name, **kwargs)
    call, state = _eval_call(model, method, *static)
    specs = [jax.ShapeDtypeStruct(a, jnp.float32) if isinstance(a, tuple) else a for a in args]
    depthwise = _depthwise_layers(model)
    assert depthwise >= 11
    for platform in ("tpu", "cuda"):
        text = _lowered(call, (state, *specs), platform)
        assert backend.CPU_SCOPE not in text, platform
        # Every depthwise layer is XLA's grouped convolution there.
        assert _grouped_convs(text) == depthwise, platform
        if case in ("classifier", "lraspp"):
            assert "stablehlo.while" not in text  # no micro-batch loop
    cpu = _lowered(call, (state, *specs), "cpu")
    assert backend.CPU_SCOPE in cpu and _grouped_convs(cpu) == 0


TRAIN_STEP_EXPORT = textwrap.dedent(
    """
    import json, re
    import jax, jax.numpy as jnp, optax
    from mbv3_jax import backend
    from mbv3_jax.models import get_model
    from train import sharding, trainer

    model = get_model("mobilenet_v3_small", num_classes=10)
    mesh = sharding.make_mesh(data=4, fsdp=2)
    steps = trainer.make_steps(model, optax.sgd(0.01, momentum=0.9), optax.constant_schedule(0.01), mesh)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(steps.init_state),
        steps.state_shardings,
    )
    batch = sharding.batch_sharding(mesh)
    images = jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.float32, sharding=batch)
    labels = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=batch)
    out = {}
    for platform in ("tpu", "cuda", "cpu"):
        exported = jax.export.export(steps.train_step, platforms=[platform])(state, images, labels)
        text = exported.mlir_module()
        out[platform] = dict(
            devices=exported.nr_devices,
            cpu_scope=backend.CPU_SCOPE in text,
            grouped=sum(1 for g in re.findall(r"feature_group_count = (\\d+)", text) if int(g) > 1),
            sharded="sharding" in text,
        )
    print(json.dumps(out))
    """
)


def test_sharded_train_step_lowered_for_tpu_and_cuda_has_no_cpu_rewrites():
    """The trainer's step on the 8-device (data 4 x fsdp 2) mesh, in a subprocess with 8 CPU devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_STEP_EXPORT], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for platform in ("tpu", "cuda"):
        assert out[platform]["devices"] == 8 and out[platform]["sharded"], out
        assert not out[platform]["cpu_scope"], out
        # Forward and backward: at least one grouped convolution per depthwise layer (Small: 11).
        assert out[platform]["grouped"] >= 11, out
    assert out["cpu"]["cpu_scope"] and out["cpu"]["grouped"] == 0, out


def test_cpu_xla_flags_join_the_users(monkeypatch):
    """The command-line tools' CPU flags are added to XLA_FLAGS; a flag the user set wins."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    backend.set_cpu_xla_flags()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_force_host_platform_device_count=8"
    assert set(backend.CPU_XLA_FLAGS) <= set(flags)
    mine = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    monkeypatch.setenv("XLA_FLAGS", mine)
    backend.set_cpu_xla_flags()
    assert os.environ["XLA_FLAGS"] == mine
    monkeypatch.delenv("XLA_FLAGS")
    with backend.cpu_kernels(False):
        backend.set_cpu_xla_flags()
    assert "XLA_FLAGS" not in os.environ


EXPLICIT_SHARDED_EVAL = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from mbv3_jax.models import get_model

    model = get_model("mobilenet_v3_small", num_classes=10)
    model.eval()
    images = np.random.default_rng(0).random((16, 64, 64, 3), dtype=np.float32)
    whole = np.asarray(model(images))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        out = model(jax.device_put(images, NamedSharding(mesh, P("data"))))
    err = float(np.abs(np.asarray(out) - whole).max() / np.abs(whole).max())
    print(json.dumps(dict(batch_axis=out.sharding.spec[0], err=err)))
    """
)


def test_eval_of_an_explicitly_sharded_batch_keeps_it_sharded():
    """``model(x)`` in eval on a batch split over 8 devices by its type (explicit sharding): the CPU
    schedules (micro-batches, own buffers), traced for every platform, leave each device its part."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", EXPLICIT_SHARDED_EVAL], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["batch_axis"] == "data", out
    assert out["err"] < 1e-5, out


EXPLICIT_SHARDED_TRAINING = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from mbv3_jax import backend
    from mbv3_jax.models import get_model

    model = get_model("mobilenet_v3_small", num_classes=10, dropout=0.0)
    model.train()
    images = np.random.default_rng(0).random((16, 32, 32, 3), dtype=np.float32)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))

    def grads(cpu_kernels, x):
        with backend.cpu_kernels(cpu_kernels):
            step = nnx.jit(lambda model, x: nnx.grad(lambda m: (m(x) ** 2).mean())(model))
            return jax.tree.leaves(nnx.state(step(model, x)))

    whole = grads(True, images)
    scale = max(float(np.abs(g).max()) for g in whole)
    errors = {}
    with jax.set_mesh(mesh):
        split = jax.device_put(images, NamedSharding(mesh, P("data")))
        for name, cpu_kernels in (("cpu_kernels", True), ("generic", False)):
            grad = grads(cpu_kernels, split)
            errors[name] = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(grad, whole)) / scale
    print(json.dumps(errors))
    """
)


def test_training_on_an_explicitly_sharded_batch():
    """Train-mode gradients of a batch split over 8 devices by its type (explicit sharding) equal
    the unsplit batch's, on the CPU kernels and on the generic path (XLA's convolutions, whose kernel
    gradient jax does not type for a split batch by itself)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", EXPLICIT_SHARDED_TRAINING], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert errors["cpu_kernels"] < 1e-5 and errors["generic"] < 1e-5, errors
