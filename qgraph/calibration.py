"""Calibration as an analysis of the graph as it is now.

:class:`ResumableRun` interprets the current FX graph on the calibration batch node by node
and lets a pass act *between* nodes — e.g. collect the input Hessian of a group of linear
layers, re-solve their weights, and continue — so that every layer is calibrated on inputs
produced by the already-rewritten layers before it (after rotations, with earlier layers
quantized). Values are freed after their last use, so memory stays at the live activations
of about one layer for the calibration batch, not the whole model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from .window_tree import tree_sum


class _StopRun(Exception):
    """Raised by :meth:`ResumableRun.stop` to end the run early."""


class ResumableRun(fx.Interpreter):
    """Run ``gm`` on ``inputs``; ``before(node, run)`` is called before each node executes and
    ``after(node, value, run)`` after it (to observe its output). The one calibration
    interpreter of qgraph: every pass that needs activations uses it."""

    def __init__(
        self,
        gm: fx.GraphModule,
        before: Callable[[fx.Node, ResumableRun], None] | None = None,
        after: Callable[[fx.Node, object, ResumableRun], None] | None = None,
    ):
        super().__init__(gm, garbage_collect_values=True)
        self.before = before
        self.after = after
        self.stopped = False

    def run(self, *args, **kwargs):
        """The graph's outputs, or None when ``before`` called :meth:`stop`."""
        try:
            return super().run(*args, **kwargs)
        except _StopRun:
            self.stopped = True
            self.env.clear()
            return None

    def stop(self) -> None:
        """End the run now: a pass that has what it needs skips the rest of the graph (for an
        LLM, the lm_head logits — ``tokens × vocab`` floats, the largest tensor of the run)."""
        raise _StopRun

    def run_node(self, n: fx.Node):
        if self.before is not None:
            self.before(n, self)
        out = super().run_node(n)
        if self.after is not None:
            self.after(n, out, self)
        return out

    def refresh_attr(self, node: fx.Node) -> None:
        """Re-read a get_attr node's tensor after a pass rebound the attribute mid-run."""
        if node in self.env:
            self.env[node] = self.fetch_attr(node.target)


class StepRun(ResumableRun):
    """An interpreter of ``gm`` on one set of inputs that advances on request: ``advance(node)``
    runs every node before ``node`` not yet run. Several of them, one per calibration window,
    walk the graph together from cut to cut, so a pass sees every window's input of a layer
    while each window's working set inside a layer is alive one window at a time."""

    def __init__(self, gm: fx.GraphModule, *args):
        super().__init__(gm)
        self.env = {}
        self.args_iter = iter(self.graph.process_inputs(*args))
        self._nodes = list(self.graph.nodes)
        self._next = 0
        self._position = {n: i for i, n in enumerate(self._nodes)}
        self.keep: set[fx.Node] = set()  # values kept past their last use, until forget()

    def forget(self, node: fx.Node) -> None:
        """Free a value kept in ``keep`` once every user of it has run."""
        self.keep.discard(node)
        if node in self.env and all(self._position[u] < self._next for u in node.users):
            del self.env[node]

    def advance(self, until: fx.Node) -> None:
        while self._next < len(self._nodes):
            node = self._nodes[self._next]
            if node is until:
                return
            self._next += 1
            if node in self.env:
                continue
            self.env[node] = self.run_node(node)
            for dead in self.user_to_last_uses.get(node, []):
                if dead not in self.keep:
                    del self.env[dead]
        raise ValueError(f"{until.name} is not ahead of this run")


class FloatStepRun(StepRun):
    """A :class:`StepRun` of the float model the graph was quantized from: the linear layers in
    ``float_weights`` (node → ``[out, in]`` weight) multiply by it, activation quantizers are
    the identity and sparse branches add nothing (the float weight holds them). It walks beside
    the quantized runs so that a solver can aim at the float model's outputs (gptq's
    ``target=float``). A weight is read when its node runs, so it may be dropped after that."""

    def __init__(self, gm: fx.GraphModule, float_weights: dict, *args):
        super().__init__(gm, *args)
        self.float_weights = float_weights

    def run_node(self, n: fx.Node):
        from .quantized import float_model_value  # quantized imports the ops

        weight = self.float_weights.get(n)
        value = float_model_value(n, self.env, None if weight is None else weight.T)
        return super().run_node(n) if value is None else value


def window_cross(
    xs: list[torch.Tensor],
    targets: list[torch.Tensor],
    bases: list[torch.Tensor] | None = None,
    block: int = 512,
) -> torch.Tensor:
    """``Σ_w X_wᵀ(T_w − B_w)`` over the windows (each ``[..., in]``; ``B`` defaults to ``X``) in
    float64, in the canonical window order like :func:`window_hessian`: how the float model's
    inputs ``T`` differ from the quantized model's ``B``, as seen by a layer fitted on ``X``.
    Each window's product runs in float32, by column blocks, so the partial sums stay
    ``[in, block]``."""
    flats = [x.reshape(-1, x.shape[-1]).float() for x in xs]
    bases = flats if bases is None else bases
    n = flats[0].shape[1]
    out = torch.empty(n, n, dtype=torch.float64)
    for i in range(0, n, block):
        j = min(i + block, n)

        def leaf(w: int, i: int = i, j: int = j) -> torch.Tensor:
            diff = targets[w].reshape(-1, n)[:, i:j].float() - bases[w].reshape(-1, n)[:, i:j]
            return (flats[w].T @ diff).double()

        out[:, i:j] = tree_sum(0, len(flats), leaf)
    return out


def window_hessian(xs: list[torch.Tensor], block: int = 512) -> torch.Tensor:
    """``Σ_w X_wᵀX_w`` over the windows' activations ``xs`` (each ``[..., in]``), in float64,
    summed in the canonical window order of :mod:`qgraph.window_tree` so that workers holding
    subtrees of the windows reproduce one process's bits. Each window's product runs in float32
    (its 512 tokens: relative error ~1e-7, far below GPTQ's 1 % damping), by column blocks, the
    lower blocks only and mirrored (``XᵀX`` is symmetric; whole products were measured slower:
    SmolLM2 GPTQ 12 s of Hessians against 8 s), so a block's partial sums stay small (8192
    inputs: 32 MB)."""
    flats = []
    for x in xs:
        flat = x.reshape(-1, x.shape[-1])
        flats.append(flat if flat.dtype in (torch.float32, torch.float64) else flat.float())
    n = flats[0].shape[1]
    out = torch.empty(n, n, dtype=torch.float64)
    for i in range(0, n, block):
        j = min(i + block, n)

        def leaf(w: int, i: int = i, j: int = j) -> torch.Tensor:
            f = flats[w]
            return (f[:, i:].T @ f[:, i:j].contiguous()).double()

        part = tree_sum(0, len(flats), leaf)  # rows i.., columns i..j
        out[i:, i:j] = part
        out[i:j, j:] = part[j - i :].T
    return out


def calibration_rows(model, p, option: str) -> int:
    """How many calibration rows pass ``p`` uses: its ``option`` when given or when the data are
    token windows (the option's default is a window count), else every row — samples given as
    tensors (``--calib-inputs``, ``stack_samples``) are the user's chosen calibration set."""
    data = model.calibration
    if option in p.explicit or data is None or not data.is_floating_point():
        return p.opt(option)
    return int(data.shape[0])


def input_hessian(x: torch.Tensor, block: int = 512) -> torch.Tensor:
    """``XᵀX`` of activations ``x [..., in]`` flattened over all leading dims, returned in float64.

    The product runs in the activations' own precision (float32 for float32 models: twice the
    speed of float64 and relative error ~1e-6, far below GPTQ's 1 % damping); half precision is
    widened to float32 first. Wide inputs are computed by column blocks, the upper blocks only,
    and mirrored: ``XᵀX`` is symmetric, so ~3/8 of the work at 1536 columns is skipped."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    n = flat.shape[1]
    if n <= block:
        return (flat.T @ flat).double()
    out = torch.empty(n, n, dtype=torch.float64)
    starts = range(0, n, block)
    cols = [flat[:, i : i + block].contiguous() for i in starts]
    for a, i in enumerate(starts):
        right = flat[:, i:]  # this block against itself and every block after it
        part = (cols[a].T @ right).double()
        out[i : i + block, i:] = part
        out[i + block :, i : i + block] = part[:, block:].T
    return out


def input_second_moments(
    gm: fx.GraphModule, nodes: list[fx.Node], batch: torch.Tensor
) -> dict[fx.Node, torch.Tensor]:
    """Σ x_j² over every token of ``batch`` for the first input of each node: the diagonal of
    its input Hessian ``XᵀX`` (float64 ``[in]``), without forming the Hessian. Windows run one at
    a time; layers that read the same tensor (q/k/v) share one result."""
    wanted = {n.args[0] for n in nodes}
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max(wanted, key=position.__getitem__)
    sums: dict[fx.Node, torch.Tensor] = {}

    def observe(n: fx.Node, out: object, run: ResumableRun) -> None:
        if n in wanted:
            x = out.detach().reshape(-1, out.shape[-1]).double()
            sums[n] = sums[n] + x.square().sum(0) if n in sums else x.square().sum(0)
            if n is last:
                run.stop()

    with torch.inference_mode():
        for i in range(batch.shape[0]):
            ResumableRun(gm, after=observe).run(batch[i : i + 1])
    return {n: sums[n.args[0]] for n in nodes if n.args[0] in sums}
