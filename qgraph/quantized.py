"""The quantized-layer record and the analysis that binds records to the graph.

Every layer that ``quantize`` (or ``mixed-precision``) rewrote into ``qgraph::qlinear`` has a
typed :class:`QuantizedLayer` record, owned by the :class:`~qgraph.model.Model` (``model.quant``,
keyed by layer name): its formats, its storage accounting, its float weight while it is kept
(what ``gptq``, ``learn-rounding`` and ``split-sparse`` re-solve from), its sparse side branch.
Records hold what the graph cannot tell; the graph holds the tensors. :class:`QuantizedLayers`
is the analysis that finds, in the graph as it is now, the ``qlinear`` node (and sparse branch)
of each record, in graph order — recomputed whenever a pass does not preserve it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import fx

from . import ops, sparse_ops  # noqa: F401  (torch.ops.qgraph.* are matched below)
from .formats import ActSpec, WeightSpec, sparse_storage_bits, weight_storage_bits
from .graph_edits import get_tensor

if TYPE_CHECKING:
    from .model import Model

QLINEAR = torch.ops.qgraph.qlinear.default
QCONV = torch.ops.qgraph.qconv.default
SPARSE = torch.ops.qgraph.sparse_matmul.default
#: activation (and KV-cache) quantizers: the identity in the float model
ACT_QUANTIZERS = (
    torch.ops.qgraph.quantize_per_token.default,
    torch.ops.qgraph.quantize_static.default,
)


def linear_value(n: fx.Node, env: dict, weight: torch.Tensor) -> torch.Tensor:
    """What the ``qlinear`` node ``n`` computes with ``weight`` (``[in, out]``) in place of its
    codes: ``x @ weight + bias``, the inputs read from an interpreter's ``env``."""
    x = env[n.args[0]]
    bias = n.args[4]
    bias = env[bias] if isinstance(bias, fx.Node) else bias
    y = x @ weight.to(x.dtype)
    return y if bias is None else y + bias


def float_model_value(n: fx.Node, env: dict, weight: torch.Tensor | None = None):
    """What node ``n`` computes in the float model the graph was quantized from, or None where
    that is what the graph computes: activation quantizers are the identity, sparse branches
    add nothing (the float weight holds them), and a ``qlinear`` given its float ``weight``
    (``[in, out]``) multiplies by it. Shared by the float runs beside calibration and QAT's
    teacher."""
    if n.op != "call_function":
        return None
    if n.target in ACT_QUANTIZERS:
        return env[n.args[0]]
    if n.target is SPARSE:
        x = env[n.args[0]]
        return x.new_zeros((*x.shape[:-1], n.args[4]))
    return None if weight is None else linear_value(n, env, weight)


@dataclass
class SparseBranch:
    """The exact 16-bit side branch of a dense-and-sparse split layer."""

    values_attr: str  # the graph attribute of its values (the branch's key in the graph)
    nnz: int
    outliers: int
    significant: int


@dataclass
class QuantizedLayer:
    """What qgraph knows about one quantized linear layer beyond its tensors."""

    name: str
    role: str
    in_features: int
    out_features: int
    weight: WeightSpec
    act: ActSpec | None
    codes_attr: str  # the graph attribute of its codes (the record's key in the graph)
    group: int  # rows of codes per stored scale row
    n_scales: int  # distinct scales the quantizer defines
    act_range: str | None = None  # range method of a static activation quantizer
    clip: str = "none"  # weight range search quantize used (none | output | mse)
    solver: str = "rtn"  # who chose the codes last: rtn | gptq | learned-rounding | split
    sparse: SparseBranch | None = None
    kind: str = "linear"  # linear (qgraph::qlinear) | conv (qgraph::qconv)
    out_range: str | None = None  # range method of a static quantizer on the output (convs)
    float_weight: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def storage_bits(self) -> int:
        """The dense part's bits (codes, distinct scales, zero points); see formats."""
        return weight_storage_bits(self.in_features, self.out_features, self.weight, self.n_scales)

    def to_json(self) -> dict[str, Any]:
        """JSON-able description (the float weight is saved separately, when at all)."""
        out = asdict(self)
        out.pop("float_weight")
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantizedLayer:
        data = dict(data)
        weight = dict(data["weight"])
        if weight.get("symmetric", True):
            weight.setdefault("grid", "narrow")  # archives written before grids were a choice
        data["weight"] = WeightSpec(**weight)
        data["act"] = ActSpec(**data["act"]) if data.get("act") else None
        data["sparse"] = SparseBranch(**data["sparse"]) if data.get("sparse") else None
        return cls(**data)


@dataclass
class BoundLayer:
    """A record with the nodes that carry it in the current graph."""

    record: QuantizedLayer
    node: fx.Node  # the qgraph::qlinear (or qgraph::qconv) node
    sparse_node: fx.Node | None = None  # its qgraph::sparse_matmul side branch

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def role(self) -> str:
        return self.record.role

    def stored(self, gm: fx.GraphModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scale, zero) as the graph holds them now."""
        return tuple(get_tensor(gm, a.target) for a in self.node.args[1:4])  # type: ignore[return-value]

    def sparse_tensors(self, gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
        """(rows, cols, values) of the side branch, or () without one."""
        if self.sparse_node is None:
            return ()
        return tuple(get_tensor(gm, a.target) for a in self.sparse_node.args[1:4])


class QuantizedLayers:
    """Analysis: the model's quantized layers bound to their nodes, in graph order."""

    name: ClassVar[str] = "quantized-layers"

    def __init__(self, model: Model):
        by_codes = {r.codes_attr: r for r in model.quant.values()}
        by_values = {r.sparse.values_attr: r.name for r in model.quant.values() if r.sparse}
        self.layers: list[BoundLayer] = []
        self.by_name: dict[str, BoundLayer] = {}
        sparse_nodes: dict[str, fx.Node] = {}
        for node in model.gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in (QLINEAR, QCONV) and node.args[1].target in by_codes:
                bound = BoundLayer(by_codes[node.args[1].target], node)
                self.layers.append(bound)
                self.by_name[bound.name] = bound
            elif node.target is SPARSE and node.args[3].target in by_values:
                sparse_nodes[by_values[node.args[3].target]] = node
        for name, node in sparse_nodes.items():
            if name in self.by_name:
                self.by_name[name].sparse_node = node

    def __iter__(self):
        return iter(self.layers)

    def linear(self) -> list[BoundLayer]:
        """The quantized linear layers (what the weight solvers re-solve; convs keep RTN)."""
        return [b for b in self.layers if b.record.kind == "linear"]

    def __len__(self) -> int:
        return len(self.layers)

    def groups(self) -> list[list[BoundLayer]]:
        """Linear layers grouped by their shared input (q/k/v, gate/up), in graph order."""
        by_input: dict[fx.Node, list[BoundLayer]] = {}
        for layer in self.linear():
            by_input.setdefault(layer.node.args[0], []).append(layer)
        return list(by_input.values())

    def fingerprint(self) -> tuple:
        """What a pass that preserves this analysis must not change."""
        return tuple((b.name, b.node.name, b.sparse_node is not None) for b in self.layers)

    def storage_bits(self, gm: fx.GraphModule) -> int:
        return sum(
            b.record.storage_bits() + sparse_storage_bits(*b.sparse_tensors(gm))
            for b in self.layers
        )
