import json
import shutil

import pytest

from mta_local.bank import Bank, builtin_banks, open_bank
from mta_local.config import LLAMA_TARGET_MODULES
from mta_local.errors import BankError
from mta_local.models import resolve_base_model

BUILTIN = ["lamp2-movies", "amazon-rating", "amazon-titles"]


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_bank_matches_default_model(name):
    bank = open_bank(name, task="")
    base = resolve_base_model()

    bank.check_compatible(base, "all-MiniLM-L6-v2")
    assert bank.manifest["lora"]["rank"] == 8
    assert bank.manifest["lora"]["target_modules"] == list(LLAMA_TARGET_MODULES)
    for anchor in bank.anchors:
        assert anchor["n_items"] >= bank.manifest["build"]["min_items"]
        assert len(anchor["embedding"]) == bank.manifest["embedder"]["dim"]


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_bank_anchor_loads(name):
    bank = open_bank(name, task="")

    adapter = bank.load_anchor(bank.anchors[0]["id"])

    assert adapter.rank == 8
    assert len(adapter.tensors) == 30 * 7


def test_builtin_banks_within_size_budget():
    total = sum(p.stat().st_size for path in builtin_banks().values() for p in path.rglob("*") if p.is_file())

    assert total <= 80 * 1024 * 1024


def copy_bank(tmp_path):
    target = tmp_path / "bank"
    shutil.copytree(builtin_banks()["lamp2-movies"], target)
    return target


@pytest.mark.parametrize("file_name", ["../outside.safetensors", "/etc/passwd.safetensors", "anchor.bin"])
def test_manifest_file_outside_bank_rejected(tmp_path, file_name):
    path = copy_bank(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["anchors"][0]["file"] = file_name
    (path / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(BankError, match="must be a .safetensors file inside the bank folder"):
        Bank(path)


def test_tampered_anchor_rejected(tmp_path):
    path = copy_bank(tmp_path)
    bank = Bank(path)
    anchor_file = path / bank.anchors[0]["file"]
    anchor_file.write_bytes(anchor_file.read_bytes()[:-10] + b"0123456789")

    with pytest.raises(BankError, match="sha256 does not match"):
        bank.load_anchor(bank.anchors[0]["id"])


def test_bank_for_other_base_model_rejected(tmp_path):
    path = copy_bank(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["base_model"]["sha256"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(BankError, match="was built for base model"):
        Bank(path).check_compatible(resolve_base_model(), "all-MiniLM-L6-v2")


def test_unknown_format_version_rejected(tmp_path):
    path = copy_bank(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(BankError, match="format version 99 is not understood"):
        Bank(path)
