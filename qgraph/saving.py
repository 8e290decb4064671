"""Save a rewritten Model and load it back, online rotations, expansion and quantization intact.

The file is a torch.export archive (``.pt2``): the graph is re-exported from the Model's
GraphModule, so qgraph's custom ops (``qgraph::qlinear``, ``qgraph::hadamard``, ...) are saved
by name and the loader needs only ``import qgraph``, not the original model code. qgraph's own
state rides along as ``qgraph.json`` in the archive: name, source, established properties, the
pass log, and each quantized layer's record (keyed by its codes tensor, which keeps its name
across export). The tokenizer is always saved (``qgraph/tokenizer/``), so a reloaded language
model can be calibrated and evaluated. The float weights that ``gptq``, ``learn-rounding`` and
``split-sparse`` re-solve from are saved only when asked (``float_weights=True``;
``qgraph/float_weights.safetensors``, as large as the float layers): without them a reloaded
model runs, exports and evaluates, and those passes refuse it before running, saying so.
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
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from . import ops, sparse_ops  # noqa: F401  (registers torch.ops.qgraph.* for export and load)
from .errors import ExportError, ModelFileError
from .model import Model, PassRecord
from .quantized import QuantizedLayer
from .trace import drop_guards

FORMAT = "qgraph-model/2"
_READABLE = ("qgraph-model/1", FORMAT)
_META_FILE = "qgraph.json"
_TOKENIZER_DIR = "qgraph/tokenizer/"
_FLOAT_WEIGHTS = "qgraph/float_weights.safetensors"


def save(model: Model, path: str | os.PathLike, *, float_weights: bool = False) -> Path:
    """Write ``model`` to ``path`` (conventionally ``*.pt2``) atomically and return the path.

    ``float_weights=True`` also stores each quantized layer's float weight, so that ``gptq``,
    ``learn-rounding`` or ``split-sparse`` can re-solve the reloaded model.
    """
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
    keep_float = float_weights and bool(model.quant)
    if keep_float and not model.float_weights_kept():
        raise ExportError(
            f"save to {target}: float_weights=True but this model no longer has the float "
            "weights of every quantized layer (it was loaded without them)"
        )
    meta = json.dumps(_metadata(model, keep_float), default=_jsonable)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp.pt2", dir=target.parent)
    os.close(fd)
    try:
        torch.export.save(program, tmp, extra_files={_META_FILE: meta})
        with zipfile.ZipFile(tmp, "a") as archive:
            # torch's reader wants every entry inside the archive's one top-level folder
            root = archive.namelist()[0].split("/", 1)[0] + "/"
            _write_tokenizer(archive, root, model.tokenizer)
            if keep_float:
                weights = {
                    name: r.float_weight.detach().contiguous() for name, r in model.quant.items()
                }
                archive.writestr(root + _FLOAT_WEIGHTS, save_safetensors(weights))
        os.replace(tmp, target)
    except Exception as exc:
        raise ExportError(f"save to {target}: writing the archive failed: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """qgraph's description of a saved model (properties, log, records) without loading it."""
    source = Path(path)
    if not source.is_file():
        raise ModelFileError(f"{source}: no such file")
    if not zipfile.is_zipfile(source):
        raise ModelFileError(f"{source}: not a qgraph model archive (not a zip file)")
    with zipfile.ZipFile(source) as archive:
        names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == _META_FILE]
        if not names:
            raise ModelFileError(
                f"{source}: no {_META_FILE} in the archive; save models with qgraph.save"
            )
        try:
            meta = json.loads(archive.read(names[0]))
        except json.JSONDecodeError as exc:
            raise ModelFileError(
                f"{source}: {_META_FILE} in the archive is not JSON: {exc}"
            ) from exc
    if meta.get("format") not in _READABLE:
        raise ModelFileError(
            f"{source}: not a {FORMAT} archive (format {meta.get('format')!r}); "
            "save models with qgraph.save"
        )
    return meta


def load_saved(path: str | os.PathLike, tokenizer: Any = None) -> Model:
    """Load a Model written by :func:`save` (with the tokenizer saved in it, unless given)."""
    source = Path(path)
    meta = read_metadata(source)
    try:
        program = torch.export.load(source)
    except Exception as exc:
        raise ModelFileError(f"{source}: cannot load the saved graph: {exc}") from exc
    gm = program.module()
    drop_guards(gm)
    with zipfile.ZipFile(source) as archive:
        if tokenizer is None:
            tokenizer = _read_tokenizer(archive, source)
        stored = [n for n in archive.namelist() if n.endswith("/" + _FLOAT_WEIGHTS)]
        floats = load_safetensors(archive.read(stored[0])) if stored else {}
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
    if meta["format"] == FORMAT:
        records = [QuantizedLayer.from_json(r) for r in meta["quantized"].values()]
    else:
        records = [_record_v1(codes, info) for codes, info in meta["quantized"].items()]
        _sparse_v1(records, meta.get("sparse", {}))
    for rec in records:
        rec.float_weight = floats.get(rec.name)
        model.quant[rec.name] = rec
    if model.quant and not model.float_weights_kept():
        model.properties.discard("float-weights")
    bound = {b.name for b in model.quantized}
    lost = [r.name for r in records if r.name not in bound]
    if lost:
        raise ModelFileError(f"{source}: quantized layer(s) {lost[:3]} are not in the saved graph")
    return model


def _write_tokenizer(archive: zipfile.ZipFile, root: str, tokenizer: Any) -> None:
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for file in sorted(Path(tmp).iterdir()):
            if file.is_file():
                archive.write(file, root + _TOKENIZER_DIR + file.name)


def _read_tokenizer(archive: zipfile.ZipFile, source: Path) -> Any:
    marker = "/" + _TOKENIZER_DIR
    files = [n for n in archive.namelist() if marker in n and not n.endswith("/")]
    if not files:
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name in files:
            Path(tmp, name.rsplit("/", 1)[1]).write_bytes(archive.read(name))
        try:
            return AutoTokenizer.from_pretrained(tmp)
        except Exception as exc:
            raise ModelFileError(f"{source}: the saved tokenizer does not load: {exc}") from exc


def _record_v1(codes: str, info: dict[str, Any]) -> QuantizedLayer:
    """A record from a qgraph-model/1 archive (an untyped dict per layer)."""
    from .formats import WeightSpec, parse_act_spec

    return QuantizedLayer(
        name=info["name"],
        role=info.get("role", ""),
        in_features=info["in_features"],
        out_features=info["out_features"],
        weight=WeightSpec(
            info["bits"],
            info["granularity"],
            info["group_size"],
            info["symmetric"],
            grid="narrow" if info["symmetric"] else "full",  # the only grid of format /1
        ),
        act=parse_act_spec(info.get("act") or "none"),
        codes_attr=codes,
        group=info["group_storage"],
        n_scales=info["scales"],
        act_range=info.get("range"),
        clip=info.get("clip") or "none",
    )


def _sparse_v1(records: list[QuantizedLayer], sparse: dict[str, dict[str, Any]]) -> None:
    from .quantized import SparseBranch

    by_name = {r.name: r for r in records}
    for values_attr, info in sparse.items():
        if info["name"] in by_name:
            by_name[info["name"]].sparse = SparseBranch(
                values_attr, info["nnz"], info["outliers"], info["significant"]
            )


def _metadata(model: Model, float_weights: bool) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": model.name,
        "source": model.source,
        "input_names": list(model.input_names),
        "properties": sorted(model.properties),
        "log": [r.to_dict() for r in model.log],
        "quantized": {r.codes_attr: r.to_json() for r in model.quant.values()},
        "float_weights": float_weights,
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
