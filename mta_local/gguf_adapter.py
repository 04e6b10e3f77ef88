"""Write LoRA adapters as GGUF files that llama.cpp applies on the unmodified base GGUF, and read them back.

Layout (llama.cpp's LoRA adapter format): header general.architecture = the base architecture,
general.type = "adapter", adapter.type = "lora", adapter.lora.alpha as FLOAT32; tensors
"<base tensor>.lora_a" with numpy shape (r, in) and "<base tensor>.lora_b" with shape (out, r).
llama.cpp scales each tensor pair by alpha / r, with r read from lora_b, and one alpha covers the
whole file. Adapters of different ranks are therefore written with their scaling already folded
into lora_b, and alpha is the total rank, so every scale is exactly 1.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch

from .errors import UnsupportedModelError
from .merge import LoraWeights
from .models import BaseModel

logger = logging.getLogger(__name__)

KEY_TYPE = "general.type"
KEY_ADAPTER_TYPE = "adapter.type"
KEY_ALPHA = "adapter.lora.alpha"
KEY_RECIPE = "mta_local.recipe"  # JSON: profile, bank id, anchors, weights, configs
SUFFIX_A, SUFFIX_B = ".lora_a", ".lora_b"

_MODULE_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_MODULE_PATTERN = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_tensor_name(module: str) -> str:
    """Map a transformers module path to its GGUF base tensor name (model.layers.3.mlp.up_proj -> blk.3.ffn_up.weight)."""
    match = _MODULE_PATTERN.match(module)
    if not match or match.group(2) not in _MODULE_TO_GGUF:
        raise UnsupportedModelError(
            f"module {module!r} has no GGUF equivalent; target only the block projections "
            f"({', '.join(sorted(_MODULE_TO_GGUF))})."
        )
    return f"blk.{match.group(1)}.{_MODULE_TO_GGUF[match.group(2)]}.weight"


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder output rows the way llama.cpp's converter stores Q and K for its rotary embedding.

    transformers un-permutes Q/K when it loads a GGUF, so a lora_B learned there must be
    permuted back before llama.cpp adds it to the GGUF's Q/K weights.
    """
    out = weight.shape[0]
    return weight.reshape(n_head, 2, out // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_adapter(path: str | Path, adapter: LoraWeights, base: BaseModel, metadata: dict | None = None,
                  dtype: str = "f16", dry_run: bool = False) -> Path:
    """Write ``adapter`` as a GGUF LoRA for ``base``; return the path.

    The file is written next to its destination and renamed into place, so an interrupted export
    never leaves a partial file behind.
    """
    import gguf

    path = Path(path)
    folded = adapter.folded()
    total_rank = folded.rank
    np_dtype = {"f16": np.float16, "f32": np.float32}[dtype]

    plan = []
    for module, (lora_a, lora_b) in folded.tensors.items():
        name = gguf_tensor_name(module)
        if name.endswith("attn_q.weight"):
            lora_b = permute_rows(lora_b, base.n_head)
        elif name.endswith("attn_k.weight"):
            lora_b = permute_rows(lora_b, base.n_head_kv)
        plan.append((name + SUFFIX_A, lora_a.detach().cpu().numpy().astype(np_dtype)))
        plan.append((name + SUFFIX_B, lora_b.detach().cpu().numpy().astype(np_dtype)))
    size = sum(array.nbytes for _, array in plan)
    logger.info("GGUF adapter %s: %d tensors, rank %d, %s, %.1f MB", path.name, len(plan), total_rank, dtype, size / 1e6)
    if dry_run:
        return path

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(temporary), base.architecture)
    try:
        writer.add_string(KEY_TYPE, "adapter")
        writer.add_string(KEY_ADAPTER_TYPE, "lora")
        writer.add_float32(KEY_ALPHA, float(total_rank))
        if metadata:
            writer.add_string(KEY_RECIPE, json.dumps(metadata, sort_keys=True))
        for name, array in plan:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(temporary, path)
    check_adapter_file(path, base)
    return path


def copy_gguf_metadata(reader, writer, file_type: int) -> None:
    """Copy every key of a GGUF being rewritten, with general.file_type set to ``file_type``."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer adds its own header fields and the architecture
        value = file_type if key == "general.file_type" else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)


def rewrite_base_gguf(base: BaseModel, target: Path, file_type: int, convert_tensor) -> None:
    """Write a copy of the base GGUF to ``target`` with each tensor passed through ``convert_tensor``.

    ``convert_tensor(tensor)`` returns (array, raw_dtype); raw_dtype None means a float array.
    The copy is written next to ``target`` and renamed into place when complete.
    """
    import gguf

    reader = gguf.GGUFReader(str(base.path))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(str(partial), base.architecture)
    try:
        copy_gguf_metadata(reader, writer, file_type)
        for tensor in reader.tensors:
            array, raw_dtype = convert_tensor(tensor)
            writer.add_tensor(tensor.name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(partial, target)


def gguf_deltas(adapter: LoraWeights, base: BaseModel) -> dict[str, torch.Tensor]:
    """Return dW per GGUF tensor name, with llama.cpp's Q/K row order."""
    deltas = {}
    for module in adapter.tensors:
        name = gguf_tensor_name(module)
        delta = adapter.delta(module)
        if name.endswith("attn_q.weight"):
            delta = permute_rows(delta, base.n_head)
        elif name.endswith("attn_k.weight"):
            delta = permute_rows(delta, base.n_head_kv)
        deltas[name] = delta
    return deltas


def check_adapter_file(path: str | Path, base: BaseModel) -> dict:
    """Read a GGUF adapter back and check its header and tensors against the base; return a summary."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    base_reader = gguf.GGUFReader(str(base.path))
    base_shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in base_reader.tensors}

    def fail(reason: str):
        raise UnsupportedModelError(f"{path}: invalid GGUF adapter: {reason}. Export it again with `mta-local enroll`.")

    for key, expected in ((KEY_TYPE, "adapter"), (KEY_ADAPTER_TYPE, "lora"), ("general.architecture", base.architecture)):
        field = reader.get_field(key)
        if field is None or field.contents() != expected:
            fail(f"{key} is {None if field is None else field.contents()!r}, expected {expected!r}")
    alpha = reader.get_field(KEY_ALPHA)
    if alpha is None or alpha.types != [gguf.GGUFValueType.FLOAT32]:
        fail(f"{KEY_ALPHA} must be FLOAT32 (llama.cpp reads any other type as scale 1)")

    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
    ranks = set()
    for name, shape in shapes.items():
        if not name.endswith((SUFFIX_A, SUFFIX_B)):
            fail(f"tensor {name} is neither {SUFFIX_A} nor {SUFFIX_B}")
        base_name = name[: -len(SUFFIX_A)]
        if base_name not in base_shapes:
            fail(f"tensor {name} names {base_name}, which the base model does not have")
        out_features, in_features = base_shapes[base_name]
        if name.endswith(SUFFIX_A):
            partner = shapes.get(base_name + SUFFIX_B)
            if partner is None or shape[1] != in_features or partner != (out_features, shape[0]):
                fail(f"{base_name}: lora_a {shape} and lora_b {partner} do not fit the base shape {(out_features, in_features)}")
            ranks.add(shape[0])
        elif base_name + SUFFIX_A not in shapes:
            fail(f"{base_name}: lora_b {shape} has no lora_a")
    return {"tensors": len(shapes), "ranks": sorted(ranks), "alpha": float(alpha.contents())}
