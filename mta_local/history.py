"""Read and validate history files, and retrieve history items for prompts with BM25."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from rank_bm25 import BM25Okapi

from .errors import HistoryError
from .tasks import DETECTION_ORDER, TASKS, Task, build_prompt, detect_task

_FIELDS = dict(DETECTION_ORDER)
_FIELDS["citation"] = _FIELDS["scholarly_title"]


@dataclass
class History:
    """A user's validated history items and the task they belong to."""

    task: Task
    items: list[dict]
    source: str  # file name, used in messages

    def inputs(self) -> list[str]:
        return [str(item[self.task.input_field]) for item in self.items]


def read_history(path: str | Path, task: str | None = None) -> History:
    """Read a history file: a JSON list of items, or a LaMP user object with a "profile" list.

    Raises HistoryError naming the file, the item and the field at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise HistoryError(f"{path}: file not found. Pass the path of a JSON history file.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise HistoryError(f"{path}: not UTF-8 text ({exc.reason}). Save the file as UTF-8 JSON.") from None
    except json.JSONDecodeError as exc:
        raise HistoryError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}). Fix the JSON syntax."
        ) from None
    return parse_history(data, source=str(path), task=task)


def parse_history(data, source: str = "history", task: str | None = None) -> History:
    """Validate already-loaded history data; see read_history."""
    if isinstance(data, dict) and "profile" in data:
        data = data["profile"]
    if not isinstance(data, list):
        raise HistoryError(
            f"{source}: expected a JSON list of history items (or an object with a \"profile\" list), "
            f"got {type(data).__name__}."
        )
    if not data:
        raise HistoryError(f"{source}: the history is empty. Add at least one history item.")

    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise HistoryError(f"{source}: {item_label(index, len(data))} is {type(item).__name__}, "
                               "expected a JSON object.")

    if task is None:
        task = detect_task(data[0])
        if task is None:
            raise HistoryError(
                f"{source}: {item_label(0, len(data))} has fields {sorted(data[0])}, which match no task. Expected one of: "
                + "; ".join(f"{name} {{{', '.join(sorted(fields))}}}" for name, fields in DETECTION_ORDER)
                + ". Rename the fields or pass --task."
            )
    elif task not in TASKS:
        raise HistoryError(f"unknown task {task!r}. Choose one of: {', '.join(TASKS)}.")

    items = [_check_item(item, item_label(index, len(data)), task, source) for index, item in enumerate(data)]
    return History(task=TASKS[task], items=items, source=source)


def item_label(index: int, total: int) -> str:
    """Name a history item for messages, counting from 1 as a person reading the file does."""
    return f"item {index + 1} of {total}"


def _check_item(item: dict, label: str, task: str, source: str) -> dict:
    required = sorted(_FIELDS[task])
    for name in required:
        if name not in item:
            raise HistoryError(
                f"{source}: {label}: missing field {name!r} ({task} items need {required}). "
                "Add the field or pass --task for another task."
            )
        value = item[name]
        if task == "product_rating" and name == "score":
            continue
        if not isinstance(value, str) or not value.strip():
            raise HistoryError(
                f"{source}: {label}: field {name!r} must be a non-empty string, got {value!r}."
            )
    if task == "product_rating":
        score = item["score"]
        try:
            number = float(score)
        except (TypeError, ValueError):
            number = None
        if isinstance(score, bool) or number is None or number not in (1, 2, 3, 4, 5):
            raise HistoryError(
                f"{source}: {label}: field 'score' must be a whole rating from 1 to 5, got {score!r}."
            )
    return item


def _tokenize(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower()) or ["<empty>"]


class Retriever:
    """BM25 over a user's history items; returns history lines for the "User History" slot."""

    def __init__(self, history: History):
        self.history = history
        self._bm25 = BM25Okapi([_tokenize(text) for text in history.inputs()])

    def best_index(self, query: str) -> int:
        """Return the index of the best-matching history item (ties: the earlier item)."""
        scores = self._bm25.get_scores(_tokenize(query))
        return min(range(len(scores)), key=lambda i: (-scores[i], i))

    def lines(self, query: str, k: int, exclude: int | None = None) -> list[str]:
        """Return the k best-matching history lines, best first, leaving out item ``exclude``."""
        if k <= 0:
            return []
        scores = self._bm25.get_scores(_tokenize(query))
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        chosen = [i for i in order if i != exclude][:k]
        return [self.history.task.history_line(self.history.items[i]) for i in chosen]


def training_examples(history: History, k: int = 1) -> list[tuple[str, str]]:
    """Turn every history item into (prompt, target), with k other items retrieved into the prompt."""
    retriever = Retriever(history)
    examples = []
    for index, item in enumerate(history.items):
        text = str(item[history.task.input_field])
        prompt = build_prompt(history.task, text, retriever.lines(text, k, exclude=index))
        examples.append((prompt, history.task.target(item)))
    return examples
