"""ONNX in: an ONNX model as a torch module that torch.export traces into the graph every pass
works on, so no pass forks per IR.

:class:`OnnxModule` interprets the ONNX graph with torch functions. Float initializers become
buffers (constants of the traced graph), and a ``MatMul`` by a constant 2-D matrix or a ``Gemm``
becomes ``F.linear`` on a pre-transposed copy, so the structure view sees an ``aten.linear`` with
a constant weight exactly as for a torch model; ``Conv`` becomes ``aten.conv*``. Integer values
known at trace time (shapes, constant axes and indices) are kept as Python values
(:class:`Known`): ``Shape → Gather → Concat → Reshape`` chains then trace to symbolic sizes instead
of data-dependent tensors.

Refused with the node named: ops outside :data:`OPS`, control flow (If/Loop/Scan), ops of other
domains, external data outside the model's folder, and attribute values qgraph does not
implement (e.g. a Resize mode).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from .errors import ModelFileError, TraceError

__all__ = [
    "OPS",
    "OnnxModule",
    "dynamic_dims",
    "example_inputs",
    "input_specs",
    "read_onnx",
    "unsupported_ops",
]

CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})


@dataclass(frozen=True)
class Known:
    """An integer tensor known while tracing (a shape, axes, indices): a numpy array whose
    entries may be symbolic sizes (dtype object)."""

    value: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.value, np.ndarray):  # a lone element (numpy scalar or SymInt)
            value = self.value
            array = np.empty((), dtype=object if isinstance(value, torch.SymInt) else None)
            if array.dtype == object:
                array[()] = value
            else:
                array = np.asarray(value)
            object.__setattr__(self, "value", array)

    def tolist(self) -> list:
        return self.value.reshape(-1).tolist()


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int | str | None, ...]  # None or a name for a dynamic dim


_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def _torch_dtype(onnx_type: int, where: str) -> torch.dtype:
    if onnx_type not in _DTYPES:
        name = onnx.TensorProto.DataType.Name(onnx_type)
        raise TraceError(f"{where}: ONNX element type {name} is not supported")
    return _DTYPES[onnx_type]


def read_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file with its external data, refusing data files outside its folder."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others for a corrupt file
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    folder = path.resolve().parent
    for tensor in _all_initializers(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if folder not in target.parents:
            raise ModelFileError(
                f"{path}: initializer {tensor.name!r} points outside the model's folder "
                f"({location!r}); qgraph reads external data only next to the model"
            )
        if not target.is_file():
            raise ModelFileError(f"{path}: external data file {location!r} is missing")
    try:
        onnx.load_external_data_for_model(proto, str(folder))
    except Exception as exc:
        raise ModelFileError(f"{path}: cannot read its external data: {exc}") from None
    return proto


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attr.g)


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def unsupported_ops(proto: onnx.ModelProto) -> dict[str, str]:
    """Op type → first node using it, for every node the importer cannot run."""
    bad: dict[str, str] = {}
    for node in proto.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if key not in OPS and key not in bad:
            bad[key] = node.name or node.output[0]
    return bad


def input_specs(proto: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are not initializers, with dtypes and (possibly dynamic) shapes."""
    inits = {t.name for t in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        dims: list[int | str | None] = []
        for d in ttype.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        specs.append(
            InputSpec(
                value.name, _torch_dtype(ttype.elem_type, f"input {value.name!r}"), tuple(dims)
            )
        )
    return specs


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if a.type == onnx.AttributeProto.TENSOR:
            value = numpy_helper.to_array(value)
        elif isinstance(value, bytes):
            value = value.decode()
        out[a.name] = value
    return out


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name).strip("_") or "t"


class OnnxModule(torch.nn.Module):
    """Runs an ONNX graph with torch ops; traced by torch.export into qgraph's graph."""

    def __init__(self, proto: onnx.ModelProto, name: str = "onnx"):
        super().__init__()
        graph = proto.graph
        for node in graph.node:
            if node.op_type in CONTROL_FLOW:
                raise TraceError(
                    f"{name}: node {node.name or node.output[0]!r} is control flow "
                    f"({node.op_type}); qgraph imports straight-line ONNX graphs only"
                )
        bad = unsupported_ops(proto)
        if bad:
            listed = ", ".join(f"{op} (first at {where!r})" for op, where in sorted(bad.items()))
            raise TraceError(f"{name}: unsupported ONNX op(s): {listed}")
        self.opset = _opset(proto)
        self.model_name = name
        self.nodes = list(graph.node)
        self.node_attrs = [_attrs(n) for n in self.nodes]
        self.inputs = input_specs(proto)
        self.outputs = [v.name for v in graph.output]
        self._constants: dict[Any, Any] = {}
        used_names: set[str] = set()
        arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node, attrs in zip(self.nodes, self.node_attrs, strict=True):
            if node.op_type == "Constant":  # evaluated once here, like an initializer
                arrays[node.output[0]] = _constant_array(node, attrs)
        for name in self._matmul_weights(arrays):  # stored as F.linear's [out, in] weight
            wt = torch.from_numpy(np.ascontiguousarray(arrays[name].T))
            self._constants[("T", name)] = self._buffer(name, wt, used_names)
        # MatMul(x, Transpose(W)) with a constant W (a tied embedding) is F.linear(x, W) on W
        # itself, so the structure view sees the tie
        self._transposed: dict[str, str] = {}
        for node, attrs in zip(self.nodes, self.node_attrs, strict=True):
            source = node.input[0] if node.input else ""
            if (
                node.op_type == "Transpose"
                and source in arrays
                and arrays[source].ndim == 2
                and list(attrs.get("perm", [1, 0])) == [1, 0]
            ):
                self._transposed[node.output[0]] = source
        readers: dict[str, set[str]] = {}
        for node in self.nodes:
            for name in node.input:
                readers.setdefault(name, set()).add(node.op_type)
        for name, array in arrays.items():
            self._constants[name] = self._constant(
                name, array, readers.get(name, set()), used_names
            )

    def _matmul_weights(self, arrays: dict[str, np.ndarray]) -> set[str]:
        """Constants used as the 2-D right operand of MatMul or of Gemm(transB=0)."""
        wanted: set[str] = set()
        for node, attrs in zip(self.nodes, self.node_attrs, strict=True):
            right = node.input[1] if len(node.input) > 1 else ""
            if right not in arrays or arrays[right].ndim != 2:
                continue
            if node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transB")):
                wanted.add(right)
        return wanted

    def _constant(self, name: str, array: np.ndarray, readers: set[str], used: set[str]):
        """Small integer arrays, float scalars and Resize scales stay Python-side values
        (:class:`Known`); every other constant becomes a buffer."""
        if array.dtype.kind in "iu" and array.size <= 64:
            return Known(array.astype(np.int64))
        if array.dtype.kind == "b" and array.size <= 64 or array.size == 1:
            return Known(array)
        if array.size <= 64 and readers and readers <= {"Resize", "Upsample"}:
            return Known(array)
        return self._buffer(name, torch.from_numpy(array.copy()), used)

    def _buffer(self, name: str, tensor: torch.Tensor, used: set[str]) -> str:
        attr = _safe(name)
        base, k = attr, 1
        while attr in used:
            attr, k = f"{base}_{k}", k + 1
        used.add(attr)
        self.register_buffer(attr, tensor, persistent=True)
        return attr

    def forward(self, *args: torch.Tensor):
        env: dict[str, Any] = {}
        for spec, value in zip(self.inputs, args, strict=True):
            env[spec.name] = value
        for key, value in self._constants.items():
            if isinstance(key, str):
                env[key] = value
        for node, attrs in zip(self.nodes, self.node_attrs, strict=True):
            if node.op_type == "Constant":
                continue  # evaluated in __init__
            ins = [self._value(env, name) for name in node.input]
            try:
                outs = OPS[node.op_type](self, node, ins, attrs)
            except TraceError:
                raise
            except Exception as exc:
                raise TraceError(
                    f"{self.model_name}: ONNX node {node.name or node.output[0]!r} "
                    f"({node.op_type}): {type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(outs, (list, tuple)):
                outs = (outs,)
            for name, value in zip(node.output, outs, strict=False):
                if name:
                    env[name] = value
        results = tuple(_tensor(env[name]) for name in self.outputs)
        return results[0] if len(results) == 1 else results

    def _value(self, env: dict[str, Any], name: str):
        if not name:
            return None
        value = env[name]
        if isinstance(value, str):  # a buffer's attribute name
            return getattr(self, value)
        return value

    def linear_weight(self, name: str) -> torch.Tensor | None:
        """The ``[out, in]`` weight of a MatMul by a constant: a pre-transposed copy, or the
        constant itself when the graph transposes it first; None otherwise."""
        if name in self._transposed:
            attr = self._constants.get(self._transposed[name])
            return getattr(self, attr) if isinstance(attr, str) else None
        attr = self._constants.get(("T", name))
        return getattr(self, attr) if attr else None


def _tensor(value, like: torch.Tensor | None = None):
    """A Known as a tensor (symbolic sizes become 0-d tensors), or as a Python number when it
    has one element and meets a tensor of at least its rank (broadcasting is then the same)."""
    if isinstance(value, Known):
        v = value.value
        if like is not None and v.size == 1 and v.ndim <= like.dim() and v.dtype != object:
            item = v.reshape(-1)[0].item()
            return float(item) if like.is_floating_point() else item
        v = value.value
        if v.dtype == object:
            flat = [torch.as_tensor(e) for e in v.reshape(-1).tolist()]
            t = torch.stack(flat).reshape(v.shape) if flat else torch.zeros(v.shape)
        else:
            t = torch.from_numpy(np.array(v))
        if like is not None and like.is_floating_point():
            t = t.to(like.dtype)
        return t
    return value


def _known_or_tensor(fn_np: Callable, fn_t: Callable, *ins):
    """Apply ``fn_np`` when every input is Known (keeping the result Known), else ``fn_t``."""
    if all(isinstance(x, Known) for x in ins):
        return Known(np.asarray(fn_np(*(x.value for x in ins))))
    tensors = [x for x in ins if isinstance(x, torch.Tensor)]
    like = next((t for t in tensors if t.is_floating_point()), tensors[0] if tensors else None)
    args = [_tensor(x, like) for x in ins]
    if args and not isinstance(args[0], torch.Tensor) and like is not None:
        # a number may only follow a tensor in aten ops (mul.Tensor(2.0, x) does not export)
        args[0] = torch.scalar_tensor(args[0], dtype=like.dtype)
    return fn_t(*args)


# -- op implementations: (module, node, inputs, attrs) -> output(s) ------------------------


def _binary(np_fn, t_fn, commutative: bool = False):
    def run(m, n, ins, a):
        first, second = ins
        if commutative and isinstance(first, Known) and isinstance(second, torch.Tensor):
            first, second = second, first  # x * 2.0 rather than a constant tensor 2.0 * x
        return _known_or_tensor(np_fn, t_fn, first, second)

    return run


def _unary(t_fn):
    return lambda m, n, ins, a: t_fn(_tensor(ins[0]))


def _ints(value) -> list:
    """Integers of a shape-like value; symbolic sizes stay symbolic (``int()`` would fix them)."""
    if value is None:
        return []
    if isinstance(value, Known):
        return [v if isinstance(v, torch.SymInt) else int(v) for v in value.tolist()]
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def _div(a, b):
    if a.dtype.kind in "iu" and b.dtype.kind in "iu" or a.dtype == object:
        return a // b
    return a / b


def _div_t(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _constant_array(n: onnx.NodeProto, a: dict[str, Any]) -> np.ndarray:
    """The value of a Constant node."""
    if "value" in a:
        return np.array(a["value"])
    for key, dtype in (
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        if key in a:
            return np.array(a[key], dtype=dtype)
    raise TraceError(f"Constant {n.name!r}: unsupported attribute {sorted(a)}")


def _shape(m, n, ins, a):
    dims = list(ins[0].shape)
    start, end = a.get("start", 0), a.get("end", len(dims))
    return Known(np.array(dims[start:end], dtype=object))


def _gather(m, n, ins, a):
    data, idx = ins
    axis = a.get("axis", 0)
    if isinstance(data, Known) and isinstance(idx, Known):
        return Known(np.take(data.value, idx.value, axis=axis))
    data = _tensor(data)
    if isinstance(idx, Known):
        index = torch.from_numpy(np.array(idx.value, dtype=np.int64))
        index = torch.where(index < 0, index + data.shape[axis], index)
        if index.dim() == 0:
            return data.select(axis, int(index))
        return torch.index_select(data, axis, index.reshape(-1)).reshape(
            *data.shape[:axis], *index.shape, *data.shape[axis + 1 :]
        )
    index = idx.long()
    index = torch.where(index < 0, index + data.shape[axis], index)
    out = torch.index_select(data, axis, index.reshape(-1))
    return out.reshape(*data.shape[:axis], *index.shape, *data.shape[axis + 1 :])


def _axes(m, n, ins, a, position: int = 1) -> list[int] | None:
    if "axes" in a:
        return list(a["axes"])
    if len(ins) > position and ins[position] is not None:
        return _ints(ins[position])
    return None


def _unsqueeze(m, n, ins, a):
    axes = _axes(m, n, ins, a)
    x = ins[0]
    rank = (x.value.ndim if isinstance(x, Known) else x.dim()) + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = Known(np.expand_dims(x.value, ax)) if isinstance(x, Known) else x.unsqueeze(ax)
    return x


def _squeeze(m, n, ins, a):
    axes = _axes(m, n, ins, a)
    x = ins[0]
    if isinstance(x, Known):
        return Known(np.squeeze(x.value, axis=tuple(axes) if axes else None))
    if axes is None:
        return x.squeeze()
    for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _concat(m, n, ins, a):
    axis = a["axis"]
    if all(isinstance(x, Known) for x in ins):
        return Known(np.concatenate([x.value for x in ins], axis=axis))
    tensors = [_tensor(x) for x in ins]
    like = next((t for t in tensors if t.is_floating_point()), tensors[0])
    return torch.cat([t.to(like.dtype) for t in tensors], dim=axis)


def _cast(m, n, ins, a):
    dtype = _torch_dtype(a["to"], f"Cast {n.name!r}")
    x = ins[0]
    if isinstance(x, Known) and dtype in (torch.int64, torch.int32, torch.bool):
        return x
    return _tensor(x).to(dtype)


def _slice(m, n, ins, a):
    x = ins[0]
    if m.opset < 10:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes, steps = a.get("axes"), None
    else:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else None
    rank = x.value.ndim if isinstance(x, Known) else x.dim()
    axes = [ax % rank for ax in (axes or range(len(starts)))]
    steps = steps or [1] * len(starts)
    index: list[Any] = [slice(None)] * rank
    for ax, s, e, st in zip(axes, starts, ends, steps, strict=True):
        if st <= 0:
            raise TraceError(f"Slice {n.name!r}: step {st} is not supported")
        big = 1 << 62
        index[ax] = slice(None if s <= -big else s, None if e >= big else e, st)
    if isinstance(x, Known):
        return Known(x.value[tuple(index)])
    return x[tuple(index)]


def _reshape(m, n, ins, a):
    x, shape = ins[0], _ints(ins[1]) if not isinstance(ins[1], Known) else ins[1].tolist()
    dims = list(x.value.shape if isinstance(x, Known) else x.shape)
    target = []
    for i, d in enumerate(shape):
        if isinstance(d, int) and d == 0 and not a.get("allowzero", 0):
            target.append(dims[i])
        else:
            target.append(d)
    if isinstance(x, Known):
        return Known(x.value.reshape([int(d) for d in target]))
    return x.reshape(target)


def _flatten(m, n, ins, a):
    x = ins[0]
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _transpose(m, n, ins, a):
    x = _tensor(ins[0])
    perm = a.get("perm", list(range(x.dim()))[::-1])
    return x.permute(*perm)


def _softmax(m, n, ins, a, fn=torch.softmax):
    x = ins[0]
    axis = a.get("axis", -1 if m.opset >= 13 else 1)
    if m.opset < 13 and axis % x.dim() != x.dim() - 1:  # old semantics: flatten at axis
        shape = x.shape
        return fn(x.reshape(math.prod(shape[:axis]), -1), dim=-1).reshape(shape)
    return fn(x, dim=axis)


def _reduce(fn):
    def run(m, n, ins, a):
        axes = _axes(m, n, ins, a)
        keep = bool(a.get("keepdims", 1))
        x = ins[0]
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=axes, keepdim=keep)

    return run


def _amax(x, dim, keepdim):
    return torch.amax(x, dim=dim, keepdim=keepdim)


def _amin(x, dim, keepdim):
    return torch.amin(x, dim=dim, keepdim=keepdim)


def _matmul(m, n, ins, a):
    weight = m.linear_weight(n.input[1])
    if weight is not None:
        return F.linear(ins[0], weight)
    return torch.matmul(_tensor(ins[0]), _tensor(ins[1]))


def _gemm(m, n, ins, a):
    x, w = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    if a.get("transA", 0):
        x = x.T
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if alpha != 1.0 or beta != 1.0 or (bias is not None and bias.dim() > 1):
        wm = w.T if a.get("transB", 0) else w
        out = alpha * (x @ wm)
        return out if bias is None else out + beta * bias
    if a.get("transB", 0):
        return F.linear(x, w, bias)
    weight = m.linear_weight(n.input[1])
    return F.linear(x, weight if weight is not None else w.T, bias)


def _pads(a, spatial: int, n, x_shape=None, kernel=None, strides=None, dilations=None):
    """ONNX pads (begin..., end...) as (symmetric padding, explicit F.pad or None)."""
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(spatial):
            size, k, s = int(x_shape[2 + i]), kernel[i], strides[i]
            d = dilations[i]
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto == "SAME_UPPER" else big)
            pads_e.append(big if auto == "SAME_UPPER" else small)
        pads = pads_b + pads_e
    elif auto == "VALID":
        pads = [0] * (2 * spatial)
    elif auto == "NOTSET":
        pads = list(a.get("pads", [0] * (2 * spatial)))
    else:
        raise TraceError(f"node {n.name!r}: auto_pad={auto} is not supported")
    begin, end = pads[:spatial], pads[spatial:]
    if begin == end:
        return begin, None
    explicit = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        explicit += [b, e]
    return [0] * spatial, explicit


def _conv(m, n, ins, a):
    x, w = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    spatial = w.dim() - 2
    strides = list(a.get("strides", [1] * spatial))
    dilations = list(a.get("dilations", [1] * spatial))
    kernel = list(w.shape[2:])
    padding, explicit = _pads(a, spatial, n, x.shape, kernel, strides, dilations)
    if explicit is not None:
        x = F.pad(x, explicit)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(x, w, bias, strides, padding, dilations, a.get("group", 1))


def _conv_transpose(m, n, ins, a):
    x, w = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    spatial = w.dim() - 2
    if "output_shape" in a or a.get("auto_pad", "NOTSET") != "NOTSET":
        raise TraceError(f"ConvTranspose {n.name!r}: output_shape/auto_pad are not supported")
    pads = list(a.get("pads", [0] * (2 * spatial)))
    if pads[:spatial] != pads[spatial:]:
        raise TraceError(f"ConvTranspose {n.name!r}: asymmetric pads are not supported")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
    return fn(
        x,
        w,
        bias,
        list(a.get("strides", [1] * spatial)),
        pads[:spatial],
        list(a.get("output_padding", [0] * spatial)),
        a.get("group", 1),
        list(a.get("dilations", [1] * spatial)),
    )


def _batch_norm(m, n, ins, a):
    x, gamma, beta, mean, var = ins[:5]
    if a.get("training_mode", 0):
        raise TraceError(f"BatchNormalization {n.name!r}: training_mode=1 is not supported")
    return F.batch_norm(x, mean, var, gamma, beta, False, 0.0, a.get("epsilon", 1e-5))


def _pool(kind):
    def run(m, n, ins, a):
        x = ins[0]
        spatial = x.dim() - 2
        kernel = list(a["kernel_shape"])
        strides = list(a.get("strides", [1] * spatial))
        dilations = list(a.get("dilations", [1] * spatial))
        padding, explicit = _pads(a, spatial, n, x.shape, kernel, strides, dilations)
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            if explicit is not None:
                x = F.pad(x, explicit, value=-math.inf)
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
            return fn(x, kernel, strides, padding, dilations, ceil)
        if dilations != [1] * spatial:
            raise TraceError(f"AveragePool {n.name!r}: dilations are not supported")
        include = bool(a.get("count_include_pad", 0))
        if explicit is not None:
            if not include:
                raise TraceError(
                    f"AveragePool {n.name!r}: asymmetric pads without count_include_pad"
                )
            x = F.pad(x, explicit)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        return fn(x, kernel, strides, padding, ceil, include)

    return run


def _global_pool(kind):
    def run(m, n, ins, a):
        x = ins[0]
        dims = list(range(2, x.dim()))
        return x.mean(dims, keepdim=True) if kind == "avg" else x.amax(dims, keepdim=True)

    return run


def _clip(m, n, ins, a):
    x = ins[0]
    if m.opset < 11:
        lo, hi = a.get("min"), a.get("max")
    else:
        lo = _scalar(ins[1]) if len(ins) > 1 else None
        hi = _scalar(ins[2]) if len(ins) > 2 else None
    return torch.clamp(x, lo, hi)


def _scalar(value):
    if value is None:
        return None
    if isinstance(value, Known):
        first = value.value.reshape(-1)[0]
        return first.item() if isinstance(first, np.generic) else first  # a SymInt stays one
    return float(value.reshape(-1)[0]) if value.numel() == 1 else value


def _resize(m, n, ins, a):
    x = ins[0]
    mode = a.get("mode", "nearest")
    transform = a.get("coordinate_transformation_mode", "half_pixel")
    if "scales" in a:  # Upsample-7: scales as an attribute
        scales_in, sizes = Known(np.array(a["scales"], dtype=np.float32)), None
    elif m.opset < 11:
        scales_in = ins[1]
        sizes = None
    else:
        scales_in = ins[2] if len(ins) > 2 else None
        sizes = ins[3] if len(ins) > 3 else None
    spatial = x.dim() - 2
    kw: dict[str, Any] = {}
    if sizes is not None and (not isinstance(sizes, torch.Tensor) or sizes.numel()):
        kw["size"] = [int(s) for s in _ints(sizes)[2:]]
    else:
        if not isinstance(scales_in, Known):
            raise TraceError(f"Resize {n.name!r}: scales computed at run time are not supported")
        scales = [float(s) for s in scales_in.tolist()]
        if scales[:2] != [1.0, 1.0]:
            raise TraceError(f"Resize {n.name!r}: scaling batch/channel dims is not supported")
        kw["scale_factor"] = scales[2:]
    if mode == "nearest":
        nearest = a.get("nearest_mode", "round_prefer_floor")
        if transform == "asymmetric" and nearest == "floor":
            return F.interpolate(x, mode="nearest", **kw)
        if transform in ("half_pixel", "pytorch_half_pixel") and nearest in (
            "round_prefer_ceil",
            "round_prefer_floor",
        ):
            return F.interpolate(x, mode="nearest-exact", **kw)
        if (
            transform == "asymmetric"
            and "scale_factor" in kw
            and all(float(s).is_integer() for s in kw["scale_factor"])
        ):  # integer upsampling: every rounding rule reads the same source pixel
            return F.interpolate(x, mode="nearest", **kw)
        raise TraceError(f"Resize {n.name!r}: nearest with {transform}/{nearest} is not supported")
    if mode == "linear":
        torch_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial]
        if transform in ("half_pixel", "pytorch_half_pixel"):
            return F.interpolate(x, mode=torch_mode, align_corners=False, **kw)
        if transform == "align_corners":
            return F.interpolate(x, mode=torch_mode, align_corners=True, **kw)
    raise TraceError(f"Resize {n.name!r}: mode {mode} with {transform} is not supported")


def _split(m, n, ins, a):
    x = ins[0]
    axis = a.get("axis", 0)
    if "split" in a:
        sizes = list(a["split"])
    elif len(ins) > 1 and ins[1] is not None:
        sizes = _ints(ins[1])
    else:
        parts = a.get("num_outputs", len(n.output))
        size = x.shape[axis]
        chunk = -(-size // parts)
        sizes = [chunk] * (parts - 1) + [size - chunk * (parts - 1)]
    return list(torch.split(x, sizes, dim=axis))


def _pad(m, n, ins, a):
    x = ins[0]
    mode = a.get("mode", "constant")
    pads = list(a["pads"]) if m.opset < 11 else _ints(ins[1])
    value = a.get("value", 0.0) if m.opset < 11 else (_scalar(ins[2]) if len(ins) > 2 else 0.0)
    rank = x.dim()
    if len(ins) > 3 and ins[3] is not None:
        raise TraceError(f"Pad {n.name!r}: the axes input is not supported")
    explicit = []
    for i in reversed(range(rank)):
        explicit += [pads[i], pads[i + rank]]
    while len(explicit) > 2 and explicit[-2:] == [0, 0]:
        explicit = explicit[:-2]
    if mode == "constant":
        return F.pad(x, explicit, value=float(value or 0.0))
    if mode in ("reflect", "edge"):
        return F.pad(x, explicit, mode="reflect" if mode == "reflect" else "replicate")
    raise TraceError(f"Pad {n.name!r}: mode {mode} is not supported")


def _layer_norm(m, n, ins, a):
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    axis = a.get("axis", -1) % x.dim()
    return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, a.get("epsilon", 1e-5))


def _instance_norm(m, n, ins, a):
    return F.instance_norm(ins[0], weight=ins[1], bias=ins[2], eps=a.get("epsilon", 1e-5))


def _expand(m, n, ins, a):
    x, shape = _tensor(ins[0]), _ints(ins[1]) if not isinstance(ins[1], Known) else ins[1].tolist()
    rank = max(x.dim(), len(shape))
    shape = [1] * (rank - len(shape)) + list(shape)
    cur = [1] * (rank - x.dim()) + list(x.shape)
    target = [c if (isinstance(s, int) and s == 1) else s for s, c in zip(shape, cur, strict=True)]
    return x.reshape(cur).expand(target)


def _constant_of_shape(m, n, ins, a):
    value = a.get("value", np.zeros(1, dtype=np.float32))
    shape = ins[0].tolist() if isinstance(ins[0], Known) else _ints(ins[0])
    fill = torch.from_numpy(np.array(value).reshape(-1)[:1])
    if fill.dtype in (torch.int64, torch.int32) and all(isinstance(s, int) for s in shape):
        return Known(np.full(shape, int(fill[0]), dtype=np.int64))
    return fill.reshape([]).expand(shape).clone()


def _where(m, n, ins, a):
    return _known_or_tensor(np.where, torch.where, *ins)


def _identity(m, n, ins, a):
    return ins[0]


def _range(m, n, ins, a):
    start, limit, delta = (_scalar(v) for v in ins)
    symbolic = any(isinstance(v, torch.SymInt) for v in (start, limit, delta))
    if all(isinstance(v, Known) for v in ins) and not symbolic:
        return Known(np.arange(start, limit, delta))
    return torch.arange(start, limit, delta)


def _tile(m, n, ins, a):
    return _tensor(ins[0]).repeat(*_ints(ins[1]))


def _prelu(m, n, ins, a):
    x, slope = ins
    return torch.where(x >= 0, x, x * slope)


def _hard_sigmoid(m, n, ins, a):
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    return torch.clamp(ins[0] * alpha + beta, 0.0, 1.0)


def _hard_swish(m, n, ins, a):
    x = ins[0]
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


def _leaky_relu(m, n, ins, a):
    return F.leaky_relu(ins[0], a.get("alpha", 0.01))


def _elu(m, n, ins, a):
    return F.elu(ins[0], a.get("alpha", 1.0))


def _gelu(m, n, ins, a):
    return F.gelu(ins[0], approximate="tanh" if a.get("approximate") == "tanh" else "none")


def _arg(fn):
    def run(m, n, ins, a):
        out = fn(ins[0], dim=a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))
        return out

    return run


def _variadic(fn):
    def run(m, n, ins, a):
        out = _tensor(ins[0])
        for x in ins[1:]:
            out = fn(out, _tensor(x, out))
        return out

    return run


def _pow(m, n, ins, a):
    base, exp = ins
    e = _scalar(exp) if isinstance(exp, Known) or exp.numel() == 1 else exp
    if isinstance(e, (int, float)) and e == 2:
        return base * base
    return torch.pow(base, e)


def _gather_nd(m, n, ins, a):
    data, idx = _tensor(ins[0]), _tensor(ins[1]).long()
    if a.get("batch_dims", 0):
        raise TraceError(f"GatherND {n.name!r}: batch_dims > 0 is not supported")
    depth = idx.shape[-1]
    return data[tuple(idx[..., i] for i in range(depth))]


def _cumsum(m, n, ins, a):
    x, axis = _tensor(ins[0]), int(_scalar(ins[1]))
    if a.get("exclusive", 0) or a.get("reverse", 0):
        raise TraceError(f"CumSum {n.name!r}: exclusive/reverse are not supported")
    return torch.cumsum(x, dim=axis)


def _embedding_or_gather(m, n, ins, a):
    """Gather rows of a constant 2-D table by integer ids: an embedding lookup, traced as
    ``aten.embedding`` so that the structure view sees the model's embeddings."""
    data, idx = ins
    if (
        a.get("axis", 0) == 0
        and isinstance(data, torch.Tensor)
        and data.dim() == 2
        and data.is_floating_point()
        and isinstance(idx, torch.Tensor)
        and not idx.is_floating_point()
    ):
        return F.embedding(idx, data)
    return _gather(m, n, ins, a)


def _lstm(m, n, ins, a):
    """ONNX LSTM (gates i, o, f, c) as one ``torch.lstm`` (gates i, f, g, o), kept in float."""
    x, w, r = ins[0], ins[1], ins[2]
    b = ins[3] if len(ins) > 3 else None
    seq_lens = ins[4] if len(ins) > 4 else None
    h0 = ins[5] if len(ins) > 5 else None
    c0 = ins[6] if len(ins) > 6 else None
    if len(ins) > 7 and ins[7] is not None:
        raise TraceError(f"LSTM {n.name!r}: peepholes are not supported")
    acts = [s.decode() if isinstance(s, bytes) else s for s in a.get("activations", [])]
    if acts and [s.lower() for s in acts] != ["sigmoid", "tanh", "tanh"] * (len(acts) // 3):
        raise TraceError(f"LSTM {n.name!r}: activations {acts} are not supported")
    if a.get("clip") is not None or a.get("input_forget", 0):
        raise TraceError(f"LSTM {n.name!r}: clip/input_forget are not supported")
    batch_first = bool(a.get("layout", 0))
    steps = x.shape[1] if batch_first else x.shape[0]
    if seq_lens is not None:
        lens = seq_lens.tolist() if isinstance(seq_lens, Known) else None
        if lens is None or any(v != steps for v in lens):
            raise TraceError(f"LSTM {n.name!r}: per-sample sequence_lens are not supported")
    directions, hidden = w.shape[0], r.shape[-1]
    batch = x.shape[0] if batch_first else x.shape[1]

    def reorder(t):  # i, o, f, c → i, f, c, o along the gate axis
        i, o, f, c = torch.chunk(t, 4, dim=0)
        return torch.cat([i, f, c, o], dim=0)

    params = []
    for d in range(directions):
        params += [reorder(w[d]), reorder(r[d])]
        if b is not None:
            params += [reorder(b[d, : 4 * hidden]), reorder(b[d, 4 * hidden :])]
    zeros = x.new_zeros((directions, batch, hidden))
    hx = (h0 if h0 is not None else zeros, c0 if c0 is not None else zeros)
    y, h, c = torch.lstm(x, hx, params, b is not None, 1, 0.0, False, directions == 2, batch_first)
    if batch_first:  # Y [batch, seq, dirs, hidden]
        y = y.reshape(batch, steps, directions, hidden)
    else:  # Y [seq, dirs, batch, hidden]
        y = y.reshape(steps, batch, directions, hidden).permute(0, 2, 1, 3)
    if batch_first:
        h, c = h.transpose(0, 1), c.transpose(0, 1)
    return [y, h, c]


OPS: dict[str, Callable[[OnnxModule, onnx.NodeProto, Sequence[Any], dict], Any]] = {
    "Add": _binary(np.add, torch.add, commutative=True),
    "Sub": _binary(np.subtract, torch.sub),
    "Mul": _binary(np.multiply, torch.mul, commutative=True),
    "Div": _binary(_div, _div_t),
    "Equal": _binary(np.equal, torch.eq),
    "Less": _binary(np.less, torch.lt),
    "Greater": _binary(np.greater, torch.gt),
    "And": _binary(np.logical_and, torch.logical_and),
    "Or": _binary(np.logical_or, torch.logical_or),
    "Pow": _pow,
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Not": lambda m, n, ins, a: _known_or_tensor(np.logical_not, torch.logical_not, ins[0]),
    "Neg": lambda m, n, ins, a: _known_or_tensor(np.negative, torch.neg, ins[0]),
    "Abs": _unary(torch.abs),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Erf": _unary(torch.erf),
    "Tanh": _unary(torch.tanh),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Softplus": _unary(F.softplus),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "LeakyRelu": _leaky_relu,
    "Elu": _elu,
    "Gelu": _gelu,
    "PRelu": _prelu,
    "Clip": _clip,
    "Constant": _identity,  # evaluated in OnnxModule.__init__
    "ConstantOfShape": _constant_of_shape,
    "Identity": _identity,
    "Dropout": _identity,  # inference
    "Shape": _shape,
    "Gather": _embedding_or_gather,
    "GatherND": _gather_nd,
    "CumSum": _cumsum,
    "IsNaN": _unary(torch.isnan),
    "LessOrEqual": _binary(np.less_equal, torch.le),
    "GreaterOrEqual": _binary(np.greater_equal, torch.ge),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Cast": _cast,
    "Slice": _slice,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Expand": _expand,
    "Tile": _tile,
    "Where": _where,
    "Range": _range,
    "Split": _split,
    "Pad": _pad,
    "Softmax": _softmax,
    "LogSoftmax": lambda m, n, ins, a: _softmax(m, n, ins, a, torch.log_softmax),
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(_amax),
    "ReduceMin": _reduce(_amin),
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "InstanceNormalization": _instance_norm,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_pool("avg"),
    "GlobalMaxPool": _global_pool("max"),
    "Resize": _resize,
    "LSTM": _lstm,
    "Upsample": _resize,
}
"""ONNX op type (default domain) → torch implementation."""


def example_inputs(
    specs: Sequence[InputSpec], given: Sequence[torch.Tensor] | None, where: str
) -> tuple[torch.Tensor, ...]:
    """Example inputs for tracing: ``given`` (checked against the declared shapes) or, where every
    dim but a leading batch dim is fixed, seeded normal values with batch 1; integer inputs
    (token ids) take 16 for every other dynamic dim."""
    if given is not None:
        if len(given) != len(specs):
            raise TraceError(
                f"{where}: the model has {len(specs)} input(s) "
                f"({', '.join(s.name for s in specs)}), got {len(given)} example(s)"
            )
        for spec, value in zip(specs, given, strict=True):
            fixed = [(i, d) for i, d in enumerate(spec.shape) if isinstance(d, int)]
            if value.dim() != len(spec.shape) or any(value.shape[i] != d for i, d in fixed):
                raise TraceError(
                    f"{where}: input {spec.name!r} is declared {list(spec.shape)}, "
                    f"the example is {list(value.shape)}"
                )
        return tuple(given)
    out = []
    gen = torch.Generator().manual_seed(0)
    for spec in specs:
        dims = list(spec.shape)
        if dims and not isinstance(dims[0], int):
            dims[0] = 1
        if not spec.dtype.is_floating_point:  # token ids: any length traces the same graph
            dims = [d if isinstance(d, int) else 16 for d in dims]
        if any(not isinstance(d, int) for d in dims):
            raise TraceError(
                f"{where}: input {spec.name!r} has dynamic dims {list(spec.shape)}; give example "
                "inputs (calibration inputs, --calib-inputs FILE.npz) to fix their sizes"
            )
        if spec.dtype.is_floating_point:
            out.append(torch.randn(dims, generator=gen).to(spec.dtype))
        else:
            out.append(torch.zeros(dims, dtype=spec.dtype))
    return tuple(out)


def dynamic_dims(specs: Sequence[InputSpec]) -> tuple[dict[int, Any], ...]:
    """``Dim.AUTO`` for every dim the ONNX model leaves dynamic: torch.export keeps those it can
    and specializes the rest (e.g. a height an FPN needs to be a multiple of 32)."""
    return tuple(
        {i: torch.export.Dim.AUTO for i, d in enumerate(s.shape) if not isinstance(d, int)}
        for s in specs
    )
