"""Rebuild a profile's adapters from the bank and recipe, and pick fixed prompts for fidelity checks."""

from __future__ import annotations

from pathlib import Path

from .bank import Bank, open_bank
from .errors import BankError
from .history import parse_history, training_examples
from .merge import LoraWeights, concat, merge_averaged, merge_exact
from .models import BaseModel
from .profile import Profile
from .templates import prompt_renderer


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
