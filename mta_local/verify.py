"""Rebuild a profile's adapters from the bank and recipe, and check that every runtime applies them faithfully."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .bank import Bank, open_bank
from .errors import BankError, VerificationError
from .history import parse_history, training_examples
from .merge import LoraWeights, concat, merge_averaged, merge_exact
from .models import BaseModel
from .profile import Profile
from .templates import prompt_renderer

logger = logging.getLogger(__name__)


def merged_adapter(profile: Profile) -> LoraWeights:
    """Return the merged adapter of a profile, recomputed from its bank and recipe."""
    recipe = profile.recipe
    path = Path(recipe["bank"]["path"])
    bank = Bank(path) if path.is_dir() else open_bank(recipe["bank"]["id"], recipe["task"])
    if bank.bank_id != recipe["bank"]["id"]:
        raise BankError(f"profile {profile.name!r} was built from bank {recipe['bank']['id']!r}, which is not installed.")
    anchors = recipe["anchors"]
    merge = merge_exact if recipe.get("merge", "exact") == "exact" else merge_averaged
    return merge([bank.load_anchor(a["id"]) for a in anchors], [a["weight"] for a in anchors], [a["id"] for a in anchors])


def combined_adapter(profile: Profile) -> LoraWeights:
    """Return merged + stacked as one adapter, as exported to adapter.gguf."""
    return concat([merged_adapter(profile), profile.stacked()])


def fixed_prompts(profile: Profile, base: BaseModel, count: int) -> list[str]:
    """Return the first ``count`` training prompts of the profile, rendered with the chat template."""
    history = parse_history(profile.history(), source=str(profile.path), task=profile.recipe["task"])
    render = prompt_renderer(base)
    examples = training_examples(history, k=profile.recipe.get("history_in_prompt", 1))
    return [render(prompt) for prompt, _ in examples[:count]]


@dataclass
class VerifyConfig:
    """Thresholds and sizes of ``mta-local verify``."""

    prompts: int = 4  # fixed prompts: the profile's first training prompts, rendered with the chat template
    min_correlation: float = 0.9999  # adapter effect on logits, llama.cpp vs transformers, F32 base
    max_split_difference: float = 0.05  # max |logit| difference, combined adapter vs merged + stacked, F32 base
    greedy_tokens: int = 8  # generated tokens compared per prompt on the quantized base
    noise: float = 1e-6  # relative lora_B perturbation that measures the quantized base's noise floor
    seed: int = 0


@dataclass
class Check:
    name: str
    passed: bool
    summary: str  # one line: measured figures and the threshold


def verify_profile(profile: Profile, config: VerifyConfig | None = None) -> list[Check]:
    """Run the three export fidelity checks of a profile; return their results (never raises on a failed check)."""
    from .fidelity import compare_effects, f32_base_copy, greedy_agreement, perturbed, split_adapter_difference
    from .gguf_adapter import write_adapter
    from .models import resolve_base_model

    config = config or VerifyConfig()
    base = resolve_base_model(profile.recipe["base_model"]["path"])
    f32 = f32_base_copy(base)
    prompts = fixed_prompts(profile, base, config.prompts)
    merged, stacked = merged_adapter(profile), profile.stacked()
    combined = concat([merged, stacked])
    checks = []
    with tempfile.TemporaryDirectory(prefix="mta-verify-") as folder:
        work = Path(folder)

        # (a) llama.cpp (GGUF) vs transformers (PEFT weights folded), on the F32 copy
        combined_f32 = write_adapter(work / "combined-f32.gguf", combined, f32)
        effect = compare_effects(f32, combined_f32, combined, prompts)
        checks.append(Check(
            "runtime parity", effect.correlation >= config.min_correlation,
            f"adapter effect on next-token logits, llama.cpp vs transformers (F32 base, {effect.prompts} prompts): "
            f"correlation {effect.correlation:.7f} (threshold {config.min_correlation}), max |diff| "
            f"{effect.max_abs_diff:.4f}, effect scale {effect.effect_scale:.3f}"))

        # (b) one combined adapter vs merged + stacked as two adapters, on the F32 copy
        parts = [write_adapter(work / "merged-f32.gguf", merged, f32), write_adapter(work / "stacked-f32.gguf", stacked, f32)]
        difference = split_adapter_difference(f32, combined_f32, parts, prompts)
        checks.append(Check(
            "combined vs split", difference <= config.max_split_difference,
            f"combined adapter vs merged + stacked loaded as two adapters (F32 base): max |logit diff| "
            f"{difference:.4f} (threshold {config.max_split_difference})"))

        # (c) greedy agreement on the quantized base users run, above the noise floor
        combined_q = write_adapter(work / "combined.gguf", combined, base)
        noisy_q = write_adapter(work / "combined-perturbed.gguf", perturbed(combined, config.noise, config.seed), base)
        greedy = greedy_agreement(base, combined_q, noisy_q, combined, prompts, config.greedy_tokens)
        checks.append(Check(
            "greedy agreement", greedy.agreed == greedy.decisive,
            f"greedy tokens, llama.cpp ({base.path.name}) vs transformers: {greedy.agreed}/{greedy.decisive} agree "
            f"where the top-1 margin exceeds the noise floor {greedy.noise_floor:.4f} ({greedy.positions} positions)"))
    for check in checks:
        logger.info("%s: %s: %s", check.name, "ok" if check.passed else "FAILED", check.summary)
    return checks


def raise_on_failure(checks: list[Check], profile_name: str) -> None:
    failed = [check.name for check in checks if not check.passed]
    if failed:
        raise VerificationError(
            f"profile {profile_name!r} failed {', '.join(failed)}; enroll again to re-export the adapter, and check "
            "the llama-cpp-python version (0.3.36 is tested).")
