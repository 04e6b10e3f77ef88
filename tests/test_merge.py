import pytest
import torch

from mta_local.errors import BankError
from mta_local.merge import LoraWeights, concat, fold_into, merge_averaged, merge_exact
from mta_local.retrieve import merge_weights

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")
SHAPES = {MODULES[0]: (24, 16), MODULES[1]: (16, 40)}  # (out, in)


def random_lora(rank: int, alpha: float, seed: int) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        module: (torch.randn(rank, fan_in, generator=generator), torch.randn(fan_out, rank, generator=generator))
        for module, (fan_out, fan_in) in SHAPES.items()
    }
    return LoraWeights(tensors, alpha / rank)


@pytest.mark.parametrize("ranks", [(8,), (8, 4), (8, 4, 2), (8, 4, 6, 1)])
def test_merge_exact_equals_weighted_sum(ranks):
    adapters = [random_lora(rank, 2.0 * rank + i, seed=i) for i, rank in enumerate(ranks)]
    weights = merge_weights([0.9 - 0.1 * i for i in range(len(ranks))])

    merged = merge_exact(adapters, weights)

    assert merged.rank == sum(ranks)
    for module in MODULES:
        expected = sum(w * a.delta(module) for a, w in zip(adapters, weights))
        relative = (merged.delta(module) - expected).norm() / expected.norm()
        assert relative < 1e-5


def test_merge_weights_favour_most_similar():
    weights = merge_weights([0.9, 0.5])

    assert weights == pytest.approx([0.643, 0.357], abs=5e-4)
    assert weights[0] > weights[1]


def test_merge_weights_clip_negative_similarity():
    assert merge_weights([0.6, -0.2]) == pytest.approx([1.0, 0.0])
    assert merge_weights([-0.1, -0.3]) == pytest.approx([0.5, 0.5])


def test_averaged_merge_is_not_weighted_sum():
    adapters = [random_lora(4, 8.0, seed=1), random_lora(4, 8.0, seed=2)]
    weights = [0.6, 0.4]

    averaged = merge_averaged(adapters, weights)

    expected = sum(w * a.delta(MODULES[0]) for a, w in zip(adapters, weights))
    assert (averaged.delta(MODULES[0]) - expected).norm() / expected.norm() > 0.1


def test_averaged_merge_rejects_unequal_ranks():
    with pytest.raises(BankError, match="equal ranks"):
        merge_averaged([random_lora(4, 8.0, 1), random_lora(8, 16.0, 2)], [0.5, 0.5])


def test_merge_rejects_mismatched_modules():
    other = random_lora(4, 8.0, seed=3)
    del other.tensors[MODULES[1]]

    with pytest.raises(BankError, match="other modules"):
        merge_exact([random_lora(4, 8.0, 1), other], [0.5, 0.5], names=["a", "b"])


def test_merge_names_anchor_with_non_finite_values():
    broken = random_lora(4, 8.0, seed=4)
    broken.tensors[MODULES[0]][1][0, 0] = float("nan")

    with pytest.raises(BankError, match="non-finite"):
        merge_exact([random_lora(4, 8.0, 1), broken], [0.5, 0.5], names=["a", "b"])


def test_concat_then_fold_adds_deltas():
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    layers = torch.nn.ModuleList([torch.nn.Module()])
    model.model.layers = layers
    layers[0].self_attn = torch.nn.Module()
    layers[0].mlp = torch.nn.Module()
    layers[0].self_attn.q_proj = torch.nn.Linear(16, 24, bias=False)
    layers[0].mlp.down_proj = torch.nn.Linear(40, 16, bias=False)
    before = {m: model.get_submodule(m).weight.detach().clone() for m in MODULES}
    first, second = random_lora(8, 16.0, 1), random_lora(4, 8.0, 2)

    fold_into(model, concat([first, second]))

    for module in MODULES:
        expected = before[module] + first.delta(module) + second.delta(module)
        assert torch.allclose(model.get_submodule(module).weight, expected, atol=1e-4)


def test_peft_state_dict_round_trip():
    adapter = random_lora(4, 8.0, seed=5)

    state = adapter.to_peft_state_dict(torch.float32)
    restored = LoraWeights.from_peft_state_dict(state, adapter.scaling)

    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    for module in MODULES:
        assert torch.equal(restored.delta(module), adapter.delta(module))


def test_packed_round_trip():
    first, second = random_lora(4, 8.0, seed=6), random_lora(4, 8.0, seed=7)
    tensors = {**first.tensors, **{m.replace("layers.0", "layers.1"): pair for m, pair in second.tensors.items()}}
    adapter = LoraWeights(tensors, first.scaling)

    state, layout = adapter.to_packed(torch.float32)
    restored = LoraWeights.from_packed(state, layout, adapter.scaling)

    assert len(layout) == 2  # q_proj and down_proj, two layers each
    assert len(state) == 4
    assert sorted(m for modules in layout.values() for m in modules) == sorted(tensors)
    for module in tensors:
        assert torch.equal(restored.delta(module), adapter.delta(module))
