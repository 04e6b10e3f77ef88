"""Files derived from a profile and the bank: the runtime GGUF adapter and a folded copy of the base.

Both contain the user's adaptation, so they live in the private data dir (``derived/<name>/``),
never in the shared cache. Both are rebuilt when missing, from the bank, the recipe and the
stacked adapter; their names carry ``Profile.key``.

The folded copy exists for speed: llama.cpp runs a runtime LoRA as extra graph operations on
every projection, which at 135M parameters costs about a fifth of the decode speed. Folded into
the weights, the adapters add no operations. Folded tensors are re-quantized to Q8_0 by default,
because Q4_1's step (a 15th of each 32-weight block's range) is coarser than typical adapter
deltas, so re-quantizing to Q4_1 would round much of the personalization away. A Q8_0 copy reads
more bytes per token than a Q4_1 base, which costs decode speed (benchmarks/fold_types.py
measures both). Untouched tensors are copied as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .gguf_adapter import gguf_deltas, rewrite_base_gguf, write_adapter
from .models import BaseModel, resolve_base_model
from .profile import Profile

logger = logging.getLogger(__name__)

FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0",
              "Q5_1": "MOSTLY_Q5_1", "F32": "ALL_F32"}


def write_runtime_adapter(profile: Profile, target: Path, base: BaseModel) -> Path:
    """Write merged + stacked as one GGUF LoRA, rebuilt from the bank, recipe and stored stacked weights.

    enroll writes the adapter with this function too, so a rebuilt file is identical to the enrolled one.
    """
    from .verify import combined_adapter

    metadata = {key: profile.recipe[key] for key in ("profile", "task", "bank", "anchors", "merge", "stack")
                if key in profile.recipe}
    return write_adapter(target, combined_adapter(profile), base, metadata=metadata)  # atomic: temporary file + rename


def ensure_adapter(profile: Profile, base: BaseModel | None = None) -> Path:
    """Return the profile's runtime GGUF adapter, rebuilding it from the bank if it is missing."""
    target = profile.adapter_gguf
    if not target.is_file():
        logger.info("rebuilding the GGUF adapter of profile %s", profile.name)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_runtime_adapter(profile, target, base or resolve_base_model(profile.recipe["base_model"]["path"]))
    return target


def folded_path(profile: Profile, quant: str) -> Path:
    return profile.derived_path / f"base-folded-{profile.key}.{quant}.gguf"


def folded_base(profile: Profile, base: BaseModel, quant: str = "Q8_0") -> BaseModel:
    """Return the profile's folded base GGUF, writing it first if it is missing."""
    from .verify import combined_adapter

    target = folded_path(profile, quant)
    if target.is_file():
        return resolve_base_model(str(target))

    deltas = {name: delta.numpy() for name, delta in gguf_deltas(combined_adapter(profile), base).items()}
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_folded(base, target, deltas, quant)
    logger.info("wrote folded base for profile %s to %s", profile.name, target)
    return resolve_base_model(str(target))


def write_folded(base: BaseModel, target: Path, deltas: dict, quant: str) -> Path:
    """Write the base GGUF with ``deltas`` (GGUF tensor name -> dW array) added, those tensors stored as ``quant``.

    ``quant`` is a key of FILE_TYPES. Tensors without a delta are copied as they are.
    """
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[quant]

    def folded(tensor):
        if tensor.name not in deltas:
            return tensor.data, tensor.tensor_type
        weight = (gguf.quants.dequantize(tensor.data, tensor.tensor_type) + deltas[tensor.name]).astype(np.float32)
        return (weight if quant == "F32" else gguf.quants.quantize(weight, qtype)), qtype

    rewrite_base_gguf(base, target, int(gguf.LlamaFileType[FILE_TYPES[quant]]), folded)
    return target
