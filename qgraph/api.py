"""The small public API: load a model, build a pipeline, run it."""

from __future__ import annotations

import os

import torch

from .data import load_text, token_windows
from .errors import DataError
from .loaders import load_causal_lm
from .model import Model
from .pass_manager import Pass, PassManager
from .trace import trace, trace_causal_lm


def load(spec: str | os.PathLike | None = None, tokenizer=None) -> Model:
    """A causal LM as a qgraph Model: a built-in name (default ``smollm2-135m``), a ``.gguf`` file
    or a Hugging Face directory. The graph maps ``input_ids [batch, seq]`` to ``logits``.
    A ``.pt2`` file written by :func:`qgraph.save` is loaded as saved (pass its ``tokenizer``)."""
    if spec is not None and str(spec).endswith(".pt2"):
        from .saving import load_saved

        return load_saved(spec, tokenizer)
    if spec is not None and str(spec).endswith(".onnx"):
        return from_onnx(spec)
    lm = load_causal_lm(spec)
    gm = trace_causal_lm(lm.model)
    example = (torch.zeros((2, 16), dtype=torch.long),)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=8192)
    return Model(
        gm,
        example,
        name=lm.name,
        source=lm.source,
        tokenizer=lm.tokenizer,
        dynamic_shapes={"input_ids": {0: batch, 1: seq}},
    )


def from_module(
    module: torch.nn.Module,
    example_inputs: tuple,
    *,
    dynamic_shapes=None,
    name: str | None = None,
    input_names: tuple[str, ...] | None = None,
) -> Model:
    """Trace any ``nn.Module`` (with example inputs) into a Model. The module is not modified."""
    gm = trace(module, example_inputs, dynamic_shapes)
    names = input_names or tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    return Model(
        gm,
        example_inputs,
        name=name or type(module).__name__,
        dynamic_shapes=dynamic_shapes,
        input_names=names,
    )


def from_onnx(
    path: str | os.PathLike, example_inputs: tuple[torch.Tensor, ...] | None = None
) -> Model:
    """An ONNX model as a qgraph Model: the same passes run on it and ``export`` writes ONNX.

    Dims the file leaves dynamic stay dynamic where torch.export can keep them. Inputs with
    dynamic dims other than a leading batch dim need ``example_inputs`` (one tensor per input,
    shaped as one call of the model) to fix their sizes for tracing.
    """
    from .onnx_import import OnnxModule, dynamic_dims, input_specs, read_onnx
    from .onnx_import import example_inputs as make_examples

    proto = read_onnx(path)
    name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    specs = input_specs(proto)
    examples = make_examples(specs, example_inputs, name)
    dynamic = dynamic_dims(specs)
    # a dynamic dim of size 1 would be specialized to 1 by torch.export: trace with 2
    examples = tuple(
        e.repeat(2, *([1] * (e.dim() - 1))) if 0 in dyn and e.shape[0] == 1 else e
        for e, dyn in zip(examples, dynamic, strict=True)
    )
    module = OnnxModule(proto, name)
    outputs = tuple(v.name for v in proto.graph.output)
    del proto
    gm = trace(module, examples, (dynamic,))  # forward(*args): one entry for args
    return Model(
        gm,
        examples,
        name=name,
        source=os.fspath(path),
        dynamic_shapes=dynamic,
        input_names=tuple(s.name for s in specs),
        output_names=outputs,
    )


def from_hf(lm: torch.nn.Module, tokenizer=None, name: str | None = None) -> Model:
    """Wrap an in-memory Hugging Face causal LM (traced with dynamic batch and sequence)."""
    gm = trace_causal_lm(lm)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=8192)
    return Model(
        gm,
        (torch.zeros((2, 16), dtype=torch.long),),
        name=name or type(lm).__name__,
        tokenizer=tokenizer,
        dynamic_shapes={"input_ids": {0: batch, 1: seq}},
    )


def calibration_windows(
    model: Model, source=None, windows: int = 16, length: int = 512
) -> torch.Tensor:
    """Token windows of the calibration split (disjoint from the evaluation split)."""
    return token_windows(_tokenizer(model), load_text(source, "calib"), length, windows)


def eval_windows(model: Model, source=None, windows: int = 16, length: int = 512) -> torch.Tensor:
    """Token windows of the evaluation split."""
    return token_windows(_tokenizer(model), load_text(source, "eval"), length, windows)


def _tokenizer(model: Model):
    if model.tokenizer is None:
        raise DataError(
            f"model {model.name!r} has no tokenizer, so text cannot be turned into tokens: pass "
            "tokenizer= to qgraph.load/from_hf, or give token windows to Model.set_calibration"
        )
    return model.tokenizer


def run_pipeline(model: Model, pipeline: str | list[Pass], **kw) -> Model:
    """Apply ``pipeline`` to ``model`` (in place on the qgraph Model, never on the user's module)."""
    return PassManager(pipeline, **kw).run(model)
