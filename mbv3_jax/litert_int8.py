"""The integer MobileNetV3-Large (:class:`QuantizedMobileNetV3`) as a LiteRT int8 model.

The flatbuffer is written op for op from the JAX model's own integers, not re-quantized by a
converter: every weight, bias and activation scale / zero point is the model's, so LiteRT computes
the same integer network and differs only where its kernels round differently (measured by
tests/test_export.py and ``benchmarks/bench_export.py --int8``). Mapping:

* activations: torch's uint8 ``u`` with zero point ``z`` become LiteRT's int8 ``u - 128`` with zero
  point ``z - 128`` (the same real values); weights stay int8 per-tensor with zero point 0; biases
  are int32 at scale ``s_in * s_w``, rounded as QNNPACK quantizes them;
* QuantStub -> QUANTIZE, conv (+ fused ReLU) -> CONV_2D / DEPTHWISE_CONV_2D (strided convs get an
  explicit PAD: TFLite's SAME padding puts the odd pixel at the bottom, torch pads both sides),
  hardswish -> HARD_SWISH, SE pooling and ``avgpool`` -> MEAN, SE multiply -> MUL, residual -> ADD,
  Linear -> FULLY_CONNECTED, DeQuantStub -> DEQUANTIZE;
* hardsigmoid has no LiteRT op: SE's ``fc2`` is declared with its weight and output scales divided
  by 6 (the same integers, representing ``y / 6``) and an ADD of 0.5 requantizes to torch's fixed
  hardsigmoid output (1/256, zero point 0 as uint8), saturating where torch clamps.

Each op's output tensor is named after the torch module that computes it (the names of
``QuantizedMobileNetV3.quantized_intermediates``), so that :func:`op_alone` cuts out any one op to
run it on the JAX model's input for it.
Needs the ``export`` extra's ai-edge-litert (its flatbuffer schema and interpreter), not TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np

from mbv3_jax.models.backbone import InvertedResidual
from mbv3_jax.models.quantization import (
    HARDSIGMOID_SCALE,
    QConv2d,
    QConvNormActivation,
    QLinear,
    QSqueezeExcitation,
    QuantizedMobileNetV3,
)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
SIGNATURE_KEY = "serving_default"
# Op versions as TensorFlow 2.21's converter writes them for int8 models.
_OP_VERSIONS = {
    "QUANTIZE": 1,
    "PAD": 2,
    "CONV_2D": 3,
    "DEPTHWISE_CONV_2D": 3,
    "HARD_SWISH": 1,
    "MEAN": 2,
    "MUL": 2,
    "ADD": 2,
    "FULLY_CONNECTED": 4,
    "DEQUANTIZE": 2,
}
_INT32_MAX = 2**31 - 1


def _schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


@dataclass(frozen=True)
class _Q:
    """An int8 tensor of the graph: its index, shape and quantization."""

    index: int
    shape: tuple[int, ...]
    scale: np.float32
    zero_point: int  # int8 (torch's uint8 zero point - 128)


class _Graph:
    """Tensors, constant buffers and operators of one subgraph, in the order they are added."""

    def __init__(self) -> None:
        self.s = _schema()
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [self.s.BufferT()]  # buffer 0: the empty sentinel
        self.operators: list[Any] = []
        self.opcodes: dict[str, int] = {}

    def tensor(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: Any,
        *,
        scale: Any = None,
        zero_point: int | None = None,
        data: np.ndarray | None = None,
        quantized_dimension: int = 0,
    ) -> int:
        t = self.s.TensorT()
        t.name = name
        t.shape = list(shape)
        t.type = {
            np.float32: self.s.TensorType.FLOAT32,
            np.int32: self.s.TensorType.INT32,
            np.int8: self.s.TensorType.INT8,
        }[np.dtype(dtype).type]
        t.buffer = 0
        if data is not None:
            buffer = self.s.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data, dtype).tobytes(), np.uint8)
            self.buffers.append(buffer)
            t.buffer = len(self.buffers) - 1
        if scale is not None:
            q = self.s.QuantizationParametersT()
            q.scale = [float(v) for v in np.atleast_1d(np.asarray(scale, np.float32))]
            q.zeroPoint = [int(zero_point or 0)] * len(q.scale)
            q.quantizedDimension = quantized_dimension
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def activation(self, name: str, shape: tuple[int, ...], scale: Any, zero_point: int) -> _Q:
        scale = np.float32(scale)
        index = self.tensor(name, shape, np.int8, scale=scale, zero_point=zero_point)
        return _Q(index, shape, scale, zero_point)

    def op(self, kind: str, inputs: list[int], outputs: list[int], options: Any = None) -> None:
        if kind not in self.opcodes:
            self.opcodes[kind] = len(self.opcodes)
        op = self.s.OperatorT()
        op.opcodeIndex = self.opcodes[kind]
        op.inputs, op.outputs = list(inputs), list(outputs)
        if options is not None:
            op.builtinOptionsType = getattr(self.s.BuiltinOptions, type(options).__name__[:-1])
            op.builtinOptions = options
        self.operators.append(op)

    def options(self, name: str, **fields: Any) -> Any:
        options = getattr(self.s, f"{name}T")()
        for key, value in fields.items():
            setattr(options, key, value)
        return options

    def serialize(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
        s = self.s
        codes = []
        for kind in sorted(self.opcodes, key=self.opcodes.get):
            code = s.OperatorCodeT()
            code.builtinCode = getattr(s.BuiltinOperator, kind)
            code.deprecatedBuiltinCode = min(code.builtinCode, 127)
            code.version = _OP_VERSIONS[kind]
            codes.append(code)
        subgraph = s.SubGraphT()
        subgraph.tensors, subgraph.operators = self.tensors, self.operators
        subgraph.inputs, subgraph.outputs = inputs, outputs
        subgraph.name = "main"
        signature = s.SignatureDefT()
        signature.signatureKey = SIGNATURE_KEY
        signature.subgraphIndex = 0
        signature.inputs = [self._tensor_map(INPUT_NAME, i) for i in inputs]
        signature.outputs = [self._tensor_map(OUTPUT_NAME, i) for i in outputs]
        model = s.ModelT()
        model.version = 3
        model.operatorCodes = codes
        model.subgraphs = [subgraph]
        model.buffers = self.buffers
        model.signatureDefs = [signature]
        model.description = description
        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    def _tensor_map(self, name: str, index: int) -> Any:
        m = self.s.TensorMapT()
        m.name, m.tensorIndex = name, index
        return m


def _f32(x: Any) -> np.float32:
    return np.float32(np.asarray(x))


def _zero_point(param: Any) -> int:
    """torch's uint8 zero point as LiteRT's int8 one."""
    return int(np.asarray(param)) - 128


class _Writer:
    """Emits the int8 graph of a :class:`QuantizedMobileNetV3` in its forward's order."""

    def __init__(self, graph: _Graph):
        self.g = graph
        self.s = graph.s
        self.NONE = self.s.ActivationFunctionType.NONE

    def quantize(self, stub: Any, x: int, shape: tuple[int, ...]) -> _Q:
        y = self.g.activation(stub.name, shape, _f32(stub.scale[...]), _zero_point(stub.zero_point[...]))
        self.g.op("QUANTIZE", [x], [y.index])
        return y

    def weights_and_bias(
        self, layer: QConv2d | QLinear, weights: np.ndarray, w_scales: np.ndarray, x: _Q, dim: int
    ) -> tuple[int, int]:
        """The int8 weight and int32 bias tensors of a conv or linear reading ``x``. The bias is
        quantized as QNNPACK does: ``round(bias * (1 / (s_in * s_w)))``, half to even, saturated."""
        bias_scale = np.float32(x.scale * _f32(layer.weight_scale[...]))
        qbias = np.round(np.asarray(layer.bias[...], np.float32) * (np.float32(1.0) / bias_scale))
        qbias = np.clip(qbias, -_INT32_MAX, _INT32_MAX).astype(np.int32)
        w_index = self.g.tensor(
            f"{layer.name}.weight",
            weights.shape,
            np.int8,
            scale=w_scales,
            zero_point=0,
            data=weights,
            quantized_dimension=dim,
        )
        # Declared at s_in times the declared weight scale(s), as LiteRT requires.
        b_index = self.g.tensor(
            f"{layer.name}.bias", qbias.shape, np.int32, scale=x.scale * w_scales, zero_point=0, data=qbias
        )
        return w_index, b_index

    def conv(self, conv: QConv2d, x: _Q, *, scale_divisor: float = 1.0) -> _Q:
        """A quantized conv; ``scale_divisor`` declares weight and output scales divided by it (the
        same integers, representing the output / divisor)."""
        k, s, d, p = conv.kernel_size, conv.stride, conv.dilation, conv.padding
        kernel = np.asarray(conv.kernel[...])  # HWIO int8
        w_scale = np.float32(_f32(conv.weight_scale[...]) / np.float32(scale_divisor))
        n, h, w, _ = x.shape
        oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
        ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
        # Stride 1 with odd kernels: SAME pads (k - 1) * d / 2 on each side, as torch does.
        padding = self.s.Padding.SAME if s == 1 and p else self.s.Padding.VALID
        if p and s != 1:
            x = self.pad(x, p, f"{conv.name}.pad")
        depthwise = conv.groups > 1
        if depthwise:
            if conv.groups != conv.in_channels or conv.groups != conv.out_channels:
                raise ValueError(f"{conv.name}: grouped convs other than depthwise are not supported")
            # (1, H, W, C), weight and bias scales per channel (the same scale repeated) as
            # TensorFlow's converter writes them: XNNPACK refuses a per-tensor depthwise bias.
            weights = kernel.reshape(1, k, k, conv.out_channels)
            w_index, b_index = self.weights_and_bias(
                conv, weights, np.full(conv.out_channels, w_scale, np.float32), x, dim=3
            )
        else:
            weights = kernel.transpose(3, 0, 1, 2)  # OHWI
            w_index, b_index = self.weights_and_bias(conv, weights, np.array([w_scale]), x, dim=0)
        out_scale = np.float32(_f32(conv.scale[...]) / np.float32(scale_divisor))
        out_shape = (n, oh, ow, conv.out_channels)
        y = self.g.activation(conv.name, out_shape, out_scale, _zero_point(conv.zero_point[...]))
        fields = dict(
            padding=padding,
            strideH=s,
            strideW=s,
            dilationHFactor=d,
            dilationWFactor=d,
            fusedActivationFunction=self.s.ActivationFunctionType.RELU if conv.relu else self.NONE,
        )
        if depthwise:
            kind, options = (
                "DEPTHWISE_CONV_2D",
                self.g.options("DepthwiseConv2DOptions", depthMultiplier=1, **fields),
            )
        else:
            kind, options = "CONV_2D", self.g.options("Conv2DOptions", **fields)
        self.g.op(kind, [x.index, w_index, b_index], [y.index], options)
        return y

    def pad(self, x: _Q, p: int, name: str) -> _Q:
        paddings = np.array([[0, 0], [p, p], [p, p], [0, 0]], np.int32)
        p_index = self.g.tensor(f"{name}.paddings", paddings.shape, np.int32, data=paddings)
        n, h, w, c = x.shape
        # A quantized PAD fills with the zero point (real 0), as torch's padding does.
        y = self.g.activation(name, (n, h + 2 * p, w + 2 * p, c), x.scale, x.zero_point)
        self.g.op("PAD", [x.index, p_index], [y.index], self.g.options("PadOptions"))
        return y

    def hardswish(self, act: Any, x: _Q) -> _Q:
        y = self.g.activation(act.name, x.shape, _f32(act.scale[...]), _zero_point(act.zero_point[...]))
        self.g.op("HARD_SWISH", [x.index], [y.index], self.g.options("HardSwishOptions"))
        return y

    def mean(self, x: _Q, name: str, keep_dims: bool) -> _Q:
        axes = np.array([1, 2], np.int32)
        a_index = self.g.tensor(f"{name}.axes", axes.shape, np.int32, data=axes)
        n, _, _, c = x.shape
        shape = (n, 1, 1, c) if keep_dims else (n, c)
        # adaptive_avg_pool2d keeps its input's qparams.
        y = self.g.activation(name, shape, x.scale, x.zero_point)
        self.g.op("MEAN", [x.index, a_index], [y.index], self.g.options("ReducerOptions", keepDims=keep_dims))
        return y

    def binary(self, kind: str, a: _Q, b: _Q | int, name: str, scale: Any, zero_point: int) -> _Q:
        b_index = b if isinstance(b, int) else b.index
        y = self.g.activation(name, a.shape, scale, zero_point)
        options = self.g.options(f"{kind.capitalize()}Options", fusedActivationFunction=self.NONE)
        self.g.op(kind, [a.index, b_index], [y.index], options)
        return y

    def conv_norm_activation(self, layer: QConvNormActivation, x: _Q) -> _Q:
        y = self.conv(layer.conv, x)
        return y if layer.act is None else self.hardswish(layer.act, y)

    def squeeze_excitation(self, se: QSqueezeExcitation, x: _Q) -> _Q:
        s = self.mean(x, f"{se.name}.avgpool", keep_dims=True)
        s = self.conv(se.fc1, s)
        s = self.conv(se.fc2, s, scale_divisor=6.0)  # represents fc2(...) / 6
        # hardsigmoid(y) = clamp(y / 6 + 0.5, 0, 1): 0.5 exactly as int8 0 at (1/256, -128).
        half = self.g.tensor(
            f"{se.name}.half",
            (1, 1, 1, 1),
            np.int8,
            scale=HARDSIGMOID_SCALE,
            zero_point=-128,
            data=np.zeros((1, 1, 1, 1), np.int8),
        )
        s = self.binary("ADD", s, half, f"{se.name}.scale_activation", HARDSIGMOID_SCALE, -128)
        mul = se.skip_mul
        # x first: MUL's output takes the first input's shape here (the SE scale broadcasts).
        return self.binary("MUL", x, s, mul.name, _f32(mul.scale[...]), _zero_point(mul.zero_point[...]))

    def inverted_residual(self, block: InvertedResidual, x: _Q) -> _Q:
        y = x
        for layer in block.block:
            if isinstance(layer, QSqueezeExcitation):
                y = self.squeeze_excitation(layer, y)
            else:
                y = self.conv_norm_activation(layer, y)
        if not block.use_res_connect:
            return y
        add = block.skip_add
        return self.binary("ADD", x, y, add.name, _f32(add.scale[...]), _zero_point(add.zero_point[...]))

    def linear(self, linear: QLinear, x: _Q) -> _Q:
        kernel = np.asarray(linear.kernel[...]).T  # (out, in)
        w_scale = np.array([_f32(linear.weight_scale[...])])
        w_index, b_index = self.weights_and_bias(linear, kernel, w_scale, x, dim=0)
        out_shape = (x.shape[0], linear.out_features)
        y = self.g.activation(
            linear.name, out_shape, _f32(linear.scale[...]), _zero_point(linear.zero_point[...])
        )
        options = self.g.options(
            "FullyConnectedOptions", fusedActivationFunction=self.NONE, keepNumDims=False
        )
        self.g.op("FULLY_CONNECTED", [x.index, w_index, b_index], [y.index], options)
        return y

    def model(self, model: QuantizedMobileNetV3, input_shape: tuple[int, ...]) -> tuple[int, int]:
        images = self.g.tensor(INPUT_NAME, input_shape, np.float32)
        q = self.quantize(model.quant, images, input_shape)
        for layer in model.features:
            if isinstance(layer, InvertedResidual):
                q = self.inverted_residual(layer, q)
            else:
                q = self.conv_norm_activation(layer, q)
        q = self.mean(q, "avgpool", keep_dims=False)
        q = self.hardswish(model.classifier_act, self.linear(model.classifier_hidden, q))
        # classifier.2 is Dropout: the identity at inference.
        q = self.linear(model.classifier_out, q)
        logits = self.g.tensor(OUTPUT_NAME, q.shape, np.float32)
        self.g.op("DEQUANTIZE", [q.index], [logits])
        return images, logits


def int8_tflite(model: QuantizedMobileNetV3, input_hw: tuple[int, int], batch: int = 1) -> bytes:
    """The LiteRT int8 flatbuffer of ``model`` for a (batch, H, W, 3) float32 input (normalized
    images, quantized inside) with float32 logits out."""
    if not isinstance(model, QuantizedMobileNetV3):
        raise TypeError(f"expected a QuantizedMobileNetV3, got {type(model).__name__}")
    graph = _Graph()
    images, logits = _Writer(graph).model(model, (batch, *input_hw, 3))
    description = (
        f"mbv3_jax {model.architecture['builder']} int8 (requantization scales of the "
        f"'{model.backend}'-calibrated model)"
    )
    return graph.serialize([images], [logits], description)


def run_tflite(content: bytes, inputs: list[np.ndarray], *, xnnpack: bool = True) -> np.ndarray:
    """Run a LiteRT model held in memory on ``inputs`` (in its input order); returns its first
    output. ``xnnpack``: LiteRT's default XNNPACK delegate, else its builtin kernels alone."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(model_content=content, experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    for detail, value in zip(interpreter.get_input_details(), inputs, strict=True):
        interpreter.set_tensor(detail["index"], np.ascontiguousarray(value).reshape(detail["shape"]))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def op_alone(content: bytes, output_name: str) -> tuple[bytes, list[str], str]:
    """The op of an :func:`int8_tflite` model that writes tensor ``output_name`` (a torch module
    name; with the PAD before a strided conv) as a model of its own. Returns the model, the names of
    its inputs (the tensors that feed it, to be given their int8 values) and the op's type."""
    s = _schema()
    model = s.ModelT.InitFromPackedBuf(content, 0)
    graph = model.subgraphs[0]
    names = [t.name.decode() for t in graph.tensors]
    producer = {op.outputs[0]: op for op in graph.operators}
    if output_name not in names:
        raise KeyError(f"no tensor named {output_name!r} in the model")
    ops = [producer[names.index(output_name)]]
    if names[ops[0].inputs[0]].endswith(".pad"):
        ops.insert(0, producer[ops[0].inputs[0]])
    produced = {op.outputs[0] for op in ops}
    inputs = [i for op in ops for i in op.inputs if graph.tensors[i].buffer == 0 and i not in produced]
    graph.operators, graph.inputs, graph.outputs = ops, inputs, [ops[-1].outputs[0]]
    model.signatureDefs = None
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    kinds = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    kind = kinds[model.operatorCodes[ops[-1].opcodeIndex].builtinCode]
    return bytes(builder.Output()), [names[i] for i in inputs], kind


def as_litert(values: Any) -> np.ndarray:
    """torch's uint8 activation values as LiteRT's int8 (minus 128)."""
    return (np.asarray(values).astype(np.int16) - 128).astype(np.int8)


def as_torch(values: Any) -> np.ndarray:
    """LiteRT's int8 activation values as torch's uint8 (plus 128)."""
    return (np.asarray(values).astype(np.int16) + 128).astype(np.uint8)
