"""End to end on the real default model, embedder, built-in banks and llama.cpp (minutes on 2 CPU cores)."""

import json
import shutil

import pytest
from click.testing import CliRunner

from mta_local.cli import cli

from .conftest import EXAMPLES, SHARED_DATA

pytestmark = pytest.mark.slow

MOVIE_USER = "lamp2-user-8000029.json"
OTHER_MOVIE_USER = "lamp2-user-8000137.json"
QUERIES = json.loads((EXAMPLES / "queries.json").read_text())


@pytest.fixture(scope="module")
def home(enrolled_home):
    return enrolled_home[0]


@pytest.fixture(scope="module")
def enrolled(enrolled_home):
    """The CLI result of enrolling the movie-tagging example (shared by the session)."""
    return enrolled_home[1]


@pytest.fixture
def in_home(home, monkeypatch):
    monkeypatch.setenv("MTA_LOCAL_HOME", str(home))
    return home


def profile_dir(home, name="default"):
    return home / "data" / "profiles" / name


def derived_files(home, pattern, name="default"):
    return sorted((home / "data" / "derived" / name).glob(pattern))


def test_enroll_writes_profile(enrolled, home):
    folder = profile_dir(home)
    recipe = json.loads((folder / "recipe.json").read_text())

    assert "anchors: lamp2-movies/" in enrolled.output
    names = ("recipe.json", "history.json", "embedding.json", "stacked/adapter_config.json", "stacked/adapter.safetensors")
    for name in names:
        assert (folder / name).is_file(), name
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == sorted(names)
    assert sum((folder / name).stat().st_size for name in names) <= 2_500_000
    assert len(derived_files(home, "adapter-*.gguf")) == 1
    assert recipe["bank"]["id"] == "lamp2-movies"
    assert [a["weight"] for a in recipe["anchors"]] == sorted((a["weight"] for a in recipe["anchors"]), reverse=True)
    assert sum(a["weight"] for a in recipe["anchors"]) == pytest.approx(1.0, abs=1e-5)
    assert recipe["stack"]["rank"] == 4
    assert recipe["probe"]["effect"] > 0.05
    assert not list(folder.parent.glob(".*"))


def test_stacked_adapter_config_is_peft_format(enrolled, in_home, home):
    from peft import LoraConfig

    from mta_local.profile import load_profile

    config = LoraConfig.from_pretrained(str(profile_dir(home) / "stacked"))
    stacked = load_profile().stacked()

    assert config.r == 4
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(stacked.tensors) == 30 * 7
    assert stacked.tensors["model.layers.29.mlp.down_proj"][0].shape == (4, 1536)


def test_chat_one_shot_answers(enrolled, in_home):
    prompt = QUERIES[MOVIE_USER]["prompt"]

    result = CliRunner().invoke(cli, ["chat", "--runtime-adapter", "--prompt", prompt, "--max-tokens", "16"],
                                catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_chat_prompt_equals_training_prompt(enrolled, in_home):
    from mta_local.chat import ChatSession
    from mta_local.history import parse_history, training_examples
    from mta_local.profile import load_profile
    from mta_local.templates import prompt_renderer

    session = ChatSession(load_profile())
    history = parse_history(session.profile.history())
    instruction = history.task.instruction(history.items[0]["description"])
    trained_prompt = prompt_renderer(session.base)(training_examples(history, k=1)[0][0])

    served = session.prompt_text([{"role": "user", "content": session.user_content(instruction, exclude=0)}])

    assert served == trained_prompt


def test_chat_rebuilds_missing_runtime_adapter(enrolled, in_home, home):
    shutil.copytree(profile_dir(home), profile_dir(home, "copied"))
    assert not derived_files(home, "*", "copied")

    result = CliRunner().invoke(cli, ["chat", "--profile", "copied", "--runtime-adapter", "--prompt", "hi", "--max-tokens", "4"],
                                catch_exceptions=False)

    assert result.exit_code == 0, result.output
    rebuilt, = derived_files(home, "adapter-*.gguf", "copied")
    assert rebuilt.read_bytes() == derived_files(home, "adapter-*.gguf")[0].read_bytes()


def test_chat_rejects_profile_without_stacked_adapter(enrolled, in_home, home):
    shutil.copytree(profile_dir(home), profile_dir(home, "broken"))
    (profile_dir(home, "broken") / "stacked" / "adapter.safetensors").unlink()

    result = CliRunner().invoke(cli, ["chat", "--profile", "broken", "--prompt", "hi"], catch_exceptions=False)

    assert result.exit_code == 1
    assert "incomplete (missing stacked/adapter.safetensors)" in result.output


def test_chat_rejects_adapter_without_effect(enrolled, in_home, home):
    from mta_local.gguf_adapter import write_adapter
    from mta_local.merge import LoraWeights
    from mta_local.models import resolve_base_model
    from mta_local.profile import load_profile

    shutil.copytree(profile_dir(home), profile_dir(home, "inert"))
    stacked = load_profile("inert").stacked()
    inert = LoraWeights({m: (a, b * 0) for m, (a, b) in stacked.tensors.items()}, 1.0)
    write_adapter(load_profile("inert").adapter_gguf, inert, resolve_base_model())

    result = CliRunner().invoke(cli, ["chat", "--profile", "inert", "--runtime-adapter", "--prompt", "hi"],
                                catch_exceptions=False)

    assert result.exit_code == 1
    assert "is not in effect" in result.output


def test_adapter_parity_on_f32_base(enrolled, in_home):
    from mta_local.fidelity import compare_effects, f32_base_copy
    from mta_local.gguf_adapter import write_adapter
    from mta_local.models import resolve_base_model
    from mta_local.profile import load_profile
    from mta_local.verify import combined_adapter, fixed_prompts

    profile = load_profile()
    base = resolve_base_model()
    f32 = f32_base_copy(base)
    adapter = combined_adapter(profile)
    path = write_adapter(in_home / "parity.gguf", adapter, f32)

    comparison = compare_effects(f32, path, adapter, fixed_prompts(profile, base, 4))

    assert comparison.effect_scale > 0.5
    assert comparison.correlation >= 0.9999


def test_two_users_get_different_anchors():
    from mta_local.bank import open_bank
    from mta_local.embed import load_embedder, user_embedding
    from mta_local.history import read_history
    from mta_local.retrieve import select_anchors

    bank = open_bank("lamp2-movies", task="movie_tagging")
    _, embedder = load_embedder()
    ids, vectors = bank.anchor_embeddings()
    choices = []
    for name in (MOVIE_USER, OTHER_MOVIE_USER):
        history = read_history(EXAMPLES / name)
        vector = user_embedding(embedder, [history.task.history_line(item) for item in history.items])
        choices.append([(c.anchor_id, round(c.weight, 4)) for c in select_anchors(vector, vectors, ids, 2)])

    assert choices[0] != choices[1]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs the LaMP-2 data next to the project")
def test_bank_build_then_enroll(tmp_path, monkeypatch):
    from converters.lamp2_movies import main as convert

    monkeypatch.setenv("MTA_LOCAL_HOME", str(tmp_path / "home"))
    assert convert([str(SHARED_DATA / "lamp2-movie-tagging" / "test_100.json"), "--out", str(tmp_path / "data")]) == 0
    runner = CliRunner()

    built = runner.invoke(cli, ["bank", "build", str(tmp_path / "data" / "bank_users.json"), "--out", str(tmp_path / "tiny"),
                                "--clusters", "2", "--max-items", "2", "--epochs", "1", "--silent"], catch_exceptions=False)
    enrolled = runner.invoke(cli, ["enroll", str(EXAMPLES / OTHER_MOVIE_USER), "--bank", str(tmp_path / "tiny"),
                                   "--profile", "tiny", "--epochs", "1", "--top-k", "1", "--silent"], catch_exceptions=False)

    assert built.exit_code == 0, built.output
    manifest = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    assert len(manifest["anchors"]) == 2
    assert manifest["clustering"]["users"] == 12
    assert enrolled.exit_code == 0, enrolled.output
    assert "anchors: tiny/" in enrolled.output
    assert derived_files(tmp_path / "home", "adapter-*.gguf", "tiny")


def test_interrupted_enroll_keeps_previous_profile(enrolled, in_home, home, monkeypatch):
    import mta_local.enroll

    before = {p: p.read_bytes() for p in [*profile_dir(home).rglob("*.*"), *derived_files(home, "*")]}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mta_local.enroll, "train_lora", interrupt)
    result = CliRunner().invoke(cli, ["enroll", str(EXAMPLES / OTHER_MOVIE_USER), "--silent"])

    assert result.exit_code == 130
    assert {p: p.read_bytes() for p in [*profile_dir(home).rglob("*.*"), *derived_files(home, "*")]} == before
    assert not list(profile_dir(home).parent.glob(".*"))


def test_chat_default_uses_folded_copy(enrolled, in_home, home):
    prompt = QUERIES[MOVIE_USER]["prompt"]

    result = CliRunner().invoke(cli, ["chat", "--prompt", prompt, "--max-tokens", "16"], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert result.output.strip()
    folded, = derived_files(home, "base-folded-*.Q8_0.gguf")
    assert folded.name.split("-")[2].split(".")[0] == derived_files(home, "adapter-*.gguf")[0].stem.split("-")[1]
