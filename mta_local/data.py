"""Read LaMP-format evaluation data and check it against a bank's training data.

Two layouts are read:

- the per-user file written by the converters: ``[{user_id, profile: [...], query: [{id, input, gold}]}]``;
- the LaMP benchmark's own pair ``*_questions.json`` (``[{id, input, profile}]``) and
  ``*_outputs.json`` (``{"task": ..., "golds": [{id, output}]}``); each question is one user.

A query's ``input`` is either the raw input (a review, a movie description) or the full LaMP
prompt; the raw input is recovered from the prompt so that every method builds its own prompt
from the same task instruction.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import HistoryError, LeakageError
from .history import History, parse_history
from .tasks import Task

logger = logging.getLogger(__name__)

# LaMP's own query prompts where they differ from ours (LaMP-4 and LaMP-5 put a colon before the
# text); the raw input is what follows the prefix.
LAMP_QUERY_PREFIXES = {
    "news_headline": ("Generate a headline for the following article: ",),
    "scholarly_title": ("Generate a title for the following abstract of a paper: ",),
}


@dataclass(frozen=True)
class Query:
    """One evaluation question of a user: the raw input, the instruction built from it, and the gold answer."""

    query_id: str
    input: str  # raw input text (review, description, article, abstract); the full prompt for citation
    instruction: str  # the task instruction every method answers
    gold: str


@dataclass
class EvalUser:
    """A user to evaluate: their history items (the profile) and their held-out queries."""

    user_id: str
    history: History
    queries: list[Query]


def raw_input(task: Task, text: str) -> str:
    """Return the raw input inside a LaMP query prompt, or ``text`` itself when it is no prompt."""
    extracted = task.extract_input(text)
    if extracted is not None:
        return extracted.strip()
    prefix, _, suffix = task.instruction("\x00").partition("\x00")
    for candidate in (prefix, *LAMP_QUERY_PREFIXES.get(task.name, ())):
        if candidate and text.startswith(candidate):
            rest = text[len(candidate):]
            if suffix.strip() and rest.rstrip().endswith(suffix.strip()):
                rest = rest.rstrip()[: -len(suffix.strip())]
            return rest.strip()
    return text.strip()


def make_query(task: Task, query_id, text: str, gold) -> Query:
    """Build a Query from a LaMP query record (citation queries keep their full prompt)."""
    if task.name == "citation":
        return Query(str(query_id), text, text, str(gold).strip())
    raw = raw_input(task, text)
    return Query(str(query_id), raw, task.instruction(raw), str(gold).strip())


def load_eval_users(path: str | Path, task: str | None = None, outputs: str | Path | None = None) -> list[EvalUser]:
    """Read evaluation users from a per-user file or a LaMP ``*_questions.json`` (+ ``*_outputs.json``).

    For a questions file the outputs file is ``outputs`` or the sibling whose name has
    ``outputs`` in place of ``questions``. Raises HistoryError naming the file and the user at fault.
    """
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, list) and data and isinstance(data[0], dict) and "query" not in data[0] and "input" in data[0]:
        outputs = Path(outputs) if outputs else path.with_name(path.name.replace("questions", "outputs"))
        if outputs == path or not outputs.is_file():
            raise HistoryError(f"{path}: a LaMP questions file needs its outputs file ({outputs} not found); "
                               "pass --outputs PATH.")
        data = _join_questions(data, _read_json(outputs), outputs)
    if not isinstance(data, list) or not data:
        raise HistoryError(f"{path}: expected a non-empty JSON list of users {{user_id, profile, query}}.")

    users = []
    for index, record in enumerate(data):
        if not isinstance(record, dict) or not {"user_id", "profile", "query"} <= record.keys():
            raise HistoryError(f"{path}: user {index} needs the fields 'user_id', 'profile' and 'query'.")
        source = f"{path} user {record['user_id']}"
        history = parse_history(record["profile"], source=source, task=task)
        task = history.task.name
        queries = []
        for number, query in enumerate(record["query"] if isinstance(record["query"], list) else [record["query"]]):
            if not isinstance(query, dict) or not {"input", "gold"} <= query.keys():
                raise HistoryError(f"{source}: query {number} needs the fields 'input' and 'gold'.")
            queries.append(make_query(history.task, query.get("id", f"{record['user_id']}-{number}"),
                                      str(query["input"]), query["gold"]))
        users.append(EvalUser(str(record["user_id"]), history, queries))
    return users


def _join_questions(questions: list[dict], outputs: dict, outputs_path: Path) -> list[dict]:
    golds = outputs.get("golds") if isinstance(outputs, dict) else None
    if not isinstance(golds, list):
        raise HistoryError(f"{outputs_path}: expected {{\"task\": ..., \"golds\": [{{id, output}}]}}.")
    by_id = {str(gold["id"]): gold["output"] for gold in golds}
    joined = []
    for question in questions:
        question_id = str(question["id"])
        if question_id not in by_id:
            raise HistoryError(f"{outputs_path}: no gold output for question id {question_id}; pass the matching outputs file.")
        joined.append({"user_id": question_id, "profile": question.get("profile", []),
                       "query": [{"id": question_id, "input": question["input"], "gold": by_id[question_id]}]})
    return joined


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HistoryError(f"{path}: file not found. Pass a LaMP-format JSON file.") from None
    except json.JSONDecodeError as exc:
        raise HistoryError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}).") from None


# ---------------------------------------------------------------------------------------------
# leakage check

def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def bank_training_texts(bank_users: str | Path, manifest: dict | None = None) -> tuple[set[str], set[str]]:
    """Return (user ids, normalized input texts) of the bank's training data.

    With a manifest, only the anchors' trained items count (each anchor trains on its first
    ``n_trained`` items); without one, every item of every bank user counts.
    """
    data = _read_json(Path(bank_users))
    if not isinstance(data, list):
        raise HistoryError(f"{bank_users}: expected a JSON list of bank users {{user_id, profile}}.")
    anchors = {str(a["user_id"]): int(a["n_trained"]) for a in manifest["anchors"]} if manifest else None
    user_ids, texts = set(), set()
    for user in data:
        user_id = str(user["user_id"])
        user_ids.add(user_id)
        if anchors is not None and user_id not in anchors:
            continue
        history = parse_history(user["profile"], source=f"{bank_users} user {user_id}")
        items = history.items[: anchors[user_id]] if anchors is not None else history.items
        texts.update(_normalize(str(item[history.task.input_field])) for item in items)
    return user_ids, texts


def check_disjoint(users: list[EvalUser], manifest: dict | None = None, bank_users: str | Path | None = None,
                   exclude_overlap: bool = False) -> list[EvalUser]:
    """Check that no evaluation user is a bank user and no query text is in bank training data.

    ``manifest`` gives the bank's users (its clustering labels) and anchors; ``bank_users`` gives
    their history texts. Overlapping queries raise LeakageError, or are dropped (with a warning)
    when ``exclude_overlap`` is set; returns the users left.
    """
    bank_ids = set(manifest["clustering"]["labels"]) if manifest else set()
    texts: set[str] = set()
    if bank_users is not None:
        file_ids, texts = bank_training_texts(bank_users, manifest)
        bank_ids |= file_ids
    shared = sorted(user.user_id for user in users if user.user_id in bank_ids)
    if shared:
        raise LeakageError(f"{len(shared)} evaluation users are bank users ({', '.join(shared[:5])}); "
                           "evaluate users outside the bank or pass another --bank.")

    kept, dropped = [], []
    for user in users:
        queries = [q for q in user.queries if _normalize(q.input) not in texts]
        dropped += [f"{user.user_id}/{q.query_id}" for q in user.queries if q not in queries]
        if queries:
            kept.append(EvalUser(user.user_id, user.history, queries))
    if dropped and not exclude_overlap:
        raise LeakageError(f"{len(dropped)} evaluation queries appear in the bank's training data "
                           f"({', '.join(dropped[:5])}); pass --exclude-overlap to leave them out.")
    if dropped:
        logger.warning("left out %d queries whose text is in the bank's training data: %s", len(dropped), ", ".join(dropped))
    return kept

