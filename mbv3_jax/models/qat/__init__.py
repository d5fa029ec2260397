"""Quantization-aware training (QAT) of MobileNetV3 with torch's eager-mode semantics.

Builds the model torchvision's ``references/classification/train_quantization.py`` trains:
``quantization.mobilenet_v3_large(quantize=False)``, ``fuse_model(is_qat=True)``,
``qconfig = get_default_qat_qconfig(backend)``, ``prepare_qat``. NHWC, float32, NNX; module and
buffer names follow torch's, so ``porting.qat`` maps its state_dict declaratively (both ways), and
``model.convert()`` gives the integer model of ``mbv3_jax.models.quantization`` as torch's
``convert`` does.

Every quantization point is torch's ``FusedMovingAvgObsFakeQuantize`` (what the default QAT qconfigs
build; its C++ kernel, not the Python ``FakeQuantize`` + observer pair):

* observer: running min / max, initialised from the first batch (while they are +-inf), then
  ``running + c * (batch - running)`` with c = 0.01 in float32, the product rounded first;
* qparams from the running min / max on every call with fake quant on (FBGEMM's
  ``ChooseQuantizationParams``: double intermediates (emulated), symmetric range for weights, the
  6.1e-5 small-scale cutoff, zero point nudged with round-half-even). ``convert`` instead uses the
  observer's Python ``calculate_qparams`` (eps floor; symmetric ``max|w| / 127.5``, not ``/ 127``);
* fake quant ``(clamp(round(x * (1 / s)) + zp, qmin, qmax) - zp) * s`` (round half to even), and
  its straight-through gradient: the incoming gradient where ``round(x * (1 / s)) + zp`` lies in
  ``[qmin, qmax]``, zero elsewhere; none to the scale / zero point (buffers in torch).

Activations are quint8 (0..255 for "qnnpack" / "onednn", 0..127 with x86 / fbgemm's
``reduce_range``), weights qint8 symmetric, per tensor ("qnnpack") or per output channel (the
others). Hardsigmoid has torch's fixed qparams (1/256, 0). ``observer_enabled`` /
``fake_quant_enabled`` and each ConvBn's ``frozen`` flag are state: ``model.disable_observer()`` /
``model.freeze_bn_stats()`` (what the recipe applies after epochs 4 and 3) change values, not the
compiled programs. As in torch, observers keep averaging in eval mode until disabled.

Conv + BatchNorm (``ConvBn2d`` / ``ConvBnReLU2d``) follow torch's ``_forward_approximate``: the
weight scaled by ``gamma / sqrt(running_var + eps)``, fake-quantized, convolved, the output divided
by that factor, then the real BatchNorm (batch statistics in training, running ones in eval mode or
once frozen).

Numerics: "xla" (default) computes convolutions and reductions XLA's way; values then differ from
torch's in the last float bits, and an activation on a rounding boundary goes to the neighbouring
step. "torch_avx2" computes every float32 operation in torch's CPU order on AVX2
(``mbv3_jax.torch_numerics``), so that forward, observers, BatchNorm statistics and convert match
torch's bit for bit (tests/test_qat_parity.py); it is for parity checks (slower: FMA chains instead
of dots).

Running: ``model(x)`` compiles the whole forward pass (long to compile: every fake quant is in one
program); inside your own ``nnx.jit`` it is inlined. ``model.forward(x)`` run eagerly executes layer
by layer, every layer computation a small jitted function shared by all layers of its kind and shape
(quick to start; what the parity tests do, gradients included: with "torch_avx2" each layer's
gradient is the VJP of its "xla" twin, jitted once per layer signature).

No JAX quantization library is used because none reproduces torch's qparams and rounding to the
bit, which fake-quant parity needs (the comparison is in docs/performance.md).
"""

from mbv3_jax.models.qat.convert import convert, from_float
from mbv3_jax.models.qat.fake_quant import (
    NUMERICS,
    QAT_QCONFIGS,
    FakeQuantize,
    FixedQParamsFakeQuantize,
    QATFlag,
    QATQConfig,
    QuantState,
    choose_qparams,
    fake_quantize,
    observer_qparams,
    qat_qconfig,
)
from mbv3_jax.models.qat.layers import BatchNorm, ConvBn, ConvNormActivation, Linear, QATLayers
from mbv3_jax.models.qat.model import QATMobileNetV3, qat_mobilenet_v3_large

__all__ = [
    "NUMERICS",
    "QAT_QCONFIGS",
    "BatchNorm",
    "ConvBn",
    "ConvNormActivation",
    "FakeQuantize",
    "FixedQParamsFakeQuantize",
    "Linear",
    "QATFlag",
    "QATLayers",
    "QATMobileNetV3",
    "QATQConfig",
    "QuantState",
    "choose_qparams",
    "convert",
    "fake_quantize",
    "from_float",
    "observer_qparams",
    "qat_mobilenet_v3_large",
    "qat_qconfig",
]
