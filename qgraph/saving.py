"""Save a rewritten Model and load it back, online rotations, expansion and quantization intact.

The file is a torch.export archive (``.pt2``): the graph is re-exported from the Model's
GraphModule, so qgraph's custom ops (``qgraph::qlinear``, ``qgraph::hadamard``, ...) are saved
by name and the loader needs only ``import qgraph``, not the original model code. qgraph's own
state rides along as ``qgraph.json`` in the archive: name, source, established properties, the
pass log, and each quantized layer's description (keyed by its codes tensor, which keeps its
name across export). The float weights that ``gptq``/``learn-rounding`` re-solve from are not
saved: a reloaded quantized model runs and exports, but cannot be re-solved.
The archive is written to a temporary file beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from . import ops, sparse_ops  # noqa: F401  (registers torch.ops.qgraph.* for export and load)
from .errors import ExportError, ModelFileError
from .model import Model, PassRecord
from .trace import drop_guards

FORMAT = "qgraph-model/1"
_META_FILE = "qgraph.json"
_QLINEAR = torch.ops.qgraph.qlinear.default
_SPARSE = torch.ops.qgraph.sparse_matmul.default


def save(model: Model, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` (conventionally ``*.pt2``) atomically and return the path."""
    target = Path(path)
    if not target.parent.is_dir():
        raise ExportError(f"save to {target}: directory {target.parent} does not exist")
    try:
        with torch.no_grad():
            program = torch.export.export(
                model.gm, model.example_inputs, dynamic_shapes=model.dynamic_shapes, strict=False
            )
    except Exception as exc:
        raise ExportError(f"save to {target}: re-exporting the graph failed: {exc}") from exc
    meta = json.dumps(_metadata(model), default=_jsonable)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp.pt2", dir=target.parent)
    os.close(fd)
    try:
        torch.export.save(program, tmp, extra_files={_META_FILE: meta})
        os.replace(tmp, target)
    except Exception as exc:
        raise ExportError(f"save to {target}: writing the archive failed: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_saved(path: str | os.PathLike, tokenizer: Any = None) -> Model:
    """Load a Model written by :func:`save`."""
    source = Path(path)
    if not source.is_file():
        raise ModelFileError(f"{source}: no such file")
    if not zipfile.is_zipfile(source):
        raise ModelFileError(f"{source}: not a qgraph model archive (not a zip file)")
    extra = {_META_FILE: ""}
    try:
        program = torch.export.load(source, extra_files=extra)
    except Exception as exc:
        raise ModelFileError(f"{source}: cannot load the saved graph: {exc}") from exc
    try:
        meta = json.loads(extra[_META_FILE])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{source}: {_META_FILE} in the archive is not JSON: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ModelFileError(
            f"{source}: not a {FORMAT} archive (format {meta.get('format')!r}); "
            "save models with qgraph.save"
        )
    gm = program.module()
    drop_guards(gm)
    model = Model(
        gm,
        tuple(program.example_inputs[0]) if program.example_inputs else (),
        name=meta["name"],
        source=meta["source"],
        tokenizer=tokenizer,
        dynamic_shapes=_dynamic_shapes(meta.get("dynamic")),
        input_names=tuple(meta["input_names"]),
    )
    model.properties = set(meta["properties"])
    model.log = [PassRecord(**r) for r in meta["log"]]
    quant, sparse = meta["quantized"], meta.get("sparse", {})
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is _QLINEAR:
            info = quant.get(node.args[1].target)
            if info is not None:
                node.meta["qgraph_quant"] = info
        elif node.op == "call_function" and node.target is _SPARSE:
            info = sparse.get(node.args[3].target)  # keyed by the values tensor
            if info is not None:
                node.meta["qgraph_sparse"] = info
    return model


def _metadata(model: Model) -> dict[str, Any]:
    quant, sparse = {}, {}
    for node in model.gm.graph.nodes:
        info = node.meta.get("qgraph_quant")
        if info is not None:
            quant[node.args[1].target] = {k: v for k, v in info.items() if k != "float_weight"}
        if "qgraph_sparse" in node.meta:
            sparse[node.args[3].target] = node.meta["qgraph_sparse"]
    return {
        "format": FORMAT,
        "name": model.name,
        "source": model.source,
        "input_names": list(model.input_names),
        "properties": sorted(model.properties),
        "log": [r.to_dict() for r in model.log],
        "quantized": quant,
        "sparse": sparse,
        "dynamic": _describe_dynamic(model.dynamic_shapes),
    }


def _describe_dynamic(shapes: Any) -> dict | None:
    """``{"input_ids": {0: Dim("batch", 1, 1024)}}`` → a JSON-able description."""
    if not isinstance(shapes, dict):
        return None
    out: dict[str, dict[str, list]] = {}
    for name, dims in shapes.items():
        if not isinstance(dims, dict):
            return None
        out[name] = {
            str(i): [d.__name__, getattr(d, "min", 0), getattr(d, "max", 2**31)]
            for i, d in dims.items()
        }
    return out


def _dynamic_shapes(desc: dict | None) -> dict | None:
    if not desc:
        return None
    return {
        name: {int(i): torch.export.Dim(n, min=lo, max=hi) for i, (n, lo, hi) in dims.items()}
        for name, dims in desc.items()
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 16 else f"<tensor {tuple(value.shape)}>"
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
