"""Enroll rejects what cannot be exported in its load stage, before the training model is loaded."""

import json
import shutil

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

import mta_local.enroll
from mta_local.bank import builtin_banks
from mta_local.cli import cli
from mta_local.config import EnrollConfig, LoraConfig
from mta_local.errors import UnsupportedModelError

from .conftest import EXAMPLES

MOVIE_USER = EXAMPLES / "lamp2-user-8000029.json"


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if enroll gets as far as loading the training model."""
    def fail(*args, **kwargs):
        raise AssertionError("enroll loaded the training model before rejecting the config")

    monkeypatch.setattr(mta_local.enroll, "load_training_model", fail)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"target_modules": ("q_proj", "lm_head")}, "adapters on lm_head cannot be exported"),
        ({"target_modules": ("model.embed_tokens",)}, "adapters on embed_tokens cannot be exported"),
        ({"use_rslora": True}, "rsLoRA cannot be exported"),
        ({"use_dora": True}, "DoRA cannot be exported"),
    ],
)
def test_stack_config_rejected(no_training, overrides, message):
    stack = LoraConfig(rank=4, alpha=8.0, **overrides)

    with pytest.raises(UnsupportedModelError, match=message) as caught:
        mta_local.enroll.enroll(MOVIE_USER, EnrollConfig(), stack)

    assert "target the q/k/v/o" in str(caught.value) or "train a plain LoRA" in str(caught.value)


def edited_bank(tmp_path, edit) -> str:
    target = tmp_path / "bank"
    shutil.copytree(builtin_banks()["lamp2-movies"], target)
    manifest = json.loads((target / "manifest.json").read_text())
    edit(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return str(target)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["base_model"].update(sha256="0" * 64), "was built for base model"),
        (lambda m: m["lora"].update(use_dora=True), "bank lamp2-movies: DoRA cannot be exported"),
        (lambda m: m["lora"].update(target_modules=["q_proj", "embed_tokens"]), "adapters on embed_tokens"),
    ],
    ids=["other-base-model", "dora", "embed-tokens"],
)
def test_enroll_rejects_bank(tmp_path, no_training, edit, message):
    bank = edited_bank(tmp_path, edit)

    result = CliRunner().invoke(cli, ["enroll", str(MOVIE_USER), "--bank", bank, "--silent"], catch_exceptions=False)

    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_enroll_rejects_architecture(tmp_path, no_training):
    model = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(model), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    result = CliRunner().invoke(cli, ["enroll", str(MOVIE_USER), "--model", str(model), "--silent"], catch_exceptions=False)

    assert result.exit_code == 1
    assert "architecture 'gpt2' is not supported" in result.output
    assert "Pass --model with a llama-architecture GGUF" in result.output
