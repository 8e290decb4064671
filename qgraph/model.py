"""The Model: one object that owns the traced graph and everything passes learn about it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx

from .data import check_finite
from .errors import DataError
from .formats import sparse_storage_bits
from .quantized import QuantizedLayer, QuantizedLayers
from .structure import StructureView

#: The analyses a Model serves, by the name passes use in ``preserves``.
ANALYSES: dict[str, Callable[[Model], Any]] = {
    "structure": lambda model: StructureView(model.gm),
    QuantizedLayers.name: QuantizedLayers,
}


@dataclass
class PassRecord:
    """What one pass did, as kept in the model's log and written to reports and ONNX metadata."""

    name: str
    options: dict[str, Any]
    seconds: float
    peak_rss_mb: float
    verify_max_rel_err: float | None
    summary: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None  # the pass that ran this one (mixed-precision runs quantize)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Model:
    """A traced graph plus its analyses, quantized-layer records, properties, calibration data
    and log.

    Passes edit ``gm`` through :mod:`qgraph.graph_edits`. Analyses (:data:`ANALYSES`: the
    structure view, the quantized layers) are computed on demand and cached; after each pass the
    pass manager drops every analysis the pass does not declare in ``preserves``, so no pass
    invalidates by hand. ``quant`` holds the typed record of each quantized layer, by name.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: tuple,
        *,
        name: str = "model",
        source: str = "",
        tokenizer: Any = None,
        dynamic_shapes: Any = None,
        input_names: tuple[str, ...] = ("input_ids",),
        output_names: tuple[str, ...] = ("logits",),
    ):
        self.gm = gm
        self.example_inputs = tuple(example_inputs)
        self.name = name
        self.source = source
        self.tokenizer = tokenizer
        self.dynamic_shapes = dynamic_shapes
        self.input_names = input_names
        self.output_names = output_names
        self.properties: set[str] = set()
        self.log: list[PassRecord] = []
        self.calibration: torch.Tensor | None = None
        self.quant: dict[str, QuantizedLayer] = {}
        #: False lets the last re-solving pass of a pipeline drop each layer's float weight once
        #: it is solved (``qgraph run`` without --save-float-weights/--trace-layers): the float
        #: and the quantized twin of a layer then coexist only until its group is solved.
        self.keep_float_weights = True
        self._analyses: dict[str, Any] = {}
        self.check_weights()

    # -- analyses ----------------------------------------------------------------------------
    def analysis(self, name: str) -> Any:
        """The named analysis of the graph as it is now (cached until invalidated)."""
        if name not in self._analyses:
            self._analyses[name] = ANALYSES[name](self)
        return self._analyses[name]

    def cached_analyses(self) -> dict[str, Any]:
        return dict(self._analyses)

    def invalidate(self, preserved: Iterable[str] = ()) -> None:
        """Drop every cached analysis except ``preserved`` (the pass manager's job)."""
        keep = set(preserved)
        self._analyses = {k: v for k, v in self._analyses.items() if k in keep}

    @property
    def structure(self) -> StructureView:
        return self.analysis("structure")

    @property
    def quantized(self) -> QuantizedLayers:
        return self.analysis(QuantizedLayers.name)

    def float_weights_kept(self) -> bool:
        """True when every quantized layer still has the float weight re-solving passes need."""
        return all(r.float_weight is not None for r in self.quant.values())

    # -- execution ---------------------------------------------------------------------------
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.gm(*inputs)

    def probe_inputs(self, batch: int = 2, length: int = 64, seed: int = 0) -> tuple:
        """Inputs used to verify exact passes: calibration windows if set, else seeded tokens."""
        if self.calibration is not None and self.calibration.dtype == torch.long:
            return (self.calibration[:batch, :length].clone(),)
        ex = self.example_inputs[0]
        if ex.dtype == torch.long:
            gen = torch.Generator().manual_seed(seed)
            vocab = self.vocab_size() or int(ex.max()) + 1
            return (torch.randint(0, vocab, (batch, length), generator=gen),)
        return self.example_inputs

    def vocab_size(self) -> int | None:
        emb = self.structure.embeddings
        return int(emb[0].node.args[0].meta["val"].shape[0]) if emb else None

    # -- data --------------------------------------------------------------------------------
    def set_calibration(self, data: torch.Tensor) -> None:
        check_finite("calibration data", data)
        if data.dim() < 2 or data.shape[0] == 0:
            raise DataError(
                f"calibration data must be a non-empty batch, got shape {tuple(data.shape)}"
            )
        self.calibration = data

    def check_weights(self) -> None:
        for name, tensor in self.tensors().items():
            if tensor.is_floating_point():
                check_finite(f"weight {name!r} of {self.name}", tensor)

    # -- accounting --------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the graph reads (get_attr nodes with users), each storage counted once."""
        from .graph_edits import get_tensor

        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for n in self.gm.graph.nodes:
            if n.op != "get_attr" or not n.users:
                continue
            t = get_tensor(self.gm, n.target)
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in seen:
                continue
            seen.add(t.untyped_storage().data_ptr())
            out[n.target] = t
        return out

    def accounting(self) -> dict[str, float]:
        """Parameters and volume (Σ elements × bits) counted from what the graph stores.

        Quantized weights count their codes at their bit width plus the distinct scales
        (and zero points when asymmetric) that the quantizer defines; scales replicated only to
        suit ONNX Runtime's blocked kernels are not counted twice. A sparse side branch counts
        its values as parameters and its values and row/column indices at their stored widths.
        """
        from .graph_edits import get_tensor

        params = 0
        volume = 0.0
        quant_weights = 0
        seen: set[str] = set()
        for layer in QuantizedLayers(self):  # fresh: accounting may run in the middle of a pass
            rec = layer.record
            seen.update(a.target for a in layer.node.args[1:4])
            params += rec.in_features * rec.out_features
            quant_weights += rec.in_features * rec.out_features
            volume += rec.storage_bits()
            if layer.sparse_node is not None:
                parts = [get_tensor(self.gm, a.target) for a in layer.sparse_node.args[1:4]]
                seen.update(a.target for a in layer.sparse_node.args[1:4])
                params += parts[2].numel()
                volume += sparse_storage_bits(*parts)
        for target, tensor in self.tensors().items():
            if target in seen or not tensor.is_floating_point() or tensor.dim() == 0:
                continue
            seen.add(target)
            params += tensor.numel()
            volume += tensor.numel() * tensor.element_size() * 8
        return {
            "params": params,
            "volume_bits": volume,
            "volume_mb": volume / 8 / 2**20,
            "quantized_params": quant_weights,
        }
