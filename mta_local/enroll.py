"""Enroll a user: embed -> retrieve anchors -> merge -> fold -> train the stacked adapter -> export.

Each stage is timed, and ``EnrollResult.timings`` maps each stage to its seconds (load, embed, retrieve,
merge, fold, train, export).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .bank import open_bank
from .config import EnrollConfig, LoraConfig
from .embed import load_embedder, user_embedding
from .errors import BankError, UnsupportedModelError
from .history import read_history, training_examples
from .merge import fold_into, merge_averaged, merge_exact
from .models import load_training_model, pick_device, release_memory, resolve_base_model
from .profile import ADAPTER_GGUF, EMBEDDING, HISTORY, RECIPE, STACKED, Profile, ProfileWriter, save_stacked
from .retrieve import AnchorChoice, select_anchors
from .templates import prompt_renderer
from .train import encode_examples, train_lora

logger = logging.getLogger(__name__)


@dataclass
class EnrollResult:
    profile_path: Path
    task: str
    bank_id: str
    anchors: list[AnchorChoice]
    losses: list[float]
    train_tokens: int  # tokens the stacked adapter was trained on (prompt + target, all epochs)
    train_seconds: float  # the optimizer loop alone; the "train" timing adds tokenizing and wrapping
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        """Bytes of the profile folder (the runtime GGUF adapter lives outside it, in derived/)."""
        return sum(p.stat().st_size for p in self.profile_path.rglob("*") if p.is_file())


def check_stack_config(stack: LoraConfig, label: str = "stacked adapter") -> None:
    """Reject LoRA settings the exporters cannot reproduce, before any training."""
    if stack.rank < 1:
        raise UnsupportedModelError(f"{label} rank must be at least 1, got {stack.rank}; pass --rank 4.")
    forbidden = {"lm_head", "embed_tokens"} & {module.rsplit(".", 1)[-1] for module in stack.target_modules}
    if forbidden:
        raise UnsupportedModelError(
            f"{label}: adapters on {', '.join(sorted(forbidden))} cannot be exported (the default model ties them and "
            "llama.cpp adapters cover block projections only); target the q/k/v/o/gate/up/down projections."
        )
    variants = [name for name, used in (("rsLoRA", stack.use_rslora), ("DoRA", stack.use_dora)) if used]
    if variants:
        raise UnsupportedModelError(
            f"{label}: {' and '.join(variants)} cannot be exported (llama.cpp scales every GGUF LoRA by alpha / r and "
            "has no DoRA magnitude vector); train a plain LoRA (use_rslora=False, use_dora=False)."
        )


def check_bank_exportable(the_bank) -> None:
    """Reject a bank whose anchors the exporters cannot reproduce (same rules as the stacked adapter)."""
    lora = the_bank.manifest.get("lora", {})
    known = {key: lora[key] for key in ("rank", "target_modules", "use_rslora", "use_dora") if key in lora}
    check_stack_config(LoraConfig(**known), label=f"bank {the_bank.bank_id}")


def enroll(history_path, enroll_config: EnrollConfig, stack: LoraConfig | None = None, *, task: str | None = None,
           bank: str | None = None, model: str | None = None, embedder: str | None = None, merge: str = "exact",
           progress=None) -> EnrollResult:
    """Personalize the base model with one user's history; write the profile and return a summary."""
    from .config import stack_config

    timings: dict[str, float] = {}

    @contextmanager
    def stage(name: str):
        started = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - started
        logger.info("stage %-8s %6.2f s", name, timings[name])

    # load: validate everything before the first tensor is touched
    with stage("load"):
        release_memory()  # frees a previous enroll's model and training heap in this process
        history = read_history(history_path, task)
        stack = stack or stack_config(history.task.name)
        check_stack_config(stack)
        base = resolve_base_model(model)
        the_bank = open_bank(bank, history.task.name)
        if the_bank.task != history.task.name:
            raise BankError(f"bank {the_bank.bank_id} is for task {the_bank.task!r} but the history is "
                            f"{history.task.name!r}; pass --bank with a {history.task.name} bank or --task {the_bank.task}.")
        embedder_name, embedder_model = load_embedder(embedder or the_bank.manifest["embedder"]["name"])
        the_bank.check_compatible(base, embedder_name)
        check_bank_exportable(the_bank)
        training_model, tokenizer = load_training_model(base)

    with stage("embed"):
        vector = user_embedding(embedder_model, [history.task.history_line(item) for item in history.items])

    with stage("retrieve"):
        anchor_ids, anchor_vectors = the_bank.anchor_embeddings()
        choices = select_anchors(vector, anchor_vectors, anchor_ids, min(enroll_config.top_k, len(anchor_ids)))
        for choice in choices:
            logger.info("anchor %s similarity %.4f weight %.4f", choice.anchor_id, choice.similarity, choice.weight)

    with stage("merge"):
        adapters = [the_bank.load_anchor(choice.anchor_id) for choice in choices]
        weights = [choice.weight for choice in choices]
        names = [choice.anchor_id for choice in choices]
        merged = (merge_exact if merge == "exact" else merge_averaged)(adapters, weights, names)

    with stage("fold"):
        fold_into(training_model, merged)

    with stage("train"):
        examples = training_examples(history, k=enroll_config.history_in_prompt)
        encoded = encode_examples(tokenizer, prompt_renderer(base), examples, base.eos_token, stack.max_tokens)
        result = train_lora(training_model, encoded, stack, tokenizer.pad_token_id or 0, progress=progress)

    with stage("export"):
        recipe = {
            "format_version": 1,
            "profile": enroll_config.profile,
            "task": history.task.name,
            "bank": {"id": the_bank.bank_id, "path": str(the_bank.path)},
            "base_model": {"name": base.name, "path": str(base.path), "sha256": base.sha256},
            "embedder": embedder_name,
            "anchors": [{"id": c.anchor_id, "similarity": round(c.similarity, 6), "weight": c.weight}
                        for c in choices],
            "merge": merge,
            "stack": stack.to_dict(),
            "history_in_prompt": enroll_config.history_in_prompt,
            "history_items": len(history.items),
            "source": Path(history.source).name,
            "device": pick_device(),
            "losses": [round(loss, 4) for loss in result.losses],
            "created_by": f"mta-local {__version__}",
        }
        path = _write_profile(enroll_config.profile, history, vector, result.adapter, stack, base, recipe)
    logger.info("profile %s written to %s", enroll_config.profile, path)
    return EnrollResult(path, history.task.name, the_bank.bank_id, choices, result.losses, result.tokens,
                        result.seconds, timings)


def _write_profile(name, history, vector, stacked, stack, base, recipe) -> Path:
    from .chat import adapter_probe
    from .derived import write_runtime_adapter

    writer = ProfileWriter(name)
    try:
        writer.write_json(HISTORY, history.items)
        writer.write_json(EMBEDDING, [round(float(x), 7) for x in vector])
        save_stacked(writer.path / STACKED, stacked, stack.rank, stack.alpha, stack.target_modules, base.name)
        writer.write_json(RECIPE, recipe)
        # the runtime adapter comes from the stored files, exactly as a later rebuild makes it
        adapter = write_runtime_adapter(Profile(name, writer.path, recipe), writer.path / ADAPTER_GGUF, base)
        recipe["probe"] = adapter_probe(base, adapter, history)
        writer.write_json(RECIPE, recipe)
        return writer.commit()
    except BaseException:
        writer.discard()
        raise
