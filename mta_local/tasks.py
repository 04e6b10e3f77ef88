"""The personal tasks mta-local supports: their history-item fields, prompts and label sets.

Prompts follow the LaMP benchmark as used by the MTA paper: retrieved history items go under
"### User History:" and the task instruction under "### User Instruction:". History items are
written into that slot in LaMP's own profile formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

MOVIE_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
)


@dataclass(frozen=True)
class Task:
    """One task: which fields a history item carries and how it becomes a prompt and a target."""

    name: str
    lamp_id: str  # the LaMP benchmark id, or "" for tasks outside LaMP
    input_field: str  # the field holding what the user reacted to
    output_field: str  # the field with the user's own output (the training target)
    instruction: Callable[[str], str]  # input text -> instruction text
    history_line: Callable[[dict], str]  # history item -> its line in the "User History" slot
    labels: tuple[str, ...] = ()  # closed label set, empty for free text

    def extract_input(self, text: str) -> str | None:
        """Return the input inside a prompt written as this task's instruction, else None."""
        marker = "\x00"
        prefix, _, suffix = self.instruction(marker).partition(marker)
        if len(text) > len(prefix) + len(suffix) and text.startswith(prefix) and text.endswith(suffix):
            return text[len(prefix) : len(text) - len(suffix)]
        return None

    def target(self, item: dict) -> str:
        value = item[self.output_field]
        if self.name == "product_rating":
            return str(int(float(value)))
        return str(value).strip()


def _movie_instruction(description: str) -> str:
    return (
        "Which tag does this movie relate to among the following tags? Just answer with the tag "
        "name without further explanation. tags: [" + ", ".join(MOVIE_TAGS) + "] "
        f"description: {description} Tag:"
    )


def _rating_instruction(review: str) -> str:
    return (
        "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, "
        f"3, 4, or 5 without further explanation. review: {review} Score:"
    )


def _headline_instruction(article: str) -> str:
    return f"Generate a headline for the following article. Article: {article} Headline:"


def _title_instruction(abstract: str) -> str:
    return f"Generate a title for the following abstract of a paper. Abstract: {abstract} Title:"


def citation_instruction(title: str, option_1: str, option_2: str) -> str:
    """Return the LaMP-1 query prompt (history items of LaMP-1 train with the title prompt)."""
    return (
        f'For an author who has written the paper with the title "{title}", which reference is '
        "related? Just answer with [1] or [2] without explanation. "
        f"Reference: [1] - {option_1} [2] - {option_2} Answer:"
    )


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        # LaMP-1 profiles hold the author's own papers {title, abstract}; each trains with the
        # scholarly-title prompt, and queries use citation_instruction.
        Task("citation", "LaMP-1", "abstract", "title", _title_instruction,
             lambda item: f'"{item["title"]}"', labels=("[1]", "[2]")),
        Task("movie_tagging", "LaMP-2", "description", "tag", _movie_instruction,
             lambda item: f'the tag for the movie: "{item["description"]}" is "{item["tag"]}"',
             labels=MOVIE_TAGS),
        Task("product_rating", "LaMP-3", "text", "score", _rating_instruction,
             lambda item: f'{int(float(item["score"]))} is the score for "{item["text"]}"',
             labels=("1", "2", "3", "4", "5")),
        Task("news_headline", "LaMP-4", "text", "title", _headline_instruction,
             lambda item: f'"{item["title"]}" is the title for "{item["text"]}"'),
        Task("scholarly_title", "LaMP-5", "abstract", "title", _title_instruction,
             lambda item: f'"{item["title"]}" is the title for "{item["abstract"]}"'),
        Task("generic", "", "input", "output", lambda text: text,
             lambda item: f'input: "{item["input"]}" output: "{item["output"]}"'),
    )
}

# Field sets that identify a task, checked in this order. {title, abstract} is LaMP-5; LaMP-1
# profiles look the same, so citation is only chosen with --task citation.
DETECTION_ORDER = (
    ("movie_tagging", {"description", "tag"}),
    ("product_rating", {"text", "score"}),
    ("news_headline", {"text", "title"}),
    ("scholarly_title", {"abstract", "title"}),
    ("generic", {"input", "output"}),
)


def detect_task(item: dict) -> str | None:
    """Return the task whose fields the item has, or None."""
    for name, fields in DETECTION_ORDER:
        if fields <= item.keys():
            return name
    return None


def with_history(instruction: str, history_lines: list[str]) -> str:
    """Return the user-turn text: retrieved history items, then the instruction."""
    if not history_lines:
        return instruction
    return "### User History:\n" + "\n".join(history_lines) + "\n\n### User Instruction:\n" + instruction


def build_prompt(task: Task, input_text: str, history_lines: list[str]) -> str:
    """Return the user-turn text for an input of ``task`` with retrieved history lines."""
    return with_history(task.instruction(input_text), history_lines)
