"""Shared fixtures: real photos, torchvision-preprocessed inputs, parity precision settings."""

import os

# Two test workers (plus the runs some tests start) share the cores: OpenMP threads that spin while
# they wait for a descheduled peer slow torch down, so waiting threads sleep (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import atexit
import shutil
import tempfile

import jax
import numpy as np
import pytest
from extras import HAVE_TORCH, require_torch

# Parity is measured at full fp32 precision on every backend (GPU/TPU default to TF32/bf16 passes).
jax.config.update("jax_default_matmul_precision", "highest")

# Tests compile the same programs more than once (a run and its resumption, a model built again): a
# persistent compilation cache for this test process turns each repeat into a load.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _COMPILATION_CACHE = tempfile.mkdtemp(prefix="mbv3-jax-test-compilations-")
    atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)


def _configure_torch() -> None:
    if not HAVE_TORCH:  # without the "torch" extra the torch-free tests still run (and the parity tests skip)
        return
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


_configure_torch()


# The longest files first (scripts/test.sh runs two workers that take whole files in this order,
# ``--no-loadscope-reorder``): a long file handed out last would run alone at the end. The two files
# that train in subprocesses come first and third, so that they do not run side by side.
_LONGEST_FIRST = (
    "test_train_detection.py",
    "test_segmentation_parity.py",
    "test_train_segmentation.py",
    "test_classifier_parity.py",
    "test_train_digits.py",
    "test_detection_parity.py",
    "test_train_parity.py",
    "test_quantized_parity.py",
    "test_export.py",
    "test_qat_parity.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within files kept


@pytest.fixture
def generic_path():
    """The test runs the generic path (XLA's convolutions on the whole batch, what TPUs and GPUs run)
    on this CPU: mbv3_jax.backend's CPU kernels off. Compiled programs are per setting."""
    from mbv3_jax import backend

    with backend.cpu_kernels(False):
        yield


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    require_torch()  # porting, which samples them, needs the "torch" extra
    from porting.calibration import sample_photos

    return sample_photos()


@pytest.fixture(scope="session")
def inputs_nchw(photos):  # a torch.Tensor
    """The photos through torchvision's own eval preset (resize 256, crop 224), float NCHW."""
    from porting.calibration import classification_inputs

    return classification_inputs(photos)


@pytest.fixture(scope="session")
def inputs_nhwc(inputs_nchw) -> np.ndarray:
    return np.ascontiguousarray(inputs_nchw.permute(0, 2, 3, 1).numpy())
