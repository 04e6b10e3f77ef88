"""Compare personalization methods on LaMP-format evaluation users, as in the MTA paper's Table 1.

Every method uses the same base model, chat template and task prompts:

- ``base``: the base model, no history in the prompt;
- ``prior``: no model. Label tasks answer the user's most frequent history label, rating the
  rounded mean history rating, free-text tasks the output of the most similar (BM25) history item;
- ``rag-K``: the base model with the user's K best BM25 history items in the prompt;
- ``adapt-only``: a rank-4 stacked adapter trained on the user's history over the plain base;
- ``merged-only``: the top-K bank anchors merged and folded into the base, no user training;
- ``mta``: merged anchors folded in, then the rank-4 stacked adapter trained on top.

The model methods put ``history_in_prompt`` BM25 items in each prompt, as enroll trains and chat
serves. Answers come from greedy transformers generation on the model in memory, rendered with
the llama.cpp chat template used in training; this skips the GGUF export ``enroll`` does per user.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .data import EvalUser, Query
from .errors import EvalError
from .history import Retriever
from .tasks import Task, with_history

logger = logging.getLogger(__name__)

METHODS = ("base", "prior", "rag-1", "rag-3", "rag-5", "adapt-only", "merged-only", "mta")
BASELINES = ("base", "prior", "rag-1", "rag-3", "rag-5")  # MTA is tested against the best of these
BANK_METHODS = ("merged-only", "mta")
PREDICTIONS = "predictions.jsonl"
RUN = "run.json"


@dataclass
class EvalConfig:
    """Choices of ``mta-local eval``; everything that changes a prediction is recorded in run.json."""

    methods: tuple[str, ...] = ("prior", "base")  # methods to run, in METHODS order in the results
    users: int = 0  # evaluate this many users drawn with ``seed`` (0: all)
    seed: int = 0  # seeds the user draw and the stacked adapter's training
    top_k: int = 2  # anchors merged per user (merged-only, mta)
    merge: str = "exact"  # "exact" (sum of weighted dW) or "averaged" (lora_A/lora_B averaged; ablation)
    merge_weights: tuple[float, ...] = ()  # fixed anchor weights instead of similarity weights (ablation)
    history_in_prompt: int = 1  # BM25 history items in each prompt of adapt-only, merged-only and mta
    max_new_tokens: int = 0  # generated tokens per answer (0: 8 for labels, 4 for ratings, 32 for text)
    max_prompt_tokens: int = 1024  # longer prompts lose tokens from their middle, as in training
    exclude_overlap: bool = False  # drop queries whose text is in the bank's training data
    resamples: int = 1000  # bootstrap resamples for the intervals and the paired test

    def to_dict(self) -> dict:
        data = asdict(self)
        data["methods"] = list(self.methods)
        data["merge_weights"] = list(self.merge_weights)
        return data


def parse_methods(text: str) -> tuple[str, ...]:
    """Parse a comma-separated method list ("all" for every method); raise EvalError on unknown names."""
    names = list(METHODS) if text.strip() == "all" else [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise EvalError(f"unknown method {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)} or all.")
    return tuple(name for name in METHODS if name in names)


def choose_users(users: list[EvalUser], count: int, seed: int) -> list[EvalUser]:
    """Return ``count`` users drawn with ``seed``, in file order (all of them when count is 0)."""
    if not count or count >= len(users):
        return list(users)
    chosen = set(random.Random(seed).sample(range(len(users)), count))
    return [user for index, user in enumerate(users) if index in chosen]


def default_max_new_tokens(task: Task) -> int:
    if task.name == "product_rating":
        return 4
    return 8 if task.labels else 32


# ---------------------------------------------------------------------------------------------
# the history prior (no model)

def prior_answer(task: Task, user: EvalUser, query: Query) -> str:
    """Answer from the history alone: most frequent label, rounded mean rating, or the nearest item's output."""
    targets = [task.target(item) for item in user.history.items]
    if task.name == "product_rating":
        mean = sum(float(t) for t in targets) / len(targets)
        return str(int(mean + 0.5))  # half up: round() would send a mean of 4.5 to 4 (half to even)
    if task.labels:
        return Counter(targets).most_common(1)[0][0]  # ties: the label seen first in the history
    best = Retriever(user.history).best_index(query.input)
    return targets[best]


# ---------------------------------------------------------------------------------------------
# model methods

@dataclass
class MethodResult:
    """One method's answers for one user."""

    predictions: list[str]
    seconds: float
    extra: dict = field(default_factory=dict)


class ModelRunner:
    """The base model in memory, with the bank, for the methods that generate."""

    def __init__(self, task: Task, config: EvalConfig, bank=None, model: str | None = None):
        import torch

        from .config import stack_config
        from .models import load_training_model, resolve_base_model
        from .templates import prompt_renderer

        self.task, self.config, self.bank = task, config, bank
        self.base = resolve_base_model(model)
        self.model, self.tokenizer = load_training_model(self.base)
        self.render = prompt_renderer(self.base)
        self.stack = stack_config(task.name, seed=config.seed)
        self.max_new_tokens = config.max_new_tokens or default_max_new_tokens(task)
        # pristine copies of every weight an adapter can change, restored after each user
        self._original = {name: module.weight.detach().clone() for name, module in self.model.named_modules()
                          if name.rsplit(".", 1)[-1] in self.stack.target_modules}
        self._torch = torch
        self.embedder = None
        if bank is not None:
            from .embed import load_embedder

            embedder_name, self.embedder = load_embedder(bank.manifest["embedder"]["name"])
            bank.check_compatible(self.base, embedder_name)

    def restore(self) -> None:
        with self._torch.no_grad():
            for name, weight in self._original.items():
                self.model.get_submodule(name).weight.copy_(weight)

    def generate(self, text: str) -> str:
        from .train import cut_middle

        ids = self.tokenizer(self.render(text), add_special_tokens=False)["input_ids"]
        ids = cut_middle(ids, self.config.max_prompt_tokens)
        input_ids = self._torch.tensor([ids], device=self.model.device)
        with self._torch.no_grad():
            output = self.model.generate(input_ids=input_ids, attention_mask=self._torch.ones_like(input_ids),
                                         max_new_tokens=self.max_new_tokens, do_sample=False,
                                         pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()

    def answer(self, user: EvalUser, history_items: int) -> list[str]:
        retriever = Retriever(user.history)
        return [self.generate(with_history(q.instruction, retriever.lines(q.input, history_items)))
                for q in user.queries]

    def merge_for(self, user: EvalUser) -> dict:
        """Fold the user's merged anchors into the model; return the anchors and weights used."""
        from .embed import user_embedding
        from .merge import fold_into, merge_averaged, merge_exact
        from .retrieve import select_anchors

        vector = user_embedding(self.embedder, [self.task.history_line(item) for item in user.history.items])
        anchor_ids, anchor_vectors = self.bank.anchor_embeddings()
        choices = select_anchors(vector, anchor_vectors, anchor_ids, min(self.config.top_k, len(anchor_ids)))
        weights = list(self.config.merge_weights) or [choice.weight for choice in choices]
        names = [choice.anchor_id for choice in choices]
        adapters = [self.bank.load_anchor(name) for name in names]
        merged = (merge_exact if self.config.merge == "exact" else merge_averaged)(adapters, weights, names)
        fold_into(self.model, merged)
        return {"anchors": names, "weights": [round(w, 4) for w in weights]}

    def train_stacked(self, user: EvalUser) -> dict:
        """Train the rank-4 stacked adapter on the current model and fold it in; return its final loss."""
        from .history import training_examples
        from .merge import fold_into
        from .train import encode_examples, train_lora

        examples = training_examples(user.history, k=self.config.history_in_prompt)
        encoded = encode_examples(self.tokenizer, self.render, examples, self.base.eos_token, self.stack.max_tokens)
        result = train_lora(self.model, encoded, self.stack, self.tokenizer.pad_token_id or 0)
        self.model.eval()  # train_lora leaves the model in training mode
        fold_into(self.model, result.adapter)
        return {"final_loss": round(result.losses[-1], 4)}

    def run_user(self, user: EvalUser, methods: list[str], on_result) -> None:
        """Run the requested model methods for one user, calling on_result(method, MethodResult) after each.

        The model is restored to the plain base afterwards.
        """
        k = self.config.history_in_prompt

        def timed(name, steps, extra_seconds=0.0):
            started = time.perf_counter()
            extra = {}
            for step in steps:
                extra.update(step() or {})
            answers = self.answer(user, extra.pop("_k", k))
            on_result(name, MethodResult(answers, time.perf_counter() - started + extra_seconds, extra))

        try:
            for name in methods:
                if name == "base":
                    timed(name, [lambda: {"_k": 0}])
                elif name.startswith("rag-"):
                    timed(name, [lambda n=int(name[4:]): {"_k": n}])
                elif name == "adapt-only":
                    self.restore()
                    timed(name, [lambda: self.train_stacked(user)])
                    self.restore()
            if "merged-only" in methods or "mta" in methods:
                started = time.perf_counter()
                merge_info = self.merge_for(user)
                merge_seconds = time.perf_counter() - started
                if "merged-only" in methods:
                    timed("merged-only", [lambda: merge_info], merge_seconds)
                if "mta" in methods:
                    timed("mta", [lambda: merge_info, lambda: self.train_stacked(user)], merge_seconds)
        finally:
            self.restore()


# ---------------------------------------------------------------------------------------------
# the run: cached per user in predictions.jsonl

def read_done(out_dir: Path) -> dict[tuple[str, str], dict]:
    """Return the cached records of an earlier run in ``out_dir``, keyed by (user id, method)."""
    path = out_dir / PREDICTIONS
    done = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted write; that user runs again
                done[(record["user_id"], record["method"])] = record
    return done


def check_run_file(out_dir: Path, run: dict) -> None:
    """Write run.json, or check that the one already there records the same run (so cached answers fit)."""
    path = out_dir / RUN
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        keys = ("task", "data", "bank", "model", "config")
        changed = [key for key in keys if previous.get(key) != run.get(key) and key != "config"]
        old_config, new_config = previous.get("config", {}), run["config"]
        changed += [f"config.{k}" for k in new_config if k not in ("methods", "users", "resamples")
                    and old_config.get(k) != new_config[k]]
        if changed:
            raise EvalError(f"{out_dir} contains a run with other settings ({', '.join(changed)}); "
                            "pass another --out or delete that folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")


def run_eval(users: list[EvalUser], task: Task, config: EvalConfig, out_dir: Path, run: dict, bank=None,
             model: str | None = None, progress=None) -> dict[tuple[str, str], dict]:
    """Run every method for every user, appending each user's answers to predictions.jsonl.

    Pairs (user, method) already in the file are skipped, so an interrupted run resumes.
    ``progress``, if given, is called as progress(users_done, users_total) after each user.
    Returns all records keyed by (user id, method).
    """
    check_run_file(out_dir, run)
    done = read_done(out_dir)
    runner = None
    with open(out_dir / PREDICTIONS, "a", encoding="utf-8") as sink:
        for number, user in enumerate(users, start=1):
            missing = [m for m in config.methods if (user.user_id, m) not in done]

            def write(method: str, result: MethodResult) -> None:
                record = {"user_id": user.user_id, "method": method, "seconds": round(result.seconds, 3),
                          "queries": [{"id": q.query_id, "prediction": p, "gold": q.gold}
                                      for q, p in zip(user.queries, result.predictions)],
                          **result.extra}
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                done[(user.user_id, method)] = record

            if "prior" in missing:
                started = time.perf_counter()
                write("prior", MethodResult([prior_answer(task, user, q) for q in user.queries],
                                            time.perf_counter() - started))
            model_methods = [m for m in missing if m != "prior"]
            if model_methods:
                if runner is None:
                    runner = ModelRunner(task, config, bank if set(config.methods) & set(BANK_METHODS) else None, model)
                runner.run_user(user, model_methods, write)
            if progress is not None:
                progress(number, len(users))
    return done
