"""The optional "torch" extra (torch, torchvision, scikit-image): whether it is installed, and the one
way the tests that need it skip without it.

Files that need it throughout call ``require_torch()`` before importing it; files that run partly
without it import their torch-side names under ``if HAVE_TORCH:`` and mark those tests ``@needs_torch``.
"""

import pytest

EXTRA = ("torch", "torchvision", "skimage")  # the top-level packages of the "torch" extra
NO_TORCH = (
    "needs torch, torchvision and scikit-image, the optional 'torch' extra (pip install 'mbv3-jax[torch]')"
)

try:
    import skimage  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ModuleNotFoundError as e:
    if (e.name or "").partition(".")[0] not in EXTRA:  # something else is missing: a real error
        raise
    HAVE_TORCH = False
else:
    HAVE_TORCH = True

needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason=NO_TORCH)


def require_torch() -> None:
    """Skip the calling module (or test, or fixture) when the extra is missing."""
    __tracebackhide__ = True  # the skip is reported at the caller's line, not here
    if not HAVE_TORCH:
        pytest.skip(NO_TORCH, allow_module_level=True)
