"""The torch backend: run the rewritten graph (with qgraph's custom ops) for logits,
perplexity and greedy generation."""

from __future__ import annotations

import torch

from qgraph.evaluate import greedy_generate, perplexity
from qgraph.model import Model


def logits(model: Model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids)


def model_perplexity(
    model: Model, windows: torch.Tensor, progress: bool = False, desc: str = "eval"
) -> float:
    return perplexity(model, windows, progress=progress, desc=desc)


def generate(model: Model, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation of ``prompt`` with the model's tokenizer."""
    if model.tokenizer is None:
        raise ValueError("generate needs a model with a tokenizer")
    ids = torch.tensor([model.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = greedy_generate(model, ids, max_new_tokens)
    return model.tokenizer.decode(out[0, ids.shape[1] :].tolist())
