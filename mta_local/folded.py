"""A per-user copy of the base GGUF with merged + stacked adapters folded into its weights.

llama.cpp runs a runtime LoRA as extra graph operations on every projection, which at 135M
parameters costs more decode time than the adapter's FLOPs suggest. A folded copy runs at the
base model's speed. It is derived data (bank + recipe + stacked adapter rebuild it) and contains the
user's adaptation, so it lives in the private data dir, never in the shared cache.

Folded tensors are re-quantized to Q8_0 by default: Q4_1's step (a 16th of each 32-weight
block's range) is coarser than typical adapter deltas, so re-quantizing to Q4_1 would round
much of the personalization away. Untouched tensors are copied as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import user_dir
from .gguf_adapter import gguf_deltas, rewrite_base_gguf
from .models import BaseModel, resolve_base_model
from .profile import Profile

logger = logging.getLogger(__name__)

FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16", "Q4_1": "MOSTLY_Q4_1"}


def folded_path(profile: Profile, quant: str) -> Path:
    return user_dir() / "folded" / profile.name / f"base-folded.{quant}.gguf"


def folded_base(profile: Profile, base: BaseModel, quant: str = "Q8_0") -> BaseModel:
    """Return the profile's folded base GGUF, writing it if missing or older than the profile."""
    import gguf
    import numpy as np

    from .verify import combined_adapter

    target = folded_path(profile, quant)
    if target.is_file() and target.stat().st_mtime >= profile.adapter_gguf.stat().st_mtime:
        return resolve_base_model(str(target))

    qtype = gguf.GGMLQuantizationType[quant]
    deltas = {name: delta.numpy() for name, delta in gguf_deltas(combined_adapter(profile), base).items()}

    def folded(tensor):
        if tensor.name not in deltas:
            return tensor.data, tensor.tensor_type
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type) + deltas[tensor.name]
        return gguf.quants.quantize(weight.astype(np.float32), qtype), qtype

    rewrite_base_gguf(base, target, int(gguf.LlamaFileType[FILE_TYPES[quant]]), folded)
    logger.info("wrote folded base for profile %s to %s", profile.name, target)
    return resolve_base_model(str(target))
