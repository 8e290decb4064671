"""Shared builders for the tests: tiny random models of each family, token batches, error checks.

Fixtures wrapping these live in ``conftest.py``; a test that needs a variant calls the builder
directly (``from helpers import tiny_llama``). Every builder seeds the global RNG before it
builds, so a model never depends on which tests ran before it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import qgraph

#: γ range of the exactness models' random norms (wide, so that fusing γ matters).
EXACT_NORMS = (0.25, 1.75)
#: (batch, length) of the probe inputs of the exactness checks (dynamic batch and sequence).
PROBE_SHAPES = ((1, 2), (1, 7), (3, 16), (2, 29), (1, 48))


# ---------------------------------------------------------------------------- models


def seeded(model_cls, config, seed: int = 0) -> torch.nn.Module:
    """``model_cls(config)`` in eval mode, built right after ``torch.manual_seed(seed)`` (any
    Hugging Face family: the initialisation draws from the global RNG)."""
    torch.manual_seed(seed)
    return model_cls(config).eval()


def randomize_norms(
    hf: torch.nn.Module,
    seed: int,
    low: float = 0.5,
    high: float = 1.5,
    bias_std: float = 0.1,
) -> None:
    """Random norm scales γ ~ U[low, high) and norm shifts β ~ N(0, bias_std²), drawn in
    parameter order from one generator seeded with ``seed``, so that fusing them matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" not in name:
                continue
            if name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=gen) * (high - low) + low)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * bias_std)


def randomize_biases(hf: torch.nn.Module, seed: int, std: float, norms: bool = False) -> None:
    """Biases ~ N(0, std²) (the norms' too when ``norms``), in parameter order from one
    generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") and (norms or "norm" not in name):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def tiny_llama(
    *,
    vocab: int = 256,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    tied: bool = True,
    seed: int = 0,
    init: float = 0.02,
    max_positions: int = 256,
    random_norms: bool = False,
    norm_seed: int | None = None,
    norm_range: tuple[float, float] = (0.5, 1.5),
) -> LlamaForCausalLM:
    """A random LlamaForCausalLM (eval mode), seeded; ``random_norms`` gives its norms random γ
    in ``norm_range`` (generator seed ``norm_seed``, default ``seed + 100``) so that norm
    fusion and rotations have something to be exact about."""
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        tie_word_embeddings=tied,
        max_position_embeddings=max_positions,
        initializer_range=init,
    )
    hf = seeded(LlamaForCausalLM, cfg, seed)
    if random_norms:
        randomize_norms(hf, seed + 100 if norm_seed is None else norm_seed, *norm_range)
    return hf


def exact_llama(**overrides) -> LlamaForCausalLM:
    """The exactness tests' Llama: vocab 128, hidden 96, 4 heads / 2 KV heads of 24, MLP 192,
    tied, init 0.05, random γ ∈ [0.25, 1.75) (generator seed + 100); keywords override."""
    options = dict(
        vocab=128,
        hidden=96,
        intermediate=192,
        head_dim=24,
        init=0.05,
        random_norms=True,
        norm_range=EXACT_NORMS,
    )
    return tiny_llama(**{**options, **overrides})


def tiny_opt(
    *,
    vocab: int = 128,
    hidden: int = 96,
    ffn: int | None = None,
    heads: int = 4,
    layers: int = 2,
    seed: int = 0,
    init: float = 0.05,
    max_positions: int = 128,
    random_norms: bool = False,
    norm_seed: int | None = None,
    norm_range: tuple[float, float] = (0.5, 1.5),
    bias_std: float = 0.0,
    bias_seed: int | None = None,
    norm_biases: bool = False,
) -> OPTForCausalLM:
    """A random pre-LN OPTForCausalLM with linear biases (eval mode), seeded. ``random_norms``:
    γ in ``norm_range`` and β ~ N(0, 0.1²) (seed ``norm_seed``, default ``seed + 100``);
    ``bias_std``: the linear biases (also the norms' with ``norm_biases``) ~ N(0, bias_std²)
    (seed ``bias_seed``, default ``seed + 200``), applied after the norms."""
    cfg = OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        ffn_dim=ffn or 2 * hidden,
        num_attention_heads=heads,
        word_embed_proj_dim=hidden,
        do_layer_norm_before=True,
        num_hidden_layers=layers,
        max_position_embeddings=max_positions,
        enable_bias=True,
        init_std=init,
    )
    hf = seeded(OPTForCausalLM, cfg, seed)
    if random_norms:
        randomize_norms(hf, seed + 100 if norm_seed is None else norm_seed, *norm_range)
    if bias_std:
        randomize_biases(hf, seed + 200 if bias_seed is None else bias_seed, bias_std, norm_biases)
    return hf


def exact_opt(seed: int = 0) -> OPTForCausalLM:
    """The exactness tests' OPT: hidden 96, FFN 192, random γ ∈ [0.25, 1.75) and β, linear
    biases ~ N(0, 0.05²) so that β folding and bias rotation matter."""
    return tiny_opt(seed=seed, random_norms=True, norm_range=EXACT_NORMS, bias_std=0.05)


def calibrated(
    hf: torch.nn.Module, vocab: int = 256, windows: int = 4, length: int = 32
) -> qgraph.Model:
    """``hf`` traced into a qgraph Model with seeded random calibration windows."""
    model = qgraph.from_hf(hf)
    model.set_calibration(tokens(vocab, windows, length, seed=1))
    return model


_TRACED: dict[int, tuple[torch.nn.Module, qgraph.Model]] = {}


def traced_copy(hf: torch.nn.Module) -> qgraph.Model:
    """``qgraph.from_hf(hf)`` as a fresh copy of one trace per module and test process: tracing
    takes seconds on a small CPU and most test models are session fixtures traced again and
    again. Weights of the copy no longer share storage with ``hf``."""
    hit = _TRACED.get(id(hf))
    if hit is None or hit[0] is not hf:
        hit = _TRACED[id(hf)] = (hf, qgraph.from_hf(hf))
    return fresh_copy(hit[1])


def fresh_copy(model: qgraph.Model) -> qgraph.Model:
    """A deep copy to rewrite (the cached analyses are dropped first, not copied)."""
    model.invalidate()
    return copy.deepcopy(model)


# ---------------------------------------------------------------------------- tokens


def tokens(vocab: int, batch: int = 2, length: int = 32, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids [batch, length]."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def token_batches(vocab: int, shapes: Sequence[tuple[int, int]], seed: int) -> list[torch.Tensor]:
    """Random token ids of each shape, drawn one after the other from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, shape, generator=gen) for shape in shapes]


def probe_inputs(vocab: int, seed: int = 1) -> list[torch.Tensor]:
    """The exactness probes: token batches of every shape in ``PROBE_SHAPES``."""
    return token_batches(vocab, PROBE_SHAPES, seed)


# ---------------------------------------------------------------------------- errors


def hf_logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The Hugging Face module's logits, without a KV cache."""
    with torch.no_grad():
        return hf(input_ids=ids, use_cache=False).logits


def logits_rel_err(model: qgraph.Model, hf: torch.nn.Module, ids: torch.Tensor) -> float:
    """‖model(ids) − hf(ids)‖ / ‖hf(ids)‖ on the logits."""
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
    return float((model(ids) - ref).norm() / ref.norm())


def _f64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().double()
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def max_rel_err(actual, expected) -> float:
    """max |actual − expected| / max |expected|, in float64 (tensors or arrays)."""
    actual, expected = _f64(actual), _f64(expected)
    return float((actual - expected).abs().max() / expected.abs().max())


def assert_exact(hf: torch.nn.Module, model: qgraph.Model, vocab: int, tol: float = 1e-4) -> None:
    """The model's logits equal the Hugging Face module's on every probe input, to ``tol`` in
    max|Δlogit| / max|logit|."""
    for ids in probe_inputs(vocab):
        ref = hf_logits(hf, ids)
        out = model(ids)
        assert out.shape == ref.shape
        err = max_rel_err(out, ref)
        assert err <= tol, f"input {tuple(ids.shape)}: max|Δlogit|/max|logit| = {err:.3g}"


def raises_naming(error: type[Exception], *fragments: str):
    """``pytest.raises`` that also checks the message names every fragment (case-sensitive)."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(error)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            missing = [f for f in fragments if f not in message]
            assert not missing, f"{missing} not in the error message: {message}"
            return handled

    return _Check()


def genai_greedy(folder, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy tokens (prompt included) of the real client, ``onnxruntime_genai``, on a folder."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.numpy().astype("int32"))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]
