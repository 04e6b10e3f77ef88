import json

import pytest
from click.testing import CliRunner

from mta_local.cli import cli

COMMANDS = [["enroll"], ["chat"], ["export"], ["verify"], ["serve"], ["eval"], ["bank", "build"], ["bank", "list"],
            ["bank", "info"], ["bank", "pull"], ["bank", "remove"], ["bank", "assemble"], ["profiles"], ["paths"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_help_available(command):
    result = CliRunner().invoke(cli, command + ["--help"], catch_exceptions=False)

    assert result.exit_code == 0
    assert "Usage: " in result.output


@pytest.mark.parametrize(
    "command",
    [["enroll"], ["chat"], ["export"], ["verify"], ["serve"], ["eval"], ["bank", "build"], ["bank", "pull"],
     ["bank", "assemble"]],
    ids=lambda c: " ".join(c),
)
def test_help_shows_examples(command):
    result = CliRunner().invoke(cli, command + ["--help"], catch_exceptions=False)

    assert "mta-local " + " ".join(command) in result.output


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"description": "x", "tag": "comedy"}, {"description": "y"}]', "item 2 of 2: missing field 'tag'"),
        ("not json", "invalid JSON at line 1 column 1"),
    ],
)
def test_enroll_bad_history_exits_with_one_line(tmp_path, user_home, content, message):
    path = tmp_path / "history.json"
    path.write_text(content)

    result = CliRunner().invoke(cli, ["enroll", str(path)], catch_exceptions=False)

    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0
    assert not (user_home / "data" / "profiles").exists() or not any((user_home / "data" / "profiles").iterdir())


def test_enroll_unknown_bank(tmp_path):
    path = tmp_path / "h.json"
    path.write_text(json.dumps([{"input": "q", "output": "a"}]))

    result = CliRunner().invoke(cli, ["enroll", str(path), "--bank", "no-such-bank"], catch_exceptions=False)

    assert result.exit_code == 1
    assert "bank 'no-such-bank' not found" in result.output


def test_enroll_without_bank_for_task(tmp_path):
    path = tmp_path / "h.json"
    path.write_text(json.dumps([{"input": "q", "output": "a"}]))

    result = CliRunner().invoke(cli, ["enroll", str(path)], catch_exceptions=False)

    assert result.exit_code == 1
    assert "no built-in bank for task 'generic'" in result.output
    assert "mta-local bank build" in result.output


def test_chat_without_profile():
    result = CliRunner().invoke(cli, ["chat", "--prompt", "hi"], catch_exceptions=False)

    assert result.exit_code == 1
    assert "no profile 'default'" in result.output
    assert "mta-local enroll" in result.output


def test_paths_follow_home(user_home, monkeypatch):
    monkeypatch.delenv("MTA_LOCAL_CACHE")

    result = CliRunner().invoke(cli, ["paths"], catch_exceptions=False)

    assert str(user_home / "data") in result.output
    assert str(user_home / "cache") in result.output


def test_builtin_banks_listed():
    result = CliRunner().invoke(cli, ["bank", "list"], catch_exceptions=False)

    assert "lamp2-movies\tbuilt-in\tmovie_tagging" in result.output
    assert "amazon-rating\tbuilt-in\tproduct_rating" in result.output
    assert "amazon-titles\tbuilt-in\tnews_headline" in result.output


def test_config_file_sets_option_defaults(user_home, tmp_path):
    user_home.mkdir(parents=True, exist_ok=True)
    (user_home / "config.json").write_text(json.dumps({"enroll": {"bank": "bank-from-config"}}))
    path = tmp_path / "h.json"
    path.write_text(json.dumps([{"description": "x", "tag": "comedy"}]))

    result = CliRunner().invoke(cli, ["enroll", str(path)], catch_exceptions=False)

    assert result.exit_code == 1
    assert "bank 'bank-from-config' not found" in result.output


def test_invalid_config_file_named(user_home):
    user_home.mkdir(parents=True, exist_ok=True)
    (user_home / "config.json").write_text("{broken")

    result = CliRunner().invoke(cli, ["paths"], catch_exceptions=False)

    assert result.exit_code == 1
    assert "config.json: invalid JSON" in result.output
