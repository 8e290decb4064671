"""Tests for qgraph.data (text sources, token windows) and qgraph.evaluate (perplexity)."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
from helpers import raises_naming, tokens

from qgraph.data import (
    check_finite,
    load_text,
    sample_windows,
    stdlib_docstring_text,
    token_windows,
)
from qgraph.errors import DataError
from qgraph.evaluate import greedy_generate, perplexity, window_nll

# ---------------------------------------------------------------- stdlib text


def test_stdlib_text_nonempty_deterministic_and_long_enough() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calib = stdlib_docstring_text("calib")
        evl = stdlib_docstring_text("eval")
    # ~4 chars/token: 32 windows of 512 tokens need ~70k chars; demand a wide margin.
    assert len(evl) >= 120_000
    assert len(calib) >= 100_000
    stdlib_docstring_text.cache_clear()
    assert stdlib_docstring_text("calib") == calib
    assert stdlib_docstring_text("eval") == evl
    assert load_text(None, "eval") == evl
    assert load_text("stdlib", "calib") == calib


def test_stdlib_splits_are_disjoint() -> None:
    calib = stdlib_docstring_text("calib")
    evl = stdlib_docstring_text("eval")
    long_paras = {p.strip() for p in evl.split("\n\n") if len(p.strip()) >= 200}
    assert len(long_paras) > 50
    leaked = [p for p in long_paras if p in calib]
    assert not leaked, leaked[:3]


def test_stdlib_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        stdlib_docstring_text("train")


# ---------------------------------------------------------------- load_text


def test_load_text_roundtrip(tmp_path) -> None:
    text = "héllo wörld\r\nsecond line ✓\n"
    f = tmp_path / "t.txt"
    f.write_bytes(text.encode("utf-8"))
    assert load_text(f, "eval") == text
    assert load_text(str(f), "calib") == text


@pytest.mark.parametrize("kind", ["missing", "directory", "bad_utf8", "empty", "blank"])
def test_load_text_errors(tmp_path, kind: str) -> None:
    path = tmp_path / "data.txt"
    if kind == "directory":
        path.mkdir()
    elif kind == "bad_utf8":
        path.write_bytes(b"ok text \xff\xfe broken")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "blank":
        path.write_bytes(b" \n\t\n")
    with pytest.raises(DataError) as info:
        load_text(path, "eval")
    assert str(path) in str(info.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs non-root POSIX")
def test_load_text_unreadable(tmp_path) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("text")
    path.chmod(0)
    try:
        with pytest.raises(DataError, match="cannot be read"):
            load_text(path, "eval")
    finally:
        path.chmod(0o600)


# ---------------------------------------------------------------- token_windows


class OrdTokenizer:
    """Not callable, only ``encode``: exercises the fallback path."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_token_windows_exact() -> None:
    text = "abcdefghij"  # 10 tokens -> 3 windows of 3, tail "j" dropped
    w = token_windows(OrdTokenizer(), text, window=3)
    assert w.dtype == torch.long
    expected = [[97, 98, 99], [100, 101, 102], [103, 104, 105]]
    assert w.tolist() == expected
    assert token_windows(OrdTokenizer(), text, window=3, max_windows=2).tolist() == expected[:2]
    assert token_windows(OrdTokenizer(), text, window=10).tolist() == [list(range(97, 107))]


def test_token_windows_too_short() -> None:
    with pytest.raises(DataError, match=r"7 tokens.*8"):
        token_windows(OrdTokenizer(), "abcdefg", window=8)


def test_sample_windows_is_seeded_without_replacement_in_text_order() -> None:
    windows = torch.arange(40).reshape(20, 2)
    a, b, c = (sample_windows(windows, 6, seed) for seed in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for s in (a, c):
        firsts = s[:, 0].tolist()
        assert firsts == sorted(set(firsts)) and len(firsts) == 6  # distinct rows, in order
        assert all(torch.equal(windows[f // 2], row) for f, row in zip(firsts, s, strict=True))
    assert torch.equal(sample_windows(windows, 20, 3), windows)
    with pytest.raises(DataError, match="21 calibration windows from 20"):
        sample_windows(windows, 21, 0)


def test_token_windows_hf_tokenizer_no_length_warning(capfd) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate("abcdefghij")}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=4)
    capfd.readouterr()
    w = token_windows(tok, "abcdefghij" * 2, window=4)
    assert w.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10]]
    captured = capfd.readouterr()
    assert "longer than the specified maximum" not in captured.err + captured.out


# ---------------------------------------------------------------- check_finite


def test_check_finite() -> None:
    check_finite("ok", torch.randn(3, 4))
    check_finite("ints", torch.arange(5))
    t = torch.zeros(2, 3)
    t[1, 2] = float("nan")
    t[0, 1] = float("inf")
    with raises_naming(DataError, "layer.weight", "1 NaN", "1 Inf", "(0, 1)"):
        check_finite("layer.weight", t)


# ---------------------------------------------------------------- perplexity


def bigram_forward(table: np.ndarray):
    """Logits of position t depend only on token t: a bigram model with a fixed table."""

    def forward(ids: torch.Tensor) -> np.ndarray:
        return table[ids.numpy()]  # numpy output, like ONNX Runtime

    return forward


def reference_mean_nll(table: np.ndarray, windows: np.ndarray) -> float:
    total, count = 0.0, 0
    for row in windows:
        for prev, nxt in zip(row[:-1], row[1:], strict=True):
            z = table[prev].astype(np.float64)
            log_z = np.log(np.sum(np.exp(z - z.max()))) + z.max()
            total += log_z - z[nxt]
            count += 1
    return total / count


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_perplexity_matches_bigram_reference(batch_size: int) -> None:
    rng = np.random.default_rng(0)
    vocab = 11
    table = rng.normal(scale=3.0, size=(vocab, vocab)).astype(np.float32)
    windows = rng.integers(0, vocab, size=(5, 9))
    ppl = perplexity(bigram_forward(table), torch.from_numpy(windows), batch_size=batch_size)
    assert ppl == pytest.approx(math.exp(reference_mean_nll(table, windows)), rel=1e-5)
    total, count = window_nll(bigram_forward(table), torch.from_numpy(windows), batch_size)
    assert count == 5 * 8
    assert total / count == pytest.approx(reference_mean_nll(table, windows), rel=1e-5)


def test_uniform_model_perplexity_is_vocab_size() -> None:
    vocab = 37

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, vocab)

    windows = tokens(vocab, 4, 16, seed=1)
    assert perplexity(forward, windows, batch_size=3, progress=False) == pytest.approx(
        vocab, rel=1e-6
    )


def test_nan_logits_raise_with_window_index() -> None:
    def forward(ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape, 5)
        out[ids[:, 0] == 3] = float("nan")  # only window 2 starts with token 3
        return out

    windows = torch.tensor([[0, 1, 2], [1, 2, 3], [3, 4, 0], [2, 2, 2]])
    with pytest.raises(DataError, match="window 2"):
        perplexity(forward, windows, batch_size=2)


def test_log_probs_in_chunks_equal_one_call(monkeypatch) -> None:
    """Log-probabilities a few positions at a time give the bit-identical total of one call."""
    import qgraph.evaluate as ev

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 150, 97, generator=gen) * 4
    windows = torch.randint(0, 97, (3, 150), generator=gen)

    logp = torch.log_softmax(logits, dim=-1)
    want = -logp[:, :-1].gather(-1, windows[:, 1:].unsqueeze(-1)).squeeze(-1).double().sum()
    for positions in (7, 64, 149, 1000):
        monkeypatch.setattr(ev, "LOGP_POSITIONS", positions)
        total, count = window_nll(lambda ids: logits, windows, batch_size=3)
        assert (total, count) == (float(want), 3 * 149)


def test_nan_at_the_last_position_still_raises(monkeypatch) -> None:
    """The last position predicts no token but its log-probabilities are still checked."""
    import qgraph.evaluate as ev

    monkeypatch.setattr(ev, "LOGP_POSITIONS", 4)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape, 5)
        out[1, -1] = float("nan")
        return out

    with pytest.raises(DataError, match="window 1"):
        perplexity(forward, torch.zeros(2, 9, dtype=torch.long), batch_size=2)


def test_bad_logits_shape_raises() -> None:
    with pytest.raises(DataError, match="shape"):
        perplexity(lambda ids: torch.zeros(ids.shape[0], 5), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- greedy_generate


def test_greedy_generate_counts_up() -> None:
    vocab = 7
    calls: list[int] = []

    def forward(ids: torch.Tensor) -> torch.Tensor:
        calls.append(ids.shape[1])
        return torch.nn.functional.one_hot((ids + 1) % vocab, vocab).float()

    out = greedy_generate(forward, torch.tensor([[2, 4]]), max_new_tokens=5)
    assert out.tolist() == [[2, 4, 5, 6, 0, 1, 2]]
    assert calls == [2, 3, 4, 5, 6]  # no KV cache: the whole prefix is re-run each step
    assert greedy_generate(forward, torch.tensor([[3]]), 0).tolist() == [[3]]
