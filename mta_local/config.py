"""Paths and per-stage configuration.

Every location mta-local reads or writes comes from this module. ``MTA_LOCAL_HOME`` moves all of
them under one folder (tests and portable installs use it); ``MTA_LOCAL_CACHE`` moves the cache
alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import platformdirs

APP_NAME = "mta-local"
HOME_ENV = "MTA_LOCAL_HOME"
CACHE_ENV = "MTA_LOCAL_CACHE"

# The PEFT module names of a llama block that adapters target. lm_head and embed_tokens are
# excluded on purpose: SmolLM2 ties them, and the GGUF exporter writes block tensors only.
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def user_dir() -> Path:
    """Return the folder for private data (profiles), creating it on demand."""
    home = os.environ.get(HOME_ENV)
    path = Path(home) / "data" if home else Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
    # owner-only: the folder keeps each user's history, embedding and adapters
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """Return the folder for derived, re-creatable files (installed banks, converted base models).

    ``MTA_LOCAL_CACHE`` sets it directly; otherwise it follows ``MTA_LOCAL_HOME``.
    """
    home = os.environ.get(HOME_ENV)
    if os.environ.get(CACHE_ENV):
        path = Path(os.environ[CACHE_ENV])
    elif home:
        path = Path(home) / "cache"
    else:
        path = Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_file() -> Path:
    """Return the path of the optional defaults file (``config.json`` next to the data dir's contents)."""
    home = os.environ.get(HOME_ENV)
    return (Path(home) if home else Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))) / "config.json"


def load_cli_defaults() -> dict:
    """Read command defaults from the config file, keyed like the CLI: {"enroll": {"model": ...}}.

    A missing file means no defaults. Raises MtaError for a file that is not a JSON object.
    """
    from .errors import MtaError

    path = config_file()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MtaError(f"{path}: invalid JSON ({exc}). Fix or delete the config file.") from None
    if not isinstance(data, dict) or not all(isinstance(value, dict) for value in data.values()):
        raise MtaError(f'{path}: expected an object of command names to option defaults, e.g. {{"enroll": {{"model": "PATH"}}}}.')
    return data


def profiles_dir() -> Path:
    path = user_dir() / "profiles"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def derived_dir() -> Path:
    """Return the folder for files rebuilt from a profile (runtime GGUF adapter, folded base copies).

    They hold the user's adaptation, so they stay in the private data dir, not in the cache.
    """
    path = user_dir() / "derived"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def builtin_banks_dir() -> Path:
    """Return the ``bank/`` folder of the source tree that contains the built-in banks."""
    return Path(__file__).resolve().parent.parent / "bank"


@dataclass
class LoraConfig:
    """Shape and training schedule of one LoRA adapter (an anchor's or a user's stacked one)."""

    rank: int = 8  # LoRA rank r; anchors use 8 and the stacked adapter 4
    alpha: float = 16.0  # scaling = alpha / rank
    target_modules: tuple[str, ...] = LLAMA_TARGET_MODULES  # PEFT module names inside each block
    epochs: int = 3  # passes over the training examples
    learning_rate: float = 1e-4  # peak AdamW learning rate, cosine-decayed to 0
    batch_size: int = 2  # examples per micro-batch, except in the fused Llama forward, which packs PACKED_ROWS tokens
    grad_accum: int = 4  # an optimizer step trains on batch_size x grad_accum examples
    max_tokens: int = 384  # prompt + target tokens per example; longer prompts are cut from the left of the history
    seed: int = 0  # seeds torch, the shuffle and the LoRA initialisation
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    use_rslora: bool = False  # rank-stabilized scaling alpha / sqrt(r); enroll rejects it (GGUF export assumes alpha / r)
    use_dora: bool = False  # weight-decomposed LoRA; enroll rejects it (GGUF LoRA adapters cannot carry its magnitude vector)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data


# Tokens per packed micro-batch of the fused training forward (``train.pack_rows``). An optimizer
# step's examples are split into micro-batches. The split changes how long they take and how
# much memory they hold, not the step's gradient, which is the sum over its examples.
PACKED_ROWS = 1024


# Final-stage (stacked adapter) schedules per task: rank 4, batch 2 x grad-accum 4, and the
# epochs and learning rates of the MTA paper's Table 4. The generic task uses the LaMP-2 values.
STACK_SCHEDULES = {
    "citation": dict(epochs=2, learning_rate=5e-5),
    "movie_tagging": dict(epochs=3, learning_rate=1e-4),
    "product_rating": dict(epochs=1, learning_rate=5e-5),
    "news_headline": dict(epochs=3, learning_rate=1e-4),
    "scholarly_title": dict(epochs=2, learning_rate=5e-5),
    "generic": dict(epochs=3, learning_rate=1e-4),
}


def stack_config(task: str, **overrides) -> LoraConfig:
    """Return the stacked-adapter config for a task, with CLI overrides applied."""
    values = dict(rank=4, alpha=8.0, **STACK_SCHEDULES[task])
    values.update({key: value for key, value in overrides.items() if value is not None})
    return LoraConfig(**values)


@dataclass
class EnrollConfig:
    """Choices made by ``mta-local enroll`` besides the stacked adapter's schedule."""

    top_k: int = 2  # anchors merged per user
    history_in_prompt: int = 1  # BM25-retrieved other history items put in each training prompt
    profile: str = "default"  # profile name under the data dir
