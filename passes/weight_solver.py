"""The shared driver of passes that re-solve quantized weights layer by layer (gptq,
learn-rounding): walk the quantized linear layers in graph order, in groups that share an
input, hand each layer its float weight, its grid and the Hessian ``XᵀX`` of its input as the
current graph produces it, and write the solver's codes back before the run moves on."""

from __future__ import annotations

from collections.abc import Callable

import torch

from qgraph.calibration import (
    FloatStepRun,
    StepRun,
    calibration_rows,
    window_cross,
    window_hessian,
)
from qgraph.distributed import my_windows, sum_over_workers
from qgraph.errors import DataError, PipelineError
from qgraph.formats import to_storage
from qgraph.graph_edits import set_tensor
from qgraph.kernels.gptq import float_target_weights
from qgraph.memory import trim
from qgraph.model import Model
from qgraph.ops import drop_dequantized, reuse_dequantized
from qgraph.pass_manager import Pass, is_last_pass, working_on
from qgraph.progress import bar
from qgraph.quantized import ACT_QUANTIZERS, BoundLayer, QuantizedLayer
from qgraph.selection import LayerSelector

#: solve(record, float weight [out, in], hessian) -> (codes, scale, zero) in the kernels' layout
Solver = Callable[[QuantizedLayer, torch.Tensor, torch.Tensor], tuple]
#: solve_group(records, hessian, weights) -> one (codes, scale, zero) per record: layers sharing
#: an input solved together (they share the Hessian and everything derived from it), each towards
#: its weight ``[out, in]``. The Hessian is the group's own: the solver may overwrite it (gptq
#: factors it in place)
GroupSolver = Callable[[list[QuantizedLayer], torch.Tensor, list[torch.Tensor]], list[tuple]]


def check_solvable(p: Pass, model: Model) -> None:
    """Refuse before running what a re-solving pass cannot do, with the reason."""
    if model.calibration is None:
        raise DataError(f"{p.name}: needs calibration data (Model.set_calibration or --calib-text)")
    if p.opt("calib-windows") < 1:
        raise PipelineError(f"{p.name}: calib-windows must be >= 1, got {p.opt('calib-windows')}")
    chosen = _chosen(p, model)
    if not chosen:
        raise PipelineError(
            f"{p.name}: no quantized layer matches {LayerSelector.from_pass(p).describe()}"
        )
    missing = [b.name for b in chosen if b.record.float_weight is None]
    if missing:
        raise PipelineError(
            f"{p.name}: {len(missing)} layer(s) have no float weight to re-solve from "
            f"({missing[0]}, ...): save models with qgraph.save(model, path, float_weights=True) "
            "or 'qgraph run --save-float-weights' to re-solve them later"
        )


def _chosen(p: Pass, model: Model) -> list[BoundLayer]:
    return LayerSelector.from_pass(p).select(model.quantized.linear())


def solve_in_graph_order(
    model: Model,
    p: Pass,
    solve: Solver | None = None,
    solve_group: GroupSolver | None = None,
    float_target_damp: float | None = None,
) -> tuple[int, int]:
    """Run ``solve`` on every selected quantized layer (or ``solve_group`` on each group of
    layers that share an input); returns (groups, calibration tokens).

    Each layer is solved towards its float weight on its inputs as the quantized graph produces
    them. With ``float_target_damp``, the float model walks beside it (:class:`FloatStepRun`)
    and each layer is solved towards the float model's output instead: the weight handed to the
    solver is :func:`float_target_weights`'s (damped by that fraction of the Hessian's mean
    diagonal), whose error on the quantized inputs is the error against the float outputs up to
    a constant.

    The calibration windows walk the graph together, one interpreter each, from one group's
    input to the next (the sequential pipeline): what is alive is the windows' values at that
    cut plus one window's working set. With worker processes (:mod:`qgraph.distributed`) each
    runs its share of the windows and the Hessians are summed across them exactly."""
    if (solve is None) == (solve_group is None):
        raise ValueError("give exactly one of solve and solve_group")
    batch = model.calibration[: calibration_rows(model, p, "calib-windows")]
    gm = model.gm
    chosen = {id(b) for b in _chosen(p, model)}
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups = [[b for b in g if id(b) in chosen] for g in model.quantized.groups()]
    groups = sorted((g for g in groups if g), key=lambda g: position[g[0].node])
    lo, hi = my_windows(batch.shape[0])
    release = not model.keep_float_weights and is_last_pass()
    progress = bar(total=len(groups), desc=p.name, unit="group", leave=False)
    with torch.inference_mode(), reuse_dequantized():
        runs = [StepRun(gm, batch[i : i + 1]) for i in range(lo, hi)]
        float_weights, floats = {}, []
        if float_target_damp is not None:
            float_weights = {
                b.node: b.record.float_weight
                for b in model.quantized.linear()
                if b.record.float_weight is not None
            }
            floats = [FloatStepRun(gm, float_weights, batch[i : i + 1]) for i in range(lo, hi)]
        done: list[BoundLayer] = []  # solved, float weights still read by the float runs
        quantizers = {
            g[0].node.args[0] for g in groups if g[0].node.args[0].target in ACT_QUANTIZERS
        }
        for run in runs if floats else ():
            run.keep = {q.args[0] for q in quantizers}  # the inputs of activation quantizers
        for group in groups:
            node = group[0].node
            for run in (*runs, *floats):
                run.advance(node)
            if release:  # nothing after this pass re-solves: the float twins can go now
                _release(done, float_weights)
            drop_dequantized()  # every window is past those layers: free them for the solve
            xs = [run.env[node.args[0]] for run in runs]
            h = sum_over_workers(window_hessian(xs), batch.shape[0])
            targets = [layer.record.float_weight for layer in group]
            if floats:
                # a layer whose input is activation-quantized is aimed at the float output
                # from the quantizer's input: the correction covers the error upstream, not
                # the rounding of its own activations (which it cannot undo)
                source = node.args[0].args[0] if node.args[0] in quantizers else node.args[0]
                bases = [run.env[source] for run in runs]
                cross = window_cross(xs, [run.env[node.args[0]] for run in floats], bases)
                del bases
                for run in runs:
                    run.forget(source)
                cross = sum_over_workers(cross, batch.shape[0])
                targets = float_target_weights(targets, h, cross, float_target_damp)
                del cross
            del xs
            trim()  # the Hessian's partial sums, before the solver's peak
            _solve_group(p, gm, group, h, targets, runs, solve, solve_group)
            del h, targets
            if release and floats:  # the float runs read the group's weights when they pass it
                done = group
            elif release:
                _release(group, float_weights)
            trim()  # the group's Hessian and solver temporaries go back to the system
            progress.update(1)
        del runs, floats  # nothing after the last layer needs the calibration batch
        if release:
            _release(done, float_weights)
    progress.close()
    gm.recompile()
    if release:
        model.properties.discard("float-weights")
    return len(groups), int(batch.numel())


def _release(layers: list[BoundLayer], float_weights: dict) -> None:
    """Drop the float weights of solved layers (the float runs are past them)."""
    for layer in layers:
        layer.record.float_weight = None
        float_weights.pop(layer.node, None)


def _solve_group(p, gm, group, h, targets, runs, solve, solve_group) -> None:
    """Solve one group's layers from Hessian ``h`` and write their codes into the graph (and
    into every window's run, which read the old tensors when it passed their get_attr)."""
    if solve_group is not None:
        with working_on(", ".join(layer.record.name for layer in group)):
            solved = solve_group([layer.record for layer in group], h, targets)
    else:
        solved = []
        for layer, weight in zip(group, targets, strict=True):
            with working_on(layer.record.name):
                solved.append(solve(layer.record, weight, h))
    for layer, (codes, scale, zero) in zip(group, solved, strict=True):
        rec = layer.record
        stored = to_storage(codes, scale, zero, rec.weight).tensors()
        for arg, value in zip(layer.node.args[1:4], stored, strict=True):
            set_tensor(gm, arg.target, value)
            arg.meta["val"] = value
            for run in runs:
                run.refresh_attr(arg)
        rec.solver = p.name
