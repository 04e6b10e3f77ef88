"""Check that llama.cpp applies an exported adapter as transformers does.

Comparisons run on an F32 copy of the base GGUF. On a quantized base, llama.cpp rounds
activations to 8 bits before each matmul. That rounding is discontinuous, so logits move by up to
about 0.6 under 1e-6 changes of the adapter, and exact comparisons there mean nothing. The F32
copy contains the same dequantized weights that transformers trains on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import cache_dir
from .gguf_adapter import rewrite_base_gguf
from .merge import LoraWeights, fold_into
from .models import BaseModel, resolve_base_model

logger = logging.getLogger(__name__)


def f32_base_copy(base: BaseModel) -> BaseModel:
    """Return an F32 copy of the base GGUF (dequantized with gguf-py), written once into the cache."""
    import gguf

    target = cache_dir() / "f32" / f"{base.path.stem}-{base.sha256[:12]}.F32.gguf"
    if target.is_file():
        return resolve_base_model(str(target))

    def dequantized(tensor):
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32), None

    rewrite_base_gguf(base, target, int(gguf.LlamaFileType.ALL_F32), dequantized)
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


def split_adapter_difference(base: BaseModel, combined_gguf: Path, part_ggufs: list[Path], prompts: list[str]) -> float:
    """Return max |logits| difference between one combined adapter and its parts loaded as several adapters.

    The parts go through llama.cpp's low-level API (llama_adapter_lora_init + llama_set_adapters_lora),
    the way a runtime that stacks adapters at load time applies them.
    """
    from .chat import last_logits, load_llama, load_lora, set_loras

    combined = load_llama(base, combined_gguf, n_ctx=1024)
    split = load_llama(base, n_ctx=1024)
    set_loras(split, [load_lora(split, path) for path in part_ggufs])
    return float(max(np.abs(last_logits(combined, text) - last_logits(split, text)).max() for text in prompts))


def perturbed(adapter: LoraWeights, relative: float, seed: int) -> LoraWeights:
    """Return ``adapter`` with every lora_B multiplied by (1 + relative * standard normal noise)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (lora_a, lora_b) in adapter.tensors.items():
        noise = torch.randn(lora_b.shape, generator=generator, dtype=torch.float64)
        tensors[module] = (lora_a, (lora_b.double() * (1.0 + relative * noise)).to(lora_b.dtype))
    return LoraWeights(tensors, adapter.scaling)


@dataclass
class GreedyAgreement:
    positions: int  # generated positions compared, over all prompts
    decisive: int  # positions whose reference top-1 margin exceeds the noise floor
    agreed: int  # decisive positions where llama.cpp's top-1 token equals the reference's
    noise_floor: float  # max logit move of llama.cpp under a 1e-6 relative perturbation of lora_B
    min_decisive_margin: float  # smallest reference margin among the decisive positions (inf if none)


def reference_greedy(base: BaseModel, adapter: LoraWeights, tokens: list[list[int]], steps: int,
                     eos_id: int | None) -> list[tuple[list[int], np.ndarray]]:
    """Generate greedily in transformers with the adapter folded in; return (new ids, logits per step) per prompt."""
    import torch

    from .models import load_training_model

    model, _ = load_training_model(base, device="cpu")
    fold_into(model, adapter)
    results = []
    with torch.no_grad():
        for ids in tokens:
            generated, rows = [], []
            for _ in range(steps):
                logits = model(torch.tensor([ids + generated])).logits[0, -1].numpy()
                rows.append(logits)
                generated.append(int(logits.argmax()))
                if generated[-1] == eos_id:
                    break
            results.append((generated, np.stack(rows)))
    return results


def llama_step_logits(llm, prompt_ids: list[int], continuation: list[int]) -> np.ndarray:
    """Return llama.cpp's next-token logits before each token of ``continuation`` (teacher-forced)."""
    import llama_cpp

    def current():
        pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.array(np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)), dtype=np.float32)

    llm.reset()
    llm.eval(prompt_ids)
    rows = [current()]
    for token in continuation[:-1]:
        llm.eval([token])
        rows.append(current())
    llm.reset()
    return np.stack(rows)


def greedy_agreement(base: BaseModel, adapter_gguf: Path, perturbed_gguf: Path, adapter: LoraWeights,
                     prompts: list[str], steps: int) -> GreedyAgreement:
    """Compare llama.cpp's top-1 tokens with transformers' greedy generation where the margin is above noise.

    The noise floor is the largest logit move llama.cpp shows between ``adapter_gguf`` and
    ``perturbed_gguf`` (the same adapter with lora_B perturbed by 1e-6) along the same tokens: a
    reference margin below it can flip on a quantized base for reasons unrelated to the export.
    """
    from .chat import load_llama

    llm = load_llama(base, adapter_gguf, n_ctx=1024)
    noisy = load_llama(base, perturbed_gguf, n_ctx=1024)
    tokens = [llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in prompts]
    eos_id = llm.token_eos()
    reference = reference_greedy(base, adapter, tokens, steps, eos_id)

    floor, compared = 0.0, []
    for ids, (generated, ref_logits) in zip(tokens, reference):
        ours = llama_step_logits(llm, ids, generated)
        floor = max(floor, float(np.abs(llama_step_logits(noisy, ids, generated) - ours).max()))
        compared.append((ours, ref_logits))

    positions = decisive = agreed = 0
    min_margin = float("inf")
    for ours, ref_logits in compared:
        for row, ref_row in zip(ours, ref_logits):
            top2 = np.sort(ref_row)[-2:]
            margin = float(top2[1] - top2[0])
            positions += 1
            if margin > floor:
                decisive += 1
                min_margin = min(min_margin, margin)
                agreed += int(row.argmax() == ref_row.argmax())
    return GreedyAgreement(positions, decisive, agreed, floor, min_margin)
