"""Which weights and layers the data-driven passes pick, against references computed here.

* ``expand{mode=progressive}`` grows the layer with the worst relative GPTQ error first: the
  reference captures each candidate layer's input from the graph, forms XᵀX in float64 and runs
  ``gptq_quantize`` at the pass's weight format.
* ``split-sparse{significant=...}`` moves the weights with the largest |ΔFᵢ| (post-quantization
  integral) to its sparse branch: the reference integrates the gradient of the loss along
  w + tΔw by Gauss–Legendre quadrature in float64, with autograd through the Hugging Face
  module itself (not qgraph's PQI kernel or its float twin of the graph).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import max_rel_err, tokens

import qgraph
from qgraph.graph_edits import get_tensor, set_tensor
from qgraph.kernels.gptq import gptq_quantize

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # many tiny ops: see conftest.one_thread
    pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),
]

HADAMARD = torch.ops.qgraph.hadamard.default
QLINEAR = torch.ops.qgraph.qlinear.default
SPARSE = torch.ops.qgraph.sparse_matmul.default


# ---------------------------------------------------------------------------- expand


WORST = "model.layers.1.mlp.down_proj"  # unmodified, layers.0.mlp.down_proj has the largest error
UNBALANCE = 50.0


def unbalance(model: qgraph.Model) -> None:
    """Same function, but MLP feature 0 of layer 1 reaches down_proj 50× smaller and
    down_proj's column 0 is 50× larger: that column dominates the per-channel quantization grid
    of every row but carries little of the output, so down_proj's quantization error relative
    to its output becomes by far the largest. (New tensors: the originals stay untouched.)"""
    lins = {lin.name: lin for lin in model.structure.linears}
    up = get_tensor(model.gm, lins["model.layers.1.mlp.up_proj"].weight).clone()
    down = get_tensor(model.gm, lins[WORST].weight).clone()
    up[0] /= UNBALANCE
    down[:, 0] *= UNBALANCE
    set_tensor(model.gm, lins["model.layers.1.mlp.up_proj"].weight, up)
    set_tensor(model.gm, lins[WORST].weight, down)
    model.invalidate()


def layer_inputs(model: qgraph.Model, nodes: dict[torch.fx.Node, str]) -> dict[str, torch.Tensor]:
    """Each named linear node's input on all calibration windows, [tokens, in], float64."""
    seen: dict[str, torch.Tensor] = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            if n in nodes:
                x = self.env[n.args[0]]
                seen[nodes[n]] = x.detach().double().reshape(-1, x.shape[-1])
            return super().run_node(n)

    with torch.inference_mode():
        Capture(model.gm).run(model.calibration)
    return seen


def relative_gptq_errors(model: qgraph.Model, bits: int = 4) -> dict[str, float]:
    """For every linear layer behind an online Hadamard rotation: ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖², with X
    its input and W its weight as the graph holds them now and Ŵ = GPTQ(W, XᵀX) at ``bits``
    per channel, symmetric (expand's default ``w=int4:channel``)."""
    rotated = {
        lin.node: lin for lin in model.structure.linears if lin.node.args[0].target is HADAMARD
    }
    xs = layer_inputs(model, {node: lin.name for node, lin in rotated.items()})
    errors = {}
    for lin in rotated.values():
        x = xs[lin.name]
        h = x.T @ x
        w = get_tensor(model.gm, lin.weight).double()
        res = gptq_quantize(w, h, bits, True, "channel", full_range=True)  # expand's own grid
        delta = w - res.weight.double()
        errors[lin.name] = float(torch.trace(delta @ h @ delta.T) / torch.trace(w @ h @ w.T))
    return errors


def test_progressive_expansion_grows_the_worst_layer_first(model) -> None:
    ids = tokens(256, 2, 16, seed=7)
    before = model(ids)
    unbalance(model)
    assert max_rel_err(model(ids), before) < 1e-5  # the same function
    qgraph.run_pipeline(model, "fuse-norms,rotate{seed=0,online=r2+r4}")
    errors = relative_gptq_errors(model)
    assert sorted(errors) == sorted(
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")
    )
    worst, second = sorted(errors, key=errors.get, reverse=True)[:2]
    assert worst == WORST, errors
    assert errors[worst] > 3 * errors[second], errors  # the margin
    # every candidate has 64 outputs and grows by 32 inputs per step (the next multiple of 32
    # with a Hadamard order: 64 → 96, 128 → 160); 1.5 steps' worth allows exactly one growth
    allowed = 1.5 * 64 * 32
    budget = 100 * allowed / model.accounting()["params"]
    qgraph.run_pipeline(model, f"expand{{mode=progressive,budget={budget:.6f}}}")
    summary = model.log[-1].summary
    grown = {}
    for name, change in summary["widths"].items():
        before, after = (int(v) for v in change.split("→"))
        if after != before:
            grown[name] = after - before
    assert grown == {worst: 32}, summary["widths"]
    assert summary["layers_expanded"] == 1 and 0 < summary["params_added"] <= allowed


# ---------------------------------------------------------------------------- split-sparse


PQI_LAYER = "model.layers.0.self_attn.v_proj"  # 32 × 64 weights, int2 per channel
TOKENS = 32
SIGNIFICANT = 5  # percent: 102 of the 2048 weights, in one detach step (beta = significant)
NEAR_TIE = 1e-3  # boundary tolerance of the top-k comparison, relative to the k-th |ΔFᵢ|


def rtn_int2_channel(w: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest, 2 bits, symmetric per row (s = max|w| / 1, codes in [-2, 1])."""
    s = w.abs().amax(dim=1, keepdim=True)
    return torch.clamp(torch.round(w / s), -2, 1) * s


def top_k_violations(score: torch.Tensor, chosen: torch.Tensor) -> tuple[float, float]:
    """(smallest chosen, largest not chosen) ``score``, relative to the k-th largest score, k =
    the number chosen: (≥ 1, ≤ 1) exactly when ``chosen`` is a top-k set."""
    k = int(chosen.sum())
    kth = score.flatten().sort(descending=True).values[k - 1]
    return float(score[chosen].min() / kth), float(score[~chosen].max() / kth)


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[score.flatten().argsort(descending=True)[:k]] = True
    return mask.reshape(score.shape)


def integral_sensitivity(loss, w: torch.Tensor, dw: torch.Tensor, nodes: int) -> torch.Tensor:
    """ΔFᵢ = Δwᵢ ∫₀¹ ∂ᵢF(w + tΔw) dt by ``nodes``-point Gauss–Legendre quadrature."""
    xs, weights = np.polynomial.legendre.leggauss(nodes)
    integral = torch.zeros_like(w)
    for x, weight in zip(xs, weights, strict=True):
        point = (w + (x + 1) / 2 * dw).requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(point), point)
        integral += weight / 2 * grad
    return dw * integral


def test_pqi_split_keeps_the_weights_with_the_largest_integral(llama, model) -> None:
    regex = PQI_LAYER.replace(".", r"\.")
    qgraph.run_pipeline(model, f"quantize{{w=int2:channel:narrow,clip=none,layers={regex}}}")
    (q,) = [n for n in model.gm.graph.nodes if n.target is QLINEAR]
    codes, scale, zero = (get_tensor(model.gm, a.target) for a in q.args[1:4])
    w_hat = qgraph.ops.dequantize_kn(codes, scale, zero, q.args[5]).T.double()
    # the reference: F = mean next-token cross-entropy of the float model on the first
    # calibration window (windows=1, tokens=TOKENS), as a function of this layer's weight only
    hf = copy.deepcopy(llama).double()
    w = hf.get_submodule(PQI_LAYER).weight.detach().clone()
    dw = rtn_int2_channel(w) - w
    torch.testing.assert_close(w + dw, w_hat, rtol=0, atol=1e-6)  # what quantize stored
    ids = model.calibration[:1, :TOKENS]

    def loss(weight: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(
            hf, {PQI_LAYER + ".weight": weight}, (ids,), {"use_cache": False}
        )
        return torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])

    sens = integral_sensitivity(loss, w, dw, nodes=8)
    with torch.no_grad():
        actual = float(loss(w + dw) - loss(w))
    assert abs(float(sens.sum()) - actual) <= 1e-3 * abs(actual)  # Σᵢ ΔFᵢ = ΔF: exact integral
    # the step is long enough for the integral to matter: first-order Taylor (the gradient at
    # t = 0) would pick a different top k, well outside the tolerance
    start = w.clone().requires_grad_(True)
    taylor = dw * torch.autograd.grad(loss(start), start)[0]
    k = int(SIGNIFICANT / 100 * w.numel())
    low, high = top_k_violations(sens.abs(), top_k_mask(taylor.abs(), k))
    assert low < 1 - 10 * NEAR_TIE or high > 1 + 10 * NEAR_TIE, (low, high)

    qgraph.run_pipeline(
        model,
        f"split-sparse{{outliers=0,significant={SIGNIFICANT},beta={SIGNIFICANT},intervals=8,"
        f"windows=1,tokens={TOKENS}}}",
    )
    (s,) = [n for n in model.gm.graph.nodes if n.target is SPARSE]
    rows, cols = (get_tensor(model.gm, a.target).long() for a in s.args[1:3])
    detached = torch.zeros_like(w, dtype=torch.bool)
    detached[rows, cols] = True
    assert int(detached.sum()) == rows.numel() == k == 102
    assert model.log[-1].summary["significant"] == k
    differ = int((top_k_mask(sens.abs(), k) != detached).sum())
    low, high = top_k_violations(sens.abs(), detached)
    message = f"{differ} weights differ from the top {k} by |ΔF|: the smallest detached |ΔF| is "
    message += f"{low:.4g} × the k-th largest, the largest kept {high:.4g} ×"
    assert low >= 1 - NEAR_TIE and high <= 1 + NEAR_TIE, message
