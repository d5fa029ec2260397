"""The optional "torch" extra (torch, torchvision, scikit-image): whether it is installed, and the one
way the tests that need it skip without it.

Files that need it throughout call ``require_torch()`` before importing it; files that run partly
without it import their torch-side names under ``if HAVE_TORCH:`` and mark those tests ``@needs_torch``.
"""

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

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


# ------------------------------------------------------------------------------------------------
# Other CPUs' kernels on this one: torch's CPU libraries read an instruction-set cap at start-up
# (ATen: ATEN_CPU_CAPABILITY; MKL: MKL_ENABLE_INSTRUCTIONS; oneDNN: ONEDNN_MAX_CPU_ISA; FBGEMM:
# FBGEMM_ENABLE_INSTRUCTIONS), so a subprocess started with one runs what a CPU without the newer
# instructions runs.

REPO = Path(__file__).resolve().parents[1]


def run_capped(args: list[str], caps: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``python *args`` in the repository with the environment ``caps`` added, output captured;
    fails the calling test if it exits non-zero."""
    __tracebackhide__ = True
    env = dict(os.environ, **caps)
    res = subprocess.run(
        [sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, f"{caps}: exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


_DISPATCH_SCRIPT = textwrap.dedent(
    """
    import torch
    print("aten:", torch.backends.cpu.get_cpu_capability(), flush=True)
    torch.nn.functional.linear(torch.ones(4, 8), torch.ones(8, 8))  # MKL's sgemm
    torch.backends.quantized.engine = "x86"  # an int8 1x1 conv: oneDNN on AVX512-VNNI CPUs
    conv = torch.ao.nn.quantized.Conv2d(32, 64, 1)
    conv.set_weight_bias(torch.quantize_per_tensor(torch.ones(64, 32, 1, 1), 0.01, 0, torch.qint8), None)
    conv(torch.quantize_per_tensor(torch.ones(1, 32, 8, 8), 0.01, 0, torch.quint8))
    torch.nn.functional.conv2d(torch.ones(1, 32, 8, 8), torch.ones(64, 32, 1, 1))  # oneDNN fp32
    """
)


def capped_dispatch(caps: dict[str, str]) -> dict[str, str]:
    """What torch's libraries dispatch to in a process started with ``caps``, from their own
    reports: "aten" (torch's CPU capability), "mkl" (MKL_VERBOSE's instruction-set banner),
    "onednn" (ONEDNN_VERBOSE's isa line), "onednn_int8_conv" (the implementation of an int8
    convolution, "" where torch does not hand it to oneDNN)."""
    out = run_capped(
        ["-c", _DISPATCH_SCRIPT], {**caps, "MKL_VERBOSE": "1", "ONEDNN_VERBOSE": "1"}, 120
    ).stdout

    def find(pattern: str) -> str:
        match = re.search(pattern, out, re.MULTILINE)
        return match.group(1).strip() if match else ""

    return {
        "aten": find(r"^aten: (\S+)"),
        "mkl": find(r"^MKL_VERBOSE oneMKL[^\n]*?for Intel\(R\) 64 architecture (.*)$"),
        "onednn": find(r"^onednn_verbose,.*,info,cpu,isa:(.*)$"),
        "onednn_int8_conv": find(r"^onednn_verbose,.*,exec,cpu,convolution,([^,]+),forward_\w+,src:u8"),
    }


def run_capped_pytest(args: list[str], caps: dict[str, str], timeout: float) -> tuple[dict[str, int], str]:
    """pytest ``args`` in a subprocess started with ``caps``: (outcome counts, its output)."""
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s", "-rs", *args],
        env=dict(os.environ, **caps),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    counts = {
        kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)
    }
    assert res.returncode in (0, 1, 5), (
        f"{caps}: pytest exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return counts, res.stdout


# ------------------------------------------------------------------------------------------------
# The optional "export" extra: TensorFlow, ai-edge-litert, onnx and onnxruntime (jax2onnx on Python 3.11+).

NO_EXPORT = "needs the optional 'export' extra (pip install -e '.[export]')"
HAVE_EXPORT = all(
    importlib.util.find_spec(m) is not None for m in ("tensorflow", "ai_edge_litert", "onnx", "onnxruntime")
)
HAVE_JAX2ONNX = importlib.util.find_spec("jax2onnx") is not None
needs_export = pytest.mark.skipif(not HAVE_EXPORT, reason=NO_EXPORT)
