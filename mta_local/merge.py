"""LoRA weights as plain tensors, and the exact weight-space merge of anchors.

A LoRA on a linear layer adds dW = scaling * B @ A, with A of shape (r, in) and B of shape
(out, r). Merging K anchors with weights alpha_i exactly means

    dW_merged = sum_i alpha_i * scaling_i * B_i @ A_i,

which is itself a LoRA of rank sum_i r_i: stack the A_i along the rank axis and the scaled B_i
along theirs (peft calls this combination "cat"). Averaging A and B separately (peft "linear",
LoraHub) adds cross terms B_i @ A_j and is only kept as an ablation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .errors import BankError

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


@dataclass
class LoraWeights:
    """One LoRA adapter: per module path, (lora_A of shape (r, in), lora_B of shape (out, r))."""

    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float  # dW = scaling * B @ A for every module

    @property
    def rank(self) -> int:
        return next(iter(self.tensors.values()))[0].shape[0]

    def delta(self, module: str) -> torch.Tensor:
        lora_a, lora_b = self.tensors[module]
        return self.scaling * (lora_b.float() @ lora_a.float())

    def folded(self) -> "LoraWeights":
        """Return the same adapter with its scaling multiplied into every lora_B (scaling 1)."""
        tensors = {m: (a.float(), b.float() * self.scaling) for m, (a, b) in self.tensors.items()}
        return LoraWeights(tensors, 1.0)

    @classmethod
    def from_peft_state_dict(cls, state: dict[str, torch.Tensor], scaling: float) -> "LoraWeights":
        """Build from a PEFT adapter state dict (keys ``base_model.model.<module>.lora_A.weight``)."""
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if part not in ("A.weight", "B.weight"):
                raise BankError(f"unexpected tensor {key!r} in a LoRA state dict; expected lora_A/lora_B weights.")
            pairs.setdefault(module, {})[part[0]] = value
        tensors = {}
        for module, pair in sorted(pairs.items()):
            if set(pair) != {"A", "B"}:
                raise BankError(f"module {module!r} has lora_{''.join(pair)} but not both lora_A and lora_B.")
            tensors[module] = (pair["A"], pair["B"])
        return cls(tensors, scaling)

    def to_packed(self, dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        """Return (tensors, layout): the modules of one kind and shape stacked along a new first axis.

        A per-module safetensors file of the default model names 420 tensors, and that header is
        about 2 % of a rank-4 adapter's bytes. Packed, 14 tensors remain. ``layout`` maps each
        packed key to its modules in stacking order.
        """
        groups: dict[tuple, list[str]] = {}
        for module, (lora_a, lora_b) in self.tensors.items():
            groups.setdefault((module.rsplit(".", 1)[-1], tuple(lora_a.shape), tuple(lora_b.shape)), []).append(module)
        state, layout = {}, {}
        for index, ((kind, _, _), modules) in enumerate(sorted(groups.items())):
            key = f"{index}.{kind}"
            state[f"{key}.lora_A"] = torch.stack([self.tensors[m][0] for m in modules]).to(dtype).contiguous()
            state[f"{key}.lora_B"] = torch.stack([self.tensors[m][1] for m in modules]).to(dtype).contiguous()
            layout[key] = modules
        return state, layout

    @classmethod
    def from_packed(cls, state: dict[str, torch.Tensor], layout: dict[str, list[str]], scaling: float) -> "LoraWeights":
        """Inverse of ``to_packed``."""
        tensors = {}
        for key, modules in layout.items():
            lora_a, lora_b = state[f"{key}.lora_A"], state[f"{key}.lora_B"]
            if lora_a.shape[0] != len(modules) or lora_b.shape[0] != len(modules):
                raise BankError(f"packed LoRA tensor {key!r} contains {lora_a.shape[0]} modules but its layout lists {len(modules)}; "
                                "enroll again to rewrite the adapter.")
            for index, module in enumerate(modules):
                tensors[module] = (lora_a[index], lora_b[index])
        return cls(dict(sorted(tensors.items())), scaling)

    def to_peft_state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        state = {}
        for module, (lora_a, lora_b) in self.tensors.items():
            state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = lora_a.to(dtype).contiguous()
            state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = lora_b.to(dtype).contiguous()
        return state


def _check_adapters(adapters: list[LoraWeights], weights: list[float], names: list[str]) -> list[str]:
    """Check that the adapters cover the same modules with matching shapes; return the modules."""
    if not adapters:
        raise BankError("no adapters to merge; choose at least one anchor (--top-k 1 or more).")
    if len(adapters) != len(weights):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    modules = sorted(adapters[0].tensors)
    for adapter, name in zip(adapters[1:], names[1:]):
        if sorted(adapter.tensors) != modules:
            raise BankError(f"anchor {name!r} targets other modules than anchor {names[0]!r}; rebuild the bank.")
        for module in modules:
            shape_a, shape_b = adapter.tensors[module][0].shape[1], adapter.tensors[module][1].shape[0]
            ref_a, ref_b = adapters[0].tensors[module][0].shape[1], adapters[0].tensors[module][1].shape[0]
            if (shape_a, shape_b) != (ref_a, ref_b):
                raise BankError(
                    f"anchor {name!r}, module {module}: in/out size {(shape_a, shape_b)} differs from "
                    f"{(ref_a, ref_b)} of anchor {names[0]!r}; the anchors come from different base models."
                )
    return modules


def merge_exact(adapters: list[LoraWeights], weights: list[float], names: list[str] | None = None) -> LoraWeights:
    """Merge anchors exactly in weight space by concatenating ranks (scaling folded into lora_B)."""
    names = names or [str(i) for i in range(len(adapters))]
    modules = _check_adapters(adapters, weights, names)

    tensors = {}
    for module in modules:
        # A: (sum r_i, in) and B: (out, sum r_i), so B @ A = sum_i w_i s_i B_i A_i.
        lora_a = torch.cat([adapter.tensors[module][0].float() for adapter in adapters], dim=0)
        lora_b = torch.cat(
            [adapter.tensors[module][1].float() * (weight * adapter.scaling)
             for adapter, weight in zip(adapters, weights)],
            dim=1,
        )
        tensors[module] = (lora_a, lora_b)

    merged = LoraWeights(tensors, 1.0)
    _check_finite(merged, names)
    return merged


def merge_averaged(adapters: list[LoraWeights], weights: list[float], names: list[str] | None = None) -> LoraWeights:
    """Average lora_A and lora_B separately (ablation only: it is not sum_i w_i dW_i)."""
    names = names or [str(i) for i in range(len(adapters))]
    modules = _check_adapters(adapters, weights, names)
    ranks = {adapter.rank for adapter in adapters}
    if len(ranks) != 1:
        raise BankError(f"averaging lora_A and lora_B needs equal ranks, got {sorted(ranks)}; use the exact merge.")

    tensors = {}
    for module in modules:
        lora_a = sum(w * a.tensors[module][0].float() for a, w in zip(adapters, weights))
        lora_b = sum(w * a.scaling * a.tensors[module][1].float() for a, w in zip(adapters, weights))
        tensors[module] = (lora_a, lora_b)
    merged = LoraWeights(tensors, 1.0)
    _check_finite(merged, names)
    return merged


def concat(adapters: list[LoraWeights]) -> LoraWeights:
    """Return one adapter equal to the sum of the given ones (ranks concatenated, scaling folded)."""
    return merge_exact(adapters, [1.0] * len(adapters))


def _check_finite(adapter: LoraWeights, names: list[str]) -> None:
    for module, (lora_a, lora_b) in adapter.tensors.items():
        if not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
            raise BankError(
                f"merging anchors {names} gave non-finite values in {module}; one of these anchor files is corrupt."
            )


@torch.no_grad()
def fold_into(model: torch.nn.Module, adapter: LoraWeights) -> None:
    """Add the adapter's dW into the model's linear weights in place (W <- W + dW)."""
    for module, _ in adapter.tensors.items():
        layer = model.get_submodule(module)
        layer.weight += adapter.delta(module).to(layer.weight.dtype)
