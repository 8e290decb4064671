"""Reading safetensors checkpoints into memory the process owns, one tensor at a time.

``from_pretrained`` memory-maps the file and hands out views of the mapping: every page a pass
reads stays in the process's resident set until the *last* original tensor is gone, so a run
that rewrites the weights holds the file beside its rewrite (+1× the model at the peak of
``rotate``). Here the model is built with uninitialised parameters (untouched pages cost
nothing) and each tensor is read straight into its parameter's memory, so the weights are
resident exactly once and a replaced tensor's memory goes back when the pass drops it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ModelFileError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of a safetensors file and the offset where its data begin."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
            raise ModelFileError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"{path}: unreadable safetensors header: {exc}") from exc
    header.pop("__metadata__", None)
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        if entry["dtype"] not in DTYPES or not 0 <= start <= end <= size - 8 - n:
            raise ModelFileError(f"{path}: tensor {name!r} has a bad dtype or extent: {entry}")
    return header, 8 + n


def _read_exact(f, view: memoryview, what: str) -> None:
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ModelFileError(f"{what}: the file ends early")
        done += got


def read_tensor_into(f, base: int, entry: dict, target: torch.Tensor, what: str) -> None:
    """Fill ``target`` with the tensor ``entry`` of the open file ``f`` (converting its dtype)."""
    dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
    start, end = entry["data_offsets"]
    if shape != tuple(target.shape):
        raise ModelFileError(f"{what}: shape {shape} in the file, {tuple(target.shape)} expected")
    if end - start != dtype.itemsize * target.numel():
        raise ModelFileError(f"{what}: {end - start} bytes for shape {shape} {entry['dtype']}")
    f.seek(base + start)
    target = target.detach()
    if dtype == target.dtype and target.is_contiguous():
        dest = target
    else:
        dest = torch.empty(shape, dtype=dtype)
    if dest.numel():
        _read_exact(f, memoryview(dest.view(-1).view(torch.uint8).numpy()), what)
    if dest is not target:
        target.copy_(dest)


def checkpoint_files(folder: Path) -> list[Path] | None:
    """The safetensors files of a HF folder (one file or an index of shards), or None."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{index}: unreadable shard index: {exc}") from exc
    return [folder / name for name in dict.fromkeys(weight_map.values())]


def load_state_into(model: torch.nn.Module, files: list[Path]) -> bool:
    """Read every tensor of ``files`` into ``model``'s parameters and buffers of the same
    name. False (nothing trusted) when the names do not match the model's one to one — the
    caller then falls back to ``from_pretrained``, which knows the renames of old checkpoints."""
    state = model.state_dict(keep_vars=True)
    headers = {path: read_header(path) for path in files}
    names = [name for header, _ in headers.values() for name in header]
    if not set(names) <= set(state):
        return False
    loaded = {id(state[name]) for name in names}
    if any(id(t) not in loaded for t in state.values()):
        return False  # a tensor (not a tied alias of a read one) would stay uninitialised
    for path, (header, base) in headers.items():
        in_file_order = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        with open(path, "rb", buffering=0) as f:  # one sequential read
            for name, entry in in_file_order:
                read_tensor_into(f, base, entry, state[name], f"{path}: {name}")
    return True


def load_causal_lm_privately(folder: Path, dtype: torch.dtype = torch.float32):
    """A HF causal LM from ``folder`` with its weights read into private memory, or None when
    the folder is not a plain safetensors checkpoint of its config's architecture."""
    files = checkpoint_files(folder)
    if files is None:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if not load_state_into(model, files):
        return None
    model.config._name_or_path = str(folder)
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    except OSError:
        pass  # no generation_config.json: keep the one derived from the config
    return model.eval()
