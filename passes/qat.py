"""qat: fine-tune quantized weights and their scales end to end (arXiv 2410.10849, seed 003).

Runs after ``quantize`` (and after ``gptq`` or ``learn-rounding``, from their codes). Every
selected layer gets a continuous latent weight ``u`` in grid steps of its current scale ``s₀``
and one log-ratio ``ρ`` per distinct scale (LSQ-style learned step sizes); the layer computes
with ``(q(u·e^{−ρ} + z) − z)·s₀·e^{ρ}``, where ``q`` is the estimator: ``sigmoid`` (the paper's
continuous approximations, sigmoid rounding and SoftClamp with a sharpness annealed towards the
true step) or ``ste`` (round and clamp with straight-through gradients). Everything else in the
graph (rotations, activation quantizers with their own straight-through gradients, sparse
branches) runs as it is, through an ``fx.Interpreter``, so the training forward is the model
that will be exported.

The objective is distillation from the float model when the float weights are kept (the KL
divergence of the quantized model's next-token distribution from the float one's: a few
thousand calibration tokens cannot teach a model the language, but they can show it what the
float model does), or next-token cross-entropy otherwise. At the end the codes are rounded
hard, written back with the learned scales (same formats, so both backends export them
unchanged), and kept only if the loss on held-out calibration windows went down.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from qgraph.errors import DataError, PipelineError
from qgraph.graph_edits import get_tensor, set_tensor
from qgraph.kernels.quant import qrange
from qgraph.kernels.soft_quant import (
    ESTIMATORS,
    annealed_sharpness,
    estimate_codes,
    hard_codes,
)
from qgraph.model import Model
from qgraph.pass_manager import Option, Pass, register
from qgraph.quantized import BoundLayer, float_model_value, linear_value
from qgraph.selection import LayerSelector, selector_options

from .training import check_token_calibration, run_schedule, validate_schedule


@dataclass
class _Trainable:
    """One layer's trainable state, in the stored ``[in, out]`` layout."""

    bound: BoundLayer
    latent: torch.Tensor  # u [K, N], grid steps of s₀ (requires grad)
    log_ratio: torch.Tensor  # ρ [1 | G, 1 | N], one per distinct scale (requires grad)
    scale0: torch.Tensor  # s₀ [K, N]
    zero: torch.Tensor  # z [K, N], float
    group: int  # stored rows per scale row
    qmin: int
    qmax: int
    float_weight: torch.Tensor | None  # [K, N], the teacher's weight
    train: bool  # selected: trained (others run as stored, and are only the teacher's)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """``[1 | G, ·]`` per-scale values to ``[K, N]``."""
        k, n = self.latent.shape
        if t.shape[0] != 1:
            t = t.repeat_interleave(self.group, 0)[:k]
        return t.expand(k, n)

    def codes(self) -> torch.Tensor:
        """Continuous codes ``u·e^{−ρ} + z``."""
        return self.latent * torch.exp(-self._rows(self.log_ratio)) + self.zero

    def weight(self, estimator: str, sharpness: float) -> torch.Tensor:
        q = estimate_codes(self.codes(), self.qmin, self.qmax, estimator, sharpness)
        return (q - self.zero) * self.scale0 * torch.exp(self._rows(self.log_ratio))

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8 [K, N], scale float32 [G, N]) to write back."""
        codes = hard_codes(self.codes(), self.qmin, self.qmax).to(torch.int8)
        rows = -(-self.latent.shape[0] // self.group)
        ratio = torch.exp(self.log_ratio.detach()).expand(rows, self.latent.shape[1])
        scale0 = self.scale0[:: self.group][:rows]
        return codes, (scale0 * ratio).float().contiguous()


class QATForward(fx.Interpreter):
    """The graph with the trained layers computing from their latent weights.

    ``teacher=True`` runs the float model instead: float weights, no sparse branch (the float
    weight already holds it), activation quantizers as the identity.
    """

    def __init__(self, gm: fx.GraphModule, layers: dict[fx.Node, _Trainable], estimator: str):
        super().__init__(gm)
        self.layers, self.estimator = layers, estimator
        self.sharpness = 1.0
        self.teacher = False

    def run_node(self, n: fx.Node) -> Any:
        t = self.layers.get(n)
        if self.teacher:
            value = float_model_value(n, self.env, None if t is None else t.float_weight)
        elif t is not None and t.train:
            value = linear_value(n, self.env, t.weight(self.estimator, self.sharpness))
        else:
            value = None
        return super().run_node(n) if value is None else value


@register
class QAT(Pass):
    name = "qat"
    help = (
        "Fine-tune quantized weights and learned scales end to end on calibration text "
        "(seed 003): sigmoid rounding and SoftClamp (estimator=sigmoid) or straight-through "
        "(ste), distilled from the float model; keeps the result only if held-out calibration "
        "loss drops. Run after quantize (and gptq)."
    )
    options = (
        Option("estimator", str, "sigmoid", "sigmoid | ste", choices=ESTIMATORS),
        Option("iters", int, 16, "Adam steps (one calibration window each)"),
        Option("lr", float, 0.01, "Adam learning rate of the latent weights, in grid steps"),
        Option("scale-lr", float, 0.002, "Adam learning rate of the log scales (0: fixed)"),
        Option("t-start", float, 8.0, "sigmoid estimator: sharpness at the first step"),
        Option("t-end", float, 32.0, "sigmoid estimator: sharpness at the last step"),
        Option(
            "loss",
            str,
            "auto",
            "kd (KL from the float model's next-token distribution; needs float weights) | ce "
            "(next-token cross-entropy) | auto (kd when the float weights are kept)",
            choices=("auto", "kd", "ce"),
        ),
        Option("calib-windows", int, 8, "calibration windows trained on, cycled through"),
        Option(
            "holdout",
            int,
            2,
            "further calibration windows that decide whether the result is kept (0: the "
            "training windows)",
        ),
        Option("length", int, 256, "tokens of each window used (0: the whole window)"),
        *selector_options("", "quantized layers"),
    )
    requires = frozenset({"quantized"})
    provides = frozenset({"qat"})
    forbids = frozenset({"qat"})
    preserves = frozenset({"structure", "quantized-layers"})  # only codes and scales change

    def validate(self) -> None:
        validate_schedule(self)
        if self.opt("holdout") < 0:
            raise PipelineError(f"qat: holdout must be >= 0, got {self.opt('holdout')}")
        if not self.opt("scale-lr") >= 0:
            raise PipelineError(f"qat: scale-lr must be >= 0, got {self.opt('scale-lr')}")
        if not 0 < self.opt("t-start") <= self.opt("t-end"):
            raise PipelineError(
                f"qat: need 0 < t-start <= t-end, got {self.opt('t-start')} and {self.opt('t-end')}"
            )
        self.selector = LayerSelector.from_pass(self)

    def check(self, model: Model) -> None:
        check_token_calibration(self, model, "training loss")
        chosen = self.selector.select(model.quantized.linear())
        if not chosen:
            raise PipelineError(f"qat: no quantized layer matches {self.selector.describe()}")
        if self.opt("loss") == "kd":
            missing = [b.name for b in model.quantized.linear() if b.record.float_weight is None]
            if missing:
                raise PipelineError(
                    f"qat: loss=kd needs the float weights of every quantized layer; "
                    f"{len(missing)} have none ({missing[0]}, ...): use loss=ce, or keep them "
                    "(qgraph.save(..., float_weights=True))"
                )

    def run(self, model: Model) -> dict[str, Any]:
        start = time.perf_counter()
        gm = model.gm
        everything = model.quantized.linear()
        kd = self.opt("loss") == "kd" or (
            self.opt("loss") == "auto"
            and all(b.record.float_weight is not None for b in everything)
        )
        chosen = {b.name for b in self.selector.select(everything)}
        layers = {b.node: _trainable(gm, b, b.name in chosen) for b in everything}
        forward = QATForward(gm, layers, self.opt("estimator"))
        train, check_windows = self._windows(model)
        frozen = [p for p in gm.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            before = self._mean_loss(forward, check_windows, kd, hard=True)
            self._train(layers, forward, train, kd)
            after = self._mean_loss(forward, check_windows, kd, hard=True)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        kept = not after < before
        trained = [t for t in layers.values() if t.train]
        changed = total = 0
        scale_change = 0.0
        for t in trained:
            codes, scale = t.stored()
            old_codes = get_tensor(gm, t.bound.node.args[1].target)
            changed += int((codes != old_codes).sum())
            total += codes.numel()
            scale_change = max(scale_change, float(t.log_ratio.detach().abs().max().exp() - 1))
            if not kept:
                set_tensor(gm, t.bound.node.args[1].target, codes)
                set_tensor(gm, t.bound.node.args[2].target, scale)
                t.bound.record.solver = "qat"
        return {
            "estimator": self.opt("estimator"),
            "loss": "kd" if kd else "ce",
            "steps": self.opt("iters"),
            "windows": len(train),
            "holdout_windows": len(check_windows) if check_windows is not train else 0,
            "tokens_per_step": int(train.shape[1]),
            "layers": len(trained),
            "loss_before": float(f"{before:.6g}"),
            "loss_after": float(f"{after:.6g}"),
            "kept_initial": kept,
            "codes_changed": round(changed / max(1, total), 6),
            "max_scale_change": round(scale_change, 6),
            "seconds": round(time.perf_counter() - start, 3),
        }

    def _windows(self, model: Model) -> tuple[torch.Tensor, torch.Tensor]:
        calib = model.calibration
        length = self.opt("length") or calib.shape[1]
        n, hold = self.opt("calib-windows"), self.opt("holdout")
        train = calib[:n, :length]
        held = calib[n : n + hold, :length]
        if hold and len(held) < hold:
            raise DataError(
                f"qat: needs {n} + {hold} calibration windows (training + holdout), the model "
                f"has {len(calib)}: lower calib-windows or holdout, or give more calibration text"
            )
        return train, (held if hold else train)

    def _train(
        self,
        layers: dict[fx.Node, _Trainable],
        forward: QATForward,
        windows: torch.Tensor,
        kd: bool,
    ) -> None:
        trained = [t for t in layers.values() if t.train]
        groups = [{"params": [t.latent for t in trained], "lr": self.opt("lr")}]
        if self.opt("scale-lr") > 0:
            groups.append({"params": [t.log_ratio for t in trained], "lr": self.opt("scale-lr")})
        for g in groups:
            g["lr0"] = g["lr"]
        opt = torch.optim.Adam(groups)
        iters = self.opt("iters")

        def set_step(i: int, decay: float) -> None:
            forward.sharpness = annealed_sharpness(i, iters, self.opt("t-start"), self.opt("t-end"))
            for g in opt.param_groups:
                g["lr"] = g["lr0"] * decay

        run_schedule(self, opt, windows, lambda ids: _loss(forward, ids, kd, hard=False), set_step)

    def _mean_loss(self, forward: QATForward, windows, kd: bool, hard: bool) -> float:
        with torch.no_grad():
            return sum(float(_loss(forward, w[None], kd, hard)) for w in windows) / len(windows)


def _loss(forward: QATForward, ids: torch.Tensor, kd: bool, hard: bool) -> torch.Tensor:
    """KL(float ‖ quantized) per token, or next-token cross-entropy; ``hard`` evaluates the
    model with true rounding (the straight-through estimator's forward)."""
    estimator = forward.estimator
    if hard:
        forward.estimator = "ste"
    try:
        logits = forward.run(ids).float()[:, :-1].flatten(0, 1)
    finally:
        forward.estimator = estimator
    if not kd:
        return F.cross_entropy(logits, ids[:, 1:].flatten())
    forward.teacher = True
    try:
        with torch.no_grad():
            target = forward.run(ids).float()[:, :-1].flatten(0, 1)
    finally:
        forward.teacher = False
    return F.kl_div(
        F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True, reduction="batchmean"
    )


def _trainable(gm: fx.GraphModule, bound: BoundLayer, train: bool) -> _Trainable:
    """A layer's latent weight: its current codes (or, for round-to-nearest codes of a kept float
    weight, the float weight itself, which holds more than the codes) in grid steps."""
    codes, scale, zero = bound.stored(gm)
    rec = bound.record
    k, n = codes.shape
    group = rec.group
    zero_kn = zero.float().repeat_interleave(group, 0)[:k]
    scale_kn = scale.float().repeat_interleave(group, 0)[:k]
    fw = rec.float_weight
    float_kn = fw.T.float() if fw is not None and tuple(fw.shape) == (n, k) else None
    if float_kn is not None and rec.solver == "rtn" and rec.sparse is None:
        latent = float_kn / scale_kn
    else:
        latent = codes.float() - zero_kn
    rows = scale.shape[0] if rec.weight.granularity == "group" else 1
    cols = 1 if rec.weight.granularity == "tensor" else n
    qmin, qmax = qrange(rec.weight.bits)
    return _Trainable(
        bound,
        latent.clone().requires_grad_(train),
        torch.zeros(rows, cols, requires_grad=train),
        scale_kn,
        zero_kn,
        group,
        qmin,
        qmax,
        float_kn,
        train,
    )
