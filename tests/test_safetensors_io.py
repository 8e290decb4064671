"""Reading safetensors checkpoints into private memory: the same model as from_pretrained, bit
for bit (float32, bfloat16, sharded, tied), and clear errors on damaged files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from transformers import AutoModelForCausalLM

from qgraph.errors import ModelFileError
from qgraph.loaders import load_hf_dir
from qgraph.safetensors_io import load_causal_lm_privately, read_header


def _reference(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True
    ).eval()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers(), strict=True))
    ids = torch.arange(1, 33).reshape(1, -1)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize(
    "dtype,tied,shard", [(torch.float32, True, None), (torch.bfloat16, False, "40KB")]
)
def test_private_load_equals_from_pretrained(tmp_path: Path, dtype, tied, shard) -> None:
    hf = tiny_llama(vocab=128, tied=tied, random_norms=True).to(dtype)
    kw = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, **kw)
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    model = load_causal_lm_privately(tmp_path)
    assert model is not None and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    _same(model, _reference(tmp_path))


def test_private_load_owns_its_memory(tmp_path: Path) -> None:
    """The parameters are not views of a file mapping: writing the file afterwards cannot
    change them, and their storages are ordinary allocations."""
    tiny_llama(vocab=128).save_pretrained(tmp_path)
    model = load_causal_lm_privately(tmp_path)
    before = model.model.embed_tokens.weight.clone()
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-4096] + bytes(4096))
    assert torch.equal(model.model.embed_tokens.weight, before)


def test_names_that_do_not_match_fall_back_to_from_pretrained(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    hf = tiny_llama(vocab=128)
    hf.save_pretrained(tmp_path)
    state = {("old." + k): v.clone() for k, v in hf.state_dict().items() if "lm_head" not in k}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert load_causal_lm_privately(tmp_path) is None


def test_damaged_files_are_named(tmp_path: Path) -> None:
    tiny_llama(vocab=128).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    assert read_header(path)[1] == 8 + n
    path.write_bytes(data[: 8 + n + 100])  # cut short: tensors point past the end
    with pytest.raises(ModelFileError, match="bad dtype or extent"):
        read_header(path)
    path.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        read_header(path)
    path.write_bytes(data[:8] + b"{" * n + data[8 + n :])
    with pytest.raises(ModelFileError, match="unreadable safetensors header"):
        read_header(path)
    assert header  # the intact header parsed
    with pytest.raises(ModelFileError, match="cannot load the model"):
        load_hf_dir(tmp_path)
