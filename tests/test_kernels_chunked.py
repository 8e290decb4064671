"""Chunked row/column maps equal the whole-matrix computation bit for bit, and the
dequantized-weight cache keeps a float copy only for decode-sized calls."""

import torch

from qgraph import ops
from qgraph.kernels import chunked
from qgraph.kernels.rotation import Rotation, rotate_input, rotate_output


def test_map_rows_and_columns_are_bit_identical_across_chunk_sizes(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(300, 64)
    gamma = torch.rand(64, dtype=torch.float64) + 0.5
    whole_rows = (w.double() * gamma).float()
    whole_cols = (w.double() - w.double().mean(0, keepdim=True)).float()
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 8 * 64 * 7)  # 7 rows per chunk, a ragged end
    assert torch.equal(chunked.map_rows(lambda r: r.double() * gamma, w), whole_rows)
    cols = chunked.map_columns(lambda c: c.double() - c.double().mean(-1, keepdim=True), w)
    assert torch.equal(cols, whole_cols)
    assert cols.is_contiguous()


def test_chunked_rotations_match_float64_reference(monkeypatch):
    torch.manual_seed(1)
    rot = Rotation.make(64, seed=3)
    q = rot.right(torch.eye(64, dtype=torch.float64))  # Q in float64
    w_in = torch.randn(200, 64)  # [out, in]: rotated on its input side
    w_out = torch.randn(64, 50)  # [out, in]: rotated on its output side
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 8 * 64 * 9)
    assert torch.allclose(rotate_input(w_in, rot), (w_in.double() @ q).float(), atol=1e-6)
    assert torch.allclose(rotate_output(w_out, rot), (q.T @ w_out.double()).float(), atol=1e-6)


def test_dequantized_weight_cached_only_for_few_rows():
    codes = torch.randint(-8, 8, (32, 16), dtype=torch.int8)
    scale = torch.rand(1, 16) + 0.1
    zero = torch.zeros(1, 16, dtype=torch.int8)
    many = torch.randn(ops.CACHE_MAX_ROWS + 1, 32)
    out = torch.ops.qgraph.qlinear(many, codes, scale, zero, None, 32, 4)
    ref = many.double() @ (codes.double() * scale.double())
    assert torch.allclose(out.double(), ref, atol=1e-4)
    assert getattr(codes, "_qgraph_dequant", None) is None
    torch.ops.qgraph.qlinear(many[:1], codes, scale, zero, None, 32, 4)
    assert getattr(codes, "_qgraph_dequant", None) is not None


def test_reuse_dequantized_keeps_the_last_layers_only_inside_its_block(monkeypatch):
    calls = []
    real = ops.dequantize_kn
    monkeypatch.setattr(ops, "dequantize_kn", lambda *a: calls.append(1) or real(*a))
    layers = [
        (torch.randint(-8, 8, (32, 16), dtype=torch.int8), torch.rand(1, 16) + 0.1)
        for _ in range(3)
    ]
    zero = torch.zeros(1, 16, dtype=torch.int8)
    x = torch.randn(ops.CACHE_MAX_ROWS + 1, 32)

    def run(i, scale=None):
        codes, s = layers[i]
        s = s if scale is None else scale
        out = torch.ops.qgraph.qlinear(x, codes, s, zero, None, 32, 4)
        ref = x.double() @ (codes.double() * s.double())
        assert torch.allclose(out.double(), ref, atol=1e-4)

    with ops.reuse_dequantized(layers=2):
        for _ in range(3):  # three windows through layers 0 and 1: dequantized once each
            run(0)
            run(1)
        assert len(calls) == 2
        run(2)  # a third layer evicts layer 0
        run(0)
        assert len(calls) == 4
        run(0, scale=layers[0][1] * 2)  # a new scale tensor is never served the old weight
        assert len(calls) == 5
    run(1)
    run(1)  # outside the block nothing is kept for many-row calls
    assert len(calls) == 7
