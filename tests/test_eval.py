"""Evaluation data, the history prior and `mta-local eval` end to end on the real default model."""

import json

import pytest
from click.testing import CliRunner

from mta_local.cli import cli
from mta_local.data import check_disjoint, load_eval_users, raw_input
from mta_local.errors import HistoryError, LeakageError
from mta_local.evaluate import EvalConfig, parse_methods, prior_answer
from mta_local.metrics import classification_metrics
from mta_local.tasks import TASKS

from .conftest import EXAMPLES, SHARED_DATA

LAMP2 = SHARED_DATA / "lamp2-movie-tagging" / "test_100.json"
QUERIES = json.loads((EXAMPLES / "queries.json").read_text())
MOVIE_USERS = ["lamp2-user-8000029.json", "lamp2-user-8000137.json"]


def movie_users_file(tmp_path):
    """Write the two LaMP-2 example users with their held-out queries as a per-user file."""
    users = [{"user_id": name.split("-")[2].split(".")[0], "profile": json.loads((EXAMPLES / name).read_text()),
              "query": [{"id": f"q{i}", "input": QUERIES[name]["prompt"], "gold": QUERIES[name]["gold"]}]}
             for i, name in enumerate(MOVIE_USERS)]
    path = tmp_path / "eval_users.json"
    path.write_text(json.dumps(users))
    return path


def headline_questions(tmp_path):
    """Write a LaMP-4-format questions/outputs pair with one user."""
    profile = [{"id": "1", "text": "The city council voted to close the library on Sundays.", "title": "Library Loses Sundays"},
               {"id": "2", "text": "A heat wave broke records across the state this week.", "title": "Record Heat Grips State"}]
    questions = [{"id": "400", "input": "Generate a headline for the following article: Heavy rain flooded the subway.",
                  "profile": profile}]
    (tmp_path / "dev_questions.json").write_text(json.dumps(questions))
    (tmp_path / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_4", "golds": [{"id": "400", "output": "Subway Floods"}]}))
    return tmp_path / "dev_questions.json"


@pytest.mark.skipif(not LAMP2.is_file(), reason="needs the LaMP-2 test file in ../shared/data")
def test_prior_lamp2_accuracy():
    users = load_eval_users(LAMP2)
    task = TASKS["movie_tagging"]
    predictions = [prior_answer(task, u, q) for u in users for q in u.queries]
    golds = [q.gold for u in users for q in u.queries]

    result = classification_metrics(task.labels)(predictions, golds)

    assert len(golds) == 72
    assert round(result["accuracy"], 4) == 0.3611
    assert round(result["f1"], 4) == 0.2346


def test_prior_rating_rounds_mean(tmp_path):
    path = tmp_path / "users.json"
    path.write_text(json.dumps([{"user_id": "u", "profile": [{"text": "x", "score": 4}, {"text": "y", "score": 5}],
                                 "query": [{"id": "q", "input": "z", "gold": "5"}]}]))
    user = load_eval_users(path)[0]

    assert prior_answer(TASKS["product_rating"], user, user.queries[0]) == "5"


@pytest.mark.parametrize("task, text, expected", [
    ("movie_tagging", TASKS["movie_tagging"].instruction("A film."), "A film."),
    ("movie_tagging", TASKS["movie_tagging"].instruction("A film.").removesuffix(" Tag:"), "A film."),
    ("news_headline", "Generate a headline for the following article: Rain fell.", "Rain fell."),
    ("scholarly_title", "Generate a title for the following abstract of a paper: We study X.", "We study X."),
    ("product_rating", "Great strings.", "Great strings."),
])
def test_raw_input_from_prompt(task, text, expected):
    assert raw_input(TASKS[task], text) == expected


def test_questions_need_outputs(tmp_path):
    path = headline_questions(tmp_path)
    (tmp_path / "dev_outputs.json").unlink()

    with pytest.raises(HistoryError, match="needs its outputs file"):
        load_eval_users(path)


def test_questions_joined_with_outputs(tmp_path):
    users = load_eval_users(headline_questions(tmp_path))

    assert users[0].history.task.name == "news_headline"
    assert users[0].queries[0].input == "Heavy rain flooded the subway."
    assert users[0].queries[0].gold == "Subway Floods"


def test_overlap_with_bank_rejected(tmp_path):
    users = load_eval_users(movie_users_file(tmp_path))
    leaked = users[0].queries[0].input
    bank_users = tmp_path / "bank_users.json"
    bank_users.write_text(json.dumps([{"user_id": "b1", "profile": [{"description": leaked.upper(), "tag": "comedy"}]}]))

    with pytest.raises(LeakageError, match="1 evaluation queries appear"):
        check_disjoint(users, bank_users=bank_users)
    kept = check_disjoint(users, bank_users=bank_users, exclude_overlap=True)
    assert [u.user_id for u in kept] == [users[1].user_id]


def test_bank_user_rejected(tmp_path):
    users = load_eval_users(movie_users_file(tmp_path))
    manifest = {"clustering": {"labels": {users[0].user_id: 0}}, "anchors": []}

    with pytest.raises(LeakageError, match="are bank users"):
        check_disjoint(users, manifest=manifest)


def test_unknown_method():
    with pytest.raises(Exception, match="unknown method oppu"):
        parse_methods("base,oppu")


def test_methods_in_table_order():
    assert parse_methods("mta,prior,base") == ("base", "prior", "mta")
    assert EvalConfig().methods == ("prior", "base")


def test_eval_cli_end_to_end(tmp_path):
    out = tmp_path / "out"
    args = ["eval", "--data", str(movie_users_file(tmp_path)), "--methods", "prior,base,rag-1", "--users", "2",
            "--out", str(out), "--resamples", "50"]

    result = CliRunner().invoke(cli, args, catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert "| LaMP-2 | Acc / F1 |" in result.output
    assert "| task | metric | base | prior | rag-1 |" in result.output
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 6
    results = json.loads((out / "results.json").read_text())
    assert results["users"] == 2
    assert set(results["methods"]) == {"base", "prior", "rag-1"}
    assert (out / "results.png").stat().st_size > 0

    # a second run finds every answer cached and adds nothing
    again = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert again.exit_code == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 6

    # --report-only summarizes the cached answers without running anything
    report = CliRunner().invoke(cli, args + ["--report-only"], catch_exceptions=False)
    assert report.exit_code == 0
    assert report.stdout == result.stdout

    # other settings in the same folder are rejected
    changed = CliRunner().invoke(cli, args + ["--seed", "3"], catch_exceptions=False)
    assert changed.exit_code == 1
    assert "contains a run with other settings (config.seed)" in changed.output


def test_eval_cli_lamp4_questions(tmp_path):
    out = tmp_path / "out"
    args = ["eval", "--data", str(headline_questions(tmp_path)), "--methods", "base,prior,rag-1", "--out", str(out),
            "--resamples", "20", "--max-new-tokens", "12"]

    result = CliRunner().invoke(cli, args, catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert "| LaMP-4 | R-1 / R-L |" in result.output
    prior = json.loads((out / "results.json").read_text())["methods"]["prior"]
    assert prior["rouge-1"] == 0.0  # the nearest history title shares no word with "Subway Floods"


def citation_questions(tmp_path):
    """Write a LaMP-1-format questions/outputs pair with one user (a task no built-in bank covers)."""
    profile = [{"id": "1", "title": "Sparse attention for long documents", "abstract": "We sparsify attention."},
               {"id": "2", "title": "Pruning transformers at training time", "abstract": "We prune weights early."}]
    prompt = ('For an author who has written the paper with the title "Efficient long-context transformers", which '
              "reference is related? Just answer with [1] or [2] without explanation. "
              "Reference: [1] - Linear attention revisited [2] - Soil moisture in alpine meadows Answer:")
    (tmp_path / "dev_questions.json").write_text(json.dumps([{"id": "100", "input": prompt, "profile": profile}]))
    (tmp_path / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_1", "golds": [{"id": "100", "output": "[1]"}]}))
    return tmp_path / "dev_questions.json"


@pytest.mark.slow
def test_eval_all_methods_on_task_without_bank(tmp_path, caplog):
    out = tmp_path / "out"
    args = ["eval", "--data", str(citation_questions(tmp_path)), "--task", "citation", "--methods", "all",
            "--out", str(out), "--resamples", "20"]

    result = CliRunner().invoke(cli, args, catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert "no built-in bank for task citation, so merged-only and mta are left out" in caplog.text
    assert "| LaMP-1 | Acc / F1 |" in result.stdout
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert sorted(methods) == sorted(["base", "prior", "rag-1", "rag-3", "rag-5", "adapt-only"])


def test_eval_cli_bad_weights(tmp_path):
    args = ["eval", "--data", str(movie_users_file(tmp_path)), "--merge-weights", "0.5,x"]

    result = CliRunner().invoke(cli, args, catch_exceptions=False)

    assert result.exit_code == 2
    assert "not a comma-separated list of numbers" in result.output
