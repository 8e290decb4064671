"""The structure view: roles, attention shapes and the residual stream, and refusing unsafe graphs."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import max_rel_err, tiny_llama, tokens
from torch import nn

import qgraph

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")

aten = torch.ops.aten


def structure_llama(**overrides):
    """vocab 128, hidden 96, 4 heads / 2 KV heads of 24, MLP 192, 2 layers, tied, init 0.02."""
    options = dict(vocab=128, hidden=96, intermediate=192, head_dim=24, max_positions=128)
    return tiny_llama(**{**options, **overrides})


# ---------------------------------------------------------------------------- hand-written LMs


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class Block(nn.Module):
    """Pre-norm MLP block; ``sandwich`` adds a post-norm on the branch output (before the add),
    ``tanh`` adds a branch that applies tanh to the residual stream itself."""

    def __init__(self, d: int, f: int, sandwich: bool = False, tanh: bool = False):
        super().__init__()
        self.norm = nn.Parameter(torch.rand(d) + 0.5)
        self.up = nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)
        self.post_norm = nn.Parameter(torch.rand(d) + 0.5) if sandwich else None
        self.mix = nn.Linear(d, d, bias=False) if tanh else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.down(torch.relu(self.up(rms_norm(h, self.norm))))
        if self.post_norm is not None:
            y = rms_norm(y, self.post_norm)
        h = h + y
        if self.mix is not None:
            h = h + self.mix(torch.tanh(h))
        return h


class TinyLM(nn.Module):
    def __init__(self, layers: int = 2, sandwich: bool = False, tanh: bool = False):
        super().__init__()
        torch.manual_seed(1)
        vocab, d, f = 64, 32, 64
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            Block(d, f, sandwich=sandwich, tanh=tanh and i == layers - 1) for i in range(layers)
        )
        self.final_norm = nn.Parameter(torch.rand(d) + 0.5)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(rms_norm(h, self.final_norm))


def trace_tiny(module: nn.Module) -> qgraph.Model:
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=512)
    example = (torch.randint(0, 64, (2, 8)),)
    return qgraph.from_module(module, example, dynamic_shapes=({0: batch, 1: seq},))


# ---------------------------------------------------------------------------- Llama


@pytest.fixture(scope="module")
def llama_model() -> qgraph.Model:
    return qgraph.from_hf(structure_llama())


def test_llama_roles_and_attention(llama_model) -> None:
    summary = llama_model.structure.summary()
    layers = 2
    assert summary["roles"] == {
        "attn_q": layers,
        "attn_k": layers,
        "attn_v": layers,
        "attn_o": layers,
        "mlp_in": 2 * layers,
        "mlp_out": layers,
        "lm_head": 1,
    }
    assert summary["linears"] == 7 * layers + 1
    assert summary["attention"] == {"layers": layers, "heads": 4, "kv_heads": 2, "head_dim": 24}
    assert summary["hidden"] == 96
    assert summary["residual_writers"] == 2 * layers
    assert summary["residual_norms"] == 2 * layers + 1
    assert summary["norms"] == {"rms": 2 * layers + 1, "layer": 0}
    assert summary["issues"] == [] and llama_model.structure.issues == []
    (emb,) = summary["embeddings"]
    assert emb["tied"] == ["lm_head"]


def test_llama_roles_match_layer_names(llama_model) -> None:
    sv = llama_model.structure
    expected = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_o",
        "gate_proj": "mlp_in",
        "up_proj": "mlp_in",
        "down_proj": "mlp_out",
        "lm_head": "lm_head",
    }
    for lin in sv.linears:
        leaf = lin.name.split(".")[-1]
        assert lin.role == expected[leaf], lin.name
        if leaf != "lm_head":
            assert lin.layer == int(re.search(r"layers\.(\d+)\.", lin.name).group(1))
    writers = [lin.name.split(".")[-1] for lin in sv.residual.writers]
    assert writers == ["o_proj", "down_proj"] * 2
    readers = sorted(lin.name.split(".")[-1] for lin in sv.stream_readers())
    assert readers == sorted(
        ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"] * 2 + ["lm_head"]
    )
    for att in sv.attention:
        assert att.v_path_ok and att.reason == ""
        assert att.q.out_features == 4 * 24 and att.k.out_features == 2 * 24
        assert att.o.in_features == 4 * 24


def test_llama_other_attention_shape() -> None:
    model = qgraph.from_hf(structure_llama(layers=3, heads=6, kv_heads=3, head_dim=16))
    summary = model.structure.summary()
    assert summary["attention"] == {"layers": 3, "heads": 6, "kv_heads": 3, "head_dim": 16}
    assert summary["residual_writers"] == 6
    assert summary["roles"]["attn_q"] == 3 and summary["roles"]["mlp_out"] == 3
    assert summary["issues"] == []


@pytest.mark.parametrize("case", ["untied", "tied-after-fuse-norms", "hand-written"])
def test_lm_head_role_from_dataflow(case: str) -> None:
    """The output head is found by dataflow (its output is the graph's output), not by its size,
    its name or by being tied to the embedding."""
    if case == "untied":
        model, layers = qgraph.from_hf(structure_llama(tied=False)), 2
    elif case == "tied-after-fuse-norms":
        model, layers = qgraph.from_hf(structure_llama(tied=True)), 2
        qgraph.run_pipeline(model, "fuse-norms")
    else:
        model, layers = trace_tiny(TinyLM()), 2
    roles = model.structure.summary()["roles"]
    assert roles.get("lm_head") == 1, roles
    assert roles["mlp_in"] == (2 * layers if case != "hand-written" else layers), roles


def test_default_quantize_keeps_hand_written_head_float() -> None:
    model = trace_tiny(TinyLM())
    qgraph.run_pipeline(model, "quantize{w=int8:channel}")
    float_linears = [n for n in model.gm.graph.nodes if n.target is aten.linear.default]
    assert [n.args[1].target for n in float_linears] == ["head.weight"]
    assert model.log[-1].summary["layers_quantized"] == 4


# ---------------------------------------------------------------------------- hand-written modules


def test_plain_hand_written_lm_is_clean_and_rotatable() -> None:
    module = TinyLM()
    model = trace_tiny(module)
    sv = model.structure
    assert sv.issues == []
    assert len(sv.residual.writers) == 2
    assert sv.summary()["norms"] == {"rms": 3, "layer": 0}
    assert sv.residual.hidden == 32
    qgraph.run_pipeline(model, "fuse-norms,rotate{seed=1}", verify_each=True)
    for shape in [(1, 5), (3, 17)]:
        x = torch.randint(0, 64, shape)
        with torch.no_grad():
            assert max_rel_err(model(x), module(x)) <= 1e-4


def _issue_node(model: qgraph.Model, issue: str) -> torch.fx.Node:
    name = re.search(r"residual add (\w+)", issue).group(1)
    return next(n for n in model.gm.graph.nodes if n.name == name)


def test_sandwich_norm_reported_and_rotation_refused() -> None:
    module = TinyLM(sandwich=True)
    model = trace_tiny(module)
    issues = model.structure.issues
    assert len(issues) == 2, issues  # one residual add per block adds a normed value
    for issue in issues:
        assert "residual add" in issue and "norm" in issue
        assert _issue_node(model, issue).target is aten.add.Tensor
    x = tokens(64, 2, 10, seed=3)
    with torch.no_grad():
        ref = module(x)
    with pytest.raises(qgraph.StructureError) as info:
        qgraph.run_pipeline(model, "fuse-norms,rotate", verify_each=True)
    assert "rotate" in str(info.value) and "residual add" in str(info.value)
    assert [r.name for r in model.log] == ["fuse-norms"]
    # no silently wrong model: what ran is still exact
    assert max_rel_err(model(x), ref) <= 1e-4


def test_tanh_on_residual_stream_reported_and_rotation_refused() -> None:
    module = TinyLM(tanh=True)
    model = trace_tiny(module)
    issues = model.structure.issues
    assert issues and any("tanh" in i for i in issues), issues
    tanh_nodes = [n for n in model.gm.graph.nodes if n.target is aten.tanh.default]
    assert len(tanh_nodes) == 1 and any(tanh_nodes[0].name in i for i in issues)
    x = tokens(64, 2, 10, seed=3)
    with torch.no_grad():
        ref = module(x)
    trial = trace_tiny(module)
    with pytest.raises(qgraph.StructureError, match="tanh"):
        qgraph.run_pipeline(trial, "fuse-norms,rotate")
    assert max_rel_err(trial(x), ref) <= 1e-4
    # rotating only the heads needs no R1 and there is no attention: nothing is refused
    qgraph.run_pipeline(model, "fuse-norms,rotate{r1=false}", verify_each=True)
    assert max_rel_err(model(x), ref) <= 1e-4
