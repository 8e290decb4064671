"""learn-rotations: SpinQuant-style learned R1 and per-layer R2 (arXiv 2405.16406). Exact.

Runs after ``rotate`` and before ``quantize``. It learns an orthogonal ``U`` (hidden × hidden) on
top of the residual stream's current rotation and one ``V_l`` (head dim × head dim) per
attention on top of its value path's, both starting at the identity, so the search starts from
``rotate``'s randomized Hadamard. The loss is next-token cross-entropy on calibration windows
through the model as it will be quantized: every selected layer's weight is fake-quantized on
``w`` and its input on ``a``, with straight-through gradients; online rotations (R2 on o_proj's
input, R3, R4) stay fixed Hadamards in the graph. Steps are Cayley SGD, so ``U`` and ``V_l`` stay
orthogonal, and the learned rotations are then folded into the weights exactly like ``rotate``'s
(float64), so the float model's function is unchanged.

The training forward is the graph itself, run by an ``fx.Interpreter`` that computes each linear
layer's weight from the base weight and the current ``U``/``V_l`` (differentiably) instead of
reading it. Layers whose weight is not fake-quantized (the output head) rotate their input
back instead (``x Uᵀ``), which avoids a vocabulary-sized matmul per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from qgraph.errors import PipelineError
from qgraph.formats import ActSpec, WeightSpec, fake_quantize, parse_act_spec, parse_weight_spec
from qgraph.graph_edits import finish, get_tensor
from qgraph.kernels.rotation import Rotation
from qgraph.kernels.stiefel import CayleySGD
from qgraph.model import Model
from qgraph.pass_manager import Option, Pass, next_pass, register
from qgraph.selection import LayerSelector, selector_options

from . import online_rotation
from .rotate import apply_r1, check_r1, r2_possible, rotate_heads
from .training import check_token_calibration, run_schedule, validate_schedule

PER_TOKEN = torch.ops.qgraph.quantize_per_token.default


@dataclass
class _LayerPlan:
    """How one linear layer's weight depends on the learned rotations."""

    weight: torch.Tensor  # float32 base weight (o_proj behind an online rotation: un-rotated)
    bias: torch.Tensor | None
    reader: bool  # reads the residual stream: W U
    writer: bool  # writes the residual stream: Uᵀ W, b U
    v_of: int | None = None  # index of the attention whose value rows it holds: V_lᵀ W_h
    o_of: int | None = None  # index of the attention whose head columns it holds: W_o V_l
    online: torch.Tensor | None = None  # dense Q of an online rotation in front of an o_proj
    quantized: bool = False


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` forward, identity backward (straight-through)."""
    return x + (q - x).detach()


class RotatedForward(fx.Interpreter):
    """Runs the graph with every planned linear layer's weight computed from ``U`` and ``V_l``."""

    def __init__(
        self,
        gm: fx.GraphModule,
        plans: dict[fx.Node, _LayerPlan],
        embeddings: set[fx.Node],
        u: torch.Tensor,
        vs: list[torch.Tensor],
        wspec: WeightSpec | None,
        aspec: ActSpec | None,
    ):
        super().__init__(gm)
        self.plans, self.embeddings = plans, embeddings
        self.u, self.vs, self.wspec, self.aspec = u, vs, wspec, aspec

    def run(self, *args: Any) -> Any:  # noqa: D102
        self._quantized_inputs: dict[fx.Node, torch.Tensor] = {}
        return super().run(*args)

    def run_node(self, n: fx.Node) -> Any:
        plan = self.plans.get(n)
        if plan is not None:
            return self._linear(n, plan)
        out = super().run_node(n)
        return out @ self.u if n in self.embeddings else out

    def _linear(self, n: fx.Node, p: _LayerPlan) -> torch.Tensor:
        src = n.args[0]
        x = self.env[src]
        if p.quantized and self.aspec is not None:
            if src not in self._quantized_inputs:  # q/k/v share one quantized input
                self._quantized_inputs[src] = PER_TOKEN(x, self.aspec.bits, self.aspec.symmetric)
            x = self._quantized_inputs[src]
        w, b = p.weight, p.bias
        if p.v_of is not None:
            v = self.vs[p.v_of]
            hd = v.shape[0]
            w = (v.T @ w.reshape(-1, hd, w.shape[1])).reshape(w.shape)
            b = None if b is None else (b.reshape(-1, hd) @ v).reshape(b.shape)
        if p.o_of is not None:
            v = self.vs[p.o_of]
            w = (w.reshape(w.shape[0], -1, v.shape[0]) @ v).reshape(w.shape)
            if p.online is not None:
                w = F.pad(w, (0, p.online.shape[0] - w.shape[1])) @ p.online
        fold = p.quantized and self.wspec is not None  # the weight itself must carry U
        if p.reader and not fold:
            x = x @ self.u.T
        elif p.reader:
            w = w @ self.u
        if p.writer and fold:
            w = self.u.T @ w
            b = None if b is None else b @ self.u
        if fold:
            w = _ste(w, fake_quantize(w, self.wspec))
        y = F.linear(x, w, b)
        return y @ self.u if p.writer and not fold else y


AUTO_W, AUTO_A = "int4:channel", "int4:token"  # auto without a quantize pass right after


@register
class LearnRotations(Pass):
    name = "learn-rotations"
    help = (
        "Learn the residual rotation R1 and each attention's value rotation R2 on top of "
        "rotate's Hadamards (SpinQuant): Cayley SGD on the calibration text's next-token loss "
        "with weights and activations fake-quantized as they will be (by default as the quantize "
        "pass right after it sets them). Exact (folded into the weights like rotate). Run after "
        "rotate, right before quantize."
    )
    options = (
        Option(
            "w",
            str,
            "auto",
            "weight spec trained against: auto (the next pass's, when it is quantize; else "
            "int4:channel) | none (float weights) | a spec",
        ),
        Option(
            "a",
            str,
            "auto",
            "activation spec trained against: auto (the next quantize's; int<b>:tensor is "
            "trained as int<b>:token; else int4:token) | none | int<b>:token",
        ),
        Option("iters", int, 24, "Cayley SGD steps (one calibration window each)"),
        Option("lr", float, 0.02, "rotation angle of a step (the step size × ‖generator‖)"),
        Option("momentum", float, 0.9, "momentum of the Cayley SGD generator"),
        Option("calib-windows", int, 8, "calibration windows cycled through"),
        Option("length", int, 256, "tokens of each window used (0: the whole window)"),
        Option("r2", bool, True, "also learn one value-path rotation per attention"),
        *selector_options("lm_head", "fake-quantized layers"),
    )
    requires = frozenset({"rotated"})
    provides = frozenset({"learned-rotations"})
    forbids = frozenset({"quantized", "learned-rotations"})
    exact = True

    def validate(self) -> None:
        self._specs(self.opt("w"), self.opt("a"), strict=True)  # bad specs fail at parse time
        validate_schedule(self)
        if not 0 <= self.opt("momentum") < 1:
            raise PipelineError(
                f"learn-rotations: momentum must be in [0, 1), got {self.opt('momentum')}"
            )
        self.selector = LayerSelector.from_pass(self)

    def check(self, model: Model) -> None:
        check_token_calibration(self, model, "next-token loss")
        check_r1(model)

    def _specs(self, w: str, a: str, strict: bool) -> tuple[WeightSpec | None, ActSpec | None]:
        """Parsed ``w``/``a`` (``auto`` as the defaults int4:channel / int4:token). ``strict``
        (the user's own ``a``) refuses a static spec; a following quantize's is trained per
        token: its ranges are calibrated after the rotation anyway."""
        w = AUTO_W if w == "auto" else w
        a = AUTO_A if a == "auto" else a
        try:
            wspec = None if w == "none" else parse_weight_spec(w)
            aspec = parse_act_spec(a)
        except PipelineError as exc:
            raise PipelineError(f"learn-rotations: {exc}") from None
        if aspec is not None and aspec.mode != "token":
            if strict:
                raise PipelineError(
                    f"learn-rotations: a={a}: train against dynamic per-token activations "
                    "(int<b>:token); static ranges are calibrated after the rotation"
                )
            aspec = parse_act_spec(f"int{aspec.bits}:token")
        return wspec, aspec

    def _trained_specs(self) -> tuple[WeightSpec | None, ActSpec | None, str]:
        """The specs to train against and where they came from: ``auto`` options take those of
        the quantize pass that runs next, so the rotation is trained against the quantizers the
        model will have (W4A16: float activations)."""
        w, a = self.opt("w"), self.opt("a")
        if "auto" not in (w, a):
            return (*self._specs(w, a, strict=True), "options")
        nxt = next_pass()
        if nxt is None or nxt.name != "quantize":
            return (*self._specs(w, a, strict=True), "defaults (no quantizer pass next)")
        w = nxt.opt("w") if w == "auto" else w
        a = nxt.opt("a") if a == "auto" else a
        return (*self._specs(w, a, strict=False), "the next quantize pass")

    def run(self, model: Model) -> dict[str, Any]:
        start = time.perf_counter()
        wspec, aspec, specs_from = self._trained_specs()
        gm, sv = model.gm, model.structure
        hidden = int(sv.residual.hidden)
        # a fused q/k/v projection's V rows are rotated by `rotate`, not learned here
        attention = [
            a for a in sv.attention if self.opt("r2") and r2_possible(a) and a.v_rows is None
        ]
        plans = _plan(gm, sv, attention, self.selector)
        u = torch.eye(hidden, requires_grad=True)
        vs = [torch.eye(a.head_dim, requires_grad=True) for a in attention]
        embeddings = {e.node for e in sv.residual.embeddings}
        forward = RotatedForward(gm, plans, embeddings, u, vs, wspec, aspec)
        length = self.opt("length") or model.calibration.shape[1]
        windows = model.calibration[: self.opt("calib-windows"), :length]

        def loss_of(ids: torch.Tensor) -> torch.Tensor:
            logits = forward.run(ids).float()
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

        def mean_loss() -> float:
            with torch.no_grad():
                return sum(float(loss_of(w[None])) for w in windows) / len(windows)

        before = mean_loss()
        opt = CayleySGD([u, *vs], self.opt("lr"), self.opt("momentum"))
        iters = self.opt("iters")

        def set_step(i: int, decay: float) -> None:
            opt.lr = self.opt("lr") * decay

        run_schedule(self, opt, windows, loss_of, set_step)
        after = mean_loss()
        kept = after >= before  # learning did not help on its own windows: keep rotate's
        summary: dict[str, Any] = {
            "steps": iters,
            "windows": len(windows),
            "tokens_per_step": length,
            "fake_quant": {
                "w": wspec.text() if wspec else "none",
                "a": aspec.text() if aspec else "none",
                "layers": sum(p.quantized for p in plans.values()),
                "from": specs_from,
            },
            "loss_before": round(before, 5),
            "loss_after": round(after, 5),
            "kept_initial": kept,
            "r2_layers": len(attention),
        }
        if not kept:
            with torch.no_grad():
                u64 = _orthonormal(u.detach())
                apply_r1(gm, sv, Rotation(hidden, "learned R1", matrix=u64))
                for att, v in zip(attention, vs, strict=True):
                    rot = Rotation(att.head_dim, "learned R2", matrix=_orthonormal(v.detach()))
                    rotate_heads(gm, att, rot)
            finish(gm)
            summary["r1_max_deviation_from_identity"] = float((u64 - torch.eye(hidden)).abs().max())
        summary["seconds"] = round(time.perf_counter() - start, 3)
        return summary


def _orthonormal(q: torch.Tensor) -> torch.Tensor:
    """``q`` in float64, re-orthonormalised (polar factor) to remove float32 drift, so that the
    folded rotation is orthogonal to float64 precision."""
    u, _, vh = torch.linalg.svd(q.double())
    return u @ vh


def _plan(gm: fx.GraphModule, sv, attention: list, selector: LayerSelector):
    readers = {lin.node for lin in sv.stream_readers()}
    writers = {lin.node for lin in sv.residual.writers}
    plans: dict[fx.Node, _LayerPlan] = {}
    for lin in sv.linears:
        bias = get_tensor(gm, lin.bias).float() if lin.bias else None
        plans[lin.node] = _LayerPlan(
            get_tensor(gm, lin.weight).float(),
            bias,
            reader=lin.node in readers,
            writer=lin.node in writers,
            quantized=selector.matches(lin.name, lin.role),
        )
    for i, att in enumerate(attention):
        plans[att.v.node].v_of = i
        p = plans[att.o.node]
        p.o_of = i
        online = online_rotation.find(att.o.node, gm)
        if online is not None:
            p.weight = online_rotation.unrotated_weight(gm, att.o.weight, online).float()
            eye = torch.eye(online.size)  # I_pad Q = Q, by the helper that built the layer
            p.online = online_rotation.rotated_weight(eye, online.size, online.signs).float()
    # layers that play no part in the rotations and are not fake-quantized run as they are
    return {n: p for n, p in plans.items() if p.reader or p.writer or p.quantized or _r2(p)}


def _r2(p: _LayerPlan) -> bool:
    return p.v_of is not None or p.o_of is not None
