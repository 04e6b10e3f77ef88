import functools

import pytest
import torch

from mta_local.config import LoraConfig
from mta_local.train import Encoded, collate, loss_sum_fast, loss_sum_plain, train_lora, use_fast_lora_forward


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


BATCH = [Encoded([5, 6, 7, 8, 9, 10, 11], target_start=4), Encoded([12, 13, 14, 15], target_start=2)]


def test_fast_loss_matches_plain_loss_and_gradients():
    model = tiny_llama()
    batch = collate(BATCH, pad_id=0, device="cpu")

    plain, plain_count = loss_sum_plain(model, batch)
    plain.backward()
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fast, fast_count = loss_sum_fast(model, batch)
    fast.backward()

    assert fast_count == plain_count == 5
    assert torch.allclose(fast, plain, rtol=1e-5)
    for expected, parameter in zip(plain_grads, model.parameters()):
        assert torch.allclose(parameter.grad, expected, rtol=1e-4, atol=1e-6)


def test_collate_masks_prompt_and_padding():
    batch = collate(BATCH, pad_id=0, device="cpu")

    assert batch["labels"].tolist() == [[-100, -100, -100, -100, 9, 10, 11], [-100, -100, 14, 15, -100, -100, -100]]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0, 0]


def test_train_lora_lowers_loss_and_leaves_model_plain():
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    config = LoraConfig(rank=4, alpha=8.0, epochs=20, learning_rate=1e-2, batch_size=2, grad_accum=1, seed=0)

    result = train_lora(model, BATCH * 2, config, pad_id=0)

    assert result.losses[-1] < result.losses[0] * 0.9
    assert result.adapter.rank == 4
    assert len(result.adapter.tensors) == 2 * 7
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())


def test_pack_rows_respects_row_budget():
    from mta_local.train import pack_rows

    examples = [Encoded(list(range(length)), target_start=1) for length in (3, 4, 5, 9)]

    batches = pack_rows(examples, max_rows=8)

    assert [[len(example.input_ids) for example in batch] for batch in batches] == [[3, 4], [5], [9]]


def test_micro_batch_split_keeps_training(monkeypatch):
    import mta_local.train

    config = LoraConfig(rank=4, alpha=8.0, epochs=2, learning_rate=1e-2, batch_size=2, grad_accum=2, seed=0)
    results = []
    for max_rows in (4, 1024):  # each example alone, then each step's examples in one micro-batch
        monkeypatch.setattr(mta_local.train, "PACKED_ROWS", max_rows)
        results.append(train_lora(tiny_llama(), PREFIXED, config, pad_id=0))

    assert results[0].losses == pytest.approx(results[1].losses, rel=1e-5)
    for module, (a, b) in results[0].adapter.tensors.items():
        assert torch.allclose(results[1].adapter.tensors[module][0], a, rtol=1e-4, atol=1e-6)
        assert torch.allclose(results[1].adapter.tensors[module][1], b, rtol=1e-4, atol=1e-6)


def test_train_lora_is_seeded():
    config = LoraConfig(rank=2, alpha=4.0, epochs=2, learning_rate=1e-2, batch_size=1, grad_accum=2, seed=3)

    first = train_lora(tiny_llama(), BATCH, config, pad_id=0)
    second = train_lora(tiny_llama(), BATCH, config, pad_id=0)

    assert first.losses == pytest.approx(second.losses)
    module = "model.layers.0.self_attn.q_proj"
    assert torch.equal(first.adapter.tensors[module][1], second.adapter.tensors[module][1])


def test_fast_lora_forward_matches_peft_loss_and_gradients():
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = tiny_llama()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    peft_model = get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)  # a trained adapter: zero lora_B would hide the LoRA path
    batch = collate(BATCH, pad_id=0, device="cpu")
    trainable = [p for p in peft_model.parameters() if p.requires_grad]

    def loss_and_grads():
        peft_model.zero_grad()
        loss, _ = loss_sum_fast(peft_model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    peft_loss, peft_grads = loss_and_grads()
    switched = use_fast_lora_forward(peft_model)
    fast_loss, fast_grads = loss_and_grads()

    assert switched == 2 * 3
    assert torch.allclose(fast_loss, peft_loss, rtol=1e-6)
    for expected, actual in zip(peft_grads, fast_grads):
        assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-7)


# the three added examples start with the first one's tokens, and the last repeats it whole
PREFIXED = BATCH + [Encoded([5, 6, 7, 20, 21, 22], target_start=3), Encoded([5, 6, 7, 8, 30], target_start=1),
                    Encoded([5, 6, 7, 8, 9, 10, 11], target_start=4)]


@pytest.mark.parametrize("examples", [BATCH, PREFIXED[2:], PREFIXED], ids=["no-prefix", "prefix", "mixed"])
def test_fused_forward_matches_peft(examples):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from mta_local.fused import FusedLlama, pack
    from mta_local.train import loss_sum_fused

    model = tiny_llama()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    padded = collate(examples, pad_id=0, device="cpu")
    trainable = [p for p in peft_model.parameters() if p.requires_grad]

    def loss_and_grads(loss_sum, batch):
        peft_model.zero_grad()
        loss, count = loss_sum(batch)
        loss.backward()
        return loss.detach(), count, [p.grad.clone() for p in trainable]

    peft_loss, peft_count, peft_grads = loss_and_grads(functools.partial(loss_sum_plain, peft_model), padded)
    assert FusedLlama.supports(peft_model)
    fused = FusedLlama(peft_model)
    fused_loss, fused_count, fused_grads = loss_and_grads(functools.partial(loss_sum_fused, fused), pack(examples, "cpu"))

    assert fused_count == peft_count
    assert torch.allclose(fused_loss, peft_loss, rtol=1e-5)
    for expected, actual in zip(peft_grads, fused_grads):
        assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-6)
    # the plain model still computes the same after its weights became views into the fused ones
    assert torch.allclose(loss_sum_plain(peft_model, padded)[0], peft_loss, rtol=1e-5)


def test_pack_stores_the_shared_prefix_once():
    from mta_local.fused import pack

    batch = pack(PREFIXED[2:5], "cpu")

    # the common prefix is [5, 6, 7]. The first example's rows follow it, then each other example's own rows.
    assert batch.input_ids.tolist() == [5, 6, 7, 20, 21, 22, 8, 30, 8, 9, 10, 11]
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 3, 4, 5, 6]
    assert batch.example_rows.tolist() == [[0, 1, 2, 3, 4, 5, 0], [0, 1, 2, 6, 7, 0, 0], [0, 1, 2, 8, 9, 10, 11]]
    assert batch.output_rows.tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 17, 18, 19, 20]
    assert batch.target_ids.tolist() == [20, 21, 22, 6, 7, 8, 30, 9, 10, 11]
    assert batch.target_rows.tolist() == [2, 3, 4, 0, 1, 2, 6, 8, 9, 10]
