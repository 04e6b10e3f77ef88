"""A user's profile: everything enroll produced for one person, kept in the private data dir.

    profiles/<name>/
        recipe.json                 bank id, anchors and weights, configs, timings, adapter probe
        history.json                the validated history items (BM25 retrieval at chat time)
        embedding.json              the user's retrieval embedding
        stacked/adapter_config.json the stacked adapter in PEFT format, on top of the merged base
        stacked/adapter_model.safetensors
        adapter.gguf                merged + stacked in one GGUF LoRA for llama.cpp

A profile is written to a temporary folder and renamed into place, so an interrupted enroll
leaves the previous profile (if any) untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import profiles_dir
from .errors import ProfileError
from .merge import LoraWeights

RECIPE = "recipe.json"
HISTORY = "history.json"
EMBEDDING = "embedding.json"
STACKED = "stacked"
ADAPTER_GGUF = "adapter.gguf"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ProfileError(f"invalid profile name {name!r}: use letters, digits, '.', '_' or '-' (max 64 characters).")
    return name


def profile_path(name: str) -> Path:
    return profiles_dir() / check_name(name)


@dataclass
class Profile:
    """An enrolled profile on disk."""

    name: str
    path: Path
    recipe: dict

    @property
    def adapter_gguf(self) -> Path:
        return self.path / ADAPTER_GGUF

    def history(self) -> list[dict]:
        return json.loads((self.path / HISTORY).read_text(encoding="utf-8"))

    def stacked(self) -> LoraWeights:
        from safetensors.torch import load_file

        config = json.loads((self.path / STACKED / "adapter_config.json").read_text(encoding="utf-8"))
        state = load_file(str(self.path / STACKED / "adapter_model.safetensors"))
        return LoraWeights.from_peft_state_dict(state, config["lora_alpha"] / config["r"])


def load_profile(name: str = "default") -> Profile:
    path = profile_path(name)
    recipe_path = path / RECIPE
    if not recipe_path.is_file():
        existing = list_profiles()
        hint = f" Enrolled profiles: {', '.join(existing)}." if existing else ""
        raise ProfileError(f"no profile {name!r} in {profiles_dir()}. Run `mta-local enroll HISTORY.json --profile {name}` first.{hint}")
    missing = [p for p in (ADAPTER_GGUF, HISTORY, f"{STACKED}/adapter_model.safetensors") if not (path / p).is_file()]
    if missing:
        raise ProfileError(f"profile {name!r} at {path} is incomplete (missing {', '.join(missing)}); enroll again.")
    return Profile(name, path, json.loads(recipe_path.read_text(encoding="utf-8")))


def list_profiles() -> list[str]:
    root = profiles_dir()
    return sorted(p.name for p in root.iterdir() if (p / RECIPE).is_file() and not p.name.startswith("."))


def save_stacked(folder: Path, adapter: LoraWeights, rank: int, alpha: float, target_modules, base_name: str) -> None:
    """Write the stacked adapter as PEFT's adapter_config.json + adapter_model.safetensors."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_name)
    data = config.to_dict()
    data = {key: (sorted(value) if isinstance(value, set) else value) for key, value in data.items()}
    (folder / "adapter_config.json").write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    save_file(adapter.to_peft_state_dict(), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


class ProfileWriter:
    """Collects a profile's files in a temporary folder; ``commit`` swaps it into place."""

    def __init__(self, name: str):
        self.name = check_name(name)
        self.target = profile_path(name)
        self.path = self.target.with_name(f".{name}.partial-{os.getpid()}")
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)

    def write_json(self, file_name: str, data) -> None:
        (self.path / file_name).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")

    def commit(self) -> Path:
        old = self.target.with_name(f".{self.name}.old-{os.getpid()}")
        if self.target.exists():
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        shutil.rmtree(old, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
