"""Sharded bank builds: `bank build --shard I/N` and `bank assemble`."""

import json
import shutil

import pytest
from click.testing import CliRunner

from mta_local.bank import Bank, builtin_banks
from mta_local.cli import cli
from mta_local.errors import BankError
from mta_local.models import resolve_base_model

from .conftest import EXAMPLES


def split_builtin(tmp_path, count=2):
    """Split the LaMP-2 movie bank (4 anchors) into shard folders as `bank build --shard I/N` writes them."""
    source = builtin_banks()["lamp2-movies"]
    manifest = json.loads((source / "manifest.json").read_text())
    order = [anchor["user_id"] for anchor in manifest["anchors"]]
    folders = []
    for index in range(count):
        folder = tmp_path / f"shard-{index}"
        folder.mkdir()
        shard = dict(manifest, shard={"index": index, "count": count, "anchors": order})
        shard["anchors"] = [a for position, a in enumerate(manifest["anchors"]) if position % count == index]
        for anchor in shard["anchors"]:
            shutil.copyfile(source / anchor["file"], folder / anchor["file"])
        (folder / "manifest.json").write_text(json.dumps(shard))
        folders.append(folder)
    return folders


def edit(folder, change):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_assemble_joins_shards(tmp_path):
    shards = split_builtin(tmp_path)

    result = CliRunner().invoke(cli, ["bank", "assemble", *map(str, shards), "--out", str(tmp_path / "bank")],
                                catch_exceptions=False)

    bank = Bank(tmp_path / "bank")
    original = Bank(builtin_banks()["lamp2-movies"])
    assert result.exit_code == 0, result.output
    assert "4 anchors from 2 shards" in result.stdout
    assert [a["id"] for a in bank.anchors] == [a["id"] for a in original.anchors]
    assert "shard" not in bank.manifest
    bank.check_compatible(resolve_base_model(), "all-MiniLM-L6-v2")


def drop_shard(shards):
    return shards[:1]


def repeat_anchor(shards):
    edit(shards[1], lambda m: m["anchors"].append(json.loads((shards[0] / "manifest.json").read_text())["anchors"][0]))
    shutil.copyfile(shards[0] / "anchor-000.safetensors", shards[1] / "anchor-000.safetensors")
    return shards


def other_labels(shards):
    edit(shards[1], lambda m: m["clustering"]["labels"].update({"8000002": 3}))
    return shards


def other_seed(shards):
    edit(shards[1], lambda m: m["lora"].update(seed=1))
    return shards


def other_base(shards):
    edit(shards[1], lambda m: m["base_model"].update(sha256="0" * 64))
    return shards


def other_anchor_list(shards):
    edit(shards[1], lambda m: m["shard"]["anchors"].reverse())
    return shards


def tampered_file(shards):
    with open(shards[1] / "anchor-001.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"xxxx")
    return shards


def lost_anchor(shards):
    edit(shards[1], lambda m: m["anchors"].pop())
    return shards


def wrong_shard(shards):
    edit(shards[0], lambda m: m["shard"].update(index=1))
    return shards


def not_a_shard(shards):
    edit(shards[1], lambda m: m.pop("shard"))
    return shards


ASSEMBLE_ERRORS = [
    # (name, change to the two shards, words the error must contain)
    ("missing-shard", drop_shard, ["indexes [0] of 2", "missing [1]", "--shard I/2"]),
    ("repeated-anchor", repeat_anchor, ["anchor 8000002 is in both", "rebuild one of those shards"]),
    ("other-labels", other_labels, ["differ in 'clustering'", "same users file"]),
    ("other-seed", other_seed, ["differ in 'lora'"]),
    ("other-base", other_base, ["differ in 'base_model'"]),
    ("other-anchor-list", other_anchor_list, ["differ in shard anchors", "same --shard N"]),
    ("tampered-file", tampered_file, ["anchor-001.safetensors: missing or its sha256 does not match", "build that shard again"]),
    ("lost-anchor", lost_anchor, ["anchors 8000919 are in no shard", "build shard 1/2 again"]),
    ("wrong-index", wrong_shard, ["indexes [1, 1] of 2", "repeated [1]"]),
    ("not-a-shard", not_a_shard, ["not a shard", "--shard I/N"]),
]


@pytest.mark.parametrize("name,change,words", ASSEMBLE_ERRORS, ids=[row[0] for row in ASSEMBLE_ERRORS])
def test_assemble_rejects(tmp_path, name, change, words):
    shards = change(split_builtin(tmp_path))

    result = CliRunner().invoke(cli, ["bank", "assemble", *map(str, shards), "--out", str(tmp_path / "bank")],
                                catch_exceptions=False)

    assert result.exit_code == 1
    assert result.stderr.count("Error:") == 1
    for word in words:
        assert word in result.stderr
    assert not (tmp_path / "bank").exists()


@pytest.mark.parametrize("value", ["2/2", "1", "a/b", "0/0"])
def test_build_shard_value_rejected(tmp_path, value):
    result = CliRunner().invoke(cli, ["bank", "build", str(EXAMPLES / "queries.json"), "--out", str(tmp_path / "x"),
                                      "--shard", value], catch_exceptions=False)

    assert result.exit_code == 2
    assert "is not I/N with 0 <= I < N" in result.stderr


def test_build_shard_lists_all_anchors(tmp_path):
    # 2 users in 2 clusters give 2 anchors; shard 2/3 trains none of them, so no training runs here
    users = [{"user_id": user, "profile": json.loads((EXAMPLES / f"lamp2-user-{user}.json").read_text())}
             for user in ("8000029", "8000137")]
    (tmp_path / "users.json").write_text(json.dumps(users))

    result = CliRunner().invoke(cli, ["bank", "build", str(tmp_path / "users.json"), "--out", str(tmp_path / "shard"),
                                      "--clusters", "2", "--min-items", "2", "--shard", "2/3", "--silent"],
                                catch_exceptions=False)

    manifest = json.loads((tmp_path / "shard" / "manifest.json").read_text())
    assert result.exit_code == 0, result.output
    assert "shard 2/3 of bank shard" in result.stdout
    assert manifest["shard"]["count"] == 3
    assert sorted(manifest["shard"]["anchors"]) == ["8000029", "8000137"]
    assert manifest["anchors"] == []
    assert len(manifest["clustering"]["users_sha256"]) == 64
    with pytest.raises(BankError, match="this is shard 2/3 of a bank"):
        Bank(tmp_path / "shard")


def two_users(tmp_path):
    users = [{"user_id": user, "profile": json.loads((EXAMPLES / f"lamp2-user-{user}.json").read_text())}
             for user in ("8000029", "8000137")]
    (tmp_path / "users.json").write_text(json.dumps(users))
    return tmp_path / "users.json"


@pytest.mark.slow
def test_build_with_two_workers_assembles_one_bank(tmp_path):
    # the same child processes that take one GPU each, here on the CPU: each trains one of 2 anchors
    result = CliRunner().invoke(cli, ["bank", "build", str(two_users(tmp_path)), "--out", str(tmp_path / "bank"),
                                      "--clusters", "2", "--min-items", "2", "--max-items", "2", "--epochs", "1",
                                      "--rank", "2", "--max-tokens", "64", "--workers", "2", "--silent"],
                                catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert "building with 2 CPU workers" in result.stderr
    bank = Bank(tmp_path / "bank")
    assert bank.manifest["assembled_from_shards"] == 2
    assert sorted(anchor["user_id"] for anchor in bank.anchors) == ["8000029", "8000137"]
    assert bank.load_anchor(bank.anchors[0]["id"]).rank == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank", "users.json"]  # no shard folders left


def test_build_with_workers_reports_failed_shard(tmp_path):
    result = CliRunner().invoke(cli, ["bank", "build", str(two_users(tmp_path)), "--out", str(tmp_path / "bank"),
                                      "--clusters", "3", "--workers", "2", "--silent"], catch_exceptions=False)

    assert result.exit_code == 1
    assert "of the bank build failed (exit 1)" in result.stderr
    assert "3 clusters requested but only 2 users; lower --clusters." in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.json"]
