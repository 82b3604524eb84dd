"""ONNX export of a fitted model: the input normaliser, every layer as inference runs it, and
the output, as one graph that onnxruntime (or any ONNX runtime) serves without fastnn.

The graph takes ``x`` (N, n_inputs) raw inputs in the network's dtype and gives ``y``: class
probabilities (softmax networks) or regression values, and for classifiers ``label``, each
row's most probable class (the saved class labels, else its index). It computes what
`fastnn.Model.outputs` computes, step by step:

- the normaliser: ``(x - shift) / scale``;
- article dropout's evaluation scaling: the layer's nodes times the keep ratio (inverted
  dropout scales in training, so nothing here);
- per hidden layer: ``x W + b``, batch norm with the inference statistics (population, or
  running with ``bn_eval="running"``) as ``(u - mean) / max(sqrt(var), 1e-7)``, then gamma
  and beta, then the activation (``step`` as ``u > 0`` cast to the dtype, ``leaky_relu`` as a
  Where with alpha in the dtype: ONNX's LeakyRelu keeps alpha in float32);
- the output layer, then softmax or nothing; a regressor of the estimators also undoes its
  target scaling.

``onnx`` is an optional dependency, imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, MissingDependency

#: the ONNX operator set the graphs use
OPSET = 17
#: activations that are one ONNX operator of the same meaning (attributes aside)
_UNARY = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "softplus": "Softplus",
          "softsign": "Softsign", "identity": "Identity"}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise MissingDependency("ONNX export needs onnx: pip install onnx") from None
    return onnx


class _Graph:
    """The nodes and constants of a graph being built, each value named once."""

    def __init__(self, onnx: Any, dtype: np.dtype) -> None:
        self.onnx, self.dtype = onnx, dtype
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def constant(self, stem: str, value: Any, dtype: Any = None) -> str:
        name = self.name(stem)
        array = np.asarray(value, dtype=self.dtype if dtype is None else dtype)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def op(self, kind: str, inputs: Sequence[str], stem: str | None = None,
           output: str | None = None, **attributes: Any) -> str:
        out = output or self.name(stem or kind.lower())
        self.nodes.append(self.onnx.helper.make_node(kind, list(inputs), [out], **attributes))
        return out


def model_graph(model: Any, target_scaler: Any = None) -> Any:
    """The `onnx.ModelProto` of a fastnn `Model` (and of a regressor's ``target_scaler``)."""
    onnx = _onnx()
    net = model.network
    plan = net.plan
    dtype = np.dtype(net.dtype)
    graph = _Graph(onnx, dtype)
    params = net.numpy_params()
    stats = net.inference_statistics()
    if plan.batch_norm != "off" and stats is None:
        raise DataError("this batch-norm network has no inference statistics (not fitted, or "
                        "saved by an older fastnn): fit it before exporting")
    stats = {k: tuple(np.asarray(net.ops.to_numpy(a)) for a in pair)
             for k, pair in (stats or {}).items()}
    normalizer = model.normalizer
    z = "x"
    if normalizer.method != "none":
        z = graph.op("Sub", [z, graph.constant("shift", normalizer.shift)], "centred")
        z = graph.op("Div", [z, graph.constant("scale", normalizer.scale)], "normalised")
    scales = plan.eval_scales()
    if scales[0] != 1.0:
        z = graph.op("Mul", [z, graph.constant("keep", scales[0])], "kept")
    for k in range(1, plan.n_layers + 1):
        u = graph.op("MatMul", [z, graph.constant(f"W{k}", params[f"W{k}"])], f"xw{k}")
        u = graph.op("Add", [u, graph.constant(f"b{k}", params[f"b{k}"])], f"u{k}")
        if k == plan.n_layers:
            z = u
            break
        spec = plan.hidden[k - 1]
        if spec.batch_norm != "off":
            mean, var = stats[k]
            std = np.maximum(np.sqrt(var.astype(dtype)), dtype.type(1e-7))
            u = graph.op("Sub", [u, graph.constant(f"mean{k}", mean)])
            u = graph.op("Div", [u, graph.constant(f"std{k}", std)], f"u_hat{k}")
            if f"gamma{k}" in params:
                u = graph.op("Mul", [u, graph.constant(f"gamma{k}", params[f"gamma{k}"])])
                u = graph.op("Add", [u, graph.constant(f"beta{k}", params[f"beta{k}"])],
                             f"y{k}")
        z = _activation(graph, spec, u, k)
        if scales[k] != 1.0:
            z = graph.op("Mul", [z, graph.constant(f"keep{k}", scales[k])], f"kept{k}")
    elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    outputs = []
    n_out = net.sizes[-1]
    if plan.output == "softmax_cross_entropy":
        graph.op("Softmax", [z], output="y", axis=-1)
        index = graph.op("ArgMax", ["y"], "index", axis=1, keepdims=0)
        outputs.append(onnx.helper.make_tensor_value_info("y", elem, ["N", n_out]))
        outputs.append(_labels(graph, index, model.classes))
    else:
        if target_scaler is not None:
            z = graph.op("Mul", [z, graph.constant("target_scale", target_scaler.scale)])
            z = graph.op("Add", [z, graph.constant("target_shift", target_scaler.shift)])
        graph.op("Identity", [z], output="y")
        outputs.append(onnx.helper.make_tensor_value_info("y", elem, ["N", n_out]))
    inputs = [onnx.helper.make_tensor_value_info("x", elem, ["N", net.sizes[0]])]
    body = onnx.helper.make_graph(graph.nodes, "fastnn", inputs, outputs, graph.initializers)
    proto = onnx.helper.make_model(body, producer_name="fastnn",
                                   opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    proto.ir_version = min(proto.ir_version, 8)  # readable by onnxruntime releases since 1.14
    onnx.checker.check_model(proto)
    return proto


def _activation(graph: _Graph, spec: Any, u: str, k: int) -> str:
    name = spec.activation
    if name in _UNARY:
        return graph.op(_UNARY[name], [u], f"z{k}")
    if name not in ("leaky_relu", "step"):
        raise DataError(f"activation {name!r} has no ONNX form here")
    positive = graph.op("Greater", [u, graph.constant("zero", 0.0)])
    if name == "leaky_relu":  # not LeakyRelu: its alpha is a float32 attribute
        scaled = graph.op("Mul", [u, graph.constant("alpha", spec.alpha)])
        return graph.op("Where", [positive, u, scaled], f"z{k}")
    return graph.op("Cast", [positive], f"z{k}",
                    to=graph.onnx.helper.np_dtype_to_tensor_dtype(graph.dtype))


def _labels(graph: _Graph, index: str, classes: Sequence[Any] | None) -> Any:
    """The ``label`` output: the class index, or the saved labels gathered by it."""
    onnx = graph.onnx
    if classes is None:
        graph.op("Identity", [index], output="label")
        return onnx.helper.make_tensor_value_info("label", onnx.TensorProto.INT64, ["N"])
    values = np.asarray(classes)
    if values.dtype.kind in "US":
        table = graph.name("classes")
        graph.initializers.append(onnx.helper.make_tensor(
            table, onnx.TensorProto.STRING, [len(values)], [str(v).encode() for v in values]))
        elem = onnx.TensorProto.STRING
    elif values.dtype.kind in "biuf":
        table = graph.constant("classes", values, values.dtype)
        elem = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    else:
        raise DataError(f"class labels of dtype {values.dtype} have no ONNX form; use numbers "
                        "or strings")
    graph.op("Gather", [table, index], output="label", axis=0)
    return onnx.helper.make_tensor_value_info("label", elem, ["N"])


def save(proto: Any, path: str | Path) -> Path:
    """Write a graph to ``path`` whole (through a temporary file and a rename)."""
    from .fileio import write_atomically

    data = proto.SerializeToString()
    return write_atomically(path, lambda handle: handle.write(data))
