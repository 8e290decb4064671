"""Perplexity and greedy generation over any forward function.

Everything here takes a plain ``forward(input_ids) -> logits`` callable, so the same code scores a
PyTorch module, a rewritten graph, or an ONNX Runtime session (whose numpy outputs are accepted),
and numbers from different backends are directly comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from qgraph import progress as _progress
from qgraph.errors import DataError
from qgraph.memory import trim

ForwardFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps input_ids ``[B, T]`` (int64) to logits ``[B, T, V]`` (float; numpy arrays accepted)."""


def _logits(forward: ForwardFn, ids: torch.Tensor) -> torch.Tensor:
    """Call ``forward`` and return float32 logits, checking the shape matches ``ids``."""
    out: Any = forward(ids)
    logits = torch.as_tensor(out)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise DataError(
            f"forward returned logits of shape {tuple(logits.shape)} for input_ids of shape "
            f"{tuple(ids.shape)}; expected [{ids.shape[0]}, {ids.shape[1]}, vocab]"
        )
    return logits.float()


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    windows = torch.as_tensor(windows)
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise DataError(
            f"windows must have shape [n >= 1, T >= 2], got {tuple(windows.shape)}; "
            "a window needs at least two tokens to predict one"
        )
    if windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise DataError(f"windows must hold integer token ids, got dtype {windows.dtype}")
    return windows.long()


def window_nll(
    forward: ForwardFn,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "eval",
) -> tuple[float, int]:
    """Total natural-log NLL of tokens 1..T-1 of every window given its prefix, and their count.

    Log-probabilities come from ``log_softmax`` of float32 logits and are summed in float64, so
    the total does not lose precision over hundreds of thousands of tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = _check_windows(windows)
    n, t = windows.shape
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    starts = range(0, n, batch_size)
    with torch.inference_mode():
        # A bar shows only if both ``progress`` and the process-wide switch allow it.
        for start in _progress.bar(starts, desc=desc, unit="batch", disable=not progress):
            ids = windows[start : start + batch_size]
            picked, nan_rows = _next_token_log_probs(_logits(forward, ids), ids)
            if bool(nan_rows.any()):
                bad = start + int(nan_rows.nonzero()[0, 0])
                raise DataError(
                    f"{desc}: logits for window {bad} (of {n}) give NaN log-probabilities "
                    "(NaN, +Inf or all -Inf logits)"
                )
            total -= picked.double().sum()
            count += ids.shape[0] * (t - 1)
            trim()  # the window's activations: the next window starts from a trimmed heap
    return float(total), count


LOGP_POSITIONS = 64
"""Positions per ``log_softmax`` call in :func:`_next_token_log_probs`."""


def _next_token_log_probs(
    logits: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(logits)`` at each next token, ``[B, T-1]``, and whether each window has a
    NaN log-probability at any position, ``[B]``.

    Computed :data:`LOGP_POSITIONS` positions at a time: the log-probabilities of a whole window
    are as large as its logits (512 × 49152 float32: 100 MB), and with them and a NaN mask the
    evaluation of each window was the largest allocation of ``qgraph run`` after GPTQ. Softmax
    treats positions independently, so the values are bit-identical to one call.
    """
    b, t = ids.shape
    picked = torch.empty((b, t - 1), dtype=logits.dtype)
    nan_rows = torch.zeros(b, dtype=torch.bool)
    for i in range(0, t, LOGP_POSITIONS):
        logp = torch.log_softmax(logits[:, i : i + LOGP_POSITIONS], dim=-1)
        nan_rows |= torch.isnan(logp).flatten(1).any(dim=1)
        j = min(i + LOGP_POSITIONS, t - 1)  # the last position predicts nothing
        if j > i:
            target = ids[:, i + 1 : j + 1].unsqueeze(-1)
            picked[:, i:j] = logp[:, : j - i].gather(-1, target).squeeze(-1)
    return picked, nan_rows


def perplexity(
    forward: ForwardFn,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "eval",
) -> float:
    """exp(mean NLL) over all predicted tokens of ``windows``; see :func:`window_nll`."""
    total, count = window_nll(forward, windows, batch_size=batch_size, progress=progress, desc=desc)
    return math.exp(total / count)


def greedy_generate(
    forward: ForwardFn, input_ids: torch.Tensor, max_new_tokens: int
) -> torch.Tensor:
    """Append ``max_new_tokens`` argmax tokens to ``input_ids`` ``[1, T]``.

    No KV cache: the full prefix is re-run every step, so it works with any forward function
    (including exported graphs without cache inputs) at the cost of quadratic time.
    """
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise DataError(f"input_ids must have shape [1, T >= 1], got {tuple(ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = ids.long()
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            last = _logits(forward, ids)[:, -1]
            if bool(torch.isnan(last).any()):
                raise DataError(f"logits contain NaN at generation step {ids.shape[1]}")
            ids = torch.cat([ids, last.argmax(dim=-1, keepdim=True)], dim=1)
    # Clone outside inference mode so callers may modify the result in place.
    return ids.clone()
