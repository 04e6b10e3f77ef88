import json

import pytest

from mta_local.errors import HistoryError
from mta_local.history import Retriever, parse_history, read_history, training_examples
from mta_local.tasks import MOVIE_TAGS

from .conftest import EXAMPLES


@pytest.mark.parametrize(
    "item, task",
    [
        ({"description": "a film", "tag": "comedy"}, "movie_tagging"),
        ({"text": "great strings", "score": 5}, "product_rating"),
        ({"text": "an article", "title": "A headline"}, "news_headline"),
        ({"abstract": "we study", "title": "A title"}, "scholarly_title"),
        ({"input": "question", "output": "answer"}, "generic"),
    ],
)
def test_task_detected_from_fields(item, task):
    assert parse_history([item]).task.name == task


def test_task_override_for_citation():
    history = parse_history([{"title": "A paper", "abstract": "we study"}], task="citation")

    assert history.task.name == "citation"


def test_lamp_user_object_accepted():
    history = parse_history({"user_id": "1", "profile": [{"description": "a film", "tag": "comedy"}]})

    assert len(history.items) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "invalid JSON at line 1 column 2"),
        ('{"a": 1}', "expected a JSON list of history items"),
        ("[]", "the history is empty"),
        ('[{"description": "x", "tag": "comedy"}, 3]', "item 2 of 2 is int, expected a JSON object"),
        ('[{"description": "x", "tag": "comedy"}, {"description": "y"}]', "item 2 of 2: missing field 'tag'"),
        ('[{"text": "x", "score": 7}]', "item 1 of 1: field 'score' must be a whole rating from 1 to 5, got 7"),
        ('[{"text": "x", "score": "good"}]', "item 1 of 1: field 'score' must be a whole rating"),
        ('[{"description": "", "tag": "comedy"}]', "item 1 of 1: field 'description' must be a non-empty string"),
        ('[{"name": "x"}]', "item 1 of 1 has fields ['name'], which match no task"),
    ],
)
def test_bad_history_file_names_item(tmp_path, content, message):
    path = tmp_path / "history.json"
    path.write_text(content)

    with pytest.raises(HistoryError) as error:
        read_history(path)

    assert str(path) in str(error.value)
    assert message in str(error.value)


def test_missing_history_file(tmp_path):
    with pytest.raises(HistoryError, match="file not found"):
        read_history(tmp_path / "nope.json")


def test_example_files_are_valid():
    names = sorted(p.name for p in EXAMPLES.glob("*-user-*.json"))

    assert len(names) >= 2
    for name in names:
        history = read_history(EXAMPLES / name)
        assert len(history.items) == 10


def test_training_example_uses_template_and_other_items():
    items = [
        {"description": "space ships fight over distant galaxy", "tag": "sci-fi"},
        {"description": "couple falls for Paris painter", "tag": "romance"},
        {"description": "robots from another galaxy at war", "tag": "action"},
        {"description": "Rome heist goes wrong", "tag": "comedy"},
        {"description": "detective hunts killer", "tag": "violence"},
    ]
    examples = training_examples(parse_history(items), k=1)

    prompt, target = examples[0]
    assert target == "sci-fi"
    assert prompt.startswith("### User History:\nthe tag for the movie: \"robots from another galaxy at war\" is \"action\"")
    assert "### User Instruction:\nWhich tag does this movie relate to" in prompt
    assert "tags: [" + ", ".join(MOVIE_TAGS) + "]" in prompt
    assert prompt.endswith("description: space ships fight over distant galaxy Tag:")


def test_retriever_excludes_the_item_itself():
    items = [{"input": "alpha beta", "output": "1"}, {"input": "alpha gamma", "output": "2"}]
    retriever = Retriever(parse_history(items))

    assert retriever.lines("alpha beta", 1, exclude=0) == ['input: "alpha gamma" output: "2"']


def test_rating_target_is_integer_text(tmp_path):
    path = tmp_path / "h.json"
    path.write_text(json.dumps([{"text": "fine", "score": "4.0"}, {"text": "bad", "score": 1}]))

    examples = training_examples(read_history(path), k=0)

    assert [target for _, target in examples] == ["4", "1"]
