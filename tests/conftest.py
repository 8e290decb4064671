"""Shared fixtures (the builders behind them are in ``helpers.py``).

Session-scoped models are shared by every test file and must never be rewritten or modified
by a test: a test that rewrites takes ``model`` (a fresh deep copy of ``traced``) or copies with
``helpers.fresh_copy``. qgraph never writes into the user's module, so the Hugging Face models
can be shared as they are.

A test file with a different base model overrides ``traced`` with its own fixture of that name;
``model`` then copies that one.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import calibrated, exact_llama, fresh_copy, tiny_llama

import qgraph

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # `make test` runs two workers: one core each


@pytest.fixture(scope="session")
def llama():
    """``helpers.tiny_llama()``: vocab 256, hidden 64, 4 heads / 2 KV heads, MLP 128, 2 layers,
    tied, init 0.02, seed 0."""
    return tiny_llama()


@pytest.fixture(scope="session")
def traced(llama) -> qgraph.Model:
    """``llama`` traced, with 4 seeded calibration windows of 32 tokens. Do not rewrite it."""
    return calibrated(llama)


@pytest.fixture
def model(traced) -> qgraph.Model:
    """A fresh deep copy of ``traced`` (of the test file's own ``traced`` where it has one)."""
    return fresh_copy(traced)


@pytest.fixture(scope="session")
def llama_exact():
    """``helpers.exact_llama()``: the exactness tests' Llama (vocab 128, hidden 96, head dim 24,
    MLP 192, tied, init 0.05, random norm γ ∈ [0.25, 1.75))."""
    return exact_llama()


@pytest.fixture(scope="session")
def llama_exact_traced(llama_exact) -> qgraph.Model:
    """``llama_exact`` traced, without calibration data. Do not rewrite it."""
    return qgraph.from_hf(llama_exact)


@pytest.fixture(scope="session")
def llama96():
    """The re-solving passes' Llama (gptq, learn-rounding, mixed-precision): vocab 256, hidden
    96, MLP 192, 2 layers, untied, Hugging Face's default init 0.02, seed 0."""
    return tiny_llama(vocab=256, hidden=96, intermediate=192, tied=False, max_positions=2048)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many tiny ops: on a shared, loaded 2-core machine
    threads only wait for each other (measured 40x faster there); restored afterwards. Use
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow real-model tests first (a stable sort keeps every other order): under `make test`
    their file then runs on one worker while the other takes the rest, instead of alone at the
    end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
