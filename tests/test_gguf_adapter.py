import json

import gguf
import numpy as np
import pytest
import torch

from mta_local.errors import UnsupportedModelError
from mta_local.gguf_adapter import KEY_ALPHA, KEY_RECIPE, check_adapter_file, gguf_tensor_name, permute_rows, write_adapter
from mta_local.merge import LoraWeights
from mta_local.models import resolve_base_model


@pytest.mark.parametrize(
    "module, name",
    [
        ("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
        ("model.layers.12.self_attn.k_proj", "blk.12.attn_k.weight"),
        ("model.layers.3.self_attn.v_proj", "blk.3.attn_v.weight"),
        ("model.layers.3.self_attn.o_proj", "blk.3.attn_output.weight"),
        ("model.layers.29.mlp.gate_proj", "blk.29.ffn_gate.weight"),
        ("model.layers.29.mlp.up_proj", "blk.29.ffn_up.weight"),
        ("model.layers.29.mlp.down_proj", "blk.29.ffn_down.weight"),
    ],
)
def test_gguf_tensor_names(module, name):
    assert gguf_tensor_name(module) == name


@pytest.mark.parametrize("module", ["lm_head", "model.embed_tokens", "model.layers.0.input_layernorm"])
def test_modules_without_gguf_equivalent_rejected(module):
    with pytest.raises(UnsupportedModelError, match="no GGUF equivalent"):
        gguf_tensor_name(module)


@pytest.mark.parametrize("n_head, n_kv", [(9, 9), (9, 3)])
def test_permutation_inverts_transformers_unpermute(n_head, n_kv):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = n_kv * 64
    weight = np.random.default_rng(0).standard_normal((rows, 4)).astype(np.float32)

    permuted = permute_rows(torch.from_numpy(weight), n_kv).numpy()
    restored = LlamaTensorProcessor()._reverse_permute_weights(permuted, n_kv, n_kv)

    assert not np.array_equal(permuted, weight)
    assert np.array_equal(restored, weight)


def random_adapter(ranks: int, layers=(0, 1)) -> LoraWeights:
    shapes = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "mlp.down_proj": (576, 1536)}
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"model.layers.{layer}.{name}": (torch.randn(ranks, fan_in, generator=generator),
                                         torch.randn(fan_out, ranks, generator=generator))
        for layer in layers for name, (fan_out, fan_in) in shapes.items()
    }
    return LoraWeights(tensors, 2.0)


def test_written_adapter_reads_back(tmp_path):
    base = resolve_base_model()
    adapter = random_adapter(6)

    path = write_adapter(tmp_path / "a.gguf", adapter, base, metadata={"profile": "x"}, dtype="f32")

    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field(KEY_ALPHA).types == [gguf.GGUFValueType.FLOAT32]
    assert reader.get_field(KEY_ALPHA).contents() == 6.0
    assert json.loads(reader.get_field(KEY_RECIPE).contents()) == {"profile": "x"}
    tensors = {t.name: t for t in reader.tensors}
    lora_b = tensors["blk.1.ffn_down.weight.lora_b"].data
    # scaling (2.0) is folded into lora_b, and alpha = rank makes llama.cpp's own scale 1
    assert np.allclose(lora_b, adapter.tensors["model.layers.1.mlp.down_proj"][1].numpy() * 2.0)
    assert check_adapter_file(path, base) == {"tensors": 12, "ranks": [6], "alpha": 6.0}
    assert not list(tmp_path.glob(".*partial"))


def write_raw_adapter(path, tensors: dict, alpha_type: str = "f32", adapter_type: str = "adapter"):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.type", adapter_type)
    writer.add_string("adapter.type", "lora")
    if alpha_type == "f32":
        writer.add_float32(KEY_ALPHA, 4.0)
    else:
        writer.add_uint32(KEY_ALPHA, 4)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


Q_A, Q_B = "blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b"
GOOD = {Q_A: np.zeros((4, 576), np.float32), Q_B: np.zeros((576, 4), np.float32)}


@pytest.mark.parametrize(
    "tensors, options, message",
    [
        ({"blk.99.attn_q.weight.lora_a": GOOD[Q_A], "blk.99.attn_q.weight.lora_b": GOOD[Q_B]}, {}, "base model does not have"),
        ({Q_B: GOOD[Q_B]}, {}, "has no lora_a"),
        ({Q_A: GOOD[Q_A], Q_B: np.zeros((576, 3), np.float32)}, {}, "do not fit the base shape"),
        ({Q_A: np.zeros((4, 100), np.float32), Q_B: GOOD[Q_B]}, {}, "do not fit the base shape"),
        ({**GOOD, "blk.0.attn_q.weight": np.zeros((4, 4), np.float32)}, {}, "neither .lora_a nor .lora_b"),
        (GOOD, {"alpha_type": "u32"}, "must be FLOAT32"),
        (GOOD, {"adapter_type": "model"}, "general.type is 'model'"),
    ],
    ids=["unknown-base-tensor", "lone-lora-b", "rank-mismatch", "wrong-in-features", "base-tensor", "alpha-u32", "not-adapter"],
)
def test_adapter_check_rejects(tmp_path, tensors, options, message):
    path = write_raw_adapter(tmp_path / "bad.gguf", tensors, **options)

    with pytest.raises(UnsupportedModelError, match=message):
        check_adapter_file(path, resolve_base_model())
