"""Text generation from a rewritten model, in torch (its own KV cache) or ONNX Runtime GenAI.

``generate(model, prompt, max_new_tokens)`` takes a :class:`~qgraph.model.Model`, a ``.pt2``
saved by ``qgraph run --save``, a model name or folder, or (``backend="ort"``) a folder written
by ``--export``; greedy by default, sampling with ``do_sample=True`` (temperature, top-k,
top-p, a seed). The torch backend decodes through :func:`qgraph.kv_cache.cached_decoder`, so
quantized layers, activation quantizers and online rotations run as qgraph's custom ops.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError, QGraphError
from .kv_cache import CachedDecoder, cached_decoder
from .model import Model

#: Longest prompt + continuation when the model does not say (SmolLM2's RoPE range).
DEFAULT_CONTEXT = 8192
BACKENDS = ("torch", "ort")


@dataclass
class Sampling:
    """How the next token is chosen: greedy unless ``do_sample``."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise QGraphError(f"temperature must be positive, got {self.temperature}")
        if self.top_k < 0:
            raise QGraphError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise QGraphError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """What a generation produced, and how fast."""

    tokens: list[int]  # the generated ids (not the prompt's)
    text: str | None
    prompt_tokens: int
    prompt_seconds: float  # the prefill, up to the first generated token
    seconds: float  # the whole generation
    tokens_per_s: float  # generated tokens after the first / their time (decode speed)
    backend: str
    cache_bytes: int | None = None  # the key/value cache at the end (torch backend)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def choose_next(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> int:
    """The next token from the last position's ``logits [vocab]``."""
    if not sampling.do_sample:
        return int(logits.argmax())
    scores = logits.double() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1:
        order = scores.argsort(descending=True)
        probs = scores[order].softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the top token always)
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        scores[order[drop]] = float("-inf")
    return int(torch.multinomial(scores.softmax(-1), 1, generator=gen))


def decode(
    decoder: CachedDecoder,
    ids: list[int],
    max_new_tokens: int,
    sampling: Sampling | None = None,
    eos: int | None = None,
) -> tuple[list[int], float, float, int]:
    """Prefill ``ids`` then generate; returns (new tokens, prefill seconds, total seconds, bytes
    of the final cache)."""
    sampling = sampling or Sampling()
    gen = None
    if sampling.do_sample:
        gen = torch.Generator().manual_seed(0 if sampling.seed is None else sampling.seed)
    past = decoder.layout.empty(1)
    step = torch.tensor([ids])
    mask = torch.ones_like(step)
    out: list[int] = []
    start = time.perf_counter()
    prefill = 0.0
    for _ in range(max_new_tokens):
        logits, past = decoder(step, mask, past)
        token = choose_next(logits[0, -1], sampling, gen)
        if not out:
            prefill = time.perf_counter() - start
        out.append(token)
        if token == eos:
            break
        step = torch.tensor([[token]])
        mask = torch.cat([mask, torch.ones_like(step)], 1)
    seconds = time.perf_counter() - start
    return out, prefill, seconds, sum(t.numel() * t.element_size() for t in past)


def generate(
    model: Model | str | os.PathLike,
    prompt: str | list[int],
    max_new_tokens: int = 32,
    *,
    sampling: Sampling | None = None,
    backend: str = "torch",
    stop_at_eos: bool = True,
) -> Generation:
    """Continue ``prompt`` (text, or token ids) by up to ``max_new_tokens`` tokens."""
    if backend not in BACKENDS:
        raise QGraphError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if max_new_tokens < 1:
        raise QGraphError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = sampling or Sampling()
    if backend == "ort":
        return _generate_genai(model, prompt, max_new_tokens, sampling, stop_at_eos)
    if not isinstance(model, Model):
        from .api import load

        model = load(model)
    tokenizer = model.tokenizer
    ids = _prompt_ids(prompt, tokenizer)
    context = getattr(model, "context_length", None) or DEFAULT_CONTEXT
    _check_length(len(ids), max_new_tokens, context)
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    decoder = cached_decoder(model)
    tokens, prefill, seconds, cache = decode(decoder, ids, max_new_tokens, sampling, eos)
    text = tokenizer.decode(tokens) if tokenizer is not None else None
    speed = _decode_speed(tokens, prefill, seconds)
    return Generation(tokens, text, len(ids), prefill, seconds, speed, "torch", cache)


def _prompt_ids(prompt: str | list[int], tokenizer) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise DataError("a text prompt needs the model's tokenizer; pass token ids instead")
        ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise DataError("the prompt is empty: give at least one token")
    return ids


def _check_length(prompt: int, new: int, context: int) -> None:
    if prompt + new > context:
        raise DataError(
            f"the prompt ({prompt} tokens) plus {new} new tokens exceed the model's context of "
            f"{context} tokens: shorten the prompt or ask for fewer tokens"
        )


def _decode_speed(tokens: list[int], prefill: float, seconds: float) -> float:
    """Tokens per second of the decode steps (after the first token, which the prefill made)."""
    steps = len(tokens) - 1
    return steps / (seconds - prefill) if steps > 0 and seconds > prefill else 0.0


def _generate_genai(
    folder: Any, prompt: str | list[int], max_new_tokens: int, sampling: Sampling, stop: bool
) -> Generation:
    """ONNX Runtime GenAI on an exported folder (``genai_config.json`` beside the model)."""
    if isinstance(folder, Model) or not Path(folder).is_dir():
        raise QGraphError(
            "backend 'ort' runs a folder written by 'qgraph run --export DIR/model.onnx' "
            f"(with genai_config.json); got {folder!r}"
        )
    config_path = Path(folder) / "genai_config.json"
    if not config_path.exists():
        raise QGraphError(
            f"{folder}: no genai_config.json, so it is not an exported decoder folder"
        )
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise QGraphError(
            "backend 'ort' needs onnxruntime-genai (pip install 'qgraph[genai]')"
        ) from exc
    config = json.loads(config_path.read_text())
    model = og.Model(str(folder))
    if isinstance(prompt, str):
        tokenizer = og.Tokenizer(model)
        ids = [int(t) for t in tokenizer.encode(prompt)]
    else:
        tokenizer = og.Tokenizer(model) if (Path(folder) / "tokenizer.json").exists() else None
        ids = [int(t) for t in prompt]
    if not ids:
        raise DataError("the prompt is empty: give at least one token")
    _check_length(len(ids), max_new_tokens, int(config["model"]["context_length"]))
    params = og.GeneratorParams(model)
    options: dict[str, Any] = {"max_length": len(ids) + max_new_tokens}
    if sampling.do_sample:
        options.update(
            do_sample=True,
            temperature=sampling.temperature,
            top_k=sampling.top_k or config["model"]["vocab_size"],
            top_p=sampling.top_p,
            random_seed=0 if sampling.seed is None else sampling.seed,
        )
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(np.array([ids], dtype=np.int32))
    tokens: list[int] = []
    prefill = 0.0
    eos = config["model"].get("eos_token_id") if stop else None
    while not generator.is_done() and len(tokens) < max_new_tokens:
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if not tokens:
            prefill = time.perf_counter() - start
        tokens.append(token)
        if eos is not None and token == eos:
            break
    seconds = time.perf_counter() - start
    text = tokenizer.decode(tokens) if tokenizer is not None else None
    return Generation(
        tokens, text, len(ids), prefill, seconds, _decode_speed(tokens, prefill, seconds), "ort"
    )
