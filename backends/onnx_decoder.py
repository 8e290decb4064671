"""Export a language model as a decoder with a key/value cache that ONNX Runtime GenAI runs.

The folder holds ``model.onnx`` (and ``model.onnx.data`` for large models), ``genai_config.json``
and the tokenizer files, the layout of ONNX Runtime GenAI's own model builder, so that
``onnxruntime_genai.Model(folder)`` generates with it unchanged. The graph is
:func:`qgraph.kv_cache.cached_decoder` of the rewritten model, lowered by the same exporter as
every qgraph file (quantized weights as ``MatMulNBits``, online rotations as Hadamard functions).
Inputs ``input_ids [batch_size, sequence_length]``, ``attention_mask [batch_size,
total_sequence_length]`` and ``past_key_values.{i}.key/value [batch_size, kv_heads,
past_sequence_length, head_size]``; outputs ``logits`` and ``present.{i}.key/value``.
Norms, rotary embeddings and attention are one node each (:mod:`qgraph.fuse_decoder`), or
standard ops with ``fused=False``. Attention is ``GroupQueryAttention`` by default: GenAI then
preallocates one cache buffer per tensor that the graph writes in place
(``past_present_share_buffer``), measured 0.5–0.6× the time of the opset-23 ``Attention``,
which grows the cache by concatenation (``attention="standard"``; it also takes left padding).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from qgraph.errors import ExportError
from qgraph.fuse_decoder import ATTENTIONS, fuse_decoder
from qgraph.kv_cache import CacheLayout, cached_decoder
from qgraph.model import Model

from .onnx_backend import export_metadata, provenance
from .onnx_export import export_onnx
from .onnx_fused import OPSET as FUSED_OPSET

MODEL_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"


def _dims(layout: CacheLayout) -> tuple[dict[str, dict[int, str]], dict[str, dict[int, str]]]:
    """Names of the dynamic axes of every input and output."""
    cache_in = {0: "batch_size", 2: "past_sequence_length"}
    cache_out = {0: "batch_size", 2: "total_sequence_length"}
    inputs = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        **{name: cache_in for name in layout.names()},
    }
    outputs = {
        "logits": {0: "batch_size", 1: "sequence_length"},
        **{name: cache_out for name in layout.output_names()},
    }
    return inputs, outputs


def genai_config(
    model: Model,
    layout: CacheLayout,
    vocab: int,
    context: int,
    filename: str = MODEL_FILE,
    share_buffer: bool = False,
) -> dict[str, Any]:
    """The ``genai_config.json`` of a decoder-only model.

    ``share_buffer``: the graph's attention writes new keys and values in place
    (``GroupQueryAttention``), so GenAI binds one ``max_length`` buffer per cache tensor as
    both past and present; otherwise the graph returns the concatenated cache."""
    sv = model.structure
    att = sv.attention[0]
    tok = model.tokenizer
    bos = getattr(tok, "bos_token_id", None)
    eos = getattr(tok, "eos_token_id", None)
    pad = getattr(tok, "pad_token_id", None)
    eos = 0 if eos is None else eos
    return {
        "model": {
            "bos_token_id": 0 if bos is None else bos,
            "context_length": context,
            "eos_token_id": eos,
            "pad_token_id": eos if pad is None else pad,
            "type": "llama",
            "vocab_size": vocab,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": layout.head_dim,
                "hidden_size": int(sv.residual.hidden),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": att.num_heads,
                "num_hidden_layers": layout.layers,
                "num_key_value_heads": layout.kv_heads,
            },
        },
        "search": {
            "do_sample": False,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def export_decoder(
    model: Model,
    folder: str | os.PathLike,
    pipeline: str = "",
    context_length: int | None = None,
    external_data: bool | None = None,
    filename: str = MODEL_FILE,
    integer_activations: bool = False,
    fused: bool = True,
    attention: str = "gqa",
    pack_qkv: bool = True,
) -> Path:
    """Write ``model`` as a cached decoder folder for ONNX Runtime GenAI; returns the folder.

    ``fused`` lowers norms, rotary embeddings and attention to one node each
    (:mod:`qgraph.fuse_decoder`); ``False`` keeps them as standard ops at opset 21.
    ``attention`` (fused files only): ``"gqa"``, ONNX Runtime's ``GroupQueryAttention``
    writing into a cache buffer that GenAI shares between past and present (the fastest step;
    padding must be on the right, or none, as in the GenAI builder's files), or
    ``"standard"``, the opset-23 ``Attention`` with a general mask (left padding too) and a
    cache grown by concatenation. ``pack_qkv`` (with ``"gqa"``) runs quantized q/k/v
    projections on one input as one packed layer (one ``MatMulNBits`` instead of three, as the
    GenAI builder's files do); its weight nodes name the three layers and their output columns
    (``qgraph.packed_layers``), so provenance and the per-layer ONNX report still see each.

    ``filename`` names the model file (``genai_config.json`` points at it); the config and the
    tokenizer files always keep their fixed names, so one folder holds one model.

    Files are written into a temporary folder beside ``folder`` and moved in one by one, the
    model file last, so a failed export never leaves a folder whose model and config disagree.
    """
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise ExportError(f"export to {target}: it exists and is not a folder")
    if not target.parent.is_dir():
        raise ExportError(f"export to {target}: folder {target.parent} does not exist")
    # GenAI allocates one float tensor per key and value: a quantized cache (int8 codes, scales
    # and zeros) has no place in its layout, so the file caches the dequantized values
    decoder = cached_decoder(model, quantized_cache=False)
    layout = decoder.layout
    metadata = export_metadata(model, pipeline)
    if attention not in ATTENTIONS:
        raise ExportError(f"attention must be one of {', '.join(ATTENTIONS)}; got {attention!r}")
    share_buffer = False  # only a fused file's GroupQueryAttention writes in place
    context = context_length or getattr(model, "context_length", None) or 2048
    if fused:  # GroupQueryAttention's rotary tables cover every position GenAI may reach
        counts = fuse_decoder(
            decoder.gm, attention=attention, rope_positions=context, pack_qkv=pack_qkv
        )
        metadata["qgraph.fused_ops"] = json.dumps(counts.as_dict())
        share_buffer = counts.group_query == layout.layers
    example = _example_inputs(layout)
    with torch.no_grad():
        vocab = int(decoder.gm(*example)[0].shape[-1])
    dynamic = torch.export.Dim.DYNAMIC
    shapes = (
        {0: dynamic, 1: dynamic},
        {0: dynamic, 1: dynamic},
        *[{0: dynamic, 2: dynamic} for _ in layout.names()],
    )
    in_dims, out_dims = _dims(layout)
    target.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        staging = Path(tmp)
        export_onnx(
            decoder.gm,
            example,
            staging / filename,
            dynamic_shapes=shapes,
            input_names=["input_ids", "attention_mask", *layout.names()],
            output_names=["logits", *layout.output_names()],
            metadata=metadata,
            external_data=external_data,
            dim_names={**in_dims, **out_dims},
            integer_activations=integer_activations,
            node_metadata=_with_packed(provenance(model), counts.packed if fused else {}),
            opset=FUSED_OPSET if fused else 21,
        )
        config = genai_config(model, layout, vocab, context, filename, share_buffer)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if model.tokenizer is not None and hasattr(model.tokenizer, "save_pretrained"):
            model.tokenizer.save_pretrained(staging)
        files = sorted(staging.iterdir(), key=lambda p: p.name == filename)
        for path in files:  # the model file last: it is what makes the folder usable
            os.replace(path, target / path.name)
    return target


def _with_packed(
    metadata: dict[str, dict[str, str]], packed: dict[str, list[tuple[str, int, int]]]
) -> dict[str, dict[str, str]]:
    """``metadata`` (:func:`provenance`) plus an entry for each packed q/k/v layer: the passes
    of its parts, ``qgraph.layer`` their names joined by ``+`` (for people) and
    ``qgraph.packed_layers`` each part's ``[layer, first column, end column]`` (for
    :mod:`~qgraph.backends.onnx_layer_capture`, which splits the packed output)."""
    out = dict(metadata)
    for codes, parts in packed.items():
        props = [metadata.get(part.replace(".", "_"), {}) for part, _, _ in parts]
        layers = [p.get("qgraph.layer") for p in props]
        passes = [x for p in props for x in p.get("qgraph.passes", "").split(",") if x]
        entry = {"qgraph.passes": ",".join(dict.fromkeys(passes))}
        if all(layers):
            entry["qgraph.layer"] = "+".join(layers)
            spans = [[layer, a, b] for layer, (_, a, b) in zip(layers, parts, strict=True)]
            entry["qgraph.packed_layers"] = json.dumps(spans)
        out[codes.replace(".", "_")] = entry
    return out


def has_attention(model: Model) -> bool:
    """Whether ``model`` is a decoder that :func:`export_decoder` can give a cache (its attention
    is ``scaled_dot_product_attention``, where the cache is spliced in)."""
    attention = model.structure.attention
    return bool(attention) and not any(a.decomposed for a in attention)


def _example_inputs(layout: CacheLayout) -> tuple[torch.Tensor, ...]:
    """Batch 2, 3 new tokens after 2 cached ones: every dynamic axis distinct and above 1."""
    ids = torch.zeros((2, 3), dtype=torch.long)
    mask = torch.ones((2, 5), dtype=torch.long)
    past = [torch.zeros(2, layout.kv_heads, 2, layout.head_dim) for _ in layout.names()]
    return (ids, mask, *past)
