"""The torch backend: the rewritten graph runs as it is (``Model.__call__`` gives logits,
:func:`qgraph.evaluate.perplexity` takes the model directly); this adds text generation."""

from __future__ import annotations

import torch

from qgraph.evaluate import greedy_generate
from qgraph.model import Model


def generate(model: Model, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation of ``prompt`` with the model's tokenizer."""
    if model.tokenizer is None:
        raise ValueError("generate needs a model with a tokenizer")
    ids = torch.tensor([model.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = greedy_generate(model, ids, max_new_tokens)
    return model.tokenizer.decode(out[0, ids.shape[1] :].tolist())
