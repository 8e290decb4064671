"""Export a module that calls qgraph's custom ops to an ONNX file, atomically.

Pipeline: ``torch.onnx.export(dynamo=True, optimize=False)`` with :data:`CUSTOM_TRANSLATIONS` →
:func:`postprocess` (fold INT4 casts of constants into packed INT4 initializers, range-checked;
drop dead code) → the exporter's optimizer (constant folding, CSE) → metadata → save
into a temporary directory next to the target → ``os.replace`` into place. A failure at any step
raises :class:`~qgraph.errors.ExportError` naming the step and leaves the target untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import torch

from qgraph.errors import ExportError

from .onnx_fused import FUSED_TRANSLATIONS
from .onnx_hadamard import add_hadamard_functions, is_qgraph_function
from .onnx_hadamard_fold import fold_hadamard_signs
from .onnx_integer import INTEGER_TRANSLATIONS, integer_activation_graph
from .onnx_lowering import CUSTOM_TRANSLATIONS

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "export_onnx",
    "op_histogram",
    "postprocess",
    "rename_dims",
]

EXTERNAL_DATA_THRESHOLD = 1_500_000_000
"""Initializer bytes above which ``external_data=None`` writes a separate data file (protobuf
refuses messages over 2 GB; the margin leaves room for the graph itself)."""

_INT4_TYPES: dict[ir.DataType, tuple[Any, int, int]] = {
    ir.DataType.INT4: (ml_dtypes.int4, -8, 7),
    ir.DataType.UINT4: (ml_dtypes.uint4, 0, 15),
}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's log lines (e.g. 'torchvision is not installed') and its
    deprecation warnings for the duration of one export; user warnings still pass."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    old_levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, old_levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Export in inference mode, restoring the caller's train/eval flags afterwards."""
    modes = {m: m.training for m in module.modules()}
    for m in modes:  # not module.eval(): graphs from torch.export refuse it
        m.training = False
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _fold_int4_casts(model: ir.Model) -> int:
    """Replace ``Cast(to=INT4/UINT4)`` of a constant by an INT4/UINT4 initializer.

    Only main-graph casts are folded (our lowering emits them there). Values outside the 4-bit
    range raise instead of wrapping: a silent wrap would change the weights.
    """
    graph = model.graph
    folded: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
    count = 0
    for node in list(graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            continue
        to_attr = node.attributes.get("to")
        if to_attr is None:
            continue
        target = ir.DataType(to_attr.as_int())
        if target not in _INT4_TYPES or len(node.inputs) != 1 or node.inputs[0] is None:
            continue
        source = node.inputs[0]
        if source.is_graph_input():  # an overridable initializer is not a constant
            continue
        tensor = ir.convenience.get_const_tensor(source)
        if tensor is None:
            continue
        key = (source, target)
        if key not in folded:
            np_dtype, lo, hi = _INT4_TYPES[target]
            values = tensor.numpy()
            if not np.issubdtype(values.dtype, np.integer):
                raise ExportError(
                    f"post-processing: Cast to {target.name} of a non-integer constant "
                    f"{source.name!r} ({values.dtype}) is not folded exactly"
                )
            if values.size and (values.min() < lo or values.max() > hi):
                raise ExportError(
                    f"post-processing: constant {source.name!r} has values in "
                    f"[{values.min()}, {values.max()}], "
                    f"outside the {target.name} range [{lo}, {hi}]"
                )
            name = f"{source.name}_{target.name.lower()}"
            while name in graph.initializers:
                name += "_"
            packed = ir.Tensor(values.astype(np_dtype), dtype=target, name=name)
            new_value = ir.Value(
                name=name, shape=ir.Shape(values.shape), type=ir.TensorType(target)
            )
            new_value.const_value = packed
            graph.register_initializer(new_value)
            folded[key] = new_value
        node.outputs[0].replace_all_uses_with(folded[key], replace_graph_outputs=True)
        count += 1
    return count


def light_optimize(model: ir.Model) -> None:
    """Constant folding, dead-code removal and CSE, in place.

    This is ``export(optimize=True)`` without onnxscript's pattern rewriter, which took ~2 of the
    ~3 minutes of a SmolLM2 export and whose fusions ONNX Runtime performs itself at load time.
    ``qgraph``-domain functions are not inlined: the file keeps one node per Hadamard rotation.
    """
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import fold_constants_ir
    from onnxscript.rewriter.rules import common as rules

    common.InlinePass(criteria=lambda f: not is_qgraph_function(f))(model)
    fold_constants_ir(model)
    cheap_rules = [rules.no_op_cast_rule, rules.cast_cast_rule, rules.no_op_expand_rule,
                   rules.no_op_transpose_rule]  # fmt: skip
    rewriter.rewrite(model, pattern_rewrite_rules=cheap_rules)
    _drop_identity_casts(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _drop_identity_casts(model: ir.Model) -> int:
    """Remove ``Cast`` nodes whose input already has the target type.

    The lowering of ``qlinear`` casts the dequantized weight to the activation dtype (as the torch
    op does); when both are float32 the cast is a no-op, but the type of a ``DequantizeLinear``
    output is often not inferred, so the generic rules miss it. Its type is its scale's.
    """
    removed = 0
    for node in list(model.graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        dtype = src.dtype
        producer = src.producer()
        if dtype is None and producer is not None and producer.op_type == "DequantizeLinear":
            dtype = producer.inputs[1].dtype
        to = node.attributes.get("to")
        if dtype is None or to is None or int(dtype) != to.as_int():
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        out.replace_all_uses_with(src)
        model.graph.remove(node, safe=True)
        removed += 1
    return removed


def _per_axis_weights_under_qdq(model: ir.Model) -> int:
    """Give per-axis scales to the blocked per-channel weights of ``MatMul``s whose activation is
    QDQ-quantized.

    ``qlinear`` stores per-channel scales as identical row blocks (``block_size``) so that ONNX
    Runtime fuses weight-only layers into ``MatMulNBits``. Behind a static activation quantizer
    ONNX Runtime instead fuses ``DQ → MatMul ← DQ`` into ``MatMulIntegerToFloat``, which
    accepts only 1-D per-column scales (a blocked one fails at run time on 3-D inputs). The
    same weight, with one ``[N]`` scale row and ``axis=1``, is the same function."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "MatMul" or len(node.inputs) != 2:
            continue
        act, weight = (v.producer() if v is not None else None for v in node.inputs)
        if act is None or act.op_type != "DequantizeLinear":
            continue
        if weight is None or weight.op_type != "DequantizeLinear":
            continue
        if "block_size" not in weight.attributes or len(weight.inputs) < 2:
            continue
        parts = [
            ir.convenience.get_const_tensor(v) if v is not None else None
            for v in weight.inputs[1:3]
        ]
        if any(p is None for p in parts[: len(weight.inputs) - 1]):
            continue
        arrays = [p.numpy() for p in parts if p is not None]
        if any(a.ndim != 2 or not (a == a[:1]).all() for a in arrays):
            continue  # a real group grid: leave it blocked
        for index, array in enumerate(arrays, start=1):
            name = f"{weight.inputs[index].name}_per_axis"
            while name in model.graph.initializers:
                name += "_"
            row = array[0].copy()
            value = ir.Value(name=name, shape=ir.Shape(row.shape), type=ir.TensorType(
                ir.DataType.from_numpy(row.dtype) if row.dtype != ml_dtypes.int4 else weight.inputs[index].dtype
            ))  # fmt: skip
            value.const_value = ir.Tensor(row, dtype=weight.inputs[index].dtype, name=name)
            model.graph.register_initializer(value)
            weight.replace_input_with(index, value)
        weight.attributes.pop("block_size")
        weight.attributes["axis"] = ir.AttrInt64("axis", 1)
        count += 1
    return count


OPTIONAL_OUTPUTS = {
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): (1, 2),  # mean, inv_std_var
    ("", "LayerNormalization"): (1, 2),  # Mean, InvStdDev
}
"""Optional outputs that kernels compute only when named: the exporter names every output of a
contrib op, so ``SkipSimplifiedLayerNormalization`` wrote two statistics per token nobody reads."""


def _unname_unused_optional_outputs(model: ir.Model) -> int:
    """Give unused optional outputs (:data:`OPTIONAL_OUTPUTS`) the empty name, which ONNX reads
    as "not requested"; returns how many were dropped."""
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for index in OPTIONAL_OUTPUTS.get((node.domain, node.op_type), ()):
            if index >= len(node.outputs):
                continue
            value = node.outputs[index]
            if value.name and not value.uses() and not value.is_graph_output():
                value.name = ""
                count += 1
    return count


def _drop_zero_zero_points(model: ir.Model) -> int:
    """Remove constant all-zero zero points of ``DequantizeLinear`` (the default: same values).

    A symmetric weight exports with explicit zeros; ONNX Runtime fuses the
    ``DequantizeLinear → MatMul`` either way, but with a zero-point input its ``MatMulNBits``
    takes the asymmetric kernel path, measured 14 % slower per SmolLM2 W4A16 decode step
    (``benchmarks/decode_step.py``)."""
    count = 0
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.inputs) != 3 or node.inputs[2] is None or node.inputs[2].is_graph_input():
            continue
        tensor = ir.convenience.get_const_tensor(node.inputs[2])
        if tensor is None or np.any(tensor.numpy().astype(np.int32) != 0):
            continue
        node.resize_inputs(2)
        count += 1
    return count


def postprocess(model: ir.Model) -> ir.Model:
    """Make the exported ``onnx_ir`` model final, in place (and return it).

    * Folds ``Cast(to=INT4/UINT4)`` of constants into packed 4-bit initializers, so the file
      stores 4-bit weights and ONNX Runtime sees ``DequantizeLinear(int4 const)`` → ``MatMul``,
      which it fuses into ``MatMulNBits``.
    * Drops all-zero zero points of ``DequantizeLinear`` (:func:`_drop_zero_zero_points`).
    * Gives per-axis scales to per-channel weights behind QDQ activations
      (:func:`_per_axis_weights_under_qdq`).
    * Folds constant signs and scales of ``qgraph::Hadamard…`` nodes into their matrices
      (:func:`~qgraph.backends.onnx_hadamard_fold.fold_hadamard_signs`), then adds the
      model-local function of every variant (idempotent).
    * Removes nodes and initializers that no longer feed an output, and leaves unused optional
      outputs of fused norms unrequested (:func:`_unname_unused_optional_outputs`).
    """
    _fold_int4_casts(model)
    _drop_zero_zero_points(model)
    _per_axis_weights_under_qdq(model)
    fold_hadamard_signs(model)
    add_hadamard_functions(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.RemoveUnusedFunctionsPass()(model)
    _unname_unused_optional_outputs(model)
    return model


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def export_onnx(
    module: torch.nn.Module,
    example_inputs: tuple,
    path: str | os.PathLike,
    *,
    dynamic_shapes: Any = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    opset: int = 21,
    external_data: bool | None = None,
    dim_names: Mapping[str, Mapping[int, str]] | None = None,
    integer_activations: bool = False,
    node_metadata: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Export ``module(*example_inputs)`` to ``path`` and return the path.

    ``dynamic_shapes`` is passed to ``torch.export`` (e.g. ``({0: Dim("batch")},)``).
    ``external_data=None`` stores weights in ``<name>.data`` next to the file only when the
    initializers exceed :data:`EXTERNAL_DATA_THRESHOLD`; ``True``/``False`` force it. The
    module is exported in eval mode; its train/eval flags are restored afterwards.
    ``dim_names`` names dynamic axes of inputs and outputs (``{"input_ids": {0: "batch_size"}}``);
    the exporter's own symbols for them are renamed throughout the graph.
    ``integer_activations`` lowers per-token quantized layers of a GraphModule to
    ``MatMulInteger`` (:mod:`qgraph.backends.onnx_integer`); the module itself is not changed.
    ``node_metadata`` maps a constant of ``module`` (its attribute path, ``_`` for ``.``) to
    ``metadata_props`` for every ONNX node made from an FX node reading it (:func:`annotate_nodes`).
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise ExportError(f"export to {target}: directory {target.parent} does not exist")

    if integer_activations:
        if not isinstance(module, torch.fx.GraphModule):
            raise ExportError(
                f"export to {target}: integer_activations rewrites a qgraph GraphModule, got "
                f"{type(module).__name__}"
            )
        module, _ = integer_activation_graph(module)
    try:
        with _quiet_exporter(), _eval_mode(module):
            program = torch.onnx.export(
                module,
                tuple(example_inputs),
                dynamo=True,
                opset_version=opset,
                custom_translation_table={
                    **CUSTOM_TRANSLATIONS,
                    **INTEGER_TRANSLATIONS,
                    **FUSED_TRANSLATIONS,
                },
                dynamic_shapes=dynamic_shapes,
                input_names=list(input_names) if input_names is not None else None,
                output_names=list(output_names) if output_names is not None else None,
                verbose=False,
                report=False,
                # Our INT4 fold must see the casts first: the exporter's optimizer also folds
                # Cast(to=INT4) of small constants, but wraps out-of-range codes silently.
                optimize=False,
            )
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"export to {target}: torch.onnx.export failed: {exc}") from exc
    if program is None:
        raise ExportError(f"export to {target}: torch.onnx.export returned no program")

    try:
        postprocess(program.model)
    except ExportError as exc:
        raise ExportError(f"export to {target}: {exc}") from exc
    except Exception as exc:
        raise ExportError(f"export to {target}: post-processing failed: {exc}") from exc
    try:
        with _quiet_exporter():
            light_optimize(program.model)
        model = postprocess(program.model)
    except Exception as exc:
        raise ExportError(f"export to {target}: graph optimization failed: {exc}") from exc

    if dim_names:
        rename_dims(model, dim_names)
    if node_metadata:
        annotate_nodes(model, node_metadata)
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ExportError(
                    f"export to {target}: metadata must map str to str, got {key!r}: {value!r}"
                )
            model.metadata_props[key] = value

    use_external = (
        _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
        if external_data is None
        else bool(external_data)
    )
    _save_atomically(model, target, use_external)
    return target


def annotate_nodes(model: ir.Model, metadata: Mapping[str, Mapping[str, str]]) -> int:
    """Copy ``metadata[constant name]`` into the ``metadata_props`` of every ONNX node the
    exporter made from an FX node reading that constant. The exporter re-traces the module, so
    FX node names change, but each ONNX node records its FX node in ``pkg.torch.onnx.fx_node``,
    whose arguments name the constants it reads (lifted as ``b_``/``p_``/``c_`` + the attribute
    path with ``_`` for ``.``). Nodes inside functions included. Returns how many."""
    count = 0
    graphs = [model.graph, *(f.graph for f in model.functions.values())]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            fx_node = node.metadata_props.get("pkg.torch.onnx.fx_node", "")
            for name in _CONSTANT_ARG.findall(fx_node):
                props = metadata.get(name)
                if props:
                    node.metadata_props.update(props)
                    count += 1
                    break
    return count


_CONSTANT_ARG = re.compile(r"%[bpc]_(\w+)")


def rename_dims(model: ir.Model, names: Mapping[str, Mapping[int, str]]) -> None:
    """Rename the symbolic axes of the named inputs/outputs, and the same symbols everywhere
    else in the graph, so that shapes read ``batch_size`` rather than ``s14``."""
    mapping: dict[str, str] = {}
    for value in (*model.graph.inputs, *model.graph.outputs):
        axes = names.get(value.name or "", {})
        for axis, name in axes.items():
            if value.shape is None or axis >= len(value.shape):
                raise ExportError(f"{value.name} has no axis {axis} to name {name!r}")
            dim = value.shape[axis]
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                mapping.setdefault(dim.value, name)

    def renamed(value: ir.Value) -> None:
        if value.shape is None:
            return
        dims = [
            ir.SymbolicDim(mapping[d.value])
            if isinstance(d, ir.SymbolicDim) and d.value in mapping
            else d
            for d in value.shape
        ]
        value.shape = ir.Shape(dims)

    for value in (*model.graph.inputs, *model.graph.outputs):
        renamed(value)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            renamed(value)


def _save_atomically(model: ir.Model, target: Path, use_external: bool) -> None:
    """Write into a fresh temp dir beside ``target`` (same filesystem), then ``os.replace``.

    With external data, the data file is moved first: until the ``.onnx`` replace, an existing
    model file keeps pointing at a complete data file of the same name.
    """
    data_name = f"{target.name}.data"
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise ExportError(
            f"export to {target}: cannot create a temporary directory: {exc}"
        ) from exc
    try:
        tmp_model = tmp_dir / target.name
        try:
            if use_external:
                ir.save(model, tmp_model, external_data=data_name)
            else:
                ir.save(model, tmp_model)
        except Exception as exc:
            raise ExportError(f"export to {target}: saving the model failed: {exc}") from exc
        try:
            if use_external:
                os.replace(tmp_dir / data_name, target.parent / data_name)
            os.replace(tmp_model, target)
        except OSError as exc:
            raise ExportError(
                f"export to {target}: moving the file into place failed: {exc}"
            ) from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _qualified(node_domain: str, op_type: str) -> str:
    return op_type if node_domain in ("", "ai.onnx") else f"{node_domain}::{op_type}"


def _proto_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _proto_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _proto_nodes(sub)


def op_histogram(model: str | os.PathLike | onnx.ModelProto | ir.Model) -> dict[str, int]:
    """Count op types in the main graph and its subgraphs (not in local function bodies).

    Keys are ``op_type`` for the default ONNX domain and ``domain::op_type`` otherwise,
    e.g. ``"com.microsoft::MatMulNBits"``. Weights are never loaded from a path.
    """
    if isinstance(model, ir.Model):
        nodes = ir.traversal.RecursiveGraphIterator(model.graph)
        return dict(Counter(_qualified(n.domain, n.op_type) for n in nodes))
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    return dict(Counter(_qualified(n.domain, n.op_type) for n in _proto_nodes(model.graph)))
