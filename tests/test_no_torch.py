"""mbv3_jax works without the optional "torch" extra: importing it and building, running, saving and
loading a model import nothing from torch, torchvision or scikit-image."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: this one has torch loaded already (conftest, other test files).
_SCRIPT = textwrap.dedent(
    """
    import sys

    BLOCKED = ("torch", "torchvision", "skimage")  # the "torch" extra


    class NoTorch:
        # First on sys.meta_path: every import of the extra fails as if it were not installed.
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None


    sys.meta_path.insert(0, NoTorch())
    try:
        import torch
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError("the blocker let torch in")

    import jax.numpy as jnp
    import numpy as np

    import mbv3_jax

    model = mbv3_jax.models.mobilenet_v3_small(num_classes=10)
    model.eval()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 64, 3)), jnp.float32)
    y = np.asarray(model(x))
    assert y.shape == (1, 10) and np.isfinite(y).all(), y
    loaded = mbv3_jax.load(mbv3_jax.save(model, sys.argv[1]))
    np.testing.assert_array_equal(np.asarray(loaded(x)), y)
    imported = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    assert not imported, imported
    print("OK")
    """
)


def test_mbv3_jax_runs_without_torch(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "model")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip().endswith("OK"), res.stdout
