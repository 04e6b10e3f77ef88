"""Check that llama.cpp applies an exported adapter as transformers does.

Comparisons run on an F32 copy of the base GGUF. On a quantized base, llama.cpp rounds
activations to 8 bits before each matmul. That rounding is discontinuous, so logits move by up to
about 0.6 under 1e-6 changes of the adapter, and exact comparisons there mean nothing. The F32
copy contains the same dequantized weights that transformers trains on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import cache_dir
from .gguf_adapter import copy_gguf_metadata
from .merge import LoraWeights, fold_into
from .models import BaseModel, resolve_base_model

logger = logging.getLogger(__name__)


def f32_base_copy(base: BaseModel) -> BaseModel:
    """Return an F32 copy of the base GGUF (dequantized with gguf-py), written once into the cache."""
    import gguf

    target = cache_dir() / "f32" / f"{base.path.stem}-{base.sha256[:12]}.F32.gguf"
    if target.is_file():
        return resolve_base_model(str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(base.path))
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(str(partial), base.architecture)
    try:
        copy_gguf_metadata(reader, writer, int(gguf.LlamaFileType.ALL_F32))
        for tensor in reader.tensors:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            writer.add_tensor(tensor.name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(partial, target)
    logger.info("wrote F32 copy of %s to %s", base.path.name, target)
    return resolve_base_model(str(target))


@dataclass
class EffectComparison:
    correlation: float  # Pearson correlation of (with - without) logits, llama.cpp vs transformers
    max_abs_diff: float  # max |effect_llama - effect_transformers|
    effect_scale: float  # max |effect_transformers|, for context
    prompts: int


def llama_effect(base: BaseModel, adapter_gguf: Path, prompts: list[str]) -> tuple[np.ndarray, list[list[int]]]:
    """Return llama.cpp next-token logits with minus without the adapter, per prompt; and the token ids."""
    from .chat import last_logits, load_llama

    plain, adapted = load_llama(base, n_ctx=1024), load_llama(base, adapter_gguf, n_ctx=1024)
    tokens = [plain.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in prompts]
    effect = np.stack([last_logits(adapted, text) - last_logits(plain, text) for text in prompts])
    return effect, tokens


def transformers_effect(base: BaseModel, adapter: LoraWeights, tokens: list[list[int]]) -> np.ndarray:
    """Return transformers next-token logits with minus without the adapter (folded into the weights)."""
    import torch

    from .models import load_training_model

    model, _ = load_training_model(base, device="cpu")

    def logits():
        with torch.no_grad():
            return np.stack([model(torch.tensor([ids])).logits[0, -1].numpy() for ids in tokens])

    without = logits()
    fold_into(model, adapter)
    return logits() - without


def compare_effects(base: BaseModel, adapter_gguf: Path, adapter: LoraWeights, prompts: list[str]) -> EffectComparison:
    """Compare an adapter's effect on next-token logits in llama.cpp and transformers."""
    llama, tokens = llama_effect(base, adapter_gguf, prompts)
    reference = transformers_effect(base, adapter, tokens)
    correlation = float(np.corrcoef(llama.ravel(), reference.ravel())[0, 1])
    return EffectComparison(correlation, float(np.abs(llama - reference).max()), float(np.abs(reference).max()), len(prompts))
