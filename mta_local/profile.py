"""A user's profile: what enroll produced for one person, kept in the private data dir.

    profiles/<name>/
        recipe.json                 bank id, anchors and weights, configs, timings, adapter probe
        history.json                the validated history items (BM25 retrieval at chat time)
        embedding.json              the user's retrieval embedding
        stacked/adapter_config.json the stacked adapter's LoRA config (PEFT's format)
        stacked/adapter.safetensors its weights (fp16), packed per module kind

    derived/<name>/
        adapter-<key>.gguf          merged + stacked in one GGUF LoRA for llama.cpp
        base-folded-<key>.Q8_0.gguf the base with both adapters folded in (written by chat)

The profile folder is the durable part. The derived files are rebuilt from it and the bank when
they are missing. ``key`` hashes what they are built from, so a re-enrolled profile never picks
up a stale one.

A profile is written to a temporary folder and renamed into place, so an interrupted enroll
leaves the previous profile (if any) untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .config import derived_dir, profiles_dir
from .errors import ProfileError
from .merge import LoraWeights

RECIPE = "recipe.json"
HISTORY = "history.json"
EMBEDDING = "embedding.json"
STACKED = "stacked"
STACKED_WEIGHTS = "adapter.safetensors"
LEGACY_STACKED_WEIGHTS = "adapter_model.safetensors"  # per-module PEFT state dict of earlier versions
ADAPTER_GGUF = "adapter.gguf"  # name of the runtime adapter while enroll writes it
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

    def _stacked_file(self) -> Path:
        packed = self.path / STACKED / STACKED_WEIGHTS
        return packed if packed.is_file() else self.path / STACKED / LEGACY_STACKED_WEIGHTS

    @cached_property
    def key(self) -> str:
        """Hash of what the derived files are built from: stacked weights, bank, anchors, weights, base."""
        digest = hashlib.sha256(self._stacked_file().read_bytes())
        source = {name: self.recipe.get(name) for name in ("bank", "anchors", "merge", "base_model")}
        source["anchors"] = [(a["id"], a["weight"]) for a in source["anchors"] or []]
        digest.update(json.dumps(source, sort_keys=True).encode("utf-8"))
        return digest.hexdigest()[:16]

    @property
    def derived_path(self) -> Path:
        return derived_dir() / self.name

    @property
    def adapter_gguf(self) -> Path:
        """Path of this profile's runtime GGUF adapter (``derived.ensure_adapter`` writes it)."""
        return self.derived_path / f"adapter-{self.key}.gguf"

    def history(self) -> list[dict]:
        return json.loads((self.path / HISTORY).read_text(encoding="utf-8"))

    def stacked(self) -> LoraWeights:
        from safetensors import safe_open

        config = json.loads((self.path / STACKED / "adapter_config.json").read_text(encoding="utf-8"))
        scaling = config["lora_alpha"] / config["r"]
        with safe_open(str(self._stacked_file()), framework="pt") as weights:
            state = {key: weights.get_tensor(key) for key in weights.keys()}
            layout = (weights.metadata() or {}).get("layout")
        if layout is None:
            return LoraWeights.from_peft_state_dict(state, scaling)
        return LoraWeights.from_packed(state, json.loads(layout), scaling)


def load_profile(name: str = "default") -> Profile:
    path = profile_path(name)
    recipe_path = path / RECIPE
    if not recipe_path.is_file():
        existing = list_profiles()
        hint = f" Enrolled profiles: {', '.join(existing)}." if existing else ""
        raise ProfileError(f"no profile {name!r} in {profiles_dir()}. Run `mta-local enroll HISTORY.json --profile {name}` first.{hint}")
    missing = [p for p in (HISTORY, RECIPE, f"{STACKED}/adapter_config.json") if not (path / p).is_file()]
    if not any((path / STACKED / f).is_file() for f in (STACKED_WEIGHTS, LEGACY_STACKED_WEIGHTS)):
        missing.append(f"{STACKED}/{STACKED_WEIGHTS}")
    if missing:
        raise ProfileError(f"profile {name!r} at {path} is incomplete (missing {', '.join(missing)}); enroll again.")
    return Profile(name, path, json.loads(recipe_path.read_text(encoding="utf-8")))


def list_profiles() -> list[str]:
    root = profiles_dir()
    return sorted(p.name for p in root.iterdir() if (p / RECIPE).is_file() and not p.name.startswith("."))


def save_stacked(folder: Path, adapter: LoraWeights, rank: int, alpha: float, target_modules, base_name: str) -> None:
    """Write the stacked adapter: PEFT's adapter_config.json and the packed fp16 weights."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_name)
    data = config.to_dict()
    data = {key: (sorted(value) if isinstance(value, set) else value) for key, value in data.items()}
    (folder / "adapter_config.json").write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    state, layout = adapter.to_packed()
    save_file(state, str(folder / STACKED_WEIGHTS), metadata={"format": "pt", "layout": json.dumps(layout)})


class ProfileWriter:
    """Collects a profile's files in a temporary folder; ``commit`` swaps it into place."""

    def __init__(self, name: str):
        self.name = check_name(name)
        self.target = profile_path(name)
        self.path = self.target.with_name(f".{name}.partial-{os.getpid()}")
        remove_abandoned(self.target)
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)

    def write_json(self, file_name: str, data) -> None:
        (self.path / file_name).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")

    def commit(self) -> Path:
        """Swap the profile into place; move the runtime adapter written beside it to the derived folder.

        Order: new adapter in, profile swapped, then stale derived files out. An interruption at
        any point leaves a profile whose derived files are either present or rebuilt on use.
        """
        adapter = self.path / ADAPTER_GGUF
        if adapter.is_file():
            fresh = Profile(self.name, self.path, json.loads((self.path / RECIPE).read_text(encoding="utf-8")))
            fresh.derived_path.mkdir(mode=0o700, exist_ok=True)
            os.replace(adapter, fresh.adapter_gguf)
        old = self.target.with_name(f".{self.name}.old-{os.getpid()}")
        if self.target.exists():
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        shutil.rmtree(old, ignore_errors=True)
        remove_stale_derived(load_profile(self.name))
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def remove_abandoned(target: Path) -> None:
    """Delete ``.NAME.partial-PID`` and ``.NAME.old-PID`` folders beside ``target`` whose process has ended.

    A process killed mid-enroll (a crash, SIGKILL) cannot clean up its temporary folder; the next
    enroll of the same name does. Only POSIX can ask whether a process id is alive.
    """
    if os.name != "posix" or not target.parent.is_dir():
        return
    for path in target.parent.glob(f".{target.name}.*-*"):
        kind, _, pid = path.name[len(target.name) + 2:].partition("-")
        if kind in ("partial", "old") and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def remove_stale_derived(profile: Profile) -> None:
    """Delete derived files of earlier enrolls of this profile name (their key differs)."""
    if not profile.derived_path.is_dir():
        return
    for path in profile.derived_path.iterdir():
        if profile.key not in path.name:
            path.unlink(missing_ok=True)
